"""Heavy operations of the NumPy reference engine, per numeric mode (the `--cache` axis).

The mode decides how the cache-eligible Q8_0 weights (attention projections and the shared
expert, as ds4's Q8->F16 cache) are multiplied:
  q8   activations quantized to Q8_0 per 32, integer dot products (ds4's dp4a decode kernels);
  f16  weights expanded to F16 (each d*q rounded to half, as the cache kernel does), float32 math;
  f32  weights expanded to float32, float32 math.
In every mode the output head stays on the q8 path (ds4 does not cache it by default), routed
experts use Q8_K activations with integer dots, and F16 weights (HC, router, compressor,
indexer) are multiplied in float32. Decoded weights are built lazily and kept, so each tensor
is expanded once per process.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import faults as FL
from . import formats as F
from .engine_api import Ops
from .gguf_io import ModelFile

CACHE_MODES = ("q8", "f16", "f32")
# Routed experts are computed in parallel threads (NumPy releases the GIL in the layout build and
# the matmuls; each expert writes its own rows) when a layer's call touches at least this many
# expert weights: a prefill on Flash shapes builds each touched expert's int_matmul layout, which
# is most of a flash-4l reference's time. The start-up expansion (`prepare`) is threaded past the
# same size. Small models stay serial; the results are the same bits either way.
PARALLEL_EXPERT_WEIGHTS = 1 << 26
EXPERT_THREADS = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# Q8_0 tensors the dequant cache covers (ds4-spec 6.3): attention projections and shared expert.
CACHE_ELIGIBLE = ("attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
                  "attn_output_b.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                  "ffn_down_shexp.weight")


def cache_eligible(name: str) -> bool:
    return name.split(".", 2)[-1] in CACHE_ELIGIBLE and name.startswith("blk.")


def check_cache_mode(cache: str) -> str:
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; choose one of {', '.join(CACHE_MODES)}")
    return cache


def _sub(W: F.IntWeights, idx) -> F.IntWeights:
    """Part of a decomposition: one expert (int) of [E, O, n], or a row range (slice) of [O, n]."""
    q = W.q[idx]
    return dataclasses.replace(W, q=q, sc=W.sc[idx], d=W.d[idx], shape=tuple(q.shape),
                               m=None if W.m is None else W.m[idx],
                               dmin=None if W.dmin is None else W.dmin[idx])


class RefOps(Ops):
    xp = np
    # Float reductions accumulate in float64 and round once to float32, so a row's result does
    # not depend on how many rows are computed together: chunked prefill equals token-by-token
    # decode and a batched sequence equals the same sequence alone, bit for bit.
    acc = np.float64
    faults = frozenset()                   # none unless __init__ is given some (faults.py)

    def __init__(self, model: ModelFile, cache: str = "f32", faults: frozenset = frozenset()):
        self.model, self.cfg = model, model.cfg
        self.cache = check_cache_mode(cache)
        self.faults = frozenset(faults)              # injected faults (faults.py); none by default
        if self.faults:
            self.topk_mask = functools.partial(RefOps.topk_mask, faults=self.faults)
        self._dense: dict[str, np.ndarray] = {}      # [O, n] expansions, held in float64
        self._int: dict[str, F.IntWeights] = {}      # integer decompositions
        self._param: dict[str, np.ndarray] = {}
        self.prepare()

    def prepare(self) -> None:
        """Expand every projection once up front, so no timed step pays for it (the GPU engine
        builds its dequant cache at start-up the same way). Tensors are independent: a large
        model expands them in threads (flash-4l's routed experts alone are 3,072 matrices)."""
        work, weights = [], 0
        for name, t in self.model.tensors.items():
            if t.qtype in (QT.Q8_0, QT.F16) and len(t.spec.shape) == 2 and t.spec.kind != "embedding":
                work.append(self.intw if self.path(name) == "q8" else self.dense)
            elif t.spec.kind == "experts":
                work.append(self.intw)
            else:
                continue
            work[-1] = functools.partial(work[-1], name)
            weights += math.prod(t.spec.shape)
        _each(lambda f: f(), work, weights)

    # -- weights ---------------------------------------------------------------------------------
    def param(self, name: str) -> np.ndarray:
        """A small tensor as float32 (norms, scales, bases, sinks, APE)."""
        p = self._param.get(name)
        if p is None:
            t = self.model[name]
            p = self._param[name] = np.asarray(t.data, dtype=np.float32)
        return p

    def param_opt(self, name: str):
        return self.param(name) if self.model.get(name) is not None else None

    def path(self, name: str) -> str:
        """How a projection is computed in this mode: 'q8', 'f16', 'f32' or 'float' (F16 weights)."""
        qt = self.model[name].qtype
        if qt == QT.F16:
            return "float"
        if qt != QT.Q8_0:
            raise TypeError(f"{name}: {qt.name} is not a projection type")
        return self.cache if cache_eligible(name) else "q8"

    def dense(self, name: str) -> np.ndarray:
        W = self._dense.get(name)
        if W is None:
            t = self.model[name]
            mode = self.path(name)
            if mode == "float":
                W = np.asarray(t.data, dtype=np.float64)
            elif mode == "f16":
                W = F.dequantize_q8_0_f16(t.data, t.spec.shape).astype(np.float64)
            else:
                W = F.dequantize(t.data, t.qtype, t.spec.shape).astype(np.float64)
            self._dense[name] = W
        return W

    def intw(self, name: str) -> F.IntWeights:
        W = self._int.get(name)
        if W is None:
            t = self.model[name]
            W = F.decompose(t.data, t.qtype, t.spec.shape)
            W = self._int[name] = _faulted(W, name, self.faults) if self.faults else W
        return W

    # -- projections -------------------------------------------------------------------------------
    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """x [N, in] -> [N, out] with the tensor `name` ([out, in])."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.path(name) == "q8":
            xq, xd = self._act_q8_0(x)
            return F.int_matmul(self.intw(name), xq, xd)
        return (x.astype(np.float64) @ self.dense(name).T).astype(np.float32)

    def linear_grouped(self, name: str, x: np.ndarray) -> np.ndarray:
        """Grouped projection: x [N, G, in_g]; group g uses output rows g*O..(g+1)*O. -> [N, G, O]."""
        N, G, _ = x.shape
        O = self.model[name].spec.shape[0] // G
        if self.path(name) == "q8":
            W = self.intw(name)
            xq, xd = self._act_q8_0(np.ascontiguousarray(x, dtype=np.float32))
            out = [F.int_matmul(_sub(W, slice(g * O, (g + 1) * O)), xq[:, g], xd[:, g]) for g in range(G)]
            return np.stack(out, axis=1)                                              # [N, G, O]
        W = self.dense(name).reshape(G, O, -1)                                        # [G, O, in_g]
        y = np.matmul(x.astype(np.float64).transpose(1, 0, 2), W.transpose(0, 2, 1))  # [G, N, O]
        return y.transpose(1, 0, 2).astype(np.float32)

    def _act_q8_0(self, x: np.ndarray):
        """Q8_0 activations of x [..., n]; with the fault q8-act-block, block b % 8 == 7 of each
        row is replaced by block b-1 (the matmul then reads the wrong activation block)."""
        xq, xd = F.quantize_act_q8_0(x)
        if "q8-act-block" in self.faults:
            e = FL.ACT_BLOCK_EVERY
            qb = xq.reshape(*xq.shape[:-1], -1, 32).copy()                        # [..., nb, 32]
            qb[..., e - 1::e, :] = qb[..., e - 2::e, :][..., :qb[..., e - 1::e, :].shape[-2], :]
            xd = xd.copy()
            xd[..., e - 1::e] = xd[..., e - 2::e][..., :xd[..., e - 1::e].shape[-1]]
            xq = qb.reshape(xq.shape)
        return xq, xd

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.model["token_embd.weight"].data[tokens], dtype=np.float32)   # [N, D]

    # -- simulated precision (part of the model in every mode) ----------------------------------
    def kv_round(self, x: np.ndarray) -> np.ndarray:
        """FP8 e4m3 round trip on the nope dims, then the whole row to F16 (stored KV rows)."""
        nope = self.cfg.n_nope
        out = np.array(x, dtype=np.float32, copy=True)
        out[..., :nope] = F.fp8_e4m3_roundtrip(out[..., :nope], trunc="fp8-kv-truncate" in self.faults)
        return F.round_f16(out)

    def indexer_round(self, x: np.ndarray) -> np.ndarray:
        """Hadamard rotation then FP4 e2m1 round trip (indexer queries and keys)."""
        return F.fp4_e2m1_roundtrip(F.hadamard(np.asarray(x, dtype=np.float32)))

    # -- routing ---------------------------------------------------------------------------------
    def tid2eid(self, il: int, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.model[f"blk.{il}.ffn_gate_tid2eid.weight"].data[tokens], dtype=np.int64)

    @staticmethod
    def topk_ids(score: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k largest scores per row, best first; ties go to the lower index."""
        return np.argsort(-score, axis=-1, kind="stable")[..., :k]

    @staticmethod
    def topk_mask(score: np.ndarray, visible: np.ndarray, k: int, faults=frozenset()) -> np.ndarray:
        """Mask of the k best visible entries per row (ties to the lower index, i.e. older rows);
        k-1 of them with the injected fault indexer-topk."""
        k = k - 1 if "indexer-topk" in faults else k
        s = np.where(visible, score, -np.inf)
        idx = np.argsort(-s, axis=-1, kind="stable")[..., :k]
        keep = np.zeros(visible.shape, dtype=bool)
        np.put_along_axis(keep, idx, True, axis=-1)
        return keep & visible

    # -- routed experts ----------------------------------------------------------------------------
    def experts(self, il: int, x: np.ndarray, sel: np.ndarray, w: np.ndarray) -> np.ndarray:
        """sum_a w[n,a] * down_e(clamped SwiGLU(gate_e x, up_e x)), e = sel[n, a]; x [N, D] -> [N, D].

        Activations are quantized to Q8_K once per token (x) and once per (token, expert) (mid);
        the router weight scales mid before the down projection, as ds4 does.
        """
        pre = f"blk.{il}."
        Wg, Wu, Wd = (self.intw(pre + n) for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight",
                                                     "ffn_down_exps.weight"))
        c = self.cfg.swiglu_clamp
        N, A = sel.shape
        if "moe-wrong-weight" in self.faults:
            w = np.roll(w, -1, axis=1)                     # slot a scaled by slot (a + 1) % A's weight
        xq, xd, xb = F.quantize_act_q8_k(np.ascontiguousarray(x, dtype=np.float32))
        y = np.zeros((N, A, x.shape[1]), dtype=np.float32)                             # [N, A, D]

        def expert(e):
            n, a = np.nonzero(sel == e)
            ge, ue, de = _sub(Wg, e), _sub(Wu, e), _sub(Wd, e)
            g = F.int_matmul(ge, xq[n], xd[n], xb[n])                                  # [n_e, F]
            u = F.int_matmul(ue, xq[n], xd[n], xb[n])                                  # [n_e, F]
            g = np.minimum(g, c)
            mid = (g / (1.0 + np.exp(-g))) * np.clip(u, -c, c) * w[n, a][:, None]      # [n_e, F]
            mq, md, mb = F.quantize_act_q8_k(mid.astype(np.float32))
            y[n, a] = F.int_matmul(de, mq, md, mb)                                     # [n_e, D]

        used = np.unique(sel)
        _each(expert, used, len(used) * sum(math.prod(W.shape[1:]) for W in (Wg, Wu, Wd)))
        out = y[:, 0].copy()
        for a in range(1, A):                                                          # fixed summation order
            out += y[:, a]
        return out



