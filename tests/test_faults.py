"""The injected faults (ds4bench/engine/faults.py): each changes the output of its stage, on the same
input, by clearly more than what the q8 mode already costs against f32 there; the selection is
strict and explicit (an engine without `faults=` never carries one); every CUDA twin compiles;
on a GPU each twin changes its kernel's output as its NumPy twin does; and the faults suite
(`ds4bench faults --spec faults-tiny`) catches every fault without flagging a healthy cell."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ds4bench.engine import faults as FL
from ds4bench.engine.generate import Engine
from ds4bench.engine.model import DS4Model
from ds4bench.engine.options import EngineOptions
from ds4bench.engine.ops_ref import RefOps
from tests.engine_util import tiny_model
from tests.test_kernels_compile import NVCC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nmse(a, b) -> float:
    a, b = (np.asarray(v.get() if hasattr(v, "get") else v, dtype=np.float64) for v in (a, b))
    return float(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-300))


# ---- each fault's stage, called on fixed inputs ----------------------------------------------------
def _inputs(cfg, xp):
    rng = np.random.default_rng(7)
    H, K, W, D = cfg.n_head, cfg.head_dim, cfg.sliding_window, cfg.n_embd
    A = cfg.n_expert_used
    N = 6
    f = lambda *s, std=1.0: xp.asarray((rng.standard_normal(s) * std).astype(np.float32))    # noqa: E731
    sel = np.stack([rng.choice(cfg.n_expert, A, replace=False) for _ in range(N)])
    T = 8
    xs = {n: f(N, n) for n in sorted({t.spec.shape[-1] for t in tiny_model().tensors.values()})}
    return SimpleNamespace(
        N=N, x=xs.__getitem__, sel=xp.asarray(sel), w=xp.asarray(rng.uniform(0.2, 1.0, (N, A)).astype(np.float32)),
        kv=f(N, K, std=3.0), score=xp.asarray(rng.standard_normal((1, 4, 40))),
        visible=xp.ones((1, 4, 40), dtype=bool),
        # attention: a window ring of W raw rows, T new rows past the window, H heads
        raw=f(1, W, K), new=f(1, T, K), q=f(1, T, H, K, std=0.3), sinks=f(H, std=2.0), P=np.arange(W + 8, W + 8 + T)[None],
        # compressor: a ratio-4 ring of 8 rows and one new row that completes a window (not the first)
        ring_k=f(1, 8, 2 * K), ring_s=f(1, 8, 2 * K), ck=f(1, 1, 2 * K), cs=f(1, 1, 2 * K), Pc=np.array([[11]]),
        mix=f(N, cfg.hc_streams * (cfg.hc_streams + 2), std=2.0), rope_x=f(N, H, K))


def _linear(tensor, arg):
    return lambda ops, net, a: ops.linear(tensor, a.x(ops.model[tensor].spec.shape[1]))


def _experts(ops, net, a):
    return ops.experts(2, a.x(ops.cfg.n_embd), a.sel, a.w)


def _attention(ops, net, a):
    net._memo, net._im = {}, np
    keys, mask = net.attention_keys(SimpleNamespace(raw=a.raw), a.new, a.P, None)
    return net.attend(a.q, keys, mask, a.sinks)


def _pool(ops, net, a):
    net._memo, net._im = {}, np
    eb, et = np.nonzero((a.Pc + 1) % 4 == 0)
    return net._pool(a.ring_k, a.ring_s, a.ck, a.cs, a.Pc, eb, et, 4, ops.cfg.head_dim)


def _hc(ops, net, a):
    S = ops.cfg.hc_streams
    xp = ops.xp
    pre, post, comb = net._hc_weights(a.mix, xp.ones(3, dtype=xp.float32), xp.zeros(S * (S + 2), dtype=xp.float32))
    return comb


STAGE_CALLS = {
    "q8-scale-subset": _linear("blk.0.attn_output_b.weight", None),
    "q8-scale-drift": _linear("blk.0.attn_q_a.weight", None),
    "q8-act-block": _linear("blk.0.attn_q_a.weight", None),
    "head-scale-subset": _linear("output.weight", None),
    "iq2-sign": _experts,
    "q2k-dmin": _experts,
    "moe-wrong-weight": _experts,
    "attn-sink-dropped": _attention,
    "attn-window": _attention,
    "rope-compressed-base": lambda ops, net, a: net._rope(a.rope_x, np.arange(a.N)[:, None] + 100, net.inv_freq[True]),
    "fp8-kv-truncate": lambda ops, net, a: ops.kv_round(a.kv),
    "compressor-overlap": _pool,
    "indexer-topk": lambda ops, net, a: ops.topk_mask(a.score, a.visible, 16).astype(np.float64),
    "hc-sinkhorn": _hc,
}


def test_every_fault_has_a_stage_call_and_a_known_stage():
    assert set(STAGE_CALLS) == set(FL.FAULTS)
    assert len(FL.FAULTS) >= 10
    for f in FL.FAULTS.values():
        assert f.stages and set(f.stages) <= set(FL.STAGES), f
        assert f.numpy and (f.cuda or f.host), f
        assert not f.cuda or os.path.isfile(os.path.join(REPO, f.cuda)), f


@pytest.fixture(scope="module")
def healthy():
    mf = tiny_model()
    out = {}
    for cache in ("q8", "f32"):
        ops = RefOps(mf, cache)
        out[cache] = (ops, DS4Model(mf.cfg, ops))
    return out


@pytest.mark.parametrize("name", list(FL.FAULTS))
def test_fault_changes_its_stage_beyond_the_q8_cost(name, healthy):
    """Same input, same mode: the faulted stage differs from the healthy one by at least 5x the
    q8-vs-f32 difference of that stage (and by 1e-6 where the modes agree: float stages)."""
    mf = tiny_model()
    call = STAGE_CALLS[name]
    a = _inputs(mf.cfg, np)
    ref = call(*healthy["q8"], a)
    q8_cost = nmse(ref, call(*healthy["f32"], a))
    ops = RefOps(mf, "q8", faults=frozenset({name}))
    err = nmse(call(ops, DS4Model(mf.cfg, ops, faults=frozenset({name})), a), ref)
    assert err >= max(5 * q8_cost, 1e-6), f"{name}: NMSE {err:.2e} against the q8 cost {q8_cost:.2e}"


def test_fault_selection_is_strict():
    assert FL.from_env({}) == frozenset()
    assert FL.from_env({"DS4BENCH_FAULT": " q8-act-block, hc-sinkhorn ,"}) == {"q8-act-block", "hc-sinkhorn"}
    with pytest.raises(ValueError) as e:
        FL.from_env({"DS4BENCH_FAULT": "q8-act-block,nope"})
    msg = str(e.value)
    assert "\n" not in msg and "unknown fault nope" in msg and "hc-sinkhorn" in msg
    from ds4bench.engine.options import check_engine_env
    with pytest.raises(ValueError, match="DS4BENCH_FAULT: unknown fault nope"):
        check_engine_env({"DS4BENCH_FAULT": "nope"})
    from ds4bench.engine.options import ENGINE_ENV
    assert "DS4BENCH_FAULT" in ENGINE_ENV


def test_cli_rejects_an_unknown_fault_in_one_line():
    env = {**os.environ, "PYTHONPATH": REPO, "DS4BENCH_FAULT": "q8-typo"}
    r = subprocess.run([sys.executable, "-m", "ds4bench", "generate", "--preset", "tiny", "-n", "1", "-p", "hi"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "DS4BENCH_FAULT: unknown fault q8-typo" in lines[0]


def test_faults_never_leak_into_an_engine_built_without_them(monkeypatch):
    """The environment is read by the CLI and the cell only: an Engine built without `faults=`
    (the probe's reference, in the same process) is healthy even with DS4BENCH_FAULT set, and
    after a faulted engine of the same model."""
    mf = tiny_model()
    ids = np.arange(3, 40)[None]

    def logits(eng):
        return eng.net.forward(eng.state, ids, np.array([0]))

    clean = logits(Engine(mf, mode="q8", ctx=64))
    monkeypatch.setenv("DS4BENCH_FAULT", "q8-act-block")
    bad = Engine(mf, mode="q8", ctx=64, faults=FL.from_env(os.environ))
    assert bad.faults == {"q8-act-block"} and bad.ops.faults == bad.net.faults == bad.faults
    assert nmse(logits(bad), clean) > 1e-3
    again = Engine(mf, mode="q8", ctx=64)
    assert again.faults == again.ops.faults == again.net.faults == frozenset()
    np.testing.assert_array_equal(logits(again), clean)
    with pytest.raises(ValueError, match="ops carry faults"):
        Engine(mf, mode="q8", ctx=64, ops=bad.ops)


def test_kernel_defines_follow_the_table():
    assert FL.defines(frozenset(), "q8_0.cu") == ()
    assert FL.defines({"q8-scale-subset"}, "q8_0.cu", "blk.0.attn_output_b.weight") == ("-DDS4_FAULT_Q8_SCALE_SUBSET",)
    assert FL.defines({"q8-scale-subset"}, "q8_0.cu", "output.weight") == ()
    assert FL.defines({"head-scale-subset", "q8-scale-drift"}, "q8_0.cu", "output.weight") == (
        "-DDS4_FAULT_Q8_SCALE_DRIFT", "-DDS4_FAULT_Q8_SCALE_SUBSET_HEAD")
    assert FL.defines({"iq2-sign", "hc-sinkhorn"}, "moe.cu") == ("-DDS4_FAULT_IQ2_SIGN",)
    for f in FL.FAULTS.values():                      # every define is spelled in its kernel file
        if f.cuda:
            assert f"#ifdef {f.define}" in open(os.path.join(REPO, f.cuda)).read(), f.name


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", [n for n, f in FL.FAULTS.items() if f.cuda])
def test_fault_variant_compiles_sm90(name, tmp_path):
    f = FL.FAULTS[name]
    kdir = os.path.join(REPO, "kernels")
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", f"-I{kdir}", f"-D{f.define}", "-c",
                        os.path.join(REPO, f.cuda), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]


# ---- GPU: each CUDA twin against the healthy kernel and its NumPy twin ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n, f in FL.FAULTS.items() if f.cuda or f.host])
def test_gpu_fault_twin(name):
    """On the GPU, the faulted stage differs from the healthy GPU stage, the healthy GPU stage
    still matches the healthy NumPy stage, and the faulted GPU stage matches the faulted NumPy
    stage: the kernel twin makes the same mistake."""
    cp = pytest.importorskip("cupy")
    from ds4bench.engine.generate import gpu_unavailable_reason
    if gpu_unavailable_reason():
        pytest.skip(gpu_unavailable_reason())
    from ds4bench.engine.ops_gpu import GpuOps
    mf = tiny_model()
    call = STAGE_CALLS[name]
    fs = frozenset({name})
    out = {}
    for key, xp, faults in (("cpu", np, frozenset()), ("cpu_f", np, fs), ("gpu", cp, frozenset()), ("gpu_f", cp, fs)):
        ops = RefOps(mf, "q8", faults=faults) if xp is np else GpuOps(mf, EngineOptions(mode="q8", backend="cupy", faults=faults))
        out[key] = call(ops, DS4Model(mf.cfg, ops, faults=faults), _inputs(mf.cfg, xp))
    assert nmse(out["gpu_f"], out["gpu"]) > 1e-6, name
    assert nmse(out["gpu"], out["cpu"]) < 1e-9, name
    assert nmse(out["gpu_f"], out["cpu_f"]) < 1e-9, name


# ---- the faults suite on tiny ------------------------------------------------------------------------
def test_faults_suite_catches_every_fault(tmp_path):
    """`ds4bench faults --spec faults-tiny` (the CI run): every fault is broken, no healthy cell is.
    Through the pool executor, two cells at a time, as the GPU sweep runs its cells."""
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("DS4BENCH_FAULT", None)
    r = subprocess.run([sys.executable, "-m", "ds4bench", "faults", "--spec", "faults-tiny", "--out", str(tmp_path),
                        "--id", "ci", "--executor", "pool", "--workers", "2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    table = (tmp_path / "ci" / "confusion.md").read_text()
    rows = json.loads((tmp_path / "ci" / "confusion.json").read_text())
    escaped = [x["fault"] for x in rows["faults"] if not x["caught"]]
    flagged = [x["cell"] for x in rows["healthy"] if x["broken"]]
    assert not escaped and not flagged, f"escaped: {escaped}; healthy flagged broken: {flagged}\n{table}"
    assert r.returncode == 0, r.stderr[-2000:]


# ---- the env axis of the matrix ------------------------------------------------------------------
def test_env_axis_expands_keys_baseline_and_excludes(monkeypatch):
    from ds4bench.harness import matrix as M
    spec = M.spec_from_mapping({"preset": ["tiny"], "cache": ["q8", "f32"], "prompts": "smoke",
                                "env_axis": {"DS4BENCH_FAULT": ["unset", "q8-act-block"], "OMP_NUM_THREADS": ["1", "2"]},
                                "exclude": [{"cache": "f32", "env.DS4BENCH_FAULT": "q8-act-block"}]}, "test")
    cells, _ = M.expand(spec, "numpy")
    assert len(cells) == 2 * 2 * 2 - 2
    base = cells[0]
    assert base.is_baseline and base.params["cache"] == "f32" and base.params["env"] == {"OMP_NUM_THREADS": "1"}
    assert base.params["env_unset"] == ["DS4BENCH_FAULT"]
    faulted = [c for c in cells if c.params["env"].get("DS4BENCH_FAULT") == "q8-act-block"]
    assert {c.params["cache"] for c in faulted} == {"q8"} and len(faulted) == 2
    assert "env.DS4BENCH_FAULT=q8-act-block" in faulted[0].key and "env.OMP_NUM_THREADS=" in faulted[0].key
    assert len({c.cell_id for c in cells}) == len(cells)
    # unset removes a variable the shell has; a value replaces it
    monkeypatch.setenv("DS4BENCH_FAULT", "hc-sinkhorn")
    assert "DS4BENCH_FAULT" not in M._child_env(M.cell_env(base))
    assert M._child_env(M.cell_env(faulted[0]))["DS4BENCH_FAULT"] == "q8-act-block"
    # a baseline may name the axis
    spec.baseline = {"cache": "q8", "env.DS4BENCH_FAULT": "q8-act-block"}
    M.validate(spec)
    cells, _ = M.expand(spec, "numpy")
    assert cells[0].params["env"]["DS4BENCH_FAULT"] == "q8-act-block" and cells[0].params["cache"] == "q8"


@pytest.mark.parametrize("doc, msg", [
    ({"env_axis": {"DS4BENCH_FAULT": ["unset", "nope"]}}, "unknown fault nope"),
    ({"env_axis": {"DS4BENCH_FAULTS": ["x"]}}, "DS4BENCH_FAULTS is not an engine toggle"),
    ({"env_axis": {"DS4BENCH_FAULT": []}}, "non-empty list"),
    ({"env_axis": {"X": ["1"]}, "env": {"X": "2"}}, "both fixed"),
    ({"exclude": [{"env.X": "1"}]}, "are not axes"),
])
def test_env_axis_errors_name_the_problem(doc, msg):
    from ds4bench.harness import matrix as M
    with pytest.raises(ValueError, match=msg):
        M.spec_from_mapping({"preset": ["tiny"], "prompts": "smoke", **doc}, "test")


def test_cli_env_option_and_faults_list():
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "ds4bench", "matrix", "--backend", "numpy", "--env", "DS4BENCH_FAULT",
                        "--out", "/nonexistent"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and "--env 'DS4BENCH_FAULT': expected VAR=value" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ds4bench", "faults", "--list"], capture_output=True, text=True,
                       env=env, cwd=REPO)
    assert r.returncode == 0 and all(f"`{n}`" in r.stdout for n in FL.FAULTS)


def test_fault_specs_cover_the_catalogue():
    from ds4bench.harness import matrix as M
    for name in ("faults-tiny", "faults-gpu"):
        spec = M.load_spec(name)
        assert spec.env_axis["DS4BENCH_FAULT"] == ["unset", *FL.FAULTS], name
        cells, _ = M.expand(spec, "numpy")
        faulted = [c for c in cells if "DS4BENCH_FAULT" in c.params["env"]]
        assert {c.params["cache"] for c in faulted} == {"q8"} and cells[0].params["env_unset"] == ["DS4BENCH_FAULT"]


def test_report_on_a_partial_run_says_what_is_missing(tmp_path):
    """`ds4bench faults --report RUN` writes the table of a run as it stands, running nothing: a
    run stopped early (a call's deadline) says how many cells have no record and how to finish
    them, and exits 1 even when the cells it has are all caught."""
    import shutil
    src = Path(REPO) / "results" / "runs" / "20261204-1754-h200-faults-q8-s0"
    run = tmp_path / "partial"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("confusion.*", "cells.parquet", "cells.csv"))
    lines = (run / "cells.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    keep = [x for x, r in zip(lines, recs) if r["verdict"] == "broken" or not (r.get("env") or {}).get("DS4BENCH_FAULT")]
    (run / "cells.jsonl").write_text("\n".join(keep) + "\n")
    planned = len(json.loads((run / "run.json").read_text())["cells"])
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "ds4bench", "faults", "--report", str(run)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    md = (run / "confusion.md").read_text()
    assert f"partial: {planned - len(keep)} of {planned} cells have no record" in md
    assert "faults --resume partial" in md and "escaped" not in md and "falsely broken (" not in md
    assert md in r.stdout
    r = subprocess.run([sys.executable, "-m", "ds4bench", "faults", "--report", str(run), "--resume", "x"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "drop --resume" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ds4bench", "faults", "--report", str(tmp_path / "none")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no run.json" in r.stderr


def test_confusion_table_marks_escapes_and_false_alarms():
    from ds4bench.cli_faults import confusion, confusion_md
    recs = [{"key": "f32", "env": {}, "verdict": "identical"},
            {"key": "q8", "env": {}, "verdict": "broken"},
            {"key": "a", "env": {"DS4BENCH_FAULT": "attn-window"}, "verdict": "broken", "verdict_stage": "attention",
             "verdict_layer": 0},
            {"key": "b", "env": {"DS4BENCH_FAULT": "hc-sinkhorn"}, "verdict": "drift"}]
    t = confusion(recs)
    assert t["escaped"] == ["hc-sinkhorn"] and t["false_broken"] == ["q8"]
    assert t["faults"][0]["stage_match"] is True and t["faults"][1]["stage_match"] is None
    md = confusion_md(t, "r")
    assert "1 of 2 faults caught; escaped: hc-sinkhorn; 1 of 2 healthy cells falsely broken (q8)" in md
