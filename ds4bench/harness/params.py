"""The matrix's parameters, in one table: their matrix-TOML key, MatrixSpec field, cell parameter
and CellRecord field, command-line option, type, and whether `compare` joins on them and the
printed tables show them. matrix.py (SPEC_KEYS, spec parsing), cli_matrix.py (the options and
how they override a spec), `ds4bench cell` (the parameters it needs) and results.py (JOIN,
SHOWN_PARAMS) derive from it, so a new parameter is a row here plus its use.

Axes are lists (one cell per value); scalars are one value per run. A parameter without an
option (`flag` None) is set in a spec only. Structural spec keys (baseline, exclude, env, tree,
tree_env, env_axis, description) have their own syntax and are listed in STRUCTURAL.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    spec: str                   # the matrix TOML key
    field: str                  # the MatrixSpec attribute (a list for an axis)
    cell: str | None            # the cell parameter and CellRecord field (None: the run's, not a cell's)
    flag: str | None            # the `matrix` option's name (argparse dest), None: spec only
    type: type | tuple
    axis: bool = False
    join: bool = False          # compare joins two runs' cells on it
    shown: bool = False         # the printed table shows it (as a column when it varies)
    help: str = ""
    cast: type | None = None    # converted after the type check (timeouts: int or float -> float)
    in_cell: bool = True        # `ds4bench cell` needs it (False: added since, optional for older trees)
    choices: tuple = ()         # the values the option takes, where it is a choice


PARAMS = (              # in the order tables print them and compare joins on them
    Param("engine", "engine", "engine", "engine", str, join=True, shown=True, in_cell=False,
          help="ds4bench (this package's engine, the default) or an external engine's adapter: a name in "
               "benchmarks/engines/ or a TOML path (docs/engines.md)"),
    Param("preset", "presets", "preset", "preset", str, axis=True, join=True, shown=True,
          help="synthetic presets, e.g. tiny,small"),
    Param("model", "models", "model_file", "model", str, axis=True, join=True, shown=True,
          help="DS4 GGUF files (then --preset, if one, is what they must match)"),
    Param("backend", "backend", "backend", None, str, join=True, shown=True),
    Param("cache", "caches", "cache", "cache", str, axis=True, join=True, shown=True,
          help="numeric modes, e.g. q8,f16,f32 (--cache is the old name)"),
    Param("placement", "placements", "placement", "placement", str, axis=True, join=True, shown=True,
          help="GPU weight placement: device,managed,managed-hinted,host"),
    Param("batch", "batches", "batch", "batch", int, axis=True, join=True, shown=True,
          help="sequences per decode step, e.g. 1,4,16"),
    Param("nvtx", "nvtx", "nvtx", "nvtx", bool, axis=True, join=True, shown=True,
          help="NVTX ranges in the timed repetitions: off, on or off,on (their cost)"),
    Param("trace", "trace", "trace", None, bool, shown=True),
    Param("n", "n_gen", "n_gen", "n", int, join=True, shown=True, help="tokens generated per prompt"),
    Param("prompts", "prompts", "prompt_set", "prompts", str, join=True, shown=True, help="prompt set name or TOML path"),
    Param("reps", "reps", "reps", "reps", int, shown=True, help="timed repetitions per cell"),
    Param("rounds", "rounds", "rounds", "rounds", int, shown=True, in_cell=False,
          help="processes per cell, interleaved round by round"),
    Param("seed", "seed", "seed", "seed", int, join=True, help="synthetic weight seed"),
    Param("variant", "variant", "variant", "variant", str, join=True, choices=("q2", "q4"),
          help="routed-expert weights of the presets (default: each preset's, q2)"),
    Param("warmup", "warmup", "warmup", "warmup", int,
          help="least untimed full passes before the timed ones (more run until the step time settles: "
               "docs/speed.md)"),
    Param("timeout", "timeout_s", "timeout_s", "timeout", (int, float), cast=float,
          help="seconds per cell before it is killed and recorded failed"),
    Param("ctx", "ctx", "ctx", "ctx", int, help="context per sequence (default: longest prompt + n + 1)"),
    Param("chunk", "chunk", "chunk", "chunk", int, help="prefill chunk in tokens"),
    Param("stages", "stages", "stages", None, bool),
    Param("order", "order", None, "order", str, in_cell=False, choices=("random", "abba"),
          help="order of the cells in each round (default random)"),
    Param("settle", "settle", "settle", None, (int, float), cast=float, in_cell=False),
    Param("warmup_cap", "warmup_cap_s", "warmup_cap_s", None, (int, float), cast=float, in_cell=False),
    Param("pass_stat", "pass_stat", "pass_stat", "pass_stat", str, in_cell=False, choices=("median", "best"),
          help="a round's tok/s from its timed passes: median, or best, the fastest (default median)"),
)
STRUCTURAL = ("description", "baseline", "exclude", "env", "tree", "tree_env", "env_axis")
SPEC_KEYS = frozenset(p.spec for p in PARAMS) | frozenset(STRUCTURAL)
AXES = tuple(p for p in PARAMS if p.axis)
SCALARS = tuple(p for p in PARAMS if not p.axis)
# what `ds4bench cell --params` must be given (matrix.expand writes them, with more)
CELL_PARAMS = frozenset(p.cell for p in PARAMS if p.cell and p.in_cell) | {"env"}
SHOWN = tuple(p.cell for p in PARAMS if p.shown)
# compare's join: presets and files join as one "model" (results.join_key)
JOIN = tuple(dict.fromkeys("model" if p.spec in ("preset", "model") else p.cell for p in PARAMS if p.join))


# the option strings of a parameter's `matrix` option, where they are not --<flag>
OPTION_NAMES = {"model": ("--model", "-m"), "cache": ("--mode", "--cache"), "batch": ("--batch", "-b"), "n": ("-n",),
                "pass_stat": ("--pass-stat",)}


def option_names(p: Param) -> tuple:
    return OPTION_NAMES.get(p.flag, (f"--{p.flag}",))
