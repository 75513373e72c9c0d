"""The distributed executor (ds4bench/harness/executor.py) on this host: submitit's local executor with
two workers, the NumPy engine on tiny. Same records as the local runner; a killed worker's cell
is run again; a killed runner's run finishes with --resume and loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from ds4bench.harness import executor as EX  # noqa: E402
from ds4bench.harness.matrix import MatrixSpec, expand  # noqa: E402
from ds4bench.harness.trees import with_trees  # noqa: E402

FAST = ["-n", "3", "--reps", "1"]


def _matrix(out: Path, run_id: str, *extra, wait=True):
    cmd = [sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--out", str(out), "--id", run_id,
           "--format", "json", *FAST, *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _cells(run: Path) -> dict:
    recs = {}
    for line in (run / "cells.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["cell_id"]] = r
    return recs


def _tokens(r: dict) -> list:
    return [p["tokens"] for p in r["prompts"]]


def _workers(run: Path) -> list[int]:
    """Pids of the submitit task processes working for this run."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(ln.split()[0]) for ln in out.splitlines()
            if "submitit.core._submit" in ln and str(run / "jobs") in ln]


def _wait(pred, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_the_default_matrix_through_the_pool_gives_the_local_runners_records(tmp_path):
    local = _matrix(tmp_path, "local")
    pool = _matrix(tmp_path, "pool", "--executor", "pool", "--workers", "2")
    assert local.returncode == pool.returncode == 0, pool.stderr[-2000:]
    a, b = _cells(tmp_path / "local"), _cells(tmp_path / "pool")
    assert sorted(a) == sorted(b) and len(a) == 6                         # default.toml: 3 modes x 2 batches
    for cid in a:
        assert _tokens(a[cid]) == _tokens(b[cid]), cid
        assert (a[cid]["verdict"], a[cid]["status"]) == (b[cid]["verdict"], b[cid]["status"]), cid
        assert b[cid]["executor_job"] and b[cid]["executor_host"]
    meta = json.loads((tmp_path / "pool" / "run.json").read_text())
    assert meta["executor"]["kind"] == "pool" and meta["status"] == "complete"
    jobs = json.loads((tmp_path / "pool" / "jobs.json").read_text())
    assert len(jobs) == 6 and all(j["ended"] for j in jobs)
    assert jobs[0]["unit"] == "tiny-f32-b1"                                # the baseline's job goes first


def test_a_killed_worker_is_run_again_and_the_run_completes(tmp_path):
    run = tmp_path / "kw"
    proc = _matrix(tmp_path, "kw", "--cache", "q8,f32", "--batch", "1", "--executor", "pool", "--workers", "2",
                   wait=False)
    victim = _wait(lambda: _workers(run))[0]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "was lost (" in err and "submitted again" in err
    recs = _cells(run)
    assert sorted(recs) == ["tiny-f32-b1", "tiny-q8-b1"] and all(r["status"] == "ok" for r in recs.values())
    assert not _workers(run)


def test_a_killed_runner_resumes_without_losing_a_record(tmp_path):
    run = tmp_path / "kd"
    proc = _matrix(tmp_path, "kd", "--cache", "q8,f16,f32", "--batch", "1", "--executor", "pool", "--workers", "2",
                   wait=False)
    _wait(lambda: (run / "cells.jsonl").is_file() and _workers(run))     # the baseline is in, workers run
    before = _cells(run)
    os.kill(proc.pid, signal.SIGKILL)                                    # the runner only: its workers live on
    proc.communicate()
    r = subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--out", str(tmp_path), "--resume", "kd",
                        "--format", "json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _cells(run)
    assert sorted(after) == ["tiny-f16-b1", "tiny-f32-b1", "tiny-q8-b1"]
    for cid, rec in before.items():                                      # kept as they were
        assert after[cid]["utc_start"] == rec["utc_start"]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert not _workers(run)


def test_units_keep_a_cells_trees_together_and_baselines_first():
    cells, _ = expand(MatrixSpec(caches=["q8", "f32"], batches=[1, 2]), "numpy")
    both = with_trees(cells, {"A": ".", "B": "."}, say=lambda *a: None)
    todo = [(k, s, c.cell_id) for k in range(2) for s, c in enumerate(both)]
    us = EX.units(both, todo)
    assert [u["key"] for u in us][0] == "tiny-f32-b1" and us[0]["baseline"] and not any(u["baseline"] for u in us[1:])
    assert all({cid[:2] for _, _, cid in u["rounds"]} == {"A-", "B-"} for u in us)   # both trees in one job
    assert all(len(u["rounds"]) == 4 for u in us)                                     # 2 trees x 2 rounds


@pytest.mark.parametrize("fields,msg", [
    ({"kind": "ray"}, "unknown executor 'ray'; choose one of local, pool, slurm"),
    ({"kind": "pool", "workers": -1}, "--workers must be positive"),
    ({"kind": "pool", "slurm": {"partition": "gpu"}}, "--slurm parameters apply to --executor slurm")])
def test_executor_settings_are_checked(fields, msg):
    with pytest.raises(ValueError, match=msg):
        EX.ExecutorConfig(**fields)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        EX.parse_slurm(["partition"])
    assert EX.parse_slurm(["partition=gpu", "cpus_per_task=8"]) == {"partition": "gpu", "cpus_per_task": 8}


def test_a_gpu_index_given_twice_is_a_shared_slot():
    assert EX.ExecutorConfig("pool", gpus=EX.parse_gpus("0,1")).shared == 1
    assert EX.ExecutorConfig("pool", gpus=EX.parse_gpus("0,0,0,1")).shared == 3
    assert EX.ExecutorConfig("pool").shared == 1


def test_slurm_without_slurm_is_one_line(tmp_path):
    r = _matrix(tmp_path, "s", "--cache", "f32", "--batch", "1", "--executor", "slurm")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "ds4bench: error: --executor slurm: sbatch is not on PATH (no Slurm here; --executor pool runs on this host)")
