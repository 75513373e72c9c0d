"""The stage probe: every stage of every layer of a cell, run on the reference's input to that
stage and compared with an independent reference (docs/verdicts.md).

How it runs. The model calls `self.tap(stage, layer, *arrays)` at each stage's output
(model.py; identity when no probe is attached). The reference engine (NumPy, built without
faults) runs the probe positions with a `Recorder` tap that keeps every stage output. The cell's
own ops then run the same positions with a `Replayer` tap that measures the cell's output
against the recorded one and hands the *reference's* output on: every stage receives the
reference's input, the run state (KV ring, compressed rows, indexer keys) holds reference
values, and an error is measured where it is made instead of after every later layer has
amplified it.

Positions: the cell's prompts joined (up to `tokens` tokens) as one prefill call, then `steps`
decode calls on the reference's greedy tokens. Where the model's late behaviour starts beyond
those positions (the sliding window dropping keys, the indexer selecting a strict subset of the
compressed rows: `late_position`), a lead of more prompt tokens runs first in the reference
alone, and the cell's run starts from the reference's state after it, so the probed positions
lie past that point (on Flash shapes, about 2,000 lead tokens for 80 probed ones); on a cell of batch B every slot holds the probe
sequence (slot 0 prefilled, its state copied to the others, then decode steps of B rows), so
the decode kernels of batch B are the ones probed.
The probe runs the eager `forward`, never a CUDA graph (the KL pass covers the graph path).

The reference: the NumPy engine in the cell's mode for GPU cells, in f32 for NumPy cells (a
NumPy cell against its own mode would compare the code with itself). Its stage outputs are
cached on disk per (model, probe tokens, reference mode, steps).

Statistics per (stage, layer): NMSE = sum (x - ref)^2 / sum ref^2 over the probed positions,
the max |x - ref|, and for a selection (indexer top-k mask, router experts) the fraction of
rows (tokens) whose selected set differs from the reference's. Where a tap carries several arrays (hc_pre: x,
post, comb) the stage's NMSE is the largest of theirs.

Limits (`limit`, `selection_limit`; derivations in docs/verdicts.md). A stage may differ by
what the arithmetic between the cell and the reference costs, never fitted to a model:
  Q8_0 activation quantization (q8 cell vs f32 reference): per 32-value block the scale is
      amax/127 and the rounding error uniform in +-scale/2, so one quantized input costs an NMSE
      of (amax/sigma)^2 / (12 * 127^2): 3.2e-5 for Gaussian blocks (amax ~ 2.5 sigma), 1e-4 for
      the heavy-tailed blocks of SwiGLU products (amax ~ 4.5 sigma). A projection passes the
      NMSE of its input on (random W); n quantized projections in series add n.  Q8_EPS2 = 1e-4
  F16 weights (f16 cell vs f32 reference): each weight rounded to half, relative error uniform
      in +-2^-11: NMSE 2^-22 / 3 = 8e-8 per projection.                         F16_EPS2 = 1e-7
  float32 arithmetic (GPU cell vs NumPy's float64 accumulation, same mode): a dot of n terms
      carries ~n * 2^-48 relative variance; with fast exp/rsqrt and reordered sums 1e-9 covers
      n up to 10^5, per projection of the stage (CHAIN).                         F32_EPS2 = 1e-9
  A coarse rounding after the stage's arithmetic (FP8 e4m3 on KV nope dims and compressed
      rows, FP4 e2m1 on indexer rows): an input error of relative rms e moves a value across a
      rounding midpoint with probability E|d| / s = 0.8 e / u (s = u|x| the spacing there) and
      then costs s^2: NMSE ~ 0.8 u e. Mean relative spacing u: e4m3 0.09 (1/16..1/8), e2m1 0.4.
      COARSE = 0.8 u: 0.072 and 0.32. On a GPU the same holds for the Q8_0/Q8_K activation
      quantization of an input computed in float32 (a norm, SwiGLU, an F16 projection): flips
      cost (step/sigma)^2 with step/sigma ~ 4.5/127, NMSE ~ 0.64 e step/sigma: Q8_FLIP = 0.023
      per re-quantized input (REQUANT).
  limit = MARGIN * (eps2 + COARSE * sqrt(eps2)) + FLOOR with MARGIN = 2 (the derivations take
  the heavy-tailed case already) and FLOOR = 1e-12 (float32 vs float64 rounding of a stage
  NumPy computes identically in both modes: there every healthy NMSE is exactly 0).
  Selections (router experts, indexer top-k): a flip needs a near tie, whose frequency grows
  with the input error: at most SEL_FRACTION * sqrt(eps2 upstream) + SEL_FLOOR of the rows
  may select a different set (SEL_FLOOR 0.02: one flipped near tie among a probe's ~85 rows).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.options import get, parse_count

STAGES = ("hc_pre", "attn.q", "attn.kv", "compressor", "indexer", "attention", "attn.out", "hc_post",
          "moe.router", "moe.experts", "moe.shared", "head")
DEFAULT_TOKENS, DEFAULT_STEPS = 80, 4
VERSION = 1                     # bump when what the reference records changes (invalidates the cache)

# ---- limits -------------------------------------------------------------------------------------
Q8_EPS2, F16_EPS2, F32_EPS2 = 1e-4, 1e-7, 1e-9
MARGIN, FLOOR, SEL_FRACTION, SEL_FLOOR = 2.0, 1e-12, 2.0, 0.02
# per stage: quantized (cache-eligible Q8_0) projections in series from the stage's input to its
# output, and the coarse rounding after them (0.8 x mean relative spacing: FP8 e4m3 0.09, FP4 e2m1 0.4)
Q8_CHAIN = {"attn.q": 2, "attn.kv": 1, "attn.out": 2, "moe.shared": 2}
COARSE = {"attn.kv": 0.8 * 0.09, "compressor": 0.8 * 0.09, "indexer": 0.8 * 0.4}
# every projection of a stage (any type) in series, for the GPU's float32 arithmetic
# on a GPU, Q8_0/Q8_K inputs re-quantized after float math in the stage (a float32-level
# difference there moves whole quantization steps now and then): Q8_FLIP = 0.64 * 4.5 / 127
REQUANT = {"attn.q": 1, "attn.out": 1, "moe.shared": 1, "moe.experts": 2, "head": 1}
Q8_FLIP = 0.023
CHAIN = {"hc_pre": 2, "attn.q": 2, "attn.kv": 1, "compressor": 2, "indexer": 3, "attention": 2,
         "attn.out": 2, "hc_post": 1, "moe.router": 1, "moe.experts": 3, "moe.shared": 3, "head": 3}


def reference_mode(backend: str, cache: str) -> str:
    """The reference engine's mode: the cell's for a GPU cell, f32 for a NumPy cell."""
    from ..engine.ops_ref import CACHE_MODES
    if backend == "numpy":
        return "f32"
    return cache if cache in CACHE_MODES else "q8"


def eps2(backend: str, cache: str, stage: str) -> float:
    """NMSE one step of the cell's arithmetic may add against the reference at `stage`
    (times the number of steps in series): the mode's for NumPy cells, float32's on a GPU."""
    if backend != "numpy":
        return CHAIN[stage] * F32_EPS2
    mode = cache if cache in ("f16", "f32") else "q8"      # an unknown (plugin) mode: the loosest
    per = {"q8": Q8_EPS2, "f16": F16_EPS2, "f32": 0.0}[mode]
    return Q8_CHAIN.get(stage, 0) * per


def limit(backend: str, cache: str, stage: str) -> float:
    """The largest healthy NMSE of `stage` for a cell of this backend and mode."""
    e2 = eps2(backend, cache, stage)
    coarse = COARSE.get(stage, 0.0) + (REQUANT.get(stage, 0) * Q8_FLIP if backend != "numpy" else 0.0)
    return MARGIN * (e2 + coarse * math.sqrt(e2)) + FLOOR


def selection_limit(backend: str, cache: str, stage: str) -> float:
    """The largest healthy fraction of a selection's entries that may differ."""
    upstream = eps2(backend, cache, "attn.q") if stage == "indexer" else eps2(backend, cache, "moe.shared")
    return SEL_FRACTION * math.sqrt(upstream) + SEL_FLOOR


