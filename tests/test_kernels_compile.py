"""Every CUDA source in kernels/ compiles for Hopper with nvcc (CI has nvcc, not a GPU), and
uses only what NVRTC (how the engine compiles them, through cupy.RawModule) provides: nvcc
includes the CUDA runtime and the C math headers implicitly, NVRTC does not, so a macro such as
INFINITY compiles here and fails at run time there. The GPU tests compile each file with NVRTC."""
import os
import re
import shutil
from pathlib import Path
import subprocess

import numpy as np
import pytest

from ds4bench.engine import kernels
from ds4bench.engine.kernels import KERNEL_DIR, kernel_files

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_kernel_sources_exist():
    assert {"q8_0.cu", "f16w.cu", "lowprec.cu", "moe.cu"} <= set(kernel_files())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", kernel_files())
def test_kernel_compiles_sm90(name, tmp_path):
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", f"-I{KERNEL_DIR}", "-c",
                        os.path.join(KERNEL_DIR, name), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]


# Host-header names NVRTC lacks, with what to write instead.
NOT_IN_NVRTC = {"INFINITY": "__int_as_float(0x7f800000)", "NAN": "__int_as_float(0x7fffffff)",
                "HUGE_VALF": "__int_as_float(0x7f800000)", "FLT_MAX": "3.402823466e+38f", "M_PI": "a literal",
                "printf": "nothing (no printf in kernels)", "std::": "CUDA intrinsics"}


@pytest.mark.parametrize("name", kernel_files())
def test_kernel_uses_only_what_nvrtc_has(name):
    src = open(os.path.join(KERNEL_DIR, name)).read()
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", src, flags=re.S)             # comments may say anything
    for inc in re.findall(r'#include\s*[<"]([^>"]+)[>"]', code):
        assert inc in ("cuda_fp16.h", "common.cuh"), f"{name} includes {inc}, which NVRTC does not provide"
    for word, instead in NOT_IN_NVRTC.items():
        pat = re.escape(word) if word.endswith(":") else rf"\b{re.escape(word)}\b"
        assert not re.search(pat, code), f"{name} uses {word}, which NVRTC lacks; use {instead}"


def test_gpu_ops_define_every_fusable_hook_with_the_models_arity():
    """GpuOps cannot be imported without CuPy; its source still must define each fused hook
    model.FUSABLE names, taking the arguments DS4Model passes (checked without a GPU)."""
    import ast

    from ds4bench.engine import model as M
    passed = {"hc_weights": 3, "hc_collapse": 2, "hc_expand": 4, "rms_norm": 3, "rope": 4, "attend": 4,
              "attend_ring": 9, "route": 3, "pool_windows": 9, "indexer_scores": 3, "swiglu_clamped": 3}
    assert {m for ms in M.FUSABLE.values() for m in ms} == set(passed)
    src = open(os.path.join(os.path.dirname(KERNEL_DIR), "ds4bench", "engine", "ops_gpu.py")).read()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "GpuOps")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    for name, n in passed.items():
        assert name in methods, f"GpuOps lacks {name}"
        args = methods[name].args
        params = [a.arg for a in args.args if a.arg != "self"]
        assert len(params) - len(args.defaults) <= n <= len(params), (name, params)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_wide_q8_kernels_keep_their_words_in_registers(tmp_path):
    """The wide matvec holds Q8W_BLOCKS blocks' words per thread at once: ptxas (sm_90) fits
    every token count's kernel in registers with room for 3 CTAs of Q8W_THREADS an SM, without
    spilling them to local memory."""
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", f"-I{KERNEL_DIR}", "-Xptxas", "-v", "-c",
                        os.path.join(KERNEL_DIR, "q8_0.cu"), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"Function properties for (matmul_q8_0_wide\w*)\n\s*(\d+) bytes stack frame, (\d+) bytes "
                       r"spill stores, (\d+) bytes spill loads\n[^\n]*Used (\d+) registers", r.stderr)
    names = {f"matmul_q8_0_wide{f}_{t}" for f in ("", "_fused") for t in range(1, kernels.define("common.cuh", "TOKEN_TILE") + 1)}
    assert {f[0] for f in found} == names
    for name, stack, stores, loads, regs in found:
        assert (int(stack), int(stores), int(loads)) == (0, 0, 0), name
        assert int(regs) * kernels.define("q8_0.cu", "Q8W_THREADS") * 3 <= 65536, (name, regs)


@pytest.mark.parametrize("O,nb,sms,S", [
    (1024, 128, 132, 64),        # attn_q_a: 128 CTAs of a warp a row leave SMs idle, so 2 warps a row
    (512, 128, 132, 128),        # attn_kv
    (32768, 32, 132, 8),         # attn_q_b: K = 1024 is 32 blocks, 8 threads (4 rows a warp)
    (8192, 16, 132, 8),          # attn_output_a: a group's K = 512 is 16 blocks
    (4096, 256, 132, 64),        # attn_output_b: 256 blocks, 4 a thread
    (129280, 128, 132, 32),      # the output head: a warp a row, matmul_q8_0's order
    (65, 3, 132, 4),             # every thread of a row has at most one block: no further split
    (1, 4096, 132, 256)])        # one row: the whole CTA, 16 blocks a thread
