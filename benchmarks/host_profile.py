"""Where a GPU decode step spends its host time: wall ms per step with and without cProfile, and
the functions that cost most (the profile behind README's "The GPU engine" table).

    python -m benchmarks.host_profile MODEL.gguf [--cache q8] [--steps 16] [--top 30]

Runs on the GPU machine (CuPy); prefill 19 tokens, 4 untimed decode steps, then `--steps` steps
timed plainly and `--steps` more under cProfile, batch 1.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from ds4bench.engine.models import load_model
from ds4bench.engine.generate import Engine, greedy


def steps(eng, tok, n):
    for _ in range(n):
        tok = np.array([greedy(eng.decode(tok, np.array([0]))[0])])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--cache", default="q8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    eng = Engine(load_model(a.model, None, None, 0), mode=a.cache, backend="cupy", batch=1, ctx=256)
    eng.prefill(0, list(range(1, 20)))
    tok = steps(eng, np.array([5]), 4)
    eng.sync()
    t0 = time.perf_counter()
    tok = steps(eng, tok, a.steps)
    eng.sync()
    print(f"{a.cache} ms/step plain {(time.perf_counter() - t0) / a.steps * 1e3:.2f}")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    steps(eng, tok, a.steps)
    prof.disable()
    eng.sync()
    print(f"{a.cache} ms/step under cProfile {(time.perf_counter() - t0) / a.steps * 1e3:.2f}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
