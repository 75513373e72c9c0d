"""The DS4 forward pass, op by op in the order of ds4-spec section 3.3.

Written once against an array module `xp` (NumPy or CuPy); the heavy operations (quantized
projections, routed experts, simulated-precision rounding) go through an `ops` object that
defines the numeric mode (`ops_ref.RefOps` for NumPy; the GPU engine brings its own).

One call processes T new tokens for each of B sequences: chunked prefill is B=1, T=chunk;
batched decode is B sequences, T=1. Positions differ per sequence.

Dimension legend: B sequences, T new tokens per sequence, N = B*T tokens, S HC streams,
D model dim, H heads, K head dim, Q q-LoRA rank, G output groups, O output LoRA rank,
R raw keys in view (W ring rows + T new), C compressed rows, I indexer head dim,
J indexer heads, E experts, A active experts, V vocabulary, w compressor width.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .profiling import Profiler
from .state import RunState


# ---- small math, array-module generic ---------------------------------------------------------
def rms_norm(xp, x, weight, eps, overflow="rescale"):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (weight None: no gain), as ds4's
    rms_norm_weight: squares summed in double, the mean rounded once to float32, the scale
    1/sqrt(mean + eps) in float32, then (x * scale) * weight. Where the mean overflows float32
    (rms above ~1.8e19) ds4's scale is 1/inf = 0 and the row becomes zeros; "rescale" takes the
    scale in double there instead (the one deliberate difference, docs/fidelity.md), "zero"
    keeps ds4's zeros."""
    n = x.shape[-1]
    ss = xp.sum(xp.square(x.astype(xp.float64)), axis=-1, keepdims=True)        # [..., 1] exact terms
    with np.errstate(over="ignore"):
        mean = (ss / n).astype(xp.float32)
    scale = xp.float32(1.0) / xp.sqrt(mean + xp.float32(eps))                  # [..., 1] float32
    if overflow == "rescale":
        scale = xp.where(xp.isinf(mean), (1.0 / xp.sqrt(ss / n + xp.float32(eps))).astype(xp.float32), scale)
    elif overflow != "zero":
        raise ValueError(f"rms_norm overflow={overflow!r}; choose rescale or zero")
    y = x * scale
    return y if weight is None else y * weight


def sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def softmax(xp, x, axis=-1):
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def _logf(v) -> np.float32:
    """C's logf on a float32: the correctly rounded value (what glibc's logf returns)."""
    return np.float32(math.log(float(np.float32(v))))


@dataclass(frozen=True)
class RopeFreq:
    """One layer kind's RoPE, as the float32 parameters of ds4's rope_tail_ext_inplace (ds4.c):
    angle of pair k = pos * theta_scale^k by k float32 multiplications, YaRN-blended with
    freq_scale times itself by ramp(k) on compressed layers; cos/sin scaled by mscale."""
    npair: int
    theta_scale: np.float32      # powf(base, -2/n_rot)
    freq_scale: np.float32       # 1, or 1/rope_scale_factor on compressed layers
    yarn: bool                   # ext_factor 1 (compressed, scale factor > 1) or 0
    corr_lo: np.float32          # YaRN correction range in pairs (rope_yarn_corr_dims)
    corr_hi: np.float32
    mscale: np.float32           # attn_factor * (1 + 0.1 logf(1/freq_scale)): 1 for DS4's values

    def ramp_mix(self) -> np.ndarray:
        """[npair] float32 rope_yarn_ramp * ext_factor: 1 extrapolates (pos * freq), 0
        interpolates (pos * freq * freq_scale); all 0 without YaRN."""
        f = np.float32
        k = np.arange(self.npair, dtype=np.float32)
        y = (k - self.corr_lo) / np.maximum(f(0.001), self.corr_hi - self.corr_lo)
        ramp = f(1.0) - np.minimum(f(1.0), np.maximum(f(0.0), y))
        return ramp if self.yarn else np.zeros_like(ramp)

    def angles(self, pos) -> np.ndarray:
        """theta [..., npair] float32 for integer positions `pos` (host), as ds4's loop: the
        position as float, the frequency applied by repeated float32 multiplication."""
        f = np.float32
        te = np.empty(np.shape(pos) + (self.npair,), np.float32)               # [..., n/2] theta_extrap
        t = np.asarray(pos).astype(np.float32)
        for k in range(self.npair):
            te[..., k] = t
            t = t * self.theta_scale
        ti = self.freq_scale * te                                              # theta_interp
        if not self.yarn:
            return ti
        mix = self.ramp_mix()
        return ti * (f(1.0) - mix) + te * mix


