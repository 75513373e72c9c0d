"""An external engine in the matrix (ds4bench/harness/command_engine.py), with tests/engines/fake_engine.py
standing in for a binary: its toggles as env axes, its speed and fingerprints in our records,
its verdicts by the free-running rules, and one-line errors for bad adapters and failed runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds4bench.harness import command_engine as CE

HERE = Path(__file__).resolve().parent
FAKE = HERE / "engines" / "fake.toml"


def _matrix(tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--engine", str(FAKE),
                           "-n", "6", "--reps", "2", "--out", str(tmp_path), "--id", "e", "--format", "json", *extra],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS4BENCH_MODEL_CACHE": str(tmp_path / "models")})


def test_an_external_engines_toggles_are_judged_like_ours(tmp_path):
    r = _matrix(tmp_path, "--env", "FAKE_NOISE=unset,1", "--env", "FAKE_GARBAGE=unset,1")
    assert r.returncode == 1, r.stderr[-2000:]                      # a broken cell gates
    recs = {(x["env"].get("FAKE_NOISE", "unset"), x["env"].get("FAKE_GARBAGE", "unset")): x
            for x in json.loads(r.stdout)}
    assert recs["unset", "unset"]["verdict"] == "identical" and recs["unset", "unset"]["is_baseline"]
    assert recs["1", "unset"]["verdict"] == "close"                  # logprobs moved, tokens did not
    assert recs["unset", "1"]["verdict"] == "broken" and recs["1", "1"]["verdict"] == "broken"
    base = recs["unset", "unset"]
    assert base["engine"] == str(FAKE) and base["backend"] == "external" and base["cache"] == "native"
    assert base["decode_tps"] > 0 and base["prefill_tps"] > 123 and base["deterministic"]
    assert all(len(p["tokens"]) == 6 for p in base["prompts"]) and base["model_file"].endswith(".gguf")
    assert "no teacher-forced KL" in base["unavailable"]["kl_median"]
    assert "the numeric mode, placement and batch axes" in r.stderr
    run = tmp_path / "e"
    assert sorted(p.name for p in (run / "fingerprints").iterdir())[0].startswith("tiny-fake-")
    assert not list(run.glob("fingerprints/.*.engine.json"))        # its dumps are cleaned up


def test_a_failing_engine_is_a_failed_cell_and_the_matrix_goes_on(tmp_path):
    r = _matrix(tmp_path, "--env", "FAKE_FAIL=unset,1")
    assert r.returncode == 1
    recs = {x["env"].get("FAKE_FAIL", "unset"): x for x in json.loads(r.stdout)}
    assert recs["unset"]["status"] == "ok"
    assert recs["1"]["status"] == "failed" and "fake: exited with status 3: fake: simulated failure" in recs["1"]["error"]


def test_parsers_read_speed_and_steps():
    ad = CE.load_adapter(str(FAKE))
    assert CE.parse_speed("ds4: prefill: 12.5 t/s, generation: 41.6 t/s\n", ad) == {"decode": 41.6, "prefill": 12.5}
    assert CE.parse_speed("nothing here", ad) == {"decode": None, "prefill": None}
    doc = {"steps": [{"selected": {"id": 7}, "top_logprobs": [{"id": 7, "logprob": -0.1}, {"id": 9, "logprob": -2.0}]},
                     {"selected": {"id": 3}, "top_logprobs": [{"id": 3, "logprob": -0.5}]}]}
    assert CE.parse_steps(doc, ad, 2) == ([7, 3], [[7, 9], [3]], [[-0.1, -2.0], [-0.5]])


@pytest.mark.parametrize("text,msg", [
    ('name = "x"', "command must be a non-empty list of strings"),
    ('command = ["e", "{prompt}"]', "command must pass {prompt} and {dump}"),
    ('command = ["e", "{prompt}", "{dump}"]\nprompt = "ids"', "prompt must be one of text, chat_ids"),
    ('command = ["e", "{prompt}", "{dump}"]', "[speed] needs a decode regex"),
    ('command = ["e", "{prompt}", "{dump}"]\n[speed]\ndecode = "x"\nprefill = "(y)"', "[speed] decode regex has no group"),
    ('command = ["e", "{prompt}", "{dump}"]\nbinary = 1\n[speed]\ndecode = "(x)"\nprefill = "(y)"', "unknown key binary"),
    ('command = ["{bin}", "{prompt}", "{dump}"]\n[speed]\ndecode = "(x)"\nprefill = "(y)"',
     "command uses {bin}, which is neither a built-in placeholder (model, prompt, n, ctx, dump, python, here) "
     "nor a [paths] entry"),
    ('command = ["{bin}", "{prompt}", "{dump}"]\n[paths]\nbin = "X"\n[speed]\ndecode = "(x)"\nprefill = "(y)"',
     '[paths] bin must be { env = "VARIABLE", what = "..." }'),
    ('command = ["{model}", "{prompt}", "{dump}"]\n[paths]\nmodel = { env = "X" }\n[speed]\ndecode = "(x)"\n'
     'prefill = "(y)"', "and not a built-in placeholder")])
def test_bad_adapters_are_one_line_errors(tmp_path, text, msg):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=f"engine adapter {p}: .*" + __import__("re").escape(msg)):
        CE.load_adapter(str(p))
    with pytest.raises(ValueError, match="engine 'nope': no adapter .*nope.toml"):
        CE.load_adapter("nope")
