"""Nsight Systems support on the CPU: finding nsys, parsing `nsys stats` CSVs captured from a
real traced run (tests/fixtures/nsys: flash-4l, device placement, batch 1, on an H100), the
record fields, the summary and compare views, and the whole `--trace` path with a stand-in
nsys (tests/fake_nsys.py) that runs the cell and serves those CSVs."""
import stat
import sys
from pathlib import Path

import pytest

from ds4bench.harness import matrix as M
from ds4bench.harness import nsys as N
from ds4bench.cli import main
from ds4bench.harness.results import RunDir, compare, render_compare, summary_md

FIX = Path(__file__).parent / "fixtures" / "nsys"
FAKE = Path(__file__).parent / "fake_nsys.py"


def csvs(case: str) -> dict:
    return {r: (FIX / f"{case}_{r}.csv").read_text() for r in N.REPORTS}


# ---- finding nsys ----------------------------------------------------------------------------
def _exe(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_nsys_from_the_variable_a_folder_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(N, "SEARCH", ())
    exe = _exe(tmp_path / "nsys")
    assert N.find_nsys({"NSYS": str(exe), "PATH": ""}) == str(exe)
    assert N.find_nsys({"NSYS": str(tmp_path), "PATH": ""}) == str(exe)
    assert N.find_nsys({"PATH": str(tmp_path)}) == str(exe)
    with pytest.raises(N.NsysError, match="NSYS=/nowhere is not an nsys executable"):
        N.find_nsys({"NSYS": "/nowhere", "PATH": str(tmp_path)})


def test_missing_nsys_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.setattr(N, "SEARCH", (str(tmp_path / "opt" / "*" / "bin" / "nsys"),))
    with pytest.raises(N.NsysError, match="not found on PATH.*set NSYS=/path/to/nsys"):
        N.find_nsys({"PATH": str(tmp_path)})
    (tmp_path / "opt" / "2025.1" / "bin").mkdir(parents=True)
    exe = _exe(tmp_path / "opt" / "2025.1" / "bin" / "nsys")
    assert N.find_nsys({"PATH": ""}) == str(exe)              # the usual install folders


def test_profile_command_captures_only_the_profiler_range():
    cmd = N.profile_command("nsys", "out/cell", ["python", "-m", "ds4bench", "cell"])
    assert cmd[:2] == ["nsys", "profile"] and cmd[-4:] == ["python", "-m", "ds4bench", "cell"]
    assert "--capture-range=cudaProfilerApi" in cmd and "--trace=cuda,nvtx" in cmd
    assert "--cuda-graph-trace=node" in cmd and cmd[cmd.index("--output") + 1] == "out/cell"


# ---- parsing the real CSVs -------------------------------------------------------------------
def test_ranges_from_a_real_trace():
    ms, calls = N.parse_nvtx_gpu(csvs("q8")["nvtx_gpu_proj_sum"])
    stages = {"decode", "prefill", "head", "hc_pre", "attn.q", "attn.kv", "compressor", "indexer",
              "attention", "attn.out", "moe.router", "moe.experts", "moe.shared"}
    assert stages | {f"layer.{i}" for i in range(4)} == set(ms)   # the engine's domain only, prefix gone
    assert not any(n.startswith("CCCL") for n in ms)             # CuPy's own ranges are dropped
    # the capture held the timed repetitions only: 3 reps x 3 smoke prompts, 16 tokens each
    # (the first comes from the prefill, 15 from decode steps); the prime pass is not in it
    assert calls["prefill"] == 3 * 3 and calls["decode"] == 3 * 3 * 15
    assert calls["layer.0"] == calls["decode"] + calls["prefill"]      # one layer.0 per forward
    assert calls["hc_pre"] == 2 * 4 * calls["layer.0"]                  # attention + FFN, 4 layers
    assert 0 < ms["moe.experts"] < ms["layer.0"] < ms["decode"]
    assert sum(ms[f"layer.{i}"] for i in range(4)) <= ms["decode"] + ms["prefill"]   # nested, in sequence


def test_top_kernels_and_their_shares():
    ks, total = N.parse_kernels(csvs("q8")["cuda_gpu_kern_sum"])
    assert len(ks) == N.TOP_KERNELS and total > 0
    assert [k["ms"] for k in ks] == sorted((k["ms"] for k in ks), reverse=True)
    names = {k["name"] for k in ks}
    assert {"matmul_q8_0", "moe_gate_up_iq2_xxs", "hc_weights"} <= names
    assert 0 < sum(k["share"] for k in ks) <= 1.0


def test_units_and_domain_prefixes():
    assert N._to_ms("Total Time (us)", "1,500") == 1.5 and N._to_ms("Total Time (ns)", "2000000") == 2.0
    assert N.range_name("ds4bench:layer.3") == "layer.3" and N.range_name(":head") == "head"
    assert N.read_csv("NOTICE: something\nA,B,C\n1,2,3\n") == [{"A": "1", "B": "2", "C": "3"}]
    with pytest.raises(N.NsysError, match="no column with 'total proj'"):
        N.parse_nvtx_gpu("Range,Style,Instances\nds4bench:decode,PushPop,3\n")


def test_summarize_fields_and_a_trace_without_ranges():
    f = N.summarize(csvs("f16"))
    assert set(f) == {"trace_gpu_ms", "trace_calls", "trace_kernels", "trace_kernel_ms"}
    assert f["trace_kernels"][0]["name"] == "matmul_f16w"          # the f16 cache's kernel leads
    with pytest.raises(N.NsysError, match="no NVTX ranges"):
        N.summarize({"nvtx_gpu_proj_sum": "", "cuda_gpu_kern_sum": csvs("q8")["cuda_gpu_kern_sum"]})


def test_range_deltas_put_the_biggest_change_first():
    rows = N.range_deltas({"a": 10.0, "b": 5.0, "c": 1.0}, {"a": 11.0, "b": 9.0, "d": 2.0})
    assert [r["range"] for r in rows] == ["b", "a", "c", "d"]
    assert rows[0]["delta_ms"] == 4.0 and rows[0]["delta_pct"] == 80.0 and rows[-1]["delta_ms"] is None


# ---- the --trace path end to end (numpy cells, stand-in nsys) ---------------------------------
def _traced_run(tmp_path, prompts, run_id, case, monkeypatch):
    monkeypatch.setenv("FAKE_NSYS_CASE", case)
    spec = M.spec_from_mapping({"cache": ["q8"], "n": 3, "reps": 1, "prompts": prompts}, "test")
    cells, notes = M.expand(spec, "numpy", "test")
    for c in cells:                       # the numpy backend skips traces; force them for the plumbing
        c.params.update(trace=True, nvtx=True)
    run = RunDir.create(str(tmp_path / "runs"), {"spec": spec.to_dict(), "backend": "numpy", "notes": notes,
                                                 "thresholds": {}, "cells": [vars(c) for c in cells]}, run_id)
    fake = _exe(tmp_path / "nsys")
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    recs = M.run_matrix(cells, run, nsys=str(fake))
    run.finalize("complete")
    return run, recs


def test_matrix_trace_fills_the_record_summary_and_compare(tmp_path, monkeypatch, capsys):
    p = tmp_path / "prompts.toml"
    p.write_text('[[prompt]]\nid = "hi"\nkind = "smoke"\ntext = "Hello."\n')
    ra, recs_a = _traced_run(tmp_path, str(p), "a", "q8", monkeypatch)
    rb, recs_b = _traced_run(tmp_path, str(p), "b", "f16", monkeypatch)
    for rec in recs_a + recs_b:
        assert rec["status"] == "ok" and rec["trace"] and rec["nvtx"]
        assert rec["trace_file"] == f"traces/{rec['cell_id']}.nsys-rep"
        assert (ra.path if rec in recs_a else rb.path).joinpath(rec["trace_file"]).is_file()
        assert rec["trace_gpu_ms"]["decode"] > 0 and rec["trace_kernels"]
        assert not {k for k in rec["unavailable"] if k.startswith("trace")}
    md = (ra.path / "summary.md").read_text()
    assert "## GPU time per range (Nsight Systems)" in md and "| moe.experts |" in md
    assert "GPU span per decode step" in md and "GPU busy %" in md and "`matmul_f16w`" in md
    res = compare(recs_a, recs_b)
    assert res["ranges"] and res["ranges"][0]["ranges"][0]["delta_ms"] is not None
    out = render_compare(res, "md", "a", "b")
    assert "## GPU time per range" in out and "| attn.out |" in out
    from ds4bench.views.plots import plot_run
    written, _ = plot_run(ra.meta(), recs_a, str(tmp_path / "plots"))
    assert any(p.name.endswith("-trace.png") and p.stat().st_size > 10_000 for p in written)
    capsys.readouterr()
    main(["show", str(ra.path)])
    assert "GPU time per range (Nsight Systems)" in capsys.readouterr().out


def test_stats_never_reads_an_older_runs_csv(tmp_path):
    """A report whose `nsys stats` writes nothing fails, even with CSVs of an earlier run beside it."""
    rep = tmp_path / "cell.nsys-rep"
    rep.write_bytes(b"report")
    for name in N.REPORTS:
        (tmp_path / f"cell_{name}.csv").write_text(csvs("q8")[name])
    quiet = _exe(tmp_path / "nsys")
    quiet.write_text("#!/bin/sh\necho nothing to export >&2\nexit 1\n")
    with pytest.raises(N.NsysError, match="nsys stats wrote no nvtx_gpu_proj_sum, cuda_gpu_kern_sum .*nothing to export"):
        N.run_stats(str(quiet), rep)


def test_a_failed_trace_is_said_and_the_cell_kept(tmp_path):
    rec = {"unavailable": {}}
    M.add_trace(rec, tmp_path, ("nsys", tmp_path / "missing"))
    assert "no report" in rec["unavailable"]["trace_gpu_ms"] and "trace_gpu_ms" not in rec
    md = summary_md({"run_id": "r", "cells": []}, [{**rec, "trace": True, "key": "cache=q8", "prompts": [],
                                                    "verdict": "identical"}])
    assert "no trace: " in md


def test_trace_needs_the_gpu_backend(capsys):
    assert main(["trace", "--backend", "numpy", "--cache", "q8"]) == 2
    assert "trace needs the GPU backend" in capsys.readouterr().err


def test_matrix_trace_on_the_cpu_is_skipped_with_a_note():
    spec = M.spec_from_mapping({"cache": ["q8"], "trace": True}, "test")
    cells, notes = M.expand(spec, "numpy", "test")
    assert any("trace skipped" in n for n in notes) and not any(c.params["trace"] for c in cells)
    spec = M.spec_from_mapping({"cache": ["q8"], "trace": True}, "test")
    cells, _ = M.expand(spec, "cupy", "test")
    assert all(c.params["trace"] and c.params["nvtx"] for c in cells)


def test_nvtx_axis_expands_and_names_cells():
    spec = M.spec_from_mapping({"cache": ["q8"], "nvtx": [False, True]}, "test")
    cells, _ = M.expand(spec, "numpy", "test")
    assert [c.cell_id for c in cells] == ["tiny-f32-b1", "tiny-q8-b1", "tiny-q8-b1-nvtx"]
    assert cells[2].key == "cache=q8 nvtx=on" and cells[0].key == "cache=f32 nvtx=off"
    with pytest.raises(ValueError, match="nvtx='maybe': use on or off"):
        M.spec_from_mapping({"exclude": [{"nvtx": "maybe"}]}, "test")


def test_trace_command_runs_one_cell_under_nsys(tmp_path, monkeypatch, capsys):
    """`ds4bench trace` on a (pretend) GPU: one cell, its own baseline, wrapped in nsys; axes not
    given take the spec's first value; several values are refused with one line."""
    seen = []

    def fake_cell(cell, out, fp, log, trace=None):
        seen.append((cell, trace))
        return None, "stopped here", 0.0

    monkeypatch.setattr(M, "resolve_backend", lambda req: ("cupy", "pretend GPU"))
    monkeypatch.setattr(M, "prepare_models", lambda cells, say=None: None)
    monkeypatch.setattr(M, "run_cell_process", fake_cell)
    monkeypatch.setattr(N, "find_nsys", lambda env=None: "/opt/nsys")
    out = str(tmp_path / "runs")
    assert main(["trace", "--cache", "q8", "--out", out, "--id", "t"]) == 1        # the fake cell failed
    (cell, trace), = seen
    assert cell.cell_id == "flash-4l-q8-device-b1-nvtx" and cell.is_baseline
    assert cell.params["trace"] and cell.params["nvtx"] and trace[0] == "/opt/nsys"
    assert str(trace[1]).endswith("t/traces/flash-4l-q8-device-b1-nvtx")
    assert main(["trace", "--cache", "q8,f16", "--out", out]) == 2
    assert "trace runs one cell; these options give 2" in capsys.readouterr().err
