"""Opening a model: a DS4 GGUF file (memory-mapped and validated) or a synthetic preset
(generated in memory)."""
from __future__ import annotations

from . import config as C


def load_model(model: str | None = None, preset: str | None = None, variant: str | None = None, seed: int = 0):
    """A ModelFile from a GGUF path or a synthetic preset (generated in memory). A file given
    with a preset must match it; a preset too large for the host's memory is a ValueError."""
    from .gguf_io import load_gguf, tensor_specs
    from .fileio import host_available
    from .synth import make_model
    if model:
        expect = C.preset(preset, variant) if preset else None
        return load_gguf(model, expect, variant)
    cfg = C.preset(preset or "tiny", variant)
    need = sum(s.nbytes for s in tensor_specs(cfg))
    avail = host_available()
    if avail and need > 0.6 * avail:
        raise ValueError(f"preset {cfg.name} ({cfg.variant}) needs {need / 2**30:.1f} GiB of host memory, "
                         f"{avail / 2**30:.1f} GiB is available; use a smaller preset or write it with "
                         f"`ds4bench model make` on a larger machine")
    return make_model(cfg, seed)
