"""Verdict rules: |Δlogprob| over the top-k union, divergence, margins, and the cell verdict."""
import math

import numpy as np
import pytest

from ds4bench.harness import verdict as V
from ds4bench.engine.generate import Fingerprint

TH = V.Thresholds(tol=0.4, spike=2.5, tie=1.5, nmse_max=0.2)


def fp(tokens, lps, ids=None, logits=None):
    """A fingerprint dict: per step a best-first top-k (ids default to 0..k-1)."""
    lps = np.asarray(lps, dtype=np.float64)
    ids = np.asarray(ids if ids is not None else [list(range(lps.shape[1]))] * len(tokens))
    return {"tokens": np.asarray(tokens), "topk_ids": ids, "topk_lp": lps,
            "first_logits": None if logits is None else np.asarray(logits, np.float32)}


STEP = [-0.5, -1.5, -2.0, -3.0]


def test_step_dlogprob_same_lists_is_zero():
    assert V.step_dlogprob([1, 2, 3], [-0.1, -1, -2], [1, 2, 3], [-0.1, -1, -2]) == 0


def test_step_dlogprob_shared_ids_and_missing_ids():
    # id 3 only in a (at -1.5) while b's k-th logprob is -2.5: at least 1.0 apart
    d = V.step_dlogprob([1, 3, 2], [-0.2, -1.5, -2.0], [1, 2, 4], [-0.3, -2.1, -2.5])
    assert d == pytest.approx(1.0)
    # a bottom-of-list swap contributes ~0, not the full logprob
    d = V.step_dlogprob([1, 2, 3], [-0.2, -1.0, -3.0], [1, 2, 4], [-0.2, -1.0, -3.01])
    assert d == pytest.approx(0.01)


def test_step_dlogprob_nan_is_infinite():
    assert V.step_dlogprob([1, 2], [np.nan, -1], [1, 2], [-0.1, -1]) == math.inf


def test_first_divergence_and_nmse():
    assert V.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert V.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert V.first_divergence([1, 2], [1, 2, 3]) == 2
    assert V.nmse([1.0, 2.0], [1.0, 2.0]) == 0
    assert V.nmse([1.0, 3.0], [1.0, 2.0]) == pytest.approx(1 / 5)
    assert V.nmse(None, [1.0]) is None


def test_identical_close_drift_broken():
    base = fp([1, 2, 3], [STEP] * 3, logits=[1, 2, 3])
    assert V.judge_prompt(fp([1, 2, 3], [STEP] * 3, logits=[1, 2, 3]), base, th=TH)["verdict"] == "identical"
    close = fp([1, 2, 3], [[-0.45, -1.5, -2, -3]] + [STEP] * 2, logits=[1, 2, 3.01])
    j = V.judge_prompt(close, base, th=TH)
    assert (j["verdict"], j["max_dlogprob"], j["first_divergence"]) == ("close", pytest.approx(0.05), None)
    # diverges at step 1 where the baseline's margin is 0.1: a near tie
    tie = fp([1, 2, 3], [STEP, [-0.9, -1.0, -2, -3], STEP])
    j = V.judge_prompt(fp([1, 7, 3], [STEP, [-0.95, -0.96, -2, -3], STEP]), tie, th=TH)
    assert (j["verdict"], j["first_divergence"], j["margin_at_divergence"]) == ("drift", 1, pytest.approx(0.1))
    # diverges where the baseline was sure (margin 3): broken
    sure = fp([1, 2, 3], [STEP, [-0.05, -3.05, -4, -5], STEP])
    j = V.judge_prompt(fp([1, 7, 3], [STEP, [-1.0, -1.1, -4, -5], STEP], ids=[[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3]]),
                       sure, th=TH)
    assert j["verdict"] == "broken" and "margin" in j["reason"]


def test_spike_nan_and_nmse_are_broken():
    base = fp([1, 2], [STEP] * 2, logits=[1, 2, 3])
    spike = V.judge_prompt(fp([1, 2], [STEP, [-3.5, -1.5, -2, -3]]), base, th=TH)
    assert spike["verdict"] == "broken" and "spike" in spike["reason"]
    assert V.judge_prompt(fp([1, 2], [STEP] * 2), base, nonfinite=True, th=TH)["verdict"] == "broken"
    far = V.judge_prompt(fp([1, 2], [STEP] * 2, logits=[3, 2, 1]), base, th=TH)
    assert far["verdict"] == "broken" and "NMSE" in far["reason"]


def _cell(steps_lp, n_prompts=3):
    return {f"p{i}": fp([1] * len(steps_lp), steps_lp) for i in range(n_prompts)}


def test_cell_median_beyond_tol_is_broken_even_without_divergence():
    base = _cell([STEP] * 4)
    shifted = _cell([[v - 0.5 if j == 0 else v for j, v in enumerate(STEP)]] * 4)   # every step 0.5 off
    prompts = [{"prompt_id": p} for p in base]
    v, why, med = V.judge_cell(prompts, shifted, base, TH)
    assert v == "broken" and med == pytest.approx(0.5) and "systematic" in why
    assert all(p["verdict"] == "close" for p in prompts)     # each prompt alone looked close


def test_cell_takes_the_worst_prompt_and_flags_replicas_and_nondeterminism():
    base = _cell([STEP] * 3)
    cell = dict(base)
    cell["p1"] = fp([1, 9, 1], [STEP, [-0.9, -0.95, -2, -3], STEP])
    base["p1"] = fp([1, 1, 1], [STEP, [-0.9, -0.95, -2, -3], STEP])
    prompts = [{"prompt_id": p} for p in base]
    v, _, _ = V.judge_cell(prompts, cell, base, TH)
    assert v == "drift" and [p["verdict"] for p in prompts] == ["identical", "drift", "identical"]
    prompts = [{"prompt_id": p, "replica_mismatch": int(p == "p2")} for p in base]
    assert V.judge_cell(prompts, cell, base, TH)[0] == "broken"
    assert V.judge_cell([{"prompt_id": "p0"}], base, base, TH, deterministic=False)[0] == "broken"
    assert V.worst(["close", "drift", "identical"]) == "drift"


def test_fingerprints_round_trip(tmp_path):
    f = Fingerprint("a.b", 5, [3, 4], "x", "", [[3, 1], [4, 2]], [[-0.1, -2.0], [-0.2, -1.9]])
    path = str(tmp_path / "fp.npz")
    V.save_fingerprints(path, [f], {"a.b": np.arange(4, dtype=np.float32)})
    got = V.load_fingerprints(path)["a.b"]
    assert got["tokens"].tolist() == [3, 4] and got["topk_ids"].tolist() == [[3, 1], [4, 2]]
    assert got["first_logits"].tolist() == [0, 1, 2, 3]
    assert V.judge_prompt(got, got, th=TH)["verdict"] == "identical"
