"""Heavy operations of the CuPy engine, per numeric mode; the GPU twin of `ops_ref.RefOps`.

Same modes as the reference (see ops_ref): cache-eligible Q8_0 tensors go through
  q8   Q8_0 activation quantization + dp4a kernels (kernels/q8_0.cu), for decode and token tiles;
  f16  the Q8_0->F16 dequant cache in device memory (built once, under a byte budget), read by
       a float-activation kernel (kernels/f16w.cu, as the F16 model tensors), so activations keep the precision of the NumPy f16 mode;
  f32  an F32 copy multiplied with cuBLAS through CuPy.
Tensors that do not fit the cache budget fall back to q8 and are listed in `fallbacks`.
HC mixing, RMS norms, RoPE, attention, the router, the compressor's pooling, the indexer scores
and the shared expert's clamped SwiGLU run as single kernels (hc.cu, norm_rope.cu, attention.cu,
router.cu, compress.cu, indexer.cu, swiglu.cu); DS4BENCH_UNFUSED=all (or a list, model.FUSABLE)
runs them as the model's array code instead.
Routed experts always stay quantized (kernels/moe.cu); the output head is always q8.
Weights are placed per `placement` (backend.Placer); caches and run state are device memory.
The q8 and F16-weight kernels form and sum their terms in double and round once, and the small
reductions in model code run in double, as the reference does; cuBLAS (f32 mode) accumulates in
float32. GPU and NumPy therefore agree almost bit for bit in q8 and f16, and to float32
rounding in f32.
"""
from __future__ import annotations

import functools
import math

import cupy as cp
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import kernels
from .backend import Placer
from .engine_api import Ops
from .faults import defines as fault_defines
from .gguf_io import ModelFile
from .ops_ref import cache_eligible, check_cache_mode
from .options import EngineOptions

ROWS_PER_BLOCK = 8                   # a block of 8 warps, a row each (q8_0.cu)
TOKEN_TILE = kernels.define("common.cuh", "TOKEN_TILE")
Q8W_THREADS = kernels.define("q8_0.cu", "Q8W_THREADS")     # the wide matvec's block (DS4BENCH_Q8_KERNEL=wide)
CACHE_RESERVE = 4 * 2 ** 30          # device memory left free when the cache budget is automatic
SMEM_DEFAULT_MAX = 48 * 1024         # dynamic shared memory a launch gets without opting in
# matmul_q8_0_fused quantizes the activations again in every block of rows: it beats the two
# launches while that redundant work, K x (row blocks), stays small, and loses beyond (H200,
# bench-kernels at 6324e4c: won at 0.26-1M, tied at 1M, lost 20-50% at 4M and 66M). Replayed
# from a graph the two launches time faster alone (9a7c7c5: 7.7 against 12.9 us on attn_q_a),
# but a captured step without the fused kernel decoded no faster (14ae248 against 9a7c7c5,
# results/runs/20261126-0456-h200-flash-4l-graph-nofuse-*), so the captured step fuses too.
FUSED_Q8_MAX_WORK = 1 << 20
# The wide matvec's CTAs are more (a CTA reads fewer rows), so the fused kernel's redundant
# quantization costs more per byte read. H100, bench-kernels at 2dfb77f (captured, fused against
# quantize + matmul): won at 0.13M (attn_output_a 4.7 against 5.3 us), lost at 0.5M (ffn_down_shexp
# 9.2 against 7.1) and at 1M (attn_q_a 11.1 against 5.3, attn_kv 10.2 against 4.5).
FUSED_Q8W_MAX_WORK = 1 << 18
ROUTE_MAX_USED = kernels.define("router.cu", "RT_MAX_USED")
HC_MAX_STREAMS = kernels.define("hc.cu", "HC_MAX_STREAMS")
TOPK_COUNT_MAX = 1 << 32             # comparisons above which an eager top-k sorts instead of ranking
SPLITK_BELOW_BLOCKS = 264            # F16-weight matmuls with fewer row blocks split K (2 per H100 SM)


