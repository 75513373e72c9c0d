"""The NumPy reference engine: invariants (prefill = decode, batch = single, snapshot/restore),
the spec's small pieces of math, conditioning of synthetic models, and golden outputs."""
import json
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ds4bench.engine.options import parse_unfused
from ds4bench import cli
from ds4bench.engine import config
from ds4bench.engine.generate import Engine, generate, greedy, token_hash
from ds4bench.engine.model import DS4Model, rope, rope_inv_freq
from ds4bench.engine.ops_ref import RefOps

from .engine_util import GOLDEN, GOLDEN_TOKENS, golden_run, tiny_model, tiny_tokenizer

TINY = config.preset("tiny")
TEXT = ("The lighthouse keeper counted the ships each evening, writing their names in a ledger "
        "that had outlived three keepers before him, and the numbers 1234567 grew.")


def prompt(n: int) -> list[int]:
    ids = tiny_tokenizer().chat(TEXT * 4)
    assert len(ids) >= n
    return ids[:n]


def engine(cache="f32", batch=1, chunk=512, ctx=1024):
    return Engine(tiny_model(), mode=cache, batch=batch, ctx=ctx, chunk=chunk)


def continue_greedy(eng, slot, first_logits, n):
    toks, logits = [greedy(first_logits)], [first_logits]
    for _ in range(n - 1):
        lg = eng.decode([toks[-1]], [slot])[0]
        toks.append(greedy(lg))
        logits.append(lg)
    return toks, np.stack(logits)


# ---- invariants -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["f32", "q8"])
def test_prefill_chunked_equals_token_by_token(cache):
    ids = prompt(100)                    # > window 32; ratio-4 rows 25 > top-k 16: selection runs
    runs = {}
    for chunk in (512, 7, 1):
        eng = engine(cache, chunk=chunk)
        runs[chunk] = continue_greedy(eng, 0, eng.prefill(0, ids), 6), eng.state
    (t512, l512), s512 = runs[512]
    for chunk in (7, 1):
        (t, lg), s = runs[chunk]
        assert t == t512, f"chunk {chunk}"
        np.testing.assert_array_equal(lg, l512)                            # float64 accumulation: exact
        for a, b in zip(s.layers, s512.layers):
            for k, v in a.arrays().items():
                np.testing.assert_array_equal(v, getattr(b, k), err_msg=k)


def test_batch_equals_single():
    prompts = [("a", prompt(70)), ("b", prompt(23)), ("c", prompt(131))]
    batched = generate(engine(batch=3), prompts, 6)
    for fp in batched.fingerprints:
        alone = generate(engine(batch=1), [(fp.prompt_id, dict(prompts)[fp.prompt_id])], 6).fingerprints[0]
        assert fp.tokens == alone.tokens
        assert fp.topk_ids == alone.topk_ids
        assert fp.topk_logprobs == alone.topk_logprobs
        assert fp.replica_mismatch == 0


def test_batch_fills_every_slot_with_replicas():
    res = generate(engine(batch=4), [("a", prompt(40)), ("b", prompt(17))], 4)
    assert [f.prompt_id for f in res.fingerprints] == ["a", "b"]
    assert all(f.replica_mismatch == 0 for f in res.fingerprints)
    assert res.timing.step_tokens == [4, 4, 4]


