"""Verdicts: a cell against its baseline and the NumPy reference (docs/verdicts.md).

The rules (`judge_kl`), from the stage probe (probe.py: every stage of every layer on the
reference's input, against limits derived from each mode's arithmetic) and the teacher-forced
KL divergence from the baseline (kl.py: the baseline's greedy tokens fed to the cell):
  broken     repetitions disagree; a stage over its limit (reason "attn.q, layer 0, NMSE 0.13 >
             0.0004"; the record's verdict_stage / verdict_layer name it); NaN/Inf; batch
             replicas of a prompt disagree; KL median > kl_broken or KL p99 > kl_gross
  identical  same tokens and logprobs, KL 0
  close      every step's top-1 agrees with the baseline's token and KL p99 <= kl_close
  drift      otherwise (a healthy precision change that moves some choices)
Evidence for the KL thresholds (tiny, smoke prompts, n = 32, batch 1, seeds 0-2, 96 steps):
  healthy f16   KL median 7.9e-4 - 8.7e-4, p99 <= 0.082, top-1 agreement 95-97%
  healthy q8    KL median 1.9e-3 - 2.1e-3, p99 <= 0.072, top-1 agreement 92-93%
  q8-badscale   KL median 0.117 - 0.122,   p99 0.34-0.65, top-1 agreement 66-72%
  kl_broken = 0.02 is 9.5x the worst healthy median and 5.8x below the best broken one (near
  their geometric mean); kl_gross = 2.0 guards against gross errors on a few steps (3x the
  worst broken p99 seen, 24x the healthy); kl_close = 0.02 with every top-1 agreeing.
The probe limits and their evidence are in probe.py and docs/verdicts.md. The free-running
comparison below (first divergence, |Δlogprob|, margin, first-step NMSE) stays in each prompt as
information, and judges records that carry no KL statistics (runs before the KL existed).

Free-running rules (records without KL statistics): a cell's greedy fingerprints against its
baseline's.

Per prompt: the first divergence d of the greedy tokens (None if they agree), |Δlogprob| of
every step 0..d over the union of both top-20 lists (its max and median), the baseline's
top-1 minus top-2 logprob at d (the margin), and the first-step logits NMSE. Per cell, the
median |Δlogprob| over every compared step of every prompt: the cell's noise level.

  identical  same tokens, every logprob equal (Δ = 0, NMSE = 0)
  close      same tokens, Δ within the limits below
  drift      tokens diverge at a near tie (margin <= tie), within the limits before it
  broken     anything else: cell median |Δlogprob| > tol, one step's |Δlogprob| > spike, a
             divergence at margin > tie, first-step NMSE > nmse_max, NaN/Inf, repetitions
             that disagree (non-determinism), batch replicas of a prompt that disagree
  failed     the cell produced no record (crash, out-of-memory kill, timeout)

Calibration (tiny preset, NumPy engine). What it showed first: a *median* over steps, not the
DESIGN sketch's per-prompt max, separates precision noise from a bug. Precision-level changes
flip discrete choices of the model (top-6 of 16 expert routing, FP8/FP4 simulated rounding,
indexer top-k), so a healthy mode moves single logprobs by up to ~1.8 nats now and then and
diverges at margins up to ~0.9 nats; per prompt, healthy and broken maxima overlap. The typical
step does not: f16 moves logprobs by ~0.1, q8 by ~0.15-0.2, the broken mode by ~0.9-1.5.

Evidence: q8, f16, f32 and the broken `q8-badscale` of tests/broken_mode.py (q8 with each
Q8_0 attention block read with its neighbour's scale), each against f32 at batch 1, n = 32:
  smoke set (3 prompts), seeds 0-5, batch 1 and 2 (12 cells per mode):
    f32 batch 2   identical in all 6 cells
    f16           cell median 0.093-0.104; per-prompt max <= 1.20; margin at d <= 0.84; NMSE <= 4e-4
    q8            cell median 0.141-0.195; per-prompt max <= 1.03; margin at d <= 0.51; NMSE <= 5.5e-3
    q8-badscale   cell median 1.09-1.39;   per-prompt max 0.99-2.26;                   NMSE 0.020-0.087
  three 400-token slices of long_story.txt (indexer active), seeds 0-9, batch 1 (10 cells per mode):
    f16           cell median 0.122-0.176; per-prompt max <= 1.69; margin at d <= 0.89; NMSE <= 0.017
    q8            cell median 0.178-0.47;  per-prompt max <= 1.83; margin at d <= 0.74; NMSE <= 0.036
    q8-badscale   cell median 0.93-1.51;   per-prompt max 0.66-2.36;                   NMSE 0.012-0.10
  (The 0.47 is a cell whose three prompts all diverged at step 0, leaving three steps.)
  Rerun on the engine of commit 010f73a (seeds 0 and 1 of both sets): every cell's tokens and
  median |Δlogprob| came out bit-identical to the numbers above.
Thresholds chosen:
  tol = 0.65       between the worst healthy cell (0.47) and the best broken one (0.93), near
                   their geometric mean; on the default smoke matrix the gap is 0.195 vs 1.09
  spike = 2.5      1.4x the largest healthy single-step |Δlogprob| (1.83): a guard against gross
                   one-step errors; it is not what catches the bad scale (those maxima overlap)
  tie = 1.5        1.7x the largest healthy margin at a divergence (0.89): on this model a
                   precision change can flip a choice the baseline made by almost one nat
  nmse_max = 0.2   5x the largest healthy first-step NMSE (0.036); NMSE alone cannot catch the
                   bad scale (0.012-0.10 overlaps), so this only guards against gross errors
These numbers belong to the synthetic tiny model; re-run the calibration for another preset
or a real DS4 file (ds4's own gate against the official API is |Δlogprob| <= 4.0).

Reproduce (about 10 minutes on two cores; runs land in /tmp/cal):
  export DS4BENCH_PLUGINS=tests.broken_mode PYTHONPATH=.
  for s in 0 1 2 3 4 5; do ds4bench matrix --cache q8,f16,f32,q8-badscale --batch 1,2
      --seed $s --reps 1 --out /tmp/cal --id smoke-s$s; done
  python -c 'from ds4bench.harness.verdict import write_long_slices; write_long_slices("/tmp/long3.toml")'
  for s in 0 1 2 3 4 5 6 7 8 9; do ds4bench matrix --prompts /tmp/long3.toml --seed $s
      --cache q8,f16,f32,q8-badscale --batch 1 --reps 1 --out /tmp/cal --id long-s$s; done
(each `for` on one line), then read median_dlogprob and prompts[].max_dlogprob,
margin_at_divergence and nmse from /tmp/cal/*/cells.jsonl (or `ds4bench show ID --out /tmp/cal`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("identical", "close", "drift", "broken", "failed")
RANK = {v: i for i, v in enumerate(VERDICTS)}
BAD = ("broken", "failed")


@dataclass(frozen=True)
class Thresholds:
    tol: float = 0.65           # cell: median |Δlogprob| over every compared step of every prompt
    spike: float = 2.5          # prompt: max |Δlogprob| over steps 0..d
    tie: float = 1.5            # prompt: baseline top-1 minus top-2 logprob at a divergence
    nmse_max: float = 0.2       # prompt: first-step logits NMSE
    kl_broken: float = 0.02     # cell: median teacher-forced KL (nats) far outside the healthy band
    kl_gross: float = 2.0       # cell: p99 teacher-forced KL (nats): a gross error on some steps
    kl_close: float = 0.02      # cell: p99 KL at most this and every top-1 agreeing: close, else drift

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = Thresholds()


def write_long_slices(path: str, n: int = 3, tokens: int = 400, stride: int = 2000) -> None:
    """The calibration's long prompts: `n` slices of `tokens` tokens of long_story.txt, `stride` apart."""
    import json
    from ..engine.prompts import load_prompts
    from ..engine.tokenizer import byte_level
    tok = byte_level(512)
    ids = tok.encode(next(p for p in load_prompts("default") if p.id == "long_story").text)
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(n):
            text = json.dumps(tok.decode(ids[stride * k:stride * k + tokens]))    # a valid TOML basic string
            fh.write(f'[[prompt]]\nid = "long{k}"\nkind = "long"\ntext = {text}\n\n')


