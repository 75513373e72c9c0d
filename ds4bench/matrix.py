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
    [env]                             # extra environment for every cell: engine toggles (ENGINE_ENV)
    DS4BENCH_UNFUSED = "rope"         # and anything else (OMP_NUM_THREADS, ...)

Cells are grouped by model (so a model is generated or paged in once per group) with the
group's baseline first, then in axis order. Each cell runs `python -m ds4bench cell` in its own
process and session with its own environment (DS4BENCH_CACHE, DS4BENCH_PLACEMENT, ...): a crash,
an out-of-memory kill or a timeout becomes that cell's `failed` record and the matrix goes on.
The matrix process itself never imports CuPy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config as C
from .backend import PLACEMENTS
from .kernels import KERNEL_CHOICES
from . import record as R
from . import verdict as V

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MATRICES_DIR = R.REPO / "benchmarks" / "matrices"
AXES = ("model", "cache", "placement", "batch", "nvtx")
SPEC_KEYS = {"description", "preset", "model", "variant", "seed", "cache", "placement", "batch", "nvtx", "prompts",
             "n", "reps", "warmup", "timeout", "baseline", "exclude", "backend", "ctx", "chunk", "stages", "trace",
             "env"}
# Variables that change what the engine does; a cell records those set in its environment,
# wherever they came from (the spec's [env] or the shell), so no toggle goes unrecorded.
ENGINE_ENV = ("DS4BENCH_UNFUSED", *KERNEL_CHOICES, "DS4BENCH_CACHE_MB", "DS4BENCH_PLUGINS", "DS4BENCH_PROBE_TOKENS")
TRACE_FIELDS = ("trace_file", "trace_gpu_ms", "trace_calls", "trace_kernels", "trace_kernel_ms")   # CellRecord
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
    ctx: int | None = None
    chunk: int = 512
    stages: bool = False
    trace: bool = False
    env: dict = field(default_factory=dict)
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

    s.models = lst("model", str, []) if "model" in doc else []
    s.presets = lst("preset", str, ["tiny"])
    s.caches = lst("cache", str, s.caches)
    s.placements = lst("placement", str, s.placements)
    s.batches = lst("batch", int, s.batches)
    s.nvtx = lst("nvtx", bool, s.nvtx, allow_bool=True)
    s.variant = one("variant", str, None)
    s.seed = one("seed", int, 0)
    s.prompts = one("prompts", str, s.prompts)
    s.n_gen = one("n", int, s.n_gen)
    s.reps = one("reps", int, s.reps)
    s.warmup = one("warmup", int, s.warmup)
    s.timeout_s = float(one("timeout", (int, float), s.timeout_s))
    s.backend = one("backend", str, s.backend)
    s.ctx = one("ctx", int, None)
    s.chunk = one("chunk", int, s.chunk)
    s.stages = one("stages", bool, False)
    s.trace = one("trace", bool, False)
    s.description = one("description", str, "")
    s.baseline = dict(one("baseline", dict, {}))
    s.excludes = [dict(e) for e in one("exclude", list, [])]
    s.env = {str(k): str(v) for k, v in one("env", dict, {}).items()}
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
    from .generate import EXTRA_MODES
    from .ops_ref import CACHE_MODES
    where = f"matrix spec ({s.source})"
    modes = list(CACHE_MODES) + sorted(EXTRA_MODES)
    for c in s.caches:
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
            from .gguf_io import load_gguf
            load_gguf(m, C.preset(s.presets[0], s.variant))
    if s.variant not in (None, "q2", "q4"):
        raise ValueError(f"{where}: variant must be q2 or q4, found {s.variant!r}")
    unknown = sorted(k for k in s.env if k.startswith("DS4BENCH_") and k not in ENGINE_ENV)
    if unknown:                                 # a misspelt toggle would be recorded and do nothing
        raise ValueError(f"{where}: [env] {unknown[0]} is not an engine toggle ({', '.join(ENGINE_ENV)}; "
                         f"the cells set cache, placement and batch themselves)")
    try:
        from .model import check_engine_env
        check_engine_env(s.env)                 # the spec's [env] toggles, as the CLI checks the shell's
    except ValueError as e:
        raise ValueError(f"{where}: [env] {e}") from None
    for name, v, lo in (("n", s.n_gen, 1), ("reps", s.reps, 1), ("warmup", s.warmup, 0), ("chunk", s.chunk, 1),
                        ("seed", s.seed, 0)):
        if v < lo:
            raise ValueError(f"{where}: {name} must be at least {lo}, found {v}")
    if s.timeout_s <= 0:
        raise ValueError(f"{where}: timeout must be positive, found {s.timeout_s:g}")
    if s.backend not in ("auto", "numpy", "cupy"):
        raise ValueError(f"{where}: backend must be auto, numpy or cupy, found {s.backend!r}")
    for d, what in [(s.baseline, "baseline")] + [(e, "exclude") for e in s.excludes]:
        bad = set(d) - {"cache", "placement", "batch", "nvtx", "model", "preset"}
        if bad:
            raise ValueError(f"{where}: {what} keys {sorted(bad)} are not axes; use cache, placement, batch, nvtx, "
                             f"model")
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
    from .prompts import load_prompts
    load_prompts(s.prompts)


