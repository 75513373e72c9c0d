"""A wheel of the project carries the CUDA sources, and an installed (non-editable) ds4bench
compiles from that copy: GPU runs from `pip install .` or asv's environments need them."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("ds4bench-*.whl")
    return whl


def test_wheel_carries_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and {f"ds4bench/kernel_src/{n}" for n in sources} <= names


def test_installed_package_finds_its_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ds4bench, ds4bench.kernels as k; "
            "print(ds4bench.__file__); print(k.KERNEL_DIR); print(','.join(k.kernel_files()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(site)), timeout=60)
    assert r.returncode == 0, r.stderr
    pkg_file, kdir, files = r.stdout.split("\n")[:3]
    assert Path(pkg_file).is_relative_to(site)
    assert Path(kdir) == site / "ds4bench" / "kernel_src"
    assert set(files.split(",")) == {p.name for p in (REPO / "kernels").glob("*.cu")}
