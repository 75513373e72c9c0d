"""Verdicts: the stage probe (healthy modes within their limits, deliberate faults named at
their stage), its reference cache, the teacher-forced KL, the verdict rules and compare's gate."""
import math

import numpy as np
import pytest

from ds4bench.harness import kl as KL
from ds4bench.harness import probe as PR
from ds4bench.harness import verdict as V
from ds4bench.engine.generate import Engine, generate, make_ops
from ds4bench.engine.options import EngineOptions
from ds4bench.engine.model import no_tap
from ds4bench.engine.prompts import load_prompts
from ds4bench.harness.results import compare

from .broken_mode import BadScaleOps
from .engine_util import tiny_model, tiny_tokenizer


def smoke_prompts():
    tok = tiny_tokenizer()
    return [(p.id, tok.chat(p.text)) for p in load_prompts("smoke")]


@pytest.fixture(scope="module")
def ref0():
    """The f32 reference's stage outputs of seed 0 on the default probe positions."""
    ids = PR.probe_tokens(smoke_prompts())
    return PR.record_reference(tiny_model(0), "f32", ids, PR.DEFAULT_STEPS), ids


def probe_verdict(ops, ref, ids, batch=1, backend="numpy", cache="q8"):
    stats = [s.to_dict() for s in PR.run_probe(ops, tiny_model(0), batch, ref, ids)]
    return PR.judge_stages(stats, backend, cache), stats


# ---- taps ------------------------------------------------------------------------------------------
def test_taps_cover_every_stage_in_order(ref0):
    """The reference records every named stage of every layer (the head after the last), in the
    model's order, and the default tap hands arrays through untouched."""
    ref, ids = ref0
    prefill = ref["calls"][0]
    seen = {(s, il) for s, il, _ in prefill}
    n_layer = tiny_model(0).cfg.n_layer
    assert {s for s, _ in seen} == set(PR.STAGES)
    assert ("head", n_layer) in seen and ("compressor", 2) in seen and ("indexer", 2) in seen
    assert [il for _, il, _ in prefill] == sorted(il for _, il, _ in prefill)
    a = np.arange(3.0)
    assert no_tap("attn.q", 0, a) is a and no_tap("hc_pre", 0, a, a) == (a, a)
    assert len(ref["fed"]) == PR.DEFAULT_STEPS and len(ref["calls"]) == 1 + PR.DEFAULT_STEPS


# ---- healthy modes pass, faults are named ----------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_modes_within_limits(seed):
    """q8, f16, f32 at batch 1 and 4 against the f32 reference: no stage over its limit, and the
    worst stage at most half its limit (the limits are derived, not fitted: this is the margin)."""
    mf = tiny_model(seed)
    ids = PR.probe_tokens(smoke_prompts())
    ref = PR.record_reference(mf, "f32", ids, PR.DEFAULT_STEPS)
    for cache in ("q8", "f16", "f32"):
        ops = make_ops(mf, EngineOptions(mode=cache))
        for batch in (1, 4):
            stats = [s.to_dict() for s in PR.run_probe(ops, mf, batch, ref, ids)]
            assert PR.judge_stages(stats, "numpy", cache) is None, (cache, batch)
            worst = max(s["nmse"] / PR.limit("numpy", cache, s["stage"]) for s in stats)
            assert worst < 0.5, (cache, batch, worst)
            if cache == "f32":
                assert all(s["nmse"] == 0 for s in stats)


def test_badscale_named_at_attn_q(ref0):
    ref, ids = ref0
    bad, _ = probe_verdict(BadScaleOps(tiny_model(0)), ref, ids)
    assert bad["stage"] == "attn.q" and bad["layer"] == 0
    assert bad["reason"].startswith("attn.q, layer 0, NMSE")


def _expert_weight_fault(ops):
    """Routed experts: the second expert of every token weighted by the first one's weight."""
    orig = ops.experts

    def experts(il, x, sel, w):
        w = w.copy()
        w[:, 1] = w[:, 0]
        return orig(il, x, sel, w)
    ops.experts = experts


def _fp8_fault(ops):
    """KV rounding: the FP8 round trip skipped on the last 64 nope dims."""
    from ds4bench.engine import formats as F
    nope = ops.cfg.n_nope

    def kv_round(x):
        out = np.array(x, dtype=np.float32, copy=True)
        out[..., :nope - 64] = F.fp8_e4m3_roundtrip(out[..., :nope - 64])
        return F.round_f16(out)
    ops.kv_round = kv_round