# ---- backend ---------------------------------------------------------------------------------
def resolve_backend(requested: str) -> tuple[str, str]:
    """(backend, why). auto picks cupy when `backend.gpu_unavailable_reason()` finds nothing
    missing -- asked in a child process, so this process never imports CuPy."""
    if requested == "numpy":
        return "numpy", "backend numpy was requested"
    probe = "from ds4bench.backend import gpu_unavailable_reason as r; print(r() or 'ok')"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env=_child_env({}))
        lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
        why = lines[-1] if lines else f"the GPU probe exited {r.returncode}"
        why = "" if r.returncode == 0 and why == "ok" else why
    except subprocess.TimeoutExpired:
        why = "the GPU probe did not answer in 120 s"
    if not why:
        return "cupy", "CuPy imports, a GPU is visible and ds4bench.ops_gpu imports"
    if requested == "cupy":
        raise ValueError(f"backend cupy is unavailable: {why}; use --backend numpy or auto")
    return "numpy", why


# ---- expansion -------------------------------------------------------------------------------
def expand(spec: MatrixSpec, backend: str, backend_why: str = "") -> tuple[list[Cell], list[str]]:
    """Cells in run order and the notes (skipped axes, added baselines) to print and record."""
    notes = []
    placements = list(spec.placements)
    if backend == "numpy":
        placements = [None]
        notes.append(f"placement axis skipped: the numpy backend keeps every weight in host memory "
                     f"({backend_why})")
    models = [("file", m) for m in spec.models] or [("preset", p) for p in spec.presets]
    base_want = {"cache": "f32", "placement": "device" if backend == "cupy" else None, "batch": 1, "nvtx": False}
    base_want.update({k: v for k, v in spec.baseline.items() if k in base_want})
    if backend == "numpy":
        base_want["placement"] = None
    else:
        base_want["placement"] = str(base_want["placement"])
    base_want["batch"] = int(base_want["batch"])
    base_want["nvtx"] = _flag(base_want["nvtx"])
    trace = spec.trace and backend == "cupy"
    if spec.trace and not trace:
        notes.append("trace skipped: the numpy backend does no GPU work for Nsight Systems to see")
    nvtx = [True] if trace else list(spec.nvtx)               # a trace needs the ranges
    if trace:
        base_want["nvtx"] = True
    varying = {a for a, vals in (("model", models), ("cache", spec.caches), ("placement", placements),
                                 ("batch", spec.batches), ("nvtx", nvtx)) if len(vals) > 1}
    cells: list[Cell] = []
    for kind, model in models:
        label = model if kind == "preset" else Path(model).stem
        combos = [dict(cache=c, placement=p, batch=b, nvtx=v)
                  for c, p, b, v in itertools.product(spec.caches, placements, spec.batches, nvtx)]
        combos = [c for c in combos if not _excluded(c, label, spec.excludes)]
        base = dict(base_want)
        if base not in combos:
            notes.append(f"{label}: baseline {_kv(base)} added: it is not in the matrix")
            varying |= {a for a in ("cache", "placement", "batch", "nvtx")
                        if len({c[a] for c in combos} | {base[a]}) > 1}
            combos.insert(0, base)
        else:
            combos.insert(0, combos.pop(combos.index(base)))
        group: list[Cell] = []
        for combo in combos:
            preset = model if kind == "preset" else (spec.presets[0] if len(spec.presets) == 1 else None)
            params = {"preset": preset, "model_file": model if kind == "file" else None,
                      "variant": spec.variant, "seed": spec.seed, "backend": backend, **combo,
                      "n_gen": spec.n_gen, "prompt_set": spec.prompts, "reps": spec.reps, "warmup": spec.warmup,
                      "ctx": spec.ctx or 0, "chunk": spec.chunk, "stages": spec.stages, "trace": trace,
                      "timeout_s": spec.timeout_s, "env": dict(spec.env)}
            cid = "-".join([label, combo["cache"]] + ([combo["placement"]] if combo["placement"] else [])
                           + [f"b{combo['batch']}"] + (["nvtx"] if combo["nvtx"] else []))
            group.append(Cell(cid, "", label, params, is_baseline=combo == base))
        for c in group:
            c.baseline_cell = group[0].cell_id
        cells += group
    for c in cells:
        parts = {"model": c.group, **{a: c.params[a] for a in ("cache", "placement", "batch")},
                 "nvtx": "on" if c.params["nvtx"] else "off"}
        c.key = " ".join(f"{a}={parts[a]}" for a in AXES if a in varying) or c.cell_id
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
    from .gguf_io import tensor_specs
    from .synth import write_model
    root = Path(cache_dir or os.environ.get("DS4BENCH_MODEL_CACHE") or Path.home() / ".cache" / "ds4bench" / "models")
    for c in cells:
        p = c.params
        if not p["preset"]:
            continue
        cfg = C.preset(p["preset"], p["variant"])
        path = root / f"{cfg.name}-{cfg.variant}-seed{p['seed']}.gguf"
        if (p["model_file"] and p["model_file"] != str(path)) or \
                sum(s.nbytes for s in tensor_specs(cfg)) <= SYNTH_IN_MEMORY_MAX:
            continue
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            say(f"writing synthetic {cfg.name} ({cfg.variant}) once to {path}")
            write_model(cfg, str(path), p["seed"])            # written under a temporary name, renamed
        p["model_file"] = str(path)


