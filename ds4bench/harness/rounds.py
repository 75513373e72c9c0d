"""The speed protocol: warm-up until the step time settles, rounds across processes, interleaved.

A cell is measured in R rounds; each round is a fresh `ds4bench cell` process (load, prime,
warm up, `reps` timed passes). The runner interleaves the cells of a matrix round by round:

  round 1   each group's baseline first (the other cells are judged against its fingerprints),
            then the rest: shuffled (order "random") or in axis order (order "abba"; with a tree
            axis the trees are innermost, so one cell's trees run next to each other)
  round k   "random": a fresh seeded shuffle; "abba": the previous round reversed, so two cells
            run A B, B A, A B, ... and a drift in time hits both alike

so no configuration always runs first, last or next to the same neighbour. With one round the
order is the axis order. The order is computed once from the spec's seed and kept in run.json
(`schedule`), so a resumed run continues it.

Inside a round the warm-up (`warm_up`) runs full passes until the pass medians of the step
time settle: the last three (two at first) within `settle` of each other, relative, or until
`warmup_cap` seconds, as NVBench stops on relative noise with a time cap. The prime pass before
it (kernel compilation, lazily built weights) and the decode graph's capture are timed on their
own (`compile_s`, `capture_s`) and never enter tok/s.

The record of a cell merges its rounds (`merge`): per-round samples (`round_decode_tps`,
`round_prefill_tps`, `round_gpu`: SM clock, temperature, power at the round's start and the
slowdown reasons NVML saw; `round_slot`: the round's position in its pass, 0 = the first
process), summaries as medians over rounds, and fingerprints from the first round; a round
whose tokens differ from the first marks the cell non-deterministic. The statistics over
rounds are ds4bench/harness/stats.py.
"""
from __future__ import annotations

import random
import time

import numpy as np

ORDERS = ("random", "abba")
SETTLE = 0.05          # warm-up stops when the last pass medians agree within 5% ...
WARMUP_CAP_S = 3.0     # ... or after this long (the GPU specs speed-aa, speed-sens: 2%, 5 s)
WARMUP_MAX_PASSES = 50


# ---- inside a round --------------------------------------------------------------------------
def pass_time(timing) -> float:
    """What the warm-up watches: the median decode step (the pass's prefill without steps)."""
    return float(np.median(timing.step_s)) if timing.step_s else timing.prefill_s


def warm_up(run_pass, min_passes: int = 0, settle: float = SETTLE, cap_s: float = WARMUP_CAP_S) -> dict:
    """Call `run_pass()` (one full pass, returning its generate Timing) until the step time
    settles; -> passes, settled, warmup_s and the last pass's median step (`step_s`)."""
    t0 = time.perf_counter()
    medians: list[float] = []
    settled = False
    while len(medians) < WARMUP_MAX_PASSES:
        medians.append(pass_time(run_pass()))
        last = medians[-3:]
        if len(medians) >= max(min_passes, 2):
            spread = (max(last) - min(last)) / float(np.median(last)) if np.median(last) > 0 else 0.0
            if spread <= settle:
                settled = True
                break
        if time.perf_counter() - t0 >= cap_s and len(medians) >= min_passes:
            break
    return {"passes": len(medians), "settled": settled, "warmup_s": time.perf_counter() - t0,
            "step_s": medians[-1], "pass_medians_s": medians}


