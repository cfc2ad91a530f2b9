"""``kvmesh bench sim-profiles``: what each engine-simulator profile implies, in virtual time.

For every profile, on the sans-I/O ``EngineModel`` (no sockets, no sleeping, exact):

- TTFT of a prompt on an idle engine, uncached, then again fully cached (an identical repeat)
  and half cached (the first half shared with the earlier prompt), for a few prompt lengths;
- closed-loop throughput as the number of always-busy clients grows (512-token prompts,
  64-192 output tokens (mean 128, seeded), no shared prefixes): output tokens/s,
  requests/s, mean TTFT, preemptions. Throughput flattening out is the profile's capacity.

Writes ``results/sim-profiles/results.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.progress import Bar, Phases
from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import PROFILES, Profile

PROMPT_LENGTHS = (128, 512, 2048, 4096)
CLIENTS = (1, 4, 16, 64, 256, 1024)


@dataclass(frozen=True, slots=True)
class TtftRow:
    profile: str
    prompt_tokens: int
    uncached_ms: float
    half_cached_ms: float
    cached_ms: float
    cached_tokens: int

    @property
    def speedup(self) -> float:
        return self.uncached_ms / self.cached_ms


@dataclass(frozen=True, slots=True)
class LoadRow:
    profile: str
    clients: int
    output_tok_s: float
    requests_s: float
    mean_ttft_ms: float
    preemptions: int
    kv_usage_peak: float


def _prompt(n: int, offset: int) -> list[int]:
    return [1000 + offset + i for i in range(n)]


def _ttft(engine: EngineModel, rid: str, ids: list[int], t: float) -> tuple[float, int, float]:
    engine.add_request(rid, ids, 1, t)
    ttft, cached = 0.0, 0
    while engine.has_work():
        r = engine.step(t)
        t = r.end
        for o in r.outputs:
            if o.first_token and o.ttft is not None:
                ttft, cached = o.ttft, o.num_cached_tokens
    return ttft, cached, t


def ttft_rows(profile: Profile, seed: int) -> list[TtftRow]:
    rows = []
    for k, n in enumerate(PROMPT_LENGTHS):
        engine = EngineModel(profile, EngineConfig(), seed=seed)
        base = _prompt(n, offset=100_000 * k)
        cold, _, t = _ttft(engine, "cold", base, 0.0)
        warm, cached, t = _ttft(engine, "warm", base, t)
        half = base[: n // 2] + _prompt(n - n // 2, offset=100_000 * k + 50_000)
        partial, _, t = _ttft(engine, "half", half, t)
        rows.append(TtftRow(profile.name, n, cold * 1e3, partial * 1e3, warm * 1e3, cached))
    return rows


def load_row(profile: Profile, clients: int, seed: int, requests: int) -> LoadRow:
    engine = EngineModel(profile, EngineConfig(), seed=seed)
    rng = random.Random(seed)
    ids = itertools.count()
    t, done, generated, firsts, ttft_sum, peak = 0.0, 0, 0, 0, 0.0, 0.0

    def submit(now: float) -> None:
        i = next(ids)
        engine.add_request(f"r{i}", _prompt(512, offset=600 * i), rng.randint(64, 192), now)

    for _ in range(clients):
        submit(0.0)
    while done < requests:
        r = engine.step(t)
        t = r.end
        peak = max(peak, engine.stats().kv_cache_usage)
        for o in r.outputs:
            generated += len(o.new_token_ids)
            if o.ttft is not None:
                firsts += 1
                ttft_sum += o.ttft
            if o.finished:
                done += 1
                submit(t)
    stats = engine.stats()
    return LoadRow(
        profile.name,
        clients,
        generated / t,
        done / t,
        1e3 * ttft_sum / max(1, firsts),
        stats.num_preemptions,
        peak,
    )


def markdown(ttft: list[TtftRow], load: list[LoadRow], command: str) -> str:
    out = [
        "# Engine simulator profiles (virtual time on the sans-I/O engine model)",
        "",
        f"Command: `{command}`",
        "",
        "## TTFT on an idle engine",
        "",
        "| profile | prompt tokens | uncached ms | half cached ms | fully cached ms "
        "| cached tokens | uncached / cached |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ttft:
        out.append(
            f"| {r.profile} | {r.prompt_tokens} | {r.uncached_ms:.1f} | {r.half_cached_ms:.1f} "
            f"| {r.cached_ms:.1f} | {r.cached_tokens} | {r.speedup:.1f}x |"
        )
    out += [
        "",
        "## Closed-loop load (512-token prompts, 64-192 output tokens, no shared prefixes)",
        "",
        "| profile | clients | output tok/s | requests/s | mean TTFT ms | preemptions "
        "| peak KV usage |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lr in load:
        out.append(
            f"| {lr.profile} | {lr.clients} | {lr.output_tok_s:.0f} | {lr.requests_s:.2f} "
            f"| {lr.mean_ttft_ms:.0f} | {lr.preemptions} | {lr.kv_usage_peak:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmesh bench sim-profiles", description=__doc__)
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=400, help="completions per load point")
    p.add_argument("--out", default="results/sim-profiles", help="output folder")
    args = p.parse_args(argv)
    names = [n for n in args.profiles.split(",") if n]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        print(f"unknown profiles: {', '.join(unknown)}; known: {', '.join(PROFILES)}")
        return 2
    command = shlex.join(["kvmesh", "bench", "sim-profiles", *argv])
    ttft: list[TtftRow] = []
    load: list[LoadRow] = []
    phases = Phases("sim-profiles", len(names))
    for name in names:
        profile = PROFILES[name]
        with phases.step(f"{name}: TTFT, then {len(CLIENTS)} load points"):
            ttft += ttft_rows(profile, args.seed)
            bar = Bar(name, len(CLIENTS), "load points")
            for c in CLIENTS:
                load.append(load_row(profile, c, args.seed, max(args.requests, 2 * c)))
                bar.advance(1, f"{c} clients done")
            bar.close()
    md = markdown(ttft, load, command)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    payload = {
        "command": command,
        "time_base": "virtual seconds on sim.engine_model.EngineModel",
        "ttft": [asdict(r) for r in ttft],
        "load": [asdict(r) for r in load],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    plotted = plot(ttft, load, command, out / "sim_profiles.png")
    if plotted:
        print(f"plot: {plotted}")
    return 0


def plot(ttft: list[TtftRow], load: list[LoadRow], command: str, path: Path) -> Path | None:
    """TTFT against prompt length (uncached, half, cached) and saturation against clients."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install 'kvmesh[plots]' for matplotlib)")
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for profile in dict.fromkeys(r.profile for r in ttft):
        rows = [r for r in ttft if r.profile == profile]
        xs = [r.prompt_tokens for r in rows]
        line = a.plot(xs, [r.uncached_ms for r in rows], "o-", label=f"{profile} uncached")[0]
        a.plot(xs, [r.half_cached_ms for r in rows], "s--", color=line.get_color(),
               label=f"{profile} half cached")
        a.plot(xs, [r.cached_ms for r in rows], "^:", color=line.get_color(),
               label=f"{profile} cached")
        lrows = [r for r in load if r.profile == profile]
        b.plot([r.clients for r in lrows], [r.output_tok_s for r in lrows], "o-",
               color=line.get_color(), label=profile)
    a.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (ms)",
          title="Time to first token")
    b.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s",
          title="Saturation")
    a.set_xticks(PROMPT_LENGTHS, [str(n) for n in PROMPT_LENGTHS])
    a.minorticks_off()
    b.set_xticks(CLIENTS, [str(n) for n in CLIENTS])
    b.minorticks_off()
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(command, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
