"""`ds4bench matrix | compare | show` (and the internal `cell`): the matrix front end.

    ds4bench matrix                         # benchmarks/matrices/default.toml (gpu.toml on a GPU)
    ds4bench matrix --cache q8,f16 --placement device,managed --batch 1,4,16 --preset tiny
    ds4bench matrix --spec gpu --exclude cache=q8,batch=16 --reps 3
    ds4bench matrix --resume RUN            # finish an interrupted run
    ds4bench matrix --preset flash-4l --cache q8,f16 --trace    # every cell under Nsight Systems
    ds4bench trace --preset flash-4l --cache q8 --batch 1       # one cell under Nsight Systems
    ds4bench show RUN [--format md|csv|json]
    ds4bench compare RUN_A RUN_B

Axes given on the command line replace those of the spec they start from (--spec, or the
default spec of the backend); scalar options replace the spec's values. Exit status: 0 when
every cell is identical, close or drift; 1 when any is broken or failed; 2 for a user error.
"""
from __future__ import annotations

import json
import signal
import sys
import time

from .harness import guards as G

from .harness.params import AXES, CELL_PARAMS, SCALARS, option_names

# the parameters' options (params.PARAMS): axes take comma lists, scalars one value
AXIS_OPTS = tuple(p.flag for p in AXES)
SCALAR_OPTS = tuple((p.flag, p.field) for p in SCALARS if p.flag)


def executor_args(p) -> None:
    """Where a matrix's cells run: matrix and faults take the same options."""
    p.add_argument("--executor", choices=("local", "pool", "slurm"),
                   help="where cells run: local (one at a time here, the default), pool (workers on this host, "
                        "one GPU each) or slurm (jobs with one GPU each); docs/executor.md")
    p.add_argument("--workers", type=int, default=0,
                   help="pool/slurm: jobs at once (default: one per GPU; 2 on the NumPy backend)")
    p.add_argument("--gpus", help="pool: GPU indices to hand out, e.g. 0,1,2,3 (default: every visible GPU)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: a submitit Slurm parameter, e.g. partition=gpu (repeatable)")


def register(sub) -> None:
    p = sub.add_parser("matrix", help="A/B matrix: speed and greedy-output verdicts per cell",
                       description="Run every combination of the axes, one process per cell, and judge "
                                   "each cell's greedy output against the baseline cell.")
    _run_args(p)
    p.add_argument("--trace", action="store_true",
                   help="run every cell under Nsight Systems and record GPU time per NVTX range")
    p.add_argument("--resume", metavar="RUN", help="finish an interrupted run (an id under --out or a path)")
    executor_args(p)
    p.set_defaults(func=cmd_matrix, trace_one=False)

    p = sub.add_parser("trace", help="one cell under Nsight Systems: GPU time per NVTX range and top kernels",
                       description="Run one cell (one value per axis) under nsys, capturing only its timed "
                                   "repetitions, and record the GPU time of each engine range. The "
                                   ".nsys-rep stays in the run directory's traces/.")
    _run_args(p, one_cell=True)
    p.set_defaults(func=cmd_matrix, trace=True, trace_one=True, resume=None, exclude=[], baseline=None, tol=None,
                   tie=None, executor=None, workers=0, gpus=None, slurm=[])

    p = sub.add_parser("show", help="print a stored matrix run")
    p.add_argument("run", help="run id under --out, or a run directory")
    p.add_argument("--out", default="results/runs", help="root of run directories (default results/runs)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compare", help="join two runs' cells: correctness changes, then speed over rounds")
    p.add_argument("run_a", help="the reference run: an id under --out or a run directory; RUN@LABEL takes that "
                                 "tree's cells of a --tree run")
    p.add_argument("run_b", help="the run judged against it (RUN@LABEL as for run_a)")
    p.add_argument("--out", default="results/runs", help="root of run directories (default results/runs)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--factor", type=float, default=1.02,
                   help="noise floor: a change needs the ratio's interval beyond it or its inverse (default 1.02)")
    p.add_argument("--across-gpus", action="store_true",
                   help="claim speed changes between cells measured on different GPU models")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    p.set_defaults(func=cmd_compare)

    # internal: one cell in this process; the runner launches it (not listed in --help)
    p = sub.add_parser("cell", description="Measure one matrix cell in this process and write its record and "
                                           "fingerprints: what `ds4bench matrix` runs, in a process of its own, "
                                           "for each cell. Its parameters are one entry of a run's run.json "
                                           "cells[].params.")
    p.add_argument("--params", required=True, help="the cell's parameters as JSON")
    p.add_argument("--out", required=True, help="where to write the record (JSON)")
    p.add_argument("--fingerprints", required=True, help="where to write the fingerprints (.npz)")
    p.set_defaults(func=cmd_cell)


