"""Routed experts on the GPU (kernels/moe.cu through ds4bench.engine.moe_gpu) against the NumPy reference.

Every GPU test runs on fresh random inputs with outputs and scratch poisoned (0xFF bytes: NaN
floats, −1 integers) so unwritten elements show. Thresholds:
  q8k_quantize       exact (q, d, bsums), ties and zero blocks included;
  gate/up mid        NMSE < 1e-12 against int_matmul + the reference epilogue: the integer dots
                     and float64 block sums are the reference's, so only expf vs NumPy's exp
                     (an ulp of mid, NMSE ~1e-14) separates them;
  experts (full)     NMSE < 1e-8 and max |Δ‖y_n‖| / ‖y_n‖ < 1e-5 per token: an ulp of mid can move
                     one Q8_K(mid) value by ±1 (or a block's scale), which the down projection
                     carries at ~1e-7 relative; anything structural (a wrong index, scale or
                     sign) is far above 1e-3.
NMSE = Σ(y − ref)² / Σ ref².
"""
import dataclasses
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4bench.engine import config as C
from ds4bench.engine import formats as F
from ds4bench.engine.gguf_io import ModelFile, Tensor, TensorSpec
from ds4bench.engine.kernels import KERNEL_DIR
from ds4bench.engine.ops_ref import RefOps
from ds4bench.engine.synth import make_model

MOE_CU = os.path.join(KERNEL_DIR, "moe.cu")
NMSE_MID, NMSE_OUT, NORM_REL = 1e-12, 1e-8, 1e-5


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        n = 0
    if n == 0:
        pytest.skip("no CUDA device visible")
    return cupy


@pytest.fixture(scope="module")
def moe(cp):
    from ds4bench.engine import moe_gpu
    return moe_gpu


def nmse(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(((y - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-300))


def check_close(y, ref, what):
    assert np.isfinite(y).all(), f"{what}: {np.count_nonzero(~np.isfinite(y))} non-finite outputs"
    e = nmse(y, ref)
    norm_y, norm_r = np.linalg.norm(y, axis=-1), np.linalg.norm(ref, axis=-1)
    rel = float(np.max(np.abs(norm_y - norm_r) / np.maximum(norm_r, 1e-30)))
    exact = float(np.mean(y == ref))
    print(f"{what}: NMSE {e:.3g}, max norm rel err {rel:.3g}, bit-equal {exact:.4f}")
    assert e < NMSE_OUT, f"{what}: NMSE {e:.3g} >= {NMSE_OUT}"
    assert rel < NORM_REL, f"{what}: max relative error of row norms {rel:.3g} >= {NORM_REL}"


def route(rng, N, A, E):
    """Distinct experts per token (int64 [N, A]) and positive weights summing to 1.5 (f32 [N, A])."""
    sel = np.argsort(rng.random((N, E)), axis=1)[:, :A].astype(np.int64)
    p = rng.random((N, A)) + 0.05
    return sel, (1.5 * p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def device_tensors(cp, model, il):
    return {name: (t.qtype, cp.asarray(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)))
            for name, t in model.tensors.items() if name.startswith(f"blk.{il}.") and "_exps." in name}


# --------------------------------------------------------------------------- Q8_K

@pytest.mark.gpu
def test_q8k_quantize_matches_reference(cp, moe):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 1024)) * rng.uniform(0.01, 100, (7, 1))).astype(np.float32)
    x[1, 256:512] = 0.0                                   # zero block: d = 0, q = 0
    x[2, :256] = rng.integers(-126, 126, 256) + 0.5       # ties: iscale = 1 exactly, rint to even
    x[2, 17] = -127.0
    x[3, 512:768] = 1.0                                   # all |x| equal: the first is the max
    x[3, 600] = -1.0
    x[4, :256] = np.clip(x[4, :256], -6.9, 6.9)
    x[4, 3], x[4, 200] = -7.0, 7.0                        # equal |x|, opposite signs: the first wins
    q, d, bs = moe.q8k_quantize(cp.asarray(x), poison=True)
    rq, rd, rbs = F.quantize_act_q8_k(x)
    np.testing.assert_array_equal(cp.asnumpy(q), rq)
    np.testing.assert_array_equal(cp.asnumpy(d), rd)
    np.testing.assert_array_equal(cp.asnumpy(bs), rbs)


# --------------------------------------------------------------------------- tiny layers

@pytest.fixture(scope="module", params=["q2", "q4"])
def tiny(request, cp, moe):
    """(reference ops, GPU experts) on a synthetic tiny model: q2 = IQ2_XXS gate/up + Q2_K down,
    q4 = Q4_K everywhere."""
    model = make_model(C.preset("tiny", request.param))
    gpu = moe.GpuExperts(model.cfg, {k: v for il in range(model.cfg.n_layer)
                                     for k, v in device_tensors(cp, model, il).items()})
    gpu.poison = True
    return RefOps(model), gpu


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 5, 37])
def test_experts_match_reference(cp, tiny, N):
    ops, gpu = tiny
    cfg = ops.cfg
    rng = np.random.default_rng(100 + N)
    for il, scale in ((0, 1.0), (3, 4.0)):                # scale 4 drives many g, u into the clamp
        x = (scale * rng.standard_normal((N, cfg.n_embd))).astype(np.float32)
        sel, w = route(rng, N, cfg.n_expert_used, cfg.n_expert)
        ref = ops.experts(il, x, sel, w)
        y = cp.asnumpy(gpu(il, cp.asarray(x), cp.asarray(sel), cp.asarray(w)))
        check_close(y, ref, f"{cfg.variant} layer {il} N={N}")