def worst(verdicts) -> str:
    return max(verdicts, key=RANK.__getitem__, default="identical")


# ---- fingerprint files -----------------------------------------------------------------------
def save_fingerprints(path: str, fingerprints, first_logits: dict, logprobs: dict | None = None) -> None:
    """Per prompt: tokens, top-k ids and logprobs per step, first-step logits and (a baseline's)
    teacher-forcing log-softmax float16 [n, V] (kl.py); written atomically."""
    arrays = {}
    for fp in fingerprints:
        arrays[f"{fp.prompt_id}.tokens"] = np.asarray(fp.tokens, dtype=np.int32)
        arrays[f"{fp.prompt_id}.topk_ids"] = np.asarray(fp.topk_ids, dtype=np.int32)            # [n, k]
        arrays[f"{fp.prompt_id}.topk_lp"] = np.asarray(fp.topk_logprobs, dtype=np.float64)      # [n, k]
        if fp.prompt_id in first_logits:
            arrays[f"{fp.prompt_id}.first_logits"] = np.asarray(first_logits[fp.prompt_id], np.float32)  # [V]
        if logprobs and fp.prompt_id in logprobs:
            arrays[f"{fp.prompt_id}.logprobs"] = np.asarray(logprobs[fp.prompt_id], np.float16)         # [n, V]
    from ..engine.fileio import replacing
    with replacing(path) as tmp, open(tmp, "wb") as fh:      # no temporary survives a failed write
        np.savez(fh, **arrays)


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


