"""``kvmesh bench overhead``: what a router adds to a request, beside the routers users would
pick instead, measured side by side in one run.

One simulated engine that answers at once (``kvmesh sim-engine --speedup``) sits behind every
target: the engine reached directly, ``kvmesh router`` (one process or several workers), and,
when installed, ``sglang-router`` (cache_aware) and ``vllm-router`` (round_robin and
cache_aware). The load generator is ``wrk`` (C, one event loop per thread), so the client is
not the bottleneck; its ceiling is the engine-direct row of the same run.
A ``python floor`` row (``bench.floor_proxy``: a bare uvloop proxy that frames requests and
relays bytes, no routing) shows what any Python proxy costs on the host; it is a reference,
not a peer (``--no-floor`` leaves it out).

Each round runs every (streaming, concurrency) case against every target in turn, the order
rotated per round, for ``--seconds`` each; a figure is the median over rounds. "CPU us/req" is
the CPU time (user + system) of the target's processes per request served: on a shared
machine it moves less than latency and throughput do. "added p50" is
a target's p50 minus the engine's p50 of the same round and case. Ratios are to the best peer
router of the same case. Figures go to ``results/overhead.{json,md}``.

``--install`` puts the peer routers (pinned versions, from PyPI) into their own virtual
environment under the kvmesh cache folder, never into the project's, and wrk from Debian.
``--compare-tree DIR`` also runs ``kvmesh router`` from another source tree (say ``git archive``
of the previous commit, unpacked), as ``kvmesh @compare``: a change's before and after in the
same rounds, on the same engine, where the machine's load moves both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from sim.procs import Proc, free_ports, kvmesh_argv, wait_http

MODEL = "bench-model"
FLOOR = "python floor"
"""The least a Python proxy does (``bench.floor_proxy``): a reference, never a peer."""
PEERS = {"sglang-router": "0.3.2", "vllm-router": "0.1.17"}


def cache_dir() -> Path:
    base = os.environ.get("KVMESH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvmesh")
    return Path(base)


def peer_bin(name: str) -> Path:
    return cache_dir() / "peer-routers" / "bin" / name


def install_peers() -> None:
    """Peer routers into their own venv; wrk from Debian (as root). Idempotent."""
    venv = cache_dir() / "peer-routers"
    if not all(peer_bin(n).exists() for n in PEERS):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = [f"{n}=={v}" for n, v in PEERS.items()]
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], check=True)
    if shutil.which("wrk") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env)


# -- wrk ------------------------------------------------------------------------------------

_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_PCT = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.M)
_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    p50: float
    p90: float
    p99: float
    """Latency percentiles, seconds."""
    requests: int
    errors: int
    """Non-2xx answers plus socket errors: a target that errs is not measured, it is broken."""


def parse_wrk(text: str) -> WrkResult:
    """The figures of ``wrk --latency`` output; ValueError when a figure is missing."""
    pct = {int(p): float(v) * _UNIT[u] for p, v, u in _PCT.findall(text)}
    rps, total = _RPS.search(text), _TOTAL.search(text)
    if rps is None or total is None or not {50, 90, 99} <= pct.keys():
        raise ValueError(f"not wrk --latency output: {text[-400:]!r}")
    errors = 0
    if (m := _NON2XX.search(text)) is not None:
        errors += int(m.group(1))
    if (m := _SOCKERR.search(text)) is not None:
        errors += sum(int(g) for g in m.groups())
    return WrkResult(float(rps.group(1)), pct[50], pct[90], pct[99], int(total.group(1)),
                     errors)


def wrk_script(stream: bool, words: int) -> str:
    """A Lua script posting one chat request of ``words`` words (the same every time)."""
    text = " ".join(f"w{(i * 7919) % 5000}" for i in range(words))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                       "max_tokens": 4 if stream else 1, "stream": stream})
    return ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body)}\n")


async def run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> WrkResult:
    threads = 1 if concurrency == 1 else 2
    proc = await asyncio.create_subprocess_exec(
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
        "-s", str(script), f"{url}/v1/chat/completions",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    return parse_wrk(out.decode(errors="replace"))


# -- processes ------------------------------------------------------------------------------

def tree_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants (a
    router's workers); None where /proc cannot tell."""
    try:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                    stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    except OSError:
        return None
    if pid not in stats:
        return None
    tree, grew = {pid}, True
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    ticks = sum(stats[p][1] for p in tree)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Target:
    name: str
    url: str
    proc: Proc
    ready: str = "/health"


