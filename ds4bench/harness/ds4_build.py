"""Building antirez/ds4's `ds4` binary from a checkout the user gives, for the ds4 adapters
(benchmarks/engines/ds4.toml, ds4-cpu.toml).

Nothing of ds4 lives in this repository. The checkout's top-level files are copied into a
build folder (default ~/.cache/ds4bench/engines/ds4-<commit>-<target>-<layers>l) and built there
with ds4's own Makefile, so the checkout stays untouched:

    cpu    make cpu                                (the CPU reference backend, --cpu)
    cuda   make ds4 CUDA_ARCH=sm_90 ...            (the CUDA backend, --cuda; links cuBLAS)

ds4 fixes the model's shape at compile time. `layers` other than 43 sets the `DS4_N_LAYER`
enumerator of ds4.c in the copy (4 for the `flash-4l` preset). cuBLAS is looked for in
CUDA_HOME and then in the Python packages that ship it (nvidia-cublas: nvidia/cu13/{include,lib};
nvidia-cublas-cu12: nvidia/cublas/{include,lib}); a library found outside the system's search path
is linked by its file name with an rpath to its folder. The build folder gets the binary, the
build log and `ds4bench-build.json` (source commit, target, arch, layers, the make command,
compiler versions), which a matrix cell records with the binary (command_engine.path_provenance).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .command_engine import BUILD_INFO
from ..engine.options import CACHE_ROOT, get
from .record import utc_now

FULL_LAYERS = 43                        # ds4's DS4_N_LAYER: DeepSeek V4 Flash
LAYER_LINE = re.compile(r"^(\s*DS4_N_LAYER\s*=\s*)(\d+)(\s*,)", re.M)
NEEDED = ("ds4.c", "ds4_cli.c", "Makefile")


class BuildError(ValueError):
    """A build that cannot start or did not finish; the message is one line naming the fix."""


def check_checkout(src: Path) -> None:
    missing = [f for f in NEEDED if not (src / f).is_file()]
    if not src.is_dir() or missing:
        why = f"{', '.join(missing)} missing" if src.is_dir() else "no such folder"
        raise BuildError(f"no ds4 checkout at {src} ({why}): give --src a clone of antirez/ds4")


def source_commit(src: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of a git checkout; (None, None) without git or outside a repository."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True,  # noqa: E731
                                        check=True, timeout=20).stdout.strip()
        return run("rev-parse", "HEAD"), bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def set_layers(text: str, layers: int, where: str) -> str:
    if not LAYER_LINE.search(text):
        raise BuildError(f"{where}: no `DS4_N_LAYER = N,` line, so the layer count cannot be set in this ds4 "
                         f"version; build with --layers {FULL_LAYERS}")
    return LAYER_LINE.sub(lambda m: f"{m.group(1)}{layers}{m.group(3)}", text, count=1)


def find_nvcc() -> Path:
    """$NVCC, else $CUDA_HOME/bin/nvcc, else nvcc on PATH."""
    home = get("CUDA_HOME")
    for cand in (get("NVCC"), home and Path(home) / "bin" / "nvcc", shutil.which("nvcc")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise BuildError("nvcc not found ($NVCC, $CUDA_HOME/bin, PATH): install the CUDA toolkit, or build the CPU "
                     "binary with --cpu")


def cuda_home(nvcc: Path) -> Path:
    """$CUDA_HOME, else the toolkit nvcc belongs to (/usr/local/cuda when nvcc is a wrapper)."""
    if get("CUDA_HOME"):
        return Path(get("CUDA_HOME"))
    home = nvcc.resolve().parent.parent
    if (home / "include" / "cuda_runtime.h").is_file():
        return home
    return Path("/usr/local/cuda")


def _cublas_in(root: Path) -> tuple[Path, Path] | None:
    for inc in (root / "include", *sorted(root.glob("targets/*/include"))):
        if not (inc / "cublas_v2.h").is_file():
            continue
        for lib in (root / "lib64", root / "lib", *sorted(root.glob("targets/*/lib"))):
            if any(lib.glob("libcublas.so*")):
                return inc, lib
    return None


def find_cublas(home: Path, given: str | None = None, search=None) -> tuple[Path, Path]:
    """(include folder, library folder) of cuBLAS: `given`, else CUDA_HOME, else a Python package."""
    if given:
        found = _cublas_in(Path(given))
        if not found:
            raise BuildError(f"--cublas {given}: no include/cublas_v2.h with lib/libcublas.so* there")
        return found
    roots = [home]
    for entry in (sys.path if search is None else search):
        nv = Path(entry or ".") / "nvidia"
        if nv.is_dir():
            roots += sorted(nv.glob("cu[0-9]*")) + [nv / "cublas"]
    for root in roots:
        found = _cublas_in(root)
        if found:
            return found
    raise BuildError(f"cuBLAS not found (no cublas_v2.h and libcublas.so in {home} or an nvidia-cublas Python "
                     f"package): pip install nvidia-cublas, or pass --cublas DIR")


def _first_line(cmd: list[str], last: bool = False) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out[-1] if last else out[0]) if out else None


def gpu_arch() -> str | None:
    """sm_NN of the first visible GPU (nvidia-smi), or None."""
    cap = _first_line(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    return f"sm_{cap.replace('.', '')}" if cap and re.fullmatch(r"\d+\.\d+", cap) else None


def make_command(cpu: bool, arch: str | None, jobs: int, nvcc: Path | None = None, home: Path | None = None,
                 cublas: tuple[Path, Path] | None = None) -> list[str]:
    if cpu:
        return ["make", f"-j{jobs}", "cpu"]
    inc, lib = cublas
    libfile = sorted(lib.glob("libcublas.so*"), key=lambda p: len(p.name))[0].name
    ldlibs = (f"-lm -Xcompiler -pthread -L{home}/targets/sbsa-linux/lib -L{home}/lib64 -lcudart "
              f"-L{lib} -l:{libfile} -Xlinker -rpath={lib}")
    return ["make", f"-j{jobs}", "ds4", f"CUDA_ARCH={arch}", f"CUDA_HOME={home}", f"NVCC={nvcc} -I{inc}",
            f"CUDA_LDLIBS={ldlibs}"]


def default_out(commit: str | None, cpu: bool, arch: str | None, layers: int) -> Path:
    target = "cpu" if cpu else f"cuda-{arch}"
    return CACHE_ROOT / "engines" / f"ds4-{(commit or 'src')[:12]}-{target}-{layers}l"


def build_ds4(src: str, out: str | None = None, cpu: bool = False, layers: int = FULL_LAYERS,
              arch: str | None = None, cublas: str | None = None, jobs: int | None = None, say=print) -> Path:
    """Build ds4's `ds4` binary from the checkout `src` (see the module docstring); its path."""
    srcp = Path(src).expanduser()
    check_checkout(srcp)
    if not 1 <= layers <= FULL_LAYERS:
        raise BuildError(f"--layers {layers}: ds4 builds 1..{FULL_LAYERS} layers ({FULL_LAYERS}: flash, 4: flash-4l)")
    if shutil.which("make") is None:
        raise BuildError("make not found on PATH: install make (and a C compiler)")
    text = (srcp / "ds4.c").read_text(encoding="utf-8", errors="surrogateescape")
    if layers != FULL_LAYERS:
        text = set_layers(text, layers, str(srcp / "ds4.c"))
    nvcc = home = inc_lib = None
    if not cpu:
        nvcc = find_nvcc()
        home = cuda_home(nvcc)
        inc_lib = find_cublas(home, cublas)
        arch = arch or gpu_arch()
        if not arch:
            raise BuildError("--arch is needed (e.g. sm_90 for H100/H200): no GPU is visible to ask; ds4 built "
                             "without an explicit arch has been reported to answer garbage")
    elif shutil.which(get("CC") or "cc") is None:
        raise BuildError(f"C compiler {get('CC') or 'cc'} not found on PATH ($CC)")
    commit, dirty = source_commit(srcp)
    dest = Path(out).expanduser() if out else default_out(commit, cpu, arch, layers)
    if dest.exists():
        if any(dest.iterdir()) and not (dest / "build.log").is_file():
            raise BuildError(f"--out {dest}: the folder exists and is not a ds4 build folder; give a new one")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in srcp.iterdir():                    # the Makefile's Linux targets need the top level only
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    (dest / "ds4.c").write_text(text, encoding="utf-8", errors="surrogateescape")
    cmd = make_command(cpu, arch, jobs or os.cpu_count() or 1, nvcc, home, inc_lib)
    say(f"building ds4 ({'cpu' if cpu else 'cuda ' + arch}, {layers} layers) from {srcp} in {dest}")
    t0 = time.perf_counter()
    log = dest / "build.log"
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=dest, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    build_s = time.perf_counter() - t0
    if r.returncode != 0 or not (dest / "ds4").is_file():
        lines = log.read_text(errors="replace").splitlines()
        err = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
        raise BuildError(f"make failed (exit {r.returncode}): {err.strip()[:300]}; the full log is {log}")
    info = {"engine": "ds4", "source": str(srcp.resolve()), "commit": commit, "dirty": dirty,
            "target": "cpu" if cpu else "cuda", "arch": arch, "layers": layers, "make": cmd,
            "cc": _first_line([get("CC") or "cc", "--version"]),
            "nvcc": _first_line([str(nvcc), "--version"], last=True) if nvcc else None,
            "cublas": str(inc_lib[1]) if inc_lib else None, "build_s": round(build_s, 1),
            "host": platform.node(), "utc": utc_now()}
    (dest / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return dest / "ds4"
