"""Thin loader for the CUDA sources in `kernels/`: compiled lazily with NVRTC through
`cupy.RawModule`, memoized per (file, device). Launch geometry lives next to each call."""
from __future__ import annotations

import functools
import os

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
# No fast-math: the kernels must compute what the NumPy reference computes.
NVRTC_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")


def kernel_files() -> list[str]:
    return sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))


@functools.lru_cache(maxsize=None)
def _module(filename: str, device: int):
    import cupy as cp
    path = os.path.join(KERNEL_DIR, filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"kernel source {path} is missing")
    with open(path) as fh:
        src = fh.read()
    return cp.RawModule(code=src, options=NVRTC_OPTIONS)


def function(filename: str, name: str):
    """The kernel `name` of kernels/`filename`, compiled for the current device on first use."""
    import cupy as cp
    return _function(filename, name, cp.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _function(filename: str, name: str, device: int):
    return _module(filename, device).get_function(name)