@contextlib.asynccontextmanager
async def started(targets: Sequence[Target]) -> AsyncIterator[None]:
    try:
        for t in targets:
            await t.proc.start()
        async with aiohttp.ClientSession() as session:
            for t in targets:
                await wait_http(session, f"{t.url}{t.ready}", t.proc, timeout=60.0)
        yield
    finally:
        for t in reversed(targets):
            await t.proc.stop()


def make_targets(tmp: Path, speedup: float, workers: Sequence[int],
                 peers: bool, floor: bool = True, compare: str | None = None) -> list[Target]:
    ports = iter(free_ports(2 + 4 * len(workers) + 8))
    eport = next(ports)
    engine = f"http://127.0.0.1:{eport}"

    def target(name: str, port: int, argv: list[str], ready: str = "/health") -> Target:
        log = tmp / f"{name.replace(' ', '-')}.log"
        return Target(name, f"http://127.0.0.1:{port}", Proc(name, argv, log), ready)

    out = [target("engine direct", eport, kvmesh_argv(
        "sim-engine", "--port", str(eport), "--model", MODEL, "--speedup", str(speedup),
        "--log-level", "WARNING"))]
    for n in workers:
        label = "kvmesh" if n == 1 else f"kvmesh x{n} workers"
        # With a compare tree: the same router from that tree (e.g. an export of the
        # previous commit) on its own port, a before/after pair measured in one run.
        trees = [("", None)] if compare is None else [("", None), (" @compare", compare)]
        for suffix, tree in trees:
            port = next(ports)
            cfg = tmp / f"router-{n}{suffix.replace(' @', '-')}.yaml"
            cfg.write_text(f"region: us\nlisten: 127.0.0.1:{port}\n"
                           f"engines: [{{url: {engine}}}]\npolicy: kvmesh\nlog_level: warning\n"
                           + (f"workers: {n}\n" if n > 1 else ""))
            argv = kvmesh_argv("router", "--config", str(cfg))
            if tree is not None:
                argv = ["env", f"PYTHONPATH={tree}", *argv]
            out.append(target(label + suffix, port, argv, "/ready"))
    if floor:
        port = next(ports)
        out.append(target(FLOOR, port, [sys.executable, "-m", "bench.floor_proxy", "--port",
                                        str(port), "--upstream", engine]))
    if not peers:
        return out
    sg, vr = peer_bin("sglang-router"), peer_bin("vllm-router")
    if sg.exists():
        port = next(ports)
        out.append(target("sglang-router cache_aware", port, [
            str(sg), "launch", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", engine, "--policy", "cache_aware", "--log-level", "error",
            "--prometheus-port", str(next(ports))]))
    if vr.exists():
        for policy in ("round_robin", "cache_aware"):
            port = next(ports)
            out.append(target(f"vllm-router {policy}", port, [
                str(vr), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", engine,
                "--policy", policy, "--prometheus-port", str(next(ports))]))
    return out


# -- the run --------------------------------------------------------------------------------

