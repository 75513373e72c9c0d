"""Prefill, decode, batched greedy generation and the fingerprints the matrix compares.

An `Engine` owns one model, one numeric mode and one run state allocated for (batch, ctx).
`generate` runs prompts as B sequences decoded together: with fewer prompts than B the prompts
are repeated to fill every slot (a batch is measured full), with more they run in groups of B.
Each prompt's fingerprint is taken from its first slot; the other slots holding the same prompt
must produce the same tokens, and a mismatch is reported (`replica_mismatch`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .gguf_io import ModelFile
from .model import DS4Model
from .options import EngineOptions, get as env_get
from .profiling import Profiler
from .state import RunState

TOP_K = 20


def token_hash(tokens) -> str:
    """sha256 of the token ids as little-endian int32 (the fingerprint of a greedy output)."""
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


@dataclass
class Fingerprint:
    prompt_id: str
    prompt_tokens: int
    tokens: list[int]
    sha256: str
    text: str
    topk_ids: list[list[int]]           # per generated step, best first
    topk_logprobs: list[list[float]]
    nonfinite: bool = False             # NaN/Inf seen in any step's logits
    replica_mismatch: int = 0           # other slots with this prompt that generated different tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    prefill_s: float = 0.0              # all prompt processing
    prefill_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)    # per sequence: its prefill + first token
    step_s: list[float] = field(default_factory=list)    # per decode step (B tokens each)
    step_tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        t = sum(self.step_s)
        return sum(self.step_tokens) / t if t > 0 else 0.0


@dataclass
class GenerationResult:
    fingerprints: list[Fingerprint]
    timing: Timing
    first_logits: dict[str, np.ndarray]     # prompt id -> float32 [V] logits of the first generated step
    logprobs: dict[str, np.ndarray] = field(default_factory=dict)   # teacher forcing: id -> float16 [n, V] log-softmax


# Extra numeric modes registered at run time, e.g. by a plugin module named in DS4BENCH_PLUGINS.
# The tests register a deliberately broken one to check that the matrix catches it.
EXTRA_MODES: dict[str, Callable] = {}


def register_mode(name: str, factory: Callable) -> None:
    """`factory(model, options)` returns an ops object for numeric mode `name` (options: an
    options.EngineOptions)."""
    EXTRA_MODES[name] = factory


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the comma-separated modules in `spec` (default: $DS4BENCH_PLUGINS)."""
    names = [n.strip() for n in (spec if spec is not None else env_get("DS4BENCH_PLUGINS") or "").split(",")]
    for n in filter(None, names):
        try:
            importlib.import_module(n)
        except ImportError as e:
            raise ImportError(f"DS4BENCH_PLUGINS: cannot import {n!r} ({e}; is its folder on PYTHONPATH?)") from None
    return [n for n in names if n]


