"""CI proof of the asv workflow on the CPU: `asv check`, a real `asv run` over two commits of a
temporary clone (existing environment, NumPy backend, a reduced benchmark set), `asv compare`
and `asv publish` on those results, then `ds4bench plot --asv`, drawn from both commits."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds4bench.views import asvdata, plots

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed (pip install asv)")


def _sh(*cmd, cwd, env=None, timeout=300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_asv_check():
    out = _sh("asv", "check", "-E", f"existing:{sys.executable}", cwd=REPO)
    assert "No problems found" in out


def test_every_benchmark_declares_its_version():
    """Without an explicit version asv keys results on a hash of the suite's code, and an edit
    that measures the same thing would start a new, unjoined history."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import bench_decode
    finally:
        sys.path.remove(str(REPO))
    classes = [c for c in vars(bench_decode).values()
               if isinstance(c, type) and issubclass(c, bench_decode._Cells) and not c.__name__.startswith("_")]
    assert {c.__name__ for c in classes} >= {"Prefill", "DecodeStep", "Generation", "HostMemory", "DeviceMemory"}
    assert all(isinstance(c.version, str) and len(c.version) < 8 for c in classes)


def test_a_bad_suite_variable_is_named(monkeypatch):
    """The suite reads its grid from DS4BENCH_ASV_* at import; a bad value names itself."""
    monkeypatch.setenv("DS4BENCH_ASV_BATCHES", "1,x")
    code = "import benchmarks.bench_decode"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == \
        "ValueError: DS4BENCH_ASV_BATCHES='1,x': expected comma-separated integers"


def test_asv_run_two_commits_then_plot(tmp_path):
    clone = tmp_path / "clone"
    _sh("git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone), cwd=tmp_path)
    # this working tree as the clone's first commit (the suite may not be committed yet), and an
    # empty commit on top: two commits to benchmark
    files = _sh("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=REPO).split("\0")
    for f in filter(None, files):
        src, dst = REPO / f, clone / f
        if src.is_file() and not f.startswith("results/"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    git = ("git", "-c", "user.name=ci", "-c", "user.email=ci@localhost")
    _sh(*git, "add", "-A", cwd=clone)
    _sh(*git, "commit", "-q", "--allow-empty", "-m", "the working tree", cwd=clone)
    _sh(*git, "commit", "-q", "--allow-empty", "-m", "an empty commit", cwd=clone)
    commits = _sh("git", "rev-list", "--reverse", "-n", "2", "HEAD", cwd=clone).split()
    shutil.rmtree(clone / "results" / "asv", ignore_errors=True)

    env = dict(os.environ, PYTHONPATH=str(clone), DS4BENCH_ASV_CACHES="f32,q8", DS4BENCH_ASV_BATCHES="1",
               DS4BENCH_ASV_N="6", DS4BENCH_MODEL_CACHE=str(tmp_path / "models"),
               DS4BENCH_ASV_LOG=str(tmp_path / "cells.log"))
    env.pop("DS4BENCH_ASV_FULL", None)
    _sh("asv", "machine", "--yes", "--machine", "ci-cpu", cwd=clone, env=env)
    for c in commits:
        _sh("git", "checkout", "-q", c, cwd=clone)
        _sh("asv", "run", "-E", f"existing:{sys.executable}", "--set-commit-hash", c, "--machine", "ci-cpu",
            "--quick", "--show-stderr", "--bench", r"Generation\.track_(decode_tokens_per_s|first_divergence)",
            cwd=clone, env=env)
    log = (tmp_path / "cells.log").read_text()              # every measured cell, once per commit
    for cell in ("tiny:f32:cpu:1", "tiny:q8:cpu:1"):
        assert log.count(f"setup_cache {cell}: ") == 2 and " tok/s (" in log
    results = clone / "results" / "asv" / "results"
    drawn = asvdata.load(str(results))
    assert [c.commit for c in drawn] == commits or {c.commit for c in drawn} == set(commits)
    for c in drawn:
        tps = c.values[plots.BENCH + "track_decode_tokens_per_s"]
        assert set(tps) == {("tiny", "f32", "cpu", 1), ("tiny", "q8", "cpu", 1)} and all(v > 0 for v in tps.values())
        div = c.values[plots.BENCH + "track_first_divergence"]
        assert div[("tiny", "f32", "cpu", 1)] == 6                 # the baseline never departs from itself

    cmp = _sh("asv", "compare", commits[0], commits[1], "--machine", "ci-cpu", cwd=clone, env=env)
    assert "track_decode_tokens_per_s" in cmp and "tiny" in cmp
    _sh("asv", "publish", cwd=clone, env=env)
    assert (clone / "results" / "asv" / "html" / "index.html").is_file()

    out = tmp_path / "plots"
    r = subprocess.run([sys.executable, "-m", "ds4bench", "plot", "--asv", str(results), "--out", str(out)],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "asv-history.png").stat().st_size > 10_000
    assert "2 commits" in r.stdout and all(c[:8] in r.stdout for c in commits)
    _, got = plots.history(str(results), out / "again.png")
    assert sorted(got) == sorted(commits)
