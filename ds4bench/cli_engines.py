"""`ds4bench engines build ds4`: an external engine's binary from a checkout the user gives
(ds4bench/harness/ds4_build.py)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("engines", help="build an external engine for the matrix (docs/engines.md)")
    eng = p.add_subparsers(dest="engines_cmd", required=True)
    b = eng.add_parser("build", help="build an engine's binary from its source").add_subparsers(dest="engine",
                                                                                               required=True)
    d = b.add_parser("ds4", help="antirez/ds4's ds4 binary, for the ds4 and ds4-cpu adapters",
                     description="Copy the checkout's top-level files into a build folder and run ds4's Makefile "
                                 "there (make cpu, or make ds4 with CUDA_ARCH and cuBLAS). Prints the binary's "
                                 "path, for DS4_BIN.")
    d.add_argument("--src", required=True, help="a clone of antirez/ds4 (left untouched)")
    d.add_argument("--cpu", action="store_true", help="the CPU-only build (default: CUDA)")
    d.add_argument("--layers", type=int, default=43, help="layers compiled in: 43 for flash and real files, "
                                                          "4 for flash-4l (default 43)")
    d.add_argument("--arch", help="CUDA arch, e.g. sm_90 for H100/H200 (default: the visible GPU's)")
    d.add_argument("--cublas", metavar="DIR", help="cuBLAS root holding include/ and lib/ (default: CUDA_HOME, "
                                                   "then the nvidia-cublas Python package)")
    d.add_argument("--out", help="build folder (default ~/.cache/ds4bench/engines/ds4-<commit>-<target>-<N>l)")
    d.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: the CPU count)")
    d.set_defaults(func=cmd_build_ds4)


def cmd_build_ds4(a) -> int:
    import json
    import sys
    from .harness.command_engine import BUILD_INFO
    from .harness.ds4_build import build_ds4
    binary = build_ds4(a.src, a.out, a.cpu, a.layers, a.arch, a.cublas, a.jobs,
                       say=lambda s: print(s, file=sys.stderr))
    info = json.loads((binary.parent / BUILD_INFO).read_text())
    print(f"built {binary} (ds4 {(info['commit'] or 'unknown commit')[:12]}, {info['target']}"
          f"{' ' + info['arch'] if info['arch'] else ''}, {info['layers']} layers) in {info['build_s']:.0f} s; "
          f"use it as DS4_BIN={binary}", file=sys.stderr)
    print(binary)
    return 0
