"""The A/B matrix: spec -> cells -> one process per cell -> records judged against a baseline.

A spec names axes as lists (llama-bench style) and everything fixed: the prompt set, tokens to
generate, repetitions, warm-up, excludes, the baseline, the per-cell timeout. It comes from a
TOML file (benchmarks/matrices/*.toml) or from command-line comma lists:

    preset = ["tiny"]                 # or model = ["path/to/file.gguf"]
    cache = ["q8", "f16", "f32"]
    placement = ["device", "managed"] # GPU only; skipped with a stated reason on the CPU
    batch = [1, 4]
    nvtx = [false, true]              # NVTX ranges off/on in the timed repetitions (their cost)
    prompts = "smoke"                 # a set in benchmarks/prompts/ or a TOML path
    n = 32                            # tokens generated per prompt
    reps = 2                          # timed repetitions; warmup = untimed ones before them
    timeout = 600                     # seconds per cell
    baseline = { cache = "f32", placement = "device", batch = 1 }
    exclude = [{ cache = "q8", batch = 16 }]
    rounds = 5                        # processes per cell, interleaved round by round (rounds.py)
    order = "random"                  # or "abba"; settle = 0.05, warmup_cap = 3: the warm-up rule
    tree = { A = "80a58af", B = "." } # the tree axis (trees.py); tree_env = { B = { K = "v" } }
    [env]                             # extra environment for every cell: engine toggles (ENGINE_ENV)
    DS4BENCH_UNFUSED = "rope"         # and anything else (OMP_NUM_THREADS, ...)
    [env_axis]                        # environment variables as axes (--env K=v1,v2 on the command
    DS4BENCH_FAULT = ["unset", "q8-act-block"]   # line): "unset" = absent; baseline default unset
                                      # (where listed, else the first value);
                                      # cell keys, baseline and exclude name them env.<VAR>

Cells are grouped by model (so a model is generated or paged in once per group) with the
group's baseline first, then in axis order. Each cell runs `python -m ds4bench cell` in its own
process and session with its own environment (DS4BENCH_CACHE, DS4BENCH_PLACEMENT, ...): a crash,
an out-of-memory kill or a timeout becomes that cell's `failed` record and the matrix goes on.
With `rounds` > 1 every cell runs that many times, one process each, in the interleaved order of
rounds.schedule, and its record merges the rounds (rounds.merge; docs/speed.md).
The matrix process itself never imports CuPy.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import config as C
from ..engine.config import PLACEMENTS
from . import record as R
from .record import TRACE_FIELDS
from . import verdict as V
from ..engine.options import ENGINE_ENV, environment, model_cache_dir
from .params import AXES as SPEC_AXES, SCALARS as SPEC_SCALARS, SPEC_KEYS
from .rounds import SETTLE, WARMUP_CAP_S

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MATRICES_DIR = R.REPO / "benchmarks" / "matrices"
AXES = ("model", "cache", "placement", "batch", "nvtx")
# SPEC_KEYS, and how each key parses: params.PARAMS
UNSET = "unset"                        # an env-axis value: the variable is absent from the cell's environment
# Variables that change what the engine does; a cell records those set in its environment,
# wherever they came from (the spec's [env] or the shell), so no toggle goes unrecorded.
# (options.ENGINE_ENV: the variables that change what the engine does; a cell records those set
# in its environment, wherever they came from, so no toggle goes unrecorded)
SYNTH_IN_MEMORY_MAX = 256 * 2**20      # larger presets are written to a GGUF once and memory-mapped per cell


@dataclass
class MatrixSpec:
    presets: list = field(default_factory=lambda: ["tiny"])
    models: list = field(default_factory=list)          # GGUF files; when given they are the model axis
    caches: list = field(default_factory=lambda: ["q8", "f16", "f32"])
    placements: list = field(default_factory=lambda: ["device"])
    batches: list = field(default_factory=lambda: [1])
    nvtx: list = field(default_factory=lambda: [False])
    variant: str | None = None
    seed: int = 0
    prompts: str = "smoke"
    n_gen: int = 32
    reps: int = 2
    warmup: int = 0
    timeout_s: float = 600.0
    baseline: dict = field(default_factory=dict)
    excludes: list = field(default_factory=list)
    backend: str = "auto"
    engine: str = "ds4bench"                            # ours, or an adapter (command_engine.py)
    ctx: int | None = None
    chunk: int = 512
    stages: bool = False
    trace: bool = False
    env: dict = field(default_factory=dict)
    rounds: int = 1                                     # processes per cell, interleaved (rounds.py)
    order: str = "random"                               # rounds.ORDERS
    settle: float = SETTLE                              # warm-up stopping rule (rounds.warm_up)
    warmup_cap_s: float = WARMUP_CAP_S
    pass_stat: str = "median"                           # a round's tok/s from its passes (record.PASS_STATS)
    trees: dict = field(default_factory=dict)           # the tree axis: label -> path or commit (trees.py)
    tree_env: dict = field(default_factory=dict)        # label -> extra environment of that tree's cells
    env_axis: dict = field(default_factory=dict)        # variable -> values ("unset": absent)
    description: str = ""
    source: str = "command line"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MatrixSpec":
        return cls(**d)


@dataclass
class Cell:
    cell_id: str
    key: str                    # the varying parameters, for tables
    group: str                  # the model it belongs to
    params: dict                # CellRecord parameter fields
    is_baseline: bool = False
    baseline_cell: str | None = None


# ---- spec ------------------------------------------------------------------------------------
def spec_path(name: str) -> Path:
    p = Path(name)
    if p.suffix != ".toml" and p.parent == Path("."):
        p = MATRICES_DIR / f"{name}.toml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in MATRICES_DIR.glob("*.toml"))) or "none"
        raise ValueError(f"matrix spec {name!r}: no file {p} (known specs: {known})")
    return p


def load_spec(name: str) -> MatrixSpec:
    p = spec_path(name)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from None
    where = p.resolve()
    return spec_from_mapping(doc, str(where.relative_to(R.REPO)) if where.is_relative_to(R.REPO) else str(p))


def spec_from_mapping(doc: dict, source: str) -> MatrixSpec:
    """A spec from TOML-shaped values (lists for axes); raises ValueError naming the bad key."""
    unknown = set(doc) - SPEC_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(SPEC_KEYS))}")
    s = MatrixSpec(source=source)

    def lst(key, kind, default, allow_bool=False):
        v = doc.get(key, default)
        v = v if isinstance(v, list) else [v]
        if not v or not all(isinstance(x, kind) and (allow_bool or not isinstance(x, bool)) for x in v):
            raise ValueError(f"{source}: {key} must be a non-empty list of {kind.__name__}, found {doc[key]!r}")
        return list(dict.fromkeys(v))

    def one(key, kind, default):
        v = doc.get(key, default)
        if v is not None and (not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool)):
            raise ValueError(f"{source}: {key} must be {getattr(kind, '__name__', kind)}, found {v!r}")
        return v

    for p in SPEC_AXES:                     # params.PARAMS: the axes, then the scalars
        if p.spec == "model":
            s.models = lst("model", str, []) if "model" in doc else []
        else:
            setattr(s, p.field, lst(p.spec, p.type, getattr(s, p.field), allow_bool=p.type is bool))
    for p in SPEC_SCALARS:
        v = one(p.spec, p.type, getattr(s, p.field))
        setattr(s, p.field, p.cast(v) if p.cast and v is not None else v)
    s.description = one("description", str, "")
    s.baseline = dict(one("baseline", dict, {}))
    s.excludes = [dict(e) for e in one("exclude", list, [])]
    s.env = {str(k): str(v) for k, v in one("env", dict, {}).items()}
    s.trees = {str(k): str(v) for k, v in one("tree", dict, {}).items()}
    s.tree_env = {str(k): {str(a): str(b) for a, b in dict(v).items()} for k, v in one("tree_env", dict, {}).items()}
    for k, v in one("env_axis", dict, {}).items():
        v = v if isinstance(v, list) else [v]
        if not v or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{source}: env_axis {k} must be a non-empty list of strings, found {v!r}")
        s.env_axis[str(k)] = list(dict.fromkeys(v))
    validate(s)
    return s


def parse_pairs(text: str, what: str) -> dict:
    """'cache=q8,batch=16' -> {'cache': 'q8', 'batch': '16'}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise ValueError(f"{what} {text!r}: expected key=value pairs like cache=q8,batch=16")
        out[k.strip()] = v.strip()
    return out


