"""Thin loader for the CUDA sources in `kernels/`: compiled lazily with NVRTC through
`cupy.RawModule`, memoized per (file, defines, device). Launch geometry lives next to each call.
`defines` are the -D options of an injected fault (faults.defines): a faulted variant is a module
of its own, and the healthy kernels compile exactly as without faults."""
from __future__ import annotations

import functools
import os
import re


def _kernel_dir() -> str:
    """kernels/ of a source checkout (and of an editable install), else the copy an installed
    wheel carries as ds4bench/kernel_src (pyproject.toml)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))        # ds4bench/
    candidates = (os.path.join(os.path.dirname(package), "kernels"), os.path.join(package, "kernel_src"))
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "common.cuh"))), candidates[0])


KERNEL_DIR = _kernel_dir()
# No fast-math: the kernels must compute what the NumPy reference computes.
NVRTC_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")


@functools.lru_cache(maxsize=None)
def define(filename: str, name: str) -> int:
    """The integer value of `#define name <int>` in kernels/`filename`: launch sizes that must
    match a kernel's own (shared-memory slices, tiles) are read from its source."""
    with open(os.path.join(KERNEL_DIR, filename)) as fh:
        m = re.search(rf"^#define\s+{re.escape(name)}\s+(\d+)\s*$", fh.read(), re.M)
    if m is None:
        raise KeyError(f"kernels/{filename} has no integer #define {name}")
    return int(m.group(1))


def q8_wide_split(O: int, nb: int, sms: int) -> int:
    """Threads per row S of matmul_q8_0_wide_* for O rows of nb Q8_0 blocks on a GPU of `sms`
    SMs: the fewest (a power of two) that leave each thread at most Q8W_BLOCKS blocks, all loaded
    before any is used, then doubled while the grid (Q8W_THREADS / S rows a CTA) has fewer CTAs
    than the GPU has SMs and a thread still gets a block, so a small matrix is read by every SM."""
    per, block = define("q8_0.cu", "Q8W_BLOCKS"), define("q8_0.cu", "Q8W_THREADS")
    S = 1
    while S * per < nb and S < block:
        S *= 2
    while -(-O // (block // S)) < sms and S < block and S < nb:
        S *= 2
    return S


def sm_count() -> int:
    """Streaming multiprocessors of the current device."""
    import cupy as cp
    return _sm_count(cp.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    import cupy as cp
    return int(cp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def kernel_files() -> list[str]:
    return sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))


@functools.lru_cache(maxsize=None)
def _module(filename: str, device: int, defines: tuple = ()):
    import cupy as cp
    path = os.path.join(KERNEL_DIR, filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"kernel source {path} is missing")
    with open(path) as fh:
        src = fh.read()
    return cp.RawModule(code=src, options=NVRTC_OPTIONS + tuple(defines))


def function(filename: str, name: str, defines: tuple = ()):
    """The kernel `name` of kernels/`filename`, compiled for the current device on first use
    (with the -D options `defines`: a fault's variant, see faults.defines)."""
    import cupy as cp
    return _function(filename, name, cp.cuda.Device().id, tuple(defines))


@functools.lru_cache(maxsize=None)
def _function(filename: str, name: str, device: int, defines: tuple = ()):
    return _module(filename, device, defines).get_function(name)