def test_experts_in_threads_give_the_serial_bits(monkeypatch):
    """The reference computes a big call's routed experts in parallel threads (each its own rows,
    the layouts' memo shared): the output is the serial loop's, bit for bit, with the memo held
    to a budget of about one layout so that threads evict each other's entries."""
    from ds4bench.engine import formats, ops_ref
    ops = RefOps(tiny_model(0), "q8")
    cfg = ops.cfg
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, cfg.n_embd)).astype(np.float32)
    sel = np.stack([rng.permutation(cfg.n_expert)[:cfg.n_expert_used] for _ in range(40)])
    w = rng.random((40, cfg.n_expert_used)).astype(np.float32)
    serial = ops.experts(1, x, sel, w)
    monkeypatch.setattr(ops_ref, "PARALLEL_EXPERT_WEIGHTS", 0)
    monkeypatch.setattr(ops_ref, "EXPERT_THREADS", 4)
    monkeypatch.setattr(formats.PREPARED, "budget", 1)
    threads, real = set(), formats.int_matmul

    def counted(*a, **k):
        threads.add(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(formats, "int_matmul", counted)
    threaded = ops.experts(1, x, sel, w)
    assert len(threads) > 1                                     # it did run in several threads
    np.testing.assert_array_equal(threaded, serial)


@pytest.mark.parametrize("cache", ["q8", "f32"])
def test_prepare_in_threads_expands_the_same_weights(monkeypatch, cache):
    """The start-up expansion of a large model runs in threads: every tensor's expansion is the
    serial one's."""
    from ds4bench.engine import ops_ref
    serial = RefOps(tiny_model(0), cache)
    monkeypatch.setattr(ops_ref, "PARALLEL_EXPERT_WEIGHTS", 0)
    monkeypatch.setattr(ops_ref, "EXPERT_THREADS", 4)
    threaded = RefOps(tiny_model(0), cache)
    assert threaded._int.keys() == serial._int.keys() and threaded._dense.keys() == serial._dense.keys()
    assert any(n.endswith("_exps.weight") for n in threaded._int)
    for name, W in serial._int.items():
        V = threaded._int[name]
        assert all(np.array_equal(getattr(W, f), getattr(V, f)) for f in ("q", "sc", "d") ), name
    for name, W in serial._dense.items():
        np.testing.assert_array_equal(threaded._dense[name], W)


def test_snapshot_restore_rolls_back():
    eng = engine()
    first = eng.prefill(0, prompt(90))
    snap = eng.state.snapshot()
    a = continue_greedy(eng, 0, first, 8)
    eng.state.restore(snap)
    b = continue_greedy(eng, 0, first, 8)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert int(eng.state.pos[0]) == 90 + 7


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 110), chunk=st.integers(1, 48), cache=st.sampled_from(["q8", "f16", "f32"]))
def test_property_prefill_equals_decode(n, chunk, cache):
    ids = prompt(n)
    a, b = engine(cache, chunk=chunk), engine(cache, chunk=1)
    ta, la = continue_greedy(a, 0, a.prefill(0, ids), 3)
    tb, lb = continue_greedy(b, 0, b.prefill(0, ids), 3)
    assert ta == tb
    np.testing.assert_array_equal(la, lb)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(1, 90), min_size=2, max_size=4))
def test_property_batch_equals_single(lens):
    prompts = [(f"p{i}", prompt(n)) for i, n in enumerate(lens)]
    batched = generate(engine(batch=len(lens)), prompts, 3)
    for fp, (pid, ids) in zip(batched.fingerprints, prompts):
        alone = generate(engine(), [(pid, ids)], 3).fingerprints[0]
        assert (fp.tokens, fp.topk_logprobs) == (alone.tokens, alone.topk_logprobs)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 100), k=st.integers(1, 6))