def _head_fault(ops):
    """The output head (shared by every mode): its Q8_0 scales 3% high."""
    orig = ops.linear

    def linear(name, x):
        y = orig(name, x)
        return y * np.float32(1.03) if name == "output.weight" else y
    ops.linear = linear


def _topk_fault(ops):
    """Indexer top-k: one row short of k."""
    orig = ops.topk_mask
    ops.topk_mask = lambda score, visible, k: orig(score, visible, k - 1)


@pytest.mark.parametrize("fault, stage, layer", [(_expert_weight_fault, "moe.experts", 0),
                                                 (_fp8_fault, "attn.kv", 0),
                                                 (_head_fault, "head", 6),
                                                 (_topk_fault, "indexer", 2)])
@pytest.mark.parametrize("cache", ["q8", "f32"])
def test_injected_faults_named(ref0, fault, stage, layer, cache):
    """A fault in the cell's ops (the reference's are separate, so a fault in a stage every
    mode shares, the head, is caught as well) is broken at the stage and layer it is in.
    On a q8 cell the FP8 fault (NMSE ~1e-4 at attn.kv) hides under q8's own FP8 flips there
    (limit 1.7e-3) and is first over a limit at the compressor, whose rows q8 leaves exact."""
    ref, ids = ref0
    if fault is _fp8_fault and cache == "q8":
        stage, layer = "compressor", 2
    ops = make_ops(tiny_model(0), EngineOptions(mode=cache))
    fault(ops)
    bad, _ = probe_verdict(ops, ref, ids, cache=cache)
    assert bad is not None and (bad["stage"], bad["layer"]) == (stage, layer), bad


# ---- the reference cache -----------------------------------------------------------------------
def test_reference_cache(tmp_path, monkeypatch):
    """The reference runs once per (model, tokens, mode, steps); later cells load it."""
    mf = tiny_model(0)
    ids = PR.probe_tokens(smoke_prompts(), 20)
    params = {"preset": "tiny", "variant": None, "seed": 0, "model_file": None}
    first, cached = PR.reference(mf, params, "f32", ids, 2, tmp_path)
    assert not cached and len(list(tmp_path.glob("probe-ref-f32-*.npz"))) == 1
    monkeypatch.setattr(PR, "record_reference", lambda *a: pytest.fail("the cache was not used"))
    again, cached = PR.reference(mf, params, "f32", ids, 2, tmp_path)
    assert cached and again["fed"] == first["fed"]
    for ca, cb in zip(first["calls"], again["calls"]):
        assert [(s, il) for s, il, _ in ca] == [(s, il) for s, il, _ in cb]
        assert all(np.array_equal(x, y) for (_, _, xa), (_, _, xb) in zip(ca, cb) for x, y in zip(xa, xb))
    other = dict(params, seed=1)
    assert PR.cache_path(tmp_path, PR.model_key(other), "f32", ids, 2) != PR.cache_path(
        tmp_path, PR.model_key(params), "f32", ids, 2)


def _reference_in_a_process(cache_dir, counter, go):
    """A cell's process asking for the f32 reference; each computation appends to `counter`."""
    real = PR.record_reference

    def counted(*a, **kw):
        with open(counter, "a") as fh:
            fh.write("computed\n")
        return real(*a, **kw)

    PR.record_reference = counted
    go.wait()
    ids = PR.probe_tokens(smoke_prompts(), 20)
    params = {"preset": "tiny", "variant": None, "seed": 0, "model_file": None}
    ref, _ = PR.reference(tiny_model(0), params, "f32", ids, 2, cache_dir)
    assert ref["fed"]


