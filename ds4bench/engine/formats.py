"""GGML block formats, activation quantizers and simulated precisions, as ds4 computes them.

Every weight format decodes to  w = d[blk]·sc[sub]·q[elem] − dmin[blk]·m[sub]  (`decompose`); the
float dequantizer and the integer dot product are both built on that one decoding per layout.

| type (id)    | elems | bytes | byte layout of one block                          | value of element i                      |
|--------------|-------|-------|---------------------------------------------------|-----------------------------------------|
| F32 (0)      |     1 |     4 | f32                                               | x                                       |
| F16 (1)      |     1 |     2 | f16                                               | x                                       |
| I32 (26)     |     1 |     4 | i32 (dequantize keeps it int32)                   | x                                       |
| Q8_0 (8)     |    32 |    34 | 0: f16 d; 2..33: i8 q[32]                         | d·q[i]                                  |
| Q2_K (10)    |   256 |    84 | 0..15: u8 scales[16], low nibble sc, high m;      | d·sc[s]·q − dmin·m[s], s = i/16;        |
|              |       |       | 16..79: u8 qs[64]; 80: f16 d; 82: f16 dmin        | i = 128h+32j+l (l<32):                  |
|              |       |       |                                                   |   q = (qs[32h+l] >> 2j) & 3             |
| Q4_K (12)    |   256 |   144 | 0: f16 d; 2: f16 dmin; 4..15: u8 scales[12]       | d·sc[s]·q − dmin·m[s], s = i/32;        |
|              |       |       | (6-bit sc, m per sub-block, get_scale_min_k4);    | i = 64c+32k+l (k<2, l<32):              |
|              |       |       | 16..143: u8 qs[128]                               |   q = (qs[32c+l] >> 4k) & 15            |
| IQ2_XXS (16) |   256 |    66 | 0: f16 d; 2..65: per sub-block s of 32, u32 a0,   | d·(0.5+ls)·0.25·grid[g_k][j]·σ;         |
|              |       |       | u32 a1: byte k of a0 = grid index g_k (k<4),      | i = 32s+8k+j, ls = a1 >> 28,            |
|              |       |       | a1 bits 7k..7k+6 = ksigns index, bits 28..31 = ls | σ = −1 where bit j of ksigns[index k] is |
|              |       |       |                                                   | set (GGML's grid and ksigns tables)     |
| Q8_K (15)    |   256 |   292 | 0: f32 d; 4..259: i8 q[256]; 260..291: i16        | d·q[i] (activations only)               |
|              |       |       | bsums[16] (sums of 16 q)                          |                                         |

get_scale_min_k4 (Q4_K), sub-block s: s < 4: sc = scales[s] & 63, m = scales[s+4] & 63; s ≥ 4:
sc = (scales[s+4] & 15) | (scales[s−4] >> 6) << 4, m = (scales[s+4] >> 4) | (scales[s] >> 6) << 4.
In `IntWeights` IQ2_XXS is stored as sc = 2·ls+1, q = grid·σ, d = 0.125·f16(d), which is the same value.

Activation quantizers (ds4.c `quantize_q8_0_activation`, `ds4_quantize_row_q8_K`), all float32:
Q8_0 per 32: d = amax/127, q = lrintf(x·(1/d)) (ties to even);  Q8_K per 256: mx = the first x of
largest |x|, iscale = −127/mx, q = lrintf(iscale·x) clipped to [−128, 127], d = 1/iscale.
Simulated formats (ds4.c FP8 KV and indexer FP4 routines): power-of-two block scale, nearest-even
rounding on the e4m3fn (max 448, subnormal step 2⁻⁹) or e2m1 ({0, .5, 1, 1.5, 2, 3, 4, 6}) grid.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as QT

F32, F16, I32 = np.float32, np.float16, np.int32


@dataclass(frozen=True)
class Format:
    name: str
    qtype: QT
    block_elems: int
    block_bytes: int


FORMATS: dict[QT, Format] = {f.qtype: f for f in (
    Format("F32", QT.F32, 1, 4),
    Format("F16", QT.F16, 1, 2),
    Format("I32", QT.I32, 1, 4),
    Format("Q8_0", QT.Q8_0, 32, 34),
    Format("Q2_K", QT.Q2_K, 256, 84),
    Format("Q4_K", QT.Q4_K, 256, 144),
    Format("IQ2_XXS", QT.IQ2_XXS, 256, 66),
    Format("Q8_K", QT.Q8_K, 256, 292),
)}
_PLAIN = {QT.F32: F32, QT.F16: F16, QT.I32: I32}
_SUB = {QT.Q8_0: 32, QT.Q2_K: 16, QT.Q4_K: 32, QT.IQ2_XXS: 32}   # sub-block length per weight format


def _fmt(qtype) -> Format:
    try:
        return FORMATS[QT(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"unsupported tensor type {qtype!r}; supported: "
                         f"{', '.join(f.name for f in FORMATS.values())}") from None


def row_bytes(qtype, n_elems: int) -> int:
    f = _fmt(qtype)
    if n_elems % f.block_elems:
        raise ValueError(f"{f.name}: row length {n_elems} is not a multiple of its block size "
                         f"{f.block_elems}")
    return n_elems // f.block_elems * f.block_bytes


def tensor_bytes(qtype, shape) -> int:
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"{_fmt(qtype).name}: a tensor needs at least one dimension")
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(qtype, shape[-1])


def _blocks(raw, qtype, shape) -> np.ndarray:
    """raw bytes of a `shape` tensor as [n_blocks, block_bytes] uint8 (a view where possible)."""
    f = _fmt(qtype)
    want = tensor_bytes(qtype, shape)
    raw = np.asarray(raw)
    if raw.dtype not in (np.uint8, np.int8):
        raise ValueError(f"{f.name} {list(shape)}: expected raw uint8 bytes, got {raw.dtype}")
    if raw.size != want:
        raise ValueError(f"{f.name} {list(shape)}: expected {want} bytes, got {raw.size}")
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, f.block_bytes)


def _f16(blocks, at) -> np.ndarray:
    """f16 field at byte offset `at` of every block, as float32."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(F16)[:, 0].astype(F32)


