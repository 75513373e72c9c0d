"""Routed experts on the GPU (kernels/moe.cu): the CUDA twin of `ops_ref.RefOps.experts`.

Per layer: x → Q8_K (`q8k_quantize`) → gate/up dots, clamped SwiGLU and router weight in one
kernel → Q8_K(mid) → down dots summed over the A selected experts in slot order. The weights stay
in their GGUF blocks (IQ2_XXS, Q2_K or Q4_K, any of them for gate/up or down). The integer dots
and their float64 block sums follow formats.int_matmul's order, so gate, up and down come out as
the reference computes them; only expf against NumPy's float32 exp can differ (by an ulp), which
reaches the output through an occasional ±1 in Q8_K(mid).
Legend: N tokens, A selected experts, P = N·A (token, slot) pairs, E experts, F expert hidden
size, D model dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import kernels
from .config import ModelConfig
from .formats import FORMATS, row_bytes

SRC = "moe.cu"
QK_K = 256
WARPS = 8                                      # output rows per CTA, one warp each
# Kernel name suffix per weight format; moe.cu defines moe_gate_up_<s> and moe_down_<s> for each.
KERNEL_SUFFIX = {QT.IQ2_XXS: "iq2_xxs", QT.Q2_K: "q2_k", QT.Q4_K: "q4_k"}
_i32 = np.int32


def iq2xxs_tables() -> np.ndarray:
    """GGML's IQ2_XXS grid (256 × 8 magnitudes in {8, 25, 43}) then ksigns (128 sign masks):
    uint8 [2176], the layout moe.cu stages in shared memory."""
    from gguf.quants import IQ2_XXS
    IQ2_XXS.init_grid()
    grid = IQ2_XXS.grid.reshape(256, 8).astype(np.uint8)                          # [256, 8]
    ksigns = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)                        # [128]
    return np.concatenate([grid.reshape(-1), ksigns])


def empty(shape, dtype, poison: bool = False) -> cp.ndarray:
    """cp.empty, or filled with 0xFF bytes (NaN for float32, −1 for integers) so that elements a
    kernel forgets to write show in a parity test."""
    a = cp.empty(shape, dtype)
    if poison:
        a.view(cp.uint8).fill(0xFF)
    return a


def q8k_quantize(x: cp.ndarray, poison: bool = False):
    """x f32 [R, n] -> (q int8 [R, n], d f32 [R, n/256], bsums int32 [R, n/16]), exactly as
    formats.quantize_act_q8_k. One CTA of 256 threads per 256-block."""
    R, n = x.shape
    if n % QK_K:
        raise ValueError(f"q8k_quantize: row length {n} is not a multiple of {QK_K}")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    q = empty((R, n), cp.int8, poison)
    d = empty((R, n // QK_K), cp.float32, poison)
    bsums = empty((R, n // 16), cp.int32, poison)
    if R:
        kernels.function(SRC, "q8k_quantize")((R * (n // QK_K),), (QK_K,),
                                              (x, q, d, bsums, _i32(R), _i32(n)))
    return q, d, bsums


@dataclass(frozen=True)
class _Layer:
    gate: cp.ndarray             # uint8, E·F rows of D/256 blocks
    up: cp.ndarray
    down: cp.ndarray             # uint8, E·D rows of F/256 blocks
    gate_type: QT
    down_type: QT


class GpuExperts:
    """Routed experts of every layer whose three `ffn_*_exps` tensors are given.

    `tensors` maps a tensor name to (qtype, cupy uint8 array of its raw GGUF bytes, contiguous);
    the arrays are used in place (never copied). Set `poison` to fill scratch and outputs with NaN
    bytes before the kernels run (tests)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, defines: tuple = ()):
        self.cfg = cfg
        self.defines = tuple(defines)        # -D options of injected faults (faults.defines)
        self.E, self.F, self.D = cfg.n_expert, cfg.expert_ff, cfg.n_embd
        self.clamp = np.float32(cfg.swiglu_clamp)
        self.poison = False
        self.layers: dict[int, _Layer] = {}
        for il in range(cfg.n_layer):
            names = [f"blk.{il}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
            if not any(n in tensors for n in names):
                continue
            g, u, d = (self._check(n, tensors, rows=rows, n_in=n_in) for n, rows, n_in in
                       zip(names, (self.F, self.F, self.D), (self.D, self.D, self.F)))
            if g[0] != u[0]:
                raise ValueError(f"{names[1]}: gate and up must share a type, found "
                                 f"{FORMATS[g[0]].name} and {FORMATS[u[0]].name}")
            self.layers[il] = _Layer(g[1], u[1], d[1], g[0], d[0])
        needs_tables = any(QT.IQ2_XXS in (L.gate_type, L.down_type) for L in self.layers.values())
        # Every kernel takes the table pointer; only the IQ2_XXS ones read it.
        self.tables = cp.asarray(iq2xxs_tables()) if needs_tables else cp.zeros(1, cp.uint8)

    def _check(self, name: str, tensors: dict, rows: int, n_in: int):
        """(qtype, flat uint8 array) of an expert tensor [E, rows, n_in], or a one-line error."""
        if name not in tensors:
            raise KeyError(f"tensor {name} is missing: the routed experts of a layer need "
                           f"ffn_gate_exps, ffn_up_exps and ffn_down_exps")
        qtype, arr = tensors[name]
        qtype = QT(qtype)
        shape = [self.E, rows, n_in]
        if qtype not in KERNEL_SUFFIX:
            raise TypeError(f"tensor {name}: expected IQ2_XXS, Q2_K or Q4_K {shape}, found "
                            f"{getattr(qtype, 'name', qtype)}")
        want = self.E * rows * row_bytes(qtype, n_in)
        if arr.dtype != cp.uint8 or arr.size != want or not arr.flags.c_contiguous:
            raise ValueError(f"tensor {name}: expected {want} contiguous uint8 bytes of "
                             f"{FORMATS[qtype].name} {shape}, found {arr.size} {arr.dtype} "
                             f"(contiguous: {arr.flags.c_contiguous})")
        if arr.data.ptr % 16:                 # the kernels read blocks with 2- to 8-byte loads
            raise ValueError(f"tensor {name}: its device address is not 16-byte aligned")
        return qtype, arr.reshape(-1)

    def __call__(self, il: int, x: cp.ndarray, sel: cp.ndarray, w: cp.ndarray) -> cp.ndarray:
        """Σ_a w[n,a]·down_e(clamped SwiGLU(gate_e x, up_e x)), e = sel[n, a]: x f32 [N, D],
        sel int [N, A], w f32 [N, A] -> f32 [N, D]."""
        if il not in self.layers:
            raise KeyError(f"layer {il} has no routed-expert tensors on the GPU "
                           f"(loaded: {sorted(self.layers)})")
        N, A = sel.shape
        if x.shape != (N, self.D) or w.shape != (N, A):
            raise ValueError(f"experts: x {list(x.shape)}, sel {list(sel.shape)}, w {list(w.shape)}; "
                             f"expected x [N, {self.D}] and sel, w [N, A]")
        sel = cp.ascontiguousarray(sel, dtype=cp.int32)
        w = cp.ascontiguousarray(w, dtype=cp.float32)
        xq, xd, xb = q8k_quantize(x, self.poison)                                # [N, D] ...
        mid = self.gate_up(il, xq, xd, xb, sel, w)                                # [N·A, F]
        mq, md, mb = q8k_quantize(mid, self.poison)                               # [N·A, F] ...
        return self.down(il, mq, md, mb, sel)                                     # [N, D]

    def gate_up(self, il, xq, xd, xb, sel, w) -> cp.ndarray:
        """mid f32 [N·A, F] = (min(g, c)·σ(min(g, c)))·clip(u, ±c)·w for every (token, slot), from
        Q8_K x (xq [N, D], xd [N, D/256], xb [N, D/16]) and sel int32, w f32 [N, A]."""
        L, F = self.layers[il], self.F
        N, A = sel.shape
        P = N * A
        mid = empty((P, F), cp.float32, self.poison)
        if P:
            fn = kernels.function(SRC, f"moe_gate_up_{KERNEL_SUFFIX[L.gate_type]}", self.defines)
            fn((P, (F + WARPS - 1) // WARPS), (32 * WARPS,),
               (L.gate, L.up, self.tables, xq, xd, xb, sel, w, mid, _i32(P), _i32(A), _i32(self.E),
                _i32(F), _i32(self.D), self.clamp))
        return mid

    def down(self, il, mq, md, mb, sel) -> cp.ndarray:
        """y f32 [N, D] = Σ_a (in slot order) Wd[sel[n, a]]·mid[n·A + a], from Q8_K mid
        (mq [N·A, F], md [N·A, F/256], mb [N·A, F/16])."""
        L, D = self.layers[il], self.D
        N, A = sel.shape
        y = empty((N, D), cp.float32, self.poison)
        if N:
            kernels.function(SRC, f"moe_down_{KERNEL_SUFFIX[L.down_type]}", self.defines)(
                (N, (D + WARPS - 1) // WARPS), (32 * WARPS,),
                (L.down, self.tables, mq, md, mb, sel, y, _i32(N), _i32(A), _i32(self.E), _i32(self.F), _i32(D)))
        return y
