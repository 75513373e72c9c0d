"""The one module that touches CUDA memory through CuPy: device facts and weight placement.

Placements (the `--placement` axis, env DS4BENCH_PLACEMENT):
  device          plain device allocations (cudaMalloc through CuPy's pool)
  managed         cudaMallocManaged, no hints
  managed-hinted  cudaMallocManaged + ReadMostly + PreferredLocation(device) + prefetch
  host            pinned host memory mapped into the device address space, read zero-copy
Managed placement refuses a model larger than the device's free memory minus a margin:
oversubscribed managed memory can hang the GPU, not only the program.
"""
from __future__ import annotations

import ctypes

import numpy as np

from .config import check_placement

MANAGED_MARGIN = 2 * 2 ** 30          # bytes kept free beyond the weights under managed placement
SLACK = 16                            # bytes allocated past each placed tensor (Placer.put)


def device_facts() -> dict:
    import cupy as cp
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    free, total = cp.cuda.runtime.memGetInfo()
    name = props["name"]
    return {"gpu_name": name.decode() if isinstance(name, bytes) else str(name),
            "device_id": dev.id, "compute_capability": dev.compute_capability,
            "mem_total": int(total), "mem_free": int(free),
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion(), "cupy": cp.__version__}


class Placer:
    """Puts host arrays where a placement says and keeps what must stay alive."""

    def __init__(self, placement: str, model_bytes: int):
        import cupy as cp
        self.cp = cp
        self.placement = check_placement(placement)
        self.placed_bytes = 0
        self._host_blocks: list[int] = []
        if placement.startswith("managed"):
            free, _ = cp.cuda.runtime.memGetInfo()
            if model_bytes > free - MANAGED_MARGIN:
                raise MemoryError(
                    f"managed placement refused: the model needs {model_bytes / 2**30:.2f} GiB and the device has "
                    f"{free / 2**30:.2f} GiB free (margin {MANAGED_MARGIN / 2**30:.0f} GiB); oversubscribed managed "
                    f"memory can hang the GPU: use placement host or a smaller model")

    def put(self, a: np.ndarray):
        """A CuPy array holding `a` (same dtype and shape) in this placement. Every allocation
        has at least SLACK bytes past the data (CuPy's pool rounds device ones up to 512), so
        a kernel's aligned word loads of a tensor's last block stay inside it."""
        cp = self.cp
        a = np.ascontiguousarray(a)
        n = a.nbytes
        self.placed_bytes += n
        if self.placement == "device":
            return cp.asarray(a)
        if self.placement == "host":
            rt = cp.cuda.runtime
            ptr = rt.hostAlloc(n + SLACK, rt.hostAllocMapped)
            self._host_blocks.append(ptr)
            ctypes.memmove(ptr, a.ctypes.data, n)
            # mapped pinned memory under unified addressing: the host pointer is the device pointer
            mem = cp.cuda.UnownedMemory(ptr, n + SLACK, self)
            return cp.ndarray(a.shape, a.dtype, cp.cuda.MemoryPointer(mem, 0))
        mem = cp.cuda.malloc_managed(n + SLACK)
        out = cp.ndarray(a.shape, a.dtype, mem)
        out.set(a)
        if self.placement == "managed-hinted":
            rt, dev = cp.cuda.runtime, cp.cuda.Device().id
            rt.memAdvise(mem.ptr, n + SLACK, rt.cudaMemAdviseSetReadMostly, dev)
            rt.memAdvise(mem.ptr, n + SLACK, rt.cudaMemAdviseSetPreferredLocation, dev)
            rt.memPrefetchAsync(mem.ptr, n + SLACK, dev, cp.cuda.get_current_stream().ptr)
        return out

    def close(self) -> None:
        rt = self.cp.cuda.runtime
        self.cp.cuda.Device().synchronize()
        for ptr in self._host_blocks:
            rt.freeHost(ptr)
        self._host_blocks.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
