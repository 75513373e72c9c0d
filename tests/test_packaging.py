"""A wheel of the project carries the CUDA sources, and an installed (non-editable) ds4bench
compiles from that copy: GPU runs from `pip install .` or asv's environments need them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the package is made of: setuptools reuses a checkout's build/
    folder, where a kernel since deleted or renamed would survive into the wheel."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for name in ("ds4bench", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("ds4bench-*.whl")
    return whl


def test_wheel_carries_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and {f"ds4bench/kernel_src/{n}" for n in sources} <= names


def test_wheel_carries_every_module(wheel):
    """Every module of the package and its subpackages (engine, harness, views) is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ds4bench").rglob("*.py")}
    assert {"ds4bench/engine/model.py", "ds4bench/harness/matrix.py", "ds4bench/views/plots.py"} <= modules
    assert modules <= names


def test_installed_package_finds_its_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ds4bench, ds4bench.engine.kernels as k; "
            "print(ds4bench.__file__); print(k.KERNEL_DIR); print(','.join(k.kernel_files()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(site)), timeout=60)
    assert r.returncode == 0, r.stderr
    pkg_file, kdir, files = r.stdout.split("\n")[:3]
    assert Path(pkg_file).is_relative_to(site)
    assert Path(kdir) == site / "ds4bench" / "kernel_src"
    assert set(files.split(",")) == {p.name for p in (REPO / "kernels").glob("*.cu")}


LAYERS = ("engine", "harness", "views", "")          # "": the CLI modules at the top of the package


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ds4bench import in `path`, relative ones resolved ("from .engine
    import config" names ds4bench.engine.config)."""
    import ast
    here = path.relative_to(REPO).with_suffix("").parts[:-1]                 # ("ds4bench", "engine")
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else ()
            mod = ".".join((*base, *([node.module] if node.module else [])))
            for a in node.names:
                sub = f"{mod}.{a.name}"
                is_module = (REPO / (sub.replace(".", "/") + ".py")).is_file() or (REPO / sub.replace(".", "/")).is_dir()
                out.append((node.lineno, sub if is_module else mod))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in out if m.split(".")[0] == "ds4bench"]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else ""


def test_each_layer_imports_only_those_below_it():
    """engine/ imports nothing of the harness, the views or the CLI; harness/ nothing of the views
    or the CLI; views/ nothing of the CLI (README, Architecture)."""
    upward = []
    for path in sorted((REPO / "ds4bench").rglob("*.py")):
        me = _layer(".".join(path.relative_to(REPO).with_suffix("").parts))
        for line, mod in _imports(path):
            if mod != "ds4bench" and LAYERS.index(_layer(mod)) > LAYERS.index(me):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert upward == []

