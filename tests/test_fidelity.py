"""The reference's RoPE angles and RMS norms against independent emulations of ds4's C loops
(ds4.c: rope_tail_ext_inplace with rope_tail_layer_inplace's parameters; rms_norm_weight), written
here scalar by scalar in float32 / double as the C code declares them, not through the code under
test. docs/fidelity.md lists these and every other known difference from ds4's arithmetic."""
import math

import numpy as np
import pytest

from ds4bench.engine import config
from ds4bench.engine import model as M

f32 = np.float32
FLASH = config.preset("flash")
POSITIONS = [0, 1, 127, 4095, 65535, 1_000_000]


def logf(v):
    return f32(math.log(float(v)))


def ds4_rope_angles(cfg, compressed: bool, pos: int):
    """[(theta, mscale)] per pair, stepping through rope_tail_ext_inplace for one position."""
    n_rot = cfg.n_rot
    freq_base = f32(cfg.compress_rope_base if compressed else cfg.rope_base)
    freq_scale = f32(1.0) / f32(cfg.rope_scale_factor) if compressed else f32(1.0)
    ext_factor = f32(1.0) if compressed and cfg.rope_scale_factor > 1.0 else f32(0.0)
    attn_factor = f32(1.0)
    if ext_factor != 0:
        attn_factor = attn_factor / (f32(1.0) + f32(0.1) * logf(f32(1.0) / freq_scale))
    theta_scale = f32(float(freq_base) ** float(f32(-2.0) / f32(n_rot)))           # powf
    corr = [f32(0.0), f32(0.0)]
    if ext_factor != 0:
        def corr_dim(n_rot_beta):
            num = f32(n_rot) * logf(f32(cfg.rope_orig_ctx) / (f32(n_rot_beta) * f32(2.0) * f32(math.pi)))
            return num / (f32(2.0) * logf(freq_base))
        corr = [max(f32(0.0), f32(math.floor(corr_dim(cfg.yarn_beta_fast)))),
                min(f32(n_rot - 1), f32(math.ceil(corr_dim(cfg.yarn_beta_slow))))]
    out = []
    theta_extrap = f32(pos)
    for i in range(0, n_rot, 2):
        theta_interp = freq_scale * theta_extrap
        theta, mscale = theta_interp, attn_factor
        if ext_factor != 0:
            y = (f32(i // 2) - corr[0]) / max(f32(0.001), corr[1] - corr[0])
            ramp_mix = (f32(1.0) - min(f32(1.0), max(f32(0.0), y))) * ext_factor
            theta = theta_interp * (f32(1.0) - ramp_mix) + theta_extrap * ramp_mix
            mscale = mscale * (f32(1.0) + f32(0.1) * logf(f32(1.0) / freq_scale))
        out.append((theta, mscale))
        theta_extrap = theta_extrap * theta_scale
    return out


@pytest.mark.parametrize("compressed", [False, True])
def test_rope_angles_are_ds4s_float32_loop(compressed):
    freq = M.rope_inv_freq(FLASH, compressed)
    got = freq.angles(np.array(POSITIONS))                                   # [6, 32]
    for row, pos in zip(got, POSITIONS):
        want = ds4_rope_angles(FLASH, compressed, pos)
        assert row.dtype == np.float32
        np.testing.assert_array_equal(row, [t for t, _ in want], err_msg=f"position {pos}")
        assert {float(m) for _, m in want} == {float(freq.mscale)}


def test_ds4_angles_differ_from_exact_ones_as_float32_does():
    """The emulation has teeth: at 1e6 ds4's float32 angles are centiradians away from the exact
    (float64) pos * frequency, at 65535 milliradians (docs/fidelity.md measures both)."""
    for compressed, pos, lo, hi in [(True, 1_000_000, 0.01, 0.1), (True, 65535, 5e-4, 0.01)]:
        want = np.array([float(t) for t, _ in ds4_rope_angles(FLASH, compressed, pos)])
        k = np.arange(0, FLASH.n_rot, 2) / FLASH.n_rot
        base = FLASH.compress_rope_base ** -k
        ramp = 1.0 - np.clip((np.arange(FLASH.n_rot // 2) - 15) / 10, 0, 1)
        exact = pos * (base * ramp + base / FLASH.rope_scale_factor * (1 - ramp))
        assert lo < np.abs(want - exact).max() < hi, (pos, np.abs(want - exact).max())


@pytest.mark.parametrize("compressed,inverse", [(False, False), (True, False), (True, True)])
def test_rope_rotation_is_ds4s(compressed, inverse):
    """x0*c - x1*s, x0*s + x1*c in float32 with c, s = cosf/sinf(theta) * mscale (sin negated
    first for the inverse), cosf/sinf correctly rounded."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(POSITIONS), 2, FLASH.head_dim)).astype(np.float32)
    pos = np.array(POSITIONS).reshape(-1, 1)
    got = M.rope(np, x, pos, M.rope_inv_freq(FLASH, compressed), inverse)
    n_nope = FLASH.head_dim - FLASH.n_rot
    sign = f32(-1.0 if inverse else 1.0)
    for t, p in enumerate(POSITIONS):
        for h in range(2):
            tail, want = x[t, h, n_nope:], x[t, h].copy()
            for j, (theta, mscale) in enumerate(ds4_rope_angles(FLASH, compressed, p)):
                c = f32(math.cos(float(theta))) * mscale
                s = sign * f32(math.sin(float(theta))) * mscale
                x0, x1 = tail[2 * j], tail[2 * j + 1]
                want[n_nope + 2 * j], want[n_nope + 2 * j + 1] = x0 * c - x1 * s, x0 * s + x1 * c
            np.testing.assert_array_equal(got[t, h], want, err_msg=f"position {p} head {h}")


# ---- RMS norm ---------------------------------------------------------------------------------------
def ds4_rms_norm(row, weight, eps):
    """rms_norm_weight / rms_norm_no_weight: double ss += (double)x * x in order, then
    1.0f / sqrtf((float)(ss / n) + eps), then x * scale * weight in float32."""
    ss = 0.0
    for v in row:
        ss += float(v) * float(v)
    with np.errstate(over="ignore"):
        mean = f32(ss / len(row))
    scale = f32(1.0) / np.sqrt(mean + f32(eps))
    y = row * scale
    return y if weight is None else y * weight


def float32_mean_rms_norm(row, eps):
    """What the reference computed before: the mean of squares in float32."""
    return row * (f32(1.0) / np.sqrt(np.mean(row * row) + f32(eps)))


def test_rms_norm_rows_where_float32_and_double_sums_round_apart():
    """A seeded search for rows whose float32 mean of squares rounds differently from ds4's double
    sum, far enough to change the float32 scale; on those rows the reference gives ds4's output
    bit for bit, the float32 mean does not."""
    rng = np.random.default_rng(20)
    w = rng.uniform(0.5, 1.5, 4096).astype(np.float32)
    apart = []
    for _ in range(200):
        row = (rng.standard_normal(4096) * rng.uniform(0.01, 30)).astype(np.float32)
        ss = math.fsum(float(v) * float(v) for v in row)
        scale64 = f32(1.0) / np.sqrt(f32(ss / 4096) + f32(1e-6))
        scale32 = f32(1.0) / np.sqrt(np.mean(row * row) + f32(1e-6))
        if scale64 != scale32:
            apart.append(row)
        if len(apart) == 8:
            break
    assert len(apart) == 8
    X = np.stack(apart)
    got = M.rms_norm(np, X, w, 1e-6)
    for row, g in zip(apart, got):
        np.testing.assert_array_equal(g, ds4_rms_norm(row, w, 1e-6))
    assert sum(not np.array_equal(float32_mean_rms_norm(r, 1e-6) * w, g) for r, g in zip(apart, got)) == 8


def test_rms_norm_large_magnitudes_do_not_overflow_to_zero():
    rng = np.random.default_rng(3)
    base = rng.choice([-1.0, 1.0], 4096) * rng.uniform(0.5, 1.5, 4096)
    big = (base * 3e17).astype(np.float32)                      # float32 x*x summed overflows; double does not
    with np.errstate(over="ignore"):
        assert np.isinf(np.mean(big * big))
    y = M.rms_norm(np, big[None], None, 1e-6)[0]
    np.testing.assert_array_equal(y, ds4_rms_norm(big, None, 1e-6))
    assert 0.99 < float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) < 1.01
    huge = (base * 1e30).astype(np.float32)                     # the mean itself exceeds FLT_MAX
    y = M.rms_norm(np, huge[None], None, 1e-6)[0]
    assert np.isfinite(y).all() and 0.99 < float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) < 1.01
    np.testing.assert_allclose(y, base / np.sqrt(np.mean(base ** 2)), rtol=1e-6)
    # ds4's arithmetic, selectable: 1 / sqrtf(inf) = 0 makes the row zeros
    assert (ds4_rms_norm(huge, None, 1e-6) == 0).all()
    np.testing.assert_array_equal(M.rms_norm(np, huge[None], None, 1e-6, overflow="zero")[0], 0)
    with pytest.raises(ValueError, match="overflow='nan'; choose rescale or zero"):
        M.rms_norm(np, huge[None], None, 1e-6, overflow="nan")


def test_rms_norm_small_rows_keep_eps():
    tiny = np.full(512, 1e-30, np.float32)
    np.testing.assert_array_equal(M.rms_norm(np, tiny[None], None, 1e-6)[0], ds4_rms_norm(tiny, None, 1e-6))


def test_effects_script_prints_every_row(capsys, monkeypatch):
    """benchmarks/fidelity_effects.py (docs/fidelity.md's table) runs and measures what the doc
    says: ds4's own CPU and CUDA RoPE angles disagree at 1M; sequential and pairwise double sums
    of squares give the same scales."""
    from benchmarks import fidelity_effects as fe
    monkeypatch.setattr("sys.argv", ["fidelity_effects", "--rows", "40"])
    fe.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 14 and all(line.count(" | ") == 2 for line in lines[2:])
    rows = {r[0]: r[2] for r in fe.rms_rows(np.random.default_rng(0), 100)}
    assert rows["RMS norm: pairwise double sum (here, and block order on the GPU) vs ds4's sequential"] == "0"
    cuda = M.rope_inv_freq(FLASH, True).angles(np.array([1_000_000])) - fe.cuda_angles(FLASH, True, [1_000_000])
    assert np.abs(cuda).max() > 1e-3
