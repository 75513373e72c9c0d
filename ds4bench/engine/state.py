"""Run state: everything a sequence carries between steps, allocated once per (batch, context).

Per layer: the raw sliding-window ring of KV rows; on compressed layers the compressed KV rows
and the compressor's ring of pending (kv, score) rows; on ratio-4 layers also the indexer keys
and the indexer compressor's ring. Rings are indexed by absolute position modulo their length,
so chunked prefill and token-by-token decode leave identical contents. The number of
compressed rows a sequence has is always `pos // ratio`, so it is derived, never stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig


@dataclass
class LayerState:
    raw: object                         # [B, W, K]   ring of raw KV rows, row = pos % W
    comp: object | None = None          # [B, Cmax, K] compressed KV rows
    ck: object | None = None            # [B, L, w]   compressor ring (kv), row = pos % L
    cs: object | None = None            # [B, L, w]   compressor ring (scores + ape)
    ik: object | None = None            # [B, Cmax, I] indexer keys (ratio-4 layers)
    ick: object | None = None           # [B, 8, 2I]  indexer compressor ring (kv)
    ics: object | None = None           # [B, 8, 2I]  indexer compressor ring (scores)

    def arrays(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RunState:
    cfg: ModelConfig
    batch: int
    ctx: int
    layers: list[LayerState]
    pos: object                         # [B] int64 host array: tokens already processed per slot
    xp: object = field(repr=False, default=None)

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, ctx: int, xp, alloc=None) -> "RunState":
        """`alloc(shape)` returns a zeroed float32 array (lets a backend choose where it lives)."""
        alloc = alloc or (lambda shape: xp.zeros(shape, dtype=xp.float32))
        B, K, W = batch, cfg.head_dim, cfg.sliding_window
        layers = []
        for il in range(cfg.n_layer):
            r = cfg.ratio(il)
            ls = LayerState(raw=alloc((B, W, K)))
            if r:
                cmax = ctx // r + 1
                L, w = cfg.compressor_rows(il), cfg.compressor_width(il)
                ls.comp = alloc((B, cmax, K))
                ls.ck, ls.cs = alloc((B, L, w)), alloc((B, L, w))
                if cfg.has_indexer(il):
                    ls.ik = alloc((B, cmax, cfg.indexer_dim))
                    ls.ick, ls.ics = alloc((B, 8, 2 * cfg.indexer_dim)), alloc((B, 8, 2 * cfg.indexer_dim))
            layers.append(ls)
        return cls(cfg, batch, ctx, layers, np.zeros(batch, dtype=np.int64), xp)

    def check_position(self, p: int) -> None:
        """ValueError (one line) when position p does not fit the context."""
        if p >= self.ctx:
            raise ValueError(f"context overflow: position {p} >= ctx {self.ctx}")

    def reset(self, slots=None) -> None:
        """Start fresh sequences in `slots` (all when None). Old rows are never read again:
        every read is limited to positions in [0, pos)."""
        if slots is None:
            self.pos[:] = 0
        else:
            self.pos[list(slots)] = 0

    def nbytes(self) -> int:
        return sum(a.nbytes for ls in self.layers for a in ls.arrays().values())

    def snapshot(self) -> dict:
        """A copy of the whole state (ds4-bench's save before generating at a frontier)."""
        return {"pos": self.pos.copy(),
                "layers": [{k: v.copy() for k, v in ls.arrays().items()} for ls in self.layers]}

    def restore(self, snap: dict) -> None:
        """Copy a snapshot back in place (buffers keep their addresses)."""
        self.pos[:] = snap["pos"]
        for ls, saved in zip(self.layers, snap["layers"]):
            for k, v in saved.items():
                getattr(ls, k)[...] = v
