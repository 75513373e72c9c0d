"""Stage ranges: named after the code (`prefill`, `decode`, `layer.N`, `attn.q`, `moe.experts`, ...).

`Profiler.range(name)` is what the engine calls around each stage. Off, it returns one shared
null context (no allocation, no clock read, no synchronization). The host timer sums wall time
per range name; backends may subclass to emit NVTX ranges or record device events.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

_NULL = contextlib.nullcontext()


class Profiler:
    """Disabled profiler: every range is free."""
    enabled = False

    def range(self, name: str):
        return _NULL

    def summary(self) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        pass


class HostTimer(Profiler):
    """Wall-clock time per range name on the host, in seconds (nested ranges count in both)."""
    enabled = True

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def range(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def summary(self) -> dict[str, float]:
        return dict(self.total)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


def stage_of(name: str) -> str:
    """Collapse `layer.12` into `layer` so per-stage sums are comparable across models."""
    head, _, tail = name.partition(".")
    return head if tail.isdigit() else name


class NvtxRanges(Profiler):
    """NVTX ranges in the `ds4bench` domain (for Nsight Systems); never synchronizes."""
    enabled = True

    def __init__(self):
        import nvtx
        self._domain = nvtx.get_domain("ds4bench")
        self._attrs: dict[str, object] = {}

    def range(self, name: str):
        attr = self._attrs.get(name)
        if attr is None:                       # registered once per name: pushes pass a handle
            attr = self._attrs[name] = self._domain.get_event_attributes(message=name)
        return _DomainRange(self._domain, attr)


class _DomainRange:
    __slots__ = ("_d", "_a")

    def __init__(self, domain, attr):
        self._d, self._a = domain, attr

    def __enter__(self):
        self._d.push_range(self._a)

    def __exit__(self, *exc):
        self._d.pop_range()


class CudaEventTimer(Profiler):
    """GPU time per range from CUDA events on the current stream, without Nsight Systems.

    Events are recorded asynchronously; `summary()` synchronizes once and sums elapsed times
    (seconds). Nested ranges count in both, as with HostTimer.
    """
    enabled = True

    def __init__(self):
        import cupy as cp
        self._cp = cp
        self._pending: list[tuple[str, object, object]] = []
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def range(self, name: str):
        cp = self._cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((name, start, end))

    def summary(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, s, e in self._pending:
                self.total[name] += self._cp.cuda.get_elapsed_time(s, e) / 1e3
                self.calls[name] += 1
            self._pending.clear()
        return dict(self.total)

    def reset(self) -> None:
        self._pending.clear()
        self.total.clear()
        self.calls.clear()


def make_profiler(kind: str | None, backend: str) -> Profiler:
    """'none' | 'nvtx' | 'stages' (CUDA events on the GPU, host time on the CPU)."""
    if not kind or kind == "none":
        return Profiler()
    if kind == "nvtx":
        return NvtxRanges()
    if kind == "stages":
        return CudaEventTimer() if backend == "cupy" else HostTimer()
    raise ValueError(f"unknown profiler {kind!r}; choose none, nvtx or stages")