def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> RopeFreq:
    """The RoPE parameters of uncompressed (plain, rope_base) or compressed layers (YaRN with
    compress_rope_base), in float32 as ds4 computes them (rope_tail_layer_inplace)."""
    f = np.float32
    n = cfg.n_rot
    base = f(cfg.compress_rope_base if compressed else cfg.rope_base)
    theta_scale = f(float(base) ** float(f(-2.0) / f(n)))                     # powf, correctly rounded
    yarn = compressed and cfg.rope_scale_factor > 1.0
    freq_scale = f(1.0) / f(cfg.rope_scale_factor) if compressed and cfg.rope_scale_factor > 0 else f(1.0)
    lo = hi = f(0.0)
    mscale = f(1.0)
    if yarn:
        def corr_dim(beta):                                                    # rope_yarn_corr_dim
            return f(n) * _logf(f(cfg.rope_orig_ctx) / (f(beta) * f(2.0) * f(math.pi))) / (f(2.0) * _logf(base))
        lo = np.maximum(f(0.0), np.floor(corr_dim(cfg.yarn_beta_fast)))
        hi = np.minimum(f(n - 1), np.ceil(corr_dim(cfg.yarn_beta_slow)))
        gain = f(1.0) + f(0.1) * _logf(f(1.0) / freq_scale)
        mscale = (f(1.0) / gain) * gain                                        # attn_factor cancels the gain
    return RopeFreq(n // 2, theta_scale, freq_scale, bool(yarn), f(lo), f(hi), f(mscale))


def rope(xp, x, pos, freq: RopeFreq, inverse=False):
    """Rotate the last 2*freq.npair dims of x in adjacent pairs (GPT-J) by freq's angles at pos;
    cos/sin of the float32 angle correctly rounded (cosf/sinf), times mscale.

    x [..., K] with pos broadcastable to x.shape[:-1] (host int array). Returns a new array.
    """
    n = 2 * freq.npair
    ang = freq.angles(pos).astype(np.float64)                                 # [..., n/2] float32 values
    cos = np.cos(ang).astype(np.float32) * freq.mscale
    sin = (np.float32(-1.0 if inverse else 1.0) * np.sin(ang).astype(np.float32)) * freq.mscale
    cos, sin = xp.asarray(cos), xp.asarray(sin)
    out = x.copy()
    x0, x1 = x[..., -n::2], x[..., -n + 1::2]                                  # [..., n/2] each
    out[..., -n::2] = x0 * cos - x1 * sin
    out[..., -n + 1::2] = x0 * sin + x1 * cos
    return out


def hc_weights(xp, cfg: ModelConfig, mix, s, b):
    """HC gates from the mixer output mix [N, S*(S+2)]: pre [N, S] (sigmoid + eps), post [N, S]
    (2 sigmoid) and comb [N, S, S] (row softmax + eps, then Sinkhorn-normalized)."""
    S = cfg.hc_streams
    N = mix.shape[0]
    pre = sigmoid(xp, mix[:, :S] * s[0] + b[:S]) + cfg.hc_eps               # [N, S]
    post = 2.0 * sigmoid(xp, mix[:, S:2 * S] * s[1] + b[S:2 * S])           # [N, S]
    comb = (mix[:, 2 * S:] * s[2] + b[2 * S:]).reshape(N, S, S)            # [N, S, S] row i, col j
    comb = softmax(xp, comb, axis=-1) + cfg.hc_eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + cfg.hc_eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + cfg.hc_eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + cfg.hc_eps)
    return pre, post, comb


def hc_collapse(xp, acc, X, pre):
    """x [N, D] = sum_s pre[n, s] X[n, s] (accumulated in `acc`, rounded once)."""
    return xp.einsum("ns,nsd->nd", pre.astype(acc), X.astype(acc)).astype(xp.float32)


def hc_expand(xp, acc, X, y, post, comb):
    """X' [N, S, D]: stream t = post[t] * y + sum_s comb[s, t] X[s]."""
    mixed = xp.einsum("nst,nsd->ntd", comb.astype(acc), X.astype(acc)).astype(xp.float32)
    return post[:, :, None] * y[:, None, :] + mixed


def attend(xp, acc, q, keys, mask, sinks):
    """Softmax attention with a per-head sink, V = K, in `acc`: q [B,T,H,K], keys [B,J,K],
    mask [B,T,J] (True = visible), sinks [H] -> [B,T,H,K] float32."""
    B, T, H, K = q.shape
    keys = keys.astype(acc)
    s = (q.astype(acc).reshape(B, T * H, K) @ keys.transpose(0, 2, 1)).reshape(B, T, H, -1)  # [B, T, H, J]
    s = s * (1.0 / math.sqrt(K))
    s = xp.where(mask[:, :, None, :], s, -xp.inf)
    m = xp.maximum(xp.max(s, axis=-1), sinks)                                       # [B, T, H]
    e = xp.exp(s - m[..., None])                                                     # [B, T, H, J]
    den = xp.sum(e, axis=-1) + xp.exp(sinks - m)                                     # [B, T, H]
    p = e / den[..., None]
    return (p.reshape(B, T * H, -1) @ keys).reshape(B, T, H, K).astype(xp.float32)  # [B, T, H, K]


