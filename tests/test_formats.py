"""Block formats, activation quantizers, integer matmul and simulated precisions (ds4bench.engine.formats)."""
import dataclasses
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import IQ2_XXS as GGUF_IQ2_XXS
from gguf.quants import dequantize as gguf_dequantize

from ds4bench.engine import formats as fm

WEIGHT_TYPES = [QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.IQ2_XXS]
F16_FIELDS = {QT.Q8_0: (0,), QT.Q2_K: (80, 82), QT.Q4_K: (0, 2), QT.IQ2_XXS: (0,)}


def raw_random(qtype, shape, rng, scale=0.01):
    """Uniformly random bytes (every bit pattern of every field) with finite f16 scales."""
    f = fm.FORMATS[qtype]
    nb = fm.tensor_bytes(qtype, shape) // f.block_bytes
    raw = rng.integers(0, 256, (nb, f.block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = (rng.standard_normal(nb) * scale).astype(np.float16)[:, None].view(np.uint8)
    return raw.reshape(-1)


def f16_bytes(v):
    return np.array([v], np.float16).view(np.uint8)


# --------------------------------------------------------------------------- sizes

def test_format_table_matches_ggml():
    for qtype, f in fm.FORMATS.items():
        assert (f.block_elems, f.block_bytes) == GGML_QUANT_SIZES[qtype], f.name
    assert fm.row_bytes(QT.Q8_0, 4096) == 4352
    assert fm.row_bytes(QT.IQ2_XXS, 4096) == 1056
    assert fm.tensor_bytes(QT.Q2_K, (256, 2048, 4096)) == 256 * 2048 * 16 * 84
    assert fm.tensor_bytes(QT.F16, (3, 5)) == 30


def test_row_bytes_rejects_partial_blocks():
    with pytest.raises(ValueError, match=r"Q4_K.*4000"):
        fm.row_bytes(QT.Q4_K, 4000)
    with pytest.raises(ValueError, match=r"Q8_0.*33"):
        fm.tensor_bytes(QT.Q8_0, (2, 33))
    with pytest.raises(ValueError, match="unsupported"):
        fm.row_bytes(QT.Q5_K, 256)
    with pytest.raises(ValueError, match="expected 34 bytes"):
        fm.dequantize(np.zeros(35, np.uint8), QT.Q8_0, (1, 32))


# --------------------------------------------------------------------------- dequantization

@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    shape = (2, 3, 512)
    raw = raw_random(qtype, shape, rng)
    ours = fm.dequantize(raw, qtype, shape)
    ref = gguf_dequantize(raw.reshape(2, 3, -1), qtype)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, ref)


def test_dequantize_plain_types():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    np.testing.assert_array_equal(fm.dequantize(x.view(np.uint8).reshape(-1), QT.F32, (3, 4)), x)
    np.testing.assert_array_equal(fm.dequantize(x, QT.F32, (3, 4)), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(fm.dequantize(h.view(np.uint8), QT.F16, (3, 4)), x)
    np.testing.assert_array_equal(fm.dequantize(h, QT.F16, (12,)), x.reshape(-1))
    ids = np.array([[0, 255, 7]], np.int32)
    got = fm.dequantize(ids.view(np.uint8), QT.I32, (1, 3))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ids)


def test_q8_0_block_layout():
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([f16_bytes(0.5), q.view(np.uint8)])
    np.testing.assert_array_equal(fm.dequantize(raw, QT.Q8_0, (32,)), 0.5 * q)


def test_q2_k_block_layout():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 4, 256)
    sc = np.array([(s % 15) + 1 for s in range(16)])
    m = np.array([s % 7 for s in range(16)])
    qs = np.zeros(64, np.uint8)
    for h in range(2):                       # element 128h + 32j + l, l < 32: qs[32h + l] >> 2j
        for j in range(4):
            for l in range(32):
                qs[32 * h + l] |= q[128 * h + 32 * j + l] << (2 * j)
    raw = np.concatenate([(sc | (m << 4)).astype(np.uint8), qs, f16_bytes(0.25), f16_bytes(0.5)])
    sub = np.arange(256) // 16
    np.testing.assert_array_equal(fm.dequantize(raw, QT.Q2_K, (256,)), 0.25 * sc[sub] * q - 0.5 * m[sub])