@dataclass(slots=True)
class Case:
    stream: bool
    concurrency: int
    runs: dict[str, list[WrkResult]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """CPU seconds per request of the target's processes, per round."""

    @property
    def label(self) -> str:
        return f"{'streaming' if self.stream else 'non-streaming'}, concurrency {self.concurrency}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(case: Case, direct: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = case.runs[direct]
    for name, runs in case.runs.items():
        added = [r.p50 - b.p50 for r, b in zip(runs, base, strict=True)]
        added99 = [r.p99 - b.p99 for r, b in zip(runs, base, strict=True)]
        rows.append({
            "target": name,
            "rps": median([r.rps for r in runs]),
            "p50_ms": median([r.p50 for r in runs]) * 1e3,
            "p99_ms": median([r.p99 for r in runs]) * 1e3,
            "added_p50_ms": None if name == direct else median(added) * 1e3,
            "added_p99_ms": None if name == direct else median(added99) * 1e3,
            "errors": sum(r.errors for r in runs),
            "cpu_us_per_request": (median(case.cpu[name]) * 1e6 if case.cpu.get(name)
                                   else None),
            "rounds": len(runs),
        })
    peers = [r for r in rows if r["target"] not in (direct, FLOOR)
             and not r["target"].startswith("kvmesh")]
    best_rps = max((r["rps"] for r in peers), default=None)
    best_added = min((r["added_p50_ms"] for r in peers), default=None)
    for r in rows:
        r["rps_vs_best_peer"] = None if not best_rps else r["rps"] / best_rps
        r["added_p50_vs_best_peer"] = (
            None if r["added_p50_ms"] is None or not best_added or best_added <= 0
            else r["added_p50_ms"] / best_added)
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Router overhead, side by side", "", f"Command: `{res['command']}`", "",
             f"Engine: `kvmesh sim-engine --speedup {res['speedup']:g}`; load: wrk, "
             f"{res['words']}-word chat prompts; {res['rounds']} rounds x {res['seconds']:g} s "
             "per target and case; medians over rounds.", ""]
    for case in res["cases"]:
        lines += [f"## {case['label']}", "",
                  "| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
                  "| req/s vs best peer | added p50 vs best peer | CPU us/req | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def f(v: float | None, fmt: str = ".2f") -> str:
            return "-" if v is None else format(v, fmt)

        for r in case["rows"]:
            lines.append(
                f"| {r['target']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{f(r['added_p50_ms'])} | {f(r['added_p99_ms'])} | "
                f"{f(r['rps_vs_best_peer'])} | {f(r['added_p50_vs_best_peer'])} | "
                f"{f(r.get('cpu_us_per_request'), '.0f')} | {r['errors']} |")
        lines.append("")
    return "\n".join(lines)


async def measure(targets: Sequence[Target], cases: Sequence[Case],
                  scripts: dict[bool, Path], rounds: int, seconds: float) -> None:
    total = rounds * len(cases) * len(targets)
    done = 0
    async with started(targets):
        for rnd in range(rounds):
            k = rnd % len(targets)
            order = [*targets[k:], *targets[:k]]
            for case in cases:
                for t in order:
                    pid = t.proc.proc.pid if t.proc.proc is not None else -1
                    before = tree_cpu(pid)
                    res = await run_wrk(t.url, scripts[case.stream], case.concurrency, seconds)
                    after = tree_cpu(pid)
                    case.runs.setdefault(t.name, []).append(res)
                    if before is not None and after is not None and res.requests:
                        case.cpu.setdefault(t.name, []).append((after - before) / res.requests)
                    done += 1
                    print(f"[{done}/{total}] round {rnd + 1} {case.label}: {t.name}: "
                          f"{res.rps:.0f} req/s p50 {res.p50 * 1e3:.2f} ms"
                          + (f" ({res.errors} errors)" if res.errors else ""), flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench overhead",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--install", action="store_true",
                    help="install sglang-router / vllm-router (own venv) and wrk first")
    ap.add_argument("--no-peers", action="store_true", help="only the engine and kvmesh")
    ap.add_argument("--no-floor", action="store_true",
                    help="leave out the Python floor (bench.floor_proxy)")
    ap.add_argument("--workers", default="1", help="kvmesh worker counts, e.g. 1,2")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--streaming", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--speedup", type=float, default=1000.0)
    ap.add_argument("--out", default="results")
    ap.add_argument("--compare-tree", metavar="DIR",
                    help="also run kvmesh from this source tree (its packages first on "
                         "PYTHONPATH), as 'kvmesh @compare': before/after in one run")
    args = ap.parse_args(argv)
    if args.install:
        install_peers()
    if shutil.which("wrk") is None:
        print("wrk is not installed: run with --install (Debian package wrk)", file=sys.stderr)
        return 2
    workers = [int(x) for x in args.workers.split(",")]
    streams = {"both": [False, True], "yes": [True], "no": [False]}[args.streaming]
    cases = [Case(s, int(c)) for s in streams for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-overhead-"))
    compare = str(Path(args.compare_tree).resolve()) if args.compare_tree else None
    if compare is not None and not (Path(compare) / "mesh" / "router.py").is_file():
        print(f"--compare-tree: {compare} holds no kvmesh source tree (mesh/router.py)",
              file=sys.stderr)
        return 2
    targets = make_targets(tmp, args.speedup, workers, not args.no_peers, not args.no_floor,
                           compare)
    missing = [n for n in PEERS if not peer_bin(n).exists()]
    if missing and not args.no_peers:
        print(f"not installed (use --install): {', '.join(missing)}", flush=True)
    scripts = {s: tmp / f"post-{int(s)}.lua" for s in streams}
    for s, path in scripts.items():
        path.write_text(wrk_script(s, args.words))
    asyncio.run(measure(targets, cases, scripts, args.rounds, args.seconds))
    res_doc: dict[str, Any] = {
        "command": "kvmesh bench overhead " + " ".join(argv),
        "speedup": args.speedup, "words": args.words, "rounds": args.rounds,
        "seconds": args.seconds, "cpus": os.cpu_count(),
        "cases": [{"label": c.label, "stream": c.stream, "concurrency": c.concurrency,
                   "rows": summarise(c, targets[0].name),
                   "raw": {k: [asdict(r) for r in v] for k, v in c.runs.items()}}
                  for c in cases],
    }
    text = markdown(res_doc)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(res_doc, indent=1))
    (out / "overhead.md").write_text(text)
    print(f"written to {out / 'overhead.json'} and {out / 'overhead.md'}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0
