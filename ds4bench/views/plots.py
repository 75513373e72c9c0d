"""Figures of the benchmark results, written as PNGs (matplotlib, Agg).

    history    decode tokens/s of every asv cell across commits; a commit where a cell's
               correctness tracks (first divergence, max |Δlogprob|) change is marked on the line
    scatter    one matrix run: decode tokens/s against the median |Δlogprob| that the verdict limits
               (its `tol` drawn), coloured by verdict, UNRELIABLE timing ringed
    roofline   one GPU matrix run: % of the bandwidth roofline per cache mode and placement, by batch
    stages     one matrix run recorded with --stages: per-stage seconds stacked per cell (leaf stages)
    trace      one matrix run recorded with --trace: GPU ms per engine range (Nsight Systems)

Each function returns what it drew or raises `Skip` with the reason a figure cannot be drawn
from these data (a CPU run has no roofline, a run without --stages no stage times); titles
name the model, the card and the commit. The library never prints: the CLI reports skips.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import asvdata  # noqa: E402

DEFAULT_OUT = "results/plots"
BENCH = "bench_decode.Generation."
VERDICT_COLOURS = {"identical": "#2b8a3e", "close": "#74b816", "drift": "#f59f00", "broken": "#e03131",
                   "failed": "#862e9c", None: "#868e96"}


class Skip(Exception):
    """A figure that these data cannot give; the message says why."""


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- one matrix run --------------------------------------------------------------------------
def run_title(meta: dict, recs: list[dict], what: str) -> str:
    r = next((x for x in recs if x.get("status") == "ok"), recs[0])
    model = r.get("preset") or Path(r.get("model_file") or "?").stem
    card = r.get("gpu_name") or f"CPU ({r.get('cpu') or '?'})"
    commit = (r.get("git_commit") or (r.get("env") or {}).get("DS4BENCH_COMMIT") or "")[:8] or "commit n/a"
    return f"{what}\n{model} · {card} · {commit}{' (dirty)' if r.get('git_dirty') else ''} · run {meta.get('run_id', '')}"


def _label(r: dict) -> str:
    return " ".join(str(x) for x in (r.get("cache"), r.get("placement"), f"b{r.get('batch')}",
                                     "nvtx" if r.get("nvtx") and not r.get("trace") else None) if x)


def _max_dlp(r: dict) -> float | None:
    v = [p["max_dlogprob"] for p in r.get("prompts", []) if p.get("max_dlogprob") is not None]
    return max(v) if v else None


def _med_dlp(r: dict) -> float | None:
    return r.get("median_dlogprob")


def scatter(meta: dict, recs: list[dict], path: Path) -> Path:
    """Decode tokens/s against the cell's median |Δlogprob| (the statistic the verdict's `tol`
    limits, drawn as a dashed line), a thin line up to the cell's max |Δlogprob|; broken cells in
    red, large, labelled in bold; cells whose timing is UNRELIABLE ringed and labelled so."""
    pts = [r for r in recs if r.get("decode_tps") is not None and _med_dlp(r) is not None]
    if not pts:
        raise Skip("no cell has both decode tokens/s and a comparison with the baseline")
    stack = _label_stack(pts)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for verdict in dict.fromkeys(r.get("verdict") for r in pts):
        sub = [r for r in pts if r.get("verdict") == verdict]
        bad = verdict in ("broken", "failed")
        ax.scatter([r["decode_tps"] for r in sub], [_med_dlp(r) for r in sub], s=160 if bad else 60,
                   c=VERDICT_COLOURS.get(verdict, "#868e96"), marker="X" if bad else "o", edgecolors="black",
                   linewidths=0.6, label=f"{verdict or 'not judged'} ({len(sub)})", zorder=3)
        for r in sub:
            shaky = r.get("timing_reliable") is False
            ax.annotate(_label(r) + (" · timing UNRELIABLE" if shaky else ""), (r["decode_tps"], _med_dlp(r)),
                        textcoords="offset points",
                        xytext=(6, 5 + 9 * stack[id(r)]), fontsize=8, fontweight="bold" if bad else "normal",
                        color=VERDICT_COLOURS["broken"] if bad else "black")
    spans = [r for r in pts if (_max_dlp(r) or 0) > _med_dlp(r)]
    if spans:
        ax.vlines([r["decode_tps"] for r in spans], [_med_dlp(r) for r in spans], [_max_dlp(r) for r in spans],
                  colors="#495057", linewidths=0.8, zorder=2, label="up to the cell's max |Δlogprob|")
    shaky = [r for r in pts if r.get("timing_reliable") is False]
    if shaky:
        ax.plot([r["decode_tps"] for r in shaky], [_med_dlp(r) for r in shaky], linestyle="none", marker="o",
                markersize=17, markerfacecolor="none", markeredgecolor="#f08c00", markeredgewidth=1.5,
                zorder=4, label=f"timing UNRELIABLE ({len(shaky)})")
    tol = (meta.get("thresholds") or {}).get("tol")
    if tol is not None:
        ax.axhline(tol, color=VERDICT_COLOURS["broken"], linestyle="--", linewidth=1,
                   label=f"tol {tol:g}: a median above is broken")
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("decode throughput (tokens/s, log scale)")
    ax.set_ylabel("median |Δlogprob| vs baseline (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="verdict", loc="best", fontsize=8)
    ax.set_title(run_title(meta, recs, "speed vs correctness per cell"), fontsize=10)
    return _save(fig, path)


def _label_stack(pts: list[dict]) -> dict[int, int]:
    """How many lines up each point's label goes so labels of near points do not overprint:
    points within a factor of two in tokens/s and at nearly the same |Δlogprob| stack their labels."""
    import math
    top = max((_max_dlp(r) for r in pts), default=0.0) or 1.0
    placed: list[tuple[float, float, int]] = []
    out = {}
    for r in sorted(pts, key=lambda r: (_max_dlp(r), r["decode_tps"])):
        x, y = math.log10(max(r["decode_tps"], 1e-9)), _max_dlp(r) / top
        taken = {k for px, py, k in placed if abs(px - x) < 0.3 and abs(py - y) < 0.1}
        k = next(i for i in range(len(pts) + 1) if i not in taken)
        placed.append((x, y, k))
        out[id(r)] = k
    return out


def _groups(recs: list[dict]) -> tuple[list[str], list[int]]:
    modes = list(dict.fromkeys(" ".join(x for x in (r.get("cache"), r.get("placement")) if x) for r in recs))
    return modes, sorted({int(r["batch"]) for r in recs})


def roofline(meta: dict, recs: list[dict], path: Path) -> Path:
    """% of the weight-bandwidth roofline, one bar per cache mode and placement, grouped by batch."""
    pts = [r for r in recs if r.get("roofline_pct") is not None]
    if not pts:
        why = next((r.get("unavailable", {}).get("roofline_pct") for r in recs if r.get("unavailable", {}).get("roofline_pct")),
                   "no cell has roofline_pct")
        raise Skip(f"no roofline: {why}")
    modes, batches = _groups(pts)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(batches) * max(1, len(modes)) ** 0.5 + 3), 5))
    w = 0.8 / len(modes)
    cmap = plt.get_cmap("tab10" if len(modes) <= 10 else "tab20")
    for i, m in enumerate(modes):
        xs, ys = [], []
        for j, b in enumerate(batches):
            r = next((r for r in pts if int(r["batch"]) == b
                      and " ".join(x for x in (r.get("cache"), r.get("placement")) if x) == m), None)
            if r is not None:
                xs.append(j + (i - (len(modes) - 1) / 2) * w)
                ys.append(r["roofline_pct"])
        bars = ax.bar(xs, ys, width=w, label=m, edgecolor="black", linewidth=0.4, color=cmap(i % cmap.N))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("% of peak memory bandwidth (weights read per step)")
    ax.set_xlabel("batch size (sequences per decode step; % is a lower bound above 1)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="cache placement", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(run_title(meta, recs, "decode bandwidth roofline"), fontsize=10)
    return _save(fig, path)


def stages(meta: dict, recs: list[dict], path: Path) -> Path:
    """Per-stage seconds (one --stages pass: CUDA events on a GPU, host time on the CPU) stacked
    per cell; the enclosing ranges (prefill, decode, layer) are left out of the stack."""
    pts = [r for r in recs if r.get("stage_s")]
    if not pts:
        why = next((r.get("unavailable", {}).get("stage_s") for r in recs if r.get("unavailable", {}).get("stage_s")),
                   "no cell has stage_s")
        raise Skip(f"no stage times: {why}")
    totals: dict[str, float] = {}
    for r in pts:
        for k, v in r["stage_s"].items():
            if k not in CONTAINERS:             # they hold the other stages: stacking them counts twice
                totals[k] = totals.get(k, 0.0) + v
    names = sorted(totals, key=lambda k: -totals[k])
    fig, ax = _stacked_bars(pts, [r["stage_s"] for r in pts], names)
    gpu = all(r.get("backend") == "cupy" for r in pts)
    ax.set_ylabel(f"{'GPU time (CUDA events)' if gpu else 'host time'} per stage (s, one generation)")
    ax.legend(title="stage", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(run_title(meta, recs, "time per stage"), fontsize=10)
    return _save(fig, path)


def _stacked_bars(pts: list[dict], values: list[dict], names: list[str]):
    """One bar per cell, stacked in `names` order from each cell's {name: value}; labelled cells."""
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(pts) + 3), 5))
    bottom = [0.0] * len(pts)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(names):
        ys = [v.get(k, 0.0) for v in values]
        ax.bar(range(len(pts)), ys, bottom=bottom, label=k, color=cmap(i % 20), edgecolor="white", linewidth=0.3)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xticks(range(len(pts)), [_label(r) for r in pts], rotation=45, ha="right")
    ax.set_xlabel("cell (cache placement batch)")
    return fig, ax