def test_q4_k_block_layout():
    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, 256)
    sc = np.array([1, 2, 3, 63, 17, 40, 33, 62])        # s >= 4 need the packed high bits
    m = np.array([5, 0, 63, 9, 48, 21, 63, 16])
    scales = np.zeros(12, np.uint8)
    for s in range(8):
        if s < 4:
            scales[s] |= sc[s]
            scales[s + 4] |= m[s]
        else:
            scales[s + 4] = (sc[s] & 15) | ((m[s] & 15) << 4)
            scales[s - 4] |= (sc[s] >> 4) << 6
            scales[s] |= (m[s] >> 4) << 6
    qs = np.zeros(128, np.uint8)
    for c in range(4):                        # low nibble: sub-block 2c, high nibble: 2c + 1
        qs[32 * c:32 * c + 32] = q[64 * c:64 * c + 32] | (q[64 * c + 32:64 * c + 64] << 4)
    raw = np.concatenate([f16_bytes(0.125), f16_bytes(2.0), scales, qs])
    sub = np.arange(256) // 32
    np.testing.assert_array_equal(fm.dequantize(raw, QT.Q4_K, (256,)), 0.125 * sc[sub] * q - 2.0 * m[sub])
    np.testing.assert_array_equal(fm._pack_scale_min_k4(sc[None], m[None])[0], scales)


def test_iq2_xxs_block_layout():
    GGUF_IQ2_XXS.init_grid()
    grid = GGUF_IQ2_XXS.grid.reshape(256, 8)
    ksigns = np.frombuffer(GGUF_IQ2_XXS.ksigns, np.uint8)
    assert (grid[0] == 8).all() and ksigns[3] == 0x03 and ksigns[1] == 0x81
    gidx, sidx, ls = [17, 200, 0, 255], [3, 127, 0, 1], 9
    a0 = np.array(gidx, np.uint8)
    a1 = np.array([sum(s << (7 * k) for k, s in enumerate(sidx)) | (ls << 28)], "<u4").view(np.uint8)
    qs = np.zeros(64, np.uint8)
    qs[24:28], qs[28:32] = a0, a1             # sub-block 3; the others are all zero bits
    raw = np.concatenate([f16_bytes(1.5), qs])
    got = fm.dequantize(raw, QT.IQ2_XXS, (256,)).reshape(8, 4, 8)
    np.testing.assert_array_equal(got[0], np.full((4, 8), 1.5 * 0.5 * 0.25 * 8))
    for k in range(4):
        sign = np.where((ksigns[sidx[k]] >> np.arange(8)) & 1, -1.0, 1.0)
        np.testing.assert_array_equal(got[3, k], 1.5 * (0.5 + ls) * 0.25 * grid[gidx[k]] * sign)
    assert got[3, 0, 0] == -1.5 * 9.5 * 0.25 * grid[17][0] and got[3, 3, 0] < 0 and got[3, 3, 7] < 0


def test_dequantize_q8_0_f16_rounds_each_product():
    rng = np.random.default_rng(3)
    raw = raw_random(QT.Q8_0, (4, 64), rng, scale=3.0)
    got = fm.dequantize_q8_0_f16(raw, (4, 64))
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16)             # [8, 1]
    q = blocks[:, 2:].view(np.int8).astype(np.float16)    # exact in f16
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, (d * q).reshape(4, 64))          # numpy half multiply
    np.testing.assert_array_equal(got, fm.dequantize(raw, QT.Q8_0, (4, 64)).astype(np.float16))


# --------------------------------------------------------------------------- integer decomposition