# ---- across rounds ---------------------------------------------------------------------------
def schedule(cells, rounds: int, order: str = "random", seed: int = 0) -> list[list[str]]:
    """Cell ids per round, in run order (see the module docstring)."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: choose from {', '.join(ORDERS)}")
    ids = [c.cell_id for c in cells]
    if rounds == 1:
        return [ids]
    rng = random.Random(seed)
    base = [c.cell_id for c in cells if c.is_baseline]
    rest = [i for i in ids if i not in base]
    if order == "random":
        rng.shuffle(rest)
    out = [base + rest]
    for _ in range(1, rounds):
        if order == "abba":
            out.append(out[-1][::-1])
        else:
            nxt = list(ids)
            rng.shuffle(nxt)
            out.append(nxt)
    return out


def same_tokens(a: dict, b: dict) -> bool:
    return [p.get("tokens") for p in a.get("prompts") or []] == [p.get("tokens") for p in b.get("prompts") or []]


def round_gpu(rec: dict) -> dict:
    return {"sm_clock_mhz": rec.get("gpu_sm_clock_mhz_start"), "sm_clock_mhz_min": rec.get("gpu_sm_clock_mhz_min"),
            "temp_c": rec.get("gpu_temp_c_start"), "power_w": rec.get("gpu_power_w_start"),
            "throttle": list(rec.get("gpu_throttle") or [])}


def merge(rounds: list[dict]) -> dict:
    """One cell record from its round records (in round order; the first gives fingerprints,
    provenance and every field not summarized here)."""
    from .record import RELIABLE_SPREAD
    first = rounds[0]
    rec = dict(first)
    dec = [r.get("decode_tps") for r in rounds]
    pre = [r.get("prefill_tps") for r in rounds]
    rec.update(rounds=len(rounds), round_decode_tps=dec, round_prefill_tps=pre,
               round_gpu=[round_gpu(r) for r in rounds], round_slot=[r.get("round_slot") for r in rounds],
               round_wall_s=[r.get("wall_s") for r in rounds],
               round_compile_s=[r.get("compile_s") for r in rounds],
               round_warmup_passes=[r.get("warmup_passes") for r in rounds])
    rec["wall_s"] = sum(r.get("wall_s") or 0.0 for r in rounds)
    for k in ("decode_tps_reps", "prefill_tps_reps", "step_ms", "ttft_samples_ms"):
        rec[k] = [x for r in rounds for x in (r.get(k) or [])]
    if all(d is not None for d in dec):
        rec["decode_tps"] = float(np.median(dec))
    rec["prefill_tps"] = float(np.median([p for p in pre if p is not None])) if any(p is not None for p in pre) else None
    if rec["ttft_samples_ms"]:
        rec["ttft_ms"] = float(np.median(rec["ttft_samples_ms"]))
    if rec["step_ms"]:
        p50, p90, p99 = np.percentile(rec["step_ms"], [50, 90, 99])
        rec.update(latency_p50_ms=float(p50), latency_p90_ms=float(p90), latency_p99_ms=float(p99))
    waits = [r.get("slowdown_step_s") for r in rounds if r.get("slowdown_step_s") is not None]
    if waits:                                   # each round calibrates its own wait
        rec["slowdown_step_s"] = float(np.median(waits))
        rec["slowdown_base_step_s"] = float(np.median([r["slowdown_base_step_s"] for r in rounds
                                                       if r.get("slowdown_base_step_s") is not None]))
    rec["gpu_throttle"] = sorted({t for r in rounds for t in r.get("gpu_throttle") or []})
    rec["deterministic"] = all(r.get("deterministic") for r in rounds) and all(same_tokens(first, r) for r in rounds)
    if len(rounds) > 1:
        notes = []
        spreads = {what: (max(v) - min(v)) / float(np.median(v))
                   for what, v in (("decode", dec), ("prefill", pre)) if v and all(x for x in v)}
        if spreads:
            rec["timing_spread"] = max(spreads.values())
            notes += [f"{what} tok/s spread {sp:.1%} across {len(rounds)} rounds > {RELIABLE_SPREAD:.0%}"
                      for what, sp in spreads.items() if sp > RELIABLE_SPREAD]
        if rec["gpu_throttle"]:
            notes.append(f"GPU clock slowdown seen: {', '.join(rec['gpu_throttle'])}")
        rec["timing_reliable"] = not notes if spreads else None
        rec["timing_note"] = "; ".join(notes)
        for k in ("timing_spread", "timing_reliable"):
            if rec.get(k) is not None:
                rec.get("unavailable", {}).pop(k, None)
    rec.pop("round", None)
    return rec