def gpu_unavailable_reason() -> str:
    """Why the GPU backend cannot run in this process, or '' when it can: CuPy imports, a CUDA
    device is visible and the GPU engine (`ds4bench.engine.ops_gpu`) imports."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as e:
        return f"no CUDA device is visible ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        from . import ops_gpu  # noqa: F401
    except ImportError as e:
        return f"the GPU engine does not import ({e})"
    return ""


def gpu_available() -> bool:
    return not gpu_unavailable_reason()


def make_ops(model: ModelFile, options: EngineOptions):
    """The heavy operations of `options.mode` on `options.backend` (a plugin's mode: its factory)."""
    if options.mode in EXTRA_MODES:
        if options.faults:
            raise ValueError(f"faults {', '.join(sorted(options.faults))} apply to the built-in modes, "
                             f"not {options.mode!r}")
        return EXTRA_MODES[options.mode](model, options)
    if options.backend == "numpy":
        from .ops_ref import RefOps
        return RefOps(model, options.mode, faults=options.faults)
    from .ops_gpu import GpuOps          # imported only when asked: the CPU path never needs CuPy
    return GpuOps(model, options)


class Engine:        # engine_api.InferenceEngine
    """One model, one EngineOptions (numeric mode, backend, batch, context, toggles) and one run
    state allocated for them. `Engine(model, options)`, or `Engine(model, mode="q8", batch=2)`:
    keyword fields build the options (over `options` when both are given)."""

    def __init__(self, model: ModelFile, options: EngineOptions | None = None, *,
                 profiler: Profiler | None = None, ops=None, **fields):
        options = options or EngineOptions()
        self.options = options = options.replace(**fields) if fields else options
        self.model, self.cfg = model, model.cfg
        self.cache, self.backend, self.batch, self.ctx = options.mode, options.backend, options.batch, options.ctx
        self.prefill_chunk = options.chunk
        # injected faults (faults.py) come in the options, never from the environment here, so a
        # reference engine built in the same process without them stays healthy
        self.faults = options.faults
        if ops is not None and frozenset(ops.faults) != self.faults:
            raise ValueError(f"ops carry faults {sorted(ops.faults)}, the engine {sorted(self.faults)}")
        self.ops = ops if ops is not None else make_ops(model, options)
        self.xp = self.ops.xp
        self.net = DS4Model(self.cfg, self.ops, profiler, self.faults)
        self.state = RunState.allocate(self.cfg, options.batch, options.ctx, self.xp, self.ops.alloc)
        if options.slowdown is not None:        # a known slowdown (slowdown.Slowdown), for speed tests
            from .slowdown import Delay
            self.net.delay = Delay(options.slowdown, self.ops, self.cfg.n_layer)
        # how a decode step of every slot runs: "eager" (kernels launched from Python), "graph"
        # (decode_graph "on": replayed from a CUDA graph), or eager with the reason the graph
        # does not apply
        self.graph, self.decode_path = None, "eager"
        if options.decode_graph == "on":
            why = "the NumPy engine has no CUDA graphs" if self.xp is np else None
            if why is None:
                from .graph_gpu import DecodeGraph, graph_unsupported
                why = graph_unsupported(self.ops, self.state)
                if why is None:
                    self.graph, self.decode_path = DecodeGraph(self.net, self.state), "graph"
            if why:
                self.decode_path = f"eager (DS4BENCH_DECODE_GRAPH=on does not apply: {why})"

    @property
    def prof(self) -> Profiler:
        return self.net.prof

    def sync(self) -> None:
        self.ops.sync()

    def facts(self) -> dict:
        """engine_api.InferenceEngine.facts: the options, how decode runs, whether a graph can
        be captured, and the GPU ops' memory report (weights, caches, pool) where there is one."""
        memory = getattr(self.ops, "memory", None)          # GpuOps only
        return {"engine": "ds4bench", "backend": self.backend, "mode": self.cache, "batch": self.batch,
                "ctx": self.ctx, "decode_path": self.decode_path, "graph": self.graph is not None,
                "faults": sorted(self.faults), "memory": memory() if memory else None}

    def prefill(self, slot: int, ids) -> np.ndarray:
        """Prompt tokens into one slot, in chunks, layer-major; returns the last token's logits [V]."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("empty prompt")
        if len(ids) + int(self.state.pos[slot]) > self.ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit context {self.ctx}")
        logits = None
        with self.prof.range("prefill"):
            for c0 in range(0, len(ids), self.prefill_chunk):
                chunk = ids[c0:c0 + self.prefill_chunk]
                logits = self.net.forward(self.state, chunk[None, :], np.array([slot]))
        return self.to_host(logits[0])

    def decode(self, tokens, slots) -> np.ndarray:
        """One token for each slot in one step; returns logits [B, V] on the host."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        slots = np.asarray(slots)
        g = self.graph
        if g is not None and len(slots) == self.batch and (slots == np.arange(self.batch)).all():
            self.state.check_position(int(self.state.pos.max()))
            with g.stream, self.prof.range("decode"):
                logits = g(tokens, self.state.pos)
            self.state.pos += 1
            return g.to_host(logits)
        with self.prof.range("decode"):
            logits = self.net.forward(self.state, tokens, slots)
        return self.to_host(logits)

    def to_host(self, a) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)