def validate(s: MatrixSpec) -> None:
    from ..engine.generate import EXTRA_MODES
    from ..engine.ops_ref import CACHE_MODES
    where = f"matrix spec ({s.source})"
    if s.engine != "ds4bench":
        from .command_engine import load_adapter, path_values
        adapter = load_adapter(s.engine)
        for vals in itertools.product(*s.env_axis.values()):     # its [paths], in every cell's environment
            path_values(adapter, {**s.env, **{k: None if v == UNSET else v for k, v in zip(s.env_axis, vals)}})
        if s.trace:
            raise ValueError(f"{where}: engine {s.engine}: --trace captures this package's engine only")
    modes = list(CACHE_MODES) + sorted(EXTRA_MODES)
    for c in s.caches if s.engine == "ds4bench" else []:
        if c not in modes:
            raise ValueError(f"{where}: unknown cache mode {c!r}; choose from {', '.join(modes)} "
                             f"(other modes come from a DS4BENCH_PLUGINS module)")
    for p in s.placements:
        if p not in PLACEMENTS:
            raise ValueError(f"{where}: unknown placement {p!r}; choose from {', '.join(PLACEMENTS)}")
    for b in s.batches:
        if not 1 <= b <= 64:
            raise ValueError(f"{where}: batch {b} is outside 1..64")
    for p in s.presets if not s.models else []:
        C.preset(p, s.variant)
    for m in s.models:
        if not Path(m).is_file():
            raise ValueError(f"{where}: model file {m} does not exist")
        if len(s.presets) == 1:                 # the file must be that preset: check once, here
            from ..engine.gguf_io import load_gguf
            load_gguf(m, C.preset(s.presets[0]), s.variant)
    if s.variant not in (None, "q2", "q4"):
        raise ValueError(f"{where}: variant must be q2 or q4, found {s.variant!r}")
    _check_toggles(s.env, s.env, f"{where}: [env]", "; the cells set cache, placement and batch themselves")
    for var, vals in s.env_axis.items():
        if not var or "=" in var or var.startswith("env."):
            raise ValueError(f"{where}: env axis variable {var!r} is not a variable name")
        if var in s.env:
            raise ValueError(f"{where}: {var} is both fixed ([env]) and an axis (env_axis); keep one")
        for v in vals:
            _check_toggles([var], {var: v} if v != UNSET else {}, f"{where}: env axis")
    for name, v, lo in (("n", s.n_gen, 1), ("reps", s.reps, 1), ("warmup", s.warmup, 0), ("chunk", s.chunk, 1),
                        ("seed", s.seed, 0)):
        if v < lo:
            raise ValueError(f"{where}: {name} must be at least {lo}, found {v}")
    from .rounds import ORDERS
    if s.rounds < 1:
        raise ValueError(f"{where}: rounds must be at least 1, found {s.rounds}")
    if s.order not in ORDERS:
        raise ValueError(f"{where}: order must be one of {', '.join(ORDERS)}, found {s.order!r}")
    if not 0 < s.settle < 1 or s.warmup_cap_s <= 0:
        raise ValueError(f"{where}: settle must be in (0, 1) and warmup_cap positive, found {s.settle:g}, "
                         f"{s.warmup_cap_s:g}")
    if s.pass_stat not in R.PASS_STATS:
        raise ValueError(f"{where}: pass_stat must be one of {', '.join(R.PASS_STATS)}, found {s.pass_stat!r}")
    if s.trees or s.tree_env:
        from .trees import check_labels
        check_labels(s.trees, where)
        for label, env in s.tree_env.items():
            if label not in s.trees:
                raise ValueError(f"{where}: tree_env {label}: no tree {label} (trees: {', '.join(s.trees) or 'none'})")
            _check_toggles(env, env, f"{where}: tree_env {label}:")
    if s.timeout_s <= 0:
        raise ValueError(f"{where}: timeout must be positive, found {s.timeout_s:g}")
    if s.backend not in ("auto", "numpy", "cupy"):
        raise ValueError(f"{where}: backend must be auto, numpy or cupy, found {s.backend!r}")
    for d, what in [(s.baseline, "baseline")] + [(e, "exclude") for e in s.excludes]:
        bad = set(d) - {"cache", "placement", "batch", "nvtx", "model", "preset"} - {f"env.{v}" for v in s.env_axis}
        if bad:
            raise ValueError(f"{where}: {what} keys {sorted(bad)} are not axes; use cache, placement, batch, nvtx, "
                             f"model" + "".join(f", env.{v}" for v in s.env_axis))
        if "nvtx" in d:
            try:
                _flag(d["nvtx"])
            except ValueError:
                raise ValueError(f"{where}: {what} nvtx={d['nvtx']!r}: use on or off") from None
    b = s.baseline
    if "cache" in b and b["cache"] not in modes:
        raise ValueError(f"{where}: baseline cache {b['cache']!r} is not a mode; choose from {', '.join(modes)}")
    if "placement" in b and b["placement"] not in PLACEMENTS:
        raise ValueError(f"{where}: baseline placement {b['placement']!r}; choose from {', '.join(PLACEMENTS)}")
    if "batch" in b and (not isinstance(b["batch"], int) or not 1 <= b["batch"] <= 64):
        raise ValueError(f"{where}: baseline batch must be an integer in 1..64, found {b['batch']!r}")
    from ..engine.prompts import load_prompts
    load_prompts(s.prompts)
    if s.ctx is not None:                       # a context too small would fail every cell
        from .guards import check_ctx
        check_ctx(s.ctx, s.n_gen, s.prompts, _model_meta(s), where)