def test_wide_q8_split(O, nb, sms, S):
    """Threads per row of the wide matvec: a power of two with at most Q8W_BLOCKS blocks a thread,
    doubled while the grid leaves SMs without a CTA."""
    per, block = kernels.define("q8_0.cu", "Q8W_BLOCKS"), kernels.define("q8_0.cu", "Q8W_THREADS")
    assert (per, block) == (4, 256)
    got = kernels.q8_wide_split(O, nb, sms)
    assert got == S and block % got == 0
    assert got * per >= nb or got == block
    assert -(-O // (block // got)) >= sms or got == block or got >= nb


def test_kernel_bench_rotates_weights_past_the_l2_cache():
    from ds4bench.harness.kbench import _Rotating
    w = np.zeros(4_456_448, np.uint8)                   # attn_q_a's Q8_0 bytes
    rot = _Rotating(w)
    assert sum(c.nbytes for c in rot.copies) >= _Rotating.ROTATE_BYTES
    seen = [id(rot.next()) for _ in range(len(rot.copies))]
    assert len(set(seen)) == len(rot.copies)            # every copy once per round
    assert len(_Rotating(np.zeros(600 << 20, np.uint8)).copies) == 1


def test_kernel_bench_plans_wide_and_peer_rows_for_every_q8_shape():
    """bench-kernels' Q8_0 rows: for each shape matmul_q8_0 three ways, the wide matvec three
    ways and the cuBLAS F16 peer, each with the weight bytes it must read, labels unique and
    within the report's column."""
    from ds4bench.harness.kbench import Q8_SHAPES, q8_plan
    plan = q8_plan()
    assert len(plan) == 7 * len(Q8_SHAPES) and len({r["kernel"] for r in plan}) == len(plan)
    assert all(len(r["kernel"]) <= 58 for r in plan)
    by = {r["kernel"]: r["bytes"] for r in plan}
    assert by["q8_0 attn_q_a [1024x4096] wide"] == by["q8_0 attn_q_a [1024x4096]"] == 4_456_448
    assert by["peer cuBLAS f16 attn_q_a [1024x4096]"] == 1024 * 4096 * 2
    assert by["peer cuBLAS f16 attn_output_a [8192x512] x8 groups"] == 8192 * 512 * 2
    assert by["q8_0 output [129280x4096] wide, matmul only"] == 562_626_560
    assert by["peer cuBLAS f16 output [129280x4096]"] == 129280 * 4096 * 2
    assert [(r["kernel"], r["run"]) for r in q8_plan((("w", 64, 512, 2),))] == [
        ("q8_0 w [64x256] x2 groups", "two"), ("q8_0 w [64x256] x2 groups fused", "fused"),
        ("q8_0 w [64x256] x2 groups matmul only", "matmul"), ("q8_0 w [64x256] x2 groups wide", "wide"),
        ("q8_0 w [64x256] x2 groups wide fused", "wide_fused"),
        ("q8_0 w [64x256] x2 groups wide, matmul only", "wide_matmul"), ("peer cuBLAS f16 w [64x256] x2 groups", "peer")]


def test_kernel_variant_toggles():
    from ds4bench.engine.options import ENGINE_ENV, KERNEL_CHOICES, EngineOptions, choice
    assert choice("DS4BENCH_Q8_KERNEL", None) == "warp"
    assert choice("DS4BENCH_Q8_KERNEL", " warp ") == "warp"
    assert choice("DS4BENCH_Q8_KERNEL", "wide") == "wide"
    assert EngineOptions.from_env({"DS4BENCH_Q8_KERNEL": "wide"}, backend="cupy").q8_kernel == "wide"
    assert choice("DS4BENCH_MOE_KERNEL", "") == "warp"
    assert choice("DS4BENCH_ATTN_KERNEL", None) == "concat"
    assert choice("DS4BENCH_ATTN_KERNEL", "ring") == "ring"
    # the removed variants (staged, split) are unknown values like any other
    with pytest.raises(ValueError, match="^DS4BENCH_Q8_KERNEL: unknown 'staged'; choose from warp, wide$"):
        choice("DS4BENCH_Q8_KERNEL", "staged")
    with pytest.raises(ValueError, match="^DS4BENCH_MOE_KERNEL: unknown 'split'; choose from warp$"):
        EngineOptions.from_env({"DS4BENCH_MOE_KERNEL": "split"}, backend="cupy")
    with pytest.raises(ValueError, match="DS4BENCH_MOE_KERNEL: unknown 'fast'"):
        EngineOptions(moe_kernel="fast")
    opts = EngineOptions.from_env({"DS4BENCH_ATTN_KERNEL": "ring", "DS4BENCH_DECODE_GRAPH": "on"}, backend="cupy")
    assert (opts.attn_kernel, opts.decode_graph, opts.q8_kernel, opts.moe_kernel) == ("ring", "on", "warp", "warp")
    assert set(KERNEL_CHOICES) <= set(ENGINE_ENV)          # matrix cells record each toggle


def test_launch_limits_are_read_from_the_kernel_sources():
    """The GPU ops take the limits a kernel was written for from its #define (kernels.define),
    so a kernel edit cannot leave a stale copy in Python."""
    src = (Path(kernels.KERNEL_DIR) / "router.cu").read_text()
    assert f"#define RT_MAX_USED {kernels.define('router.cu', 'RT_MAX_USED')}" in src
    assert kernels.define("hc.cu", "HC_MAX_STREAMS") >= 4 and kernels.define("common.cuh", "TOKEN_TILE") == 8
    with pytest.raises(KeyError, match="kernels/hc.cu has no integer #define NOPE"):
        kernels.define("hc.cu", "NOPE")