def test_property_snapshot_restore(n, k):
    eng = engine(batch=2)
    eng.prefill(0, prompt(n))
    eng.prefill(1, prompt(max(1, n // 2)))
    snap = eng.state.snapshot()
    before = eng.decode([3, 4], [0, 1])
    for _ in range(k):
        eng.decode([5, 6], [0, 1])
    eng.state.restore(snap)
    np.testing.assert_array_equal(eng.decode([3, 4], [0, 1]), before)


def test_long_prompt_exercises_compression_and_indexer(monkeypatch):
    calls = []
    orig = RefOps.topk_mask

    def spy(score, visible, k):
        calls.append(int(visible.sum(-1).max()))
        return orig(score, visible, k)
    monkeypatch.setattr(RefOps, "topk_mask", staticmethod(spy))
    eng = engine()
    eng.prefill(0, prompt(200))
    assert calls and max(calls) > TINY.indexer_topk                        # selection really ran
    ls = eng.state.layers[3]                                               # ratio-16 layer
    assert np.abs(ls.comp[0, : 200 // 16]).sum() > 0 and np.abs(ls.comp[0, 200 // 16:]).sum() == 0


# ---- the spec's small pieces -------------------------------------------------------------------------
def test_yarn_correction_range_matches_spec():
    flash = config.preset("flash")
    freq = rope_inv_freq(flash, True)
    assert (freq.corr_lo, freq.corr_hi, freq.freq_scale) == (15, 25, np.float32(1 / 16))
    mix = freq.ramp_mix()
    assert (mix[:16] == 1).all() and (mix[25:] == 0).all()                 # extrapolated / interpolated
    assert ((mix[16:25] > 0) & (mix[16:25] < 1)).all()
    ang = freq.angles(np.array(1000))
    plain = flash.compress_rope_base ** (-np.arange(0, 64, 2) / 64) * 1000
    np.testing.assert_allclose(ang[:16], plain[:16], rtol=1e-5)
    np.testing.assert_allclose(ang[25:], plain[25:] / 16, rtol=1e-5)
    assert (rope_inv_freq(flash, False).ramp_mix() == 0).all()


def test_rope_touches_only_the_tail_and_inverts():
    x = np.random.default_rng(0).standard_normal((3, 2, 128)).astype(np.float32)
    pos = np.array([[0], [5], [4000]])
    freq = rope_inv_freq(TINY, True)
    y = rope(np, x, pos, freq)
    np.testing.assert_array_equal(y[..., :64], x[..., :64])
    np.testing.assert_array_equal(y[0], x[0])                              # position 0: identity
    np.testing.assert_allclose(rope(np, y, pos, freq, inverse=True), x, atol=1e-5)
    # adjacent pairs rotate as (2i, 2i+1)
    a = float(freq.angles(np.array(5))[0])
    np.testing.assert_allclose(y[1, 0, 64], x[1, 0, 64] * math.cos(a) - x[1, 0, 65] * math.sin(a), atol=1e-5)


def test_hc_pre_comb_is_doubly_stochastic():
    net = DS4Model(TINY, RefOps(tiny_model()))
    X = np.random.default_rng(1).standard_normal((5, 4, TINY.n_embd)).astype(np.float32)
    x, post, comb = net.hc_pre(X, "blk.0.hc_attn")
    assert x.shape == (5, TINY.n_embd) and post.shape == (5, 4)
    np.testing.assert_allclose(comb.sum(axis=-2), 1, atol=1e-5)            # columns
    np.testing.assert_allclose(comb.sum(axis=-1), 1, atol=1e-3)            # rows, after 20 iterations
    assert (post > 0).all() and (post < 2).all()


def test_attention_sink_is_in_the_denominator():
    net = DS4Model(TINY, RefOps(tiny_model()))
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 1, 4, 128)).astype(np.float32)
    keys = rng.standard_normal((1, 5, 128)).astype(np.float32)
    mask = np.array([[[True, True, False, True, True]]])
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    o = net.attend(q, keys, mask, sinks)[0, 0]
    for h in range(4):
        s = keys[0, mask[0, 0]] @ q[0, 0, h] / math.sqrt(128)
        w = np.exp(s) / (np.exp(s).sum() + np.exp(sinks[h]))
        np.testing.assert_allclose(o[h], w @ keys[0, mask[0, 0]], rtol=1e-4, atol=1e-5)


def test_hash_layers_route_by_token_id():
    m = tiny_model()
    net = DS4Model(TINY, RefOps(m))
    xn = np.random.default_rng(3).standard_normal((3, TINY.n_embd)).astype(np.float32)
    toks = np.array([7, 300, 7])
    sel, w = net.route(0, xn, toks)
    np.testing.assert_array_equal(sel, np.asarray(m["blk.0.ffn_gate_tid2eid.weight"].data)[toks])
    np.testing.assert_allclose(w.sum(-1), TINY.expert_weights_scale, rtol=1e-5)
    sel3, _ = net.route(3, xn, toks)                                        # learned routing: biased top-k
    assert sel3.shape == (3, TINY.n_expert_used) and len(set(sel3[0])) == TINY.n_expert_used


# ---- synthetic models are well conditioned --------------------------------------------------------
def test_tiny_is_well_conditioned():
    eng = engine(ctx=400)
    rms = []
    logits = eng.net.forward(eng.state, np.array([prompt(300)]), np.array([0]), all_logits=True,
                             observe=lambda il, X: rms.append(float(np.sqrt(np.mean(X ** 2)))))[0]
    assert len(rms) == TINY.n_layer and all(0.5 < r < 4.0 for r in rms), rms
    assert max(rms) / min(rms) < 3
    z = logits - logits.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    top = np.sort(lp, -1)
    assert np.isfinite(logits).all()
    assert 1.0 < float(logits.std(-1).mean()) < 10.0
    assert -3.0 < float(top[:, -1].mean()) < -0.1                           # neither uniform nor one-hot
    assert len(set(logits.argmax(-1).tolist())) > 30


# ---- golden outputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["q8", "f16", "f32"])
def test_golden(cache):
    """Any change to numerics must update tests/golden/tiny.json deliberately (python -m tests.engine_util)."""
    want = json.load(open(GOLDEN))["modes"][cache]
    got = golden_run(cache)
    assert set(got) == set(want)
    for pid, w in want.items():
        g = got[pid]
        assert g["tokens"] == w["tokens"], pid
        assert g["sha256"] == w["sha256"] == token_hash(w["tokens"])
        assert g["topk_ids"] == w["topk_ids"], pid
        np.testing.assert_allclose(g["topk_logprobs"], w["topk_logprobs"], atol=1e-3, err_msg=pid)
    assert all(len(w["tokens"]) == GOLDEN_TOKENS for w in want.values())


def test_modes_agree_or_differ_at_a_near_tie():
    """q8 and f16 against f32 on the golden prompts: same tokens, or the first different token comes
    where f32's top-2 margin is small (ds4-spec 9: modes differ only at precision level)."""
    g = json.load(open(GOLDEN))["modes"]
    for cache in ("q8", "f16"):
        for pid, ref in g["f32"].items():
            got = g[cache][pid]["tokens"]
            d = next((i for i, (a, b) in enumerate(zip(got, ref["tokens"])) if a != b), None)
            if d is not None:
                margin = ref["topk_logprobs"][d][0] - ref["topk_logprobs"][d][1]
                assert margin < 0.25, (cache, pid, d, margin)


# ---- CLI ----------------------------------------------------------------------------------------
def test_generate_cli(capsys):
    rc = cli.main(["generate", "--preset", "tiny", "-n", "4", "--cache", "q8", "--batch", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "sha256" in out and "decode" in out and "tok/s" in out


def test_generate_cli_rejects_unknown_mode(capsys):
    assert cli.main(["generate", "--preset", "tiny", "-n", "2", "--cache", "q4"]) == 2
    assert "unknown cache mode 'q4'" in capsys.readouterr().err


@pytest.mark.parametrize("var,value,msg", [
    ("DS4BENCH_UNFUSED", "fast_norm", "DS4BENCH_UNFUSED: unknown fast_norm"),
    ("DS4BENCH_Q8_KERNEL", "staged", "DS4BENCH_Q8_KERNEL: unknown 'staged'; choose from warp, wide"),
    ("DS4BENCH_MOE_KERNEL", "split", "DS4BENCH_MOE_KERNEL: unknown 'split'; choose from warp"),
    ("DS4BENCH_ATTN_KERNEL", "inplace", "DS4BENCH_ATTN_KERNEL: unknown 'inplace'; choose from concat, ring"),
    ("DS4BENCH_DECODE_GRAPH", "1", "DS4BENCH_DECODE_GRAPH: unknown '1'; choose from off, on"),
    ("DS4BENCH_CACHE_MB", "abc", "DS4BENCH_CACHE_MB: 'abc' is not a whole number of MiB"),
    ("DS4BENCH_PLACEMENT", "vram", "DS4BENCH_PLACEMENT: unknown placement 'vram'; choose one of device, managed"),
    ("DS4BENCH_PLUGINS", "no_such_plugin", "DS4BENCH_PLUGINS: cannot import 'no_such_plugin'")])
def test_cli_refuses_an_unknown_engine_toggle(capsys, monkeypatch, var, value, msg):
    """Checked before any backend runs, so a typo fails on the CPU too, in one line."""
    monkeypatch.setenv(var, value)
    assert cli.main(["generate", "--preset", "tiny", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.parametrize("args,msg", [
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--placement", "vram"], "unknown placement 'vram'; choose one of device, managed, managed-hinted, host")])
def test_cli_names_a_bad_generate_option(capsys, args, msg):
    assert cli.main(["generate", "--preset", "tiny", "-n", "2", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_gpu_commands_without_a_gpu_say_so(capsys):
    from ds4bench.engine.generate import gpu_available
    if gpu_available():
        pytest.skip("a GPU is visible")
    for args in (["bench-kernels"], ["generate", "--preset", "tiny", "-n", "2", "--backend", "cupy"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs CuPy and a visible CUDA GPU" in err


def test_index_arrays_are_built_once_per_step_not_per_layer():
    """The host-computed index and mask arrays (ring rows, masks, emitting windows) go to the
    array module's device once per forward call, shared by every layer: on a GPU each is a
    host-to-device copy, so their number must not grow with depth."""
    import dataclasses
    from ds4bench.engine import config
    from ds4bench.engine.synth import make_model

    def uploads(n_layer):
        tiny = config.preset("tiny")
        ratios = (tiny.compress_ratios * 2)[:n_layer]         # the same layer kinds, repeated
        cfg = dataclasses.replace(tiny, n_layer=n_layer, compress_ratios=ratios)
        eng = Engine(make_model(cfg, 0), mode="f32", ctx=64)
        calls = []
        orig = eng.net.ix
        eng.net.ix = lambda a: (calls.append(1), orig(a))[1]
        eng.prefill(0, list(range(1, 30)))
        calls.clear()
        eng.decode(np.array([5]), np.array([0]))            # position 29: no window completes
        return len(calls)

    shallow, deep = uploads(6), uploads(12)
    assert shallow == deep and shallow <= 16


@pytest.mark.parametrize("seed", range(6))
def test_topk_logprobs_equals_a_full_stable_sort(seed):
    """The partition shortcut picks exactly what a stable argsort of the whole row picks,
    ties (to the lower id) and NaN rows included."""
    from ds4bench.engine.generate import topk_logprobs
    rng = np.random.default_rng(seed)
    x = rng.integers(-5, 5, 1000).astype(np.float32) if seed % 2 else rng.standard_normal(129280).astype(np.float32)
    if seed == 5:
        x[rng.integers(0, len(x), 990)] = np.nan
    ids, lp = topk_logprobs(x, 20)
    z = x.astype(np.float64)
    full = z - np.max(z) - np.log(np.sum(np.exp(z - np.max(z))))
    want = np.argsort(-full, kind="stable")[:20]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(lp, full[want])


def test_unfused_toggle_selects_the_array_code():
    """An ops object's fused kernels are used unless DS4BENCH_UNFUSED (ops.unfused) names them;
    unknown names are refused with the list of known ones."""
    from ds4bench.engine import model as M
    from ds4bench.engine.ops_ref import RefOps

    class Fused(RefOps):
        calls = []

        def rms_norm(self, x, w, eps):
            self.calls.append("rms_norm")
            return M.rms_norm(np, x, w, eps)

    mf = tiny_model()
    ops = Fused(mf, "f32")
    Engine(mf, ctx=64, ops=ops).decode(np.array([5]), np.array([0]))
    assert Fused.calls
    Fused.calls.clear()
    ops.unfused = parse_unfused("rms_norm,rope")
    Engine(mf, ctx=64, ops=ops).decode(np.array([5]), np.array([0]))
    assert not Fused.calls
    assert parse_unfused("all") == frozenset(M.FUSABLE) and parse_unfused("") == frozenset()
    with pytest.raises(ValueError, match="unknown fast_norm; choose from all, hc, rms_norm"):
        parse_unfused("fast_norm")


def _ring_rows(raw, kv, comp, visible, P):
    """kernels/attention.cu's RingRows in NumPy, line by line (C's truncating %): the key rows
    and visibility attend_sink_ring reads in place of the gathered and concatenated ones."""
    B, W, K = raw.shape
    T = P.shape[1]
    C = 0 if visible is None else visible.shape[-1]
    keys = np.full((B, W + T + C, K), np.nan, np.float32)
    mask = np.zeros((B, T, W + T + C), bool)
    for b in range(B):
        p0 = int(P[b, 0])
        r0 = int(math.fmod(math.fmod(p0, W) + W, W))
        for j in range(W + T + C):
            if j < W:
                r = r0 + j if r0 + j < W else r0 + j - W
                assert 0 <= r < W                          # NumPy would wrap a negative row; CUDA would not
                keys[b, j] = raw[b, r]
            elif j < W + T:
                keys[b, j] = kv[b, j - W]
            else:
                keys[b, j] = comp[b, j - W - T]
            for t in range(T):
                kpos, p = p0 - W + j, int(P[b, t])
                mask[b, t, j] = (kpos >= 0 and kpos <= p and kpos > p - W) if j < W + T else visible[b, t, j - W - T]
    return keys, mask


def test_in_place_attention_rows_are_the_concatenated_ones(monkeypatch):
    """DS4BENCH_ATTN_KERNEL=ring reads the window ring, the new rows and the compressed rows in
    place and derives the raw rows' visibility from the positions. Its addressing, ported to
    NumPy, must give exactly the keys and mask the model gathers, concatenates and uploads, at
    every attention call of a run that covers the cases: chunked prefill (T > 1, and T > W) from
    position 0 (rows before the sequence), the ring wrapping (positions past W = 32), compressed rows of
    ratio 4 and 16, the indexer's top-k once more than 16 rows are visible, and two sequences
    at different positions in one decode step."""
    from ds4bench.engine.model import DS4Model
    calls = []
    orig = DS4Model.attention_keys

    def checked(self, ls, kv, P, visible):
        keys, mask = orig(self, ls, kv, P, visible)
        want_k, want_m = _ring_rows(ls.raw, kv, ls.comp, visible, P)
        np.testing.assert_array_equal(want_m, mask)
        np.testing.assert_array_equal(want_k, keys)
        C = 0 if visible is None else visible.shape[-1]
        calls.append((P.shape[1], C, C > 16 and visible.sum(-1).max() <= 16))   # top-k: at most 16 seen
        return keys, mask

    monkeypatch.setattr(DS4Model, "attention_keys", checked)
    eng = Engine(tiny_model(), mode="f32", batch=2, ctx=96, chunk=40)
    eng.prefill(0, list(range(1, 76)))
    eng.prefill(1, list(range(3, 40)))
    for step in range(3):
        eng.decode(np.array([5 + step, 7 + step]), np.array([0, 1]))
    assert any(T > 32 for T, _, _ in calls) and any(C > 16 for _, C, _ in calls)
    assert any(topk for *_, topk in calls)                     # the indexer hid some visible rows


def test_static_step_decodes_as_forward():
    """DS4Model.step, the decode step with shapes fixed by the run state and every count derived
    from the positions as arrays (what a CUDA graph captures), against forward on the NumPy
    engine: two sequences at different positions, decoding across window ends of ratio 4 and
    16, past the ring's wrap, with the indexer's top-k active for one of them. Same tokens,
    logits and stored compressed rows to float32 rounding (the attention softmax sums over the
    capacity instead of the rows in use)."""
    def engine():
        eng = Engine(tiny_model(), mode="f32", batch=2, ctx=96, chunk=40)
        eng.prefill(0, list(range(1, 76)))
        eng.prefill(1, list(range(3, 40)))
        return eng

    eager, static = engine(), engine()
    tok = np.array([5, 7])
    for _ in range(14):
        want = eager.decode(tok, np.array([0, 1]))
        got = static.net.step(static.state, tok, static.state.pos.copy())
        static.state.pos += 1
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        tok = want.argmax(-1)
    assert (static.state.pos == eager.state.pos).all()
    for le, ls in zip(eager.state.layers, static.state.layers):
        for name in ("comp", "ik"):
            a, b = getattr(le, name), getattr(ls, name)
            if a is not None:                  # rows past a slot's count stay as they were (zero)
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_decode_graph_toggle_says_it_does_not_apply_on_the_cpu(monkeypatch, capsys):
    """DS4BENCH_DECODE_GRAPH=on on the NumPy engine: eager decoding, and the engine, the
    `generate` line and so a matrix cell's record say why."""
    eng = Engine(tiny_model(), mode="q8", ctx=64, decode_graph="on")
    assert eng.graph is None
    assert eng.decode_path == "eager (DS4BENCH_DECODE_GRAPH=on does not apply: the NumPy engine has no CUDA graphs)"
    monkeypatch.setenv("DS4BENCH_DECODE_GRAPH", "on")
    assert cli.main(["generate", "--preset", "tiny", "-n", "2", "--backend", "numpy"]) == 0
    assert "decode eager (DS4BENCH_DECODE_GRAPH=on does not apply" in capsys.readouterr().out
    monkeypatch.setenv("DS4BENCH_DECODE_GRAPH", "off")
    assert Engine(tiny_model(), mode="q8", ctx=64).decode_path == "eager"


def test_decoding_past_the_context_is_refused_in_one_line():
    """A step whose position does not fit the run state's context stops with one line naming
    the position and the context (forward; the graph path calls the same check)."""
    eng = Engine(tiny_model(), mode="q8", ctx=8)
    eng.prefill(0, list(range(1, 9)))                       # positions 0..7: full
    with pytest.raises(ValueError, match=r"^context overflow: position 8 >= ctx 8$"):
        eng.decode(np.array([5]), np.array([0]))