def _model_meta(s: MatrixSpec) -> list:
    """(label, config, metadata) of each model of a spec: a file's own, or a preset's synthetic."""
    from ..engine.gguf_io import load_gguf
    from ..engine.synth import synth_metadata
    if s.models:
        return [(Path(m).name, (mf := load_gguf(m)).cfg, mf.metadata) for m in s.models]
    return [(p, cfg, synth_metadata(cfg, s.seed)) for p in s.presets for cfg in [C.preset(p, s.variant)]]



def _check_toggles(names, env: dict, what: str, hint: str = "") -> None:
    """A spec's engine toggles, as the CLI checks the shell's: a DS4BENCH_* name in `names` that
    is no toggle (a misspelling would be recorded and do nothing), or a value in `env` that no
    backend knows, is a one-line ValueError starting with `what`."""
    from ..engine.options import check_engine_env
    unknown = sorted(k for k in names if k.startswith("DS4BENCH_") and k not in ENGINE_ENV)
    if unknown:
        raise ValueError(f"{what} {unknown[0]} is not an engine toggle ({', '.join(ENGINE_ENV)}{hint})")
    try:
        check_engine_env(env)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None

# ---- backend ---------------------------------------------------------------------------------
def resolve_backend(requested: str) -> tuple[str, str]:
    """(backend, why). auto picks cupy when `generate.gpu_unavailable_reason()` finds nothing
    missing -- asked in a child process, so this process never imports CuPy."""
    if requested == "numpy":
        return "numpy", "backend numpy was requested"
    probe = "from ds4bench.engine.generate import gpu_unavailable_reason as r; print(r() or 'ok')"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env=_child_env({}))
        lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
        why = lines[-1] if lines else f"the GPU probe exited {r.returncode}"
        why = "" if r.returncode == 0 and why == "ok" else why
    except subprocess.TimeoutExpired:
        why = "the GPU probe did not answer in 120 s"
    if not why:
        return "cupy", "CuPy imports, a GPU is visible and ds4bench.engine.ops_gpu imports"
    if requested == "cupy":
        raise ValueError(f"backend cupy is unavailable: {why}; use --backend numpy or auto")
    return "numpy", why


