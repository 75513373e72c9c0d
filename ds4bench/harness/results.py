"""Run directories, printers and compare.

    results/runs/<run-id>/
        run.json            spec, backend and why, notes, thresholds, the cell list, status
        cells.jsonl         one CellRecord per line, appended (one write + fsync) as each cell finishes
        cells.parquet/.csv  the same records as a flat table (lists and dicts as JSON text)
        summary.md          provenance, the verdict table, reasons, failures
        fingerprints/       per cell: tokens, top-k ids/logprobs per step, first-step logits (.npz)
        logs/               per cell: the cell process's output

cells.jsonl is the truth: the table and summary are rebuilt from it, a torn last line (the
runner killed mid-write) is ignored, and a cell recorded twice counts once (the later record).
Every other file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

from .params import JOIN as PARAM_JOIN, SHOWN
from . import guards as G
from . import record as R
from . import kl as KL
from . import verdict as V
from ..engine.fileio import replacing, write_error

DEFAULT_ROOT = "results/runs"
METRICS = (("verdict", "verdict"), ("decode_tps", "decode tok/s"), ("prefill_tps", "prefill tok/s"),
           ("ttft_ms", "TTFT ms"), ("latency_p50_ms", "p50 ms"), ("latency_p99_ms", "p99 ms"),
           ("roofline_pct", "roofline %"), ("first_div", "1st div"), ("med_dlp", "median Δlp"),
           ("max_dlp", "max Δlp"), ("kl_med", "KL median"), ("timing", "timing"))
SHOWN_PARAMS = ("tree", *SHOWN)            # params.PARAMS, the tree axis first


LEGEND = ("identical: same tokens and logprobs as the baseline · close: fed the baseline's tokens, every "
          "top-1 agrees and KL p99 ≤ kl_close · drift: healthy precision noise (KL within the band) · broken: a "
          "stage over its limit in the stage probe (the reason names stage and layer), KL median > kl_broken, "
          "NaN/Inf, non-deterministic repetitions or batch replicas · failed: the cell produced no record "
          "(crash, OOM kill, timeout). `KL median` is the teacher-forced KL from the baseline; `1st div` the "
          "earliest free-running divergence step (prompts diverged/all) and `median Δlp` the cell's median "
          "|Δlogprob|, as information. Rules and evidence: docs/verdicts.md, ds4bench/harness/verdict.py.")


def write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:                # the temporary is removed when the write fails
        tmp.write_text(text, encoding="utf-8")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_id = self.path.name

    # -- creation and lookup -------------------------------------------------------------------
    @classmethod
    def create(cls, root: str, meta: dict, run_id: str | None = None) -> "RunDir":
        from datetime import datetime, timezone
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = run_id or f"{stamp}-{meta.get('label', 'matrix')}-{meta['backend']}"
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
        Path(root).mkdir(parents=True, exist_ok=True)
        path, n = Path(root) / base, 1
        while True:                                     # mkdir claims the name: two runners never share one
            try:
                path.mkdir()
                break
            except FileExistsError:
                n += 1
                path = Path(root) / f"{base}-{n}"
        for sub in ("fingerprints", "logs", "tmp"):
            (path / sub).mkdir(exist_ok=True)
        run = cls(path)
        run.write_meta(dict(meta, run_id=run.run_id, created=R.utc_now(), status="running",
                            runner=G.runner_identity()))
        return run

    @classmethod
    def open(cls, name: str, root: str = DEFAULT_ROOT) -> "RunDir":
        for p in (Path(name), Path(root) / name):
            if (p / "run.json").is_file():
                return cls(p)
        raise ValueError(f"run {name!r}: no run.json in {name} or {Path(root) / name}; "
                         f"give a run directory or an id under {root}")

    def meta(self, for_resume: bool = False) -> dict:
        p = self.path / "run.json"
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON ({e}); the file is damaged or truncated") from None
        return G.check_meta(meta, p, for_resume)

    def write_meta(self, meta: dict) -> None:
        write_atomic(self.path / "run.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")

    def cell_paths(self, cell_id: str) -> tuple[Path, Path, Path]:
        """(the cell process's record file, its fingerprints, its log)."""
        for sub in ("tmp", "logs", "fingerprints"):
            (self.path / sub).mkdir(exist_ok=True)
        return (self.path / "tmp" / f"{cell_id}.json", self.path / "fingerprints" / f"{cell_id}.npz",
                self.path / "logs" / f"{cell_id}.log")

    # -- records -------------------------------------------------------------------------------
    def append(self, rec: dict, name: str = "cells.jsonl") -> None:
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and _last_byte(self.path / name) != b"\n":
                os.write(fd, b"\n")                     # close a line torn by a killed runner
            os.write(fd, line)
            os.fsync(fd)
        except OSError as e:                            # a torn line is ignored by records()
            raise write_error(self.path / "cells.jsonl", e) from None
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        p = self.path / "cells.jsonl"
        if not p.is_file():
            return []
        by_id: dict[str, dict] = {}
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue                                # a torn line: that cell reruns on resume
            if isinstance(rec, dict) and "cell_id" in rec:
                by_id.pop(rec["cell_id"], None)
                by_id[rec["cell_id"]] = rec
        order = [c["cell_id"] for c in self.meta().get("cells", [])]
        return sorted(by_id.values(), key=lambda r: order.index(r["cell_id"]) if r["cell_id"] in order else len(order))

    def append_round(self, rec: dict) -> None:
        """One round's record (rounds.py) to rounds.jsonl, as `append` writes cells.jsonl."""
        self.append(rec, "rounds.jsonl")

    def round_records(self) -> list[dict]:
        """The rounds recorded so far (a torn line ignored; a round recorded twice counts once)."""
        p = self.path / "rounds.jsonl"
        by: dict[tuple, dict] = {}
        for line in (p.read_text(encoding="utf-8", errors="replace").splitlines() if p.is_file() else []):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "cell_id" in rec and "round" in rec:
                by[(rec["cell_id"], rec["round"])] = rec
        return list(by.values())

    def finalize(self, status: str) -> list[dict]:
        """Rebuild the table and summary from cells.jsonl and record the run's status."""
        recs = self.records()
        meta = self.meta()
        meta.update(status=status, updated=R.utc_now(), n_cells=len(meta.get("cells", [])), n_done=len(recs),
                    verdicts={v: sum(r.get("verdict") == v for r in recs) for v in V.VERDICTS})
        try:                                            # run.json last: `complete` means every file is there
            if recs:
                import pandas as pd
                df = pd.DataFrame([R.table_row(r) for r in recs], columns=list(R.FIELDS))
                with replacing(self.path / "cells.parquet") as tmp:
                    df.to_parquet(tmp, index=False)
                write_atomic(self.path / "cells.csv", df.to_csv(index=False))
            write_atomic(self.path / "summary.md", summary_md(meta, recs))
            self.write_meta(meta)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.write_meta({**meta, "status": "interrupted", "error": str(e)})
            raise OSError(f"{e}; free space, then finish with `ds4bench matrix --resume {self.run_id}`") from None
        for sub in ("tmp", "logs"):                     # only when empty: no cell in flight, nothing said
            try:
                (self.path / sub).rmdir()
            except OSError:
                pass
        return recs


def _last_byte(p: Path) -> bytes:
    with open(p, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def gate(recs: list[dict]) -> int:
    """Exit status: 1 when any cell is broken or failed (or was not judged), else 0."""
    return int(any(r.get("verdict") in V.BAD or r.get("verdict") is None for r in recs))


# ---- printers --------------------------------------------------------------------------------
def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.{nd}f}" if abs(x) >= 1 or x == 0 else f"{x:.2g}"
    return str(x)


def row_view(r: dict) -> dict:
    """The summary numbers of a record that tables show (nothing is recomputed: it picks)."""
    ps = r.get("prompts") or []
    divs = [p.get("first_divergence") for p in ps if p.get("first_divergence") is not None]
    dlps = [p.get("max_dlogprob") for p in ps if p.get("max_dlogprob") is not None]
    timing = {True: "ok", False: "UNRELIABLE", None: "–"}[r.get("timing_reliable")]
    verdict = r.get("verdict") or "not judged"
    return {"verdict": verdict.upper() if verdict in V.BAD else verdict, "decode_tps": r.get("decode_tps"),
            "prefill_tps": r.get("prefill_tps"), "ttft_ms": r.get("ttft_ms"),
            "latency_p50_ms": r.get("latency_p50_ms"), "latency_p99_ms": r.get("latency_p99_ms"),
            "roofline_pct": r.get("roofline_pct"),
            "first_div": f"{min(divs)} ({len(divs)}/{len(ps)})" if divs else ("none" if ps else None),
            "med_dlp": None if r.get("median_dlogprob") is None else f"{r['median_dlogprob']:.3g}",
            "max_dlp": f"{max(dlps):.3g}" if dlps else None, "timing": timing,
            "kl_med": None if r.get("kl_median") is None else f"{r['kl_median']:.2g}"}


def varying(recs: list[dict], names=SHOWN_PARAMS) -> tuple[list[str], dict]:
    """(parameters that differ between records, the ones that do not with their value)."""
    vary, fixed = [], {}
    for n in names:
        vals = {json.dumps(r.get(n), sort_keys=True) for r in recs}
        if len(vals) > 1:
            vary.append(n)
        elif recs and recs[0].get(n) is not None:
            fixed[n] = recs[0][n]
    return vary, fixed


def markdown_table(recs: list[dict]) -> str:
    if not recs:
        return "(no cells)\n"
    vary, fixed = varying(recs)
    # environment variables that differ between cells (an env axis, an external engine's toggles)
    envs = sorted({k for r in recs for k in (r.get("env") or {})})
    env_vary = [k for k in envs if len({(r.get("env") or {}).get(k, "unset") for r in recs}) > 1]
    views = [row_view(r) for r in recs]
    metrics = [(k, h) for k, h in METRICS if any(v[k] is not None for v in views)]
    head = vary + env_vary + [h for _, h in metrics]
    lines = [" · ".join(f"{k} {v}" for k, v in fixed.items()), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r, v in zip(recs, views):
        cells = ([_fmt(r.get(n)) for n in vary] + [str((r.get("env") or {}).get(k, "unset")) for k in env_vary]
                 + [_fmt(v[k]) for k, _ in metrics])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(recs: list[dict]) -> str:
    import pandas as pd
    return pd.DataFrame([R.table_row(r) for r in recs], columns=list(R.FIELDS)).to_csv(index=False)


def render(recs: list[dict], fmt: str) -> str:
    if fmt == "md":
        return markdown_table(recs)
    if fmt == "csv":
        return csv_table(recs)
    if fmt == "json":
        return json.dumps(recs, indent=1, sort_keys=True) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose md, csv or json")


def reasons_md(recs: list[dict]) -> str:
    out = []
    for r in recs:
        if r.get("status") == "failed":
            out.append(f"- **{r['key']}** FAILED: {r.get('error')} (log: logs/{r['cell_id']}.log)")
        elif r.get("verdict") not in ("identical", None) or r.get("verdict_reason"):
            out.append(f"- **{r['key']}** {r.get('verdict') or 'not judged'}: {r.get('verdict_reason') or ''}")
        if r.get("timing_reliable") is False:
            out.append(f"- **{r['key']}** timing unreliable: {r.get('timing_note')}")
    return "\n".join(out) + ("\n" if out else "")


def summary_md(meta: dict, recs: list[dict]) -> str:
    spec = meta.get("spec", {})
    prov = recs[0] if recs else {}
    gpu = prov.get("gpu_name") or f"none ({(prov.get('unavailable') or {}).get('gpu_name', 'not recorded')})"
    lines = [f"# Run {meta.get('run_id')}", "",
             f"- status: **{meta.get('status')}**, {len(recs)} of {len(meta.get('cells', []))} cells recorded; "
             f"created {meta.get('created')}, updated {meta.get('updated', '')}",
             f"- spec: {spec.get('source')} {('— ' + spec['description']) if spec.get('description') else ''}",
             f"- backend: {meta.get('backend')} ({meta.get('backend_reason')})",
             f"- commit: {prov.get('git_commit') or '–'}{' (dirty)' if prov.get('git_dirty') else ''}; "
             f"python {prov.get('python', '–')}, numpy {prov.get('numpy', '–')}",
             f"- host: {prov.get('host', '–')}, {prov.get('cpu', '–')} ({prov.get('n_cpus', '–')} CPUs); GPU: {gpu}",
             f"- thresholds: {meta.get('thresholds')}"]
    lines += [f"- note: {n}" for n in meta.get("notes", [])]
    models = sorted({r["gpu_name"] for r in recs if r.get("gpu_name")})
    if len(models) > 1:
        lines.append(f"- note: cells ran on {len(models)} GPU models ({', '.join(models)}); their speeds are not "
                     f"comparable across models (`compare` refuses unless --across-gpus)")
    shared = max((r.get("gpu_shared") or 1 for r in recs), default=1)
    if shared > 1:
        lines.append(f"- note: up to {shared} jobs shared a GPU (--gpus repeated an index): verdicts hold, speeds "
                     f"are not measurements (`compare` claims no speed change)")
    lines += ["", "## Cells", "", markdown_table(recs)]
    why = reasons_md(recs)
    if why:
        lines += ["## Verdict reasons and failures", "", why]
    tr = trace_md(recs)
    if tr:
        lines += ["## GPU time per range (Nsight Systems)", "", tr]
    lines += ["## Reading the verdicts", "", LEGEND, ""]
    if meta.get("status") != "complete":
        lines += [f"Resume with `ds4bench matrix --resume {meta.get('run_id')}`.", ""]
    return "\n".join(lines)


def trace_md(recs: list[dict]) -> str:
    """Traced cells: GPU ms projected onto each engine range over the timed repetitions (layer.N
    summed into `layer`), GPU ms per decode step against its wall time, how busy the GPU was
    (kernel time over the span of the prefill and decode ranges), and the top kernels.
    A range's projected time spans its first to last GPU operation, idle gaps included."""
    from .nsys import by_stage, ordered
    traced = [r for r in recs if r.get("trace_gpu_ms")]
    if not traced:
        untraced = [r for r in recs if r.get("trace")]
        return "".join(f"- **{_label(r)}**: no trace: {(r.get('unavailable') or {}).get('trace_gpu_ms', '?')}\n"
                       for r in untraced)
    stages = [by_stage(r["trace_gpu_ms"]) for r in traced]
    names = ordered({n for st in stages for n in st})
    head = ["range (GPU ms, all timed reps)"] + [_label(r) for r in traced]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for n in names:
        out.append(f"| {n} | " + " | ".join(_fmt(st.get(n), 2) for st in stages) + " |")
    per_step = []
    for r in traced:
        steps = len(r.get("step_ms") or [])
        dec = r["trace_gpu_ms"].get("decode")
        per_step.append(_fmt(dec / steps, 3) if dec is not None and steps else "–")
    out.append("| GPU span per decode step, ms (projected) | " + " | ".join(per_step) + " |")
    out.append("| wall ms per decode step (p50) | " + " | ".join(_fmt(r.get("latency_p50_ms"), 3) for r in traced) + " |")
    busy = []
    for r in traced:
        span = sum(r["trace_gpu_ms"].get(n, 0.0) for n in ("prefill", "decode"))
        busy.append(_fmt(100 * r["trace_kernel_ms"] / span, 1) if r.get("trace_kernel_ms") and span else "–")
    out.append("| GPU busy % (kernel time / prefill + decode span) | " + " | ".join(busy) + " |")
    out += ["", "Top kernels (share of all kernel time in the capture):", ""]
    for r in traced:
        ks = ", ".join(f"`{k['name'][:60]}` {100 * (k.get('share') or 0):.1f}%" for k in (r.get("trace_kernels") or [])[:5])
        out.append(f"- **{_label(r)}** ({_fmt(r.get('trace_kernel_ms'), 2)} ms of kernels; report "
                   f"{r.get('trace_file') or '–'}): {ks}")
    return "\n".join(out) + "\n"


# ---- compare ---------------------------------------------------------------------------------
# Cells join on their parameters; the environment (DS4BENCH_UNFUSED, ...) is left out so that
# two runs that differ only in a toggle compare cell by cell: the A/B this suite exists for.
# compare() reports the environments when they differ.
JOIN = (*PARAM_JOIN,      # params.PARAMS marked join (a preset or a file: "model")
        "env_axis")          # the matrix's env-axis values (env.VAR=value in the cell key), when it has one


def join_key(r: dict) -> tuple:
    model = r.get("preset") or Path(r.get("model_file") or "").stem
    vals = {"model": model, "nvtx": bool(r.get("nvtx") or r.get("trace")),
            "engine": r.get("engine") or "ds4bench",          # records older than the engine parameter
            "env_axis": " ".join(t for t in (r.get("key") or "").split() if t.startswith("env."))}
    return tuple(json.dumps(vals[k] if k in vals else r.get(k), sort_keys=True) for k in JOIN)


def compare(a: list[dict], b: list[dict], alpha: float = 0.05, factor: float = 1.02,
            across_gpus: bool = False) -> dict:
    """Cells of two runs joined on their parameters: correctness changes, then speed from the
    rounds' tok/s (stats.compare_rounds: the ratio of medians with a bootstrap interval, Welch's
    p on log tok/s, the minimum detectable effect; for two cells interleaved in one run, the
    paired per-round ratios with a t interval and the paired t test). A cell is `faster` or `slower` only when the
    interval lies beyond `factor` (the noise floor) and p < alpha; cells with fewer than
    stats.MIN_ROUNDS rounds on a side say `too few rounds`. Cells measured on different GPU
    models make no speed claim unless `across_gpus`."""
    from .stats import compare_rounds
    A, B = {join_key(r): r for r in a}, {join_key(r): r for r in b}
    if A and B and not A.keys() & B.keys():
        ka, kb = next(iter(A)), next(iter(B))
        differ = [f"{f} {json.loads(x)} vs {json.loads(y)}" for f, x, y in zip(JOIN, ka, kb) if x != y]
        raise ValueError(f"the runs have no cell in common (their first cells differ in {'; '.join(differ)})")
    from .nsys import range_deltas
    changes, speed, ranges = [], [], []
    for k in [k for k in A if k in B]:
        ra, rb = A[k], B[k]
        label = _label(rb)
        if ra.get("trace_gpu_ms") and rb.get("trace_gpu_ms"):
            ranges.append({"cell": label, "ranges": range_deltas(ra["trace_gpu_ms"], rb["trace_gpu_ms"])})
        pa = {p["prompt_id"]: p.get("sha256") for p in ra.get("prompts") or []}
        pb = {p["prompt_id"]: p.get("sha256") for p in rb.get("prompts") or []}
        moved = sorted(pid for pid in pa.keys() | pb.keys() if pa.get(pid) != pb.get(pid))
        kl_moved = KL.band_exceeded(ra, rb)
        if ra.get("verdict") != rb.get("verdict") or moved or kl_moved:
            worse = V.RANK.get(rb.get("verdict") or "failed", 4) > V.RANK.get(ra.get("verdict") or "failed", 4)
            changes.append({"cell": label, "verdict_a": ra.get("verdict"), "verdict_b": rb.get("verdict"),
                            "worse": worse, "tokens_changed": moved, "reason_b": rb.get("verdict_reason", ""),
                            "kl_a": ra.get("kl_median"), "kl_b": rb.get("kl_median"), "kl_moved": kl_moved})
        paired = interleaved(ra, rb)
        dec = compare_rounds(_rounds(ra, "decode_tps"), _rounds(rb, "decode_tps"), alpha, factor, paired=paired)
        pre = compare_rounds(_rounds(ra, "prefill_tps"), _rounds(rb, "prefill_tps"), alpha, factor, paired=paired)
        stat_a, stat_b = ra.get("pass_stat") or "median", rb.get("pass_stat") or "median"
        if stat_a != stat_b:                    # a median pass against a best one is no comparison
            for res in (dec, pre):
                res.update(change="n/a", p_value=None, ci=None,
                           why=f"round tok/s taken differently: {stat_a} pass in A, {stat_b} in B (pass_stat)")
        gpu_a, gpu_b = ra.get("gpu_name"), rb.get("gpu_name")
        if gpu_a != gpu_b and not across_gpus:  # two GPU models: a ratio of cards, not of code
            for res in (dec, pre):
                res.update(change="n/a", p_value=None, ci=None,
                           why=f"different GPU models: {gpu_a or 'none'} in A, {gpu_b or 'none'} in B "
                               f"(compare --across-gpus to claim anyway)")
        shared = [f"{side} ({r['gpu_shared']} jobs)" for side, r in (("A", ra), ("B", rb))
                  if (r.get("gpu_shared") or 1) > 1]
        if shared:                              # concurrent jobs on one GPU: their times are each other's
            for res in (dec, pre):
                res.update(change="n/a", p_value=None, ci=None,
                           why=f"GPU shared by concurrent jobs in {', '.join(shared)}: no speed claim")
        shaky = [side for side, r in (("A", ra), ("B", rb)) if r.get("timing_reliable") is False]
        speed.append({"cell": label, "decode_tps_a": ra.get("decode_tps"), "decode_tps_b": rb.get("decode_tps"),
                      "speedup": dec["ratio"], "ci": dec["ci"], "p_value": dec["p_value"], "mde": dec["mde"],
                      "noise": dec["noise"], "rounds": (dec["n_a"], dec["n_b"]), "change": dec["change"],
                      "method": dec["method"],
                      "why": dec["why"], "unreliable": shaky, "prefill_tps_a": ra.get("prefill_tps"),
                      "prefill_tps_b": rb.get("prefill_tps"), "prefill_ratio": pre["ratio"], "prefill_ci": pre["ci"],
                      "prefill_change": pre["change"]})
    envs = [sorted({json.dumps(r.get("env") or {}, sort_keys=True) for r in side}) for side in (a, b)]
    bad_b = [{"cell": _label(r), "verdict": r.get("verdict") or "not judged", "in_a": k in A,
              "reason": r.get("error") or r.get("verdict_reason") or ""}
             for k, r in B.items() if r.get("verdict") in V.BAD or r.get("verdict") is None]
    return {"correctness": changes, "bad_b": bad_b, "speed": speed, "ranges": ranges, "alpha": alpha, "factor": factor,
            "env_a": envs[0], "env_b": envs[1],
            "only_a": [_label(A[k]) for k in A if k not in B], "only_b": [_label(B[k]) for k in B if k not in A],
            "status": int(any(c["worse"] or c.get("kl_moved") for c in changes) or gate(b) == 1)}


RANGE_ROWS = 10


def interleaved(ra: dict, rb: dict) -> bool:
    """Two cells of one run measured in the same passes of its schedule: round k of each ran in
    pass k, so their rounds pair (stats.compare_rounds(paired=True))."""
    n = ra.get("rounds") or 0
    return bool(ra.get("run_id")) and ra.get("run_id") == rb.get("run_id") and n > 1 and rb.get("rounds") == n \
        and len(ra.get("round_decode_tps") or []) == len(rb.get("round_decode_tps") or []) == n


def _rounds(r: dict, what: str) -> list:
    """A record's per-round tok/s (one round for records of one process)."""
    return r.get(f"round_{what}") or ([r[what]] if r.get(what) is not None else [])


def stage_deltas(rows: list[dict]) -> list[dict]:
    """Per-range delta rows (nsys.range_deltas) regrouped by stage, biggest change first."""
    from .nsys import by_stage, range_deltas
    a = by_stage({r["range"]: r["ms_a"] for r in rows if r["ms_a"] is not None})
    b = by_stage({r["range"]: r["ms_b"] for r in rows if r["ms_b"] is not None})
    return range_deltas(a, b)


def _label(r: dict) -> str:
    return r.get("key") or r.get("cell_id", "?")


def render_compare(res: dict, fmt: str, name_a: str = "A", name_b: str = "B") -> str:
    if fmt == "json":
        return json.dumps(res, indent=1) + "\n"
    import pandas as pd
    if fmt == "csv":
        corr = pd.DataFrame(res["correctness"], columns=["cell", "verdict_a", "verdict_b", "worse", "tokens_changed"])
        spd = pd.DataFrame(res["speed"])
        bad = pd.DataFrame(res.get("bad_b") or [], columns=["cell", "verdict", "in_a", "reason"])
        return ("# correctness\n" + corr.to_csv(index=False) + "# bad in B\n" + bad.to_csv(index=False)
                + "# speed\n" + spd.to_csv(index=False))
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}; choose md, csv or json")
    out = [f"A = {name_a}, B = {name_b}", ""]
    if res.get("env_a") != res.get("env_b"):
        out += [f"environments differ: A {' | '.join(res['env_a'])}; B {' | '.join(res['env_b'])}", ""]
    out += ["## Correctness changes", ""]
    if res["correctness"]:
        out += ["| cell | A | B | KL median A → B | prompts with new tokens | B's reason |", "|---|---|---|---|---|---|"]
        out += [f"| {c['cell']} | {c['verdict_a']} | {'**' + str(c['verdict_b']) + '**' if c['worse'] else c['verdict_b']}"
                f" | {KL.fmt_move(c)} | {', '.join(c['tokens_changed']) or '–'} | {c['reason_b'] or '–'} |"
                for c in res["correctness"]]
    else:
        out.append("none: every joined cell has the same verdict and the same tokens")
    if res.get("bad_b"):
        out += ["", f"{len(res['bad_b'])} cell(s) of B are broken, failed or not judged (B's exit status 1):", ""]
        out += [f"- **{c['cell']}** {c['verdict'].upper()}{'' if c['in_a'] else ' (only in B)'}: {c['reason'] or '–'}"
                for c in res["bad_b"]]
    out += ["", f"## Speed (rounds across processes, docs/speed.md; {1 - res['alpha']:.0%} intervals. Unpaired: B/A "
                f"of median tok/s, bootstrap interval, Welch's p on log tok/s. Paired (A and B interleaved in one "
                f"run): geometric mean of the per-round B/A, t interval, paired t. A change needs the interval "
                f"beyond {res['factor']:g} or 1/{res['factor']:g} and p < {res['alpha']:g})", "",
            "| cell | rounds | A tok/s | B tok/s | B/A | interval | p | MDE | change | prefill B/A | prefill interval |"
            " timing |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["speed"]:
        pv = "–" if s["p_value"] is None else f"{s['p_value']:.2g}"
        ci = "–" if s["ci"] is None else f"{s['ci'][0]:.3f}–{s['ci'][1]:.3f}"
        pci = "–" if s["prefill_ci"] is None else f"{s['prefill_ci'][0]:.3f}–{s['prefill_ci'][1]:.3f}"
        mde = "–" if s["mde"] is None else f"{100 * s['mde']:.1f}%"
        rounds = f"{s['rounds'][0]} paired" if s.get("method") == "paired" else f"{s['rounds'][0]}/{s['rounds'][1]}"
        out.append(f"| {s['cell']} | {rounds} | {_fmt(s['decode_tps_a'])} | "
                   f"{_fmt(s['decode_tps_b'])} | {_fmt(s['speedup'], 3)} | {ci} | {pv} | {mde} | {s['change']} | "
                   f"{_fmt(s['prefill_ratio'], 3)} | {pci} | "
                   f"{'unreliable in ' + ' and '.join(s['unreliable']) if s['unreliable'] else 'ok'} |")
    few = [s["cell"] for s in res["speed"] if s["change"] == "too few rounds"]
    if few:
        from .stats import MIN_ROUNDS
        out += ["", f"too few rounds for a p-value or an interval in {len(few)} cell(s) (need "
                    f"{MIN_ROUNDS} processes per side: `ds4bench matrix --rounds 5`)"]
    out += [f"no speed claim for {s['cell']}: {s['why']}" for s in res["speed"]
            if "pass_stat" in s["why"] or "different GPU models" in s["why"] or "GPU shared" in s["why"]]
    if res.get("ranges"):
        out += ["", "## GPU time per range (Nsight Systems; biggest changes first, layer.N summed into layer)"]
        for c in res["ranges"]:
            out += ["", f"**{c['cell']}**", "", "| range | A GPU ms | B GPU ms | Δ ms | Δ % |", "|---|---|---|---|---|"]
            for row in stage_deltas(c["ranges"])[:RANGE_ROWS]:
                out.append(f"| {row['range']} | {_fmt(row['ms_a'], 2)} | {_fmt(row['ms_b'], 2)} | "
                           f"{_fmt(row['delta_ms'], 2)} | {_fmt(row['delta_pct'], 1)} |")
    for side, key in (("A", "only_a"), ("B", "only_b")):
        if res[key]:
            out.append(f"\nonly in {side}: {', '.join(res[key])}")
    return "\n".join(out) + "\n"