# ---- running ---------------------------------------------------------------------------------
def cell_env(cell: Cell) -> dict:
    p = cell.params
    env = {"DS4BENCH_BACKEND": p["backend"], "DS4BENCH_CACHE": p["cache"], "DS4BENCH_BATCH": str(p["batch"])}
    if p["placement"]:
        env["DS4BENCH_PLACEMENT"] = p["placement"]
    env.update(p["env"])
    return env


def _child_env(extra: dict) -> dict:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(R.REPO), env.get("PYTHONPATH", "")]))
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
    nsys path and the report's base name); (record or None, error, wall seconds). The cell is
    given its group baseline's fingerprints (beside its own), which its teacher-forced KL reads."""
    cmd = [sys.executable, "-m", "ds4bench", "cell", "--params", json.dumps(cell.params),
           "--out", str(out), "--fingerprints", str(fingerprints)]
    if cell.baseline_cell:
        cmd += ["--baseline-fingerprints", str(Path(fingerprints).with_name(f"{cell.baseline_cell}.npz"))]
    if trace:
        from .nsys import profile_command
        cmd = profile_command(trace[0], trace[1], cmd)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=_child_env(cell_env(cell)), start_new_session=True,
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
    return None, last or f"exited with status {rc} without a record", wall


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


def run_matrix(cells: list[Cell], run, th: V.Thresholds = V.DEFAULT, progress=None,
               nsys: str | None = None) -> list[dict]:
    """Run the cells `run` (a results.RunDir) has no record of; return every record of the run.

    `progress(event, cell, record)` is told 'start' and 'done' for each cell. Cells whose
    params ask for a trace run under `nsys` (its path) and get their per-range GPU time."""
    done = {r["cell_id"]: r for r in run.records()}
    todo = [c for c in cells if c.cell_id not in done]
    for cell in todo:
        if progress:
            progress("start", cell, None)
        out, fp, log = run.cell_paths(cell.cell_id)
        trace = None
        if cell.params.get("trace") and nsys:
            (run.path / "traces").mkdir(exist_ok=True)
            trace = (nsys, run.path / "traces" / cell.cell_id)
        rec, err, wall = run_cell_process(cell, out, fp, log, trace)
        base = {"run_id": run.run_id, "cell_id": cell.cell_id, "key": cell.key, "is_baseline": cell.is_baseline,
                "baseline_cell": cell.baseline_cell, **cell.params}
        if rec is None:
            rec = R.failed_record(base, err, wall)
        else:
            rec.update({k: base[k] for k in ("run_id", "cell_id", "key", "is_baseline", "baseline_cell")})
            rec["wall_s"] = wall
            if cell.params.get("trace"):
                add_trace(rec, run.path, trace)
            b = rec if cell.is_baseline else done.get(cell.baseline_cell)
            rec = judge(rec, str(fp), b, str(run.cell_paths(cell.baseline_cell)[1]) if b else None, th)
        out.unlink(missing_ok=True)
        run.append(rec)
        done[cell.cell_id] = rec
        if progress:
            progress("done", cell, rec)
    return [done[c.cell_id] for c in cells if c.cell_id in done]


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


