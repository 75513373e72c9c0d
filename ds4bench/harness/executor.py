"""Matrices that outgrow one GPU: a run's cells as jobs on a scheduler, through submitit.

    --executor local    the runner measures every round itself, one process at a time
                        (matrix.run_matrix; the default)
    --executor pool     this host: up to --workers jobs at once, each holding one GPU of --gpus
                        (CUDA_VISIBLE_DEVICES; all visible GPUs by default) or, on the NumPy
                        backend, one worker process; submitit's local executor. An index
                        given more than once (--gpus 0,0,0,0) is a slot: that many jobs share
                        the GPU, for runs that judge correctness only (the fault suite);
                        their records say so (gpu_shared) and `compare` claims no speed
                        change for them
    --executor slurm    a Slurm cluster: one job per unit with one GPU (--gpus-per-node 1), at
                        most --workers queued or running at once (the runner holds back the
                        rest, so baselines and resubmissions go first); --slurm KEY=VALUE passes
                        submitit's Slurm parameters (partition=..., account=..., qos=...). The
                        run directory must be on a filesystem the nodes share.

Why submitit: it submits Python functions to Slurm as jobs (or job arrays), keeps each job's
pickled inputs, outputs and logs in a folder (here the run's `jobs/`), and runs the same jobs as
local subprocesses without a cluster, so CI tests the path a cluster takes. Slurm
enforces a job's GPU (cgroups), which a timing needs; Ray's GPUs are logical (not enforced) and
its wheel is large.

A job is a unit: one cell's rounds, or with a tree axis one cell's rounds on every tree (the
A/B block that `compare` turns into ratios: on one GPU, in the run's ABBA or random schedule),
since a ratio taken across two GPUs carries their difference. Inside a job each round is still
its own `ds4bench cell` process with its environment and timeout (matrix.measure_round), so a
crashed or hung cell is a failed record and the unit goes on. The units holding a group's
baseline run first and are waited for: every other cell's round 1 reads the baseline's
fingerprints for its KL pass and is judged against it. A unit's records come back to the runner
when its job ends and are appended to the same run directory as the local runner's
(matrix.Collector), so verdicts, resume and reports are the same.

A worker lost (killed, its node gone, a job timeout) is submitted once more; lost twice, its
cells that have no record are recorded as failed. Jobs are listed in the run's jobs.json; a
`--resume` after the runner was killed first stops the jobs it left running (a local worker's
process group, or `scancel` for Slurm), then submits what has no record.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

EXECUTORS = ("local", "pool", "slurm")
POLL_S = 0.5
RESUBMITS = 1                       # a lost worker's unit is submitted once more


@dataclass
class ExecutorConfig:
    kind: str = "local"
    workers: int = 0                # concurrent jobs (0: one per GPU, or 2 on the NumPy backend)
    gpus: list = field(default_factory=list)      # pool: GPU indices to hand out (empty: all visible)
    slurm: dict = field(default_factory=dict)     # submitit Slurm parameters

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be positive, got {self.workers}")
        if self.slurm and self.kind != "slurm":
            raise ValueError(f"--slurm parameters apply to --executor slurm, not {self.kind}")

    def check_available(self) -> None:
        """Refuse (one line) an executor this machine cannot run, before a run is created."""
        if self.kind == "local":
            return
        import importlib.util
        import shutil
        if importlib.util.find_spec("submitit") is None:
            raise ImportError(f"--executor {self.kind} needs submitit (pip install submitit)")
        if self.kind == "slurm" and not shutil.which("sbatch"):
            raise ValueError("--executor slurm: sbatch is not on PATH (no Slurm here; --executor pool runs on this host)")

    @property
    def shared(self) -> int:
        """The most jobs one GPU holds at once (1: every GPU exclusive)."""
        return max((self.gpus.count(g) for g in self.gpus), default=1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "workers": self.workers, "gpus": list(self.gpus), "slurm": dict(self.slurm)}


def parse_slurm(items: list[str]) -> dict:
    """['partition=gpu', 'account=x'] -> submitit Slurm parameters (numbers as ints)."""
    out = {}
    for it in items or []:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--slurm {it!r}: expected KEY=VALUE (e.g. partition=gpu)")
        out[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    return out


def parse_gpus(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text!r}: expected comma-separated GPU indices (e.g. 0,1,2,3)") from None


def visible_gpus() -> list[int]:
    """Indices of the GPUs NVML sees (none without a driver)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return list(range(pynvml.nvmlDeviceGetCount()))
    except Exception:
        return []


