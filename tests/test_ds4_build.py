"""`ds4bench engines build ds4` (ds4bench/harness/ds4_build.py): one-line errors for a missing checkout,
compiler or cuBLAS, the make command it runs, and a build with a stand-in Makefile. The real CPU
build runs where $DS4_SRC names a clone of antirez/ds4."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds4bench.harness import ds4_build as B
from ds4bench.harness.command_engine import BUILD_INFO

ENUM = "enum {\n    DS4_N_LAYER            = 43,\n    DS4_N_EMBD             = 4096,\n};\n"
# a stand-in for ds4's Makefile: `make cpu` writes a `ds4` that prints the layer count compiled in
MAKEFILE = ("cpu:\n\tprintf '#!/bin/sh\\necho layers %s\\n' \"$$(sed -n 's/.*DS4_N_LAYER *= *\\([0-9]*\\),/\\1/p' "
            "ds4.c)\" > ds4 && chmod +x ds4\n")


def _checkout(root: Path, makefile: str = MAKEFILE, ds4c: str = ENUM) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ds4.c").write_text(ds4c)
    (root / "ds4_cli.c").write_text("int main(void) { return 0; }\n")
    (root / "Makefile").write_text(makefile)
    (root / "gguf-tools").mkdir(exist_ok=True)                # folders are not copied
    (root / "gguf-tools" / "big.txt").write_text("x")
    return root


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ds4bench", "engines", "build", "ds4", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_a_missing_checkout_is_one_line_and_exit_2(tmp_path):
    r = _cli("--src", str(tmp_path / "nope"), "--cpu")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"ds4bench: error: no ds4 checkout at {tmp_path / 'nope'} (no such folder): "
                                f"give --src a clone of antirez/ds4")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ds4.c").write_text(ENUM)
    r = _cli("--src", str(tmp_path / "half"), "--cpu")
    assert r.returncode == 2 and "(ds4_cli.c, Makefile missing)" in r.stderr and r.stderr.count("\n") == 1


def test_the_layer_count_is_set_in_the_copy_only(tmp_path):
    assert "DS4_N_LAYER            = 4," in B.set_layers(ENUM, 4, "ds4.c")
    with pytest.raises(B.BuildError, match=r"ds4.c: no `DS4_N_LAYER = N,` line.* build with --layers 43"):
        B.set_layers("#define DS4_N_LAYER 43\n", 4, "ds4.c")
    r = _cli("--src", str(_checkout(tmp_path / "old", ds4c="int x;\n")), "--cpu", "--layers", "4")
    assert r.returncode == 2 and "no `DS4_N_LAYER = N,` line" in r.stderr
    r = _cli("--src", str(_checkout(tmp_path / "src")), "--cpu", "--layers", "44")
    assert r.returncode == 2 and "--layers 44: ds4 builds 1..43 layers" in r.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_build_copies_the_checkout_runs_make_and_describes_itself(tmp_path):
    src = _checkout(tmp_path / "src")
    out = tmp_path / "build"
    r = _cli("--src", str(src), "--cpu", "--layers", "4", "--out", str(out), "-j", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "ds4") and f"use it as DS4_BIN={out / 'ds4'}" in r.stderr
    assert subprocess.run([str(out / "ds4")], capture_output=True, text=True).stdout.strip() == "layers 4"
    assert (src / "ds4.c").read_text() == ENUM                      # the checkout is untouched
    assert not (out / "gguf-tools").exists() and (out / "build.log").is_file()
    info = json.loads((out / BUILD_INFO).read_text())
    assert info["target"] == "cpu" and info["layers"] == 4 and info["arch"] is None and info["commit"] is None
    assert info["make"] == ["make", "-j1", "cpu"] and info["source"] == str(src.resolve())
    # a rebuild replaces its own folder; a folder that is not a build is refused
    assert _cli("--src", str(src), "--cpu", "--out", str(out), "-j", "1").returncode == 0
    assert subprocess.run([str(out / "ds4")], capture_output=True, text=True).stdout.strip() == "layers 43"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = _cli("--src", str(src), "--cpu", "--out", str(tmp_path / "mine"))
    assert r.returncode == 2 and "is not a ds4 build folder" in r.stderr and (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_failed_make_names_its_error_and_the_log(tmp_path):
    src = _checkout(tmp_path / "src", makefile="cpu:\n\t@echo 'ds4.c:1: error: something broke' && exit 1\n")
    r = _cli("--src", str(src), "--cpu", "--out", str(tmp_path / "b"))
    assert r.returncode == 2
    assert r.stderr.strip().endswith(f"make failed (exit 2): ds4.c:1: error: something broke; the full log is "
                                     f"{tmp_path / 'b' / 'build.log'}")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_cuda_needs_nvcc(tmp_path):
    empty = tmp_path / "bin"                                        # make alone on PATH
    empty.mkdir()
    (empty / "make").symlink_to(shutil.which("make"))
    r = _cli("--src", str(_checkout(tmp_path / "src")), "--arch", "sm_90",
             env={"PATH": str(empty), "NVCC": "", "CUDA_HOME": str(tmp_path / "no-cuda")})
    assert r.returncode == 2 and r.stderr.strip() == (
        "ds4bench: error: nvcc not found ($NVCC, $CUDA_HOME/bin, PATH): install the CUDA toolkit, or build the "
        "CPU binary with --cpu")


def _toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_cuda_needs_cublas_and_finds_the_python_package(tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.delenv("NVCC", raising=False)
    assert B.cuda_home(B.find_nvcc()) == home
    with pytest.raises(B.BuildError, match=r"^cuBLAS not found \(no cublas_v2.h and libcublas.so in .*cuda or an "
                                           r"nvidia-cublas Python package\): pip install nvidia-cublas, or pass "
                                           r"--cublas DIR$"):
        B.find_cublas(home, search=[])
    with pytest.raises(B.BuildError, match=r"--cublas .*: no include/cublas_v2.h with lib/libcublas.so\* there"):
        B.find_cublas(home, str(tmp_path))
    site = tmp_path / "site"                                         # nvidia-cublas's wheel layout
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "include" / "cublas_v2.h").write_text("")
    (site / "nvidia" / "cu13" / "lib").mkdir()
    (site / "nvidia" / "cu13" / "lib" / "libcublas.so.13").write_text("")
    inc, lib = B.find_cublas(home, search=[str(site)])
    assert (inc, lib) == (site / "nvidia" / "cu13" / "include", site / "nvidia" / "cu13" / "lib")
    cmd = B.make_command(False, "sm_90", 8, home / "bin" / "nvcc", home, (inc, lib))
    assert cmd[:5] == ["make", "-j8", "ds4", "CUDA_ARCH=sm_90", f"CUDA_HOME={home}"]
    assert cmd[5] == f"NVCC={home / 'bin' / 'nvcc'} -I{inc}"
    assert f"-L{lib} -l:libcublas.so.13 -Xlinker -rpath={lib}" in cmd[6] and "-lcudart" in cmd[6]


def test_cuda_needs_an_arch_where_no_gpu_answers(tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda")
    (home / "lib64").mkdir()
    (home / "lib64" / "libcublas.so").write_text("")
    (home / "include" / "cublas_v2.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(B, "gpu_arch", lambda: None)
    with pytest.raises(B.BuildError, match=r"^--arch is needed \(e.g. sm_90 for H100/H200\)"):
        B.build_ds4(str(_checkout(tmp_path / "src")), str(tmp_path / "b"))


@pytest.mark.skipif(not os.environ.get("DS4_SRC"), reason="needs $DS4_SRC: a clone of antirez/ds4 (and a C compiler)")
def test_the_real_cpu_build(tmp_path):
    binary = B.build_ds4(os.environ["DS4_SRC"], str(tmp_path / "b"), cpu=True, layers=4, say=lambda s: None)
    r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--dump-logprobs" in r.stdout
    info = json.loads((binary.parent / BUILD_INFO).read_text())
    assert info["layers"] == 4 and info["target"] == "cpu" and info["commit"]
    assert "DS4_N_LAYER            = 4," in (binary.parent / "ds4.c").read_text()
