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