def attend_smem(J: int) -> int:
    """attention.cu's dynamic shared memory for J key rows: their scores in double, then the
    block reduction's scratch."""
    return 8 * J + 256


def indexer_smem(J: int, I: int) -> int:
    """indexer.cu indexer_score's dynamic shared memory: J queries of I (rows padded by one),
    a key row per warp, J head weights."""
    return 4 * (J * (I + 1) + 8 * I + J)


def _index(a) -> cp.ndarray:
    """A host or device index array as contiguous int64 on the device."""
    if isinstance(a, cp.ndarray):
        return cp.ascontiguousarray(a, dtype=cp.int64)
    return cp.asarray(np.ascontiguousarray(a, dtype=np.int64))


def _grid(O: int, T: int) -> tuple[int, int]:
    return ((O + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, (T + TOKEN_TILE - 1) // TOKEN_TILE)


class GpuOps(Ops):
    xp = cp
    acc = cp.float64                  # as the reference: small reductions in double, rounded once
    faults = frozenset()              # none unless __init__ is given some (faults.py)

    def __init__(self, model: ModelFile, options: EngineOptions | None = None):
        options = options or EngineOptions(backend="cupy")
        self.model, self.cfg, self.options = model, model.cfg, options
        self.cache = check_cache_mode(options.mode)
        self.faults = options.faults        # injected faults (faults.py): their kernels' variants
        if self.faults:
            self.topk_mask = functools.partial(GpuOps.topk_mask, faults=self.faults)
        self.placement = options.placement or "device"
        off = set(options.unfused)                                            # kernels left as array code
        if self.cfg.hc_streams > HC_MAX_STREAMS or self.cfg.hc_sinkhorn_iters < 1:
            off.add("hc")                                                     # outside hc.cu's limits
        if self.cfg.n_expert_used > ROUTE_MAX_USED or 8 * self.cfg.n_expert > SMEM_DEFAULT_MAX:
            off.add("route")                                                  # outside router.cu's
        self.unfused = frozenset(off)
        self.q8_kernel, self.attn_kernel = options.q8_kernel, options.attn_kernel
        self.sms = kernels.sm_count()
        self.placer = Placer(self.placement, model.nbytes)
        self.w: dict[str, cp.ndarray] = {}
        expert_tensors = {}
        for name, t in model.tensors.items():
            arr = self.placer.put(np.asarray(t.data))
            self.w[name] = arr
            if t.spec.kind == "experts":
                expert_tensors[name] = (t.qtype, arr)
        from .moe_gpu import GpuExperts
        self.moe = GpuExperts(self.cfg, expert_tensors, fault_defines(self.faults, "moe.cu"))
        self._param: dict[str, cp.ndarray] = {}
        self._cached: dict[str, cp.ndarray] = {}
        self._pos: dict[bytes, cp.ndarray] = {}           # recent RoPE position arrays on the device
        self.fallbacks: list[str] = []
        self.cache_bytes = 0
        if self.cache != "q8":
            self._build_cache(options.cache_mb)

    # -- the dequant cache -------------------------------------------------------------------------
    def _build_cache(self, budget_mb: int | None) -> None:
        free, _ = cp.cuda.runtime.memGetInfo()
        budget = budget_mb * 2 ** 20 if budget_mb is not None else max(0, free - CACHE_RESERVE)
        itemsize = 2 if self.cache == "f16" else 4
        fn = kernels.function("q8_0.cu", "dequant_q8_0_f16" if self.cache == "f16" else "dequant_q8_0_f32")
        for name, t in self.model.tensors.items():
            if t.qtype != QT.Q8_0 or not cache_eligible(name):
                continue
            n = int(np.prod(t.spec.shape))
            if self.cache_bytes + n * itemsize > budget:
                self.fallbacks.append(name)
                continue
            out = cp.empty(t.spec.shape, dtype=cp.float16 if itemsize == 2 else cp.float32)
            fn(((n + 255) // 256,), (256,), (self.w[name], out, np.int64(n)))
            self._cached[name] = out
            self.cache_bytes += n * itemsize

    # -- weights -------------------------------------------------------------------------------------
    def param(self, name: str) -> cp.ndarray:
        p = self._param.get(name)
        if p is None:
            p = self._param[name] = self.w[name].astype(cp.float32)
        return p

    def param_opt(self, name: str):
        return self.param(name) if name in self.w else None

    def path(self, name: str) -> str:
        qt = self.model[name].qtype
        if qt == QT.F16:
            return "float"
        if cache_eligible(name) and name in self._cached:
            return self.cache
        return "q8"

    def _fn(self, filename: str, name: str, tensor: str | None = None):
        """A kernel of kernels/`filename`, compiled with the injected faults that live there (the
        healthy module when none is active)."""
        return kernels.function(filename, name, fault_defines(self.faults, filename, tensor))

    # -- projections -----------------------------------------------------------------------------------
    def _q8(self, name: str, x: cp.ndarray, O: int, K: int, rows_per_group: int) -> cp.ndarray:
        """x [N, G*K] -> [N, O] with Q8_0 weights; groups of rows read their K-slice of x.
        One launch with the quantization fused in where the token tile's quantized activations
        fit shared memory and the blocks' repeated quantization is cheap (FUSED_Q8_MAX_WORK,
        FUSED_Q8W_MAX_WORK for the wide matvec),
        else quantize_q8_0 then the matmul (the same bits either way). The matmul is
        matmul_q8_0, or with DS4BENCH_Q8_KERNEL=wide and at most TOKEN_TILE tokens
        matmul_q8_0_wide_<N> (the reference's result too; S = 32 threads a row gives
        matmul_q8_0's bits)."""
        N, stride = x.shape
        smem = min(N, TOKEN_TILE) * (K + K // 8)
        if self.q8_kernel == "wide" and 0 < N <= TOKEN_TILE:
            S = kernels.q8_wide_split(O, K // 32, self.sms)
            rows, block = Q8W_THREADS // S, (Q8W_THREADS,)
            plain, fused = f"matmul_q8_0_wide_{N}", f"matmul_q8_0_wide_fused_{N}"
            tail = (np.int32(O), np.int32(K), np.int32(rows_per_group), np.int32(stride), np.int32(S))
            grid = (-(-O // rows),)
            static = 8 * N * Q8W_THREADS // 32             # q8w_rows' static `red`: a double a warp and token
            max_work = FUSED_Q8W_MAX_WORK
        else:
            rows, block = ROWS_PER_BLOCK, (256,)
            plain, fused = "matmul_q8_0", "matmul_q8_0_fused"
            tail = (np.int32(O), np.int32(K), np.int32(N), np.int32(rows_per_group), np.int32(stride))
            grid, static, max_work = _grid(O, N), 0, FUSED_Q8_MAX_WORK
        fuse = smem + static <= SMEM_DEFAULT_MAX and K * grid[0] <= max_work   # grid[0]: blocks of rows
        y = cp.empty((N, O), dtype=cp.float32)
        if fuse and rows_per_group % rows == 0 and "q8quant" not in self.unfused:
            self._fn("q8_0.cu", fused, name)(grid, block, (self.w[name], x, y) + tail, shared_mem=smem)
            return y
        xq = cp.empty((N, stride), dtype=cp.int8)
        xd = cp.empty((N, stride // 32), dtype=cp.float32)
        kernels.function("q8_0.cu", "quantize_q8_0")((stride // 32, N), (32,), (x, xq, xd, np.int32(stride)))
        self._fn("q8_0.cu", plain, name)(grid, block, (self.w[name], xq, xd, y) + tail)
        return y

    def _f16w(self, W: cp.ndarray, x: cp.ndarray, O: int, K: int, rows_per_group: int) -> cp.ndarray:
        """F16 weights x float activations. A warp per row leaves most of the GPU idle when the
        rows are few (the HC mixers have 24): then a block per row splits K instead."""
        N, stride = x.shape
        y = cp.empty((N, O), dtype=cp.float32)
        grid = _grid(O, N)
        if grid[0] * grid[1] < SPLITK_BELOW_BLOCKS:
            fn, grid = kernels.function("f16w.cu", "matmul_f16w_splitk"), (O, grid[1])
        else:
            fn = kernels.function("f16w.cu", "matmul_f16w")
        fn(grid, (256,), (W, x, y, np.int32(O), np.int32(K), np.int32(N), np.int32(rows_per_group), np.int32(stride)))
        return y

    def linear(self, name: str, x: cp.ndarray) -> cp.ndarray:
        """x [N, in] -> [N, out]."""
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        O, K = self.model[name].spec.shape
        mode = self.path(name)
        if mode == "q8":
            return self._q8(name, x, O, K, O)
        if mode == "float":
            return self._f16w(self.w[name], x, O, K, O)
        if mode == "f16":
            return self._f16w(self._cached[name], x, O, K, O)
        return x @ self._cached[name].T                                               # cuBLAS SGEMM

    def linear_grouped(self, name: str, x: cp.ndarray) -> cp.ndarray:
        """x [N, G, in_g] -> [N, G, O]; group g uses output rows g*O..(g+1)*O."""
        N, G, K = x.shape
        Ot = self.model[name].spec.shape[0]
        O = Ot // G
        flat = cp.ascontiguousarray(x.reshape(N, G * K), dtype=cp.float32)
        mode = self.path(name)
        if mode == "q8":
            return self._q8(name, flat, Ot, K, O).reshape(N, G, O)
        if mode == "f16":
            return self._f16w(self._cached[name], flat, Ot, K, O).reshape(N, G, O)
        W = self._cached[name].reshape(G, O, K)
        return cp.matmul(x.transpose(1, 0, 2).astype(cp.float32), W.transpose(0, 2, 1)).transpose(1, 0, 2)

    def embed(self, tokens) -> cp.ndarray:
        return self.w["token_embd.weight"][cp.asarray(tokens)].astype(cp.float32)     # [N, D]

    # -- hyper-connection mixing (kernels/hc.cu) ----------------------------------------------------
    def hc_weights(self, mix: cp.ndarray, s: cp.ndarray, b: cp.ndarray):
        """mix [N, S*(S+2)] -> pre [N, S], post [N, S], comb [N, S, S], as model.hc_weights."""
        S, N = self.cfg.hc_streams, mix.shape[0]
        pre, post = cp.empty((N, S), cp.float32), cp.empty((N, S), cp.float32)
        comb = cp.empty((N, S, S), cp.float32)
        self._fn("hc.cu", "hc_weights")(((N + 127) // 128,), (128,), (
            cp.ascontiguousarray(mix, dtype=cp.float32), s, b, pre, post, comb, np.int32(N), np.int32(S),
            np.int32(self.cfg.hc_sinkhorn_iters), np.float32(self.cfg.hc_eps)))
        return pre, post, comb

    def hc_collapse(self, X: cp.ndarray, pre: cp.ndarray) -> cp.ndarray:
        """x [N, D] = sum_s pre[n, s] X[n, s], in double, rounded once."""
        N, S, D = X.shape
        x = cp.empty((N, D), cp.float32)
        kernels.function("hc.cu", "hc_collapse")(((D + 255) // 256, N), (256,), (
            cp.ascontiguousarray(X, dtype=cp.float32), pre, x, np.int32(N), np.int32(S), np.int32(D)))
        return x

    def hc_expand(self, X: cp.ndarray, y: cp.ndarray, post: cp.ndarray, comb: cp.ndarray) -> cp.ndarray:
        """X' [N, S, D]: stream t = post[t] y + sum_s comb[s, t] X[s]."""
        N, S, D = X.shape
        out = cp.empty((N, S, D), cp.float32)
        kernels.function("hc.cu", "hc_expand")(((D + 255) // 256, N), (256,), (
            cp.ascontiguousarray(X, dtype=cp.float32), cp.ascontiguousarray(y, dtype=cp.float32),
            cp.ascontiguousarray(post, dtype=cp.float32), cp.ascontiguousarray(comb, dtype=cp.float32),
            out, np.int32(N), np.int32(S), np.int32(D)))
        return out

    # -- norms, RoPE, attention (kernels/norm_rope.cu, kernels/attention.cu) -------------------------
    def rms_norm(self, x: cp.ndarray, weight, eps: float) -> cp.ndarray:
        """model.rms_norm over the last axis in one launch (squares summed in double, as ds4)."""
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        n = x.shape[-1]
        y = cp.empty_like(x)
        rows = x.size // n
        if rows:
            w = x if weight is None else cp.ascontiguousarray(weight, dtype=cp.float32)
            kernels.function("norm_rope.cu", "rms_norm")((rows,), (256,), (
                x, w, y, np.int32(n), np.float32(eps), np.int32(weight is not None)))
        return y

    def rope(self, x: cp.ndarray, pos, freq, inverse: bool = False) -> cp.ndarray:
        """model.rope in one launch: ds4's float32 angles (model.RopeFreq) and their cos/sin
        computed on the device from the positions (host positions: one small copy in; device
        positions, as in a captured decode step: read where they are) instead of host tables."""
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        K = x.shape[-1]
        rows = x.size // K
        y = cp.empty_like(x)
        if rows:
            p, pdiv = self._rope_positions(pos, x.shape[:-1])
            f = np.float32
            kernels.function("norm_rope.cu", "rope")((rows,), (64,), (
                x, y, p, np.int32(K), np.int32(freq.npair), f(freq.theta_scale), f(freq.freq_scale),
                np.int32(freq.yarn), f(freq.corr_lo), f(freq.corr_hi), f(freq.mscale),
                f(-1.0 if inverse else 1.0), np.int32(pdiv)))
        return y

    def _rope_positions(self, pos, lead: tuple):
        """(positions on the device, rows per position) for rows of shape `lead` that `pos`
        broadcasts to (NumPy's rules). Device positions of `lead`'s rank whose shape is `lead`
        with trailing ones ([N, 1] for [N, H] rows: one per token, shared by its heads) are used
        in place; anything else is broadcast into one position per row."""
        if isinstance(pos, cp.ndarray):
            shape = pos.shape
            k = len(shape)
            while k and shape[k - 1] == 1:
                k -= 1
            if (len(shape) == len(lead) and tuple(lead[:k]) == shape[:k] and pos.dtype == cp.int64
                    and pos.flags.c_contiguous):
                return pos, int(np.prod(lead[k:], dtype=np.int64))
        return self._positions_per_row(pos, lead), 1

    def _positions_per_row(self, pos, lead: tuple) -> cp.ndarray:
        """One device position per row of shape `lead` that `pos` (host or device) broadcasts to:
        what kernels that index positions by row read."""
        if isinstance(pos, cp.ndarray):
            return cp.ascontiguousarray(cp.broadcast_to(pos.astype(cp.int64, copy=False), lead)).reshape(-1)
        return self._positions(np.ascontiguousarray(np.broadcast_to(np.asarray(pos, dtype=np.int64), lead).reshape(-1)))

    def _positions(self, p: np.ndarray) -> cp.ndarray:
        """Per-row positions on the device, kept by content for the few arrays a step repeats
        (every layer ropes its queries, keys and outputs at the same positions): one copy in
        each per step instead of one per call."""
        key = p.tobytes()
        d = self._pos.get(key)
        if d is None:
            if len(self._pos) >= 32:
                self._pos.pop(next(iter(self._pos)))
            d = self._pos[key] = cp.asarray(p)
        return d

    def attend(self, q: cp.ndarray, keys: cp.ndarray, mask: cp.ndarray, sinks: cp.ndarray) -> cp.ndarray:
        """model.attend in one launch per step; array code when the scores do not fit shared memory."""
        B, T, H, K = q.shape
        J = keys.shape[1]
        smem = attend_smem(J)
        if smem > SMEM_DEFAULT_MAX:
            from .model import attend
            if "attn-sink-dropped" in self.faults:             # the kernel's injected fault, as array code
                sinks = cp.full_like(sinks, -cp.inf)
            return attend(cp, self.acc, q, keys, mask, sinks)
        o = cp.empty((B, T, H, K), cp.float32)
        m = cp.ascontiguousarray(mask, dtype=cp.bool_).view(cp.uint8)
        self._fn("attention.cu", "attend_sink")((H, T, B), (256,), (
            cp.ascontiguousarray(q, dtype=cp.float32), cp.ascontiguousarray(keys, dtype=cp.float32), m,
            cp.ascontiguousarray(sinks, dtype=cp.float32), o, np.int32(T), np.int32(H), np.int32(J), np.int32(K),
            np.float64(1.0 / math.sqrt(K))), shared_mem=smem)
        return o

    def attend_ring(self, q: cp.ndarray, raw: cp.ndarray, kv: cp.ndarray, comp, visible, P,
                    sinks: cp.ndarray, ratio: int = 0, static: bool = False):
        """The attention of model.attention read in place (DS4BENCH_ATTN_KERNEL=ring, and always
        in a static decode step): the window ring raw [B, W, K], this call's rows kv [B, T, K]
        and the compressed rows comp [B, Cs, K] seen through visible [B, T, C] (None: no
        compressed rows yet), the raw rows' visibility and each token's compressed-row count
        ((p + 1) // ratio) derived on the device from the positions P [B, T] (host or device).
        The same bits as gathering the keys, concatenating them and calling `attend`; None where
        it does not apply (the default variant outside a static step, or scores too long for
        shared memory): the caller does that."""
        B, T, H, K = q.shape
        W = raw.shape[1]
        C = 0 if visible is None else visible.shape[-1]
        smem = attend_smem(W + T + C)
        if (self.attn_kernel != "ring" and not static) or smem > SMEM_DEFAULT_MAX:
            return None
        for a in (raw, comp) if C else (raw,):                # the kernel takes their pointers as they are
            assert a.shape[0] == B and a.dtype == cp.float32 and a.flags.c_contiguous, "run state layout"
        o = cp.empty((B, T, H, K), cp.float32)
        cmask = raw if C == 0 else cp.ascontiguousarray(visible, dtype=cp.bool_).view(cp.uint8)
        comp = raw if C == 0 else comp                     # neither is read without compressed rows
        self._fn("attention.cu", "attend_sink_ring")((H, T, B), (256,), (
            cp.ascontiguousarray(q, dtype=cp.float32), raw, cp.ascontiguousarray(kv, dtype=cp.float32), comp,
            cmask, self._positions_per_row(P, (B, T)),
            cp.ascontiguousarray(sinks, dtype=cp.float32), o, np.int32(T), np.int32(H), np.int32(W),
            np.int32(C), np.int32(comp.shape[1]), np.int32(K), np.float64(1.0 / math.sqrt(K)), np.int32(ratio)),
            shared_mem=smem)
        return o

    def route(self, logits: cp.ndarray, sel, bias):
        """model.route_weights in one launch (kernels/router.cu): (sel [N, A] int64, w [N, A])."""
        cfg = self.cfg
        N, E = logits.shape
        A = cfg.n_expert_used
        out_sel = cp.empty((N, A), cp.int64)
        w = cp.empty((N, A), cp.float32)
        if N:
            logits = cp.ascontiguousarray(logits, dtype=cp.float32)
            kernels.function("router.cu", "route_topk")((N,), (256,), (
                logits, logits if bias is None else cp.ascontiguousarray(bias, dtype=cp.float32),
                out_sel if sel is None else cp.ascontiguousarray(sel, dtype=cp.int64), out_sel, w,
                np.int32(E), np.int32(A), np.int32(bias is not None), np.int32(sel is not None),
                np.int32(cfg.expert_weights_norm), np.float32(cfg.route_score_floor),
                np.float32(cfg.expert_weights_scale)), shared_mem=8 * E)
        return out_sel, w

    def pool_windows(self, ring_k, ring_s, ck, cs, P, eb, et, ratio: int, width: int) -> cp.ndarray:
        """model.DS4Model.pool_windows in one launch (kernels/compress.cu): candidates read in
        place from the ring and the new rows."""
        B, L, w = ring_k.shape
        T = ck.shape[1]
        out = cp.empty((len(eb), width), cp.float32)
        self._fn("compress.cu", "compress_pool")(((width + 127) // 128, len(eb)), (128,), (
            cp.ascontiguousarray(ring_k, dtype=cp.float32), cp.ascontiguousarray(ring_s, dtype=cp.float32),
            cp.ascontiguousarray(ck, dtype=cp.float32), cp.ascontiguousarray(cs, dtype=cp.float32),
            _index(eb), _index(et), _index(P[:, 0]), out,
            np.int32(L), np.int32(T), np.int32(w), np.int32(ratio), np.int32(width)))
        return out

    def indexer_scores(self, iq: cp.ndarray, ik: cp.ndarray, wt: cp.ndarray, pos=None, ratio: int = 4,
                       min_rows: int = 0) -> cp.ndarray:
        """model.indexer_scores in one launch (kernels/indexer.cu) where the queries fit shared
        memory; iq [B, T, J, I], ik [B, C, I] (may be a slice), wt [B, T, J] -> [B, T, C] double.
        With positions `pos` [B, T] (a static decode step), a token's rows past its count
        (p + 1) // ratio, and all its rows when that count is at most min_rows, are -inf, not
        computed."""
        B, T, J, I = iq.shape
        C = ik.shape[1]
        smem = indexer_smem(J, I)
        if smem > SMEM_DEFAULT_MAX or ik.strides[1:] != (4 * I, 4) or ik.dtype != cp.float32:
            from .model import indexer_scores
            return indexer_scores(cp, self.acc, iq, ik, wt)
        score = cp.empty((B, T, C), cp.float64)
        if C:
            p = score if pos is None else self._positions_per_row(pos, (B, T))    # not read without pos
            kernels.function("indexer.cu", "indexer_score")((T, B), (256,), (
                cp.ascontiguousarray(iq, dtype=cp.float32), ik, cp.ascontiguousarray(wt, dtype=cp.float32), score,
                np.int32(T), np.int32(J), np.int32(I), np.int32(C), np.int64(ik.strides[0] // 4),
                p, np.int32(pos is not None), np.int32(ratio), np.int32(min_rows)), shared_mem=smem)
        return score

    def swiglu_clamped(self, g: cp.ndarray, u: cp.ndarray, c: float) -> cp.ndarray:
        """model.swiglu_clamped in one launch (kernels/swiglu.cu)."""
        g = cp.ascontiguousarray(g, dtype=cp.float32)
        out = cp.empty_like(g)
        n = g.size
        if n:
            kernels.function("swiglu.cu", "swiglu_clamped")(((n + 255) // 256,), (256,), (
                g, cp.ascontiguousarray(u, dtype=cp.float32), out, np.int64(n), np.float32(c)))
        return out

    # -- simulated precision ----------------------------------------------------------------------------
    def kv_round(self, x: cp.ndarray) -> cp.ndarray:
        K, nope = self.cfg.head_dim, self.cfg.n_nope
        out = cp.array(x, dtype=cp.float32, copy=True, order="C")
        rows = out.size // K
        if rows:
            self._fn("lowprec.cu", "kv_round")((nope // 64 + 1, rows), (64,), (out, np.int32(K), np.int32(nope)))
        return out

    def indexer_round(self, x: cp.ndarray) -> cp.ndarray:
        n = x.shape[-1]
        out = cp.array(x, dtype=cp.float32, copy=True, order="C")
        rows = out.size // n
        if rows:
            kernels.function("lowprec.cu", "indexer_round")(
                (rows,), (n,), (out, np.int32(n), np.float32(1 / math.sqrt(n))), shared_mem=4 * n)
        return out

    # -- routing ------------------------------------------------------------------------------------------
    def tid2eid(self, il: int, tokens) -> cp.ndarray:
        return self.w[f"blk.{il}.ffn_gate_tid2eid.weight"][cp.asarray(tokens)].astype(cp.int64)

    @staticmethod
    def topk_ids(score: cp.ndarray, k: int) -> cp.ndarray:
        """k best per row, best first; ties to the lower index (CuPy's sort is stable)."""
        return cp.argsort(-score, axis=-1)[..., :k]

    @staticmethod
    def topk_mask(score: cp.ndarray, visible: cp.ndarray, k: int, faults=frozenset()) -> cp.ndarray:
        """As RefOps.topk_mask (a stable sort per row, the k best visible entries marked): ranked
        by counting in one launch (kernels/indexer.cu topk_keep) where a row's scores fit shared
        memory, else with a sort."""
        C = score.shape[-1]
        R = visible.size // C if C else 0
        # ranking by counting costs up to C comparisons per entry: a long eager prefill chunk
        # sorts instead (the same result); a step being captured cannot sort
        many = R * C * C > TOPK_COUNT_MAX and not cp.cuda.get_current_stream().is_capturing()
        if 8 * C > SMEM_DEFAULT_MAX or many:
            if "indexer-topk" in faults:                       # topk_keep's injected fault, as array code
                k -= 1
            s = cp.where(visible, score, -cp.inf).reshape(-1, C)
            idx = cp.argsort(-s, axis=-1)[:, :k]
            keep = cp.zeros(s.shape, dtype=cp.bool_)
            keep[cp.arange(s.shape[0])[:, None], idx] = True
            return keep.reshape(visible.shape) & visible
        keep = cp.empty(visible.shape, dtype=cp.bool_)
        if R:
            kernels.function("indexer.cu", "topk_keep", fault_defines(faults, "indexer.cu"))((R,), (256,), (
                cp.ascontiguousarray(score, dtype=cp.float64), cp.ascontiguousarray(visible, dtype=cp.bool_).view(cp.uint8),
                keep.view(cp.uint8), np.int32(C), np.int32(k)), shared_mem=8 * C)
        return keep

    def experts(self, il: int, x: cp.ndarray, sel: cp.ndarray, w: cp.ndarray) -> cp.ndarray:
        return self.moe(il, cp.ascontiguousarray(x, dtype=cp.float32), sel, cp.ascontiguousarray(w, dtype=cp.float32))

    # -- run state and sync ---------------------------------------------------------------------------------
    @staticmethod
    def alloc(shape) -> cp.ndarray:
        return cp.zeros(shape, dtype=cp.float32)

    @staticmethod
    def sync() -> None:
        cp.cuda.get_current_stream().synchronize()

    def memory(self) -> dict:
        pool = cp.get_default_memory_pool()
        return {"placement": self.placement, "weights_bytes": self.placer.placed_bytes,
                "cache_bytes": self.cache_bytes, "cache_fallbacks": list(self.fallbacks),
                "pool_used_bytes": int(pool.used_bytes()), "pool_total_bytes": int(pool.total_bytes())}
