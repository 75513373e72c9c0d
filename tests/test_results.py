"""Run directories, printers, compare, and the record's provenance and GPU fields (no GPU needed)."""
import json
import sys
import types

import pandas as pd
import pytest

from ds4bench.harness import record as R
from ds4bench.harness import results as S
from ds4bench.engine.generate import Timing


def rec(cell_id, cache="f32", batch=1, verdict="identical", steps=(10.0, 11.0, 12.0), tps=100.0, sha="aa", **kw):
    r = R.CellRecord(run_id="r", cell_id=cell_id, key=f"cache={cache} batch={batch}", preset="tiny", cache=cache,
                     batch=batch, verdict=verdict, decode_tps=tps, prefill_tps=50.0, step_ms=list(steps),
                     prompts=[{"prompt_id": "p", "sha256": sha, "first_divergence": None, "max_dlogprob": 0.0}]).to_dict()
    r.update(kw)
    return r


def make_run(tmp_path, cells=("a", "b")):
    meta = {"spec": {"source": "test"}, "backend": "numpy", "backend_reason": "test", "notes": ["n1"],
            "thresholds": {"tol": 0.4}, "label": "tiny", "cells": [{"cell_id": c} for c in cells]}
    return S.RunDir.create(str(tmp_path), meta)


def test_append_survives_a_torn_line_and_keeps_the_last_record(tmp_path):
    run = make_run(tmp_path)
    run.append(rec("a", verdict="drift"))
    with open(run.path / "cells.jsonl", "ab") as fh:         # a runner killed mid-write
        fh.write(b'{"cell_id": "b", "verd')
    assert [r["cell_id"] for r in run.records()] == ["a"]
    run.append(rec("b"))
    run.append(rec("a", verdict="close"))
    got = run.records()
    assert [(r["cell_id"], r["verdict"]) for r in got] == [("a", "close"), ("b", "identical")]


def test_finalize_writes_table_summary_and_meta(tmp_path):
    run = make_run(tmp_path)
    run.append(rec("a"))
    run.append(rec("b", cache="q8", verdict="broken", verdict_reason="p: diverges"))
    recs = run.finalize("complete")
    df = pd.read_parquet(run.path / "cells.parquet")
    assert list(df.columns) == list(R.FIELDS) and len(df) == 2
    assert json.loads(df.loc[0, "step_ms"]) == [10.0, 11.0, 12.0]
    assert pd.read_csv(run.path / "cells.csv")["cache"].tolist() == ["f32", "q8"]
    meta = run.meta()
    assert meta["status"] == "complete" and meta["verdicts"]["broken"] == 1
    summary = (run.path / "summary.md").read_text()
    assert "| cache | verdict |" in summary and "BROKEN" in summary and "p: diverges" in summary
    assert S.gate(recs) == 1 and S.gate(recs[:1]) == 0
    assert not list(run.path.glob(".*tmp*"))                   # atomic writes leave no temporaries


def test_markdown_shows_only_varying_parameters():
    md = S.markdown_table([rec("a", batch=1), rec("b", batch=4)])
    head = md.splitlines()[2]
    assert "batch" in head and "| cache" not in head and "preset tiny" in md.splitlines()[0]
    assert S.render([rec("a")], "json").startswith("[")
    assert "cell_id" in S.render([rec("a")], "csv").splitlines()[0]
    with pytest.raises(ValueError, match="unknown format"):
        S.render([], "xml")


def test_compare_lists_correctness_changes_first_and_tests_speed():
    a = [rec("a", tps=100.0, round_decode_tps=[100.0, 101.0, 99.0, 100.5, 99.5]), rec("b", cache="q8", sha="bb")]
    b = [rec("a", tps=200.0, round_decode_tps=[200.0, 202.0, 198.0, 201.0, 199.0]),
         rec("b", cache="q8", sha="cc", verdict="broken"), rec("c", cache="f16")]
    res = S.compare(a, b)
    assert res["status"] == 1 and res["only_b"] == ["cache=f16 batch=1"]
    (ch,) = res["correctness"]
    assert ch["verdict_b"] == "broken" and ch["worse"] and ch["tokens_changed"] == ["p"]
    fast = next(s for s in res["speed"] if s["cell"] == "cache=f32 batch=1")
    assert fast["speedup"] == 2.0 and fast["change"] == "faster" and fast["p_value"] < 1e-6
    assert fast["ci"][0] > 1.9 and fast["rounds"] == (5, 5)
    one = next(s for s in res["speed"] if s["cell"] == "cache=q8 batch=1")      # one process per side
    assert one["change"] == "too few rounds" and one["p_value"] is None
    md = S.render_compare(res, "md")
    assert "too few rounds for a p-value" in md
    assert md.index("Correctness changes") < md.index("Speed") and "**broken**" in md
    same = S.compare(a, a)
    assert same["status"] == 0 and not same["correctness"]
    assert all(s["change"] == "same" for s in same["speed"] if s["p_value"] is not None)
    best = S.compare(a, [dict(a[0], pass_stat="best")])["speed"][0]    # best pass against median: no claim
    assert best["change"] == "n/a" and best["p_value"] is None and "pass_stat" in best["why"]
    assert "best in B (pass_stat)" in S.render_compare(S.compare(a, [dict(a[0], pass_stat="best")]), "md")