def route_weights(xp, cfg: ModelConfig, logits, sel, bias, topk_ids):
    """Experts and their weights from router logits [N, E]: p = sqrt(softplus); the given `sel`
    (hash layers) or the top n_expert_used of p (+ bias), best first; w = p[sel], normalized by
    max(sum, floor) and scaled. Returns (sel [N, A], w [N, A] float32)."""
    p = xp.sqrt(xp.logaddexp(0.0, logits))                                           # [N, E] sqrt(softplus)
    if sel is None:
        sel = topk_ids(p if bias is None else p + bias, cfg.n_expert_used)           # [N, A] best first
    w = xp.take_along_axis(p, sel, axis=-1)                                          # [N, A]
    if cfg.expert_weights_norm:
        w = w / xp.maximum(w.sum(axis=-1, keepdims=True), cfg.route_score_floor)
    return sel, (w * cfg.expert_weights_scale).astype(xp.float32)


def indexer_scores(xp, acc, iq, ik, wt):
    """Indexer score of every compressed row for every token, in `acc`: iq [B, T, J, I] queries,
    ik [B, C, I] keys, wt [B, T, J] head weights -> sum_j wt * relu(iq_j . ik) [B, T, C]."""
    B, T, J, I = iq.shape
    C = ik.shape[1]
    dots = iq.reshape(B, T * J, I).astype(acc) @ ik.astype(acc).transpose(0, 2, 1)  # [B, T*J, C]
    dots = xp.maximum(dots, 0.0).reshape(B, T, J, C)                                 # [B, T, J, C]
    return xp.einsum("btj,btjc->btc", wt.astype(acc), dots)                          # [B, T, C]


def swiglu_clamped(xp, g, u, c):
    """silu(min(g, c)) * clip(u, -c, c): the shared expert's clamped SwiGLU."""
    return silu(xp, xp.minimum(g, c)) * xp.clip(u, -c, c)


# Operations an ops object may fuse into kernels (GpuOps does); DS4BENCH_UNFUSED names the ones
# to run as the array code above instead: a perf toggle that must not change the answer.
FUSABLE = {"hc": ("hc_weights", "hc_collapse", "hc_expand"), "rms_norm": ("rms_norm",), "rope": ("rope",),
           "attend": ("attend", "attend_ring"), "route": ("route",), "compress": ("pool_windows",),
           "indexer": ("indexer_scores",), "swiglu": ("swiglu_clamped",),
           "q8quant": ()}                        # inside the ops: Q8_0 activation quantization fused into the matmul


def no_tap(stage: str, il: int, *arrays):
    """The stage tap with no probe attached: the arrays unchanged (one, or a tuple of several)."""
    return arrays[0] if len(arrays) == 1 else arrays


