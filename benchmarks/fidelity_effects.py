"""The size of each known difference between this engine's arithmetic and ds4's (docs/fidelity.md),
measured on the CPU by emulating ds4's C and CUDA loops in float32/double with NumPy.

    python -m benchmarks.fidelity_effects [--rows 2000] [--seed 0]

Prints one markdown table (effect, what is compared, measured size); docs/fidelity.md quotes it.
Emulations take cosf/sinf/powf/logf/expf as correctly rounded (ds4's libm and CUDA fast-math
intrinsics are not), and FMA as one rounding of the exact a*b + c.
"""
from __future__ import annotations

import argparse

import numpy as np

from ds4bench.engine import config
from ds4bench.engine import model as M

F32 = np.float32
CHECKPOINTS = [1, 127, 4095, 65535, 1_000_000]


# ---- RoPE angles --------------------------------------------------------------------------------
def exact_angles(cfg, compressed, pos):
    """pos * YaRN-blended frequency in float64: what the reference computed before."""
    n = cfg.n_rot
    base = cfg.compress_rope_base if compressed else cfg.rope_base
    inv = base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    if compressed:
        f = M.rope_inv_freq(cfg, True)
        ramp = 1.0 - np.clip((np.arange(n // 2) - float(f.corr_lo)) / max(0.001, float(f.corr_hi - f.corr_lo)), 0, 1)
        inv = inv * ramp + inv / cfg.rope_scale_factor * (1 - ramp)
    return np.asarray(pos, np.float64)[..., None] * inv


def cuda_angles(cfg, compressed, pos, fma=False):
    """ds4_cuda.cu rope_tail_kernel: (float)pos * powf(base, -(float)i / n_rot) per pair, no
    repeated multiplication; the YaRN blend as on the CPU (fma: contracted as nvcc does)."""
    f = M.rope_inv_freq(cfg, compressed)
    base = F32(cfg.compress_rope_base if compressed else cfg.rope_base)
    i = np.arange(0, cfg.n_rot, 2, dtype=np.float32)
    pw = (float(base) ** (-i / F32(cfg.n_rot)).astype(np.float64)).astype(np.float32)   # powf
    te = np.asarray(pos).astype(np.float32)[..., None] * pw
    ti = f.freq_scale * te
    if not f.yarn:
        return ti
    return blend(ti, te, f.ramp_mix(), fma)


def blend(ti, te, mix, fma):
    """theta_interp * (1 - mix) + theta_extrap * mix; fma: a*b + c rounded once (c = te*mix)."""
    one_minus = F32(1.0) - mix
    if not fma:
        return ti * one_minus + te * mix
    return (ti.astype(np.float64) * one_minus + (te * mix)).astype(np.float32)


def cpu_angles_fma(cfg, compressed, pos):
    f = M.rope_inv_freq(cfg, compressed)
    te = np.empty(np.shape(pos) + (f.npair,), np.float32)
    t = np.asarray(pos).astype(np.float32)
    for k in range(f.npair):
        te[..., k], t = t, t * f.theta_scale
    ti = f.freq_scale * te
    return blend(ti, te, f.ramp_mix(), True) if f.yarn else ti


def rope_rows(cfg):
    rows = []
    pos = np.array(CHECKPOINTS)
    for compressed in (False, True):
        kind = "compressed (YaRN)" if compressed else "plain"
        ds4 = M.rope_inv_freq(cfg, compressed).angles(pos).astype(np.float64)
        d_old = np.abs(ds4 - exact_angles(cfg, compressed, pos)).max(-1)
        d_cuda = np.abs(ds4 - cuda_angles(cfg, compressed, pos)).max(-1)
        fmt = lambda d: ", ".join(f"{p}: {v:.2g}" for p, v in zip(CHECKPOINTS, d))   # noqa: E731
        rows.append((f"RoPE angles, {kind}: float64 (before) vs ds4's float32 loop",
                     "max abs Δθ (rad) over pairs, by position", fmt(d_old)))
        rows.append((f"RoPE angles, {kind}: ds4 CUDA (powf per pair) vs ds4 CPU (repeated product)",
                     "max abs Δθ (rad), by position", fmt(d_cuda)))
        if compressed:
            d_fma = np.abs(ds4 - cpu_angles_fma(cfg, True, pos)).max(-1)
            some = np.random.default_rng(0).integers(0, 1 << 20, 4000)
            d_all = np.abs(M.rope_inv_freq(cfg, True).angles(some) - cpu_angles_fma(cfg, True, some)).max()
            rows.append(("RoPE YaRN blend contracted to FMA vs rounded twice", "max abs Δθ (rad), by position",
                         fmt(d_fma) + f"; 4000 random positions < 2^20: {d_all:.2g}"))
    return rows


# ---- RMS norm -----------------------------------------------------------------------------------
def scale_from_mean(mean, eps=1e-6):
    with np.errstate(over="ignore", divide="ignore"):
        return F32(1.0) / np.sqrt(mean.astype(np.float32) + F32(eps))


def rms_rows(rng, n_rows):
    X = (rng.standard_normal((n_rows, 4096)) * rng.uniform(0.01, 30, (n_rows, 1))).astype(np.float32)
    sq = X.astype(np.float64) ** 2
    seq = np.cumsum(sq, axis=1)[:, -1]                        # ds4 CPU: ss += x*x, in order, double
    s_ds4 = scale_from_mean(seq / 4096)
    s_ours = scale_from_mean(sq.sum(1) / 4096)                # NumPy's pairwise double sum
    s_f32 = scale_from_mean(np.mean(X * X, axis=1))           # the reference before (float32 mean)
    # ds4 CUDA: 256 threads each accumulate v*v (FMA) over a stride, then a float tree reduction
    part = np.zeros((n_rows, 256), np.float32)
    for j in range(4096 // 256):
        part = (X[:, j * 256:(j + 1) * 256].astype(np.float64) ** 2 + part).astype(np.float32)
    w = 256
    while w > 1:
        w //= 2
        part = part[:, :w] + part[:, w:2 * w]
    s_cuda = scale_from_mean(part[:, 0] / F32(4096))
    rel = lambda a, b: np.abs(a.astype(np.float64) / b - 1).max()   # noqa: E731
    return [
        ("RMS norm: float32 mean (before) vs ds4's double sum", f"rows of 4096 whose scale differs (of {n_rows})",
         f"{int((s_f32 != s_ds4).sum())}; max rel {rel(s_f32, s_ds4):.2g}"),
        ("RMS norm: pairwise double sum (here, and block order on the GPU) vs ds4's sequential",
         f"rows whose scale differs (of {n_rows})", f"{int((s_ours != s_ds4).sum())}"),
        ("RMS norm: ds4 CUDA float sums vs ds4 CPU double sum", f"rows whose scale differs (of {n_rows})",
         f"{int((s_cuda != s_ds4).sum())}; max rel {rel(s_cuda, s_ds4):.2g}"),
        ("RMS norm at large magnitudes", "ds4 / here",
         "rms 3e17: ds4 fine, the float32 mean (before) gave 0; rms > 1.8e19: ds4 gives 0 (1/sqrtf(inf)), "
         "here the row is normalized (overflow='zero' gives ds4's zeros); tests/test_fidelity.py"),
    ]


# ---- Q8_0 dot products and attention --------------------------------------------------------------
def q8_rows(rng, n_rows):
    out = []
    for K in (1024, 4096):
        nb = K // 32
        isum = rng.integers(-127 * 127 * 8, 127 * 127 * 8, (n_rows, nb)).astype(np.float32)   # |Σ q_w q_x|
        dw = rng.uniform(1e-4, 2e-3, (n_rows, nb)).astype(np.float16).astype(np.float32)
        dx = rng.uniform(1e-3, 5e-2, (n_rows, nb)).astype(np.float32)
        ours = (dx.astype(np.float64) * (dw.astype(np.float64) * isum)).sum(1).astype(np.float32)
        acc = np.zeros(n_rows, np.float32)
        for b in range(nb):                                   # acc += (d_w * d_x) * (float)isum, float
            acc = acc + (dw[:, b] * dx[:, b]) * isum[:, b]
        rel = np.abs(acc.astype(np.float64) / ours - 1)
        out.append((f"Q8_0 dot, K={K}: block terms in double, rounded once (here) vs ds4's float sum",
                    f"outputs that differ (of {n_rows}); median / max rel",
                    f"{int((acc != ours).sum())}; {np.median(rel):.2g} / {rel.max():.2g}"))
    return out


def attention_rows(rng, n_rows):
    K, R = 512, 256
    q = rng.standard_normal((n_rows, K)).astype(np.float32)
    kv = rng.standard_normal((n_rows, R, K)).astype(np.float32)
    sink = F32(0.5)
    scale = F32(1.0) / np.sqrt(F32(K))
    s64 = np.einsum("nk,nrk->nr", q.astype(np.float64), kv.astype(np.float64)) * float(scale)
    m64 = np.maximum(s64.max(1, keepdims=True), float(sink))
    e64 = np.exp(s64 - m64)
    o64 = np.einsum("nr,nrk->nk", e64, kv.astype(np.float64)) / (e64.sum(1, keepdims=True) + np.exp(float(sink) - m64))
    prod = q[:, None, :] * kv                                 # ds4 CPU dot_f32: float, in order
    s32 = np.cumsum(prod, axis=2, dtype=np.float32)[:, :, -1] * scale
    m32 = np.maximum(s32.max(1, keepdims=True), sink)
    o32 = np.zeros((n_rows, K), np.float32)
    den = np.exp(sink - m32).astype(np.float32)[:, 0]
    for r in range(R):                                        # axpy per row, float
        wgt = np.exp(s32[:, r] - m32[:, 0]).astype(np.float32)
        den = den + wgt
        o32 = o32 + wgt[:, None] * kv[:, r]
    o32 = o32 * (F32(1.0) / den)[:, None]
    err = np.abs(o32 - o64) / np.abs(o64).max(1, keepdims=True)
    return [(f"Attention with a sink, {R} keys x {K}: double (here) vs ds4 CPU float",
             "max abs Δ / max abs o per row: median / max", f"{np.median(err.max(1)):.2g} / {err.max():.2g}")]


def indexer_f16_rows(rng, n_rows):
    """ds4 stores compressed indexer rows through kv_cache_push_comp (F16); the reference keeps
    them as the FP4 round trip left them."""
    from ds4bench.engine import formats as F
    x = rng.standard_normal((n_rows, 128)).astype(np.float32) * rng.uniform(0.01, 30, (n_rows, 1)).astype(np.float32)
    r = F.fp4_e2m1_roundtrip(F.hadamard(x))
    h = F.round_f16(r)
    rel = np.abs(h.astype(np.float64) - r) / np.maximum(np.abs(r), 1e-30)
    return [("Compressed indexer rows: FP4 round trip kept in float32 (here) vs F16-stored (ds4)",
             f"elements changed by the F16 store (of {r.size}); max rel", f"{int((h != r).sum())}; {rel.max():.2g}")]


def topk_rows(rng, n_rows):
    """ds4's topk_desc (insertion, strict >: the earlier index wins a tie) against a stable argsort."""
    def topk_desc(score, k):
        idx = []
        for i, s in enumerate(score):
            j = next((j for j, o in enumerate(idx) if s > score[o]), len(idx))
            idx.insert(j, i)
            del idx[k:]
        return idx
    bad = 0
    for _ in range(n_rows):
        score = rng.integers(0, 8, 256).astype(np.float32)    # many ties
        bad += topk_desc(list(score), 6) != list(np.argsort(-score, kind="stable")[:6])
    return [("Router top-k ties", f"rows with ties where ds4's topk_desc and the reference choose differently "
             f"(of {n_rows})", str(bad))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000, help="random rows per measurement")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    cfg = config.preset("flash")
    rows = (rope_rows(cfg) + rms_rows(rng, a.rows) + q8_rows(rng, a.rows) + attention_rows(rng, min(a.rows, 200))
            + indexer_f16_rows(rng, a.rows) + topk_rows(rng, min(a.rows, 500)))
    print("| effect | measure | size |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