@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_decompose_reproduces_dequantize(qtype):
    rng = np.random.default_rng(10 + int(qtype))
    shape = (3, 4, 512)                                  # [E, O, n]
    raw = raw_random(qtype, shape, rng)
    W = fm.decompose(raw, qtype, shape)
    spb = W.blk // W.sub
    assert W.q.shape == shape and W.q.dtype == np.int8
    assert W.sc.shape == (3, 4, 512 // W.sub) and W.d.shape == (3, 4, 512 // W.blk)
    lo, hi = {QT.Q8_0: (-128, 127), QT.Q2_K: (0, 3), QT.Q4_K: (0, 15), QT.IQ2_XXS: (-43, 43)}[qtype]
    assert lo <= W.q.min() and W.q.max() <= hi
    sub_of = lambda a: np.repeat(a.astype(np.float64), W.sub, axis=-1)
    w = np.repeat(W.d, spb, -1).repeat(W.sub, -1) * sub_of(W.sc) * W.q
    if W.m is not None:
        w -= np.repeat(W.dmin, spb, -1).repeat(W.sub, -1) * sub_of(W.m)
    else:
        assert W.dmin is None and qtype in (QT.Q8_0, QT.IQ2_XXS)
    np.testing.assert_array_equal(w.astype(np.float32), fm.dequantize(raw, qtype, shape))
    E1 = W[1]
    assert E1.shape == (4, 512)
    np.testing.assert_array_equal(E1.q, W.q[1])


# --------------------------------------------------------------------------- activation quantizers

def test_quantize_act_q8_0_rounds_half_to_even():
    x = np.zeros((2, 64), np.float32)
    x[0, :8] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]   # amax 127 -> d = 1
    q, d = fm.quantize_act_q8_0(x)
    assert q.shape == (2, 64) and q.dtype == np.int8 and d.shape == (2, 2) and d.dtype == np.float32
    np.testing.assert_array_equal(q[0, :8], [127, 0, 2, 2, 0, -2, -2, 126])
    np.testing.assert_array_equal(d, [[1, 0], [0, 0]])
    assert not q[1].any() and not q[0, 32:].any()


def test_quantize_act_q8_0_matches_scalar_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x0 = x.copy()
    q, d = fm.quantize_act_q8_0(x)
    np.testing.assert_array_equal(x, x0)
    for t in range(3):
        for b in range(3):
            blk = x[t, 32 * b:32 * b + 32]
            db = np.float32(np.abs(blk).max()) / np.float32(127)
            assert d[t, b] == db
            np.testing.assert_array_equal(q[t, 32 * b:32 * b + 32], np.rint(blk * (np.float32(1) / db)))


def test_quantize_act_q8_k_signed_max_and_bsums():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    x[0, 0, 7] = 9.0                      # positive max -> negative d, q = -127 there
    x[0, 1, 300] = -9.0                   # negative max -> positive d
    x[1, 0, 10], x[1, 0, 20] = -7.0, 7.0  # tie in |x|: the first one wins
    x[1, 1, 256:] = 0.0                   # zero block
    q, d, bs = fm.quantize_act_q8_k(x)
    assert q.shape == x.shape and d.shape == (2, 3, 2) and bs.shape == (2, 3, 32)
    assert q.dtype == np.int8 and d.dtype == np.float32 and bs.dtype == np.int32
    assert d[0, 0, 0] < 0 and q[0, 0, 7] == -127 and np.isclose(d[0, 0, 0], -9 / 127)
    assert d[0, 1, 1] > 0 and q[0, 1, 300] == -127
    assert d[1, 0, 0] > 0 and q[1, 0, 10] == -127 and q[1, 0, 20] == 127
    assert d[1, 1, 1] == 0 and not q[1, 1, 256:].any() and not bs[1, 1, 16:].any()
    np.testing.assert_array_equal(bs, q.reshape(2, 3, 32, 16).sum(-1))
    iscale = np.float32(-127) / np.float32(9)
    np.testing.assert_array_equal(q[0, 0, :256], np.clip(np.rint(iscale * x[0, 0, :256]), -128, 127))
    err = np.abs(q * np.repeat(d, 256, -1) - x)
    assert (err <= np.abs(np.repeat(d, 256, -1)) * 0.5 + 1e-6).all()


# --------------------------------------------------------------------------- integer matmul