def test_compare_joins_runs_that_differ_in_a_toggle_and_says_so():
    """Two runs that differ only in the environment (a perf toggle) join cell by cell; the
    header says how their environments differ."""
    a = [rec("a", env={})]
    b = [rec("a", env={"DS4BENCH_UNFUSED": "all"}, sha="zz", verdict="broken")]
    res = S.compare(a, b)
    assert len(res["speed"]) == 1 and res["correctness"][0]["worse"]
    md = S.render_compare(res, "md", "fused", "unfused")
    assert 'environments differ: A {} ; B {"DS4BENCH_UNFUSED": "all"}'.replace(" ;", ";") in md


def test_records_naming_a_removed_kernel_variant_still_show_and_compare(tmp_path):
    """A toggle value the engine no longer has (DS4BENCH_Q8_KERNEL=staged, DS4BENCH_MOE_KERNEL=split)
    is a plain string in an old record: its run still loads, prints and compares."""
    old = rec("a", env={"DS4BENCH_Q8_KERNEL": "staged", "DS4BENCH_MOE_KERNEL": "split"})
    run = make_run(tmp_path, cells=("a",))
    run.append(old)
    got = run.records()
    assert got[0]["env"] == old["env"] and "identical" in S.markdown_table(got)
    assert len(S.compare([rec("a", env={})], got)["speed"]) == 1


def test_compare_refuses_runs_with_no_cell_in_common():
    """Nothing joined is a mistake (another preset, token count, ...), not 'no change'."""
    with pytest.raises(ValueError, match="no cell in common .* differ in n_gen 32 vs 8"):
        S.compare([rec("a", n_gen=32)], [rec("a", n_gen=8)])


def test_a_cell_records_the_engine_toggles_of_its_environment(monkeypatch, tmp_path):
    from ds4bench.harness.cell import run_cell
    from ds4bench.harness import matrix as M
    monkeypatch.setenv("DS4BENCH_UNFUSED", "rope")
    monkeypatch.setenv("DS4BENCH_UNRELATED", "x")
    spec = M.spec_from_mapping({"cache": ["f32"], "n": 2, "reps": 1}, "test")
    cells, _ = M.expand(spec, "numpy", "test")
    rec_ = run_cell(cells[0].params, str(tmp_path / "r.json"), str(tmp_path / "f.npz"))
    assert rec_["env"] == {"DS4BENCH_UNFUSED": "rope"}


def test_timing_reliability_flag():
    t = [Timing(1.0, 10, [0.1], [0.1] * 9, [1] * 9), Timing(1.0, 10, [0.1], [0.1] * 9, [1] * 9)]
    f = R.timing_fields(t, [])
    assert f["decode_tps"] == pytest.approx(10.0) and f["timing_reliable"] is True
    t[1] = Timing(1.0, 10, [0.1], [0.2] * 9, [1] * 9)
    f = R.timing_fields(t, [])
    assert f["timing_reliable"] is False and "spread" in f["timing_note"]
    assert R.timing_fields(t[:1], [])["timing_reliable"] is None
    assert R.timing_fields(t[:1], ["hw thermal"])["timing_reliable"] is False
    t.append(Timing(1.0, 10, [0.1], [0.125] * 9, [1] * 9))            # passes at 10, 5 and 8 tok/s
    assert R.timing_fields(t, [])["decode_tps"] == pytest.approx(8.0)
    assert R.timing_fields(t, [], "best")["decode_tps"] == pytest.approx(10.0)


def test_software_provenance_is_filled():
    sw, na = R.software()
    assert sw["python"] and sw["numpy"] and sw["packages"]["numpy"] == sw["numpy"]
    assert (sw.get("git_commit") is not None) or "git_commit" in na


def test_gpu_fields_are_none_with_a_reason_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)           # nvidia-ml-py not importable
    probe = R.GpuProbe()
    assert probe.handle is None and "not installed" in probe.reason
    fields, na = R.gpu_fields(probe, None, None, "")
    assert fields["gpu_name"] is None and "not installed" in na["gpu_name"]


