"""benchmarks/perturbation_growth.py: the injected error is what was asked, nothing moves without
it, and the measurement sees the routed experts' rounding amplify it (docs/verdicts.md)."""
import json

from benchmarks import perturbation_growth as P
from ds4bench.engine.models import load_model


def test_injection_growth_and_modes(tmp_path, capsys):
    out = tmp_path / "pg.json"
    assert P.main(["--preset", "tiny", "--tokens", "48", "--eps", "1e-5", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    inj = d["injected"]
    assert abs(inj["sublayer"][0] / 1e-5 - 1) < 0.01                  # layer 0's attention output, as injected
    assert inj["sublayer"][1] > 5 * inj["sublayer"][0]                 # the routed experts' Q8_K rounding lifts it
    assert len(inj["layer"]) == d["layers"] and inj["growth_per_layer"] > 1
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
