"""Launch one decode kernel at DS4 Flash shapes a few times, for Nsight Compute to profile (the
profile says what bounds it; bench-kernels says how fast it is). benchmarks/gpu_ncu.sh runs it
under ncu.

    python -m benchmarks.ncu_probe moe|q8_head|q8_qb|attention
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=("moe", "q8_head", "q8_qb", "attention"))
    ap.add_argument("--launches", type=int, default=3)
    a = ap.parse_args()
    import cupy as cp
    from gguf import GGMLQuantizationType as QT

    from ds4bench.engine import config as C
    from ds4bench.engine import kernels
    from ds4bench.engine.formats import quantize_q8_0, random_blocks
    rng = np.random.default_rng(0)
    cfg = C.preset("flash")
    if a.kernel == "moe":
        from ds4bench.engine.moe_gpu import GpuExperts
        E, F, D, A = cfg.n_expert, cfg.expert_ff, cfg.n_embd, cfg.n_expert_used
        tens = {f"blk.0.ffn_{nm}_exps.weight": (qt, cp.asarray(random_blocks(qt, shape, rng, 0.02)))
                for nm, qt, shape in (("gate", QT.IQ2_XXS, (E, F, D)), ("up", QT.IQ2_XXS, (E, F, D)),
                                      ("down", QT.Q2_K, (E, D, F)))}
        moe = GpuExperts(cfg, tens)
        x = cp.asarray(rng.standard_normal((1, D)).astype(np.float32))
        sel = cp.asarray(rng.choice(E, A, replace=False)[None, :])
        w = cp.full((1, A), 0.25, cp.float32)
        run = lambda: moe(0, x, sel, w)
    elif a.kernel in ("q8_head", "q8_qb"):
        O, K = (cfg.n_vocab, cfg.n_embd) if a.kernel == "q8_head" else (32768, 1024)
        W = cp.asarray(quantize_q8_0((rng.standard_normal((O, K)) * 0.02).astype(np.float32)))
        x = cp.asarray(rng.standard_normal((1, K)).astype(np.float32))
        xq, xd, y = cp.empty((1, K), cp.int8), cp.empty((1, K // 32), cp.float32), cp.empty((1, O), cp.float32)
        kernels.function("q8_0.cu", "quantize_q8_0")((K // 32, 1), (32,), (x, xq, xd, np.int32(K)))
        mm = kernels.function("q8_0.cu", "matmul_q8_0")
        run = lambda: mm(((O + 7) // 8, 1), (256,), (W, xq, xd, y, np.int32(O), np.int32(K), np.int32(1),
                                                      np.int32(O), np.int32(K)))
    else:
        from ds4bench.engine.ops_gpu import GpuOps
        ops = GpuOps.__new__(GpuOps)
        ops.cfg, ops._freq, ops._pos, ops.attn_kernel = cfg, {}, {}, "ring"
        H, K, W, Cs = cfg.n_head, cfg.head_dim, cfg.sliding_window, 1025
        q = cp.asarray(rng.standard_normal((1, 1, H, K)).astype(np.float32))
        raw = cp.asarray(rng.standard_normal((1, W, K)).astype(np.float32))
        kv = cp.asarray(rng.standard_normal((1, 1, K)).astype(np.float32))
        comp = cp.asarray(rng.standard_normal((1, Cs, K)).astype(np.float32))
        vis = cp.ones((1, 1, Cs), cp.bool_)
        P = cp.asarray(np.array([[600]]))
        sinks = cp.asarray(rng.standard_normal(H).astype(np.float32))
        run = lambda: ops.attend_ring(q, raw, kv, comp, vis, P, sinks, 4, True)
    for _ in range(a.launches):
        run()
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