def _each(fn, items, weights: int) -> None:
    """fn(item) for every item: in up to EXPERT_THREADS threads when the work touches at least
    PARALLEL_EXPERT_WEIGHTS weights (each call writes its own output), else in order. Raises what
    a call raised."""
    if EXPERT_THREADS > 1 and len(items) > 1 and weights >= PARALLEL_EXPERT_WEIGHTS:
        with ThreadPoolExecutor(min(EXPERT_THREADS, len(items))) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _faulted(W: F.IntWeights, name: str, faults) -> F.IntWeights:
    """The decomposition the faulted kernels read (faults.py): wrong Q8_0 block scales, the
    IQ2_XXS parity sign dropped, Q2_K dmin read from d's bytes."""
    from gguf import GGMLQuantizationType as QT
    d, q, dmin = W.d, W.q, W.dmin
    if W.qtype == QT.Q8_0:
        if "q8-scale-drift" in faults:
            d = d * np.float32(FL.SCALE_DRIFT)                                    # exact in float32
        for f, e in (("q8-scale-subset", FL.SUBSET_EVERY), ("head-scale-subset", FL.HEAD_SUBSET_EVERY)):
            if FL.on(faults, f, name):
                d = d.copy()
                d[..., e - 1::e] = d[..., e - 2::e][..., :d[..., e - 1::e].shape[-1]]   # block b-1's scale
    elif W.qtype == QT.IQ2_XXS and "iq2-sign" in faults:
        q = q.copy()
        g = q.reshape(-1, 8)
        g[:, 7] = np.abs(g[:, 7])
    elif W.qtype == QT.Q2_K and "q2k-dmin" in faults:
        dmin = d.copy()
    return dataclasses.replace(W, d=d, q=q, dmin=dmin)     # new arrays: their own memo entries