# ---- expansion -------------------------------------------------------------------------------
def expand(spec: MatrixSpec, backend: str, backend_why: str = "") -> tuple[list[Cell], list[str]]:
    """Cells in run order and the notes (skipped axes, added baselines) to print and record."""
    notes = []
    placements = list(spec.placements)
    caches = list(spec.caches)
    external = spec.engine != "ds4bench"
    if external:                            # command_engine.py: its toggles are env axes
        from .command_engine import NATIVE
        backend, caches, placements = "external", [NATIVE], [None]
        notes.append(f"engine {spec.engine}: the numeric mode, placement and batch axes are this package's "
                     f"engine and are skipped (its toggles are --env axes; one prompt per process, batch 1)")
    elif backend == "numpy":
        placements = [None]
        notes.append(f"placement axis skipped: the numpy backend keeps every weight in host memory "
                     f"({backend_why})")
    models = [("file", m) for m in spec.models] or [("preset", p) for p in spec.presets]
    base_want = {"cache": "f32", "placement": "device" if backend == "cupy" else None, "batch": 1, "nvtx": False}
    base_want.update({k: v for k, v in spec.baseline.items() if k in base_want})
    if external:
        base_want.update(cache=caches[0], placement=None)
    if backend in ("numpy", "external"):
        base_want["placement"] = None
    else:
        base_want["placement"] = str(base_want["placement"])
    base_want["batch"] = int(base_want["batch"])
    base_want["nvtx"] = _flag(base_want["nvtx"])
    env_keys = [f"env.{v}" for v in spec.env_axis]             # env axes: the baseline has them unset
    base_want.update({k: str(spec.baseline.get(k, UNSET if UNSET in vals else vals[0]))   # (or the first value)
                      for k, vals in zip(env_keys, spec.env_axis.values())})
    env_combos = [dict(zip(env_keys, vals)) for vals in itertools.product(*spec.env_axis.values())]
    trace = spec.trace and backend == "cupy"
    if spec.trace and not trace:
        notes.append("trace skipped: the numpy backend does no GPU work for Nsight Systems to see")
    nvtx = [True] if trace else list(spec.nvtx)               # a trace needs the ranges
    if trace:
        base_want["nvtx"] = True
    varying = {a for a, vals in (("model", models), ("cache", caches), ("placement", placements),
                                 ("batch", [1] if external else spec.batches), ("nvtx", nvtx)) if len(vals) > 1}
    varying |= {k for k, vals in zip(env_keys, spec.env_axis.values()) if len(vals) > 1}
    cells: list[Cell] = []
    for kind, model in models:
        label = model if kind == "preset" else Path(model).stem
        combos = [dict(cache=c, placement=p, batch=b, nvtx=v, **e)
                  for c, p, b, v, e in itertools.product(caches, placements, [1] if external else spec.batches,
                                                         nvtx, env_combos)]
        combos = [c for c in combos if not _excluded(c, label, spec.excludes)]
        base = dict(base_want)
        if base not in combos:
            notes.append(f"{label}: baseline {_kv(base)} added: it is not in the matrix")
            varying |= {a for a in ("cache", "placement", "batch", "nvtx", *env_keys)
                        if len({c[a] for c in combos} | {base[a]}) > 1}
            combos.insert(0, base)
        else:
            combos.insert(0, combos.pop(combos.index(base)))
        group: list[Cell] = []
        for combo in combos:
            preset = model if kind == "preset" else (spec.presets[0] if len(spec.presets) == 1 else None)
            axis = {k[4:]: combo[k] for k in env_keys}
            params = {"engine": spec.engine, "preset": preset, "model_file": model if kind == "file" else None,
                      "variant": spec.variant, "seed": spec.seed, "backend": backend,
                      **{k: v for k, v in combo.items() if k not in env_keys},
                      "n_gen": spec.n_gen, "prompt_set": spec.prompts, "reps": spec.reps, "warmup": spec.warmup,
                      "ctx": spec.ctx or 0, "chunk": spec.chunk, "stages": spec.stages, "trace": trace,
                      "timeout_s": spec.timeout_s,
                      "env": {**spec.env, **{k: v for k, v in axis.items() if v != UNSET}},
                      "env_unset": [k for k, v in axis.items() if v == UNSET], "rounds": spec.rounds,
                      "settle": spec.settle, "warmup_cap_s": spec.warmup_cap_s,
                      "pass_stat": spec.pass_stat}
            mode = Path(spec.engine).stem if external else combo["cache"]       # an external engine: its name
            cid = "-".join([label, mode] + ([combo["placement"]] if combo["placement"] else [])
                           + [f"b{combo['batch']}"] + (["nvtx"] if combo["nvtx"] else [])
                           + [re.sub(r"[^A-Za-z0-9_.,=-]", "_", f"{k}={v}") for k, v in axis.items() if v != UNSET])
            group.append(Cell(cid, "", label, params, is_baseline=combo == base))
        for c in group:
            c.baseline_cell = group[0].cell_id
        cells += group
    for c in cells:
        parts = {"model": c.group, **{a: c.params[a] for a in ("cache", "placement", "batch")},
                 "nvtx": "on" if c.params["nvtx"] else "off",
                 **{k: c.params["env"].get(k[4:], UNSET) for k in env_keys}}
        c.key = " ".join(f"{a}={parts[a]}" for a in (*AXES, *env_keys) if a in varying) or c.cell_id
    return cells, notes


