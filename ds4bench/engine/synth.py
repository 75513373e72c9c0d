"""Deterministic synthetic DS4 weights in the real formats, tensor by tensor.

Each tensor is drawn from its own generator seeded by (seed, tensor name), so any tensor can be
made alone, in any order, on the host or chunk by chunk for a device, and always comes out the
same. Scales keep the network well conditioned: projections preserve unit RMS, the two
residual branches of a layer add a bounded amount to the hyper-connection state, and the logits
have a spread of a few nats (checked by tests on `tiny`).
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import config as C
from .formats import quantize_q8_0, random_blocks
from .gguf_io import ModelFile, Tensor, TensorSpec, raw_view, tensor_specs, write_gguf

# RMS each residual branch (attention output, FFN output) adds to a hyper-connection stream.
BRANCH_RMS = 0.35
# Logit standard deviation at the head: large enough for confident greedy picks, small enough
# that the top-2 margin is rarely a near tie.
LOGIT_STD = 3.0


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _suffix(spec: TensorSpec) -> str:
    return spec.name.split(".", 2)[2] if spec.layer >= 0 else spec.name


def weight_std(cfg: C.ModelConfig, spec: TensorSpec) -> float:
    """Standard deviation of a projection's entries, chosen from its fan-in and role."""
    fan_in = spec.shape[-1]
    unit = 1.0 / math.sqrt(fan_in)
    s = _suffix(spec)
    if s in ("attn_output_b.weight",):
        return BRANCH_RMS * unit
    if s == "ffn_down_shexp.weight":
        return BRANCH_RMS * unit / 0.35           # mid = silu(g)*u has RMS ~0.35 for unit g, u
    if s == "ffn_down_exps.weight":
        # Σ over used experts of w_e * Wd @ mid, w summing to expert_weights_scale.
        return BRANCH_RMS * unit / (0.35 * cfg.expert_weights_scale) * math.sqrt(cfg.n_expert_used) / 2
    if s in ("hc_attn_fn.weight", "hc_ffn_fn.weight") or spec.name == "output_hc_fn.weight":
        return 0.5 * unit                         # control-vector entries of about ±0.5
    if spec.name == "output.weight":
        return LOGIT_STD * unit
    if s == "attn_compressor_ape.weight" or s == "indexer_compressor_ape.weight":
        return 0.2
    return unit


def _plain(spec: TensorSpec, rng: np.random.Generator, cfg: C.ModelConfig) -> np.ndarray:
    """F32/F16/I32 tensors: norms, scales, bases, sinks, HC/router/compressor/indexer weights."""
    s = _suffix(spec)
    shape = spec.shape
    if spec.qtype == QT.I32:                      # ffn_gate_tid2eid: distinct experts per token
        keys = rng.random((shape[0], cfg.n_expert))
        return np.argsort(keys, axis=1)[:, : shape[1]].astype(np.int32)
    if s.endswith("norm.weight") or spec.name == "output_norm.weight":
        x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif s in ("hc_attn_scale.weight", "hc_ffn_scale.weight") or spec.name == "output_hc_scale.weight":
        x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif s in ("hc_attn_base.weight", "hc_ffn_base.weight"):
        S = cfg.hc_streams
        x = 0.2 * rng.standard_normal(shape)
        x[2 * S:] += 2.0 * np.eye(S).reshape(-1)   # comb leans to identity: streams keep their identity
    elif spec.name == "output_hc_base.weight":
        x = 0.2 * rng.standard_normal(shape)
    elif s == "attn_sinks.weight":
        x = rng.standard_normal(shape)
    elif s == "exp_probs_b.bias":
        x = 0.1 * rng.standard_normal(shape)
    elif spec.name == "token_embd.weight":
        x = rng.standard_normal(shape)
    else:
        x = weight_std(cfg, spec) * rng.standard_normal(shape)
    return x.astype(np.float16 if spec.qtype == QT.F16 else np.float32)