class FakeNVML(types.SimpleNamespace):
    """The parts of pynvml the probe uses, for an H100-like card that throttles on power."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 2, 0
    nvmlClocksEventReasonSwPowerCap, nvmlClocksEventReasonHwSlowdown = 0x4, 0x8
    nvmlClocksEventReasonSwThermalSlowdown, nvmlClocksEventReasonHwThermalSlowdown = 0x20, 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
    NVMLError = RuntimeError

    def __init__(self):
        super().__init__(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                         nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetHandleByPciBusId=lambda b: "h",
                         nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3", nvmlSystemGetDriverVersion=lambda: "580.1",
                         nvmlSystemGetCudaDriverVersion_v2=lambda: 13000,
                         nvmlDeviceGetMaxClockInfo=lambda h, c: 2619, nvmlDeviceGetMemoryBusWidth=lambda h: 5120,
                         nvmlDeviceGetClockInfo=lambda h, c: 1980, nvmlDeviceGetTemperature=lambda h, s: 41,
                         nvmlDeviceGetPowerUsage=lambda h: 350000,
                         nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4 | 0x1,
                         nvmlDeviceGetUUID=lambda h: "GPU-0f1e2d3c", nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(
                             busId=b"00000000:19:00.0"))


def test_gpu_fields_from_nvml_and_roofline(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    probe = R.GpuProbe(interval_s=0.01)
    start = probe.sample()
    probe.start()
    probe.stop()
    fields, na = R.gpu_fields(probe, start, probe.sample(), "")
    assert fields["gpu_name"] == "NVIDIA H100 80GB HBM3" and fields["cuda_driver"] == "13.0"
    assert (fields["gpu_uuid"], fields["gpu_pci_bus_id"]) == ("GPU-0f1e2d3c", "00000000:19:00.0")
    assert fields["gpu_mem_bw_gbs"] == pytest.approx(3352.3, rel=1e-3)           # 2619 MHz x 5120 bit x 2
    assert fields["gpu_power_w_start"] == 350.0 and fields["gpu_throttle"] == ["power cap"] and not na
    from ds4bench.engine import config as C
    roof, rna = R.roofline_fields(C.preset("tiny"), 4, 100, 0.01, fields["gpu_mem_bw_gbs"], "")
    assert roof["bytes_per_token"] == roof["bytes_per_step"] / 4
    assert roof["roofline_pct"] == pytest.approx(100 * roof["bytes_per_step"] / 0.01 / 1e9 / 3352.3, rel=1e-3)
    cpu, cna = R.roofline_fields(C.preset("tiny"), 1, 100, 0.01, None, "numpy backend: no GPU")
    assert cpu["roofline_pct"] is None and cna["roofline_pct"] == "numpy backend: no GPU"


def test_nvml_without_a_driver_gives_a_reason():
    pytest.importorskip("pynvml")
    probe = R.GpuProbe()
    if probe.handle is not None:
        pytest.skip("this machine has a working NVML")
    assert probe.reason.startswith("NVML unavailable")


def test_no_speed_claim_across_gpu_models_unless_asked():
    """A ratio between an H100 cell and an H200 cell measures the cards, not the code: no claim,
    and the printed comparison says why, until --across-gpus asks for one."""
    rounds = dict(round_decode_tps=[100.0, 101.0, 99.0, 100.5, 99.5])
    a = [rec("a", gpu_name="NVIDIA H100 80GB HBM3", **rounds)]
    b = [rec("a", tps=200.0, gpu_name="NVIDIA H200", round_decode_tps=[200.0, 202.0, 198.0, 201.0, 199.0])]
    res = S.compare(a, b)
    assert res["speed"][0]["change"] == "n/a" and "different GPU models" in res["speed"][0]["why"]
    assert "no speed claim for" in S.render_compare(res, "md", "A", "B")
    assert S.compare(a, b, across_gpus=True)["speed"][0]["change"] == "faster"
    mixed = S.summary_md({"run_id": "x", "status": "complete", "cells": [{}, {}]}, a + b)
    assert "cells ran on 2 GPU models" in mixed


def test_no_speed_claim_for_cells_that_shared_their_gpu():
    """--gpus 0,0,0,0 runs four jobs on one GPU: their verdicts stand, their tok/s measure each
    other's load, so compare refuses the claim (even for a 2x change) and the summary says so."""
    a = [rec("a", round_decode_tps=[100.0, 101.0, 99.0, 100.5, 99.5])]
    b = [rec("a", tps=200.0, gpu_shared=4, round_decode_tps=[200.0, 202.0, 198.0, 201.0, 199.0])]
    res = S.compare(a, b)
    assert res["speed"][0]["change"] == "n/a" and "GPU shared by concurrent jobs in B (4 jobs)" in res["speed"][0]["why"]
    assert "no speed claim for" in S.render_compare(res, "md", "A", "B")
    assert S.compare(a, a)["speed"][0]["change"] == "same"
    note = S.summary_md({"run_id": "x", "status": "complete", "cells": [{}]}, b)
    assert "up to 4 jobs shared a GPU" in note


def test_records_older_than_the_engine_parameter_join_as_ours():
    old = rec("a")
    old.pop("engine", None)
    assert S.join_key(old) == S.join_key(rec("a")) and S.compare([old], [rec("a")])["speed"]