# ---- units ---------------------------------------------------------------------------------
def unit_key(cell) -> str:
    """Cells that share a job: one cell's trees (cell id without its tree label), else the cell."""
    tree = cell.params.get("tree")
    return cell.cell_id[len(tree) + 1:] if tree and cell.cell_id.startswith(f"{tree}-") else cell.cell_id


def units(cells, todo: list[tuple[int, int, str]]) -> list[dict]:
    """The jobs of a run: {key, baseline, rounds [(round, slot, cell id)]} in the order of the
    rounds still to run (`todo`, schedule order), baseline units first."""
    by_id = {c.cell_id: c for c in cells}
    out: dict[str, dict] = {}
    for k, slot, cid in todo:
        key = unit_key(by_id[cid])
        u = out.setdefault(key, {"key": key, "baseline": False, "rounds": []})
        u["rounds"].append((k, slot, cid))
        u["baseline"] |= by_id[cid].is_baseline
    return sorted(out.values(), key=lambda u: not u["baseline"])


def run_unit(run_path: str, cells: list, rounds: list, n_rounds: int, nsys: str | None = None,
             shared: int = 1) -> list:
    """A job: the unit's rounds in order (matrix.measure_round); [(cell id, record, ok)]. A
    failed round skips the cell's later rounds in this unit, as the local runner does. `shared`:
    how many jobs hold this job's GPU at once (recorded as gpu_shared when more than one)."""
    import socket
    import submitit
    from .matrix import measure_round
    from .results import RunDir
    from .matrix import _die_with_parent
    _die_with_parent()              # a local worker whose controller is stopped stops too
    run = RunDir(run_path)
    by_id = {c.cell_id: c for c in cells}
    failed, out = set(), []
    for k, slot, cid in rounds:
        if cid in failed:
            continue
        rec, ok = measure_round(run, by_id[cid], k, slot, n_rounds, nsys)
        rec["executor_host"] = socket.gethostname()
        if shared > 1:
            rec["gpu_shared"] = shared
        try:
            rec["executor_job"] = str(submitit.JobEnvironment().job_id)
        except RuntimeError:            # called outside a submitit job (tests)
            rec["executor_job"] = str(os.getpid())
        for k in ("executor_host", "executor_job") + (("gpu_shared",) if shared > 1 else ()):
            rec.get("unavailable", {}).pop(k, None)
        if not ok:
            failed.add(cid)
        out.append((cid, rec, ok))
    return out


# ---- the runner's side -----------------------------------------------------------------------
def _timeout_min(unit: dict, by_id: dict) -> int:
    return max(1, math.ceil((sum(by_id[c].params["timeout_s"] for _, _, c in unit["rounds"]) + 120) / 60))


def make_executor(cfg: ExecutorConfig, folder: Path):
    """A submitit executor for `cfg` writing its job files under `folder`."""
    cfg.check_available()
    import submitit
    if cfg.kind == "pool":
        return submitit.LocalExecutor(folder=str(folder))
    ex = submitit.SlurmExecutor(folder=str(folder))
    ex.update_parameters(gpus_per_node=1, ntasks_per_node=1, **cfg.slurm)
    return ex


class Jobs:
    """jobs.json of a run: the jobs submitted (kind, id, unit key, attempt) and which ended."""

    def __init__(self, run_path: Path):
        self.path = Path(run_path) / "jobs.json"
        self.items = json.loads(self.path.read_text()) if self.path.is_file() else []

    def add(self, kind: str, job_id: str, key: str, attempt: int) -> None:
        self.items.append({"kind": kind, "job_id": str(job_id), "unit": key, "attempt": attempt, "ended": False})
        self._save()

    def ended(self, job_id: str) -> None:
        for it in self.items:
            if it["job_id"] == str(job_id):
                it["ended"] = True
        self._save()

    def _save(self) -> None:
        from .results import write_atomic
        write_atomic(self.path, json.dumps(self.items, indent=1) + "\n")

    def stop_leftovers(self) -> list[str]:
        """Stop the jobs a killed runner left running; their ids."""
        stopped = []
        for it in self.items:
            if it["ended"]:
                continue
            if it["kind"] == "pool":
                try:                        # the controller; its worker and cell die with it (PDEATHSIG)
                    os.kill(int(it["job_id"]), signal.SIGKILL)
                    stopped.append(it["job_id"])
                except (ProcessLookupError, PermissionError, ValueError):
                    pass
            elif it["kind"] == "slurm":
                subprocess.run(["scancel", it["job_id"]], capture_output=True)
                stopped.append(it["job_id"])
            it["ended"] = True
        self._save()
        return stopped