# ---- the model -----------------------------------------------------------------------------------
class DS4Model:
    """Forward pass over a `RunState`. `ops` supplies projections and numeric modes."""
    # Index arrays come from the positions: on the host (the index module _im is NumPy, then
    # uploaded once per call) in `forward`; in `step` (_static) the positions are arrays of the
    # array module, everything derived from them is computed there (_im is xp), and shapes are
    # fixed by the run state's capacity.
    _static = False
    _im = np
    delay = None                               # slowdown.Delay: a known wait in each MoE stage (tests)
    faults = frozenset()                       # none unless __init__ is given some (faults.py)

    def __init__(self, cfg: ModelConfig, ops, profiler: Profiler | None = None, faults: frozenset = frozenset()):
        self.cfg, self.ops, self.xp = cfg, ops, ops.xp
        self.prof = profiler or Profiler()
        self.faults = frozenset(faults)        # injected faults (faults.py) made in this file's code
        # fault rope-compressed-base: compressed layers get the plain table (host code, both engines)
        self.inv_freq = {False: rope_inv_freq(cfg, False),
                         True: rope_inv_freq(cfg, "rope-compressed-base" not in self.faults)}
        self.p = ops.param                     # small F32 tensors (norms, scales, sinks) as xp arrays
        # host index arrays -> the array module's (CuPy indexes with its own arrays)
        self.ix = (lambda a: a) if self.xp is np else self.xp.asarray
        self._memo: dict = {}                  # index arrays of the current forward call (see idx)
        # HC mixing, norms, RoPE, attention and routing: the ops' fused kernels where they have
        # them and DS4BENCH_UNFUSED (ops.unfused) does not turn them off, else the array code above
        xp, acc = self.xp, ops.acc
        off = ops.unfused
        fused = {m: getattr(ops, m) for g, ms in FUSABLE.items() if g not in off for m in ms}   # engine_api.Ops
        # the array code's twins of the kernels' injected faults (the fused kernels carry their own)
        hc_cfg = dataclasses.replace(cfg, hc_sinkhorn_iters=1) if "hc-sinkhorn" in self.faults else cfg
        no_sink = "attn-sink-dropped" in self.faults
        self._hc_weights = fused.get("hc_weights") or (lambda mix, s, b: hc_weights(xp, hc_cfg, mix, s, b))
        self._hc_collapse = fused.get("hc_collapse") or (lambda X, pre: hc_collapse(xp, acc, X, pre))
        self._hc_expand = fused.get("hc_expand") or (lambda X, y, post, comb: hc_expand(xp, acc, X, y, post, comb))
        self._rms = fused.get("rms_norm") or (lambda x, w, eps: rms_norm(xp, x, w, eps))
        self._rope = fused.get("rope") or (lambda x, pos, f, inverse=False: rope(xp, x, pos, f, inverse))
        self._attend = fused.get("attend") or (
            lambda q, k, m, sk: attend(xp, acc, q, k, m, xp.full_like(sk, -xp.inf) if no_sink else sk))
        self._attend_ring = fused.get("attend_ring")      # the state read in place; None: gather and concatenate
        self._route = fused.get("route") or (
            lambda logits, sel, bias: route_weights(xp, cfg, logits, sel, bias, ops.topk_ids))
        self._pool = fused.get("pool_windows") or self.pool_windows
        self._iscore = fused.get("indexer_scores") or (lambda iq, ik, wt, **_: indexer_scores(xp, acc, iq, ik, wt))
        self._swiglu = fused.get("swiglu_clamped") or (lambda g, u, c: swiglu_clamped(xp, g, u, c))
        self.tap = no_tap                      # the stage probe attaches its own (probe.Recorder, probe.Replayer)

    def idx(self, key: tuple, make):
        """An index or mask array derived from the positions, on the array module's device,
        built once per forward call: every layer with the same ring length or ratio reuses it,
        so a GPU step uploads a few small arrays instead of a few per layer (`forward`), or
        computes them on the device from the device positions (`step`). `make` builds it with
        the index module `self._im` (NumPy on the host, or the array module in `step`)."""
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = self.ix(make())
        return v

    # -- hyper-connections ----------------------------------------------------------------------
    def hc_pre(self, X, prefix):
        """Collapse S streams into one sublayer input; return it with the post gates and comb."""
        cfg = self.cfg
        N = X.shape[0]
        flat = self._rms(X.reshape(N, cfg.hc_dim), None, cfg.rms_eps)       # [N, S*D]
        mix = self.ops.linear(f"{prefix}_fn.weight", flat)                     # [N, S*(S+2)]
        s, b = self.p(f"{prefix}_scale.weight"), self.p(f"{prefix}_base.weight")
        pre, post, comb = self._hc_weights(mix, s, b)                          # [N, S], [N, S], [N, S, S]
        return self._hc_collapse(X, pre), post, comb                            # [N, D]

    def hc_post(self, X, y, post, comb):
        """X' = post * y + comb^T X  (stream d takes sum_s comb[s, d] * X[s])."""
        return self._hc_expand(X, y, post, comb)                                 # [N, S, D]

    # -- compressor --------------------------------------------------------------------------------
    def compress(self, ring_k, ring_s, ck, cs, P, ratio, width, norm):
        """Append new (kv, score) rows to a compressor ring and pool every window that completes.

        ring_k/ring_s [B, L, w] (row = pos % L); ck/cs [B, T, w]; P [B, T] positions (host).
        Returns (b, t, rows [nE, width]) for the windows ending at (b, t), normalized, not roped.
        Ratio 4 pools 8 candidates per dim: the previous window's first half and the current
        window's second half (overlapping windows); other ratios pool the current window.
        """
        B, T, _ = ck.shape
        L = ring_k.shape[1]
        im = self._im
        bi = self.idx(("bi",), lambda: im.arange(B)[:, None])
        if self._static:                        # every slot pools; emit_rows keeps the completed windows
            eb, et = self.idx(("all_b",), lambda: im.arange(B)), self.idx(("all_t",), lambda: im.zeros(B, dtype=np.int64))
        else:
            eb, et = np.nonzero((P + 1) % ratio == 0)                           # emitting tokens
        rows = None
        if len(eb):                             # most decode steps complete no window: no pooling
            pooled = self._pool(ring_k, ring_s, ck, cs, P, eb, et, ratio, width)  # [nE, width]
            rows = self._rms(pooled, norm, self.cfg.rms_eps)                            # [nE, width]
        n = min(T, L)                                                            # keep the last L rows
        rows_in = self.idx(("ring", L, n), lambda: P[:, -n:] % L)
        ring_k[bi, rows_in] = ck[:, -n:]
        ring_s[bi, rows_in] = cs[:, -n:]
        return eb, et, rows

    def pool_windows(self, ring_k, ring_s, ck, cs, P, eb, et, ratio, width):
        """Softmax-pooled rows [nE, width] (not normalized) of the windows ending at (eb, et):
        each window's candidates from the ring (positions before this call) and the new rows."""
        xp, im = self.xp, self._im
        B, T, _ = ck.shape
        L = ring_k.shape[1]
        pos0 = P[:, 0]
        bi = self.idx(("bi",), lambda: im.arange(B)[:, None])
        hist = self.idx(("hist", L), lambda: (pos0[:, None] - L + im.arange(L)) % L)   # [B, L] pos0-L..pos0-1
        tl_k = xp.concatenate([ring_k[bi, hist], ck], axis=1)                   # [B, L+T, w] timeline
        tl_s = xp.concatenate([ring_s[bi, hist], cs], axis=1)                   # [B, L+T, w]
        e2 = self.idx(("emit_b", ratio), lambda: eb[:, None])
        c2 = self.idx(("emit_t", ratio, L), lambda: L + et[:, None] - ratio + 1 + im.arange(ratio))   # [nE, ratio] timeline idx
        k_cur, s_cur = tl_k[e2, c2], tl_s[e2, c2]                                # [nE, ratio, w]
        if ratio == 4:
            k_prev, s_prev = tl_k[e2, c2 - 4], tl_s[e2, c2 - 4]
            first = self.idx(("first", ratio), lambda: (P[eb, et] + 1 - ratio) == 0)[:, None, None]   # no previous window
            if "compressor-overlap" in self.faults:                                    # injected fault
                first = True
            s_prev = xp.where(first, -xp.inf, s_prev[..., :width])
            kk = xp.concatenate([k_prev[..., :width], k_cur[..., width:]], axis=1)   # [nE, 8, width]
            ss = xp.concatenate([s_prev, s_cur[..., width:]], axis=1)                # [nE, 8, width]
        else:
            kk, ss = k_cur, s_cur                                                     # [nE, ratio, width]
        return xp.sum(softmax(xp, ss, axis=1) * kk, axis=1)                           # [nE, width]

    # -- attention sublayer --------------------------------------------------------------------------
    def attention(self, il, X, P, ls):
        cfg, ops, prof = self.cfg, self.ops, self.prof
        B, T = P.shape
        N, H, K, W = B * T, cfg.n_head, cfg.head_dim, cfg.sliding_window
        ratio = cfg.ratio(il)
        pre = f"blk.{il}."
        freq = self.inv_freq[ratio != 0]
        im = self._im
        bi = self.idx(("bi",), lambda: im.arange(B)[:, None])
        with prof.range("hc_pre"):
            x, post, comb = self.hc_pre(X, pre + "hc_attn")                       # [N, D], [N, S], [N, S, S]
            xn = self._rms(x, self.p(pre + "attn_norm.weight"), cfg.rms_eps)   # [N, D]
            xn, post, comb = self.tap("hc_pre", il, xn, post, comb)
        with prof.range("attn.q"):
            qr = ops.linear(pre + "attn_q_a.weight", xn)                          # [N, Q]
            qrn = self._rms(qr, self.p(pre + "attn_q_a_norm.weight"), cfg.rms_eps)
            q = ops.linear(pre + "attn_q_b.weight", qrn).reshape(N, H, K)          # [N, H, K]
            q = self._rms(q, None, cfg.rms_eps)                                 # per head, no gain
            q = self._rope(q, P.reshape(N, 1), freq)                                 # [N, H, K]
            q, qrn = self.tap("attn.q", il, q, qrn)
        with prof.range("attn.kv"):
            kv = ops.linear(pre + "attn_kv.weight", xn)                            # [N, K]
            kv = self._rms(kv, self.p(pre + "attn_kv_a_norm.weight"), cfg.rms_eps)
            kv = ops.kv_round(self._rope(kv, P.reshape(N), freq)).reshape(B, T, K)   # [B, T, K] FP8 nope, F16
            kv = self.tap("attn.kv", il, kv)

        # most compressed rows after this call; in `step`, the state's capacity (rows beyond a
        # token's count are invisible to it, and the kernels stop at the count)
        cmax = (ls.comp.shape[1] if self._static else int((P[:, -1] + 1).max()) // ratio) if ratio else 0
        if ratio:
            with prof.range("compressor"):
                w = cfg.compressor_width(il)
                ape = self.p(pre + "attn_compressor_ape.weight")                    # [ratio, w]
                ck = ops.linear(pre + "attn_compressor_kv.weight", xn).reshape(B, T, w)
                cs = ops.linear(pre + "attn_compressor_gate.weight", xn).reshape(B, T, w) + ape[
                    self.idx(("phase", ratio), lambda: P % ratio)]
                ck, cs = self.tap("compressor", il, ck, cs)
                eb, et, rows = self.compress(ls.ck, ls.cs, ck, cs, P, ratio, K,
                                             self.p(pre + "attn_compressor_norm.weight"))
                if rows is not None:
                    rows = ops.kv_round(self._rope(rows, P[eb, et] + 1 - ratio, freq))   # [nE, K]
                    rows = self.tap("compressor", il, rows)
                    self.emit_rows(ls.comp, eb, et, P, ratio, rows)
        visible = None
        if cfg.has_indexer(il):
            with prof.range("indexer"):
                self.indexer_keys(il, xn, P, ls)                                   # every token feeds its ring
        if cmax:
            n_vis = (P + 1) // ratio                                               # [B, T] visible rows
            visible = self.idx(("visible", ratio), lambda: im.arange(cmax)[None, None, :] < n_vis[:, :, None])  # [B, T, C]
            # top-k applies once some token sees more rows than k; in `step`, whenever the
            # capacity allows it (each token then keeps all its rows until its count exceeds k)
            select = cmax > cfg.indexer_topk if self._static else (n_vis > cfg.indexer_topk).any()
            if cfg.has_indexer(il) and select:
                with prof.range("indexer"):
                    visible = self.indexer_select(il, xn, qrn, P, ls, visible)
        with prof.range("attention"):
            sinks = self.p(pre + "attn_sinks.weight")
            o = self._attend_ring(q.reshape(B, T, H, K), ls.raw, kv, ls.comp, visible, P, sinks, ratio,
                                  self._static) if self._attend_ring else None     # [B, T, H, K]
            if o is None:
                keys, mask = self.attention_keys(ls, kv, P, visible)               # [B, J, K], [B, T, J]
                o = self.attend(q.reshape(B, T, H, K), keys, mask, sinks)          # [B, T, H, K]
            o = self.tap("attention", il, o)
            n = min(T, W)
            ls.raw[bi, self.idx(("ring", W, n), lambda: P[:, -n:] % W)] = kv[:, -n:]
        with prof.range("attn.out"):
            o = self._rope(o.reshape(N, H, K), P.reshape(N, 1), freq, inverse=True)   # [N, H, K]
            G = cfg.o_groups
            low = ops.linear_grouped(pre + "attn_output_a.weight", o.reshape(N, G, -1))   # [N, G, O]
            y = self.tap("attn.out", il, ops.linear(pre + "attn_output_b.weight", low.reshape(N, -1)))  # [N, D]
            return self.tap("hc_post", il, self.hc_post(X, y, post, comb))           # [N, S, D]

    def attention_keys(self, ls, kv, P, visible):
        """The key rows a call's tokens attend to and which each sees: the window ring in position
        order (positions P0-W..P0-1), this call's rows, then the compressed rows; a raw row is
        seen when it is at or before the token and within the window, a compressed row where
        `visible` [B, T, C] says (None: no compressed rows yet). -> keys [B, J, K], mask [B, T, J]."""
        xp, W, im = self.xp, self.cfg.sliding_window, self._im
        B, T = P.shape
        bi = self.idx(("bi",), lambda: im.arange(B)[:, None])
        hist = self.idx(("hist", W), lambda: (P[:, :1] - W + im.arange(W)) % W)   # [B, W] ring rows
        keys = xp.concatenate([ls.raw[bi, hist], kv], axis=1)                      # [B, W+T, K]
        kpos = P[:, :1] - W + im.arange(W + T)                                     # [B, W+T]
        lo = P[:, :, None] - W - ("attn-window" in self.faults)                   # fault: W+1 keys
        mask = self.idx(("raw_mask", W), lambda: (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= P[:, :, None])
                        & (kpos[:, None, :] > lo))                                  # [B, T, W+T]
        if visible is not None:
            keys = xp.concatenate([keys, ls.comp[:, :visible.shape[-1]]], axis=1)  # [B, R+C, K]
            mask = xp.concatenate([mask, visible], axis=-1)                          # [B, T, R+C]
        return keys, mask

    def attend(self, q, keys, mask, sinks):
        """Softmax attention with a per-head sink; V = K. q [B,T,H,K], keys [B,J,K], mask [B,T,J]."""
        return self._attend(q, keys, mask, sinks)

    def indexer_keys(self, il, xn, P, ls):
        """The indexer's own compressor: one Hadamard/FP4 key per completed ratio-4 window."""
        cfg, ops = self.cfg, self.ops
        B, T = P.shape
        I = cfg.indexer_dim
        pre = f"blk.{il}."
        ape = self.p(pre + "indexer_compressor_ape.weight")                          # [4, 2I]
        ck = ops.linear(pre + "indexer_compressor_kv.weight", xn).reshape(B, T, 2 * I)
        cs = ops.linear(pre + "indexer_compressor_gate.weight", xn).reshape(B, T, 2 * I) + ape[
            self.idx(("phase", 4), lambda: P % 4)]
        ck, cs = self.tap("indexer", il, ck, cs)
        eb, et, rows = self.compress(ls.ick, ls.ics, ck, cs, P, 4, I,
                                     self.p(pre + "indexer_compressor_norm.weight"))
        if rows is not None:
            rows = ops.indexer_round(self._rope(rows, P[eb, et] - 3, self.inv_freq[True]))   # [nE, I]
            rows = self.tap("indexer", il, rows)
            self.emit_rows(ls.ik, eb, et, P, 4, rows)

    def emit_rows(self, store, eb, et, P, ratio, rows):
        """Store the row of each window that ends at (eb, et) at its index (P + 1) // ratio - 1
        of `store` [B, C, width]. In `step` every slot pooled a row: a slot whose window did not
        complete writes back what its index holds (its last row, or row 0 before the first), so
        nothing changes and no decision leaves the device."""
        b = self.idx(("emit_b1", ratio), lambda: eb)
        r = self.idx(("emit_row", ratio), lambda: (P[eb, et] + 1) // ratio - 1)
        if self._static:
            xp = self.xp
            r = self.idx(("emit_row0", ratio), lambda: xp.maximum(r, 0))
            done = self.idx(("emit_done", ratio), lambda: ((P[eb, et] + 1) % ratio == 0)[:, None])
            rows = xp.where(done, rows, store[b, r])
        store[b, r] = rows

    def indexer_select(self, il, xn, qrn, P, ls, visible):
        """Top-k visible compressed rows per token by ReLU-weighted indexer scores [B, T, C]."""
        xp, cfg, ops = self.xp, self.cfg, self.ops
        B, T = P.shape
        N, I, J = B * T, cfg.indexer_dim, cfg.indexer_heads
        pre = f"blk.{il}."
        freq = self.inv_freq[True]
        n_vis = (P + 1) // 4                                                          # [B, T]
        C = visible.shape[-1]
        iq = ops.linear(pre + "indexer.attn_q_b.weight", qrn).reshape(N, J, I)        # [N, J, I]
        iq = ops.indexer_round(self._rope(iq, P.reshape(N, 1), freq)).reshape(B, T * J, I)
        wt = ops.linear(pre + "indexer.proj.weight", xn) * np.float32(1.0 / math.sqrt(I * J))  # [N, J]
        # in `step` the scores stop at each token's count, and a token that keeps all its rows
        # (count <= k) scores none (-inf where not scored)
        count = dict(pos=P, ratio=4, min_rows=cfg.indexer_topk) if self._static else {}
        score = self._iscore(iq.reshape(B, T, J, I), ls.ik[:, :C], wt.reshape(B, T, J), **count)  # [B, T, C]
        score, _ = self.tap("indexer", il, score, visible)                            # compared where visible
        keep = self.tap("indexer", il, ops.topk_mask(score, visible, cfg.indexer_topk))  # [B, T, C] a selection
        return xp.where(self.idx(("topk_on",), lambda: n_vis[..., None] > cfg.indexer_topk), keep, visible)

    # -- FFN sublayer ------------------------------------------------------------------------------
    def ffn(self, il, X, tokens):
        cfg, ops, prof = self.cfg, self.ops, self.prof
        pre = f"blk.{il}."
        with prof.range("hc_pre"):
            x2, post, comb = self.hc_pre(X, pre + "hc_ffn")                             # [N, D], [N, S], [N, S, S]
            xn2 = self._rms(x2, self.p(pre + "ffn_norm.weight"), cfg.rms_eps)       # [N, D]
            xn2, post, comb = self.tap("hc_pre", il, xn2, post, comb)
        with prof.range("moe.router"):
            sel, wts = self.tap("moe.router", il, *self.route(il, xn2, tokens))        # [N, A], [N, A]
        with prof.range("moe.experts"):
            moe = self.tap("moe.experts", il, ops.experts(il, xn2, sel, wts))          # [N, D]
            if self.delay is not None:
                self.delay()
        with prof.range("moe.shared"):
            c = cfg.swiglu_clamp
            g = ops.linear(pre + "ffn_gate_shexp.weight", xn2)                          # [N, F]
            u = ops.linear(pre + "ffn_up_shexp.weight", xn2)                            # [N, F]
            mid = self._swiglu(g, u, c)                                                 # [N, F]
            sh = self.tap("moe.shared", il, ops.linear(pre + "ffn_down_shexp.weight", mid))  # [N, D]
        return self.tap("hc_post", il, self.hc_post(X, moe + sh, post, comb))          # [N, S, D]

    def route(self, il, xn2, tokens):
        """sqrt(softplus) scores; hash table on the first layers, biased top-k elsewhere."""
        ops, pre = self.ops, f"blk.{il}."
        logits = ops.linear(pre + "ffn_gate_inp.weight", xn2)                           # [N, E]
        if il < self.cfg.n_hash_layers:
            return self._route(logits, ops.tid2eid(il, tokens), None)                   # [N, A] from the table
        return self._route(logits, None, ops.param_opt(pre + "exp_probs_b.bias"))

    # -- whole model -------------------------------------------------------------------------------
    def forward(self, state: RunState, tokens: np.ndarray, slots: np.ndarray, all_logits=False, observe=None):
        """Process tokens [B, T] for state slots [B]; return logits [B, V] of each last token
        (or [B, T, V] with all_logits). Advances the slots' positions by T.
        `observe(il, X)`, when given, sees the HC state [N, S, D] after each layer."""
        tokens = np.asarray(tokens, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        B, T = tokens.shape
        P = state.pos[slots][:, None] + np.arange(T)                                    # [B, T]
        state.check_position(int(P.max()))
        inplace = len(slots) == state.batch and bool((slots == np.arange(state.batch)).all())
        self._static, self._im = False, np
        logits = self._run(state, tokens.reshape(-1), P, slots, inplace, all_logits, observe)
        state.pos[slots] += T
        return logits

    def step(self, state: RunState, tokens, pos):
        """One decode token for every slot of `state`, reading nothing from the host: tokens and
        pos are [B] int64 arrays of the array module (device memory on a GPU). Every shape is
        fixed by the state's (batch, ctx) and every count is derived on the device from `pos`
        (compressed rows up to the capacity, completed windows written under a device-side
        condition, the indexer's top-k gated per token), so on a GPU the call can be captured
        in a CUDA graph and replayed with new tokens and positions (graph_gpu.DecodeGraph).
        Returns logits [B, V]; the caller checks the context and advances state.pos."""
        B = state.batch
        self._static, self._im = True, self.xp
        try:
            return self._run(state, tokens.reshape(B), pos.reshape(B, 1), None, True, False, None)
        finally:
            self._static, self._im = False, np

    def _run(self, state, flat, P, slots, inplace, all_logits, observe):
        xp, cfg = self.xp, self.cfg
        B, T = P.shape
        self._memo = {}                        # positions changed: index arrays are rebuilt once
        X = xp.repeat(self.ops.embed(flat)[:, None, :], cfg.hc_streams, axis=1)          # [N, S, D]
        for il in range(cfg.n_layer):
            ls = _SlotView(state.layers[il], None if inplace else self.idx(("slots",), lambda: slots), inplace)
            with self.prof.range(f"layer.{il}"):
                X = self.attention(il, X, P, ls)
                X = self.ffn(il, X, flat)
            ls.write_back()
            if observe is not None:
                observe(il, X)
        if not all_logits:
            X = X.reshape(B, T, *X.shape[1:])[:, -1]
        with self.prof.range("head"):
            logits = self.tap("head", self.cfg.n_layer, self.head(X))                   # [B(*T), V]
        return logits.reshape(B, T, -1) if all_logits else logits

    def head(self, X):
        xp, cfg = self.xp, self.cfg
        N = X.shape[0]
        flat = self._rms(X.reshape(N, cfg.hc_dim), None, cfg.rms_eps)                 # [N, S*D]
        pre = self.ops.linear("output_hc_fn.weight", flat)                                # [N, S]
        wgt = sigmoid(xp, pre * self.p("output_hc_scale.weight")[0]
                      + self.p("output_hc_base.weight")) + cfg.hc_eps                    # [N, S]
        x = self._hc_collapse(X, wgt)                                                     # [N, D]
        x = self._rms(x, self.p("output_norm.weight"), cfg.rms_eps)
        return self.ops.linear("output.weight", x)                                        # [N, V]


class _SlotView:
    """A layer's state restricted to some slots: gathers on entry, scatters back on exit.

    When the slots are 0..B-1 of a B-slot state the arrays are used in place (no copy).
    """

    def __init__(self, ls, slots, inplace: bool):
        self._ls, self._slots, self._inplace = ls, slots, inplace
        arrays = ls.arrays()
        for k, v in arrays.items():
            setattr(self, k, v if self._inplace else v[slots])
        for k in ("comp", "ck", "cs", "ik", "ick", "ics"):
            if not hasattr(self, k):
                setattr(self, k, None)

    def write_back(self):
        if self._inplace:
            return
        for k in self._ls.arrays():
            getattr(self._ls, k)[self._slots] = getattr(self, k)
