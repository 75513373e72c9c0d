"""The engine's options, and every DS4BENCH_* environment variable: the one module that reads
the environment.

`EngineOptions` is everything that selects how the engine computes: the numeric mode, the
backend, the run state's shape (batch, context, prefill chunk), the weight placement and the
performance toggles (kernel variants, unfused groups, decode graph, dequant-cache budget), plus
the two test-only injectors (a known slowdown, injected faults). It is parsed and validated in
one function, `EngineOptions.from_env` (the environment's toggles, with the command line's or a
matrix cell's values over them), then passed explicitly: Engine -> ops -> kernels. Nothing
below the Engine reads the environment.

The variables, by kind (VARS has each one's meaning):
  engine toggles   ENGINE_ENV: what a matrix spec's [env] and env axes may set, and what every
                   cell records as in effect; they change speed, never the answer (a fault
                   excepted: it must be caught)
  command defaults DS4BENCH_CACHE (the numeric mode), _BACKEND, _PLACEMENT, _PROFILE
  places           where models, trees, GGUF header indexes and probe references are cached
  provenance       DS4BENCH_COMMIT: the commit a copied checkout (no .git) is
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# Kernel variants and launch paths a toggle picks: field -> (variable, choices, the first the
# default). Every choice computes the same bits, or (q8_kernel wide) the reference's result with
# its double sum in another order (the GPU tests compare them). A toggle whose
# other variants measured no better and were removed keeps its one value, so a spec or an
# environment naming a removed variant gets this module's one-line error.
VARIANTS = {
    # the Q8_0 matmuls: a warp per row and token tiles of TOKEN_TILE (matmul_q8_0, and
    # matmul_q8_0_fused with the activation quantization fused in); or, for at most TOKEN_TILE
    # tokens, S threads per row each loading several blocks before using any, the grid filling
    # the GPU (matmul_q8_0_wide_<T>, matmul_q8_0_wide_fused_<T>; more tokens take warp)
    "q8_kernel": ("DS4BENCH_Q8_KERNEL", ("warp", "wide")),
    # the routed experts: a warp per row looping over the selected experts
    "moe_kernel": ("DS4BENCH_MOE_KERNEL", ("warp",)),
    # attention: keys gathered and concatenated with a host-built mask, then attend_sink; or
    # attend_sink_ring reading the window ring, the new rows and the compressed rows in place
    "attn_kernel": ("DS4BENCH_ATTN_KERNEL", ("concat", "ring")),
    # decode: each step's kernels launched from Python, or the static step captured once in a
    # CUDA graph and replayed (graph_gpu.DecodeGraph; the f32 mode stays eager)
    "decode_graph": ("DS4BENCH_DECODE_GRAPH", ("off", "on")),
}
KERNEL_CHOICES = {var: choices for var, choices in VARIANTS.values()}

VARS = {
    # engine toggles
    "DS4BENCH_UNFUSED": "fused kernel groups to run as the model's array code: a list of model.FUSABLE, or all",
    **{var: f"{f}: one of {', '.join(ch)} (default {ch[0]})" for f, (var, ch) in VARIANTS.items()},
    "DS4BENCH_CACHE_MB": "the f16/f32 dequant cache's budget in MiB (default: free device memory less 4 GiB)",
    "DS4BENCH_PLUGINS": "modules to import first (comma list): they may register numeric modes",
    "DS4BENCH_SLOWDOWN": "a known slowdown, <stage>:<fraction> (slowdown.py): tests the speed statistics",
    "DS4BENCH_FAULT": "injected faults (faults.py, comma list): tests the correctness verdicts",
    "DS4BENCH_PROBE_TOKENS": "the stage probe's prefill length (default 80; 0 turns the probe off)",
    "DS4BENCH_PROBE_LEAD": "lead tokens before the probed ones (default: the model's, probe.lead_for; or auto)",
    # command defaults
    "DS4BENCH_CACHE": "default numeric mode of `generate` (--mode)",
    "DS4BENCH_BACKEND": "default backend of `generate` (--backend)",
    "DS4BENCH_PLACEMENT": "default weight placement of `generate` (--placement)",
    "DS4BENCH_PROFILE": "default profiler of `generate` (--profile)",
    # places
    "DS4BENCH_MODEL_CACHE": "synthetic GGUFs written once (default ~/.cache/ds4bench/models)",
    "DS4BENCH_TREE_CACHE": "checkouts of the tree axis (default ~/.cache/ds4bench/trees)",
    "DS4BENCH_GGUF_INDEX": "GGUF header indexes (default ~/.cache/ds4bench/gguf-index; off: none)",
    "DS4BENCH_PROBE_CACHE": "reference stage outputs shared by runs (default: each run's probe-cache/)",
    # provenance, and tools
    "DS4BENCH_COMMIT": "the commit this checkout is, where git cannot say (a copied tree)",
    "NSYS": "the nsys executable (or a folder holding it) when it is not on PATH",
    "NVCC": "`engines build ds4`: the nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)",
    "CUDA_HOME": "`engines build ds4`: the CUDA toolkit (default: nvcc's, or /usr/local/cuda)",
    "CC": "`engines build ds4 --cpu`: the C compiler ds4's Makefile uses (default cc)",
}
ENGINE_ENV = ("DS4BENCH_UNFUSED", *KERNEL_CHOICES, "DS4BENCH_CACHE_MB", "DS4BENCH_PLUGINS", "DS4BENCH_SLOWDOWN",
              "DS4BENCH_FAULT", "DS4BENCH_PROBE_TOKENS", "DS4BENCH_PROBE_LEAD")
CACHE_ROOT = Path.home() / ".cache" / "ds4bench"


def get(name: str, environ=None) -> str | None:
    """The value of ds4bench variable `name` in `environ` (default: this process's)."""
    if name not in VARS:
        raise KeyError(f"{name} is not a ds4bench variable (options.VARS)")
    return (os.environ if environ is None else environ).get(name)


def environment() -> dict:
    """A copy of this process's environment, for a child process to start from."""
    return dict(os.environ)


def adapter_path_var(name: str, environ=None) -> str | None:
    """The variable an external engine's adapter names for one of its paths (command_engine
    [paths], e.g. DS4_BIN): the adapter declares it, so it is not one of VARS."""
    return (os.environ if environ is None else environ).get(name)


def toggles_in_effect(environ=None) -> dict:
    """The engine toggles set in `environ` (default: this process's), as a cell records them."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in ENGINE_ENV if k in env}


def cache_dir(name: str, var: str) -> Path:
    """A cache folder: $`var` when set, else ~/.cache/ds4bench/`name`."""
    given = get(var)
    return Path(given) if given else CACHE_ROOT / name


def model_cache_dir() -> Path:
    return cache_dir("models", "DS4BENCH_MODEL_CACHE")


def tree_cache_dir() -> Path:
    return cache_dir("trees", "DS4BENCH_TREE_CACHE")


def gguf_index_dir() -> Path | None:
    """Where GGUF header indexes are kept; None when DS4BENCH_GGUF_INDEX=off."""
    return None if get("DS4BENCH_GGUF_INDEX") == "off" else cache_dir("gguf-index", "DS4BENCH_GGUF_INDEX")


def commit_given() -> str | None:
    return get("DS4BENCH_COMMIT") or None


# ---- parsers: one line naming the variable and the choices on a bad value ---------------------
def choice(var: str, text: str | None) -> str:
    """The variant `text` (None or empty: the default) names for toggle `var`."""
    choices = KERNEL_CHOICES[var]
    name = (text or choices[0]).strip()
    if name not in choices:
        raise ValueError(f"{var}: unknown {name!r}; choose from {', '.join(choices)}")
    return name


def parse_unfused(text: str | None) -> frozenset:
    """'rope,attend' or 'all' -> the model.FUSABLE groups to leave unfused."""
    from .model import FUSABLE
    names = {t.strip() for t in (text or "").split(",") if t.strip()}
    if "all" in names:
        return frozenset(FUSABLE)
    bad = sorted(names - set(FUSABLE))
    if bad:
        raise ValueError(f"DS4BENCH_UNFUSED: unknown {', '.join(bad)}; choose from all, {', '.join(FUSABLE)}")
    return frozenset(names)


def parse_cache_mb(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.strip().isdigit():
        raise ValueError(f"DS4BENCH_CACHE_MB: {text!r} is not a whole number of MiB")
    return int(text)


def parse_placement(text: str | None, var: str = "DS4BENCH_PLACEMENT") -> str | None:
    from .config import check_placement
    if not text:
        return None
    try:
        return check_placement(text)
    except ValueError as e:
        raise ValueError(f"{var}: {e}") from None


def parse_count(var: str, text: str | None, default: int, extra: str = "") -> int:
    """A whole number of tokens in `var` (None/empty: `default`)."""
    if text is None or text == "":
        return default
    if not text.strip().isdigit():
        raise ValueError(f"{var}: {text!r} is not a whole number of tokens{extra}")
    return int(text)


# ---- the engine's options --------------------------------------------------------------------
@dataclass(frozen=True)
class EngineOptions:
    mode: str = "f32"                   # the numeric mode (ops_ref.MODES, or a plugin's)
    backend: str = "numpy"              # numpy (the reference) or cupy
    batch: int = 1                      # sequences decoded together (run state slots)
    ctx: int = 4096                     # context length of each slot
    chunk: int = 512                    # prefill chunk
    placement: str | None = None        # GPU weights: config.PLACEMENTS (None: device)
    unfused: frozenset = frozenset()    # model.FUSABLE groups run as array code
    q8_kernel: str = "warp"             # VARIANTS
    moe_kernel: str = "warp"
    attn_kernel: str = "concat"
    decode_graph: str = "off"
    cache_mb: int | None = None         # dequant cache budget (None: automatic)
    slowdown: object = None             # slowdown.Slowdown, a known slowdown (speed tests)
    faults: frozenset = field(default_factory=frozenset)   # faults.FAULTS names (verdict tests)

    def __post_init__(self):
        from .faults import parse as parse_faults
        if self.backend not in ("numpy", "cupy"):
            raise ValueError(f"unknown backend {self.backend!r}; choose numpy or cupy")
        if not 1 <= self.batch <= 64:
            raise ValueError(f"batch must be in 1..64, got {self.batch}")
        if self.chunk < 1:
            raise ValueError(f"prefill chunk must be positive, got {self.chunk}")
        if self.ctx < 1:
            raise ValueError(f"context must be positive, got {self.ctx}")
        for f, (var, _) in VARIANTS.items():
            choice(var, getattr(self, f))
        object.__setattr__(self, "unfused", parse_unfused(",".join(sorted(self.unfused))))
        object.__setattr__(self, "faults", parse_faults(",".join(sorted(self.faults))))
        if self.placement is not None:
            parse_placement(self.placement, "placement")
            if self.backend == "numpy":
                raise ValueError(f"placement {self.placement} applies to the GPU backend only")
        if self.cache_mb is not None and (self.backend == "numpy" or self.cache_mb < 0):
            raise ValueError(f"cache budget {self.cache_mb} MiB: a non-negative budget of the GPU backend only")

    @classmethod
    def from_env(cls, environ=None, **given) -> "EngineOptions":
        """The options the engine toggles in `environ` (default: this process's) select, with the
        fields in `given` (the command line's, a cell's) over them. A toggle of the GPU engine
        (placement, cache budget) is left out on the NumPy backend, which has neither."""
        from .faults import from_env as faults_from_env
        from .slowdown import parse as parse_slowdown
        env = os.environ if environ is None else environ
        opts = {f: choice(var, env.get(var)) for f, (var, _) in VARIANTS.items()}
        opts.update(unfused=parse_unfused(env.get("DS4BENCH_UNFUSED")),
                    cache_mb=parse_cache_mb(env.get("DS4BENCH_CACHE_MB")),
                    placement=parse_placement(env.get("DS4BENCH_PLACEMENT")),
                    slowdown=parse_slowdown(env.get("DS4BENCH_SLOWDOWN")),
                    faults=faults_from_env(env))
        opts.update({k: v for k, v in given.items() if v is not None})
        if opts.get("backend", "numpy") == "numpy":
            for k in ("placement", "cache_mb"):
                if given.get(k) is None:
                    opts[k] = None
        return cls(**opts)

    def replace(self, **changes) -> "EngineOptions":
        return dataclasses.replace(self, **changes)

    @property
    def gpu(self) -> bool:
        return self.backend == "cupy"


def check_engine_env(environ=None) -> None:
    """Refuse (ValueError, one line naming the variable) an engine toggle set to what no backend
    knows, whatever the backend of this run: a mistyped toggle fails on a CPU run too."""
    env = os.environ if environ is None else environ
    EngineOptions.from_env(env, backend="cupy")
    parse_count("DS4BENCH_PROBE_TOKENS", env.get("DS4BENCH_PROBE_TOKENS"), 0, " (0 turns the probe off)")
    lead = env.get("DS4BENCH_PROBE_LEAD")
    if lead != "auto":
        parse_count("DS4BENCH_PROBE_LEAD", lead, 0, " (or auto)")