# ---- taps -----------------------------------------------------------------------------------------
def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


class Recorder:
    """The reference's tap: keeps a host copy of every stage output of the current call."""

    def __init__(self):
        self.calls: list[list[tuple[str, int, list[np.ndarray]]]] = []

    def begin(self) -> None:
        self.calls.append([])

    def __call__(self, stage: str, il: int, *arrays):
        self.calls[-1].append((stage, il, [np.array(_host(a)) for a in arrays]))
        return arrays[0] if len(arrays) == 1 else arrays


@dataclass
class StageStat:
    stage: str
    layer: int
    sq_err: float = 0.0                 # per array of the tap: sum (x - ref)^2, sum ref^2
    sq_ref: float = 0.0
    nmse: float = 0.0                   # the largest over the tap's arrays (filled by finish)
    max_abs: float = 0.0
    sel_differ: int = 0                 # selections: rows (tokens) whose selected set differs
    sel_total: int = 0
    nonfinite: bool = False

    def to_dict(self) -> dict:
        d = {"stage": self.stage, "layer": self.layer, "nmse": self.nmse, "max_abs": self.max_abs}
        if self.sel_total:
            d["sel_differ"] = self.sel_differ / self.sel_total
        if self.nonfinite:
            d["nonfinite"] = True
        return d


