"""Decode steps replayed from a CUDA graph (DS4BENCH_DECODE_GRAPH=on): the GPU twin of ds4's
decode graphs (ds4-spec 6.5).

An eager decode step launches a few hundred small kernels from Python, and on a small batch the
host time to issue them is most of the step. `DS4Model.step` computes the same step with every
shape fixed by the run state (batch, context) and every count derived on the device from the
positions, so it can be captured once: `DecodeGraph` runs the first step eagerly (it compiles
and loads every kernel and builds every lazy table), captures the next one on its own stream,
and from then on copies the tokens and positions in, replays the graph and reads the logits.
The capture costs about an eager step on the host, once per engine: short generations (a few
tokens) gain little, the matrix's untimed prime pass absorbs it.

What capture needs, and how it is met:
- no host-device copy and no host read inside the step: the positions are device arrays, the
  windows a step completes are written under a device-side condition, the indexer's top-k is a
  kernel (indexer.cu topk_keep), not a sort;
- no cuBLAS: CuPy refuses cuBLAS calls while a stream captures, so the f32 mode (an F32 weight
  copy multiplied with cuBLAS) and model code left unfused (DS4BENCH_UNFUSED: einsum) decode
  eagerly; `reason` says why, and the run records it;
- memory: everything the step allocates comes from a pool of its own that nothing else uses, so
  the addresses the graph was captured with stay its own across replays; inputs and the output
  are kept alive with it.
The replayed step gives the same bits as the eager one (tests/test_gpu_engine.py).
"""
from __future__ import annotations

import time

import cupy as cp
import numpy as np

from .ops_gpu import SMEM_DEFAULT_MAX, attend_smem, indexer_smem
from .profiling import Profiler


def graph_unsupported(ops, state) -> str | None:
    """Why a decode step on these ops and this run state cannot be captured, or None."""
    if ops.cache == "f32":
        return "the f32 mode multiplies with cuBLAS, which CuPy refuses during stream capture"
    off = sorted(set(ops.unfused) - {"q8quant"})   # q8quant: two launches, no cuBLAS
    if off:
        return f"model code left unfused ({', '.join(off)}) is array code that may call cuBLAS"
    cfg, W = state.cfg, state.cfg.sliding_window
    if any(ls.ik is not None for ls in state.layers):
        J, I = cfg.indexer_heads, cfg.indexer_dim
        if indexer_smem(J, I) > SMEM_DEFAULT_MAX:
            return f"the indexer's {J} heads of {I} do not fit its kernel's shared memory (einsum instead)"
    for ls in state.layers:                 # the static step attends over the whole capacity
        need = max(attend_smem(W + 1 + ls.comp.shape[1]) if ls.comp is not None else 0,
                   8 * ls.ik.shape[1] if ls.ik is not None else 0)
        if need > SMEM_DEFAULT_MAX:
            return (f"context {state.ctx} gives {ls.comp.shape[1]} compressed rows a layer, whose "
                    f"attention or top-k needs {need} bytes of shared memory (limit {SMEM_DEFAULT_MAX})")
    return None


def capture(stream, pool, fn):
    """Capture `fn()` on the non-default `stream`, everything it allocates taken from `pool`:
    (the instantiated graph, fn's result). When fn fails, the capture is ended and fn's error
    is the one raised."""
    with stream, cp.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        try:
            out = fn()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        return stream.end_capture(), out


class DecodeGraph:
    """One decode token for every slot of `state`, captured after a first eager step and replayed.

    `__call__(tokens, pos)` takes host int64 arrays [B] and returns the logits [B, V] on the
    device (valid until the next call). The caller checks the context and advances state.pos.
    """

    def __init__(self, net, state):
        why = graph_unsupported(net.ops, state)
        if why:
            raise ValueError(f"DS4BENCH_DECODE_GRAPH=on: {why}")
        self.net, self.state = net, state
        B = state.batch
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()              # the graph's own: its addresses stay its own
        with self.stream:
            self.tokens = cp.zeros(B, dtype=cp.int64)
            self.pos = cp.zeros(B, dtype=cp.int64)
        self.graph = None
        self.logits = None
        self.replays = 0
        self.capture_s = 0.0                          # host time of the capture (once, second step)

    def _load(self, tokens, pos) -> None:
        self.tokens.set(np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1), stream=self.stream)
        self.pos.set(np.ascontiguousarray(pos, dtype=np.int64).reshape(-1), stream=self.stream)

    def __call__(self, tokens, pos) -> cp.ndarray:
        self.stream.wait_event(cp.cuda.Stream.null.record())   # after the default stream's work (prefill)
        self._load(tokens, pos)
        if self.graph is not None:
            self.graph.launch(self.stream)
            self.replays += 1
            return self.logits
        with self.stream:
            logits = self.net.step(self.state, self.tokens, self.pos)   # eager: loads every kernel
        self._capture()
        return logits

    def _capture(self) -> None:
        """Capture a step on the stream (not run: the eager step has made this one's result)."""
        t0 = time.perf_counter()
        prof, self.net.prof = self.net.prof, Profiler()   # no events or ranges inside the graph
        try:
            graph, logits = capture(self.stream, self.pool,
                                    lambda: self.net.step(self.state, self.tokens, self.pos))
        finally:
            self.net.prof = prof
        graph.upload(self.stream)
        self.graph, self.logits = graph, logits
        self.capture_s = time.perf_counter() - t0

    def to_host(self, logits: cp.ndarray) -> np.ndarray:
        return logits.get(stream=self.stream)         # waits for the step

    def info(self) -> str:
        return (f"captured in {self.capture_s * 1e3:.0f} ms, replayed {self.replays} times, "
                f"{self.pool.total_bytes() / 2 ** 20:.2f} MiB of its own memory")