def topk_logprobs(logits: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Best-first ids and log-probabilities (float64 log-softmax) of one step's logits [V]."""
    z = logits.astype(np.float64)
    m = np.max(z)
    lp = z - m - np.log(np.sum(np.exp(z - m)))
    neg = -lp
    if k < len(neg):                        # a partition, then a stable sort of the few candidates:
        kth = np.partition(neg, k - 1)[k - 1]           # what a full stable argsort picks, in O(V)
        if not np.isnan(kth):
            cand = np.flatnonzero(neg <= kth)           # ascending ids: ties stay lower id first
            ids = cand[np.argsort(neg[cand], kind="stable")][:k]
            return ids, lp[ids]
    ids = np.argsort(neg, kind="stable")[:k]
    return ids, lp[ids]


def greedy(logits: np.ndarray) -> int:
    """argmax with ties to the lower id; a NaN row picks token 0 (and is flagged by the caller)."""
    row = np.where(np.isfinite(logits), logits, -np.inf)
    return int(np.argmax(row))


def generate(engine: Engine, prompts: list[tuple[str, list[int]]], n_gen: int, decode_text=None,
             top_k: int = TOP_K, forced: dict | None = None) -> GenerationResult:
    """Greedy-generate n_gen tokens for every prompt with engine.batch sequences per step.

    `forced` (prompt id -> at least n_gen tokens) is teacher forcing: each step is fed the given
    token instead of the greedy one, and every step's full log-softmax of the prompt's first
    slot is kept (`logprobs`, float16 [n_gen, V]); the fingerprints still record the greedy
    choice of each step."""
    if n_gen < 1:
        raise ValueError("n_gen must be at least 1")
    short = [pid for pid, _ in prompts if forced is not None and len(forced.get(pid, ())) < n_gen]
    if short:
        raise ValueError(f"teacher forcing: no {n_gen} tokens to feed for prompt {short[0]!r}")
    B = engine.batch
    timing = Timing()
    fps: dict[str, Fingerprint] = {}
    first_logits: dict[str, np.ndarray] = {}
    logprobs: dict[str, list] = {}
    # slot assignment: fill every slot, cycling through prompts; more prompts -> more groups
    order = list(range(len(prompts)))
    groups = [order[i:i + B] for i in range(0, len(order), B)]
    for group in groups:
        members = [group[b % len(group)] for b in range(B)]
        slots = np.arange(B)
        engine.state.reset()
        outs: list[list[int]] = [[] for _ in range(B)]
        steps: list[list[tuple]] = [[] for _ in range(B)]
        bad = [False] * B
        pre_logits = []
        last = np.zeros(B, dtype=np.int64)
        for b, pi in enumerate(members):
            t0 = time.perf_counter()
            logits = engine.prefill(b, prompts[pi][1])
            tok = greedy(logits)
            dt = time.perf_counter() - t0
            timing.prefill_s += dt
            timing.prefill_tokens += len(prompts[pi][1])
            timing.ttft_s.append(dt)
            _record(outs[b], steps[b], logits, tok, top_k)
            bad[b] |= not np.isfinite(logits).all()
            first_logits.setdefault(prompts[pi][0], logits.astype(np.float32))
            last[b] = tok
            pre_logits.append(logits)
        keep = {b: logprobs.setdefault(prompts[pi][0], []) for b, pi in enumerate(members)
                if forced is not None and members.index(pi) == b}      # each prompt's first slot
        if forced is not None:
            for b, lp in keep.items():
                lp.append(log_softmax16(pre_logits[b]))
            last = np.array([forced[prompts[pi][0]][0] for pi in members], dtype=np.int64)
        for i in range(n_gen - 1):
            t0 = time.perf_counter()
            logits = engine.decode(last, slots)                                  # [B, V]
            last = np.array([greedy(row) for row in logits], dtype=np.int64)
            timing.step_s.append(time.perf_counter() - t0)
            timing.step_tokens.append(B)
            for b in range(B):
                _record(outs[b], steps[b], logits[b], int(last[b]), top_k)
                bad[b] |= not np.isfinite(logits[b]).all()
            if forced is not None:
                for b, lp in keep.items():
                    lp.append(log_softmax16(logits[b]))
                last = np.array([forced[prompts[pi][0]][i + 1] for pi in members], dtype=np.int64)
        for b, pi in enumerate(members):
            pid, ids = prompts[pi]
            if pid in fps:
                fps[pid].replica_mismatch += int(fps[pid].tokens != outs[b])
                continue
            fps[pid] = Fingerprint(
                prompt_id=pid, prompt_tokens=len(ids), tokens=outs[b], sha256=token_hash(outs[b]),
                text=decode_text(outs[b]) if decode_text else "",
                topk_ids=[s[0] for s in steps[b]], topk_logprobs=[s[1] for s in steps[b]], nonfinite=bad[b])
    return GenerationResult([fps[p[0]] for p in prompts], timing, first_logits,
                            {pid: np.stack(v) for pid, v in logprobs.items()})


def log_softmax16(logits: np.ndarray) -> np.ndarray:
    """A step's full log-softmax (computed in float64) stored as float16 [V]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return (z - np.log(np.sum(np.exp(z)))).astype(np.float16)


def _record(out: list, steps: list, logits: np.ndarray, tok: int, k: int) -> None:
    ids, lps = topk_logprobs(logits, k)
    out.append(tok)
    steps.append(([int(i) for i in ids], [round(float(v), 6) for v in lps]))
