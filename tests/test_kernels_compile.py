"""Every CUDA source in kernels/ compiles for Hopper with nvcc (CI has nvcc, not a GPU)."""
import os
import shutil
import subprocess

import pytest

from ds4bench.kernels import KERNEL_DIR, kernel_files

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_kernel_sources_exist():
    assert {"q8_0.cu", "simfmt.cu"} <= set(kernel_files())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", kernel_files())
def test_kernel_compiles_sm90(name, tmp_path):
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", f"-I{KERNEL_DIR}", "-c",
                        os.path.join(KERNEL_DIR, name), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]
