"""Teacher-forced KL divergence of a cell from its baseline (the statistics llama.cpp's
`--kl-divergence` reports).

The baseline's greedy tokens are fed to the cell step by step (teacher forcing), so both score
the same contexts at every step, however early their free-running outputs part. Per step:
  KL(base || cell) = sum_v p_base(v) (log p_base(v) - log p_cell(v))    over the full vocabulary
  top-1 agreement  the cell's argmax equals the baseline's token
  Δp               p_cell(t) - p_base(t) of the baseline's token t
Per cell: the mean, median, p99 and max of KL over every step of every prompt, the fraction of
steps whose top-1 agrees, and the mean and RMS of Δp.

Both sides' log-softmax is stored as float16 (the baseline's in its fingerprints file as
`<prompt>.logprobs` [n, V]; the cell's rounded the same way before the comparison), so a cell
scored against itself gives exactly 0.
"""
from __future__ import annotations

import math

import numpy as np

FIELDS = ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agree", "dp_mean", "dp_rms", "kl_steps")


def step_stats(cell_lp: np.ndarray, base_lp: np.ndarray, base_tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step (rows of [n, V] float16 log-softmax): KL(base || cell), top-1 agreement, Δp."""
    c = np.asarray(cell_lp, np.float64)
    b = np.asarray(base_lp, np.float64)
    n = min(len(c), len(b), len(base_tokens))
    c, b = c[:n], b[:n]
    pb = np.exp(b)
    with np.errstate(invalid="ignore"):
        terms = np.where(pb > 0, pb * (b - c), 0.0)        # 0 log 0 = 0; p_base > 0 where p_cell = 0: inf
    kl = terms.sum(axis=1)
    kl[~np.isfinite(c).all(axis=1)] = math.inf             # NaN/Inf logits: no distribution at all
    t = np.asarray(base_tokens[:n], np.int64)
    rows = np.arange(n)
    top1 = np.argmax(np.where(np.isfinite(c), c, -np.inf), axis=1) == t
    dp = np.exp(c[rows, t]) - pb[rows, t]
    return kl, top1, dp


def summarize(kl: np.ndarray, top1: np.ndarray, dp: np.ndarray) -> dict:
    """Cell statistics over every step of every prompt (FIELDS)."""
    if not len(kl):
        return {}
    return {"kl_mean": float(np.mean(kl)), "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(np.max(kl)),
            "top1_agree": float(np.mean(top1)), "dp_mean": float(np.mean(dp)),
            "dp_rms": float(np.sqrt(np.mean(dp * dp))), "kl_steps": int(len(kl))}


def cell_kl(cell_lp: dict, base_fp: dict) -> dict:
    """KL statistics of a cell's teacher-forced log-softmax (prompt id -> [n, V]) against the
    baseline's fingerprints (verdict.load_fingerprints: tokens and logprobs per prompt)."""
    parts = [step_stats(cell_lp[pid], base_fp[pid]["logprobs"], base_fp[pid]["tokens"])
             for pid in cell_lp if pid in base_fp and "logprobs" in base_fp[pid]]
    if not parts:
        return {}
    return summarize(*(np.concatenate(x) for x in zip(*parts)))


def teacher_forced(engine, prompts, n_gen: int, base_fp: dict):
    """Run the cell's engine on the baseline's tokens; its float16 log-softmax per prompt."""
    from ..engine.generate import generate
    forced = {pid: base_fp[pid]["tokens"].tolist() for pid, _ in prompts}
    return generate(engine, prompts, n_gen, forced=forced).logprobs


# compare's gate: B's KL may exceed A's by this factor plus this many nats before the cell fails
# it (run to run the KL of a deterministic engine repeats exactly; the band absorbs a changed
# reduction order, which moves a healthy mode's KL by tens of percent, not by 2x).
BAND_FACTOR, BAND_MEDIAN, BAND_P99 = 2.0, 1e-3, 1e-2


def band_exceeded(a: dict, b: dict) -> str:
    """Why run B's KL statistics of a joined cell left run A's band ('' when they did not)."""
    why = []
    for k, floor in (("kl_median", BAND_MEDIAN), ("kl_p99", BAND_P99)):
        va, vb = a.get(k), b.get(k)
        if va is not None and vb is not None and not vb <= BAND_FACTOR * va + floor:
            why.append(f"{k} {va:.2g} -> {vb:.2g} > {BAND_FACTOR:g} x A + {floor:g}")
    return "; ".join(why)


def fmt_move(c: dict) -> str:
    a, b = c.get("kl_a"), c.get("kl_b")
    if a is None and b is None:
        return "–"
    text = f"{'–' if a is None else f'{a:.2g}'} → {'–' if b is None else f'{b:.2g}'}"
    return f"**{text}** (beyond the band)" if c.get("kl_moved") else text
