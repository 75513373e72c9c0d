"""The matrix runner: specs, expansion, isolation of failing cells, kill + resume, and the
catching test (a deliberately broken mode must come out `broken`, and only it)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds4bench.harness import cell as C
from ds4bench.harness import matrix as M
from ds4bench.cli import main
from ds4bench.harness.record import NOT_MEASURED
from ds4bench.harness.results import RunDir

REPO = Path(__file__).resolve().parent.parent
# Two short chat prompts keep a cell at about a second of engine time on two cores.
PROMPTS = '''
[[prompt]]
id = "hello"
kind = "smoke"
text = "Hello there."

[[prompt]]
id = "sky"
kind = "smoke"
text = "Why is the sky blue?"
'''


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.toml"
    p.write_text(PROMPTS)
    return str(p)


def ds4bench(*args, env=None, **kw):
    """`python -m ds4bench ARGS` from the repository root, with the test plugins importable."""
    e = dict(os.environ, PYTHONPATH=str(REPO), DS4BENCH_PLUGINS="tests.broken_mode", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ds4bench", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, **kw)


def records(out):
    (run,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return RunDir(run), {r["cell_id"]: r for r in RunDir(run).records()}


# ---- spec and expansion (no cells run) ---------------------------------------------------------
def test_default_spec_expands_to_six_cpu_cells_with_the_baseline_first():
    spec = M.load_spec("default")
    cells, notes = M.expand(spec, "numpy", "CuPy is not installed")
    assert [c.cell_id for c in cells] == ["tiny-f32-b1", "tiny-q8-b1", "tiny-q8-b4", "tiny-f16-b1",
                                          "tiny-f16-b4", "tiny-f32-b4"]
    assert cells[0].is_baseline and all(c.baseline_cell == "tiny-f32-b1" for c in cells)
    assert cells[1].key == "cache=q8 batch=1" and cells[1].params["placement"] is None
    assert any("placement axis skipped" in n and "CuPy is not installed" in n for n in notes)
    env = M.cell_env(cells[1])
    assert env["DS4BENCH_CACHE"] == "q8" and "DS4BENCH_PLACEMENT" not in env


def test_gpu_spec_expands_cache_placement_batch():
    spec = M.load_spec("gpu")
    cells, notes = M.expand(spec, "cupy")
    assert len(cells) == 3 * 4 * 2 and not notes
    assert cells[0].cell_id == "flash-4l-f32-device-b1" and cells[0].is_baseline
    assert M.cell_env(cells[5])["DS4BENCH_PLACEMENT"] == cells[5].params["placement"]
    assert {c.params["placement"] for c in cells} == set(M.PLACEMENTS)


@pytest.mark.parametrize("name", sorted(p.stem for p in M.MATRICES_DIR.glob("*.toml")))
def test_every_shipped_spec_loads_and_expands(name):
    """A spec in benchmarks/matrices/ that a script or the docs name must not fail at its first
    GPU call: each one parses, validates and expands to cells with one baseline a group."""
    spec = M.load_spec(name)
    backend = "external" if spec.engine != "ds4bench" else "cupy"
    cells, _ = M.expand(spec, backend)
    assert cells and all(c.baseline_cell for c in cells)
    assert {c.baseline_cell for c in cells} <= {c.cell_id for c in cells if c.is_baseline}


def test_excludes_and_an_added_baseline():
    spec = M.spec_from_mapping({"cache": ["q8", "f16"], "batch": [1, 16],
                                "exclude": [{"cache": "q8", "batch": 16}]}, "test")
    cells, notes = M.expand(spec, "numpy", "test")
    assert [c.cell_id for c in cells] == ["tiny-f32-b1", "tiny-q8-b1", "tiny-f16-b1", "tiny-f16-b16"]
    assert any("baseline cache=f32,batch=1 added" in n for n in notes)
    assert cells[0].key == "cache=f32 batch=1"


@pytest.mark.parametrize("doc, match", [
    ({"cache": ["q9"]}, "unknown cache mode 'q9'"),
    ({"placement": ["vram"]}, "unknown placement"),
    ({"batch": [0]}, "outside 1..64"),
    ({"prompts": "nope"}, "prompt set 'nope'"),
    ({"reps": 0}, "reps must be at least 1"),
    ({"colour": "red"}, "unknown key"),
    ({"exclude": [{"color": "q8"}]}, "not axes"),
    ({"batch": ["x"]}, "list of int"),
    ({"env": {"DS4BENCH_MOE_KERNEL": "split"}}, r"\[env\] DS4BENCH_MOE_KERNEL: unknown 'split'; choose from warp"),
    ({"env": {"DS4BENCH_MOE_KERNELS": "split"}}, r"\[env\] DS4BENCH_MOE_KERNELS is not an engine toggle"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"pass_stat": "mean"}, "pass_stat must be one of median, best, found 'mean'"),
])
def test_invalid_specs_name_the_problem(doc, match):
    with pytest.raises(ValueError, match=match):
        M.spec_from_mapping(doc, "test")


def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["matrix", "--cache", "q8,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown cache mode 'bogus'" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("cache = [")
    assert main(["matrix", "--spec", str(bad), "--out", str(tmp_path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["matrix", "--resume", "nope", "--out", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    if M.resolve_backend("auto")[0] != "cupy":
        assert main(["matrix", "--backend", "cupy", "--out", str(tmp_path)]) == 2
        assert "backend cupy is unavailable" in capsys.readouterr().err


def test_auto_backend_without_a_gpu_says_why():
    backend, why = M.resolve_backend("auto")
    if backend == "cupy":
        pytest.skip("a GPU backend is available here")
    assert backend == "numpy" and why


# ---- running cells ---------------------------------------------------------------------------------
def test_catches_the_broken_mode(tmp_path, prompts):
    """q8 with an off-by-one Q8_0 block scale on the attention projections: every one of its
    cells must be `broken`, every healthy cell must pass, and the exit status must say so."""
    out = tmp_path / "runs"
    r = ds4bench("matrix", "--backend", "numpy", "--cache", "q8,f16,f32,q8-badscale", "--batch", "1,2",
                 "--prompts", prompts, "-n", "6", "--reps", "1", "--out", str(out), "--format", "json", timeout=300)
    assert r.returncode == 1, r.stderr
    _, recs = records(out)
    verdicts = {cid: rec["verdict"] for cid, rec in recs.items()}
    assert len(verdicts) == 8
    assert {cid for cid, v in verdicts.items() if v == "broken"} == {"tiny-q8-badscale-b1", "tiny-q8-badscale-b2"}, verdicts
    assert all(v in ("identical", "close", "drift") for cid, v in verdicts.items() if "badscale" not in cid)
    assert json.loads(r.stdout)[0]["cell_id"] == "tiny-f32-b1"


def test_a_crash_and_a_hang_fail_their_cells_and_the_matrix_goes_on(tmp_path, prompts):
    out = tmp_path / "runs"
    r = ds4bench("matrix", "--backend", "numpy", "--cache", "test-crash,test-hang", "--baseline", "cache=test-crash",
                 "--batch", "1",
                 "--prompts", prompts, "-n", "2", "--reps", "1", "--timeout", "3", "--out", str(out), timeout=300)
    assert r.returncode == 1
    run, recs = records(out)
    crash, hang = recs["tiny-test-crash-b1"], recs["tiny-test-hang-b1"]
    assert crash["status"] == hang["status"] == "failed" == crash["verdict"] == hang["verdict"]
    assert "killed by SIGKILL" in crash["error"] and "simulated crash" in crash["error"]
    assert "timed out after 3 s" in hang["error"]
    assert "FAILED" in (run.path / "summary.md").read_text() and "FAILED" in r.stdout


def test_kill_mid_matrix_then_resume_loses_nothing(tmp_path, prompts):
    out = tmp_path / "runs"
    e = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--cache", "q8,f32", "--batch", "1,2",
           "--prompts", prompts,
           "-n", "3", "--reps", "2", "--stages", "--out", str(out), "--id", "killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = out / "killed" / "cells.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (jsonl.is_file() and jsonl.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)                      # the runner dies mid-matrix, without cleanup
    proc.wait()
    before = jsonl.read_bytes()
    done_before = [json.loads(l)["cell_id"] for l in before.decode().splitlines()]
    assert 2 <= len(done_before) < 4
    shown = ds4bench("show", "killed", "--out", str(out))             # not "running" forever
    assert f"the runner (pid {proc.pid} on " in shown.stdout and "--resume killed" in shown.stdout
    r = ds4bench("matrix", "--resume", "killed", "--out", str(out), "--format", "csv", timeout=300)
    assert r.returncode == 0, r.stderr
    after = jsonl.read_bytes()
    assert after.startswith(before)                        # finished cells untouched
    ids = [json.loads(l)["cell_id"] for l in after.decode().splitlines()]
    assert sorted(ids) == sorted(["tiny-f32-b1", "tiny-q8-b1", "tiny-q8-b2", "tiny-f32-b2"])  # each once
    assert RunDir(out / "killed").meta()["status"] == "complete"
    assert len(r.stdout.strip().splitlines()) == 5
    rec = RunDir(out / "killed").records()[0]
    assert rec["verdict"] == "identical" and rec["deterministic"] and len(rec["decode_tps_reps"]) == 2
    assert rec["decode_path"] == "eager"                   # how its decode steps ran
    assert {"prefill", "decode", "layer", "attn.q", "moe.experts", "head"} <= set(rec["stage_s"])
    # every measurement is a number or None with its stated reason
    missing = [k for k, v in rec.items() if v is None and k not in NOT_MEASURED and k not in rec["unavailable"]]
    assert not missing, missing


def test_ctrl_c_saves_finished_cells_and_resume_finishes(tmp_path, monkeypatch, capsys):
    """In process, with the cell launcher replaced: an interrupt on the third cell leaves two
    records, an `interrupted` run and a resume hint; --resume runs only the rest."""
    calls = []

    def fake(cell, out, fp, log, trace=None):
        calls.append(cell.cell_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return None, f"fake failure of {cell.cell_id}", 0.01

    monkeypatch.setattr(M, "run_cell_process", fake)
    out = str(tmp_path / "runs")
    argv = ["matrix", "--backend", "numpy", "--cache", "q8,f32", "--batch", "1,2", "--out", out, "--id", "r"]
    assert main(argv) == 130
    assert "--resume r" in capsys.readouterr().err
    run = RunDir(Path(out) / "r")
    assert run.meta()["status"] == "interrupted" and len(run.records()) == 2
    assert "Resume with" in (run.path / "summary.md").read_text()
    assert main(["matrix", "--resume", "r", "--cache", "q8", "--out", out]) == 2     # a resume takes no new axes
    assert "drop --cache" in capsys.readouterr().err
    calls.clear()
    assert main(["matrix", "--resume", "r", "--out", out]) == 1                       # failed cells gate
    assert calls == ["tiny-q8-b2", "tiny-f32-b2"]
    assert run.meta()["status"] == "complete" and len(run.records()) == 4


def test_device_memory_comes_from_the_gpu_ops_report():
    class Ops:
        def __init__(self, placement):
            self.placement = placement

        def memory(self):
            return {"placement": self.placement, "weights_bytes": 100, "pool_total_bytes": 50}

    class Engine:
        ops = Ops("managed-hinted")

    got = C._device_memory(Engine)
    assert (got["device_peak_bytes"], got["managed_bytes"]) == (50, 100)
    Engine.ops = Ops("device")
    assert C._device_memory(Engine)["managed_bytes"] == 0
    Engine.ops = object()
    assert "no memory() report" in C._device_memory(Engine)["why"]


def test_large_presets_are_written_once_and_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "SYNTH_IN_MEMORY_MAX", 0)               # treat tiny as a large preset
    cells, _ = M.expand(M.spec_from_mapping({"cache": ["f32", "q8"]}, "test"), "numpy", "test")
    said = []
    M.prepare_models(cells, str(tmp_path), say=said.append)
    path = tmp_path / "tiny-q2-seed0.gguf"
    assert path.is_file() and len(said) == 1
    assert all(c.params["model_file"] == str(path) and c.params["preset"] == "tiny" for c in cells)
    M.prepare_models(cells, str(tmp_path), say=said.append)        # a resume: present, not rewritten
    assert len(said) == 1


def test_a_taken_run_id_is_said_not_silently_renamed(capsys, tmp_path):
    args = ["matrix", "--id", "dup", "-n", "1", "--reps", "1", "--cache", "f32", "--batch", "1",
            "--backend", "numpy", "--out", str(tmp_path)]
    assert main(args) == 0 and main(args) == 0
    assert "note: run id dup is taken (finish that one with --resume dup); this run is dup-2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup", "dup-2"]