class Replayer:
    """The cell's tap: measures each stage output against the reference's and returns the
    reference's (tiled over the cell's batch, on the cell's array module)."""

    def __init__(self, calls, xp):
        self.calls, self.xp = calls, xp
        self.stats: dict[tuple[str, int], StageStat] = {}
        self._sums: dict[tuple[str, int, int], list[float]] = {}
        self._call, self._i = None, 0

    def begin(self, call: int) -> None:
        self._call, self._i = self.calls[call], 0

    def __call__(self, stage: str, il: int, *arrays):
        want_stage, want_il, refs = self._call[self._i]
        self._i += 1
        if (want_stage, want_il) != (stage, il) or len(refs) != len(arrays):
            raise RuntimeError(f"probe: tap {stage} layer {il} where the reference had {want_stage} layer {want_il}")
        st = self.stats.setdefault((stage, il), StageStat(stage, il))
        cells = [_host(a) for a in arrays]
        refs = [_tile(r, c.shape) for r, c in zip(refs, cells)]
        self._measure(st, cells, refs)
        out = tuple(self.xp.asarray(r.astype(c.dtype, copy=False)) for r, c in zip(refs, cells))
        return out[0] if len(out) == 1 else out

    def _measure(self, st: StageStat, cells, refs) -> None:
        if len(cells) == 2 and cells[0].dtype.kind in "iu" and cells[1].dtype.kind == "f":
            # router (experts [N, A], weights [N, A]): the selection, and the weights as a dense
            # [N, E] gate vector, so a flipped near tie costs its two small weights, not a row
            cs, cw = cells
            rs, rw = refs
            E = int(max(cs.max(initial=0), rs.max(initial=0))) + 1
            rows = list(zip(rs.reshape(-1, rs.shape[-1]).tolist(), cs.reshape(-1, cs.shape[-1]).tolist()))
            st.sel_differ += sum(set(r) != set(c) for r, c in rows)
            st.sel_total += len(rows)
            cells, refs = [_dense(cs, cw, E)], [_dense(rs, rw, E)]
        mask = None
        if len(cells) >= 2 and cells[-1].dtype == bool and refs[-1].shape == refs[0].shape:
            mask = refs[-1]                     # which entries count (indexer scores: the visible rows)
            cells, refs = cells[:-1], refs[:-1]
        for j, (c, r) in enumerate(zip(cells, refs)):
            if c.dtype == bool:                 # a selection mask (indexer top-k), one row per token
                st.sel_differ += int(np.count_nonzero((r != c).reshape(-1, r.shape[-1]).any(axis=1)))
                st.sel_total += int(np.prod(r.shape[:-1]))
                continue
            c, r = c.astype(np.float64), r.astype(np.float64)
            if mask is not None:
                c, r = c[mask], r[mask]
            fin = np.isfinite(r)
            if not np.array_equal(np.isfinite(c), fin):
                st.nonfinite = True
                continue
            d = c[fin] - r[fin]
            s = self._sums.setdefault((st.stage, st.layer, j), [0.0, 0.0])
            s[0] += float(np.dot(d, d))
            s[1] += float(np.dot(r[fin], r[fin]))
            st.max_abs = max(st.max_abs, float(np.abs(d).max(initial=0.0)))

    def finish(self) -> list[StageStat]:
        for (stage, il, _), (num, den) in self._sums.items():
            st = self.stats[(stage, il)]
            v = num / den if den > 0 else (0.0 if num == 0 else math.inf)
            st.nmse = max(st.nmse, v)
        for st in self.stats.values():
            if st.nonfinite:
                st.nmse = math.inf
        return sorted(self.stats.values(), key=lambda s: (s.layer, STAGES.index(s.stage)))


