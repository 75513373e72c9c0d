"""A known slowdown for testing speed comparisons: DS4BENCH_SLOWDOWN=<stage>:<fraction>.

`moe:0.05` makes every decode step 5% slower than the same engine's un-slowed step: after the
warm-up has timed the step (median step time T0, the injector waiting 0), `Delay.calibrate(T0)`
sets a wait of fraction * T0 / n_layer in the MoE stage of each layer, after the routed experts.
A decode step then takes T0 + fraction * T0, so the true decode tok/s ratio of a slowed cell
against the same cell without the toggle is 1 / (1 + fraction) (0.952 at 5%, 0.833 at 20%).

On the CPU the wait is a busy loop on the host clock; on a GPU it is the one-thread kernel
`spin_ns` (kernels/spin.cu) on the step's stream, reading the wait from device memory, so it
runs inside a captured decode graph too. The ratio is known where the wait adds to the step in
full: on the CPU (NumPy is synchronous) and on the GPU's graph path (a replayed step is one
launch). An eager GPU step is bound by the host's launches, and the GPU's wait can hide in the
idle gaps between them; a cell records no true ratio there. Prefill is slowed by the same absolute time per
forward call (its ratio is not a known one). The GPU kernel's launch costs a few microseconds
per layer that the cell without the toggle does not pay; it is inside T0, so the true ratio is
1 / (1 + fraction) to within that cost over the step time (under 0.5% on flash-4l).

The toggle is parsed once (`from_env`) and passed to the Engine (`slowdown=`), so a reference
engine in the same process never carries it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

STAGES = ("moe",)
ENV = "DS4BENCH_SLOWDOWN"


@dataclass(frozen=True)
class Slowdown:
    stage: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.stage}:{self.fraction:g}"

    @property
    def true_ratio(self) -> float:
        """The decode tok/s of a slowed cell over the same cell's without the toggle."""
        return 1.0 / (1.0 + self.fraction)


def parse(text: str | None) -> Slowdown | None:
    """'moe:0.05' -> Slowdown('moe', 0.05); None or empty -> None; ValueError names the problem."""
    if not text or not text.strip():
        return None
    stage, colon, frac = text.strip().partition(":")
    if not colon or stage not in STAGES:
        raise ValueError(f"{ENV}: {text!r} is not <stage>:<fraction> with stage one of {', '.join(STAGES)} "
                         f"(e.g. moe:0.05)")
    try:
        f = float(frac)
    except ValueError:
        raise ValueError(f"{ENV}: fraction {frac!r} is not a number (e.g. moe:0.05)") from None
    if not 0 < f <= 10:
        raise ValueError(f"{ENV}: fraction {f:g} must be in (0, 10]")
    return Slowdown(stage, f)


def from_env(environ) -> Slowdown | None:
    return parse(environ.get(ENV))


class Delay:
    """The wait an Engine's model runs in each layer's MoE stage (model.DS4Model.delay)."""

    def __init__(self, slowdown: Slowdown, ops, n_layer: int):
        self.slowdown, self.n_layer = slowdown, n_layer
        self.step_s = 0.0                   # added to each forward call (0 until calibrated)
        self.base_step_s: float | None = None
        self.gpu = getattr(ops, "xp", np) is not np
        if self.gpu:
            import cupy as cp
            self.wait_ns = cp.zeros(1, dtype=cp.int64)

    def calibrate(self, step_s: float) -> None:
        """Wait fraction * step_s per forward call from now on (step_s: the un-slowed step)."""
        self.base_step_s = float(step_s)
        self.step_s = self.slowdown.fraction * self.base_step_s
        if self.gpu:
            self.wait_ns[...] = int(round(self.step_s / self.n_layer * 1e9))

    def __call__(self) -> None:
        if self.gpu:
            from . import kernels
            kernels.function("spin.cu", "spin_ns")((1,), (1,), (self.wait_ns,))
            return
        if self.step_s > 0:
            end = time.perf_counter() + self.step_s / self.n_layer
            while time.perf_counter() < end:
                pass