def _spec_defaults() -> dict:
    """default.toml's values, for help texts (read, not validated)."""
    from .harness.matrix import MATRICES_DIR, tomllib
    try:
        return tomllib.loads((MATRICES_DIR / "default.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _run_args(p, one_cell: bool = False) -> None:
    """Options `matrix` and `trace` share (`trace` runs one cell: no excludes, baseline or limits)."""
    d = _spec_defaults()

    def dflt(key):
        return f" (default: the spec's; {d[key]} in default.toml)" if key in d else " (default: the spec's)"
    p.add_argument("--spec", help="matrix TOML: a name in benchmarks/matrices/ or a path (default: default, "
                                  "or gpu when the GPU backend is available)")
    g = p.add_argument_group("axes (comma lists; they replace the spec's)")
    for prm in AXES:
        g.add_argument(*option_names(prm), dest=prm.flag, metavar="MODES" if prm.flag == "cache" else
                       prm.flag.upper() + "S", help=prm.help)
    g.add_argument("--env", action="append", default=[], metavar="VAR=V1[,V2]",
                   help="an environment variable as an axis, e.g. DS4BENCH_FAULT=unset,q8-act-block "
                        "(unset: absent; repeatable; the baseline has it unset)")
    for prm in SCALARS:
        if prm.flag:
            p.add_argument(*option_names(prm), dest=prm.flag, type=prm.cast or prm.type, choices=prm.choices or None,
                           help=prm.help + ("" if "(default" in prm.help else dflt(prm.spec)))
    if not one_cell:
        p.add_argument("--tree", action="append", default=[], metavar="LABEL=SRC",
                       help="tree axis: run cells with the ds4bench of SRC (a directory or a commit), e.g. "
                            "--tree A=80a58af --tree B=. (repeatable)")
        p.add_argument("--tree-env", action="append", default=[], metavar="LABEL:K=V",
                       help="extra environment for one tree's cells, e.g. B:DS4BENCH_SLOWDOWN=moe:0.05 (repeatable)")
        p.add_argument("--exclude", action="append", default=[], metavar="K=V[,K=V]",
                       help="skip cells matching all pairs, e.g. cache=q8,batch=16 (repeatable)")
        p.add_argument("--baseline", metavar="K=V[,K=V]",
                       help="the reference cell (default cache=f32,placement=device,batch=1; on the CPU f32, batch 1)")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"),
                   help="auto, numpy or cupy (default auto: cupy when usable)")
    p.add_argument("--stages", action="store_true", help="one extra pass per cell with per-stage host times")
    if not one_cell:
        from .harness.verdict import DEFAULT
        p.add_argument("--tol", type=float, help="override the calibrated limit on a cell's median |Δlogprob| "
                                                 f"(default {DEFAULT.tol:g})")
        p.add_argument("--tie", type=float, help=f"override the calibrated near-tie margin in nats "
                                                 f"(default {DEFAULT.tie:g})")
    p.add_argument("--out", default="results/runs", help="root of run directories (default results/runs)")
    p.add_argument("--id", help="run id (default: UTC time, model, backend)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="table printed at the end "
                                                                                 "(default md)")


# ---- matrix ----------------------------------------------------------------------------------
def build_spec(a):
    from .harness import matrix as M
    from .cli import UserError
    requested = a.backend
    if a.spec:
        spec = M.load_spec(a.spec)
        requested = requested or spec.backend
    backend, why = M.resolve_backend(requested or "auto")
    if not a.spec:
        spec = M.load_spec("gpu" if backend == "cupy" else "default")
    doc = spec.to_dict()
    given = [_flag(o) for o in AXIS_OPTS + tuple(o for o, _ in SCALAR_OPTS) + ("exclude", "baseline", "stages", "trace",
                                                                            "tree", "env")
             if _given(getattr(a, o, None))]
    if given:
        doc["source"] = f"{spec.source} with {' '.join(given)}"
    for opt in AXIS_OPTS:
        val = getattr(a, opt)
        if val is None:
            continue
        items = [v.strip() for v in val.split(",") if v.strip()]
        if not items:
            raise UserError(f"--{opt} {val!r}: give a comma list of values")
        if opt == "batch":
            try:
                items = [int(v) for v in items]
            except ValueError:
                raise UserError(f"--batch {val!r}: batch sizes must be integers, e.g. 1,4,16") from None
        if opt == "nvtx":
            try:
                items = list(dict.fromkeys(M._flag(v) for v in items))
            except ValueError:
                raise UserError(f"--nvtx {val!r}: use off, on or off,on") from None
        doc[{"preset": "presets", "model": "models", "cache": "caches", "placement": "placements",
             "batch": "batches", "nvtx": "nvtx"}[opt]] = items
        if opt == "model" and a.preset is None:
            doc["presets"] = []
    for opt, fld in SCALAR_OPTS:
        if getattr(a, opt) is not None:
            doc[fld] = getattr(a, opt)
    for e in a.env:
        var, eq, vals = e.partition("=")
        items = [v.strip() for v in vals.split(",") if v.strip()]
        if not eq or not var.strip() or not items:
            raise UserError(f"--env {e!r}: expected VAR=value[,value], e.g. DS4BENCH_FAULT=unset,q8-act-block")
        doc["env_axis"] = {**doc["env_axis"], var.strip(): list(dict.fromkeys(items))}
    if a.exclude:
        doc["excludes"] = doc["excludes"] + [M.parse_pairs(e, "--exclude") for e in a.exclude]
    if a.baseline:
        doc["baseline"] = M.parse_pairs(a.baseline, "--baseline")
        if "batch" in doc["baseline"]:
            try:
                doc["baseline"]["batch"] = int(doc["baseline"]["batch"])
            except ValueError:
                raise UserError(f"--baseline {a.baseline!r}: batch must be an integer") from None
    if getattr(a, "tree", None):
        from .harness.trees import parse_trees
        doc["trees"] = parse_trees(a.tree)
    for te in getattr(a, "tree_env", []):
        label, colon, kv = te.partition(":")
        k, eq, v = kv.partition("=")
        if not colon or not eq or not k:
            raise UserError(f"--tree-env {te!r}: expected LABEL:KEY=VALUE, e.g. B:DS4BENCH_SLOWDOWN=moe:0.05")
        doc["tree_env"] = {**doc["tree_env"], label: {**doc["tree_env"].get(label, {}), k: v}}
    doc["stages"] = doc["stages"] or a.stages
    doc["trace"] = doc["trace"] or a.trace
    doc["backend"] = backend
    if a.trace_one:                     # `trace`: one cell (axes not given: the spec's first value)
        if backend != "cupy":
            raise UserError(f"trace needs the GPU backend: {why}")
        for opt, key in (("preset", "presets"), ("model", "models"), ("cache", "caches"),
                         ("placement", "placements"), ("batch", "batches"), ("nvtx", "nvtx")):
            if getattr(a, opt) is None and doc[key]:
                doc[key] = doc[key][:1]
        doc["baseline"] = {"cache": doc["caches"][0], "placement": doc["placements"][0],
                           "batch": doc["batches"][0], "nvtx": True}
    if doc["models"] and len(doc["presets"]) > 1:
        raise UserError("--model with --preset: give one preset, the one the files must match")
    spec = M.MatrixSpec.from_dict(doc)
    M.validate(spec)
    return spec, backend, why


def _flag(opt: str) -> str:
    return ("-" if len(opt) == 1 else "--") + opt


def cmd_matrix(a) -> int:
    from .harness import matrix as M
    from .harness import verdict as V
    from .cli import UserError
    from .harness.results import RunDir, gate, render
    nsys = None
    for k, v in (("executor", None), ("workers", 0), ("gpus", None), ("slurm", [])):
        if not hasattr(a, k):               # callers with their own parser (`faults`) run locally
            setattr(a, k, v)
    if a.executor or a.workers or a.gpus or a.slurm:
        from .harness.executor import ExecutorConfig, parse_gpus, parse_slurm
        ExecutorConfig(a.executor or "local", a.workers, parse_gpus(a.gpus), parse_slurm(a.slurm)).check_available()
    if a.resume:
        given = [_flag(o) for o in AXIS_OPTS + tuple(o for o, _ in SCALAR_OPTS)
                 + ("spec", "baseline", "backend", "tol", "tie", "id", "exclude", "stages", "tree", "tree_env", "env")
                 if _given(getattr(a, o, None))]
        if given:
            raise UserError(f"--resume reruns the run's own spec; drop {', '.join(given)}")
        run = RunDir.open(a.resume, a.out)
        meta = run.meta(for_resume=True)
        state, said = G.runner_state(meta)
        if state == "alive":
            raise UserError(f"run {run.run_id}: {said}; wait for it or stop it before resuming")
        if state in ("unknown", "gone"):
            print(f"note: {said.split('; if it is not')[0].split('; finish with')[0]}; resuming", file=sys.stderr)
        for p in G.remove_temporaries(run.path):
            print(f"note: removed {p.relative_to(run.path)}, left by an interrupted write", file=sys.stderr)
        run.write_meta({**meta, "status": "running", "runner": G.runner_identity()})
        cells = [M.Cell(**c) for c in meta["cells"]]
        th = V.Thresholds(**meta["thresholds"])
        if meta["backend"] == "cupy":
            M.resolve_backend("cupy")
        nsys = meta.get("nsys")
        G.check_host_memory(cells)
        M.prepare_models(cells, say=lambda s: print(s, file=sys.stderr))
        print(f"resuming {run.path}: {len(run.records())} of {len(cells)} cells recorded", file=sys.stderr)
    else:
        spec, backend, why = build_spec(a)
        cells, notes = M.expand(spec, backend, why)
        if spec.trees:
            from .harness.trees import with_trees
            cells = with_trees(cells, spec.trees, spec.tree_env, say=lambda s: print(s, file=sys.stderr))
        if a.trace_one:
            _check_one_cell(cells)
        th = V.Thresholds(**{**V.DEFAULT.to_dict(), **{k: v for k, v in (("tol", a.tol), ("tie", a.tie)) if v is not None}})
        label = "+".join(dict.fromkeys(c.group for c in cells))
        if any(c.params["trace"] for c in cells):
            from .harness.nsys import NsysError, find_nsys
            try:
                nsys = find_nsys()
            except NsysError as e:
                if a.trace_one:
                    raise UserError(str(e)) from None
                notes.append(f"{e}; the cells run without a trace")
            else:
                notes.append(f"traced with {nsys}")
        meta = {"spec": spec.to_dict(), "backend": backend, "backend_reason": why, "notes": notes,
                "thresholds": th.to_dict(), "label": label, "nsys": nsys}
        G.check_host_memory(cells)              # before any model file is written
        M.prepare_models(cells, say=lambda s: print(s, file=sys.stderr))
        meta["cells"] = [vars(c) for c in cells]
        from .harness.rounds import schedule
        meta["schedule"] = schedule(cells, spec.rounds, spec.order, spec.seed)
        run = RunDir.create(a.out, meta, a.id)
        print(f"matrix {spec.source}: {len(cells)} cells, backend {backend} ({why}); run {run.path}", file=sys.stderr)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        if a.id and run.run_id != a.id:
            print(f"note: run id {a.id} is taken (finish that one with --resume {a.id}); this run is {run.run_id}",
                  file=sys.stderr)
    execu = _executor(a, run)
    n_rounds = len(run.meta().get("schedule") or [None])
    progress = Progress(len(cells) * n_rounds, len(run.round_records()))
    old = signal.signal(signal.SIGTERM, G.raise_terminated)
    status = "interrupted"
    try:
        if execu.kind == "local":
            recs = M.run_matrix(cells, run, th, progress, nsys)
        else:
            from .harness.executor import run_matrix_jobs
            recs = run_matrix_jobs(cells, run, th, execu, progress, nsys, say=lambda s: print(s, file=sys.stderr))
        status = "complete"
    finally:
        signal.signal(signal.SIGTERM, old)
        progress.close()
        recs = run.finalize(status)
        if status != "complete":
            print(f"stopped: {len(recs)} of {len(cells)} cells are saved in {run.path}; "
                  f"finish with `ds4bench matrix --resume {run.run_id}`", file=sys.stderr)
    sys.stdout.write(render(recs, a.format))
    if a.format == "md":
        _print_traces(recs)
        _compare_trees(run, recs)
    print(f"run {run.path} (summary.md, cells.jsonl, cells.parquet)", file=sys.stderr)
    a.run_path = run.path                   # for callers that read the run afterwards (`faults`)
    return gate(recs)


def _executor(a, run):
    """The run's executor: the one given (kept in run.json), else the one it started with."""
    from .harness.executor import ExecutorConfig, parse_gpus, parse_slurm
    meta = run.meta()
    if a.executor is None and not (a.workers or a.gpus or a.slurm):
        return ExecutorConfig(**meta.get("executor", {}))
    cfg = ExecutorConfig(a.executor or meta.get("executor", {}).get("kind", "local"), a.workers,
                         parse_gpus(a.gpus), parse_slurm(a.slurm))
    if cfg.kind == "local" and (a.workers or a.gpus):
        raise ValueError("--workers and --gpus apply to --executor pool or slurm")
    run.write_meta({**meta, "executor": cfg.to_dict()})
    return cfg


def _compare_trees(run, recs) -> None:
    """A --tree run: each later tree's cells against the first tree's (the same call's A/B), printed
    and kept as compare-<A>-<B>.md in the run directory."""
    from .harness.results import compare, render_compare, write_atomic
    trees = list(dict.fromkeys(r["tree"] for r in recs if r.get("tree")))
    for b in trees[1:]:
        res = compare([r for r in recs if r.get("tree") == trees[0]], [r for r in recs if r.get("tree") == b])
        text = render_compare(res, "md", f"{run.run_id}@{trees[0]}", f"{run.run_id}@{b}")
        write_atomic(run.path / f"compare-{trees[0]}-{b}.md", text)
        sys.stdout.write("\n" + text)


def _check_one_cell(cells) -> None:
    """`trace` runs exactly one cell (build_spec made it its own baseline)."""
    from .cli import UserError
    if len(cells) != 1:
        raise UserError(f"trace runs one cell; these options give {len(cells)} "
                        f"({', '.join(c.cell_id for c in cells[:4])}{', ...' if len(cells) > 4 else ''}): "
                        f"give one value per axis, or use `ds4bench matrix --trace`")


def _given(v) -> bool:
    """An option the user gave (0 counts: `--reps 0` is given; an unset flag or list is not)."""
    return v is not None and v is not False and v != []


class Progress:
    """A tqdm bar (cells done, ETA, current cell) on a terminal; one plain line per cell otherwise."""

    def __init__(self, total: int, done: int, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.t0, self.ran = total, done, time.perf_counter(), 0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="cell", file=self.stream, dynamic_ncols=True)

    def __call__(self, event: str, cell, rec) -> None:
        if event == "start":
            if self.bar is not None:
                self.bar.set_description(cell.key)
            return
        self.done += 1
        self.ran += 1
        from .harness.results import row_view
        v = row_view(rec)
        said = f"round {rec['round'] + 1} measured" if "round" in rec else v["verdict"]     # a round before the last
        line = (f"{cell.key}: {said}" + (f", decode {v['decode_tps']:.1f} tok/s" if v["decode_tps"] else "")
                + (f" — {rec.get('error')}" if rec.get("status") == "failed" else ""))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            per = (time.perf_counter() - self.t0) / self.ran
            eta = per * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {line} ({rec.get('wall_s') or 0:.1f} s; ETA {eta:.0f} s)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- show, compare, cell ---------------------------------------------------------------------
def cmd_show(a) -> int:
    from .harness.results import RunDir, gate, reasons_md, render
    run = RunDir.open(a.run, a.out)
    recs = run.records()
    meta = run.meta()
    state, said = G.runner_state(meta)
    if a.format == "md":
        print(f"run {run.run_id}: {meta.get('status')}, {len(recs)} of {len(meta.get('cells', []))} cells; "
              f"backend {meta.get('backend')} ({meta.get('backend_reason')})")
        if said:
            print(f"note: {said}")
        for n in meta.get("notes", []):
            print(f"note: {n}")
        print()
    if said and a.format != "md":
        print(f"ds4bench: note: run {run.run_id}: {said}", file=sys.stderr)
    sys.stdout.write(render(recs, a.format))
    if a.format == "md":
        why = reasons_md(recs)
        if why:
            sys.stdout.write("\n" + why)
        _print_traces(recs)
    return gate(recs)


def _print_traces(recs) -> None:
    """The per-range GPU time of traced cells, after the table (markdown output only)."""
    from .harness.results import trace_md
    if any(r.get("trace") for r in recs):
        sys.stdout.write("\nGPU time per range (Nsight Systems):\n\n" + trace_md(recs))


def cmd_compare(a) -> int:
    from .harness.results import compare, render_compare
    from .cli import UserError
    sides = [tree_records(name, a.out) for name in (a.run_a, a.run_b)]
    for run, meta, _, recs in sides:
        if not recs:
            raise UserError(f"run {run.run_id} ({run.path}) has no recorded cell (status {meta.get('status')}); "
                            f"nothing to compare")
    for run, meta, _, _ in sides:
        said = G.runner_state(meta)[1]
        if said:
            print(f"note: run {run.run_id}: {said}", file=sys.stderr)
    (_, _, name_a, recs_a), (_, _, name_b, recs_b) = sides
    res = compare(recs_a, recs_b, a.alpha, a.factor, a.across_gpus)
    sys.stdout.write(render_compare(res, a.format, name_a, name_b))
    return res["status"]


def tree_records(name: str, out: str) -> tuple:
    """(RunDir, run.json, name, records) of a run, or of one tree's cells with RUN@LABEL."""
    from .harness.results import RunDir
    run, at, label = name.rpartition("@") if "@" in name else (name, "", "")
    r = RunDir.open(run, out)
    meta, recs = r.meta(), r.records()
    if not at or not recs:
        return r, meta, r.run_id, recs
    trees = sorted({x.get("tree") for x in recs if x.get("tree")})
    picked = [x for x in recs if x.get("tree") == label]
    if not picked:
        raise ValueError(f"{name}: run {r.run_id} has no cells of tree {label!r} (trees: {', '.join(trees) or 'none'})")
    return r, meta, f"{r.run_id}@{label}", picked


def cmd_cell(a) -> int:
    from .harness.cell import run_cell
    try:
        params = json.loads(a.params)
    except json.JSONDecodeError as e:
        raise ValueError(f"--params is not JSON: {e}") from None
    need = CELL_PARAMS
    if not isinstance(params, dict) or not need <= set(params):
        missing = sorted(need - set(params)) if isinstance(params, dict) else ["(not an object)"]
        raise ValueError(f"--params lacks {', '.join(missing)}: it takes the JSON object `ds4bench matrix` "
                         f"gives each cell (see a run's run.json, cells[].params)")
    run_cell(params, a.out, a.fingerprints)
    return 0
