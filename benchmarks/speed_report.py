"""The A/A, sensitivity and variance report of benchmarks/gpu_speed.sh (docs/speed.md).

    python3 benchmarks/speed_report.py --aa RUN1 RUN2 RUN3 --sens RUN_WITH_TREES_A_AND_S [--out results/runs]

A/A: every pair of the identical runs compared cell by cell (ds4bench compare's statistics);
a change called there is a false positive. Sensitivity: tree S (DS4BENCH_SLOWDOWN) against
tree A of one interleaved run; the true ratio of a cell is A's decode step over A's step plus
the wait S added per step (measured, slowdown_step_s), and plus the injector's own launches
(S's un-slowed step over A's), next to the nominal 1 / (1 + fraction).
Variance: each round's decode tok/s over its cell's median, against the round's position in
its pass (0: the first process), SM clock, temperature and power at its start and throttling.
Prints markdown; exit 1 when the A/A calls more than one change or a slowed cell is missed or
its interval misses the true ratio's band.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np


def aa(runs: list[str], out: str, alpha: float = 0.05) -> tuple[list[str], int]:
    from ds4bench.cli_matrix import tree_records      # imported here: asv imports every module in benchmarks/
    from ds4bench.harness.results import compare
    lines = ["## A/A: identical runs compared pairwise", "",
             "| A | B | cell | B/A | interval | p | MDE | change |", "|---|---|---|---|---|---|---|---|"]
    called = 0
    for x, y in itertools.combinations(runs, 2):
        (_, _, na, ra), (_, _, nb, rb) = tree_records(x, out), tree_records(y, out)
        for s in compare(ra, rb, alpha=alpha)["speed"]:
            called += s["change"] in ("faster", "slower")
            lines.append(_row(na, nb, s))
    n = len(lines) - 4
    lines += ["", f"**{called} of {n} comparisons called a change** (allowed: at most one)", ""]
    return lines, called


def _row(na, nb, s) -> str:
    ci = "–" if s["ci"] is None else f"{s['ci'][0]:.3f}–{s['ci'][1]:.3f}"
    p = "–" if s["p_value"] is None else f"{s['p_value']:.2g}"
    mde = "–" if s["mde"] is None else f"{100 * s['mde']:.1f}%"
    ratio = "–" if s["speedup"] is None else f"{s['speedup']:.3f}"
    return f"| {na} | {nb} | {s['cell']} | {ratio} | {ci} | {p} | {mde} | {s['change']} |"


def true_band(step: float, r: dict) -> tuple[float, float] | None:
    """The true decode tok/s ratio of slowed cell r against an un-slowed step `step` (seconds),
    as (low, high). high = step / (step + d), d the wait S recorded per step. The injector also
    costs its own launches (n_layer spin kernels a step, paid with the wait at 0 too): S's
    recorded base step T0 (slowdown_base_step_s, the warm-up median with the wait at 0) over
    A's step measures that cost c, and low = step / (step + d + c). c is taken as 0 when T0 is
    not above A's step (the cost is then lost in the noise between the two processes)."""
    d = r.get("slowdown_step_s")
    if not d:
        return None
    c = max(0.0, (r.get("slowdown_base_step_s") or step) - step)
    return step / (step + d + c), step / (step + d)