def trace_ranges(meta: dict, recs: list[dict], path: Path) -> Path:
    """Nsight Systems: GPU ms projected onto each engine stage (leaf ranges, `layer.N` summed)
    stacked per traced cell, with each cell's kernel time marked."""
    from ..harness.nsys import by_stage, ordered
    pts = [r for r in recs if r.get("trace_gpu_ms")]
    if not pts:
        raise Skip("no traced cell (run with --trace)")
    stages_ = [by_stage(r["trace_gpu_ms"]) for r in pts]
    names = [n for n in ordered({k for st in stages_ for k in st}) if n not in CONTAINERS]
    fig, ax = _stacked_bars(pts, stages_, names)
    kern = [r.get("trace_kernel_ms") for r in pts]
    ax.scatter([i for i, k in enumerate(kern) if k], [k for k in kern if k], marker="_", s=900, color="black",
               zorder=4, label="kernel time (all kernels)")
    ax.set_ylabel("GPU ms projected onto the range (all timed repetitions)")
    ax.legend(title="range", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(run_title(meta, recs, "GPU time per range (Nsight Systems)"), fontsize=10)
    return _save(fig, path)


CONTAINERS = ("prefill", "decode", "layer")
RUN_FIGURES = (("scatter", scatter), ("roofline", roofline), ("stages", stages), ("trace", trace_ranges))


def plot_run(meta: dict, recs: list[dict], out_dir: str = DEFAULT_OUT) -> tuple[list[Path], list[str]]:
    """Every run figure into out_dir as <run-id>-<figure>.png; (written paths, skip reasons)."""
    if not recs:
        raise ValueError(f"run {meta.get('run_id')}: no cell records (cells.jsonl is empty)")
    written, skipped = [], []
    for name, fn in RUN_FIGURES:
        try:
            written.append(fn(meta, recs, Path(out_dir) / f"{meta['run_id']}-{name}.png"))
        except Skip as e:
            skipped.append(f"{meta['run_id']}-{name}.png skipped: {e}")
    return written, skipped


# ---- asv history -----------------------------------------------------------------------------
PANEL_PARAMS = ("preset", "batch")          # one panel per value of these (when asv has them)
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))