def step_dlogprobs(cell: dict, base: dict, d: int | None) -> np.ndarray:
    """|Δlogprob| of each step 0..d (or every step without a divergence)."""
    n = min(len(cell["tokens"]), len(base["tokens"]))
    last = n - 1 if d is None else min(d, n - 1)
    return np.array([step_dlogprob(cell["topk_ids"][s], cell["topk_lp"][s], base["topk_ids"][s], base["topk_lp"][s])
                     for s in range(last + 1)], dtype=np.float64)


def compare_prompt(cell: dict, base: dict) -> tuple[dict, np.ndarray]:
    """One prompt against the baseline: first divergence d, |Δlogprob| of steps 0..d (their max
    and median), the baseline's top-1 minus top-2 margin at d, and the first-step logits NMSE.

    Steps 0..d all see the same context in both runs (the tokens before d agree), so their
    logprobs are comparable through step d itself; after d the runs answer different prefixes.
    """
    d = first_divergence(cell["tokens"], base["tokens"])
    dl = step_dlogprobs(cell, base, d)
    margin = None
    if d is not None and d < len(base["topk_lp"]):
        lp = base["topk_lp"][d]
        margin = float(lp[0] - lp[1]) if len(lp) > 1 else math.inf
    out = {"first_divergence": d, "steps_compared": int(len(dl)),
           "max_dlogprob": float(dl.max()) if len(dl) else 0.0,
           "median_dlogprob": float(np.median(dl)) if len(dl) else 0.0,
           "margin_at_divergence": margin, "nmse": nmse(cell.get("first_logits"), base.get("first_logits"))}
    return out, dl


def classify_prompt(c: dict, nonfinite: bool = False, th: Thresholds = DEFAULT) -> dict:
    """{verdict, reason} of one prompt from its compare_prompt summary."""
    d, dmax, margin, err = c["first_divergence"], c["max_dlogprob"], c["margin_at_divergence"], c["nmse"]
    if nonfinite or not math.isfinite(dmax) or (err is not None and not math.isfinite(err)):
        return {"verdict": "broken", "reason": "NaN/Inf in logits"}
    if err is not None and err > th.nmse_max:
        return {"verdict": "broken", "reason": f"first-step logits NMSE {err:.2g} > {th.nmse_max:g}"}
    if dmax > th.spike:
        return {"verdict": "broken", "reason": f"|Δlogprob| {dmax:.3g} at one step > spike {th.spike:g}"}
    if d is None:
        if dmax == 0 and not err:
            return {"verdict": "identical", "reason": ""}
        return {"verdict": "close", "reason": f"same tokens, max |Δlogprob| {dmax:.2g}"}
    if margin is not None and margin <= th.tie:
        return {"verdict": "drift", "reason": f"diverges at step {d} on a near tie (margin {margin:.2g})"}
    return {"verdict": "broken", "reason": f"diverges at step {d} where the baseline's margin was "
                                           f"{margin:.3g} > tie {th.tie:g}"}


def judge_prompt(cell: dict, base: dict, nonfinite: bool = False, th: Thresholds = DEFAULT) -> dict:
    c, _ = compare_prompt(cell, base)
    return c | classify_prompt(c, nonfinite, th)


def judge_cell(prompts: list[dict], cell_fp: dict, base_fp: dict, th: Thresholds = DEFAULT,
               deterministic: bool = True, kl: dict | None = None,
               probe: dict | None = None) -> tuple[str, str, float | None]:
    """Fill each prompt dict (from the record) with its comparison; return the cell's verdict,
    reason and median |Δlogprob| over all compared steps of all prompts.

    With the teacher-forced KL statistics `kl` (kl.FIELDS) the verdict follows `judge_kl`
    (the stage probe's finding `probe` {stage, layer, reason} first); without them (a record
    of an older run, or a baseline that kept no log-softmax) the free-running rules: the worst
    prompt's verdict, or broken when the median exceeds tol (a systematic error, not precision
    noise), when repetitions disagree, or when batch replicas of one prompt differ."""
    if kl:
        return judge_kl(prompts, cell_fp, base_fp, th, deterministic, kl, probe)
    pairs, pooled = _compare_prompts(prompts, cell_fp, base_fp)
    for p, c in pairs:
        p.update(c | classify_prompt(c, p.get("nonfinite", False), th))
        if p.get("replica_mismatch"):
            p.update(verdict="broken", reason=f"{p['replica_mismatch']} batch replica(s) of the prompt "
                                              f"generated different tokens")
    typical = float(np.median(pooled)) if len(pooled) else 0.0
    v = worst(p["verdict"] for p in prompts)
    if not deterministic:
        return "broken", "repetitions generated different tokens (non-deterministic)", typical
    if probe and probe.get("stage"):
        return "broken", probe["reason"], typical
    if typical > th.tol and math.isfinite(typical):
        return "broken", (f"median |Δlogprob| {typical:.3g} over {len(pooled)} steps > tol {th.tol:g}: "
                          f"a systematic error, not precision noise"), typical
    if v == "identical":
        return v, "", typical
    if v == "close":
        return v, f"same tokens, median |Δlogprob| {typical:.2g}, max {max(p['max_dlogprob'] for p in prompts):.2g}", typical
    why = "; ".join(f"{p['prompt_id']}: {p['reason']}" for p in prompts if p["verdict"] == v)
    return v, why + (f" (median |Δlogprob| {typical:.2g})" if v == "drift" else ""), typical


