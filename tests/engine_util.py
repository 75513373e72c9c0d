"""Shared fixtures for engine tests: the tiny model, its tokenizer, and golden-file helpers."""
import functools
import json
import os

import pytest

from ds4bench.engine import config
from ds4bench.engine.generate import Engine, generate
from ds4bench.engine.prompts import load_prompts
from ds4bench.engine.synth import make_model
from ds4bench.engine.tokenizer import byte_level

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny.json")
GOLDEN_TOKENS = 8
GOLDEN_TOPK = 5


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0):
    return make_model(config.preset("tiny"), seed)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    return byte_level(config.preset("tiny").n_vocab)


def default_prompts():
    tok = tiny_tokenizer()
    return [(p.id, tok.chat(p.text)) for p in load_prompts("default")]


def golden_run(cache: str) -> dict:
    """What the golden file stores for one mode: tokens and top-5 ids/logprobs per prompt."""
    prompts = default_prompts()
    ctx = max(len(ids) for _, ids in prompts) + GOLDEN_TOKENS + 1
    eng = Engine(tiny_model(), mode=cache, ctx=ctx)
    res = generate(eng, prompts, GOLDEN_TOKENS, top_k=GOLDEN_TOPK)
    return {fp.prompt_id: {"tokens": fp.tokens, "sha256": fp.sha256, "topk_ids": fp.topk_ids,
                           "topk_logprobs": fp.topk_logprobs} for fp in res.fingerprints}


def write_golden() -> None:
    """Regenerate tests/golden/tiny.json deliberately: `python -m tests.engine_util`."""
    data = {"preset": "tiny", "seed": 0, "tokens": GOLDEN_TOKENS, "top_k": GOLDEN_TOPK,
            "modes": {cache: golden_run(cache) for cache in ("q8", "f16", "f32")}}
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    write_golden()
    print(f"wrote {GOLDEN}")


def require_gpu():
    """CuPy with a CUDA device, or skip the calling test module: call at module level of a
    gpu-marked module (`cp = require_gpu()`)."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cp
