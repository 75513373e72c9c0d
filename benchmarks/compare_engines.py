"""How far one engine's greedy answers are from another's on the same weights: every cell of run B
against the reference cell of run A (its baseline), prompt by prompt, by the free-running rules
(docs/verdicts.md): first divergence, |Δlogprob| over the union of both top-k lists up to it,
the reference's top-1 margin there, and the verdict those give.

    python benchmarks/compare_engines.py RUN_OURS RUN_DS4 [--cell CELL_ID] [--out results/runs]

`compare` joins two runs on every parameter, the engine included; this crosses engines. A
tokenizer-level mismatch (different prompt lengths) is reported, not judged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds4bench.harness.results import DEFAULT_ROOT, RunDir  # noqa: E402
from ds4bench.harness.verdict import judge_prompt, load_fingerprints  # noqa: E402


def _cells(run: RunDir) -> list[dict]:
    return [r for r in run.records() if r.get("status") == "ok"]


def cross(run_a: RunDir, run_b: RunDir, cell_a: str | None = None) -> tuple[dict, list[dict]]:
    """(the reference record of A, one row per (cell of B, prompt))."""
    recs = _cells(run_a)
    if not recs:
        raise ValueError(f"run {run_a.path}: no cell finished")
    ref = next((r for r in recs if r["cell_id"] == cell_a), None) if cell_a else \
        next((r for r in recs if r.get("is_baseline")), recs[0])
    if ref is None:
        raise ValueError(f"run {run_a.path}: no finished cell {cell_a}")
    base_fp = load_fingerprints(str(run_a.cell_paths(ref["cell_id"])[1]))
    base_len = {p["prompt_id"]: p["prompt_tokens"] for p in ref["prompts"]}
    rows = []
    for rec in _cells(run_b):
        fp = load_fingerprints(str(run_b.cell_paths(rec["cell_id"])[1]))
        for p in rec["prompts"]:
            pid = p["prompt_id"]
            row = {"cell": rec["cell_id"], "key": rec.get("key", ""), "prompt": pid,
                   "decode_tps": rec.get("decode_tps"), "prefill_tps": rec.get("prefill_tps")}
            if pid not in base_fp:
                row["verdict"] = "no reference"
            elif base_len.get(pid) != p["prompt_tokens"]:
                row["verdict"] = f"prompt lengths differ: {p['prompt_tokens']} against {base_len.get(pid)}"
            else:
                row.update(judge_prompt(fp[pid], base_fp[pid]))
            rows.append(row)
    return ref, rows


def _f(x, nd=3) -> str:
    return "–" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def render(ref: dict, rows: list[dict], name_a: str, name_b: str) -> str:
    out = [f"reference: {name_a} cell {ref['cell_id']} (engine {ref['engine']}, mode {ref['cache']}, "
           f"decode {_f(ref.get('decode_tps'))} tok/s)", f"judged: every cell of {name_b}", "",
           "| cell | prompt | verdict | 1st div | steps | max Δlp | median Δlp | margin at div | decode tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['cell']} | {r['prompt']} | {r['verdict']} | {_f(r.get('first_divergence'))} | "
                   f"{_f(r.get('steps_compared'))} | {_f(r.get('max_dlogprob'))} | {_f(r.get('median_dlogprob'))} | "
                   f"{_f(r.get('margin_at_divergence'))} | {_f(r.get('decode_tps'))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", help="the reference run (its baseline cell, or --cell)")
    ap.add_argument("run_b", help="the run whose cells are judged against it")
    ap.add_argument("--cell", help="the reference cell of run A (default: its baseline)")
    ap.add_argument("--out", default=DEFAULT_ROOT, help=f"root of run directories (default {DEFAULT_ROOT})")
    a = ap.parse_args(argv)
    try:
        ra, rb = RunDir.open(a.run_a, a.out), RunDir.open(a.run_b, a.out)
        ref, rows = cross(ra, rb, a.cell)
    except (ValueError, OSError) as e:
        print(f"compare_engines: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(render(ref, rows, ra.run_id, rb.run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