def _excluded(combo: dict, label: str, excludes: list[dict]) -> bool:
    vals = {**{k: str(v) for k, v in combo.items()}, "model": label, "preset": label}
    return any(all(vals.get(k) == (str(_flag(v)) if k == "nvtx" else str(v)) for k, v in e.items()) for e in excludes)


def _flag(v) -> bool:
    """An on/off axis value from TOML (bool) or the command line (on/off, true/false, 1/0)."""
    if isinstance(v, bool):
        return v
    t = str(v).strip().lower()
    if t in ("on", "true", "1", "yes"):
        return True
    if t in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{v!r} is not on/off")


def _kv(d: dict) -> str:
    return ",".join(f"{k}={'on' if v is True else v}" for k, v in d.items() if v is not None and v is not False)


def prepare_models(cells: list[Cell], cache_dir: str | None = None, say=print) -> None:
    """Presets too large to generate in every cell are written to a GGUF once, then mapped
    (again on a resume that finds the file gone, e.g. on a fresh GPU machine)."""
    from ..engine.gguf_io import tensor_specs
    from ..engine.synth import auto_workers, write_model
    root = Path(cache_dir) if cache_dir else model_cache_dir()
    for c in cells:
        p = c.params
        if not p["preset"]:
            continue
        cfg = C.preset(p["preset"], p["variant"])
        path = root / f"{cfg.name}-{cfg.variant}-seed{p['seed']}.gguf"
        external = p.get("engine", "ds4bench") != "ds4bench"     # another engine reads a file
        if (p["model_file"] and p["model_file"] != str(path)) or \
                (sum(s.nbytes for s in tensor_specs(cfg)) <= SYNTH_IN_MEMORY_MAX and not external):
            continue
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            from .guards import remove_orphans
            for orphan in remove_orphans(root):              # left by a writer that was killed
                say(f"removed {orphan}, left by an interrupted write")
            say(f"writing synthetic {cfg.name} ({cfg.variant}) once to {path}")
            write_model(cfg, str(path), p["seed"], auto_workers(cfg))     # under a temporary name, renamed
        p["model_file"] = str(path)