def sensitivity(run: str, out: str, alpha: float = 0.05) -> tuple[list[str], int]:
    from ds4bench.cli_matrix import tree_records
    from ds4bench.harness.results import compare
    (_, _, _, ra), (_, _, _, rs) = tree_records(f"{run}@A", out), tree_records(f"{run}@S", out)
    base = {r["cell_id"].split("-", 1)[1]: r for r in ra}
    lines = ["## Sensitivity: tree S (DS4BENCH_SLOWDOWN) against tree A, interleaved", "",
             "| cell | slowdown | B/A | interval | true: wait only | true: wait and launches | nominal | called "
             "| inside |", "|---|---|---|---|---|---|---|---|---|"]
    bad = 0
    res = {s["cell"]: s for s in compare(ra, rs, alpha=alpha)["speed"]}
    for r in rs:
        a = base[r["cell_id"].split("-", 1)[1]]
        s = res[r["key"]]
        step = float(np.median([a["batch"] / t for t in a["round_decode_tps"]]))   # seconds per step
        band = true_band(step, r)
        inside = s["ci"] is not None and band is not None and s["ci"][0] <= band[1] and band[0] <= s["ci"][1]
        bad += not (s["change"] == "slower" and inside)
        ci = "–" if s["ci"] is None else f"{s['ci'][0]:.3f}–{s['ci'][1]:.3f}"
        hi, lo = ("–", "–") if band is None else (f"{band[1]:.4f}", f"{band[0]:.4f}")
        lines.append(f"| {r['key']} | {r.get('slowdown')} | {s['speedup']:.3f} | {ci} | {hi} | {lo} | "
                     f"{r.get('slowdown_true_ratio') or 0:.3f} | {s['change']} | {'yes' if inside else 'NO'} |")
    lines += ["", f"**{len(rs) - bad} of {len(rs)} slowed cells called slower with an interval that meets the "
                  f"true ratio** (between its two columns: the wait alone, and the wait plus the injector's "
                  f"launches measured as S's un-slowed step over A's)", ""]
    return lines, bad


def variance(runs: list[str], out: str) -> list[str]:
    from ds4bench.cli_matrix import tree_records
    rows = []
    for name in dict.fromkeys(n.partition("@")[0] for n in runs):      # each run once
        for r in tree_records(name, out)[3]:
            tps = r.get("round_decode_tps") or []
            if len(tps) < 2 or None in tps:
                continue
            med = float(np.median(tps))
            for k, t in enumerate(tps):
                g = (r.get("round_gpu") or [{}] * len(tps))[k] or {}
                rows.append({"rel": t / med - 1, "first": (r.get("round_slot") or [None] * len(tps))[k] == 0,
                             "clock": g.get("sm_clock_mhz"), "temp": g.get("temp_c"), "power": g.get("power_w"),
                             "throttle": bool(g.get("throttle")), "compile": (r.get("round_compile_s") or [None] * len(tps))[k]})
    lines = ["## Where the variance comes from (rounds of every run, tok/s over the cell's median)", ""]
    if not rows:
        return lines + ["no cell with two or more rounds", ""]
    rel = np.array([x["rel"] for x in rows])
    lines += [f"- {len(rows)} rounds; relative deviation from the cell median: sd {100 * rel.std(ddof=1):.2f}%, "
              f"largest {100 * np.abs(rel).max():.1f}%"]
    first = np.array([x["first"] for x in rows])
    if first.any() and (~first).any():
        lines.append(f"- first process of a pass: mean {100 * rel[first].mean():+.2f}% ({first.sum()} rounds) "
                     f"vs the others {100 * rel[~first].mean():+.2f}%")
    for key, what in (("clock", "SM clock at the round's start (MHz)"), ("temp", "temperature (C)"),
                      ("power", "power (W)"), ("compile", "prime pass (s)")):
        v = np.array([x[key] if x[key] is not None else np.nan for x in rows], dtype=float)
        ok = np.isfinite(v)
        if ok.sum() >= 3 and np.ptp(v[ok]) > 0:
            r = np.corrcoef(v[ok], rel[ok])[0, 1]
            lines.append(f"- {what}: {np.nanmin(v):.0f}..{np.nanmax(v):.0f}, correlation with the deviation {r:+.2f}")
        elif ok.any():
            lines.append(f"- {what}: {np.nanmin(v):.1f} in every round")
    thr = sum(x["throttle"] for x in rows)
    lines += [f"- rounds where NVML saw a clock slowdown: {thr}", ""]
    return lines


