"""ds4bench plot: the figures of a matrix run, their skip reasons, the asv reader and the CLI errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ds4bench.views import asvdata, plots
from ds4bench.cli import main
from ds4bench.harness.results import RunDir

RUNS = Path(__file__).resolve().parent.parent / "results" / "runs"
CPU_RUN, GPU_RUN = "20261125-213406-tiny-numpy", "20261125-h100-flash-4l-device"


def _run(name):
    run = RunDir.open(name, str(RUNS))
    return run.meta(), run.records()


def test_cpu_run_draws_scatter_and_says_why_no_roofline_or_stages(tmp_path):
    written, skipped = plots.plot_run(*_run(CPU_RUN), str(tmp_path))
    assert [p.name for p in written] == [f"{CPU_RUN}-scatter.png"]
    assert any("roofline" in s and "numpy backend" in s for s in skipped)
    assert any("stages" in s and "--stages" in s for s in skipped)


def test_gpu_run_draws_roofline(tmp_path):
    written, _ = plots.plot_run(*_run(GPU_RUN), str(tmp_path))
    assert {p.name for p in written} == {f"{GPU_RUN}-scatter.png", f"{GPU_RUN}-roofline.png"}
    assert all(p.stat().st_size > 10_000 for p in written)


def test_broken_cell_stands_out_and_stages_stack(tmp_path, monkeypatch):
    meta, recs = _run(CPU_RUN)
    recs = [dict(r) for r in recs]
    recs[1] = dict(recs[1], verdict="broken", median_dlogprob=4.0,
                   prompts=[dict(p, max_dlogprob=5.0) for p in recs[1]["prompts"]])
    for r in recs:
        r["stage_s"] = {"attn": 0.5, "moe": 0.25 * r["batch"], "head": 0.1}
    seen = []
    real = plots.plt.Axes.scatter

    def spy(ax, x, y, **kw):
        seen.append((list(x), list(y), kw))
        return real(ax, x, y, **kw)
    monkeypatch.setattr(plots.plt.Axes, "scatter", spy)
    written, skipped = plots.plot_run(meta, recs, str(tmp_path))
    assert f"{CPU_RUN}-stages.png" in {p.name for p in written}
    broken = [kw for x, y, kw in seen if y == [4.0]]
    assert broken and broken[0]["c"] == plots.VERDICT_COLOURS["broken"] and broken[0]["s"] > 100
    assert all(kw["s"] < broken[0]["s"] for x, y, kw in seen if y != [4.0])


def test_scatter_skips_a_run_without_comparisons(tmp_path):
    meta, recs = _run(CPU_RUN)
    with pytest.raises(plots.Skip, match="no cell"):
        plots.scatter(meta, [dict(r, decode_tps=None) for r in recs], tmp_path / "x.png")


def test_scatter_draws_the_limit_on_the_median_and_rings_unreliable_timing(tmp_path, monkeypatch):
    meta, recs = _run(CPU_RUN)
    recs = [dict(r, timing_reliable=i != 2) for i, r in enumerate(recs)]
    lines, rings = [], []
    monkeypatch.setattr(plots.plt.Axes, "axhline", lambda ax, y, **kw: lines.append((y, kw["label"])))
    real_plot = plots.plt.Axes.plot
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda ax, *a, **kw: rings.append(kw.get("label")) or
                        real_plot(ax, *a, **kw))
    fig_axes = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: fig_axes.append(fig.axes[0].get_ylabel()) or
                        real_save(fig, path))
    plots.scatter(meta, recs, tmp_path / "s.png")
    assert lines == [(meta["thresholds"]["tol"], f"tol {meta['thresholds']['tol']:g}: a median above is broken")]
    assert rings == ["timing UNRELIABLE (1)"]
    assert fig_axes == ["median |Δlogprob| vs baseline (nats)"]


def _asv_result(root: Path, commit: str, date: int, tps: list, div: list):
    (root / "m").mkdir(parents=True, exist_ok=True)
    (root / "m" / "machine.json").write_text(json.dumps({"machine": "m", "version": 1}))
    params = [["'tiny'"], ["'f32'", "'q8'"], ["'cpu'"], ["1"]]
    doc = {"commit_hash": commit, "date": date, "env_name": "existing-py", "version": 2,
           "result_columns": ["result", "params", "version"],
           "results": {plots.BENCH + "track_decode_tokens_per_s": [tps, params, "v"],
                       plots.BENCH + "track_first_divergence": [div, params, "v"],
                       plots.BENCH + "track_max_logprob_delta": [[0.0, 0.5], params, "v"]}}
    (root / "m" / f"{commit[:8]}-existing-py.json").write_text(json.dumps(doc))
    (root / "benchmarks.json").write_text(json.dumps(
        {plots.BENCH + "track_decode_tokens_per_s": {"param_names": ["preset", "cache", "placement", "batch"]}}))


def test_asv_history_orders_commits_and_reads_params(tmp_path):
    _asv_result(tmp_path, "b" * 40, 2000, [10.0, None], [16, 3])
    _asv_result(tmp_path, "a" * 40, 1000, [9.0, 12.0], [16, 16])
    got = asvdata.load(str(tmp_path))
    assert [c.commit[0] for c in got] == ["a", "b"]
    assert got[1].values[plots.BENCH + "track_decode_tokens_per_s"] == {("tiny", "f32", "cpu", 1): 10.0}
    path, commits = plots.history(str(tmp_path), tmp_path / "h.png")
    assert commits == ["a" * 40, "b" * 40] and path.stat().st_size > 10_000


def test_plot_asv_draws_each_machine_unless_one_is_named(tmp_path, capsys):
    _asv_result(tmp_path, "a" * 40, 1000, [9.0, 12.0], [16, 16])
    _asv_result(tmp_path, "b" * 40, 2000, [10.0, 11.0], [16, 3])
    shutil.copytree(tmp_path / "m", tmp_path / "n")
    (tmp_path / "n" / "machine.json").write_text(json.dumps({"machine": "n", "version": 1}))
    assert main(["plot", "--asv", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["asv-history-m.png", "asv-history-n.png"]
    assert main(["plot", "--asv", str(tmp_path), "--machine", "n", "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["asv-history-n.png"]


def test_asv_history_notes_each_correctness_change_once(tmp_path):
    _asv_result(tmp_path, "a" * 40, 1000, [9.0, 12.0], [16, 16])
    _asv_result(tmp_path, "b" * 40, 2000, [10.0, 11.0], [16, 3])
    _asv_result(tmp_path, "c" * 40, 3000, [10.0, 11.0], [16, 3])
    got = asvdata.load(str(tmp_path))
    key = plots.BENCH + "track_{}"
    div = [c.values[key.format("first_divergence")] for c in got]
    dlp = [c.values[key.format("max_logprob_delta")] for c in got]
    combos = [("tiny", "f32", "cpu", 1), ("tiny", "q8", "cpu", 1)]
    notes = plots.correctness_changes(combos, [0, 1, 2], div, dlp, pan=[0, 3])
    assert notes == {("tiny", 1): {1: {("tiny", "q8", "cpu", 1): "div 16→3, Δlp 0.5→0.5"}}}
    assert plots._change_lines(notes[("tiny", 1)][1], rest=[1, 2], style_of={"cpu": 0}) == \
        ["q8 (all): div 16→3, Δlp 0.5→0.5"]
    assert plots._change_lines(notes[("tiny", 1)][1], rest=[1, 2], style_of={"cpu": 0, "device": 1}) == \
        ["q8 (cpu): div 16→3, Δlp 0.5→0.5"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", "--run", "no-such-run", "--out", str(tmp_path)]) == 2
    assert "run 'no-such-run'" in capsys.readouterr().err
    assert main(["plot", "--asv", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no asv results" in capsys.readouterr().err
    assert main(["plot", "--out", str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_cli_plots_a_run_directory(tmp_path, capsys):
    shutil.copytree(RUNS / CPU_RUN, tmp_path / CPU_RUN, ignore=shutil.ignore_patterns("fingerprints"))
    assert main(["plot", "--run", str(tmp_path / CPU_RUN), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "scatter.png" in out and "roofline.png skipped" in out
    assert (tmp_path / "out" / f"{CPU_RUN}-scatter.png").is_file()
