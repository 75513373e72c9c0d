"""The wide Q8_0 matvec (DS4BENCH_Q8_KERNEL=wide: matmul_q8_0_wide_<T>, matmul_q8_0_wide_fused_<T>)
against the NumPy reference and matmul_q8_0 (marked `gpu`; skipped without CuPy and a GPU).

It forms and sums each block's term in double as matmul_q8_0 does and rounds once, with the
double sum in another order (threads of a row take blocks t, t + S, ...; their sums meet by
shuffles, then across warps in order). So against the reference (int_matmul, blocks in order)
and against matmul_q8_0: NMSE < 1e-12 as matmul_q8_0's own test, and at most one element in
a thousand may differ at all, by one float ulp (a double sum within a double ulp of a float
rounding boundary); with S = 32 threads a row the order is matmul_q8_0's, so the bits are its
bits; the fused kernel gives the plain kernel's bits. Outputs are poisoned (NaN) before a run.
"""
import numpy as np
import pytest

from ds4bench.engine import faults as FL
from ds4bench.engine import formats as F
from ds4bench.engine.ops_ref import _sub

from .engine_util import require_gpu

cp = require_gpu()
pytestmark = pytest.mark.gpu

from ds4bench.engine import kernels  # noqa: E402

from .test_gpu_engine import _agree, _run, nmse, poisoned  # noqa: E402

RNG = np.random.default_rng(4321)
BLOCK = kernels.define("q8_0.cu", "Q8W_THREADS")


def _operands(O, K, T, groups):
    """Q8_0 weights [O, K / groups], activations x [T, K] of varied scale, quantized."""
    Kg = K // groups
    raw = F.quantize_q8_0((RNG.standard_normal((O, Kg)) * 0.02).astype(np.float32))
    x = (RNG.standard_normal((T, K)) * RNG.uniform(0.1, 5, (T, 1))).astype(np.float32)
    xq, xd = F.quantize_act_q8_0(x)
    return raw, x, xq, xd


