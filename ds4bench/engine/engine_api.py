"""The engine seam: what the harness asks of an engine, and what the model code asks of its ops.

`InferenceEngine` is what `generate.generate`, the teacher-forced KL (kl.py) and a cell
(cell.py) use: a run state of `batch` slots, prefill of one slot, one decode step of several,
logits out on the host, a profiler in, and facts about memory and capability. `generate.Engine`
(the NumPy reference and the CuPy engine, one model code over two `Ops`) implements it; an
engine of its own (another implementation of DS4) implements the same few members.

`Ops` is the base class of the heavy operations the model code (model.DS4Model) calls, with
the array code's defaults: an ops class must supply the required methods; the fused kernels
(model.FUSABLE) are optional, and where one is None the model runs its own array code for it.
`ops_ref.RefOps` (NumPy, the specification) and `ops_gpu.GpuOps` (CuPy and kernels/) are the
two in this package; a plugin's numeric mode (generate.register_mode) returns one too.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class InferenceEngine(Protocol):
    batch: int                  # slots decoded together
    ctx: int                    # context of each slot
    decode_path: str            # how a full decode step runs ("eager", "graph", or eager and why)
    state: Any                  # the run state (state.RunState): reset() before a new group of prompts

    def prefill(self, slot: int, ids) -> np.ndarray:
        """Prompt tokens into one slot; the last token's logits [V] on the host."""

    def decode(self, tokens, slots) -> np.ndarray:
        """One token for each of `slots` in one step; logits [len(slots), V] on the host."""

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on the host)."""

    def facts(self) -> dict:
        """What the engine is and can do: backend, numeric mode, decode path, memory in use."""


class Ops:
    """Heavy operations of one numeric mode (see the module docstring). Subclasses set `xp`
    (the array module) and `acc` (the dtype small reductions accumulate in) and implement the
    required methods below; the optional fused kernels stay None unless they have them."""
    xp: Any = np
    acc: Any = np.float64
    cache = "f32"               # the numeric mode
    faults = frozenset()        # injected faults the ops carry (faults.py)
    unfused = frozenset()       # model.FUSABLE groups left to the array code even where fused
    alloc = None                # run state allocator (shape -> zeroed array); None: xp.zeros

    # -- required: weights ------------------------------------------------------------------
    def param(self, name: str):
        """A small F32 tensor (norm, scale, sink) as an xp array."""
        raise NotImplementedError

    def param_opt(self, name: str):
        """param(name), or None when the model has no such tensor."""
        raise NotImplementedError

    def embed(self, tokens):
        """Token embeddings [..., n_embd] for int64 ids."""
        raise NotImplementedError

    # -- required: products -----------------------------------------------------------------
    def linear(self, name: str, x):
        """x @ W(name).T in the mode's arithmetic."""
        raise NotImplementedError

    def linear_grouped(self, name: str, x):
        """A grouped projection (the output LoRA's per-group matrices)."""
        raise NotImplementedError

    def experts(self, il: int, x, sel, w):
        """Layer il's routed experts: the weighted sum over the selected experts of each token."""
        raise NotImplementedError

    def tid2eid(self, il: int, tokens):
        """Layer il's hash-routing table: the experts of each token id (int64 [N, A])."""
        raise NotImplementedError

    # -- required: roundings and selections -------------------------------------------------
    def kv_round(self, x):
        """The KV rows as the cache stores them."""
        raise NotImplementedError

    def indexer_round(self, x):
        """The indexer key rows as the cache stores them."""
        raise NotImplementedError

    @staticmethod
    def topk_ids(score, k: int):
        raise NotImplementedError

    @staticmethod
    def topk_mask(score, visible, k: int, faults=frozenset()):
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (nothing on the host)."""

    # -- optional fused kernels (model.FUSABLE); None: the model's array code ------------------
    hc_weights = hc_collapse = hc_expand = None
    rms_norm = rope = None
    attend = attend_ring = None
    route = pool_windows = indexer_scores = swiglu_clamped = None