@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_int_matmul_matches_float64_reference(qtype, monkeypatch):
    rng = np.random.default_rng(20 + int(qtype))
    O, n, T = 40, 768 if qtype != QT.Q8_0 else 320, 6
    raw = raw_random(qtype, (O, n), rng)
    W = fm.decompose(raw, qtype, (O, n))
    x = (rng.standard_normal((T, n)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    if qtype == QT.Q8_0:
        xq, xd = fm.quantize_act_q8_0(x)
        bs, xdeq = None, xq * np.repeat(xd, 32, -1).astype(np.float64)
    else:
        xq, xd, bs = fm.quantize_act_q8_k(x)
        xdeq = xq * np.repeat(xd, 256, -1).astype(np.float64)
    wdeq = fm.dequantize(raw, qtype, (O, n)).astype(np.float64)
    y = fm.int_matmul(W, xq, xd, bs)
    assert y.shape == (T, O) and y.dtype == np.float32
    ref = xdeq @ wdeq.T
    bound = np.abs(xdeq) @ np.abs(wdeq).T
    assert (np.abs(y - ref) <= 1e-6 * bound + 1e-30).all()
    for t in (0, 3):                                        # batch invariance, bit for bit
        bs_t = None if bs is None else bs[t:t + 1]
        np.testing.assert_array_equal(fm.int_matmul(W, xq[t:t + 1], xd[t:t + 1], bs_t)[0], y[t])
    np.testing.assert_array_equal(fm.int_matmul(W, xq[3], xd[3], None if bs is None else bs[3]), y[3])
    monkeypatch.setattr(fm, "_CHUNK_ELEMS", 64)             # many O and T chunks: same bits
    np.testing.assert_array_equal(fm.int_matmul(W, xq, xd, bs), y)
    if bs is not None:
        np.testing.assert_array_equal(fm.int_matmul(W, xq, xd), y)
    one = W[5:6]                                            # a single output row: [1, n]
    bs_1 = None if bs is None else bs[4:5]
    np.testing.assert_array_equal(fm.int_matmul(one, xq[4:5], xd[4:5], bs_1), y[4:5, 5:6])


def int_matmul_before(W, xq, xd, bsums=None):
    """fm.int_matmul before the grouped, memoized rewrite: one float32 matmul per sub-block."""
    xq, xd = np.atleast_2d(xq), np.atleast_2d(np.asarray(xd, dtype=np.float64))
    (T, n), O, sub, blk = xq.shape, W.q.shape[0], W.sub, W.blk
    nsub, nb, spb = n // sub, n // blk, blk // sub
    xs = np.ascontiguousarray(xq.reshape(T, nsub, sub).transpose(1, 0, 2), dtype=np.float32)
    wq = W.q.reshape(O, nsub, sub).astype(np.float32)
    if W.qtype != QT.Q8_0:
        wq *= W.sc[:, :, None]
    s = np.matmul(xs, wq.transpose(1, 2, 0))                                     # [nsub, T, O]
    acc = s.reshape(nb, spb, T, O).sum(axis=1, dtype=np.float64) * W.d.T.astype(np.float64)[:, None]
    if W.m is not None:
        if bsums is None:
            bsums = xq.reshape(T, n // 16, 16).sum(axis=-1, dtype=np.int32)
        bs = np.asarray(bsums, np.float64).reshape(T, nsub, sub // 16).sum(-1)
        bs = bs.reshape(T, nb, spb).transpose(1, 0, 2)                           # [nb, T, spb]
        mins = np.matmul(bs, W.m.reshape(O, nb, spb).transpose(1, 2, 0).astype(np.float64))
        acc -= mins * W.dmin.T.astype(np.float64)[:, None]
    acc *= xd.T[:, :, None]
    return np.add.accumulate(acc, axis=0)[-1].astype(np.float32)               # blocks in order


def activations(qtype, rng, T, n):
    x = (rng.standard_normal((T, n)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    return fm.quantize_act_q8_0(x) + (None,) if qtype == QT.Q8_0 else fm.quantize_act_q8_k(x)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
@pytest.mark.parametrize("T", [1, 3, 300])
def test_int_matmul_equals_previous_implementation(qtype, T, monkeypatch):
    rng = np.random.default_rng(40 + int(qtype) + T)
    O, n = 300, 768 if qtype != QT.Q8_0 else 320                 # O > 256 and T > 128: several tiles
    W = fm.decompose(raw_random(qtype, (O, n), rng), qtype, (O, n))
    xq, xd, bs = activations(qtype, rng, T, n)
    ref = int_matmul_before(W, xq, xd, bs)
    np.testing.assert_array_equal(fm.int_matmul(W, xq, xd, bs), ref)
    monkeypatch.setattr(fm, "_CHUNK_ELEMS", 256)               # one block per chunk: sums carried
    np.testing.assert_array_equal(fm.int_matmul(W, xq, xd, bs), ref)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_int_matmul_exact_at_largest_magnitudes(qtype):
    """Every weight and activation at its largest magnitude, all of one sign: the longest partial
    sums the float32 matmul sees stay exact (Q4_K and IQ2_XXS then use half blocks)."""
    f = fm.FORMATS[qtype]
    raw = np.zeros((4 * 256 // f.block_elems, f.block_bytes), np.uint8)   # [4, 256]
    if qtype == QT.Q8_0:
        raw[:, 2:] = np.uint8(0x80)                              # q = −128
    elif qtype == QT.Q2_K:
        raw[:, 0:16], raw[:, 16:80] = 0x0F, 0xFF                 # sc 15, m 0, q 3
    elif qtype == QT.Q4_K:
        raw[:, 4:16] = fm._pack_scale_min_k4(np.full((4, 8), 63), np.zeros((4, 8)))
        raw[:, 16:] = 0xFF                                       # sc 63, q 15
    else:
        g = int(np.argmax(np.abs(fm._iq2xxs_signed_grid()[:, 0].astype(int)).sum(-1)))
        a1 = np.array([0xF0000000], "<u4").view(np.uint8)       # ls 15 (sc 31), signs all +
        raw[:, 2:] = np.tile(np.concatenate([np.full(4, g, np.uint8), a1]), 8)
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = f16_bytes(0.25)
    W = fm.decompose(raw.reshape(-1), qtype, (4, 256))
    xq = np.full((2, 256), -128, np.int8)
    xd = np.full((2, 256 // W.blk), 0.5, np.float32)
    np.testing.assert_array_equal(fm.int_matmul(W, xq, xd), int_matmul_before(W, xq, xd))
    g = fm._prepared(W).g
    assert g == {QT.Q8_0: 32, QT.Q2_K: 256, QT.Q4_K: 128, QT.IQ2_XXS: 128}[qtype]
    w = np.abs(W.sc.repeat(W.sub, -1) * W.q.astype(np.int64))               # |sc·q| [4, 256]
    group_max = lambda k: w.reshape(4, -1, k).sum(-1).max()
    assert group_max(g) * 128 <= 2**24 and (g == W.blk or group_max(2 * g) * 128 > 2**24)


def test_int_matmul_memo_follows_views_and_replacements():
    rng = np.random.default_rng(50)
    E, O, n = 3, 8, 512
    raw = raw_random(QT.Q2_K, (E, O, n), rng)
    W = dataclasses.replace(fm.decompose(raw, QT.Q2_K, (E, O, n)), _memo=fm.PreparedMemo())   # its own, to count
    xq, xd, bs = activations(QT.Q2_K, rng, 5, n)
    sub = lambda V, idx: dataclasses.replace(                   # as ops_ref slices experts and rows
        V, q=V.q[idx], sc=V.sc[idx], d=V.d[idx], shape=V.q[idx].shape, m=V.m[idx], dmin=V.dmin[idx])
    for e in range(E):
        fresh = fm.decompose(raw.reshape(E, -1)[e], QT.Q2_K, (O, n))
        ref = fm.int_matmul(fresh, xq, xd, bs)
        np.testing.assert_array_equal(fm.int_matmul(W[e], xq, xd, bs), ref)
        np.testing.assert_array_equal(fm.int_matmul(sub(W, e), xq, xd, bs), ref)
        np.testing.assert_array_equal(fm.int_matmul(sub(sub(W, e), slice(2, 6)), xq, xd, bs), ref[:, 2:6])
        np.testing.assert_array_equal(fm.int_matmul(W[e][2:6], xq, xd, bs), ref[:, 2:6])
    entries = len(W._memo)
    fm.int_matmul(sub(W, 1), xq, xd, bs)                        # a view made again: no new entry
    assert len(W._memo) == entries == 2 * E
    V = W[1]
    y = fm.int_matmul(V, xq, xd, bs)
    for field, value in [("sc", V.sc[::-1].copy()), ("d", V.d * 2), ("q", V.q[::-1].copy()),
                         ("m", np.zeros_like(V.m)), ("dmin", V.dmin[::-1].copy())]:
        R = dataclasses.replace(V, **{field: value})             # shares the memo, not the entry
        got = fm.int_matmul(R, xq, xd, bs)
        np.testing.assert_array_equal(got, int_matmul_before(R, xq, xd, bs))
        assert not np.array_equal(got, y), field


def test_prepared_memo_keeps_the_most_recently_used_within_its_budget():
    """A reference run touching every routed expert must not keep every expert's layout."""
    rng = np.random.default_rng(51)
    E, O, n = 6, 8, 512
    raw = raw_random(QT.IQ2_XXS, (E, O, n), rng)
    xq, xd, bs = activations(QT.IQ2_XXS, rng, 3, n)
    W0 = fm.decompose(raw, QT.IQ2_XXS, (E, O, n))
    ref = [fm.int_matmul(dataclasses.replace(W0[e], _memo=fm.PreparedMemo()), xq, xd, bs) for e in range(E)]
    one = O * n * 4 + (n // 256) * O * 8                        # f32 layout and f64 block scales of one expert
    memo = fm.PreparedMemo(budget=2 * one)                      # room for two layouts
    W = dataclasses.replace(W0, _memo=memo)
    for e in range(E):
        np.testing.assert_array_equal(fm.int_matmul(W[e], xq, xd, bs), ref[e])
    assert len(memo) == 2 and memo.nbytes == 2 * one
    assert memo.get(next(iter(memo._d))).source[0].ctypes.data == W[E - 2].q.ctypes.data   # the two newest
    np.testing.assert_array_equal(fm.int_matmul(W[0], xq, xd, bs), ref[0])    # rebuilt after eviction: same bits
    assert len(memo) == 2 and memo.nbytes <= memo.budget
    memo.budget = one // 2                                      # smaller than one layout: the newest stays
    fm.int_matmul(W[3], xq, xd, bs)
    assert len(memo) == 1


def test_int_matmul_rejects_mismatched_activations():
    rng = np.random.default_rng(6)
    W = fm.decompose(raw_random(QT.Q2_K, (4, 256), rng), QT.Q2_K, (4, 256))
    xq, xd = fm.quantize_act_q8_0(rng.standard_normal((2, 256)).astype(np.float32))
    with pytest.raises(ValueError, match="Q8_K"):
        fm.int_matmul(W, xq, xd)


# --------------------------------------------------------------------------- weight quantizer, generator

def test_quantize_q8_0_round_trip():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 5, 128)).astype(np.float32)
    w[0, 0, :32] = 0.0
    raw = fm.quantize_q8_0(w)
    assert raw.shape == (3, 5, 4 * 34) and raw.dtype == np.uint8
    back = fm.dequantize(raw, QT.Q8_0, w.shape)
    np.testing.assert_array_equal(back, gguf_dequantize(raw, QT.Q8_0))
    d = fm.decompose(raw, QT.Q8_0, w.shape).d
    assert (np.abs(back - w) <= np.repeat(d, 32, -1) * 0.5 * (1 + 1e-6)).all()
    assert not back[0, 0, :32].any()


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_random_blocks_statistics(qtype):
    rng = np.random.default_rng(30 + int(qtype))
    shape = (64, 2048)
    raw = fm.random_blocks(qtype, shape, rng, std=0.02)
    assert raw.dtype == np.uint8 and raw.size == fm.tensor_bytes(qtype, shape)
    w = fm.dequantize(raw, qtype, shape)
    assert np.isfinite(w).all()
    assert abs(w.mean()) < 0.05 * 0.02
    assert 0.8 * 0.02 < w.std() < 1.2 * 0.02


def test_random_blocks_is_fast():
    rng = np.random.default_rng(8)
    for qtype in WEIGHT_TYPES:
        rate = 0.0
        for _ in range(2):
            t = time.perf_counter()
            raw = fm.random_blocks(qtype, (1024, 8192), rng, std=0.05)
            rate = max(rate, raw.nbytes / (time.perf_counter() - t))
        assert raw.shape == (1024, fm.row_bytes(qtype, 8192))
        assert rate > 100e6, qtype.name                     # target 200 MB/s; margin for slow CI


# --------------------------------------------------------------------------- simulated precisions

def e4m3_values():
    i = np.arange(127)
    e, mant = i >> 3, i & 7
    return np.where(e == 0, mant * 2.0**-9, (1 + mant / 8) * 2.0**(e - 7.0))


def e4m3_scalar(x):
    """ds4's scalar search: largest grid value <= |x|, step up on a closer or tie-to-even neighbour."""
    vals = e4m3_values()
    ax = min(abs(float(np.float32(x))), 448.0)
    best = int(np.searchsorted(vals, ax, side="right") - 1)
    if best < 126:
        bd, nd = abs(ax - vals[best]), abs(ax - vals[best + 1])
        if nd < bd or (nd == bd and best % 2 == 1):
            best += 1
    return (-1 if x < 0 else 1) * vals[best]


def e2m1_scalar(x):
    vals = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    ax, best = min(abs(float(x)), 6.0), 0
    for i in range(1, 8):
        diff, bdiff = abs(ax - vals[i]), abs(ax - vals[best])
        if diff < bdiff or (diff == bdiff and i % 2 == 0 and best % 2 == 1):
            best = i
    return (-1 if x < 0 else 1) * vals[best]


def block_scale(x, block, qmax, floor):
    amax = np.maximum(np.abs(x.reshape(-1, block)).max(-1), np.float32(floor))
    return np.exp2(np.ceil(np.log2(amax / np.float32(qmax)))).astype(np.float32)


def test_fp8_matches_scalar_reference_and_grid():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 448)) * rng.choice([1e-6, 1e-2, 1, 300, 1e5], (3, 1))).astype(np.float32)
    x0 = x.copy()
    y = fm.fp8_e4m3_roundtrip(x)
    np.testing.assert_array_equal(x, x0)
    scale = np.repeat(block_scale(x, 64, 448, 1e-4), 64).reshape(x.shape)
    ref = np.array([e4m3_scalar(v) for v in (x / scale).ravel()]).reshape(x.shape) * scale
    np.testing.assert_array_equal(y, ref.astype(np.float32))
    assert np.isin(np.abs(y / scale), e4m3_values()).all()
    assert (np.abs(y) <= 448 * scale).all()
    np.testing.assert_array_equal(fm.fp8_e4m3_roundtrip(y), y)


def test_fp8_ties_to_even_and_zero_blocks():
    x = np.zeros((2, 64), np.float32)
    s = 2.0**-9
    x[0, :9] = [448, 17, 19, 432, 0.5 * s, 1.5 * s, 7.5 * s, -17, 440]
    y = fm.fp8_e4m3_roundtrip(x)
    np.testing.assert_array_equal(y[0, :9], [448, 16, 20, 448, 0, 2 * s, 8 * s, -16, 448])
    assert not y[1].any()
    with pytest.raises(ValueError):
        fm.fp8_e4m3_roundtrip(np.zeros(100, np.float32))


def test_fp4_matches_scalar_reference_and_grid():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 128)) * rng.choice([1e-3, 1, 50], (4, 1))).astype(np.float32)
    y = fm.fp4_e2m1_roundtrip(x)
    scale = np.repeat(block_scale(x, 32, 6, 7.052966104933725e-38), 32).reshape(x.shape)
    ref = np.array([e2m1_scalar(v) for v in (x / scale).ravel()]).reshape(x.shape) * scale
    np.testing.assert_array_equal(y, ref.astype(np.float32))
    assert np.isin(np.abs(y / scale), [0, 0.5, 1, 1.5, 2, 3, 4, 6]).all()
    np.testing.assert_array_equal(fm.fp4_e2m1_roundtrip(y), y)


def test_fp4_ties_to_even_and_zero_blocks():
    x = np.zeros((2, 32), np.float32)
    x[0, :15] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.75, -5, 5.5, 0.1, 2.4, 2.6, -6]
    y = fm.fp4_e2m1_roundtrip(x)
    np.testing.assert_array_equal(y[0, :15], [6, 0, 1, 1, 2, 2, 4, 4, -1, -4, 6, 0, 2, 3, -6])
    assert not y[1].any() and not np.signbit(y[1]).any()
    z = fm.fp4_e2m1_roundtrip(np.full((1, 32), 12.0, np.float32))   # amax 12 -> scale 2, value 6·2
    np.testing.assert_array_equal(z, 12.0)


def test_hadamard():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    y = fm.hadamard(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(fm.hadamard(y), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    H = np.array([[1.0]])
    for _ in range(3):
        H = np.block([[H, H], [H, -H]])                   # Sylvester order
    v = rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(fm.hadamard(v), v @ H.T / np.sqrt(8), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        fm.hadamard(np.zeros(12, np.float32))
    r = x[0, 0].copy()                                      # ds4's in-place float32 butterflies
    stride = 1
    while stride < 128:
        for base in range(0, 128, 2 * stride):
            a, b = r[base:base + stride].copy(), r[base + stride:base + 2 * stride].copy()
            r[base:base + stride], r[base + stride:base + 2 * stride] = a + b, a - b
        stride *= 2
    np.testing.assert_array_equal(y[0, 0], r * np.float32(0.08838834764831845))


def test_round_f16():
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 70000.0, 1e-8, -0.1], np.float32)
    np.testing.assert_array_equal(fm.round_f16(x), [1, 1 + 2**-9, np.inf, 0, np.float16(-0.1)])