def _reference(raw, xq, xd, O, K, groups):
    Kg, Og = K // groups, O // groups
    W = F.decompose(raw, F.QT.Q8_0, (O, Kg))
    return np.concatenate([F.int_matmul(_sub(W, slice(g * Og, (g + 1) * Og)), xq[:, g * Kg:(g + 1) * Kg],
                                        xd[:, g * Kg // 32:(g + 1) * Kg // 32]) for g in range(groups)], axis=1)


def _warp(W, xq, xd, O, K, T, groups, defines=()):
    y = poisoned((T, O))
    kernels.function("q8_0.cu", "matmul_q8_0", defines)((-(-O // 8), -(-T // 8)), (256,), (
        W, xq, xd, y, np.int32(O), np.int32(K // groups), np.int32(T), np.int32(O // groups), np.int32(K)))
    return y.get()


def _wide(W, xq, xd, O, K, T, groups, S, defines=(), x=None):
    """matmul_q8_0_wide_<T>, or with x (float activations) matmul_q8_0_wide_fused_<T>."""
    y = poisoned((T, O))
    tail = (np.int32(O), np.int32(K // groups), np.int32(O // groups), np.int32(K), np.int32(S))
    grid = (-(-O // (BLOCK // S)),)
    if x is None:
        kernels.function("q8_0.cu", f"matmul_q8_0_wide_{T}", defines)(grid, (BLOCK,), (W, xq, xd, y) + tail)
    else:
        kernels.function("q8_0.cu", f"matmul_q8_0_wide_fused_{T}", defines)(
            grid, (BLOCK,), (W, x, y) + tail, shared_mem=T * (K // groups + K // groups // 8))
    return y.get()


def _near(got, want, what):
    """Within NMSE 1e-12, at most one element in a thousand different, by at most one ulp."""
    assert np.isfinite(got).all(), what
    assert nmse(got, want) < 1e-12, what
    off = got != want
    assert off.mean() <= 1e-3, (what, int(off.sum()))
    assert (np.abs(got - want)[off] <= np.spacing(np.abs(want[off]).astype(np.float32))).all(), what


# the attention shapes of Flash (attn_q_a, attn_q_b, attn_kv, attn_output_a as 8 groups,
# attn_output_b), the shared expert's, and rows of odd block counts, rows past O, tiny groups
SHAPES = [(1024, 4096, 1), (32768, 1024, 1), (512, 4096, 1), (8192, 4096, 8), (4096, 8192, 1),
          (2048, 4096, 1), (4096, 2048, 1), (65, 96, 1), (1030, 4352, 1), (128, 256, 2)]


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("O,K,groups", SHAPES)
def test_wide_matvec_matches_reference_and_warp(O, K, groups, T):
    """At the split the engine takes (kernels.q8_wide_split), at S = 32 (matmul_q8_0's order:
    its bits) and at S = 4 (many blocks a thread: the loop over chunks), plain and fused."""
    raw, x, xq, xd = _operands(O, K, T, groups)
    ref = _reference(raw, xq, xd, O, K, groups)
    W, xq_d, xd_d, x_d = cp.asarray(raw), cp.asarray(xq), cp.asarray(xd), cp.asarray(x)
    warp = _warp(W, xq_d, xd_d, O, K, T, groups)
    _near(warp, ref, "warp")
    split = kernels.q8_wide_split(O, K // groups // 32, kernels.sm_count())
    for S in sorted({split, 32, 4}):
        got = _wide(W, xq_d, xd_d, O, K, T, groups, S)
        _near(got, ref, f"S={S}")
        if S == 32:
            np.testing.assert_array_equal(got, warp)
        else:
            _near(got, warp, f"S={S} against warp")
        if (O // groups) % (BLOCK // S) == 0 or groups == 1:
            np.testing.assert_array_equal(_wide(W, None, None, O, K, T, groups, S, x=x_d), got)


@pytest.mark.parametrize("T", [2, 8])
def test_wide_matvec_every_token_count(T):
    """Token counts 1..TOKEN_TILE have a kernel each; two more against the reference."""
    O, K = 256, 4096
    raw, x, xq, xd = _operands(O, K, T, 1)
    W = cp.asarray(raw)
    got = _wide(W, cp.asarray(xq), cp.asarray(xd), O, K, T, 1, kernels.q8_wide_split(O, K // 32, kernels.sm_count()))
    _near(got, _reference(raw, xq, xd, O, K, 1), f"T={T}")


def test_wide_head_matches_warp():
    """The output head (129280 x 4096) at batch 1: a warp a row, so matmul_q8_0's bits."""
    O, K = 129280, 4096
    raw, _, xq, xd = _operands(O, K, 1, 1)
    W, xq_d, xd_d = cp.asarray(raw), cp.asarray(xq), cp.asarray(xd)
    S = kernels.q8_wide_split(O, K // 32, kernels.sm_count())
    assert S == 32
    np.testing.assert_array_equal(_wide(W, xq_d, xd_d, O, K, 1, 1, S), _warp(W, xq_d, xd_d, O, K, 1, 1))


Q8_DEFINES = sorted({f.define for f in FL.FAULTS.values() if f.cuda == "kernels/q8_0.cu"})


@pytest.mark.parametrize("define", Q8_DEFINES)
def test_wide_matvec_makes_each_fault_as_warp_does(define):
    """Compiled with a Q8_0 fault's define, the wide kernels make matmul_q8_0's mistake: at
    S = 32 its faulted bits, plain and fused, at the engine's split the faulted result within
    the double-order margin, and the faulted output is not the healthy one."""
    O, K, T = 1024, 4096, 3
    raw, x, xq, xd = _operands(O, K, T, 1)
    W, xq_d, xd_d, x_d = cp.asarray(raw), cp.asarray(xq), cp.asarray(xd), cp.asarray(x)
    d = (f"-D{define}",)
    warp = _warp(W, xq_d, xd_d, O, K, T, 1, d)
    assert nmse(warp, _warp(W, xq_d, xd_d, O, K, T, 1)) > 1e-6
    got = _wide(W, xq_d, xd_d, O, K, T, 1, 32, d)
    np.testing.assert_array_equal(got, warp)
    np.testing.assert_array_equal(_wide(W, None, None, O, K, T, 1, 32, d, x=x_d), warp)
    split = kernels.q8_wide_split(O, K // 32, kernels.sm_count())
    _near(_wide(W, xq_d, xd_d, O, K, T, 1, split, d), warp, f"{define} S={split}")


def _launched(monkeypatch):
    names, real = [], kernels.function
    monkeypatch.setattr(kernels, "function", lambda f, name, *rest: (names.append(name), real(f, name, *rest))[1])
    return names


@pytest.mark.parametrize("batch", [1, 4])
def test_wide_kernel_end_to_end(monkeypatch, batch):
    """DS4BENCH_Q8_KERNEL=wide on tiny's golden prompts: the wide kernels run (fused where the
    engine fuses, plain with DS4BENCH_UNFUSED=q8quant, at the batch's token count in decode) and
    the answer is the default kernel's within the q8 mode's tolerance."""
    base = _run("cupy", "q8", batch=batch)
    names = _launched(monkeypatch)
    got = _run("cupy", "q8", batch=batch, q8_kernel="wide")
    # decode runs the wide kernel at the batch's token count; the prompts' prefills (29 tokens and
    # more) keep matmul_q8_0
    assert f"matmul_q8_0_wide_fused_{batch}" in names and "matmul_q8_0_fused" in names
    _agree("q8", base, got)
    names.clear()
    two = _run("cupy", "q8", batch=batch, q8_kernel="wide", unfused={"q8quant"})
    assert f"matmul_q8_0_wide_{batch}" in names and not any("fused" in n for n in names if n.startswith("matmul"))
    _agree("q8", base, two)


def test_wide_kernel_in_a_decode_graph():
    """The wide kernels captured in the decode graph give the eager wide engine's bits."""
    eager = _run("cupy", "q8", q8_kernel="wide", decode_graph="off")
    graph = _run("cupy", "q8", q8_kernel="wide", decode_graph="on")
    for e, g in zip(eager.fingerprints, graph.fingerprints):
        assert e.tokens == g.tokens and e.topk_logprobs == g.topk_logprobs


def test_wide_split_fills_the_gpu_at_flash_shapes():
    """On this GPU, every Flash decode shape's wide grid has a CTA for every SM."""
    from ds4bench.harness.kbench import Q8_SHAPES
    sms = kernels.sm_count()
    for name, O, K, G in Q8_SHAPES:
        S = kernels.q8_wide_split(O, K // G // 32, sms)
        assert -(-O // (BLOCK // S)) >= sms, (name, S)