# --------------------------------------------------------------------------- integer decomposition

@dataclass
class IntWeights:
    qtype: QT
    shape: tuple                 # numpy shape [..., O, n]
    q: np.ndarray                # int8  [..., O, n]
    sc: np.ndarray               # int16 [..., O, n//sub]
    m: np.ndarray | None         # int16 [..., O, n//sub]   (Q2_K, Q4_K)
    d: np.ndarray                # f32   [..., O, n//blk]
    dmin: np.ndarray | None      # f32   [..., O, n//blk]   (Q2_K, Q4_K)
    sub: int
    blk: int
    # where `_Prepared` layouts of this tensor and its views are kept, keyed by where their arrays
    # live (views made by indexing or dataclasses.replace find their own entry): the shared,
    # bounded PREPARED unless a caller gives another
    _memo: "PreparedMemo" = field(default_factory=lambda: PREPARED, repr=False, compare=False)

    def __getitem__(self, idx) -> "IntWeights":
        """Index the leading dims, e.g. W[e] is expert e of an [E, O, n] tensor, W[a:b] rows of [O, n]."""
        pick = lambda a: None if a is None else a[idx]
        q = self.q[idx]
        if q.ndim < 2:
            raise IndexError(f"{self.qtype.name}: indexing must keep the [O, n] matrix dims")
        return IntWeights(self.qtype, q.shape, q, self.sc[idx], pick(self.m), self.d[idx],
                          pick(self.dmin), self.sub, self.blk, self._memo)