# ---- running ---------------------------------------------------------------------------------
def cell_env(cell: Cell) -> dict:
    p = cell.params
    env = {"DS4BENCH_BACKEND": p["backend"], "DS4BENCH_CACHE": p["cache"]}
    if p["placement"]:
        env["DS4BENCH_PLACEMENT"] = p["placement"]
    env.update(p["env"])
    env.update({k: None for k in p.get("env_unset", ())})     # None: removed from the child's environment
    return env


def _child_env(extra: dict, tree: dict | None = None) -> dict:
    env = environment()
    env.update(extra)
    for k in [k for k, v in extra.items() if v is None]:
        del env[k]
    first = str(R.REPO)
    if tree and tree.get("tree_path") and Path(tree["tree_path"]) != R.REPO.resolve():   # the tree axis
        first = tree["tree_path"]
        env.pop("DS4BENCH_COMMIT", None)        # given for this tree, not that one
        if tree.get("tree_commit"):
            env["DS4BENCH_COMMIT"] = tree["tree_commit"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH", "")]))
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")       # NVML and CUDA agree on device numbering
    return env


def _die_with_parent() -> None:
    """In the child: be killed if the runner dies, so no orphan keeps measuring."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_cell_process(cell: Cell, out: Path, fingerprints: Path, log: Path,
                     trace: tuple[str, Path] | None = None) -> tuple[dict | None, str, float]:
    """Run one cell as `python -m ds4bench cell` (under `nsys profile` when `trace` gives the
    nsys path and the report's base name); (record or None, error, wall seconds)."""
    cmd = [sys.executable, "-m", "ds4bench", "cell", "--params", json.dumps(cell.params),
           "--out", str(out), "--fingerprints", str(fingerprints)]
    if trace:
        from .nsys import profile_command
        cmd = profile_command(trace[0], trace[1], cmd)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=_child_env(cell_env(cell), cell.params), start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout=cell.params["timeout_s"])
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
        finally:
            if proc.poll() is None:                 # timeout or interrupt: end the cell's whole session
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    wall = time.perf_counter() - t0
    if rc == 0 and out.is_file() and log.stat().st_size == 0:
        log.unlink()                            # keep logs only where a cell said something
    if timed_out:
        return None, f"timed out after {cell.params['timeout_s']:g} s (raise --timeout)", wall
    if rc == 0 and out.is_file():
        return json.loads(out.read_text()), "", wall
    last = _last_line(log)
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return None, f"killed by {name}{hint}" + (f"; last output: {last}" if last else ""), wall
    from ..engine.fileio import disk_note                # a full disk also swallows the cell's own last words
    return None, (last or f"exited with status {rc} without a record") + disk_note(out.parent), wall


# What nsys prints after the program it profiled; the cell's own last words come before it.
NSYS_CHATTER = ("Processing events", "Generated:", "No reports were generated", "Collecting data",
                "Capture range", "Generating '", "[1/1]", ".nsys-rep", "WARNING: CPU", "Exporting")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if not any(c in ln for c in NSYS_CHATTER)]
    return lines[-1][:500] if lines else ""


