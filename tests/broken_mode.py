"""Deliberately broken numeric modes for the matrix tests (a test-only plugin).

Load it with DS4BENCH_PLUGINS=tests.broken_mode. It is the q8 mode with one classic kernel
bug: the Q8_0 projections of the attention tensors read each block's scale from the *next*
block of the row (an off-by-one in the scale index; the last block wraps to the first). The
integer dots are untouched, so the output stays finite and plausible-looking; only the
matrix's comparison with the baseline can tell that it is wrong.

Two more modes never produce a record: `test-crash` kills its own process (as the kernel's
out-of-memory killer would) and `test-hang` never returns (the per-cell timeout must end it).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import numpy as np

from ds4bench.engine.generate import register_mode
from ds4bench.engine.ops_ref import RefOps

ATTENTION = ("attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
             "attn_output_b.weight")


class BadScaleOps(RefOps):
    def __init__(self, model):
        super().__init__(model, "q8")

    def intw(self, name: str):
        W = self._int.get(name)
        if W is None:
            W = super().intw(name)
            if name.split(".", 2)[-1] in ATTENTION:
                W = self._int[name] = dataclasses.replace(W, d=np.roll(W.d, -1, axis=-1))   # [O, n/32]
        return W


def _factory(model, options):
    if options.backend != "numpy":
        raise ValueError(f"mode q8-badscale is a NumPy test mode; backend {options.backend!r} is not supported")
    return BadScaleOps(model)


register_mode("q8-badscale", _factory)


def _crash(model, options):
    print("simulated crash: the cell process is killed while loading its mode", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(model, options):
    time.sleep(3600)


register_mode("test-crash", _crash)
register_mode("test-hang", _hang)