def run_matrix_jobs(cells, run, th, cfg: ExecutorConfig, progress=None, nsys: str | None = None,
                    say=print) -> list[dict]:
    """matrix.run_matrix through an executor (see the module docstring); every record of the run."""
    from .matrix import Collector
    col = Collector(cells, run, th)
    by_id = col.by_id
    jobs = Jobs(run.path)
    for j in jobs.stop_leftovers():
        say(f"stopped job {j}, left running by an earlier runner")
    gpu = any(c.params.get("backend") == "cupy" for c in cells)
    gpus = list(cfg.gpus) or (visible_gpus() if gpu else [])
    if cfg.kind == "pool" and gpu and not gpus:
        raise ValueError("--executor pool: no GPU is visible to hand out (give --gpus)")
    workers = cfg.workers or (len(gpus) if gpus else 2)
    if cfg.kind == "pool" and gpus:
        workers = min(workers, len(gpus))          # one slot per job; a GPU listed once is exclusive
    shared = cfg.shared if cfg.kind == "pool" and gpu else 1
    if shared > 1:
        say(f"note: up to {shared} jobs share a GPU (--gpus {','.join(map(str, gpus))}): verdicts as usual, "
            f"speeds not comparable (compare claims no speed change for these cells)")
    ex = make_executor(cfg, run.path / "jobs")
    todo = units(cells, col.todo())
    base, rest = [u for u in todo if u["baseline"]], [u for u in todo if not u["baseline"]]
    free = list(gpus)
    running: dict = {}                             # job -> (unit, attempt, gpu)

    # pool workers on the NumPy backend share this host's cores: each gets its share of BLAS
    # threads, so concurrent cells do not oversubscribe them
    threads = max(1, (os.cpu_count() or 1) // workers)
    setup = [f"export {v}={threads}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")]

    def submit(u: dict, attempt: int) -> None:
        params = {"timeout_min": _timeout_min(u, by_id)}
        g = None
        if cfg.kind == "pool":
            if gpus:
                g = free.pop(0)
                params.update(gpus_per_node=1, visible_gpus=[g])
            else:
                params.update(gpus_per_node=0, setup=setup)
        ex.update_parameters(**params)
        job = ex.submit(run_unit, str(run.path), [by_id[c] for c in dict.fromkeys(c for _, _, c in u["rounds"])],
                        u["rounds"], col.n_rounds, nsys, shared)
        jobs.add(cfg.kind, job.job_id, u["key"], attempt)
        running[job] = (u, attempt, g)
        if progress:
            for _, _, cid in u["rounds"]:
                progress("start", by_id[cid], None)

    def collect(job) -> None:
        u, attempt, g = running.pop(job)
        if g is not None:
            free.append(g)
        jobs.ended(job.job_id)
        try:
            results = job.result()
        except Exception as e:                     # the worker was lost: killed, timed out, node gone
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            why = f"{type(e).__name__}: {first}" if first else type(e).__name__
            left = [r for r in u["rounds"] if col.pending(r[2], r[0])]
            if attempt < RESUBMITS and left:
                say(f"note: job {job.job_id} ({u['key']}) was lost ({why}); submitted again")
                pending.insert(0, ({**u, "rounds": left}, attempt + 1))
                return
            from . import record
            for cid in dict.fromkeys(c for _, _, c in left):
                cell = by_id[cid]
                base_fields = {"run_id": run.run_id, "cell_id": cid, "key": cell.key, "is_baseline": cell.is_baseline,
                               "baseline_cell": cell.baseline_cell, **cell.params}
                col.accept(cell, record.failed_record(base_fields, f"worker lost twice (job {job.job_id}): {why}", 0.0),
                           False)
                if progress:
                    progress("done", cell, col.done.get(cid))
            return
        for cid, rec, ok in results:
            col.accept(by_id[cid], rec, ok)
            if progress:
                progress("done", by_id[cid], col.done.get(cid, rec))

    try:
        for phase in (base, rest):
            pending = [(u, 0) for u in phase]
            while pending or running:
                while pending and len(running) < workers and (not gpus or cfg.kind != "pool" or free):
                    u, attempt = pending.pop(0)
                    submit(u, attempt)
                time.sleep(POLL_S)
                for job in [j for j in running if j.done()]:
                    collect(job)
            col.flush()
    finally:                                       # interrupted (SIGINT, SIGTERM, an error): stop our jobs
        for job in list(running):
            try:
                job.cancel(check=False)
            except Exception:
                pass
            jobs.ended(job.job_id)
    return col.records()
