"""Speed comparisons that hold up (docs/speed.md): round-level statistics, the round schedule,
the warm-up stopping rule, the known slowdown, and in reduced form on tiny the two end-to-end
checks: an A/A matrix calls no change and a 20% injected slowdown is called, with the true
ratio inside the reported interval."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ds4bench.harness import rounds as RD
from ds4bench.engine import slowdown as SD
from ds4bench.harness import stats as S
from ds4bench.harness.matrix import Cell
from ds4bench.harness.results import RunDir, compare

REPO = Path(__file__).resolve().parent.parent


# ---- statistics --------------------------------------------------------------------------------
def test_aa_false_positives_stay_below_alpha_on_simulated_rounds():
    rng = np.random.default_rng(7)
    calls = sum(S.compare_rounds(100 * np.exp(rng.normal(0, 0.03, 5)), 100 * np.exp(rng.normal(0, 0.03, 5)),
                                 factor=1.0, seed=i)["change"] != "same" for i in range(200))
    assert calls <= 0.1 * 200           # percentile intervals of 5 rounds run a little narrow; still bounded


def test_a_real_change_is_called_and_its_interval_holds_the_true_ratio():
    rng = np.random.default_rng(3)
    a, b = 100 * np.exp(rng.normal(0, 0.01, 6)), 80 * np.exp(rng.normal(0, 0.01, 6))
    r = S.compare_rounds(a, b)
    assert r["change"] == "slower" and r["ci"][0] <= 0.8 <= r["ci"][1] and r["p_value"] < 1e-4
    assert 0 < r["mde"] < 0.05


def test_too_few_rounds_gives_no_p_value_and_a_change_inside_the_floor_is_not_called():
    r = S.compare_rounds([100.0], [50.0])
    assert r["change"] == "too few rounds" and r["p_value"] is None and r["ratio"] == pytest.approx(0.5)
    same = S.compare_rounds([100, 100.1, 99.9, 100], [101, 101.1, 100.9, 101], factor=1.02)
    assert same["p_value"] < 0.05 and same["change"] == "same"          # 1% is below the 2% floor


def test_pairing_cancels_a_drift_that_hides_a_real_change_unpaired():
    rng = np.random.default_rng(5)
    drift = np.linspace(54, 36, 7)                           # a host growing busier over the run
    a = drift * np.exp(rng.normal(0, 0.01, 7))
    b = 0.9 * drift * np.exp(rng.normal(0, 0.01, 7))         # 10% slower in every pass
    assert S.compare_rounds(a, b)["change"] == "same"        # unpaired: the drift swamps it
    r = S.compare_rounds(a, b, paired=True)
    assert r["change"] == "slower" and r["method"] == "paired" and r["ci"][0] <= 0.9 <= r["ci"][1]
    assert r["noise"] < 0.03 and r["n_a"] == r["n_b"] == 7
    calls = sum(S.compare_rounds(drift * np.exp(rng.normal(0, 0.03, 7)), drift * np.exp(rng.normal(0, 0.03, 7)),
                                 factor=1.0, paired=True)["change"] != "same" for _ in range(400))
    assert calls <= 0.08 * 400                              # A/A with a drift: about alpha, t intervals are exact
    assert S.compare_rounds([1.0, None, 2.0], [1.0, 3.0, None], paired=True)["change"] == "too few rounds"


def test_mde_shrinks_with_rounds_and_grows_with_noise():
    assert S.min_detectable_effect(0.02, 10, 10) < S.min_detectable_effect(0.02, 3, 3)
    assert S.min_detectable_effect(0.04, 5, 5) > S.min_detectable_effect(0.02, 5, 5)


# ---- protocol pieces ---------------------------------------------------------------------------
def _cells(n):
    return [Cell(f"c{i}", f"c{i}", "tiny", {}, is_baseline=i == 0, baseline_cell="c0") for i in range(n)]


def test_schedule_puts_the_baseline_first_interleaves_and_is_seeded():
    cells = _cells(4)
    ab = RD.schedule(cells, 4, "abba")
    assert ab[0] == ["c0", "c1", "c2", "c3"] and ab[1] == ab[0][::-1] and ab[2] == ab[0]
    rnd = RD.schedule(cells, 6, "random", seed=1)
    assert rnd[0][0] == "c0" and all(sorted(r) == ["c0", "c1", "c2", "c3"] for r in rnd)
    assert rnd == RD.schedule(cells, 6, "random", seed=1) and len({tuple(r) for r in rnd}) > 1
    assert RD.schedule(cells, 1) == [["c0", "c1", "c2", "c3"]]
    with pytest.raises(ValueError, match="order 'zigzag'"):
        RD.schedule(cells, 2, "zigzag")


class _T:
    def __init__(self, step):
        self.step_s, self.prefill_s = [step] * 5, 1.0


def test_warm_up_stops_when_the_step_time_settles_or_at_the_cap():
    steps = iter([2.0, 1.5, 1.02, 1.01, 1.0, 1.0, 1.0])
    w = RD.warm_up(lambda: _T(next(steps)), settle=0.05, cap_s=60)
    assert w["settled"] and w["passes"] == 5 and w["step_s"] == 1.0
    noisy = iter([1.0, 2.0] * 100)
    w = RD.warm_up(lambda: (time.sleep(0.01), _T(next(noisy)))[1], settle=0.05, cap_s=0.05)
    assert not w["settled"] and 2 <= w["passes"] < 50


def test_merge_keeps_rounds_medians_and_marks_differing_tokens():
    def rnd(k, tps, tokens):
        return {"cell_id": "c", "round": k, "round_slot": k, "decode_tps": tps, "prefill_tps": 10.0 * tps,
                "step_ms": [1.0 / tps], "deterministic": True, "prompts": [{"tokens": tokens}], "wall_s": 1.0,
                "gpu_sm_clock_mhz_start": 1980.0, "gpu_throttle": [], "unavailable": {}}
    m = RD.merge([rnd(0, 100.0, [1, 2]), rnd(1, 90.0, [1, 2]), rnd(2, 110.0, [1, 2])])
    assert m["decode_tps"] == 100.0 and m["round_decode_tps"] == [100.0, 90.0, 110.0] and m["rounds"] == 3
    assert m["deterministic"] and m["round_gpu"][0]["sm_clock_mhz"] == 1980.0 and "round" not in m
    assert not RD.merge([rnd(0, 100.0, [1, 2]), rnd(1, 100.0, [1, 3])])["deterministic"]


def test_slowdown_parses_once_and_waits_the_calibrated_time():
    assert SD.parse(None) is None and SD.parse("moe:0.05") == SD.Slowdown("moe", 0.05)
    assert SD.Slowdown("moe", 0.25).true_ratio == pytest.approx(0.8)
    for bad, match in (("attn:0.1", "stage one of moe"), ("moe:x", "not a number"), ("moe:0", r"\(0, 10\]")):
        with pytest.raises(ValueError, match=match):
            SD.parse(bad)
    d = SD.Delay(SD.Slowdown("moe", 0.5), type("Ops", (), {"xp": np})(), n_layer=4)
    t0 = time.perf_counter()
    d()
    assert time.perf_counter() - t0 < 0.005                 # not calibrated yet: no wait
    d.calibrate(0.08)                                       # a 80 ms step: 40 ms more per forward call
    t0 = time.perf_counter()
    for _ in range(4):
        d()
    assert 0.04 <= time.perf_counter() - t0 < 0.2


def test_bad_toggles_and_trees_are_one_line_errors():
    e = dict(os.environ, PYTHONPATH=str(REPO), DS4BENCH_SLOWDOWN="moe:lots")
    r = subprocess.run([sys.executable, "-m", "ds4bench", "generate", "--preset", "tiny", "-n", "2"], cwd=REPO,
                       env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "DS4BENCH_SLOWDOWN" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    e.pop("DS4BENCH_SLOWDOWN")
    r = subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--tree", "A=no-such-ref-x",
                        "--out", "/nonexistent"], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no-such-ref-x" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- end to end on tiny: A/A and sensitivity in one interleaved matrix -----------------------------
SPEC = '''
preset = ["tiny"]
cache = ["f32"]
batch = [1]
prompts = "{prompts}"
n = 24
reps = 3
rounds = 11
settle = 0.1
warmup_cap = 0.5
pass_stat = "best"
timeout = 300
tree = {{ A = "{repo}", A2 = "{repo}", S = "{repo}" }}
tree_env = {{ S = {{ DS4BENCH_SLOWDOWN = "moe:0.2" }} }}

[env]
OPENBLAS_NUM_THREADS = "1"
OMP_NUM_THREADS = "1"
'''


def test_aa_calls_nothing_and_a_20pct_slowdown_is_caught_with_the_true_ratio_inside(tmp_path):
    prompts = tmp_path / "p.toml"
    prompts.write_text('[[prompt]]\nid = "sky"\nkind = "smoke"\ntext = "Why is the sky blue?"\n')
    spec = tmp_path / "speed.toml"
    spec.write_text(SPEC.format(prompts=prompts, repo=REPO))
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--spec", str(spec),
                        "--out", str(out), "--id", "speed"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    run = RunDir(out / "speed")
    recs = {x["tree"]: x for x in run.records()}
    order = run.meta()["schedule"]
    assert order[0][0] == "A-tiny-f32-b1" and len(order) == 11 and len({tuple(o) for o in order}) > 1
    assert all(len(x["round_decode_tps"]) == 11 and x["deterministic"] for x in recs.values())
    assert all(x["compile_s"] > 0 and x["warmup_passes"] >= 1 for x in recs.values())
    assert (out / "speed" / "compare-A-S.md").is_file() and "slower" in r.stdout

    # One realization per CI run: judged at alpha = 0.01 so the statistics themselves fail this
    # test about one run in a hundred (their rates are checked on simulated rounds above).
    aa = compare([recs["A"]], [recs["A2"]], alpha=0.01)["speed"][0]
    assert aa["method"] == "paired" and aa["change"] == "same", aa
    sens = compare([recs["A"]], [recs["S"]], alpha=0.01)["speed"][0]
    # the true ratio of each round: A's step against A's step plus the wait S's process injected
    # (batch 1: seconds per token). On the CPU the busy loop costs the slowed process more than its
    # wall time (1-4% of the step on a two-core host, docs/speed.md), so the CPU test asks for the
    # detection and a ratio within 5% of that truth; the interval's coverage of the true ratio is
    # the GPU test's (its spin kernel waits on the GPU's own timer)
    waits = {r["round"]: r["slowdown_step_s"] for r in run.round_records() if r.get("tree") == "S"}
    true = float(np.median([(1.0 / t) / (1.0 / t + waits[k]) for k, t in enumerate(recs["A"]["round_decode_tps"])]))
    assert sens["change"] == "slower", sens
    assert abs(np.log(sens["speedup"] / true)) < 0.05, (true, sens)
    assert recs["S"]["slowdown_true_ratio"] == pytest.approx(1 / 1.2)
    rep = subprocess.run([sys.executable, "benchmarks/speed_report.py", "--aa", f"{run.path}@A", f"{run.path}@A2",
                          "--sens", str(run.path), "--alpha", "0.01"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "**0 of 1 comparisons called a change**" in rep.stdout
    assert re.search(r"\| tree=S \| moe:0\.2 \| [0-9.]+ \| [0-9.]+–[0-9.]+ \| [0-9.]+ \| [0-9.]+ \| 0\.833 \| slower \|", rep.stdout)
    assert "first process of a pass" in rep.stdout and "later rounds (timing only): 30 |" in rep.stdout and "the machine's speed over the call" in rep.stdout.lower()


def test_true_band_adds_the_injectors_own_launches_measured_as_the_slowed_processes_base_step():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from speed_report import true_band
    finally:
        sys.path.pop(0)
    # H100, flash-4l q8 batch 1 with the graph: A's step 3.2951 ms, S's wait 0.1654 ms a step and
    # S's un-slowed step 3.3077 ms (its four zero-wait spin launches included)
    lo, hi = true_band(3.2951e-3, {"slowdown_step_s": 1.654e-4, "slowdown_base_step_s": 3.3077e-3})
    assert hi == pytest.approx(3.2951 / (3.2951 + 0.1654)) and lo == pytest.approx(3.2951 / (3.2951 + 0.1654 + 0.0126))
    assert lo < 0.950 < hi            # the measured 0.950 lies between the wait alone and the wait plus launches
    # a base step below A's (noise between processes) adds nothing; no wait recorded: no band
    assert true_band(1.0, {"slowdown_step_s": 0.05, "slowdown_base_step_s": 0.99}) == (1 / 1.05, 1 / 1.05)
    assert true_band(1.0, {"slowdown_step_s": None}) is None


# ---- GPU: the spin kernel waits the calibrated time, eagerly and replayed from a graph ----------
@pytest.mark.gpu
def test_gpu_delay_waits_its_time_and_replays_in_a_graph():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device visible")
    except cp.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device visible")
    from ds4bench.engine.graph_gpu import capture
    d = SD.Delay(SD.Slowdown("moe", 1.0), type("Ops", (), {"xp": cp})(), n_layer=2)

    def timed(fn, stream):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b) / 1e3

    s = cp.cuda.Stream(non_blocking=True)
    with s:
        d()                                                  # compiles; waits 0
        assert timed(d, s) < 5e-4
        graph, _ = capture(s, cp.cuda.MemoryPool(), d)       # captured before the calibration ...
        d.calibrate(0.004)                                   # ... replays the wait set after it
        assert 0.002 <= timed(d, s) < 0.0025                 # fraction 1 of 4 ms over 2 layers
        assert 0.002 <= timed(lambda: graph.launch(s), s) < 0.0025


def test_an_interrupted_multi_round_matrix_resumes_keeping_its_finished_rounds(tmp_path, monkeypatch, capsys):
    """In process, with the cell launcher replaced: the 4th round process is interrupted; three
    rounds stay in rounds.jsonl, the resume runs only the other three in the stored order, and
    each cell's record carries its three rounds; a failing round fails its cell and names it."""
    from ds4bench.harness import matrix as M
    from ds4bench.cli import main
    calls = []

    def fake(cell, out, fp, log, trace=None):
        calls.append(cell.cell_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        tps = 100.0 + len(calls)
        return ({"cell_id": cell.cell_id, "status": "ok", "decode_tps": tps, "prefill_tps": tps, "step_ms": [10.0],
                 "deterministic": True, "prompts": [{"tokens": [1, 2]}], "unavailable": {}, "verdict": "identical"}, "", 0.5)

    monkeypatch.setattr(M, "run_cell_process", fake)
    monkeypatch.setattr(M, "judge", lambda rec, *a, **k: rec)
    out = str(tmp_path / "runs")
    argv = ["matrix", "--backend", "numpy", "--cache", "q8,f32", "--batch", "1", "--rounds", "3", "--order", "abba",
            "--out", out, "--id", "r"]
    assert main(argv) == 130
    run = RunDir(Path(out) / "r")
    sched = run.meta()["schedule"]
    assert sched == [["tiny-f32-b1", "tiny-q8-b1"], ["tiny-q8-b1", "tiny-f32-b1"], ["tiny-f32-b1", "tiny-q8-b1"]]
    assert len(run.round_records()) == 3 and not run.records()
    first = list(calls)
    calls.clear()
    main(["matrix", "--resume", "r", "--out", out])
    assert first[:3] + calls == [c for rnd in sched for c in rnd]
    recs = {r["cell_id"]: r for r in run.records()}
    assert all(len(r["round_decode_tps"]) == 3 and r["rounds"] == 3 for r in recs.values())
    assert recs["tiny-q8-b1"]["round_slot"] == [1, 0, 1]

    def crash_second(cell, out, fp, log, trace=None):
        calls.append(cell.cell_id)
        if cell.cell_id == "tiny-q8-b1" and calls.count("tiny-q8-b1") == 2:
            return None, "simulated crash", 0.1
        return ({"cell_id": cell.cell_id, "status": "ok", "decode_tps": 1.0, "prefill_tps": 1.0, "step_ms": [1.0],
                 "deterministic": True, "prompts": [], "unavailable": {}, "verdict": "identical"}, "", 0.1)

    monkeypatch.setattr(M, "run_cell_process", crash_second)
    calls.clear()
    main(["matrix", "--backend", "numpy", "--cache", "q8,f32", "--batch", "1", "--rounds", "3", "--order", "abba",
          "--out", out, "--id", "c"])
    recs = {r["cell_id"]: r for r in RunDir(Path(out) / "c").records()}
    assert recs["tiny-q8-b1"]["status"] == "failed" and recs["tiny-q8-b1"]["error"].startswith("round 2 of 3:")
    assert calls.count("tiny-q8-b1") == 2 and calls.count("tiny-f32-b1") == 3 and recs["tiny-f32-b1"]["rounds"] == 3


def test_tree_sources_are_checked(tmp_path):
    from ds4bench.harness.trees import parse_trees, resolve
    assert parse_trees(["A=80a58af", "B=."]) == {"A": "80a58af", "B": "."}
    for bad, match in ((["A"], "LABEL=<path or commit>"), (["A=x", "A=y"], "given twice")):
        with pytest.raises(ValueError, match=match):
            parse_trees(bad)
    with pytest.raises(ValueError, match="not a ds4bench checkout"):
        resolve(str(tmp_path))
    assert resolve(str(REPO)) == (str(REPO.resolve()), None)


def test_generate_prints_tok_s_without_the_prime_pass_and_says_what_it_left_out(monkeypatch, capsys):
    from ds4bench import cli
    monkeypatch.setenv("DS4BENCH_SLOWDOWN", "moe:0.2")
    assert cli.main(["generate", "--preset", "tiny", "-n", "4", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "decode" in out[-2] and "tok/s" in out[-2]
    assert out[-1].startswith("--- not in tok/s: prime pass ") and "slowdown moe:0.2: +" in out[-1]


def test_a_cells_trees_run_next_to_each_other_and_abba_reverses_them():
    """With a tree axis one cell's trees are adjacent, so an ABBA schedule pairs A and B in
    neighbouring processes (a drift of the host's speed hits both alike)."""
    from ds4bench.harness.matrix import MatrixSpec, expand
    from ds4bench.harness.rounds import schedule
    from ds4bench.harness.trees import with_trees
    cells, _ = expand(MatrixSpec(caches=["q8", "f32"], batches=[1, 16]), "numpy")
    both = with_trees(cells, {"A": ".", "S": "."}, {"S": {"DS4BENCH_SLOWDOWN": "moe:0.05"}}, say=lambda *a: None)
    ids = [c.cell_id for c in both]
    assert ids[0] == "A-tiny-f32-b1" and both[0].is_baseline and not any(c.is_baseline for c in both[1:])
    for i in range(0, len(ids), 2):                     # pairs: the same cell, tree A then tree S
        assert ids[i][2:] == ids[i + 1][2:] and ids[i][0] == "A" and ids[i + 1][0] == "S"
    assert all(c.baseline_cell == "A-tiny-f32-b1" for c in both)
    assert [c.params["env"].get("DS4BENCH_SLOWDOWN") for c in both[:2]] == [None, "moe:0.05"]
    rounds = schedule(both, 3, "abba")
    assert rounds[1] == rounds[0][::-1] and rounds[2] == rounds[0]
