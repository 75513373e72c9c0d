"""The ds4 adapters (benchmarks/engines/ds4.toml, ds4-cpu.toml) on output recorded from the real
ds4 binary (tests/engines/ds4/README.md): its timing line, its --dump-logprobs steps and our
fingerprints of them; the matrix with a replay of that binary; and, where $DS4_BIN names a
4-layer build and flash-4l is cached, the binary itself."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds4bench.harness import command_engine as CE
from ds4bench.engine.generate import token_hash

HERE = Path(__file__).resolve().parent
REC = HERE / "engines" / "ds4"
REPLAY = REC / "replay.py"
TOKENS = [20845, 13463, 124233, 109477]         # what ds4 picked (README.md)
ADAPTERS = ("ds4", "ds4-cpu")


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_recorded_timing_line_gives_ds4s_speed(name):
    ad = CE.load_adapter(name)
    out = (REC / "flash-4l-cpu.speed.stdout").read_text() + "\n" + (REC / "flash-4l-cpu.speed.stderr").read_text()
    assert CE.parse_speed(out, ad) == {"decode": 1.67, "prefill": 2.69}
    # the progress lines ("ds4: prefill layer 1/4", "ds4: prefill 33/33 done") are not the speed line
    assert "ds4: prefill layer" in out and "ds4: prefill 33/33 done" in out
    dumping = (REC / "flash-4l-cpu.dump.stderr").read_text()
    assert CE.parse_speed(dumping, ad) == {"decode": None, "prefill": None}    # hence the speed_command


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_recorded_dump_gives_token_ids_and_top20_logprobs(name):
    ad = CE.load_adapter(name)
    doc = json.loads((REC / "flash-4l-cpu.dump.json").read_text())
    ids, top_ids, top_lp = CE.parse_steps(doc, ad, 4)
    assert ids == TOKENS
    assert [len(t) for t in top_ids] == [20] * 4 and [len(t) for t in top_lp] == [20] * 4
    assert [t[0] for t in top_ids] == ids                           # greedy: the best is the one taken
    assert all(a >= b for lp in top_lp for a, b in zip(lp, lp[1:]))  # best first
    assert top_lp[0][:2] == [-3.22163987, -3.89933896] and top_ids[0][1] == 84832
    assert CE.parse_steps(doc, ad, 2)[0] == TOKENS[:2]


def test_our_fingerprint_of_the_recorded_run(tmp_path):
    from ds4bench.engine.generate import Fingerprint
    from ds4bench.harness.verdict import judge_prompt, load_fingerprints, save_fingerprints
    ad = CE.load_adapter("ds4-cpu")
    ids, top_ids, top_lp = CE.parse_steps(json.loads((REC / "flash-4l-cpu.dump.json").read_text()), ad, 4)
    fp = Fingerprint(prompt_id="capital_france", prompt_tokens=33, tokens=ids, sha256=token_hash(ids), text="",
                     topk_ids=top_ids, topk_logprobs=top_lp)
    assert fp.sha256.startswith("d654cdc914d7c5ca")                 # as the CPU matrix run recorded it
    save_fingerprints(str(tmp_path / "f.npz"), [fp], {})
    got = load_fingerprints(str(tmp_path / "f.npz"))["capital_france"]
    assert got["tokens"].tolist() == TOKENS and got["topk_lp"].shape == (4, 20)
    assert judge_prompt(got, got)["verdict"] == "identical"
    moved = {**got, "topk_lp": got["topk_lp"] - 0.01}
    assert judge_prompt(moved, got)["verdict"] == "close"


def _matrix(tmp_path, engine, *extra, ds4=str(REPLAY)):
    env = {**os.environ, "DS4BENCH_MODEL_CACHE": str(tmp_path / "models")}
    env.pop("DS4_BIN", None)
    if ds4 is not None:
        env["DS4_BIN"] = ds4
    return subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--engine", engine, "--preset", "tiny",
                           "-n", "4", "--prompts", "smoke", "--out", str(tmp_path), "--id", "r", "--format", "json",
                           *extra], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_adapter_in_a_matrix_with_the_replayed_binary(tmp_path, name):
    r = _matrix(tmp_path, name, "--env", "DS4_THREADS=unset,1")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = {x["env"].get("DS4_THREADS", "unset"): x for x in json.loads(r.stdout)}
    assert recs["unset"]["is_baseline"] and recs["1"]["verdict"] == "identical"
    base = recs["unset"]
    assert base["engine"] == name and base["backend"] == "external" and base["cache"] == "native"
    assert base["decode_tps"] == 1.67 and base["prefill_tps"] == 2.69
    assert [p["tokens"] for p in base["prompts"]] == [TOKENS] * 3
    assert base["prompts"][0]["sha256"] == token_hash(TOKENS)
    ds4 = base["engine_paths"]["ds4"]
    assert ds4["path"] == str(REPLAY) and ds4["sha256"] == hashlib.sha256(REPLAY.read_bytes()).hexdigest()
    assert "build" not in ds4                                       # no ds4bench-build.json beside it


def test_a_ds4_binary_that_is_not_given_stops_the_matrix_before_any_cell(tmp_path):
    r = _matrix(tmp_path, "ds4", ds4=None)
    assert r.returncode == 2 and not (tmp_path / "r").exists()
    assert r.stderr.strip() == ("ds4bench: error: engine ds4: {ds4} is $DS4_BIN, which is not set: give the ds4 "
                                "binary: ds4bench engines build ds4 --src CHECKOUT --arch sm_90")
    r = _matrix(tmp_path, "ds4-cpu", ds4=str(tmp_path / "nope"))
    assert r.returncode == 2 and f"DS4_BIN={tmp_path / 'nope'}: no such file or folder" in r.stderr
    # an env axis may name the binary: two builds side by side
    r = _matrix(tmp_path, "ds4-cpu", "--env", f"DS4_BIN={REPLAY},{tmp_path / 'nope'}", ds4=None)
    assert r.returncode == 2 and f"DS4_BIN={tmp_path / 'nope'}: no such file" in r.stderr


def test_paths_come_from_the_cells_environment_first(tmp_path, monkeypatch):
    ad = CE.load_adapter("ds4")
    monkeypatch.setenv("DS4_BIN", str(REPLAY))
    assert CE.path_values(ad, {}) == {"ds4": str(REPLAY)}
    assert CE.path_values(ad, {"DS4_BIN": str(REC)}) == {"ds4": str(REC)}
    with pytest.raises(ValueError, match=r"\$DS4_BIN, which is not set"):
        CE.path_values(ad, {"DS4_BIN": None})                        # unset by the cell's env axis
    (tmp_path / "ds4").write_bytes(b"x")
    (tmp_path / CE.BUILD_INFO).write_text('{"commit": "8d57664", "layers": 4}')
    got = CE.path_provenance({"ds4": str(tmp_path / "ds4")})["ds4"]
    assert got["bytes"] == 1 and got["sha256"] == hashlib.sha256(b"x").hexdigest()
    assert got["build"] == {"commit": "8d57664", "layers": 4}


def _flash_4l() -> Path:
    from ds4bench.engine.options import model_cache_dir
    return model_cache_dir() / "flash-4l-q2-seed0.gguf"


@pytest.mark.skipif(not os.environ.get("DS4_BIN") or not _flash_4l().is_file(),
                    reason="needs $DS4_BIN (a 4-layer ds4 build: ds4bench engines build ds4 --cpu --layers 4) and "
                           "flash-4l written to the model cache (ds4bench model make --preset flash-4l)")
def test_the_real_binary_still_prints_what_was_recorded(tmp_path):
    ad = CE.load_adapter("ds4-cpu")
    prompt = "What is the capital of France? One word."
    doc, speed, _ = CE.run_once(ad, str(_flash_4l()), prompt, 2, 64, tmp_path / "d.json", 600, {})
    assert CE.parse_steps(doc, ad, 2)[0] == TOKENS[:2] and speed == {"decode": None, "prefill": None}
    _, speed, _ = CE.run_once(ad, str(_flash_4l()), prompt, 2, 64, tmp_path / "d.json", 600, {}, ad.speed_command)
    assert speed["decode"] > 0 and speed["prefill"] > 0


def test_compare_engines_judges_one_runs_cells_against_anothers(tmp_path, capsys):
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import compare_engines
    assert _matrix(tmp_path, "ds4-cpu").returncode == 0
    r = subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--preset", "tiny",
                        "--mode", "f32", "-n", "4", "--prompts", "smoke", "--reps", "1", "--out", str(tmp_path),
                        "--id", "ours"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert compare_engines.main([str(tmp_path / "r"), str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "reference: r cell tiny-ds4-cpu-b1 (engine ds4-cpu" in out and out.count("| identical | – | 4 | 0 |") == 3
    ref, rows = compare_engines.cross(compare_engines.RunDir(tmp_path / "ours"), compare_engines.RunDir(tmp_path / "r"))
    assert ref["engine"] == "ds4bench" and len(rows) == 3
    assert all(r["first_divergence"] == 0 and r["verdict"] == "broken" for r in rows)   # tiny's tokens are not these
    assert compare_engines.main([str(tmp_path / "nope"), str(tmp_path / "r")]) == 2
