"""benchmarks/perturbation_growth.py: the injected error is what was asked, nothing moves without
it, and the measurement sees the routed experts' rounding amplify it (docs/verdicts.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import perturbation_growth as P
from ds4bench.engine.models import load_model

REPO = Path(__file__).resolve().parent.parent


def test_injection_growth_and_modes(tmp_path, capsys):
    out = tmp_path / "pg.json"
    assert P.main(["--preset", "tiny", "--tokens", "48", "--eps", "1e-5", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    inj = d["injected"]
    assert abs(inj["sublayer"][0] / 1e-5 - 1) < 0.01                  # layer 0's attention output, as injected
    assert inj["sublayer"][1] > 5 * inj["sublayer"][0]                 # the routed experts' Q8_K rounding lifts it
    assert len(inj["layer"]) == d["layers"] and inj["growth_per_layer"] > 1
    f = inj["ffn0"]                                                     # the amplifier is the routed experts
    assert f["routed experts"] > 10 * f["shared expert"] and f["shared expert"] < 10 * f["ffn input"]
    for m in ("q8", "f16"):
        assert min(d["modes"][m]["sublayer"]) > 0
    assert "| q8 against f32 |" in capsys.readouterr().out


def test_nothing_injected_nothing_moves():
    mf = load_model(None, "tiny", None, 0)
    ids = list(range(5, 40))
    a, b = P.run(mf, "f32", "numpy", ids, P.StateTap()), P.run(mf, "f32", "numpy", ids, P.StateTap())
    r = P.compare(b, a)
    assert max(r["sublayer"]) == 0 and r["logit_nmse"] == 0 and r["top1_changed"] == 0
    assert all(x == 0 for x in r["routes_changed"])


@pytest.mark.parametrize("args, says", [(["--eps", "x"], "--eps 'x'"),
                                        (["--model", "f.gguf", "--branch-rms", "0.1"], "--branch-rms")])
def test_bad_arguments_are_one_line_and_exit_2(args, says):
    r = subprocess.run([sys.executable, "-m", "benchmarks.perturbation_growth", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and says in r.stderr.strip().splitlines()[-1]