def correctness_changes(combos: list, drawn: list, div: list, dlp: list, pan: list) -> dict:
    """Where each cell's correctness tracks (first divergence, max |Δlogprob| to 3 decimals)
    differ from its previous drawn commit: {panel values: {x index: {cell: "div a→b, Δlp c→d"}}}."""
    out: dict = {}
    for k in combos:
        prev = None
        for j, i in enumerate(drawn):
            if k not in div[i] and k not in dlp[i]:
                continue
            now = (div[i].get(k), None if dlp[i].get(k) is None else round(dlp[i][k], 3))
            if prev is not None and now != prev:
                out.setdefault(tuple(k[n] for n in pan), {}).setdefault(j, {})[k] = \
                    f"div {prev[0]}→{now[0]}, Δlp {prev[1]}→{now[1]}"
            prev = now
    return out


def _change_lines(changed: dict, rest: list, style_of: dict, most: int = 5) -> list[str]:
    """One note line per distinct change, naming its cells compactly: the colour parameter's value
    and the line-style values that share it ("all" when every one does)."""
    by_change: dict = {}
    for k, text in changed.items():
        colour = k[rest[0]] if rest else ""
        style = k[rest[1]] if len(rest) > 1 else None
        by_change.setdefault(text, {}).setdefault(colour, []).append(style)
    lines = []
    for text, cells in by_change.items():
        who = []
        for colour, styles in cells.items():
            styles = [s for s in styles if s is not None]
            if not styles:
                who.append(str(colour))
            elif set(styles) >= set(style_of):
                who.append(f"{colour} (all)")
            else:
                who.append(f"{colour} ({', '.join(map(str, styles))})")
        lines.append(f"{'; '.join(who)}: {text}")
    if len(lines) > most:
        lines = lines[:most - 1] + [f"… and {len(lines) - most + 1} more changes"]
    return lines