def _compare_prompts(prompts: list[dict], cell_fp: dict, base_fp: dict) -> tuple[list, np.ndarray]:
    """Each record prompt that both fingerprints hold, with its compare_prompt summary, and the
    |Δlogprob| of every compared step pooled; a prompt missing from either side is marked broken."""
    pairs, steps = [], []
    for p in prompts:
        pid = p["prompt_id"]
        if pid not in base_fp or pid not in cell_fp:
            p.update(verdict="broken", reason="prompt missing from the baseline's fingerprints")
            continue
        c, dl = compare_prompt(cell_fp[pid], base_fp[pid])
        pairs.append((p, c))
        steps.append(dl)
    return pairs, (np.concatenate(steps) if steps else np.zeros(0))


def judge_kl(prompts: list[dict], cell_fp: dict, base_fp: dict, th: Thresholds, deterministic: bool,
             kl: dict, probe: dict | None) -> tuple[str, str, float | None]:
    """The verdict from the stage probe and the teacher-forced KL (docs/verdicts.md):

      broken     repetitions disagree; a stage over its limit (probe: "attn.out, layer 0, NMSE
                 1.5e-2 > 4e-4"); NaN/Inf in the logits; batch replicas of a prompt disagree;
                 median KL > kl_broken or p99 KL > kl_gross
      identical  same tokens and logprobs as the baseline, KL 0
      close      every step's top-1 agrees with the baseline's token and p99 KL <= kl_close
      drift      otherwise: a healthy precision change that moves some choices
    The free-running comparison (first divergence, |Δlogprob|, margin) stays in each prompt as
    information; a prompt's own verdict says identical, close (same tokens) or drift."""
    pairs, pooled = _compare_prompts(prompts, cell_fp, base_fp)
    for p, c in pairs:
        if p.get("nonfinite"):
            v, why = "broken", "NaN/Inf in logits"
        elif p.get("replica_mismatch"):
            v, why = "broken", f"{p['replica_mismatch']} batch replica(s) of the prompt generated different tokens"
        elif c["first_divergence"] is None:
            v = "identical" if c["max_dlogprob"] == 0 and not c["nmse"] else "close"
            why = "" if v == "identical" else f"same tokens, max |Δlogprob| {c['max_dlogprob']:.2g}"
        else:
            v, why = "drift", f"free-running tokens part at step {c['first_divergence']}"
        p.update(c | {"verdict": v, "reason": why})
    typical = float(np.median(pooled)) if len(pooled) else 0.0
    stats = (f"KL median {kl['kl_median']:.2g}, p99 {kl['kl_p99']:.2g}, max {kl['kl_max']:.2g}; "
             f"top-1 agrees on {kl['top1_agree']:.0%} of {kl['kl_steps']} steps")
    if not deterministic:
        return "broken", "repetitions generated different tokens (non-deterministic)", typical
    if probe and probe.get("stage"):
        return "broken", probe["reason"], typical
    bad = [p for p in prompts if p["verdict"] == "broken"]
    if bad:
        return "broken", "; ".join(f"{p['prompt_id']}: {p['reason']}" for p in bad), typical
    if not math.isfinite(kl["kl_max"]):
        return "broken", "NaN/Inf in the teacher-forced logits", typical
    if kl["kl_median"] > th.kl_broken:
        return "broken", f"KL median {kl['kl_median']:.3g} > {th.kl_broken:g}: a systematic error ({stats})", typical
    if kl["kl_p99"] > th.kl_gross:
        return "broken", f"KL p99 {kl['kl_p99']:.3g} > {th.kl_gross:g}: gross errors on some steps ({stats})", typical
    if all(p["verdict"] == "identical" for p in prompts) and kl["kl_max"] == 0:
        return "identical", "", typical
    if kl["top1_agree"] == 1.0 and kl["kl_p99"] <= th.kl_close:
        return "close", stats, typical
    return "drift", stats, typical