def drift(runs: list[str], out: str) -> list[str]:
    """The machine's speed over the call: for each pass of each run (in time order), its rounds'
    decode tok/s against the median of the same cell over every run, and the median time to
    read the model (host-bound: it moves with the host's speed, not the GPU's). Rounds of runs
    cut short count too."""
    from ds4bench.cli_matrix import tree_records
    rows = [(name, r) for name in dict.fromkeys(n.partition("@")[0] for n in runs)
            for r in tree_records(name, out)[0].round_records() if r.get("decode_tps")]
    lines = ["## The machine's speed over the call (each pass against its cells' medians over all runs)", ""]
    if len(rows) < 2:
        return lines + ["fewer than two rounds", ""]
    med: dict = {}
    for _, r in rows:
        med.setdefault((r.get("tree"), r["key"]), []).append(r["decode_tps"])
    med = {k: float(np.median(v)) for k, v in med.items()}
    passes: dict = {}
    for name, r in rows:
        passes.setdefault((name, r["round"]), []).append(r)
    lines += ["| run | pass | started (UTC) | rounds | decode tok/s vs the cell median (median, range) | load s |",
              "|---|---|---|---|---|---|"]
    for (name, k), rs in sorted(passes.items(), key=lambda kv: min(x.get("utc_start") or "" for x in kv[1])):
        rel = [100 * (r["decode_tps"] / med[(r.get("tree"), r["key"])] - 1) for r in rs]
        load = [r.get("load_s") for r in rs if r.get("load_s") is not None]
        lines.append(f"| {name} | {k + 1} | {min(r.get('utc_start') or '' for r in rs)[11:19]} | {len(rs)} | "
                     f"{np.median(rel):+.1f}% ({min(rel):+.0f}..{max(rel):+.0f}) | "
                     f"{f'{np.median(load):.1f}' if load else '–'} |")
    return lines + [""]


def process_time(runs: list[str], out: str) -> list[str]:
    """Where a round's process spends its wall time, medians over the rounds: load, engine set-up,
    prime pass (compilation), warm-up, the timed passes, round 1's KL and probe, and the rest
    (interpreter start, imports, CUDA context, fingerprints, the record)."""
    from ds4bench.cli_matrix import tree_records
    rows = [r for name in dict.fromkeys(n.partition("@")[0] for n in runs)
            for r in tree_records(name, out)[0].round_records() if r.get("status", "ok") == "ok"]
    lines = ["## Where a round's process time goes (medians over rounds, seconds)", ""]
    if not rows:
        return lines + ["no round records", ""]
    lines += ["| rounds | wall | load | engine set-up | prime pass | warm-up | warm-up passes | settled | timed | "
              "KL and probe | rest |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for first in (True, False):
        pick = [r for r in rows if (r.get("round") == 0) == first]
        if not pick:
            continue
        parts = ("load_s", "setup_s", "compile_s", "warmup_s", "timed_s", "correctness_s")
        # a part that no round recorded (runs of older commits) is shown as – and stays in the rest
        med = {k: float(np.median([r.get(k) or 0.0 for r in pick])) if any(k in r for r in pick) else None
               for k in ("wall_s", "warmup_passes") + parts}
        settled = sum(bool(r.get("warmup_settled")) for r in pick)
        rest = float(np.median([(r.get("wall_s") or 0.0) - sum(r.get(k) or 0.0 for k in parts) for r in pick]))
        s = {k: "–" if v is None else f"{v:.1f}" for k, v in med.items()}
        lines.append(f"| {'round 1 (with correctness)' if first else 'later rounds (timing only)'}: {len(pick)} | "
                     f"{s['wall_s']} | {s['load_s']} | {s['setup_s']} | {s['compile_s']} | {s['warmup_s']} | "
                     f"{s['warmup_passes'].removesuffix('.0')} | {settled} of {len(pick)} | {s['timed_s']} | {s['correctness_s']} | "
                     f"{rest:.1f} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aa", nargs="*", default=[], help="identical runs (ids or paths)")
    ap.add_argument("--sens", help="a run with trees A and S (S slowed)")
    ap.add_argument("--out", default="results/runs")
    ap.add_argument("--alpha", type=float, default=0.05,
                    help="significance level and 1 - coverage of the intervals (default 0.05)")
    a = ap.parse_args(argv)
    lines, status = [], 0
    if len(a.aa) >= 2:
        got, called = aa(a.aa, a.out, a.alpha)
        lines += got
        status |= called > 1
    if a.sens:
        got, bad = sensitivity(a.sens, a.out, a.alpha)
        lines += got
        status |= bad > 0
    lines += variance(a.aa + ([a.sens] if a.sens else []), a.out)
    lines += drift(a.aa + ([a.sens] if a.sens else []), a.out)
    lines += process_time(a.aa + ([a.sens] if a.sens else []), a.out)
    print("\n".join(lines))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
