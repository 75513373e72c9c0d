"""Stage ranges: free when off, named after the code, NVTX ranges that change nothing."""
import pytest

from ds4bench.engine.generate import Engine, generate
from ds4bench.engine.profiling import HostTimer, NvtxRanges, Profiler, make_profiler, stage_of

from .engine_util import default_prompts, tiny_model

STAGES = {"prefill", "decode", "hc_pre", "attn.q", "attn.kv", "attention", "attn.out", "moe.router",
          "moe.experts", "moe.shared", "head"}


def _run(prof):
    prompts = default_prompts()[:1]
    eng = Engine(tiny_model(), mode="q8", ctx=64, profiler=prof)
    return generate(eng, prompts, 4).fingerprints[0]


def test_off_is_one_shared_null_context():
    p = Profiler()
    assert p.range("a") is p.range("b") and p.summary() == {} and not p.enabled


def test_host_timer_sees_every_stage_named_after_the_code():
    t = HostTimer()
    _run(t)
    names = set(t.summary())
    assert STAGES <= names and {"layer.0", "layer.1"} <= names
    assert {"compressor", "indexer"} & names                              # tiny has compressed layers
    assert {stage_of(n) for n in names} >= {"layer"} and stage_of("layer.12") == "layer"
    assert t.calls["decode"] == 3 and all(v >= 0 for v in t.summary().values())


def test_nvtx_ranges_change_no_token():
    pytest.importorskip("nvtx")
    assert _run(NvtxRanges()).tokens == _run(Profiler()).tokens


def test_make_profiler_names():
    assert isinstance(make_profiler("stages", "numpy"), HostTimer)
    assert not make_profiler("none", "numpy").enabled
    with pytest.raises(ValueError, match="unknown profiler 'gprof'"):
        make_profiler("gprof", "numpy")