# ---- one cell, in process (`ds4bench cell`) --------------------------------------------------
def run_cell(params: dict, out: str, fingerprints: str, baseline_fp: str | None = None) -> dict:
    """Measure one cell in this process: load, prime, warm up, time the repetitions, fingerprint.

    The prime pass (8 tokens of the first prompt, 2 generated) is never timed: it builds the
    mode's lazily expanded weights (and compiles kernels on a GPU). `warmup` full passes follow,
    then `reps` timed ones; with `stages`, one more pass gives per-stage times (CUDA events on a
    GPU, host time on the CPU: profiling.make_profiler("stages"))."""
    from .cli import load_model
    from .generate import Engine, generate
    from .profiling import make_profiler, stage_of
    from .prompts import load_prompts
    from .results import write_atomic
    from .tokenizer import Tokenizer
    p = params
    rec = R.CellRecord.from_dict({k: v for k, v in p.items() if k in R.FIELDS})
    sw, na = R.software()
    for k, v in sw.items():
        setattr(rec, k, v)
    na = dict(na)
    rec.utc_start = R.utc_now()
    rec.env = {**p["env"], **{k: v for k, v in os.environ.items() if k in ENGINE_ENV}}   # toggles in effect
    t0 = time.perf_counter()
    mf = load_model(p["model_file"], p["preset"], p["variant"], p["seed"])
    rec.load_s = time.perf_counter() - t0
    rec.variant = mf.cfg.variant
    if not p["model_file"]:
        na["model_file"] = f"synthetic preset {p['preset']} generated in memory (seed {p['seed']})"
    if not p["placement"]:
        na["placement"] = "numpy backend: no placement axis (weights live in host memory)"
    tok = Tokenizer.from_gguf_metadata(mf.metadata)
    prompts = [(q.id, tok.chat(q.text)) for q in load_prompts(p["prompt_set"])]
    longest = max(len(ids) for _, ids in prompts)
    rec.ctx = p["ctx"] or longest + p["n_gen"] + 1
    gpu = p["backend"] == "cupy"
    opts = {"placement": p["placement"]} if gpu and p["placement"] else {}
    eng = Engine(mf, cache=p["cache"], backend=p["backend"], batch=p["batch"], ctx=rec.ctx,
                 prefill_chunk=p["chunk"], **opts)
    rec.decode_path = eng.decode_path
    if p.get("nvtx") or p.get("trace"):
        from .profiling import NvtxRanges
        eng.net.prof = NvtxRanges()
    generate(eng, [(prompts[0][0], prompts[0][1][:8])], 2)
    for _ in range(p["warmup"]):
        generate(eng, prompts, p["n_gen"])
    if gpu:
        import cupy
        v = cupy.cuda.runtime.runtimeGetVersion()
        rec.cupy, rec.cuda_runtime = cupy.__version__, f"{v // 1000}.{v % 1000 // 10}"
    else:
        na["cupy"] = na["cuda_runtime"] = "numpy backend: CuPy is not used"
    probe = R.GpuProbe(_pci_bus_id()) if gpu else None
    start = probe.sample() if probe and probe.handle else None
    if probe:
        probe.start()
    with _capture(gpu and p.get("trace")):
        results = [generate(eng, prompts, p["n_gen"], tok.decode) for _ in range(p["reps"])]
    if probe:
        probe.stop()
    end = probe.sample() if probe and probe.handle else None
    g, gna = R.gpu_fields(probe, start, end, "" if gpu else "numpy backend: the cell does not use a GPU")
    for k, v in g.items():
        setattr(rec, k, v)
    na.update(gna)
    if probe:
        probe.close()

    for k, v in R.timing_fields([r.timing for r in results], rec.gpu_throttle).items():
        setattr(rec, k, v)
    for k in ("decode_tps", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "timing_spread", "timing_reliable"):
        na[k] = rec.timing_note
    if not p.get("trace"):
        for k in TRACE_FIELDS:
            na[k] = "not traced (--trace)"
    if p["stages"]:
        timer = make_profiler("stages", p["backend"])
        generate(Engine(mf, cache=p["cache"], backend=p["backend"], batch=p["batch"], ctx=rec.ctx,
                        prefill_chunk=p["chunk"], profiler=timer, ops=eng.ops), prompts, p["n_gen"])
        for name, s in timer.summary().items():
            rec.stage_s[stage_of(name)] = rec.stage_s.get(stage_of(name), 0.0) + s
    else:
        na["stage_s"] = "stage times not asked for (--stages)"

    kl_lp = _cell_kl(rec, na, eng, prompts, p["n_gen"], fingerprints, baseline_fp, results[0])
    _cell_probe(rec, na, mf, eng, p, prompts, Path(fingerprints).parent.parent / "probe-cache")

    rec.deterministic = all([f.tokens for f in r.fingerprints] == [f.tokens for f in results[0].fingerprints]
                            for r in results)
    for i, fp in enumerate(results[0].fingerprints):
        rec.prompts.append({"prompt_id": fp.prompt_id, "prompt_tokens": fp.prompt_tokens, "sha256": fp.sha256,
                            "text": fp.text, "tokens": fp.tokens,
                            "nonfinite": any(r.fingerprints[i].nonfinite for r in results),
                            "replica_mismatch": max(r.fingerprints[i].replica_mismatch for r in results)})
    V.save_fingerprints(fingerprints, results[0].fingerprints, results[0].first_logits, kl_lp)

    rec.host_rss_peak_bytes = R.host_rss_peak_bytes()
    rec.state_bytes, rec.weights_bytes = int(eng.state.nbytes()), int(mf.nbytes)
    mem = _device_memory(eng) if gpu else {}
    rec.device_peak_bytes, rec.managed_bytes = mem.get("device_peak_bytes"), mem.get("managed_bytes")
    for k in ("device_peak_bytes", "managed_bytes"):
        if getattr(rec, k) is None:
            na[k] = mem.get("why", "numpy backend: no device memory")
    steps = [s for r in results for s in r.timing.step_s]
    why_peak = na.get("gpu_mem_bw_gbs", "") if gpu else "numpy backend: no GPU bandwidth roofline"
    roof, rna = R.roofline_fields(mf.cfg, p["batch"], longest + p["n_gen"],
                                  sorted(steps)[len(steps) // 2] if steps else None, rec.gpu_mem_bw_gbs, why_peak)
    for k, v in roof.items():
        setattr(rec, k, v)
    na.update(rna)
    rec.unavailable = {k: v for k, v in na.items() if getattr(rec, k, None) in (None, [], {})}
    rec.utc_end = R.utc_now()
    d = rec.to_dict()
    write_atomic(Path(out), json.dumps(d))
    return d


def _cell_kl(rec, na: dict, eng, prompts, n_gen: int, fingerprints: str, baseline_fp: str | None, result):
    """The teacher-forced KL pass (kl.py): a baseline scores its own tokens and returns its
    log-softmax to keep in its fingerprints; another cell scores the baseline's tokens and
    fills the KL fields. Returns the log-softmax to store (baseline) or None."""
    import numpy as np
    from . import kl as KL
    t0 = time.perf_counter()
    if baseline_fp is None or Path(baseline_fp).resolve() == Path(fingerprints).resolve():
        own = {fp.prompt_id: {"tokens": np.asarray(fp.tokens)} for fp in result.fingerprints}
        lp = KL.teacher_forced(eng, prompts, n_gen, own)
        base = {pid: {"tokens": own[pid]["tokens"], "logprobs": lp[pid]} for pid in lp}
        keep = lp
    elif not Path(baseline_fp).is_file():
        for k in KL.FIELDS:
            na[k] = f"the baseline's fingerprints {baseline_fp} are missing (did the baseline fail?)"
        return None
    else:
        base, keep = V.load_fingerprints(baseline_fp), None
        if not all("logprobs" in base.get(pid, {}) for pid, _ in prompts):
            for k in KL.FIELDS:
                na[k] = "the baseline's fingerprints have no teacher-forcing log-softmax (an older run)"
            return None
        lp = KL.teacher_forced(eng, prompts, n_gen, base)
    for k, v in KL.cell_kl(lp, base).items():
        setattr(rec, k, v)
    rec.kl_s = time.perf_counter() - t0
    return keep


def _cell_probe(rec, na: dict, mf, eng, p: dict, prompts, cache_dir: Path) -> None:
    """The stage probe (probe.py) of the cell's ops (and the faults its engine carries, if any):
    per-stage statistics and the first stage over its limit."""
    from . import probe as PR
    opts = {"faults": eng.faults} if getattr(eng, "faults", None) else {}
    res = PR.probe_cell(mf, eng.ops, p, prompts, cache_dir, **opts)
    if not res:
        for k in ("probe_stages", "probe_s", "probe_mode", "probe_positions", "probe_cached"):
            na[k] = "probe off (DS4BENCH_PROBE_TOKENS=0)"
        return
    for k, v in res.items():
        setattr(rec, k, v)


@contextlib.contextmanager
def _capture(on: bool):
    """The Nsight Systems capture range (cudaProfilerStart/Stop) around the timed repetitions;
    the device is synchronized at both ends so the range holds exactly their GPU work."""
    if not on:
        yield
        return
    import cupy
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.profiler.start()
    try:
        yield
    finally:
        cupy.cuda.runtime.deviceSynchronize()
        cupy.cuda.profiler.stop()


def _pci_bus_id() -> str | None:
    try:
        import cupy
        return cupy.cuda.runtime.deviceGetPCIBusId(cupy.cuda.runtime.getDevice())
    except Exception:
        return None


def _device_memory(eng) -> dict:
    """Device bytes from the GPU ops' memory() report: CuPy's pool total (the pool keeps freed
    blocks, so it is the pool's high-water mark: device-placed weights, caches, run state) and
    the weights placed in managed memory (outside the pool)."""
    report = getattr(eng.ops, "memory", None)
    if report is None:
        return {"why": "the GPU ops have no memory() report"}
    m = dict(report())
    managed = m.get("weights_bytes", 0) if str(m.get("placement", "")).startswith("managed") else 0
    return {"device_peak_bytes": m.get("pool_total_bytes"), "managed_bytes": managed,
            "why": "the GPU ops' memory() report lacks it"}