@pytest.mark.gpu
def test_gate_up_mid_matches_int_matmul(cp, moe, tiny):
    """The first kernel alone: mid against int_matmul and the reference's epilogue."""
    ops, gpu = tiny
    cfg, il, N = ops.cfg, 4, 9
    rng = np.random.default_rng(7)
    x = (2.0 * rng.standard_normal((N, cfg.n_embd))).astype(np.float32)
    sel, w = route(rng, N, cfg.n_expert_used, cfg.n_expert)
    xq, xd, xb = F.quantize_act_q8_k(x)
    Wg, Wu = (ops.intw(f"blk.{il}.ffn_{k}_exps.weight") for k in ("gate", "up"))
    c = cfg.swiglu_clamp
    ref = np.empty((N, cfg.n_expert_used, cfg.expert_ff), np.float32)
    for n in range(N):
        for a, e in enumerate(sel[n]):
            g = np.minimum(F.int_matmul(Wg[e], xq[n], xd[n], xb[n]), c)
            u = np.clip(F.int_matmul(Wu[e], xq[n], xd[n], xb[n]), -c, c)
            ref[n, a] = g / (1.0 + np.exp(-g)) * u * w[n, a]
    gq, gd, gb = moe.q8k_quantize(cp.asarray(x), poison=True)
    mid = cp.asnumpy(gpu.gate_up(il, gq, gd, gb, cp.asarray(sel, dtype=cp.int32), cp.asarray(w)))
    ref = ref.reshape(N * cfg.n_expert_used, cfg.expert_ff)
    assert np.isfinite(mid).all()
    e = nmse(mid, ref)
    print(f"{cfg.variant} gate/up: NMSE {e:.3g}, bit-equal {np.mean(mid == ref):.4f}")
    assert e < NMSE_MID


# --------------------------------------------------------------------------- Flash shapes

@pytest.mark.gpu
def test_experts_flash_shapes_q2(cp, moe):
    """[256 experts, 2048, 4096] IQ2_XXS gate/up and Q2_K down on the device (1.8 GB), random blocks
    in 6 expert slots (the last included: the largest byte offsets); the reference gets only those 6."""
    cfg = C.preset("flash")
    E, Fh, D, A = cfg.n_expert, cfg.expert_ff, cfg.n_embd, cfg.n_expert_used
    chosen = np.array([0, 1, 77, 128, 200, 255])
    rng = np.random.default_rng(2048)
    host = {"gate": F.random_blocks(QT.IQ2_XXS, (A, Fh, D), rng, D ** -0.5),
            "up": F.random_blocks(QT.IQ2_XXS, (A, Fh, D), rng, D ** -0.5),
            "down": F.random_blocks(QT.Q2_K, (A, D, Fh), rng, Fh ** -0.5)}
    qt = {"gate": QT.IQ2_XXS, "up": QT.IQ2_XXS, "down": QT.Q2_K}
    name = lambda k: f"blk.0.ffn_{k}_exps.weight"
    dev = {}
    for k, blocks in host.items():
        per_expert = blocks[0].size
        full = cp.zeros(E * per_expert, cp.uint8)
        for i, e in enumerate(chosen):
            full[e * per_expert:(e + 1) * per_expert] = cp.asarray(blocks[i].reshape(-1))
        dev[name(k)] = (qt[k], full)
    gpu = moe.GpuExperts(cfg, dev)
    gpu.poison = True

    small = dataclasses.replace(cfg, n_expert=A)
    shapes = {"gate": (A, Fh, D), "up": (A, Fh, D), "down": (A, D, Fh)}
    ref_model = ModelFile(small, {name(k): Tensor(TensorSpec(name(k), shapes[k], qt[k], "experts", 0),
                                                  host[k]) for k in host})
    ops = RefOps(ref_model)

    N = 4
    x = rng.standard_normal((N, D)).astype(np.float32)
    local = np.stack([rng.permutation(A) for _ in range(N)])                         # [N, A] in 0..5
    _, w = route(rng, N, A, A)
    ref = ops.experts(0, x, local, w)
    y = cp.asnumpy(gpu(0, cp.asarray(x), cp.asarray(chosen[local]), cp.asarray(w)))
    check_close(y, ref, "flash q2")


# --------------------------------------------------------------------------- CPU: the source builds

def test_moe_cu_compiles_with_nvcc(tmp_path):
    """What CI checks: kernels/moe.cu compiles for sm_90 and defines every kernel moe_gpu launches."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    r = subprocess.run([nvcc, "-arch=sm_90", "-c", MOE_CU, "-o", str(tmp_path / "moe.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed on {MOE_CU}:\n{r.stderr}"
    src = open(MOE_CU).read()
    defined = set(re.findall(r'extern "C" __global__ void (\w+)\(', src))
    defined |= set(re.findall(r"^(?:GATE_UP|DOWN)_KERNEL\((\w+),", src, flags=re.M))
    suffixes = ("iq2_xxs", "q2_k", "q4_k")            # moe_gpu.KERNEL_SUFFIX (moe_gpu needs CuPy)
    wanted = {"q8k_quantize"} | {f"moe_{s}_{t}" for s in ("gate_up", "down") for t in suffixes}
    assert wanted <= defined, f"moe.cu lacks {sorted(wanted - defined)}"
