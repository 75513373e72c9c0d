"""Verdicts: a cell's greedy fingerprints against its baseline's.

(Calibration evidence: filled in below, see CALIBRATION.)
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("identical", "close", "drift", "broken", "failed")
RANK = {v: i for i, v in enumerate(VERDICTS)}
BAD = ("broken", "failed")


@dataclass(frozen=True)
class Thresholds:
    tol: float = 0.5            # max |Δlogprob| (nats) over the top-k union before a divergence
    tie: float = 0.05           # baseline top-1 minus top-2 logprob at a divergence that counts as a near tie
    nmse_max: float = 1e-2      # first-step logits NMSE beyond which a cell is broken outright

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = Thresholds()


def worst(verdicts) -> str:
    return max(verdicts, key=RANK.__getitem__, default="identical")


# ---- fingerprint files -----------------------------------------------------------------------
def save_fingerprints(path: str, fingerprints, first_logits: dict) -> None:
    """Per prompt: tokens, top-k ids and logprobs per step, first-step logits; written atomically."""
    arrays = {}
    for fp in fingerprints:
        arrays[f"{fp.prompt_id}.tokens"] = np.asarray(fp.tokens, dtype=np.int32)
        arrays[f"{fp.prompt_id}.topk_ids"] = np.asarray(fp.topk_ids, dtype=np.int32)            # [n, k]
        arrays[f"{fp.prompt_id}.topk_lp"] = np.asarray(fp.topk_logprobs, dtype=np.float64)      # [n, k]
        if fp.prompt_id in first_logits:
            arrays[f"{fp.prompt_id}.first_logits"] = np.asarray(first_logits[fp.prompt_id], np.float32)  # [V]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_fingerprints(path: str) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            pid, _, part = key.rpartition(".")
            out.setdefault(pid, {})[part] = z[key]
    return out


# ---- per step and per prompt -----------------------------------------------------------------
def step_dlogprob(ids_a, lp_a, ids_b, lp_b) -> float:
    """max |Δlogprob| over the union of two best-first top-k lists of one step.

    An id missing from one list has a logprob at most that list's k-th value there, so it
    contributes the lower bound max(0, lp - kth_other): a token that only swaps places at the
    bottom of the list counts as ~0, one that jumps in from far below counts in full.
    """
    a = dict(zip(np.asarray(ids_a).tolist(), np.asarray(lp_a, dtype=np.float64).tolist()))
    b = dict(zip(np.asarray(ids_b).tolist(), np.asarray(lp_b, dtype=np.float64).tolist()))
    kth_a, kth_b = min(a.values()), min(b.values())
    worst_d = 0.0
    for t in a.keys() | b.keys():
        if t in a and t in b:
            d = abs(a[t] - b[t])
        elif t in a:
            d = max(0.0, a[t] - kth_b)
        else:
            d = max(0.0, b[t] - kth_a)
        if not math.isfinite(d):
            return math.inf
        worst_d = max(worst_d, d)
    return worst_d


def first_divergence(a, b) -> int | None:
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    if len(diff):
        return int(diff[0])
    return None if len(a) == len(b) else n


def nmse(x, ref) -> float | None:
    """sum (x - ref)^2 / sum ref^2 in float64; None where either side is missing."""
    if x is None or ref is None:
        return None
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        return math.inf
    den = float(np.sum(ref * ref))
    num = float(np.sum((x - ref) ** 2))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def judge_prompt(cell: dict, base: dict, nonfinite: bool = False, th: Thresholds = DEFAULT) -> dict:
    """One prompt's comparison: first divergence, max |Δlogprob| over steps 0..d, baseline
    margin at d, first-step logits NMSE, and the prompt's verdict with its reason.

    Steps 0..d all see the same context in both runs (the tokens before d agree), so the
    logprobs are comparable through step d itself; after d the runs answer different prefixes.
    """
    d = first_divergence(cell["tokens"], base["tokens"])
    n = min(len(cell["tokens"]), len(base["tokens"]))
    last = n - 1 if d is None else min(d, n - 1)
    dlp = max((step_dlogprob(cell["topk_ids"][s], cell["topk_lp"][s], base["topk_ids"][s], base["topk_lp"][s])
               for s in range(last + 1)), default=0.0)
    margin = None
    if d is not None and d < len(base["topk_lp"]):
        lp = base["topk_lp"][d]
        margin = float(lp[0] - lp[1]) if len(lp) > 1 else math.inf
    err = nmse(cell.get("first_logits"), base.get("first_logits"))
    out = {"first_divergence": d, "max_dlogprob": _num(dlp), "margin_at_divergence": _num(margin), "nmse": _num(err)}
    if nonfinite or not math.isfinite(dlp) or (err is not None and not math.isfinite(err)):
        return out | {"verdict": "broken", "reason": "NaN/Inf in logits"}
    if err is not None and err > th.nmse_max:
        return out | {"verdict": "broken", "reason": f"first-step logits NMSE {err:.2g} > {th.nmse_max:g}"}
    if dlp > th.tol:
        where = "before its divergence" if d is not None else "with the same tokens"
        return out | {"verdict": "broken", "reason": f"|Δlogprob| {dlp:.3g} > tol {th.tol:g} {where}"}
    if d is None:
        if dlp == 0 and (err is None or err == 0):
            return out | {"verdict": "identical", "reason": ""}
        return out | {"verdict": "close", "reason": f"same tokens, |Δlogprob| {dlp:.2g}"}
    if margin is not None and margin <= th.tie:
        return out | {"verdict": "drift", "reason": f"diverges at step {d} on a near tie (margin {margin:.2g})"}
    return out | {"verdict": "broken", "reason": f"diverges at step {d} where the baseline's margin was "
                                                  f"{margin:.3g} > tie {th.tie:g}"}


def _num(x):
    return None if x is None else float(x)


def judge_cell(prompts: list[dict], cell_fp: dict, base_fp: dict, th: Thresholds = DEFAULT,
               deterministic: bool = True) -> tuple[str, str]:
    """Fill each prompt dict (from the record) with its comparison; return (verdict, reason)
    for the cell: the worst prompt, or broken when repetitions disagree or batch replicas of
    one prompt produced different tokens."""
    for p in prompts:
        pid = p["prompt_id"]
        if pid not in base_fp or pid not in cell_fp:
            p.update(verdict="broken", reason="prompt missing from the baseline's fingerprints")
        else:
            p.update(judge_prompt(cell_fp[pid], base_fp[pid], p.get("nonfinite", False), th))
        if p.get("replica_mismatch"):
            p.update(verdict="broken", reason=f"{p['replica_mismatch']} batch replica(s) of the prompt "
                                              f"generated different tokens")
    v = worst(p["verdict"] for p in prompts)
    if not deterministic:
        return "broken", "repetitions generated different tokens (non-deterministic)"
    if v == "identical":
        return v, ""
    if v == "close":
        return v, f"same tokens, max |Δlogprob| {max(p['max_dlogprob'] for p in prompts):.2g}"
    return v, "; ".join(f"{p['prompt_id']}: {p['reason']}" for p in prompts if p["verdict"] == v)