def history(results_dir: str = asvdata.DEFAULT_DIR, path: Path | str = Path(DEFAULT_OUT) / "asv-history.png",
            machine: str | None = None) -> tuple[Path, list[str]]:
    """Decode tokens/s of every parameter combination across commits (oldest left), a panel per
    preset and batch (each on its own scale), colour by the next parameter (cache mode), line
    style by the one after (placement); a ring and a note mark each commit where that cell's
    first divergence or max |Δlogprob| changed. Returns (the PNG, the commits drawn)."""
    commits = asvdata.load(results_dir, machine)
    tps = [c.values.get(BENCH + "track_decode_tokens_per_s", {}) for c in commits]
    div = [c.values.get(BENCH + "track_first_divergence", {}) for c in commits]
    dlp = [c.values.get(BENCH + "track_max_logprob_delta", {}) for c in commits]
    drawn = [i for i, t in enumerate(tps) if t]
    if not drawn:
        raise ValueError(f"asv results under {results_dir} have no {BENCH}track_decode_tokens_per_s values")
    combos = list(dict.fromkeys(k for i in drawn for k in tps[i]))
    names = asvdata.param_names(results_dir, BENCH + "track_decode_tokens_per_s")
    if len(names) != len(combos[0]):
        names = [f"p{n}" for n in range(len(combos[0]))]
    pan = [n for n, a in enumerate(names) if a in PANEL_PARAMS]
    rest = [n for n in range(len(names)) if n not in pan]
    panels = list(dict.fromkeys(tuple(k[n] for n in pan) for k in combos))
    colour_of = {v: n for n, v in enumerate(dict.fromkeys(k[rest[0]] for k in combos))} if rest else {}
    style_of = {v: n for n, v in enumerate(dict.fromkeys(k[rest[1]] for k in combos))} if len(rest) > 1 else {}
    notes = correctness_changes(combos, drawn, div, dlp, pan)
    cmap = plt.get_cmap("tab10")
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6, 1.1 * len(drawn) + 3.5) * ncols, 3.6 * nrows + 0.8),
                             squeeze=False)
    for ax, pv in zip(axes.flat, panels):
        for k in (k for k in combos if tuple(k[n] for n in pan) == pv):
            xs = [j for j, i in enumerate(drawn) if k in tps[i]]
            ys = [tps[drawn[j]][k] for j in xs]
            colour = cmap(colour_of[k[rest[0]]] % cmap.N) if rest else cmap(0)
            style = LINE_STYLES[style_of[k[rest[1]]] % len(LINE_STYLES)] if len(rest) > 1 else "-"
            ax.plot(xs, ys, marker="o", ms=3.5, color=colour, linestyle=style, lw=1.4)
            for j, changed in notes.get(pv, {}).items():
                if k in changed and k in tps[drawn[j]]:
                    ax.scatter([j], [tps[drawn[j]][k]], s=150, facecolors="none", edgecolors="#e03131",
                               linewidths=2, zorder=4)
        for j, changed in notes.get(pv, {}).items():
            ax.axvline(j, color="#e03131", lw=0.8, ls=":", zorder=1)
            ax.annotate("\n".join(_change_lines(changed, rest, style_of)), (j, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(4, -4), textcoords="offset points", va="top", fontsize=7, color="#c92a2a",
                        bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#e03131", "alpha": 0.85, "lw": 0.6})
        ax.set_title(" · ".join(f"{names[n]} {v}" for n, v in zip(pan, pv)) or "all cells", fontsize=9)
        ax.set_xticks(range(len(drawn)), [commits[i].commit[:8] for i in drawn], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * (1.45 if pv in notes else 1.05))   # room for the notes
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=cmap(n % cmap.N), lw=2, label=f"{names[rest[0]]} {v}")
               for v, n in colour_of.items()]
    handles += [plt.Line2D([], [], color="#495057", linestyle=LINE_STYLES[n % len(LINE_STYLES)], lw=1.4,
                           label=f"{names[rest[1]]} {v}") for v, n in style_of.items()]
    handles.append(plt.Line2D([], [], marker="o", ms=11, markerfacecolor="none", markeredgecolor="#e03131",
                              markeredgewidth=2, linestyle="none", label="correctness changed"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(f"decode tokens/s across commits (asv, oldest left) · machine {commits[0].machine} · "
                 f"{commits[drawn[0]].commit[:8]}..{commits[drawn[-1]].commit[:8]}", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path)), [commits[i].commit for i in drawn]
