"""The stage probe on the GPU engine (marked `gpu`; skipped without CuPy and a GPU): a healthy
GPU cell is within every limit against the NumPy reference of its mode, and a GPU cell with a
broken kernel is named at the stage the kernel serves."""
import numpy as np
import pytest

from .engine_util import require_gpu

cp = require_gpu()
pytestmark = pytest.mark.gpu

from ds4bench.harness import probe as PR  # noqa: E402
from ds4bench.engine.generate import make_ops  # noqa: E402
from ds4bench.engine.options import EngineOptions  # noqa: E402

from .engine_util import tiny_model  # noqa: E402
from .test_verdicts import smoke_prompts  # noqa: E402


@pytest.fixture(scope="module", params=["q8", "f16", "f32"])
def mode_ref(request):
    ids = PR.probe_tokens(smoke_prompts())
    return request.param, ids, PR.record_reference(tiny_model(0), request.param, ids, PR.DEFAULT_STEPS)


@pytest.mark.parametrize("batch", [1, 4])
def test_healthy_gpu_cell_within_limits(mode_ref, batch):
    cache, ids, ref = mode_ref
    ops = make_ops(tiny_model(0), EngineOptions(mode=cache, backend="cupy"))
    stats = [s.to_dict() for s in PR.run_probe(ops, tiny_model(0), batch, ref, ids)]
    assert PR.judge_stages(stats, "cupy", cache) is None, max(
        (s["nmse"] / PR.limit("cupy", cache, s["stage"]), s["stage"], s["layer"]) for s in stats)


def test_broken_gpu_kernel_named(mode_ref):
    """attn_output_b's kernel with its output 1.5% high (a scale read wrong): attn.out, layer 0."""
    cache, ids, ref = mode_ref
    ops = make_ops(tiny_model(0), EngineOptions(mode=cache, backend="cupy"))
    orig = ops.linear

    def linear(name, x):
        y = orig(name, x)
        return y * np.float32(1.015) if name.endswith("attn_output_b.weight") else y
    ops.linear = linear
    bad = PR.judge_stages([s.to_dict() for s in PR.run_probe(ops, tiny_model(0), 1, ref, ids)], "cupy", cache)
    assert bad is not None and (bad["stage"], bad["layer"]) == ("attn.out", 0), bad