def test_cells_at_once_compute_the_reference_once(tmp_path):
    """Three processes that want the same reference at the same moment (cells of one mode through
    the pool): one computes it, the others wait for its cache file and read it."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    go, counter = ctx.Event(), tmp_path / "computed.txt"
    procs = [ctx.Process(target=_reference_in_a_process, args=(tmp_path / "cache", counter, go)) for _ in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("computed") == 1
    assert len(list((tmp_path / "cache").glob("probe-ref-f32-*.npz"))) == 1


def test_a_lead_puts_the_probe_past_the_window_and_the_top_k(tmp_path):
    """Probed from position 0, 16 tokens (+4 steps) stay inside tiny's 32-row window and below its
    indexer top-k: the window and top-k faults escape. With the lead (the reference alone runs
    ahead, the cell starts from its state) both are caught at their stage, healthy q8 and f32
    pass, and the lead's state survives the reference cache."""
    from ds4bench.engine.faults import from_env
    mf = tiny_model(0)
    cfg = mf.cfg
    assert PR.late_position(cfg) == max(cfg.sliding_window, 4 * (cfg.indexer_topk + 1)) == 68
    assert PR.lead_for(cfg, 80) == 0 and PR.lead_for(cfg, 16) == 60
    assert PR.lead_from_env({"DS4BENCH_PROBE_LEAD": "0"}, cfg, 16) == 0
    with pytest.raises(ValueError, match="DS4BENCH_PROBE_LEAD"):
        PR.lead_from_env({"DS4BENCH_PROBE_LEAD": "far"}, cfg, 16)
    params = {"preset": "tiny", "variant": None, "seed": 0, "model_file": None, "backend": "numpy", "batch": 1}
    got = {}
    for lead in ("0", "auto"):
        for cache, fault in (("q8", None), ("f32", None), ("q8", "attn-window"), ("q8", "indexer-topk")):
            env = {"DS4BENCH_PROBE_TOKENS": "16", "DS4BENCH_PROBE_LEAD": lead}
            faults = from_env({"DS4BENCH_FAULT": fault}) if fault else None
            opts = {"faults": faults} if faults else {}
            ops = make_ops(mf, EngineOptions(mode=cache, **opts))
            res = PR.probe_cell(mf, ops, dict(params, cache=cache), smoke_prompts(), tmp_path, env, **opts)
            got[lead, cache, fault] = res
    assert got["auto", "q8", None]["probe_lead"] == 60 and got["0", "q8", None]["probe_lead"] == 0
    assert got["auto", "q8", None]["probe_positions"] == got["0", "q8", None]["probe_positions"] == 20
    for lead in ("0", "auto"):
        assert got[lead, "q8", None]["verdict_stage"] is None and got[lead, "f32", None]["verdict_stage"] is None
    assert got["0", "q8", "attn-window"]["verdict_stage"] is None           # the escapes
    assert got["0", "q8", "indexer-topk"]["verdict_stage"] is None
    assert got["auto", "q8", "attn-window"]["verdict_stage"] == "attention"
    assert got["auto", "q8", "indexer-topk"]["verdict_stage"] == "indexer"
    assert got["auto", "f32", None]["probe_cached"]                         # the q8 cells computed it
    ids = PR.probe_tokens(smoke_prompts(), 16, 60)
    ref, cached = PR.reference(mf, params, "f32", ids, PR.DEFAULT_STEPS, tmp_path, 60)
    assert cached and ref["lead"] == 60 and len(ref["lead_state"]) == cfg.n_layer
    fresh = PR.record_reference(mf, "f32", ids, PR.DEFAULT_STEPS, 60)
    assert all(np.array_equal(fresh["lead_state"][il][k], v) for il, d in enumerate(ref["lead_state"])
               for k, v in d.items())


def test_probe_tokens_env():
    assert PR.tokens_from_env({}) == PR.DEFAULT_TOKENS
    assert PR.tokens_from_env({"DS4BENCH_PROBE_TOKENS": "0"}) == 0
    with pytest.raises(ValueError, match="DS4BENCH_PROBE_TOKENS"):
        PR.tokens_from_env({"DS4BENCH_PROBE_TOKENS": "lots"})


# ---- teacher-forced KL ---------------------------------------------------------------------------
def test_kl_against_itself_is_zero_and_forcing_feeds_the_tokens():
    mf = tiny_model(0)
    prompts = smoke_prompts()[:2]
    eng = Engine(mf, mode="f32", batch=2, ctx=64)
    free = generate(eng, prompts, 4)
    own = {fp.prompt_id: {"tokens": np.asarray(fp.tokens)} for fp in free.fingerprints}
    lp = KL.teacher_forced(eng, prompts, 4, own)
    base = {pid: {"tokens": own[pid]["tokens"], "logprobs": lp[pid]} for pid in lp}
    stats = KL.cell_kl(lp, base)
    assert stats["kl_max"] == 0 and stats["top1_agree"] == 1 and stats["dp_rms"] == 0 and stats["kl_steps"] == 8
    # a q8 cell fed the f32 tokens: positive KL, and the same steps scored
    q8 = KL.teacher_forced(Engine(mf, mode="q8", batch=2, ctx=64), prompts, 4, base)
    s8 = KL.cell_kl(q8, base)
    assert s8["kl_steps"] == 8 and 0 < s8["kl_median"] < 0.05
    # forcing other tokens changes what the cell scores
    other = {pid: {"tokens": (own[pid]["tokens"] + 1) % mf.cfg.n_vocab} for pid in own}
    assert not np.array_equal(KL.teacher_forced(eng, prompts, 4, other)[prompts[0][0]][1:], lp[prompts[0][0]][1:])


