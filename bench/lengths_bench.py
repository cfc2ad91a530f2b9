"""``kvmesh bench lengths``: what response-length prediction costs on the request path.

One process, interleaved rounds (best of ``--rounds`` reported, with the median), over the
same requests:

1. **predict**: ``LengthPredictor.predict`` on a trained predictor (``--keys`` distinct
   callers over 5 applications and every prompt band, tables warm);
2. **annotate**: ``Dispatcher.annotate`` (the prediction plus the request copy carrying it),
   what the router runs per arrival;
3. **observe**: ``Dispatcher.completed`` (learning + scoring), per completion;
4. **decide**: the kvmesh policy's ``decide`` over ``--replicas`` replicas with the TTFT
   objective and with the end-to-end objective (predicted decode and mixing penalty), side
   by side, to show what the new cost terms add to the decision.

Figures go to ``results/lengths_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.dispatch import Dispatcher
from mesh.policies import Request, make_policy
from mesh.policies.base import ReplicaView, View
from mesh.view import Dispatches, ViewBuilder

APPS = ("translation", "qna", "sentiment", "in-context-qna", "entity-recognition")


def _requests(n: int, keys: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = rng.choice((16, 40, 100, 300, 900, 2500))
        app = rng.choice(APPS) if rng.random() < 0.7 else None
        out.append(Request(str(i), range(prompt), (), 16, f"user{rng.randrange(keys)}",
                           rng.choice((0, 256, 1024, 4096)), 0.0, "m", app=app))
    return out


def _dispatcher() -> Dispatcher:
    views = ViewBuilder("us", Dispatches(), lambda now: (), lambda now: {})
    return Dispatcher(region="us", policy=make_policy("round_robin"), views=views,
                      local=lambda r: True)


def _time(fn: Callable[[], None], n: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) / n * 1e6


def run(n: int, keys: int, replicas: int, rounds: int, seed: int) -> dict[str, Any]:
    reqs = _requests(n, keys, seed)
    outs = [random.Random(i).randint(1, 3000) for i in range(n)]
    core = _dispatcher()
    for r, o in zip(reqs, outs, strict=True):  # warm the tables
        core.completed(core.annotate(r), o)
    annotated = [core.annotate(r) for r in reqs]
    lp = core.lengths
    rng = random.Random(seed)
    reps = tuple(
        ReplicaView(f"http://e{i}", "us", True, rng.random() * 4, rng.random() * 40,
                    rng.random(), rng.random() * 0.3, rng.randrange(50), 0, None, None,
                    rng.random() * 8000)
        for i in range(replicas))
    view = View("us", reps, mean_prompt_tokens=400.0, mean_output_tokens=300.0)
    policy = make_policy("kvmesh", {"decode_step": 0.018, "batch_weight": 0.017})
    prng = random.Random(1)
    ttft_reqs = [replace(r, objective="ttft") for r in annotated[:2000]]
    e2e_reqs = [replace(r, objective="e2e") for r in annotated[:2000]]

    def predict() -> None:
        for r in reqs:
            lp.predict(r)

    def annotate() -> None:
        for r in reqs:
            core.annotate(r)

    def observe() -> None:
        for r, o in zip(annotated, outs, strict=True):
            core.completed(r, o)

    def decide_ttft() -> None:
        for r in ttft_reqs:
            policy.decide(r, view, 0.0, prng)

    def decide_e2e() -> None:
        for r in e2e_reqs:
            policy.decide(r, view, 0.0, prng)

    stages: dict[str, tuple[Callable[[], None], int]] = {
        "predict": (predict, n), "annotate": (annotate, n), "observe": (observe, n),
        "decide_ttft": (decide_ttft, len(ttft_reqs)), "decide_e2e": (decide_e2e, len(e2e_reqs)),
    }
    samples: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(rounds):
        for name, (fn, count) in stages.items():
            samples[name].append(_time(fn, count))
    return {
        "requests": n, "distinct_callers": keys, "replicas": replicas, "rounds": rounds,
        "tables": len(lp.tables),
        "us_per_call": {k: {"best": round(min(v), 3), "median": round(statistics.median(v), 3)}
                        for k, v in samples.items()},
        "e2e_vs_ttft_decide": round(min(samples["decide_e2e"]) / min(samples["decide_ttft"]),
                                    3),
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        "# Response-length prediction on the request path",
        "",
        f"{res['requests']} requests, {res['distinct_callers']} callers, "
        f"{res['tables']} count tables; decide over {res['replicas']} replicas; best of "
        f"{res['rounds']} interleaved rounds.",
        "",
        "| stage | us per call (best) | median |",
        "|---|---:|---:|",
    ]
    for k, v in res["us_per_call"].items():
        lines.append(f"| {k} | {v['best']:.2f} | {v['median']:.2f} |")
    lines += ["", f"decide with the e2e objective / with TTFT: {res['e2e_vs_ttft_decide']:.3f}x"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench lengths", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--keys", type=int, default=2_000, help="distinct callers")
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    res = run(args.requests, args.keys, args.replicas, args.rounds, args.seed)
    text = render(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lengths_bench.json").write_text(json.dumps(res, indent=1))
    (out / "lengths_bench.md").write_text(text + "\n")
    print(f"written to {out / 'lengths_bench.json'} and {out / 'lengths_bench.md'}")
    return 0