@lru_cache(maxsize=1)
def _iq2xxs_signed_grid() -> np.ndarray:
    """[256 grid index, 128 sign index, 8] int8: GGML's IQ2_XXS grid values with ksigns applied."""
    from gguf.quants import IQ2_XXS
    IQ2_XXS.init_grid()
    grid = IQ2_XXS.grid.reshape(256, 8).astype(np.int8)                          # {8, 25, 43}
    ksigns = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)                       # [128]
    neg = (ksigns[:, None] >> np.arange(8, dtype=np.uint8)) & 1                  # [128, 8]
    return grid[:, None, :] * (1 - 2 * neg.astype(np.int8))[None]                # [256, 128, 8]


def _scale_min_k4(scales) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K 12-byte packing [N, 12] -> (sc, m) [N, 8]."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.int16), m.astype(np.int16)


def _pack_scale_min_k4(sc, m) -> np.ndarray:
    """Inverse of `_scale_min_k4`: 6-bit (sc, m) [N, 8] -> [N, 12] uint8."""
    sc, m = np.asarray(sc, np.uint8), np.asarray(m, np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def decompose(raw, qtype, shape) -> IntWeights:
    """Integer parts of a Q8_0/Q2_K/Q4_K/IQ2_XXS tensor of numpy shape [..., O, n]."""
    qtype, shape = _fmt(qtype).qtype, tuple(int(s) for s in shape)
    if qtype not in _SUB:
        raise ValueError(f"decompose: {_fmt(qtype).name} is not a block weight format "
                         f"(Q8_0, Q2_K, Q4_K, IQ2_XXS)")
    b = _blocks(raw, qtype, shape)                                               # [N, bytes]
    N = b.shape[0]
    m = dmin = None
    if qtype == QT.Q8_0:
        d = _f16(b, 0)
        q = b[:, 2:].view(np.int8)                                               # [N, 32]
        sc = np.ones((N, 1), np.int16)
    elif qtype == QT.Q2_K:
        scales = b[:, 0:16]
        q = (b[:, 16:80].reshape(N, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        sc, m = (scales & 15).astype(np.int16), (scales >> 4).astype(np.int16)   # [N, 16]
        d, dmin = _f16(b, 80), _f16(b, 82)
    elif qtype == QT.Q4_K:
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = _scale_min_k4(b[:, 4:16])                                        # [N, 8]
        q = (b[:, 16:144].reshape(N, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]) & 15
    else:  # IQ2_XXS
        d = _f16(b, 0) * F32(0.125)
        qs = np.ascontiguousarray(b[:, 2:66])                                    # [N, 64]
        a1 = qs.view("<u4").reshape(N, 8, 2)[:, :, 1]                            # [N, 8]
        grid_idx = qs.reshape(N, 8, 8)[:, :, :4]                                 # [N, 8, 4]
        sign_idx = (a1[:, :, None] >> np.array([0, 7, 14, 21], np.uint32)) & 127  # [N, 8, 4]
        q = _iq2xxs_signed_grid()[grid_idx, sign_idx]                            # [N, 8, 4, 8]
        sc = (2 * (a1 >> 28) + 1).astype(np.int16)                               # [N, 8]
    lead, n = shape[:-1], shape[-1]
    sub, blk = _SUB[qtype], FORMATS[qtype].block_elems
    as_rows = lambda a, k: None if a is None else a.reshape(*lead, n // k)
    return IntWeights(qtype, shape, q.astype(np.int8, copy=False).reshape(shape), as_rows(sc, sub),
                      as_rows(m, sub), as_rows(d, blk), as_rows(dmin, blk), sub, blk)


def _dequantize_int(W: IntWeights) -> np.ndarray:
    """w = (d·sc)·q − dmin·m in float32: each product is exact, so only the subtraction rounds."""
    spb = W.blk // W.sub
    dsc = np.repeat(W.d, spb, axis=-1) * W.sc.astype(F32)                        # [..., n//sub]
    w = dsc[..., None] * W.q.reshape(*W.sc.shape, W.sub).astype(F32)             # [..., n//sub, sub]
    if W.m is not None:
        w -= (np.repeat(W.dmin, spb, axis=-1) * W.m.astype(F32))[..., None]
    return w.reshape(W.shape)


def dequantize(raw, qtype, shape) -> np.ndarray:
    """float32 tensor of numpy `shape` (int32 for I32) from its raw GGUF bytes."""
    qtype, shape = _fmt(qtype).qtype, tuple(int(s) for s in shape)
    if qtype in _PLAIN:
        dt = _PLAIN[qtype]
        raw = np.asarray(raw)
        if raw.dtype != dt:
            raw = _blocks(raw, qtype, shape).view(dt)
        elif raw.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{qtype.name} {list(shape)}: got {raw.size} values")
        return raw.reshape(shape).astype(I32 if qtype == QT.I32 else F32)
    return _dequantize_int(decompose(raw, qtype, shape))


def dequantize_q8_0_f16(raw, shape) -> np.ndarray:
    """Q8_0 -> float16 as ds4's F16 cache kernel builds it: each f16(d)·q product rounded to f16."""
    W = decompose(raw, QT.Q8_0, shape)
    w = W.d[..., None] * W.q.reshape(*W.d.shape, 32).astype(F32)                # exact in f32
    with np.errstate(over="ignore"):                                             # |w| > 65504 -> inf, as __hmul
        return w.astype(F16).reshape(W.shape)


# --------------------------------------------------------------------------- activation quantizers

def _split(x, block: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(f"{what}: shape {list(x.shape)}: last dim must be a multiple of {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_act_q8_0(x) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] -> (q int8 [..., n], d f32 [..., n//32]); ds4 `quantize_q8_0_activation`."""
    xb = _split(x, 32, "Q8_0 activation")                                        # [..., nb, 32]
    d = np.abs(xb).max(axis=-1) / F32(127)                                       # [..., nb]
    inv = np.divide(F32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(xb * inv[..., None]), -128, 127).astype(np.int8)
    return q.reshape(np.shape(x)), d


def quantize_act_q8_k(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [..., n] -> (q int8 [..., n], d f32 [..., n//256], bsums int32 [..., n//16]); ds4 Q8_K."""
    xb = _split(x, 256, "Q8_K activation")                                       # [..., nb, 256]
    first = np.argmax(np.abs(xb), axis=-1)[..., None]
    mx = np.take_along_axis(xb, first, axis=-1)[..., 0]                          # signed max, [..., nb]
    nz = mx != 0
    iscale = np.divide(F32(-127), mx, out=np.zeros_like(mx), where=nz)
    q = np.clip(np.rint(iscale[..., None] * xb), -128, 127).astype(np.int8)
    d = np.divide(F32(1), iscale, out=np.zeros_like(iscale), where=nz)
    bsums = q.reshape(*q.shape[:-2], q.shape[-2] * 16, 16).sum(axis=-1, dtype=I32)
    return q.reshape(np.shape(x)), d, bsums


# --------------------------------------------------------------------------- integer matmul

# Products sc·q_w·q_x are integers, and float32 adds integers exactly while every partial sum stays
# within 2²⁴, in whatever order BLAS adds them; with |q_x| ≤ 128 a group of g weights is exact when
# its Σ|sc·q_w| ≤ 2¹⁷. `_prepared` takes the longest group (a block, or a half, quarter, ...) that
# passes for every row. Worst cases still pass with g = 32 for Q8_0 (32·128, a block), 256 for
# Q2_K (256·15·3), 128 for Q4_K (128·63·15) and 128 for IQ2_XXS (16 grid rows of |sum| ≤ 203, ·31).
_EXACT_F32_SUM = 1 << 17
_CHUNK_ELEMS = 1 << 17       # per-chunk [groups, T, O] intermediate, float32 and float64
PREPARED_BUDGET = 8 << 30    # bytes of int_matmul layouts kept (least recently used dropped first)


class PreparedMemo:
    """int_matmul's layouts (`_Prepared`, 4 bytes per weight, more than the 1-2 of the
    decomposition), least recently used first out past `budget` bytes. One memo serves every
    tensor: entries are keyed by where their arrays live and hold those arrays, so a key cannot
    be reused while its entry exists. Unbounded, a reference run that touches every routed
    expert (a prefill of a few thousand tokens on Flash shapes: 256 experts x 3 matrices x 4
    layers of 34 MB) would keep 100 GB of layouts; the newest entry is always kept. Threads may
    share it (the reference's experts are computed in parallel): a lock guards the order."""

    def __init__(self, budget: int = PREPARED_BUDGET):
        self.budget, self.nbytes, self._d = budget, 0, OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(p: "_Prepared") -> int:
        return sum(a.nbytes for a in (p.w, p.dw, p.m, p.dmin) if a is not None)

    def get(self, key):
        with self._lock:
            p = self._d.get(key)
            if p is not None:
                self._d.move_to_end(key)
            return p

    def __setitem__(self, key, p: "_Prepared") -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.nbytes -= self._size(old)
            self._d[key] = p
            self.nbytes += self._size(p)
            while self.nbytes > self.budget and len(self._d) > 1:
                _, gone = self._d.popitem(last=False)
                self.nbytes -= self._size(gone)

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.nbytes = 0


PREPARED = PreparedMemo()


@dataclass(frozen=True)
class _Prepared:
    """An [O, n] IntWeights as int_matmul multiplies it (legend: G groups, nb blocks, spb = blk//sub)."""
    g: int                       # group length: integer sums over g weights are exact in float32
    w: np.ndarray                # f32 [G, O, g]      sc·q, group-major: a matvec streams each group
    dw: np.ndarray               # f64 [nb, 1, O]     d
    m: np.ndarray | None         # f64 [nb, spb, O]   (Q2_K, Q4_K)
    dmin: np.ndarray | None      # f64 [nb, 1, O]     (Q2_K, Q4_K)
    source: tuple                # (q, sc, d, m, dmin), kept alive: the memo key's addresses stay theirs


def _prepared(W: IntWeights) -> _Prepared:
    """W's int_matmul layout (4 bytes per weight), built on first use and memoized per view in
    W._memo (PreparedMemo: bounded, least recently used out first). The key is where (address,
    dtype, shape, strides) each of q, sc, d, m, dmin lives, so a view made again (ops_ref makes
    expert and row views on every call) finds its entry, and a view with any array replaced gets
    a new one."""
    source = (W.q, W.sc, W.d, W.m, W.dmin)
    key = tuple(a if a is None else (a.ctypes.data, a.dtype, a.shape, a.strides) for a in source)
    p = W._memo.get(key)
    if p is None:
        O, n = W.q.shape
        nb, spb = n // W.blk, W.blk // W.sub
        w = W.q.astype(F32).reshape(O, n // W.sub, W.sub)                       # [O, nsub, sub]
        # Σ|sc·q| per sub-block in integers (one pass over the int8 weights); a group of g ≥ sub
        # weights sums whole sub-blocks (the worst cases above keep g ≥ sub)
        mag = np.abs(W.q.reshape(O, n // W.sub, W.sub), dtype=np.int16).sum(axis=-1, dtype=np.int64)
        if W.qtype != QT.Q8_0:
            w *= W.sc[:, :, None]                                                # exact, |sc·q| ≤ 1333
            mag *= np.abs(W.sc.astype(np.int64))
        g = W.blk
        while g > W.sub and mag.reshape(O, n // g, g // W.sub).sum(axis=-1).max(initial=0) > _EXACT_F32_SUM:
            g //= 2
        w = np.ascontiguousarray(w.reshape(O, n // g, g).transpose(1, 0, 2))     # [G, O, g]
        per_block = lambda a: np.ascontiguousarray(a.T, dtype=np.float64)[:, None, :]  # [nb, 1, O]
        m = dmin = None
        if W.m is not None:
            m = np.ascontiguousarray(W.m.reshape(O, nb, spb).transpose(1, 2, 0), dtype=np.float64)
            dmin = per_block(W.dmin)
        p = W._memo[key] = _Prepared(g, w, per_block(W.d), m, dmin, source)
    return p


def _sum_in_order(acc) -> np.ndarray:
    """acc[0] + acc[1] + ... left to right, whatever the trailing shape, so results never depend
    on T or chunking. NumPy reduces a leading axis slice by slice, except when the trailing size
    is 1, where it switches to pairwise summation; accumulate is sequential by definition."""
    if acc[0].size > 1:
        return np.add.reduce(acc, axis=0)
    return np.add.accumulate(acc, axis=0)[-1]


def int_matmul(W: IntWeights, xq, xd, bsums=None) -> np.ndarray:
    """y[t, o] = Σ_blk d_x·(d_w·Σ_sub sc·Σ q_w·q_x − dmin_w·Σ_sub m·bsum), as ds4's dot kernels.

    W [O, n]; xq int8 [T, n]; xd f32 [T, n//blk]; bsums int32 [T, n//16] (as quantize_act_q8_k
    gives them) -> f32 [T, O]. The integer sums of each group (`_prepared`) come from one float32
    matmul, exactly; d_w·S and dmin_w·M are exact in float64, so each block's term rounds only at the
    subtraction and at ·d_x, and blocks are added in order: a row never depends on T or chunking.
    Legend: G groups of g, nb blocks, gpb = G//nb groups per block, spb sub-blocks per block.
    """
    xq, xd = np.asarray(xq), np.asarray(xd, dtype=np.float64)
    if W.q.ndim != 2:
        raise ValueError(f"int_matmul: weights must be [O, n], got {list(W.shape)}; index experts first")
    O, n = W.q.shape
    single = xq.ndim == 1
    xq, xd = np.atleast_2d(xq), np.atleast_2d(xd)
    T, blk = xq.shape[0], W.blk
    if xq.shape != (T, n) or xd.shape != (T, n // blk):
        raise ValueError(f"int_matmul: {W.qtype.name} [{O}, {n}] needs {'Q8_0' if blk == 32 else 'Q8_K'} "
                         f"activations q [T, {n}], d [T, {n // blk}]; got {list(xq.shape)}, {list(xd.shape)}")
    P = _prepared(W)
    g = P.g
    nb, gpb, spb = n // blk, blk // g, blk // W.sub
    xs = xq.astype(F32).reshape(T, nb, gpb, g).transpose(1, 2, 0, 3)            # [nb, gpb, T, g]
    ws = P.w.reshape(nb, gpb, O, g).transpose(0, 1, 3, 2)                        # [nb, gpb, g, O]
    dx = xd.T[:, :, None]                                                        # [nb, T, 1]
    if P.m is not None:
        if bsums is None:
            bsums = xq.reshape(T, n // 16, 16).sum(axis=-1, dtype=I32)
        bs = np.asarray(bsums, dtype=np.float64)                                 # [T, n//16]
        if W.sub != 16:
            bs = bs.reshape(T, -1, W.sub // 16).sum(axis=-1)
        bs = bs.reshape(T, nb, spb).transpose(1, 0, 2)                           # [nb, T, spb]

    # Chunks [blocks, Tc, Oc]: all blocks of a wide O range when they fit (T = 1), else a tile of
    # at most 128 × 256 and as many blocks as fit, each chunk's sum carried into the next.
    y = np.empty((T, O), F32)
    Tc = max(1, min(T, 128))
    Oc = max(1, min(O, max(256, _CHUNK_ELEMS // (nb * gpb * Tc))))
    Bc = min(nb, max(1, _CHUNK_ELEMS // (gpb * Tc * Oc)))
    for o0 in range(0, O, Oc):
        o1 = min(O, o0 + Oc)
        for t0 in range(0, T, Tc):
            t1 = min(T, t0 + Tc)
            for b0 in range(0, nb, Bc):
                b1 = min(nb, b0 + Bc)
                s = np.matmul(xs[b0:b1, :, t0:t1], ws[b0:b1, :, :, o0:o1])      # [blocks, gpb, Tc, Oc]
                acc = s.sum(axis=1, dtype=np.float64) if gpb > 1 else s[:, 0].astype(np.float64)
                acc *= P.dw[b0:b1, :, o0:o1]                                     # d_w·S, exact
                if P.m is not None:
                    mins = np.matmul(bs[b0:b1, t0:t1], P.m[b0:b1, :, o0:o1])     # M, exact
                    mins *= P.dmin[b0:b1, :, o0:o1]                              # dmin_w·M, exact
                    acc -= mins
                acc *= dx[b0:b1, t0:t1]                                          # [blocks, Tc, Oc]
                if b0:
                    acc[0] += run                                                # carried sum first
                run = _sum_in_order(acc) if b1 - b0 > 1 else acc[0]              # [Tc, Oc]
            y[t0:t1, o0:o1] = run
    return y[0] if single else y


# --------------------------------------------------------------------------- weight quantization

def quantize_q8_0(w) -> np.ndarray:
    """float32 [..., n] -> Q8_0 bytes [..., n//32·34]; q = rint(w / f16(amax/127))."""
    wb = _split(w, 32, "Q8_0 weight")                                            # [..., nb, 32]
    d = (np.abs(wb).max(axis=-1) / F32(127)).astype(F16)                         # [..., nb]
    if not np.isfinite(d).all():
        raise ValueError("quantize_q8_0: block scale overflows float16 (|w| > 8.3e6 or non-finite)")
    df = d.astype(F32)[..., None]
    q = np.divide(wb, df, out=np.zeros_like(wb), where=df != 0)
    q = np.clip(np.rint(q), -127, 127).astype(np.int8)
    out = np.empty((*wb.shape[:-1], 34), np.uint8)
    out[..., :2] = d[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(*wb.shape[:-2], -1)


def random_blocks(qtype, shape, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random valid bytes [..., row_bytes] of a `shape` tensor whose values have mean ≈ 0, std ≈ std.

    q bits are uniform random bytes; the per-block scale d varies ±25% around the value that gives
    `std`, and Q2_K/Q4_K use m = sc with dmin = E[q]·d so every sub-block is centred exactly.
    """
    f = _fmt(qtype)
    qtype, shape = f.qtype, tuple(int(s) for s in shape)
    nbytes = tensor_bytes(qtype, shape)
    N = nbytes // f.block_bytes
    out = np.frombuffer(bytearray(rng.bytes(nbytes)), np.uint8).reshape(N, f.block_bytes)
    jitter = rng.uniform(0.75, 1.25, N).astype(F32) / F32(np.sqrt(1 + 0.5**2 / 12))

    def put_f16(at, v):
        out[:, at:at + 2] = v.astype(F16)[:, None].view(np.uint8)

    if qtype == QT.Q8_0:                       # q uniform over int8: var = (256² − 1)/12
        put_f16(0, std / np.sqrt((256**2 - 1) / 12) * jitter)
    elif qtype == QT.Q2_K:                     # q ∈ 0..3 (mean 1.5, var 1.25), sc = m ∈ 8..15
        sc = rng.integers(8, 16, (N, 16), dtype=np.uint8)
        d = std / np.sqrt(1.25 * np.mean(np.arange(8, 16) ** 2)) * jitter
        out[:, 0:16] = sc | (sc << 4)
        put_f16(80, d)
        put_f16(82, out[:, 80:82].copy().view(F16)[:, 0].astype(F32) * F32(1.5))
    elif qtype == QT.Q4_K:                     # q ∈ 0..15 (mean 7.5, var 21.25), sc = m ∈ 32..63
        sc = rng.integers(32, 64, (N, 8), dtype=np.uint8)
        d = std / np.sqrt(21.25 * np.mean(np.arange(32, 64) ** 2)) * jitter
        out[:, 4:16] = _pack_scale_min_k4(sc, sc)
        put_f16(0, d)
        put_f16(2, out[:, 0:2].copy().view(F16)[:, 0].astype(F32) * F32(7.5))
    elif qtype == QT.IQ2_XXS:                  # every bit pattern is valid; ls uniform over 0..15
        g2 = np.mean(_iq2xxs_signed_grid()[:, 0].astype(np.float64) ** 2)
        sc2 = np.mean((0.125 * (2 * np.arange(16) + 1)) ** 2)
        put_f16(0, std / np.sqrt(g2 * sc2) * jitter)
    else:
        raise ValueError(f"random_blocks: {f.name} is not a block weight format")
    return out.reshape(*shape[:-1], row_bytes(qtype, shape[-1]))


# --------------------------------------------------------------------------- simulated precisions

def _round_to_grid(v, mbits: int, emin: int, trunc: bool = False) -> np.ndarray:
    """Round float32 v to nearest, ties to even, on a minifloat grid with `mbits` mantissa bits and
    minimum normal exponent `emin` (subnormal step 2^(emin−mbits)); no overflow handling.
    `trunc` truncates the magnitude instead (the injected fault fp8-kv-truncate, faults.py)."""
    a = np.abs(v)
    e = np.maximum(np.frexp(a)[1] - 1, emin)                                     # floor(log2 a)
    step = np.ldexp(F32(1), e - mbits)
    r = (np.trunc if trunc else np.rint)(a / step) * step
    return np.where(v < 0, -r, r).astype(F32)


def _block_scaled_roundtrip(x, block, qmax, amax_floor, mbits, emin, what, trunc=False) -> np.ndarray:
    xb = _split(x, block, what)                                                  # [..., nb, block]
    amax = np.maximum(np.abs(xb).max(axis=-1, keepdims=True), F32(amax_floor))
    scale = np.ldexp(F32(1), np.ceil(np.log2(amax / F32(qmax))).astype(np.int32))
    v = np.clip(xb / scale, -qmax, qmax)
    return (_round_to_grid(v, mbits, emin, trunc) * scale).reshape(np.shape(x))


def fp8_e4m3_roundtrip(x, block: int = 64, trunc: bool = False) -> np.ndarray:
    """FP8 e4m3fn round trip per `block` on the last axis (ds4 KV nope dims)."""
    return _block_scaled_roundtrip(x, block, 448.0, 1e-4, 3, -6, "FP8 e4m3 round trip", trunc)


def fp4_e2m1_roundtrip(x, block: int = 32) -> np.ndarray:
    """FP4 e2m1 round trip per `block` on the last axis (ds4 indexer Q/K); amax floored as ds4
    does at 7.05e-38 (scale 2⁻¹²⁶), so an all-zero block stays zero."""
    return _block_scaled_roundtrip(x, block, 6.0, 7.052966104933725e-38, 1, 0,
                                   "FP4 e2m1 round trip")


def hadamard(x) -> np.ndarray:
    """H·x/√n over the last axis, H the Sylvester Hadamard matrix; float32 butterflies in ds4's
    order (stride 1, 2, 4, …), then one multiply by f32(1/√n)."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1] if x.ndim else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: length {n} of the last axis is not a power of two")
    lead = x.shape[:-1]
    y, s = x, 1
    while s < n:
        v = y.reshape(*lead, n // (2 * s), 2, s)
        a, b = v[..., 0, :], v[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(x.shape)
        s *= 2
    return y * F32(1 / np.sqrt(n))


def round_f16(x) -> np.ndarray:
    """float32 -> f16 (nearest even, overflow to ±inf as ds4's f32_to_f16) -> float32."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=F32).astype(F16).astype(F32)