def _tile(ref: np.ndarray, shape) -> np.ndarray:
    """The reference row(s) repeated over the cell's batch (every slot holds the probe sequence)."""
    if ref.shape == tuple(shape):
        return ref
    k = shape[0] // max(ref.shape[0], 1)
    if ref.ndim and k * ref.shape[0] == shape[0] and ref.shape[1:] == tuple(shape[1:]):
        return np.concatenate([ref] * k, axis=0)
    raise RuntimeError(f"probe: the cell's stage output {tuple(shape)} does not match the reference's {ref.shape}")


def _dense(sel: np.ndarray, w: np.ndarray, E: int) -> np.ndarray:
    sel, w = sel.reshape(-1, sel.shape[-1]), w.reshape(-1, w.shape[-1])
    out = np.zeros((sel.shape[0], E), np.float64)
    np.add.at(out, (np.arange(sel.shape[0])[:, None], sel), w)
    return out


# ---- running ------------------------------------------------------------------------------------
def probe_tokens(prompts: list[tuple[str, list[int]]], tokens: int = DEFAULT_TOKENS, lead: int = 0) -> list[int]:
    """The probe's token stream: `lead` tokens then at most `tokens` probed ones, the prompts'
    tokens joined and, for a lead, repeated as often as it takes."""
    ids = [t for _, p in prompts for t in p]
    if lead and ids:
        ids = ids * -(-(lead + tokens) // len(ids))
    return ids[:lead + tokens]


def late_position(cfg) -> int:
    """The position from which every stage works in full: the sliding window drops keys past
    `sliding_window`, and an indexer layer (ratio 4, pos // 4 compressed rows) selects a strict
    subset of its rows past 4 * indexer_topk. Faults there (a window off by one, a top-k that
    keeps k - 1 rows) show only beyond it."""
    late = cfg.sliding_window
    if any(cfg.has_indexer(il) for il in range(cfg.n_layer)):
        late = max(late, 4 * (cfg.indexer_topk + 1))
    return late


def lead_for(cfg, tokens: int) -> int:
    """Lead tokens for a probe of `tokens` prefill positions: none when they already run past
    late_position, else enough that the second half of them does."""
    late = late_position(cfg)
    return 0 if tokens > late else late - tokens // 2


# The lead's prefill calls, in tokens. A call routes its tokens to nearly every expert, and each
# expert's int_matmul layout is built once per call where they do not all fit the bounded memo
# (formats.PreparedMemo: Flash's 256 experts x 3 matrices of 34 MB a layer do not), so fewer,
# longer calls build fewer layouts. Chunking never changes the results.
LEAD_CHUNK = 2048


def record_reference(mf, mode: str, ids: list[int], steps: int, lead: int = 0) -> dict:
    """Run the NumPy engine (no faults) on the probe positions; its stage outputs per call and
    its greedy decode tokens. The first `lead` ids run untapped before them, and the state they
    leave (slot 0) is returned as `lead_state` for the cell's run to start from."""
    from ..engine.generate import Engine, greedy
    probed = ids[lead:]
    eng = Engine(mf, mode=mode, backend="numpy", batch=1, ctx=len(ids) + steps + 1, chunk=len(probed))
    for at in range(0, lead, LEAD_CHUNK):
        eng.net.forward(eng.state, np.asarray([ids[at:min(lead, at + LEAD_CHUNK)]]), np.array([0]))
    lead_state = [{k: np.array(v[0]) for k, v in ls.arrays().items()} for ls in eng.state.layers] if lead else []
    rec = Recorder()
    eng.net.tap = rec
    rec.begin()
    logits = eng.net.forward(eng.state, np.asarray([probed]), np.array([0]))
    fed = []
    for _ in range(steps):
        fed.append(greedy(_host(logits[0])))
        rec.begin()
        logits = eng.net.forward(eng.state, np.asarray([[fed[-1]]]), np.array([0]))
    return {"calls": rec.calls, "fed": fed, "lead": lead, "lead_state": lead_state}


def model_key(params: dict) -> str:
    """What identifies the model's weights: the file (path, size, first MiB) or the preset and seed."""
    f = params.get("model_file")
    if f:
        st = os.stat(f)
        with open(f, "rb") as fh:
            head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
        return f"{os.path.abspath(f)}:{st.st_size}:{head}"
    return f"{params.get('preset')}:{params.get('variant')}:{params.get('seed')}"


def cache_path(cache_dir: Path, key: str, mode: str, ids: list[int], steps: int, lead: int = 0) -> Path:
    h = hashlib.sha256(json.dumps([VERSION, key, mode, ids, steps] + ([lead] if lead else [])).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"probe-ref-{mode}-{h}.npz"


def save_reference(path: Path, ref: dict) -> None:
    arrays = {"fed": np.asarray(ref["fed"], np.int64), "lead": np.asarray(ref.get("lead", 0), np.int64)}
    for il, layer in enumerate(ref.get("lead_state") or []):
        for k, a in layer.items():
            arrays[f"lead.{il}.{k}"] = a
    index = []
    for c, call in enumerate(ref["calls"]):
        for i, (stage, il, arrs) in enumerate(call):
            index.append([c, i, stage, il, len(arrs)])
            for j, a in enumerate(arrs):
                arrays[f"c{c}.e{i}.a{j}"] = a
    arrays["index"] = np.asarray(json.dumps(index))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_reference(path: Path) -> dict:
    with np.load(path) as z:
        index = json.loads(str(z["index"]))
        calls: list[list] = [[] for _ in range(1 + max((e[0] for e in index), default=-1))]
        for c, i, stage, il, n in index:
            calls[c].append((stage, il, [z[f"c{c}.e{i}.a{j}"] for j in range(n)]))
        lead = int(z["lead"]) if "lead" in z.files else 0
        state: list[dict] = []
        for name in z.files:
            if name.startswith("lead."):
                _, il, k = name.split(".")
                while len(state) <= int(il):
                    state.append({})
                state[int(il)][k] = z[name]
        return {"calls": calls, "fed": z["fed"].tolist(), "lead": lead, "lead_state": state}


@contextlib.contextmanager
def _computing(path: Path | None):
    """Held while one process computes the reference for `path`: cells of the same mode that run
    at once (the pool executor, a shared GPU) wait for the first and read its cache file rather
    than each computing it (on flash-4l with the lead, ~6 minutes and ~40 GB of host memory
    each). An advisory lock on a side file; the kernel drops it when its holder dies."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(path: Path | None) -> dict | None:
    if path and path.is_file():
        try:
            return load_reference(path)
        except (OSError, ValueError, KeyError):
            pass                                    # a damaged cache file is recomputed
    return None


def reference(mf, params: dict, mode: str, ids: list[int], steps: int, cache_dir: Path | None,
              lead: int = 0) -> tuple[dict, bool]:
    """The reference's stage outputs, from the cache when it has them; (ref, from_cache)."""
    path = cache_path(cache_dir, model_key(params), mode, ids, steps, lead) if cache_dir else None
    if (ref := _cached(path)) is not None:
        return ref, True
    with _computing(path):
        if (ref := _cached(path)) is not None:      # another cell computed it while this one waited
            return ref, True
        ref = record_reference(mf, mode, ids, steps, lead)
        if path:
            save_reference(path, ref)
    return ref, False


def run_probe(ops, mf, batch: int, ref: dict, ids: list[int], **engine_opts) -> list[StageStat]:
    """Run the cell's ops (its mode, kernels and faults) on the probe positions of every slot of
    a batch-`batch` state, each stage on the reference's input; the per-(stage, layer) stats.
    `ids` are the whole stream: with a lead (ref["lead"]), slot 0 starts from the reference's
    state after it. `engine_opts` go to the probe's Engine (the cell engine's faults, where it
    has them)."""
    from ..engine.generate import Engine
    lead = ref.get("lead", 0)
    probed = ids[lead:]
    eng = Engine(mf, mode="f32", batch=batch, ctx=len(ids) + len(ref["fed"]) + 1, ops=ops,
                 chunk=len(probed), decode_graph="off", **engine_opts)
    rep = Replayer(ref["calls"], eng.xp)
    eng.net.tap = rep
    try:
        if lead:
            for ls, saved in zip(eng.state.layers, ref["lead_state"]):
                for k, v in saved.items():
                    getattr(ls, k)[0] = eng.xp.asarray(v)
            eng.state.pos[0] = lead
        rep.begin(0)
        eng.net.forward(eng.state, np.asarray([probed]), np.array([0]))
        # the prefill left reference values in slot 0's state (every write is tapped): the other
        # slots start from a copy, and the decode steps run all B rows through the batch kernels
        for ls in eng.state.layers:
            for a in ls.arrays().values():
                a[1:] = a[:1]
        eng.state.pos[1:] = eng.state.pos[0]
        for k, tok in enumerate(ref["fed"]):
            rep.begin(k + 1)
            eng.net.forward(eng.state, np.full((batch, 1), tok), np.arange(batch))
        eng.sync()
    finally:
        eng.net.tap = _identity
    return rep.finish()


def _identity(stage, il, *arrays):
    return arrays[0] if len(arrays) == 1 else arrays


def judge_stages(stats: list[dict], backend: str, cache: str) -> dict | None:
    """The first (layer, then stage order) stage over its limit, as {stage, layer, reason}; None
    when every stage is within its limits."""
    for s in stats:
        lim = limit(backend, cache, s["stage"])
        if s.get("nonfinite") or not math.isfinite(s["nmse"]):
            return {"stage": s["stage"], "layer": s["layer"],
                    "reason": f"{s['stage']}, layer {s['layer']}, NaN/Inf where the reference is finite"}
        if s["nmse"] > lim:
            return {"stage": s["stage"], "layer": s["layer"],
                    "reason": f"{s['stage']}, layer {s['layer']}, NMSE {s['nmse']:.2g} > {lim:.2g}"}
        if "sel_differ" in s and s["sel_differ"] > selection_limit(backend, cache, s["stage"]):
            sl = selection_limit(backend, cache, s["stage"])
            return {"stage": s["stage"], "layer": s["layer"],
                    "reason": f"{s['stage']}, layer {s['layer']}, {s['sel_differ']:.2g} of the selections "
                              f"differ > {sl:.2g}"}
    return None


def tokens_from_env(environ=None) -> int:
    """DS4BENCH_PROBE_TOKENS: the probe's prefill length (default 80; 0 turns the probe off)."""
    return parse_count("DS4BENCH_PROBE_TOKENS", get("DS4BENCH_PROBE_TOKENS", environ), DEFAULT_TOKENS,
                       " (0 turns the probe off)")


def lead_from_env(environ, cfg, tokens: int) -> int:
    """DS4BENCH_PROBE_LEAD: lead tokens before the probed ones (default: lead_for the model;
    0 probes from position 0, faster on Flash shapes but blind past the window and top-k)."""
    text = get("DS4BENCH_PROBE_LEAD", environ)
    if text is None or text == "" or text == "auto":
        return lead_for(cfg, tokens)
    return parse_count("DS4BENCH_PROBE_LEAD", text, 0, " (or auto)")


def probe_cell(mf, ops, params: dict, prompts, cache_dir: Path | None, environ=None,
               **engine_opts) -> dict:
    """The probe of one cell: {probe_mode, probe_positions, probe_stages [...], probe_s,
    probe_cached, verdict_stage, verdict_layer, probe_reason}; {} when the probe is off.
    The reference is cached in `cache_dir` (the run's probe-cache/), or in $DS4BENCH_PROBE_CACHE
    when set (shared by several runs of one model)."""
    import time
    n = tokens_from_env(environ)
    if n == 0:
        return {}
    t0 = time.perf_counter()
    lead = lead_from_env(environ, mf.cfg, n)
    ids = probe_tokens(prompts, n, lead)
    lead = min(lead, max(len(ids) - 1, 0))
    mode = reference_mode(params["backend"], params["cache"])
    shared = get("DS4BENCH_PROBE_CACHE", environ)
    cache_dir = Path(shared) if shared else cache_dir
    ref, cached = reference(mf, params, mode, ids, DEFAULT_STEPS, cache_dir, lead)
    stats = [s.to_dict() for s in run_probe(ops, mf, params["batch"], ref, ids, **engine_opts)]
    bad = judge_stages(stats, params["backend"], params["cache"])
    return {"probe_mode": mode, "probe_positions": len(ids) - lead + len(ref["fed"]), "probe_lead": lead,
            "probe_stages": stats,
            "probe_s": time.perf_counter() - t0, "probe_cached": cached,
            "verdict_stage": bad["stage"] if bad else None, "verdict_layer": bad["layer"] if bad else None,
            "probe_reason": bad["reason"] if bad else ""}
