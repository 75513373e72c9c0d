"""EngineOptions and the one module that reads the environment (ds4bench/engine/options.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ds4bench.engine.options import ENGINE_ENV, VARS, EngineOptions, check_engine_env, get, toggles_in_effect

PKG = Path(__file__).resolve().parent.parent / "ds4bench"


def test_only_options_reads_the_environment():
    """No other module of the package touches os.environ or os.getenv: every variable is read
    through options (and a new one must be named in options.VARS to be read at all)."""
    readers = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("environ", "getenv", "environb", "putenv"):
                readers.append(f"{path.relative_to(PKG.parent)}:{node.lineno} os.{node.attr}")
    assert readers == []
    with pytest.raises(KeyError, match="DS4BENCH_NOPE is not a ds4bench variable"):
        get("DS4BENCH_NOPE")


def test_options_come_from_the_environment_with_the_given_fields_over_them():
    env = {"DS4BENCH_UNFUSED": "rope,attend", "DS4BENCH_ATTN_KERNEL": "ring", "DS4BENCH_DECODE_GRAPH": "on",
           "DS4BENCH_CACHE_MB": "64", "DS4BENCH_PLACEMENT": "managed", "DS4BENCH_SLOWDOWN": "moe:0.05",
           "DS4BENCH_FAULT": "q8-act-block", "DS4BENCH_UNRELATED": "x"}
    gpu = EngineOptions.from_env(env, mode="q8", backend="cupy", batch=4, ctx=128)
    assert (gpu.mode, gpu.batch, gpu.ctx, gpu.unfused, gpu.attn_kernel, gpu.decode_graph, gpu.cache_mb,
            gpu.placement, str(gpu.slowdown), gpu.faults) == \
        ("q8", 4, 128, {"rope", "attend"}, "ring", "on", 64, "managed", "moe:0.05", {"q8-act-block"})
    assert EngineOptions.from_env(env, backend="cupy", placement="host").placement == "host"     # given wins
    cpu = EngineOptions.from_env(env, mode="f16")            # the NumPy engine has no placement, no cache budget
    assert (cpu.backend, cpu.placement, cpu.cache_mb, cpu.faults) == ("numpy", None, None, {"q8-act-block"})
    assert EngineOptions.from_env({}) == EngineOptions()
    assert toggles_in_effect(env) == {k: v for k, v in env.items() if k in ENGINE_ENV}


@pytest.mark.parametrize("fields,msg", [
    ({"batch": 0}, "batch must be in 1..64, got 0"),
    ({"chunk": 0}, "prefill chunk must be positive"),
    ({"backend": "tpu"}, "unknown backend 'tpu'"),
    ({"attn_kernel": "inplace"}, "DS4BENCH_ATTN_KERNEL: unknown 'inplace'; choose from concat, ring"),
    ({"unfused": {"fast_norm"}}, "DS4BENCH_UNFUSED: unknown fast_norm"),
    ({"faults": {"nope"}}, "DS4BENCH_FAULT: unknown fault nope"),
    ({"placement": "device"}, "placement device applies to the GPU backend only"),
    ({"backend": "cupy", "placement": "vram"}, "placement: unknown placement 'vram'"),
    ({"cache_mb": 5}, "cache budget 5 MiB: a non-negative budget of the GPU backend only")])
def test_options_refuse_what_no_engine_knows_in_one_line(fields, msg):
    with pytest.raises(ValueError, match=msg):
        EngineOptions(**fields)


def test_every_engine_toggle_is_a_documented_variable_and_checked():
    assert set(ENGINE_ENV) <= set(VARS) and all(VARS[k] for k in VARS)
    check_engine_env({})
    for var, bad in (("DS4BENCH_PROBE_TOKENS", "lots"), ("DS4BENCH_PROBE_LEAD", "far"), ("DS4BENCH_CACHE_MB", "x"),
                     ("DS4BENCH_SLOWDOWN", "moe"), ("DS4BENCH_PLACEMENT", "vram")):
        with pytest.raises(ValueError, match=f"^{var}: "):
            check_engine_env({var: bad})


def test_both_engines_meet_the_seam():
    """The NumPy engine is an engine_api.InferenceEngine over an engine_api.Ops; an Ops without
    fused kernels runs the model's array code (the base class's None), and one missing a
    required method says which."""
    import numpy as np
    from ds4bench.engine.engine_api import InferenceEngine, Ops
    from ds4bench.engine.generate import Engine
    from ds4bench.engine.ops_ref import RefOps
    from .engine_util import tiny_model
    eng = Engine(tiny_model(), mode="q8", ctx=32)
    assert isinstance(eng, InferenceEngine) and isinstance(eng.ops, Ops) and isinstance(eng.ops, RefOps)
    assert eng.facts()["backend"] == "numpy" and eng.facts()["mode"] == "q8" and eng.facts()["memory"] is None
    assert eng.ops.rms_norm is None and eng.net._rms is not None          # array code stands in

    class Bare(Ops):
        pass
    with pytest.raises(NotImplementedError):
        Bare().linear("output.weight", np.zeros((1, 4), np.float32))