def test_kl_step_stats():
    base = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    cell = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
    kl, top1, dp = KL.step_stats(cell, base, [0, 0])
    want = [sum(p * math.log(p / q) for p, q in zip(b, c)) for b, c in zip(np.exp(base), np.exp(cell))]
    assert np.allclose(kl, want) and top1.tolist() == [True, False] and np.allclose(dp, [-0.1, -0.3])
    nan = cell.copy()
    nan[1, 2] = np.nan
    assert math.isinf(KL.step_stats(nan, base, [0, 0])[0][1])


# ---- verdict rules -----------------------------------------------------------------------------------
def _fp(tokens):
    n = len(tokens)
    ids = np.array([[t, (t + 1) % 7] for t in tokens])
    return {"tokens": np.array(tokens), "topk_ids": ids, "topk_lp": np.tile([-0.1, -3.0], (n, 1)),
            "first_logits": np.arange(5.0)}


def _kl(median, p99, top1=1.0, mx=None):
    return {"kl_mean": median, "kl_median": median, "kl_p99": p99, "kl_max": p99 if mx is None else mx,
            "top1_agree": top1, "kl_steps": 8}


@pytest.mark.parametrize("kl, probe, want", [
    (_kl(0, 0), None, "identical"),
    (_kl(1e-4, 5e-3), None, "close"),
    (_kl(1e-3, 0.04, top1=0.9), None, "drift"),
    (_kl(0.12, 0.6, top1=0.65), None, "broken"),
    (_kl(1e-3, 3.0, top1=0.9), None, "broken"),
    (_kl(1e-4, 5e-3), {"stage": "attn.out", "layer": 0, "reason": "attn.out, layer 0, NMSE 0.015 > 0.0004"}, "broken"),
])
def test_judge_kl(kl, probe, want):
    base = {"a": _fp([1, 2, 3, 4])}
    cell = {"a": _fp([1, 2, 3, 4] if want in ("identical", "close") else [1, 2, 5, 6])}
    if want == "close":
        cell["a"]["topk_lp"] = cell["a"]["topk_lp"] + 0.01
    prompts = [{"prompt_id": "a"}]
    v, why, _ = V.judge_cell(prompts, cell, base, V.DEFAULT, True, kl, probe)
    assert v == want, why
    if probe:
        assert why == probe["reason"]
    if want == "drift":
        assert prompts[0]["first_divergence"] == 2 and prompts[0]["verdict"] == "drift"


def test_judge_kl_keeps_hard_failures():
    base = {"a": _fp([1, 2, 3, 4])}
    ok = _kl(0, 0)
    assert V.judge_cell([{"prompt_id": "a"}], base, base, V.DEFAULT, False, ok)[0] == "broken"
    assert V.judge_cell([{"prompt_id": "a", "nonfinite": True}], base, base, V.DEFAULT, True, ok)[0] == "broken"
    v, why, _ = V.judge_cell([{"prompt_id": "a", "replica_mismatch": 1}], base, base, V.DEFAULT, True, ok)
    assert v == "broken" and "replica" in why


# ---- compare's gate --------------------------------------------------------------------------------
def _rec(verdict, kl_median, kl_p99):
    return {"key": "cache=q8", "preset": "tiny", "backend": "numpy", "cache": "q8", "batch": 1, "verdict": verdict,
            "verdict_reason": "", "kl_median": kl_median, "kl_p99": kl_p99, "prompts": [], "step_ms": []}


def test_compare_gates_on_kl_band_and_worse_verdict():
    a = [_rec("drift", 2e-3, 0.04)]
    assert compare(a, [_rec("drift", 2.5e-3, 0.05)])["status"] == 0           # within the band
    moved = compare(a, [_rec("drift", 8e-3, 0.05)])
    assert moved["status"] == 1 and "kl_median" in moved["correctness"][0]["kl_moved"]
    assert compare(a, [_rec("broken", 2e-3, 0.04)])["status"] == 1
    assert KL.band_exceeded({"kl_median": None}, {"kl_median": 1.0}) == ""