def make_tensor(cfg: C.ModelConfig, spec: TensorSpec, seed: int) -> np.ndarray:
    """The data of one tensor, in its file layout (see `gguf_io.raw_view`)."""
    rng = tensor_rng(seed, spec.name)
    if spec.qtype == QT.Q8_0:
        w = (weight_std(cfg, spec) * rng.standard_normal(spec.shape, dtype=np.float32))
        return quantize_q8_0(w)
    if spec.qtype in (QT.Q2_K, QT.Q4_K, QT.IQ2_XXS):
        flat = random_blocks(spec.qtype, spec.shape, rng, weight_std(cfg, spec))
        return raw_view(spec, flat.reshape(-1))
    return _plain(spec, rng, cfg)


def synth_metadata(cfg: C.ModelConfig, seed: int) -> dict[str, object]:
    from .tokenizer import byte_level
    meta: dict[str, object] = {"ds4bench.preset": cfg.name, "ds4bench.variant": cfg.variant,
                               "ds4bench.seed": int(seed)}
    meta.update(byte_level(cfg.n_vocab).gguf_metadata())
    return meta


def make_model(cfg: C.ModelConfig, seed: int = 0) -> ModelFile:
    """A whole synthetic model in host memory (no file)."""
    tensors = {s.name: Tensor(s, make_tensor(cfg, s, seed)) for s in tensor_specs(cfg)}
    return ModelFile(cfg, tensors, synth_metadata(cfg, seed), None, seed)


def write_model(cfg: C.ModelConfig, path: str, seed: int = 0, workers: int = 1) -> int:
    """Generate straight into a GGUF file, one tensor at a time (flash-4l needs no RAM for the whole).

    With workers > 1 a pool of processes makes the tensors and writes each in place in the
    zero-filled file (gguf_io.write_gguf's `fill`), largest first; the file is byte-identical to
    the one-process writer's. Each worker holds one tensor's making at a time: up to about 8 GiB
    for the Flash output head, 1.4 GiB for a layer's routed experts (auto_workers bounds them)."""
    meta = synth_metadata(cfg, seed)
    if workers <= 1:
        return write_gguf(path, cfg, lambda s: make_tensor(cfg, s, seed), extra_metadata=meta)

    def fill(tmp: str, placed: list) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp
        jobs = sorted(placed, key=lambda so: -so[0].nbytes)
        # fork: workers need nothing re-imported, and work whatever __main__ is (stdin, a notebook)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        try:
            with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for f in cf.as_completed([pool.submit(_fill_tensor, cfg, spec, seed, tmp, off) for spec, off in jobs]):
                    f.result()
        except cf.process.BrokenProcessPool:
            raise OSError(f"a process writing tensors died (out of memory, or the disk filled under its "
                          f"mapping); write with fewer workers") from None
    return write_gguf(path, cfg, None, extra_metadata=meta, fill=fill)


def _fill_tensor(cfg: C.ModelConfig, spec: TensorSpec, seed: int, path: str, offset: int) -> int:
    """A pool worker: one tensor made and written at its offset in the file."""
    data = np.ascontiguousarray(make_tensor(cfg, spec, seed)).reshape(-1).view(np.uint8)
    out = np.memmap(path, dtype=np.uint8, mode="r+", offset=offset, shape=(spec.nbytes,))
    out[:] = data
    out.flush()
    del out
    return spec.nbytes


# Host memory a worker may need: the largest tensor's making (the output head at Flash shape:
# about 8 GiB) for one, a layer's routed experts (about 1.4 GiB) for each other.
WORKER_FIRST_BYTES, WORKER_BYTES = 8 << 30, 3 << 29
AUTO_MIN_BYTES = 1 << 30             # smaller models are written by one process


def auto_workers(cfg: C.ModelConfig, available: int | None = None, cpus: int | None = None) -> int:
    """Processes for write_model: 1 below AUTO_MIN_BYTES, else one per CPU as far as the host's
    available memory (MemAvailable) holds their making. A file written to memory (/dev/shm) takes
    its own size from that too: leave it room with a smaller `workers`."""
    from .fileio import host_available
    if sum(s.nbytes for s in tensor_specs(cfg)) < AUTO_MIN_BYTES:
        return 1
    cpus = cpus or len(os.sched_getaffinity(0))
    avail = host_available() if available is None else available
    fit = 1 + max(0, (int(0.8 * avail) - WORKER_FIRST_BYTES) // WORKER_BYTES) if avail else 1
    return max(1, min(cpus, fit))