def judge(rec: dict, cell_fp: str, base_rec: dict | None, base_fp: str | None,
          th: V.Thresholds = V.DEFAULT) -> dict:
    """Fill a finished record's verdict fields against its group's baseline."""
    if rec["status"] != "ok":
        return rec
    if base_rec is None or base_rec["status"] != "ok" or base_fp is None:
        rec["verdict"] = None
        rec["verdict_reason"] = f"not judged: baseline cell {rec['baseline_cell']} failed"
        rec["unavailable"]["verdict"] = rec["unavailable"]["median_dlogprob"] = rec["verdict_reason"]
        return rec
    cfp, bfp = V.load_fingerprints(cell_fp), V.load_fingerprints(base_fp)
    kl = {k: rec.get(k) for k in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agree", "kl_steps")}
    probe = {"stage": rec.get("verdict_stage"), "layer": rec.get("verdict_layer"), "reason": rec.get("probe_reason")}
    rec["verdict"], rec["verdict_reason"], rec["median_dlogprob"] = V.judge_cell(
        rec["prompts"], cfp, bfp, th, bool(rec["deterministic"]),
        kl if rec.get("kl_median") is not None else None, probe)
    return rec


def measure_round(run, cell: Cell, k: int, slot: int, n_rounds: int, nsys: str | None = None) -> tuple[dict, bool]:
    """Round k of a cell, as one `ds4bench cell` process writing into the run directory `run`
    (a results.RunDir): (its record with the run's identity fields, True), or (a failed cell
    record naming the round, False). Runs wherever the run directory is reachable: in the
    runner's process, or in an executor's worker (executor.py)."""
    cid = cell.cell_id
    out, fp, log = run.cell_paths(cid)
    if k:                                   # later rounds: their own log, fingerprints only compared
        fp, log = run.path / "tmp" / f"{cid}.r{k}.npz", log.with_name(f"{cid}.r{k}.log")
    trace = None
    if cell.params.get("trace") and nsys:
        (run.path / "traces").mkdir(exist_ok=True)
        trace = (nsys, run.path / "traces" / (cid if not k else f"{cid}.r{k}"))
    # what this run of the cell needs beside its params, in them (any tree's `cell` ignores
    # keys it does not know): the group baseline's fingerprints for the teacher-forced KL,
    # the run's cache of reference stage outputs, and whether it measures correctness
    # (round 1) or only time (later rounds: no probe, no KL)
    this = dataclasses.replace(cell, params={
        **cell.params, "correctness": not k, "probe_cache": str(run.path / "probe-cache"),
        "baseline_fingerprints": str(run.cell_paths(cell.baseline_cell)[1]) if cell.baseline_cell else None})
    rec, err, wall = run_cell_process(this, out, fp, log, trace)
    base = {"run_id": run.run_id, "cell_id": cid, "key": cell.key, "is_baseline": cell.is_baseline,
            "baseline_cell": cell.baseline_cell, **cell.params}
    ok = rec is not None
    if not ok:
        rec = R.failed_record(base, f"round {k + 1} of {n_rounds}: {err}" if n_rounds > 1 else err, wall)
    else:
        rec.update({f: base[f] for f in ("run_id", "cell_id", "key", "is_baseline", "baseline_cell")})
        rec.update(wall_s=wall, round=k, round_slot=slot)
        for f in ("executor_host", "executor_job"):            # executor.run_unit fills them
            rec.setdefault("unavailable", {})[f] = "run by the local runner (--executor local)"
        rec["unavailable"]["gpu_shared"] = "no other job shared the cell's GPU"
        for f in ("tree", "tree_source"):
            rec[f] = cell.params.get(f)
        if cell.params.get("trace"):
            add_trace(rec, run.path, trace)
        if k:
            fp.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    return rec, ok


class Collector:
    """The runner's side of a run: rounds come in (from this process or from an executor's
    workers), cells go out. A cell whose rounds are all in becomes one record (rounds.merge),
    judged against its group's baseline and appended to cells.jsonl; a failed round fails the
    cell; a round's tokens that differ from round 1's mark the cell non-deterministic."""

    def __init__(self, cells: list[Cell], run, th: V.Thresholds = V.DEFAULT):
        self.cells, self.run, self.th = cells, run, th
        self.done = {r["cell_id"]: r for r in run.records()}
        self.got: dict[str, list[dict]] = {}
        for r in run.round_records():
            self.got.setdefault(r["cell_id"], []).append(r)
        self.by_id = {c.cell_id: c for c in cells}
        self.plan = run.meta().get("schedule") or [[c.cell_id for c in cells]]
        self.n_rounds = len(self.plan)

    def pending(self, cid: str, k: int) -> bool:
        """Whether round k of cell `cid` is still to run."""
        return cid not in self.done and len(self.got.get(cid, [])) <= k

    def todo(self) -> list[tuple[int, int, str]]:
        """(round, slot, cell id) of every round still to run, in schedule order."""
        return [(k, slot, cid) for k, order in enumerate(self.plan) for slot, cid in enumerate(order)
                if self.pending(cid, k)]

    def finish(self, cell: Cell, rec: dict) -> None:
        out_fp = str(self.run.cell_paths(cell.cell_id)[1])
        if rec["status"] == "ok":
            b = rec if cell.is_baseline else self.done.get(cell.baseline_cell)
            rec = judge(rec, out_fp, b, str(self.run.cell_paths(cell.baseline_cell)[1]) if b else None, self.th)
        self.run.append(rec)
        self.done[cell.cell_id] = rec

    def accept(self, cell: Cell, rec: dict, ok: bool) -> None:
        """A round's outcome (measure_round's pair)."""
        from .rounds import merge, same_tokens
        cid = cell.cell_id
        if cid in self.done:                        # an earlier round already failed the cell
            return
        if not ok:
            self.finish(cell, rec)
            return
        if rec.get("round") and self.got.get(cid) and not same_tokens(self.got[cid][0], rec):
            rec["deterministic"] = False
        self.run.append_round(rec)
        self.got.setdefault(cid, []).append(rec)
        if len(self.got[cid]) == self.n_rounds and (cell.is_baseline or cell.baseline_cell in self.done):
            self.finish(cell, merge(sorted(self.got[cid], key=lambda r: r["round"])))

    def flush(self) -> None:
        """Finish, in cell order (a group's baseline judged first), every cell whose rounds are all in."""
        from .rounds import merge
        for cell in self.cells:
            rs = self.got.get(cell.cell_id, [])
            if cell.cell_id not in self.done and len(rs) == self.n_rounds:
                self.finish(cell, merge(sorted(rs, key=lambda r: r["round"])))

    def records(self) -> list[dict]:
        return [self.done[c.cell_id] for c in self.cells if c.cell_id in self.done]


def run_matrix(cells: list[Cell], run, th: V.Thresholds = V.DEFAULT, progress=None,
               nsys: str | None = None) -> list[dict]:
    """Run, one process at a time, the rounds `run` (a results.RunDir) has no record of, in its
    schedule (run.json `schedule`: cell ids per round, rounds.schedule; one round in cell
    order without it); return every record of the run.

    Each round is one cell process (measure_round); its record goes to rounds.jsonl, and a cell
    whose rounds are all done becomes one judged record in cells.jsonl (Collector).
    `progress(event, cell, record)` is told 'start' and 'done' for each round. Cells whose
    params ask for a trace run under `nsys` (its path) and get their per-range GPU time."""
    col = Collector(cells, run, th)
    for k, order in enumerate(col.plan):
        for slot, cid in enumerate(order):
            cell = col.by_id[cid]
            if not col.pending(cid, k):
                continue
            if progress:
                progress("start", cell, None)
            rec, ok = measure_round(run, cell, k, slot, col.n_rounds, nsys)
            col.accept(cell, rec, ok)
            if progress:
                progress("done", cell, col.done.get(cid, rec))
        col.flush()
    return col.records()


def add_trace(rec: dict, run_path: Path, trace: tuple[str, Path] | None) -> None:
    """Fill a traced cell's trace fields from its report, or say in `unavailable` why not."""
    from . import nsys as N
    why = "nsys was not found (see the run's notes)"
    if trace:
        nsys, base = trace
        rep = N.report_path(base)
        try:
            rec.update(N.summarize(N.run_stats(nsys, rep)))
            rec["trace_file"] = str(rep.relative_to(run_path))
            return
        except N.NsysError as e:
            why = str(e)
    for k in TRACE_FIELDS:
        rec.setdefault("unavailable", {})[k] = why
