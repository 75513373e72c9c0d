"""Reliability: compare's report of bad cells and empty runs, runs whose runner was killed, disk
full and temporaries, damaged run.json, atomic run creation, SIGTERM's exit status (no GPU)."""
import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ds4bench.engine import fileio
from ds4bench.harness import guards as G
from ds4bench.harness import matrix as M
from ds4bench.harness import results as S
from ds4bench.harness import verdict as V
from ds4bench.cli import main
from tests.test_results import make_run, rec


def run_cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc, err, *words):
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("ds4bench: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


# ---- compare ---------------------------------------------------------------------------------
def test_compare_lists_every_bad_cell_of_b_with_its_verdict_and_reason(tmp_path, capsys):
    a, b = make_run(tmp_path / "ra", ["x", "y"]), make_run(tmp_path / "rb", ["x", "y", "z"])
    a.append(rec("x"))
    a.append(rec("y", cache="q8", verdict="broken", verdict_reason="median |Δlogprob| 0.9 > tol"))
    b.append(rec("x"))
    b.append(rec("y", cache="q8", verdict="broken", verdict_reason="median |Δlogprob| 0.9 > tol"))
    b.append(rec("z", cache="f16", verdict="failed", status="failed", error="killed by SIGKILL (out of memory?)"))
    res = S.compare(a.records(), b.records())
    assert res["status"] == 1
    assert [(c["cell"], c["verdict"], c["in_a"]) for c in res["bad_b"]] == [
        ("cache=q8 batch=1", "broken", True), ("cache=f16 batch=1", "failed", False)]
    md = S.render_compare(res, "md")
    assert "**cache=f16 batch=1** FAILED (only in B): killed by SIGKILL (out of memory?)" in md
    assert "**cache=q8 batch=1** BROKEN: median |Δlogprob| 0.9 > tol" in md
    assert "# bad in B" in S.render_compare(res, "csv")
    rc, out, _ = run_cli(["compare", str(a.path), str(b.path)], capsys)
    assert rc == 1 and "FAILED (only in B)" in out


def test_compare_with_an_empty_run_is_a_user_error(tmp_path, capsys):
    a, b = make_run(tmp_path / "ra", ["x"]), make_run(tmp_path / "rb", [])
    a.append(rec("x"))
    for args in ([str(a.path), str(b.path)], [str(b.path), str(a.path)]):
        rc, out, err = run_cli(["compare", *args], capsys)
        one_line_error(rc, err, f"run {b.run_id}", "no recorded cell")
        assert out == ""


# ---- the runner ------------------------------------------------------------------------------
def test_a_run_whose_runner_is_gone_says_so_with_the_resume_command(tmp_path, capsys):
    run = make_run(tmp_path, ["x", "y"])
    run.append(rec("x"))
    meta = run.meta()
    assert meta["runner"]["pid"] == os.getpid() and meta["runner"]["host"] == socket.gethostname()
    rc, out, _ = run_cli(["show", str(run.path)], capsys)
    assert "is still running" in out
    pid = dead_pid()
    run.write_meta({**meta, "runner": {**meta["runner"], "pid": pid}})
    rc, out, _ = run_cli(["show", str(run.path)], capsys)
    assert f"the runner (pid {pid} on {socket.gethostname()}) is gone; finish with " \
           f"`ds4bench matrix --resume {run.run_id}`" in out
    b = make_run(tmp_path / "b", ["x"])
    b.append(rec("x"))
    rc, _, err = run_cli(["compare", str(run.path), str(b.path)], capsys)
    assert "is gone" in err
    run.write_meta({**meta, "runner": {**meta["runner"], "host": "elsewhere"}})
    rc, out, _ = run_cli(["show", str(run.path)], capsys)
    assert "on another host" in out and "cannot tell" in out


def test_resume_of_a_run_whose_runner_is_gone_says_so_and_records_the_new_runner(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "run_cell_process", lambda *a, **k: (None, "fake", 0.0))
    out = str(tmp_path)
    assert main(["matrix", "--backend", "numpy", "--cache", "f32", "--out", out, "--id", "r"]) == 1
    run = S.RunDir(Path(out) / "r")
    pid = dead_pid()
    run.write_meta({**run.meta(), "status": "running", "runner": {**run.meta()["runner"], "pid": pid}})
    capsys.readouterr()
    assert main(["matrix", "--resume", "r", "--out", out]) == 1
    assert f"note: the runner (pid {pid} on {socket.gethostname()}) is gone; resuming" in capsys.readouterr().err
    assert run.meta()["runner"]["pid"] == os.getpid() and run.meta()["status"] == "complete"


def test_a_recycled_pid_is_not_taken_for_the_runner(tmp_path):
    run = make_run(tmp_path)
    meta = run.meta()
    run.write_meta({**meta, "runner": {**meta["runner"], "proc_start": "1"}})   # this pid, another process
    assert G.runner_state(run.meta())[0] == "gone"


def test_resume_refuses_a_run_whose_runner_is_alive(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "run_cell_process", lambda *a, **k: (None, "fake", 0.0))
    out = str(tmp_path)
    assert main(["matrix", "--backend", "numpy", "--cache", "f32", "--out", out, "--id", "r"]) == 1
    run = S.RunDir(Path(out) / "r")
    assert run.meta()["status"] == "complete"
    run.write_meta({**run.meta(), "status": "running", "runner": G.runner_identity()})
    capsys.readouterr()
    rc, _, err = run_cli(["matrix", "--resume", "r", "--out", out], capsys)
    one_line_error(rc, err, "is still running", f"pid {os.getpid()}")


# ---- disk full and temporaries ---------------------------------------------------------------
def _enospc_after(n_bytes):
    """A Path.write_text that writes part of the text, then fails as a full disk does."""
    real = Path.write_text

    def write_text(self, text, *a, **k):
        real(self, text[:n_bytes], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write_text


def test_a_write_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _enospc_after(3))
    with pytest.raises(OSError, match=r"cannot write .*summary.md: no space left on the device$"):
        S.write_atomic(tmp_path / "summary.md", "hello world")
    assert list(tmp_path.iterdir()) == []


def test_fingerprints_on_a_full_disk_leave_no_temporary(tmp_path, monkeypatch):
    def savez(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(V.np, "savez", savez)
    with pytest.raises(OSError, match="no space left"):
        V.save_fingerprints(str(tmp_path / "c.npz"), [], {})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_end_never_marks_the_run_complete(tmp_path, monkeypatch):
    run = make_run(tmp_path, ["a"])
    run.append(rec("a"))
    import pandas as pd

    def to_parquet(self, path, **k):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    with pytest.raises(OSError, match=r"cells.parquet: no space left.*--resume"):
        run.finalize("complete")
    assert run.meta()["status"] == "interrupted"
    assert "no space left" in run.meta()["error"]
    assert temporaries(run.path) == []
    monkeypatch.undo()
    run.finalize("complete")
    assert run.meta()["status"] == "complete" and (run.path / "cells.parquet").is_file()


def test_a_full_disk_while_appending_names_cells_jsonl(tmp_path, monkeypatch):
    run = make_run(tmp_path, ["a"])
    monkeypatch.setattr(S.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match=r"cannot write .*cells.jsonl: no space left on the device"):
        run.append(rec("a"))


def test_a_cell_that_died_silently_on_a_full_disk_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_disk_full", lambda path, slack=0: True)
    cell = M.Cell("c", "c", "tiny", {"timeout_s": 60, "backend": "numpy", "cache": "f32", "batch": 1,
                                     "placement": None, "env": {}})
    popen = subprocess.Popen
    monkeypatch.setattr(M.subprocess, "Popen", lambda *a, **k: popen([sys.executable, "-c", "raise SystemExit(2)"]))
    got, err, _ = M.run_cell_process(cell, tmp_path / "c.json", tmp_path / "c.npz", tmp_path / "c.log")
    assert got is None and err.startswith("exited with status 2 without a record; the disk holding")
    assert err.endswith("is full")


def test_resume_removes_stale_temporaries(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(cell, out, fp, log, trace=None):
        calls.append(cell.cell_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return None, "fake", 0.0
    monkeypatch.setattr(M, "run_cell_process", fake)
    out = str(tmp_path)
    assert main(["matrix", "--backend", "numpy", "--cache", "f32,q8", "--out", out, "--id", "r"]) == 130
    run = S.RunDir(Path(out) / "r")
    for stale in (".run.json.tmp123", ".cells.parquet.tmp99", "fingerprints/x.npz.tmp7",
                  "fingerprints/.y.npz.tmp8", "tmp/tiny-q8-b1.json"):
        (run.path / stale).parent.mkdir(exist_ok=True)
        (run.path / stale).write_text("partial")
    capsys.readouterr()
    assert main(["matrix", "--resume", "r", "--out", out]) == 1
    assert "removed fingerprints/x.npz.tmp7" in capsys.readouterr().err
    assert temporaries(run.path) == [] and not (run.path / "tmp").exists()
    assert run.meta()["status"] == "complete"


# ---- damaged run.json and cell parameters ----------------------------------------------------
@pytest.mark.parametrize("text,words", [("{}", ["'cells' is missing"]), ("[1, 2]", ["top level is a JSON list"]),
                                        ('{"cells": 3, "status": "complete"}', ["'cells' must be a list"]),
                                        ('{"cells": [], "status": "runn', ["not valid JSON"])])
def test_a_damaged_run_json_gives_one_line_naming_it(tmp_path, capsys, text, words):
    good = make_run(tmp_path / "good", ["a"])
    good.append(rec("a"))
    bad = tmp_path / "runs" / "bad"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text(text)
    for args in (["show", str(bad)], ["compare", str(good.path), str(bad)], ["compare", str(bad), str(good.path)],
                 ["plot", "--run", str(bad), "--out", str(tmp_path / "plots")],
                 ["matrix", "--resume", "bad", "--out", str(tmp_path / "runs")]):
        rc, out, err = run_cli(args, capsys)
        one_line_error(rc, err, str(bad / "run.json"))
        for w in words:
            assert w in err, (args, err)


@pytest.mark.parametrize("params", ["{}", "[1]", '{"cache": "f32"}'])
def test_cell_with_incomplete_params_is_one_line(tmp_path, capsys, params):
    rc, _, err = run_cli(["cell", "--params", params, "--out", str(tmp_path / "o.json"),
                                                   "--fingerprints", str(tmp_path / "f.npz")], capsys)
    one_line_error(rc, err, "--params lacks")


# ---- run creation and signals ----------------------------------------------------------------
def test_run_creation_claims_its_directory_atomically(tmp_path, monkeypatch):
    """Another process creating the same id between a check and the mkdir must not fail this one."""
    (tmp_path / "dup").mkdir()
    monkeypatch.setattr(Path, "exists", lambda self: False)     # the other process won the race
    meta = {"backend": "numpy", "cells": []}
    run = S.RunDir.create(str(tmp_path), meta, "dup")
    assert run.run_id == "dup-2" and (run.path / "run.json").is_file()


def test_sigterm_exits_143_and_keeps_the_finished_cells(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(cell, out, fp, log, trace=None):
        calls.append(cell.cell_id)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return None, "fake", 0.0
    monkeypatch.setattr(M, "run_cell_process", fake)
    out = str(tmp_path)
    assert main(["matrix", "--backend", "numpy", "--cache", "f32,q8,f16", "--out", out, "--id", "t"]) == 143
    run = S.RunDir(Path(out) / "t")
    assert run.meta()["status"] == "interrupted" and len(run.records()) == 1
    assert "--resume t" in capsys.readouterr().err


# ---- GGUF validation -------------------------------------------------------------------------
from ds4bench.engine import config as C                                   # noqa: E402
from ds4bench.engine.gguf_io import ModelFileError, load_gguf, tensor_specs, write_gguf  # noqa: E402
from ds4bench.engine.synth import make_tensor, synth_metadata, write_model  # noqa: E402

TINY = C.preset("tiny")


@pytest.fixture(scope="module")
def tiny_blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    write_model(TINY, str(path), seed=0)
    return path.read_bytes()


def _offset_at(blob: bytes, name: str) -> int:
    """Where a 2-D tensor's data offset sits in the tensor table (after name, n_dims, dims, type)."""
    at = blob.index(name.encode() + (2).to_bytes(4, "little")) + len(name)
    return at + 4 + 2 * 8 + 4


def _header(blob, version=None, n_kv=None):
    b = bytearray(blob)
    if version is not None:
        b[4:8] = version.to_bytes(4, "little")
    if n_kv is not None:
        b[16:24] = (int.from_bytes(b[16:24], "little") + n_kv).to_bytes(8, "little")
    return bytes(b)


def _offset(blob, name, value):
    at = _offset_at(blob, name)
    assert int.from_bytes(blob[at:at + 8], "little") in (0, 262144)
    return blob[:at] + value.to_bytes(8, "little") + blob[at + 8:]


@pytest.mark.parametrize("case,pattern", [
    ("version1", r"GGUF version 1 is not supported \(ds4bench reads versions 2 and 3\)"),
    ("one_more_key", "cannot be parsed: the header is damaged or the file is truncated"),
    ("many_keys", "truncated or damaged header: it claims 181 tensors and 1000000"),
    ("offset_moved", r"tensor output_hc_fn.weight \(bytes \d+..\d+\) overlaps tensor token_embd.weight"),
    ("offset_unaligned", "tensor token_embd.weight: data offset 16 is not a multiple of the file's alignment 32"),
    ("rms_eps", r"metadata key deepseek4.attention.layer_norm_rms_epsilon=4.4e\+06 is outside the allowed range "
                r"\(0, 0.01\]"),
    ("scale", r"metadata key deepseek4.expert_weights_scale=-1.5 is outside the allowed range \(0, 100\]"),
    ("embd0", r"metadata key deepseek4.embedding_length=0 is outside the allowed range \[256, 65536\]"),
])
def test_damaged_gguf_files_give_one_line_naming_the_problem(tmp_path, tiny_blob, capsys, case, pattern):
    p = tmp_path / f"{case}.gguf"
    bad_cfg = {"rms_eps": dict(rms_eps=4.4e6), "scale": dict(expert_weights_scale=-1.5)}.get(case)
    if case == "version1":
        p.write_bytes(_header(tiny_blob, version=1))
    elif case == "one_more_key":
        p.write_bytes(_header(tiny_blob, n_kv=1))
    elif case == "many_keys":
        p.write_bytes(_header(tiny_blob, n_kv=10**6 - int.from_bytes(tiny_blob[16:24], "little")))
    elif case == "offset_moved":
        p.write_bytes(_offset(tiny_blob, "token_embd.weight", 65536))
    elif case == "offset_unaligned":
        p.write_bytes(_offset(tiny_blob, "token_embd.weight", 16))
    else:
        import dataclasses
        cfg = dataclasses.replace(TINY, **bad_cfg) if bad_cfg else TINY
        if case == "embd0":
            object.__setattr__(cfg := dataclasses.replace(TINY), "n_embd", 0)
        write_gguf(str(p), cfg, lambda s: make_tensor(TINY, s, 0), tensor_specs(TINY), synth_metadata(TINY, 0))
    with pytest.raises(ModelFileError, match=pattern):
        load_gguf(str(p))
    rc, out, err = run_cli(["model", "info", str(p)], capsys)
    one_line_error(rc, err, str(p))
    assert "Sorry" not in err and "Error" not in err.split(":", 2)[2]


def test_a_preset_check_does_not_invent_a_variant(tmp_path, capsys):
    q4 = tmp_path / "tiny-q4.gguf"
    write_model(C.preset("tiny", "q4"), str(q4))
    rc, out, err = run_cli(["model", "info", str(q4), "--preset", "tiny"], capsys)
    assert rc == 0 and "q2" not in err, err
    rc, out, err = run_cli(["model", "info", str(q4), "--preset", "tiny", "--variant", "q2"], capsys)
    one_line_error(rc, err, "routed experts are variant q4, not the q2 asked for")
    rc, out, err = run_cli(["model", "info", str(q4), "--preset", "small"], capsys)
    one_line_error(rc, err, "does not match preset small")
    assert "variant" not in err


# ---- options checked up front ----------------------------------------------------------------
def test_resume_refuses_any_option_even_a_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "run_cell_process", lambda *a, **k: (None, "fake", 0.0))
    out = str(tmp_path)
    assert main(["matrix", "--backend", "numpy", "--cache", "f32", "--out", out, "--id", "r"]) == 1
    capsys.readouterr()
    rc, _, err = run_cli(["matrix", "--resume", "r", "--reps", "0", "--seed", "0", "--out", out], capsys)
    one_line_error(rc, err, "drop --reps, --seed")


@pytest.mark.parametrize("ctx,words", [("5", ["ctx 5 is too small for tiny", "give ctx"]),
                                       ("-5", ["ctx must be a positive number", "-5"]),
                                       ("0", ["ctx must be a positive number", "found 0"]),
                                       ("99999", ["exceeds tiny's context length 16384"])])
def test_matrix_ctx_is_checked_before_any_cell_runs(tmp_path, capsys, monkeypatch, ctx, words):
    ran = []
    monkeypatch.setattr(M, "run_cell_process", lambda *a, **k: ran.append(1) or (None, "fake", 0.0))
    rc, _, err = run_cli(["matrix", "--backend", "numpy", "--ctx", ctx, "-n", "4", "--out", str(tmp_path)], capsys)
    one_line_error(rc, err, *words)
    assert ran == [] and list(tmp_path.iterdir()) == []


def test_generate_refuses_a_ctx_smaller_than_prompt_and_n(capsys):
    rc, _, err = run_cli(["generate", "--backend", "numpy", "-n", "4", "--ctx", "10", "--raw", "-p", "Hello there, sky"],
                         capsys)
    one_line_error(rc, err, "--ctx 10 is too small", "+ -n 4 + 1")


def test_a_preset_too_large_for_host_memory_is_refused_before_any_file_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS4BENCH_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setattr(G, "host_available", lambda: 16 * 2**30)
    rc, _, err = run_cli(["matrix", "--spec", "gpu", "--backend", "numpy", "--out", str(tmp_path / "runs")], capsys)
    one_line_error(rc, err, "needs about 37.5 GiB of host memory for preset flash-4l", "16.0 GiB is available")
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()
    assert G.numpy_cell_bytes(C.preset("tiny"), "f32") < 2**27          # tiny passes anywhere


def test_model_make_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import gguf
    import shutil
    out = tmp_path / "m.gguf"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, _, err = run_cli(["model", "make", "--preset", "tiny", "-o", str(out)], capsys)
    one_line_error(rc, err, f"cannot write {out}: it needs 10,", "has 1,000 free")
    monkeypatch.undo()

    def short_write(self, *a, **k):                   # numpy's tofile on a full disk
        raise OSError("270336 requested and 248736 written")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short_write)
    monkeypatch.setattr(fileio, "_disk_full", lambda path, slack=0: True)
    rc, _, err = run_cli(["model", "make", "--preset", "tiny", "-o", str(out)], capsys)
    one_line_error(rc, err, f"cannot write {out}: no space left on the device")
    assert list(tmp_path.iterdir()) == []


# ---- help --------------------------------------------------------------------------------------
def _help(args, capsys):
    with pytest.raises(SystemExit):
        main([*args, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_say_what_options_do_and_their_defaults(capsys):
    make = _help(["model", "make"], capsys)
    assert "(default tiny)" in make and "weight seed (default 0)" in make and "meaningless by design" in make
    matrix = _help(["matrix"], capsys)
    for words in ("tokens generated per prompt (default: the spec's; 32 in default.toml)",
                  "timed repetitions per cell (default: the spec's; 3 in default.toml)",
                  "(default: the spec's; 300 in default.toml)", "--exclude", "--tol"):
        assert words in matrix, words
    assert "what `ds4bench matrix` runs" in _help(["cell"], capsys)
    trace = _help(["trace"], capsys)
    assert not any(f"--{o}" in trace for o in ("exclude", "baseline", "tol", "tie", "resume"))
    assert "(default 32)" in _help(["generate"], capsys)


def test_readme_first_use_says_synthetic_text_is_meaningless_and_how_to_read_the_table():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()

    def section(title):
        return " ".join(readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0].split())
    for words in ("meaningless by design", "docs/reliability.md"):
        assert words in section("Set-up"), words
    for words in ("1st div", "`1 (3/3)`", "median Δlp", "`UNRELIABLE`"):
        assert words in section("Reading a result"), words


def test_a_killed_model_write_leaves_no_orphan_in_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "SYNTH_IN_MEMORY_MAX", 0)
    orphan = tmp_path / f"tiny-q2-seed0.gguf.tmp{dead_pid()}"
    mine = tmp_path / f"other.gguf.tmp{os.getpid()}"            # a write in progress: kept
    orphan.write_bytes(b"GGUF partial")
    mine.write_bytes(b"GGUF partial")
    cells, _ = M.expand(M.spec_from_mapping({"cache": ["f32"]}, "test"), "numpy", "test")
    said = []
    M.prepare_models(cells, str(tmp_path), say=said.append)
    assert not orphan.exists() and mine.exists() and (tmp_path / "tiny-q2-seed0.gguf").is_file()
    assert any("removed" in s for s in said)


def test_runners_racing_for_one_id_get_distinct_directories(tmp_path):
    code = ("import sys; from ds4bench.harness.results import RunDir; "
            "print(RunDir.create(sys.argv[1], {'backend': 'numpy', 'cells': []}, 'same').run_id)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["same", "same-2", "same-3", "same-4"]
