"""`ds4bench faults`: run a faults spec through the matrix and print the confusion table.

    ds4bench faults                          # benchmarks/matrices/faults-tiny.toml (faults-gpu on a GPU)
    ds4bench faults --spec faults-gpu --batch 1,16 --seed 1
    ds4bench faults --list                   # the catalogue (ds4bench/engine/faults.py) as markdown
    ds4bench faults --resume RUN             # finish an interrupted faults run, then its table
    ds4bench faults --report RUN             # the table of a run as it stands (cells not run: said)

A faults spec is an ordinary matrix spec with an env axis over DS4BENCH_FAULT: healthy cells
(the variable unset) in every mode, and one cell per fault. After the run, `confusion.md` (and
`confusion.json`) in the run directory say, per faulted cell, the stage the fault is made in,
the verdict, the stage and layer the verdict names (record fields `verdict_stage` and
`verdict_layer` where the verdicts provide them), whether the fault was caught (verdict broken)
and whether the named stage is the fault's; then, per healthy cell, whether it was falsely
flagged broken. Exit status: 0 when every cell ran, every fault is caught and no healthy cell is
broken, 1 otherwise, 2 for a user error.
"""
from __future__ import annotations

import json
import sys

FAULT_VAR = "DS4BENCH_FAULT"


def register(sub) -> None:
    from .cli_matrix import _run_args, executor_args
    p = sub.add_parser("faults", help="fault-injection suite: which injected faults the verdicts catch",
                       description="Run a faults spec (healthy modes plus one cell per injected fault, "
                                   "DS4BENCH_FAULT as an env axis) and print the confusion table.")
    _run_args(p)
    executor_args(p)
    p.add_argument("--list", action="store_true", help="print the fault catalogue and exit")
    p.add_argument("--resume", metavar="RUN", help="finish an interrupted faults run, then write its table")
    p.add_argument("--report", metavar="RUN",
                   help="write and print the table of a run as it stands, running no cell (a partial run says so)")
    p.set_defaults(func=cmd_faults, trace=False, trace_one=False)


def cmd_faults(a) -> int:
    from .engine import faults as FL
    from .cli import UserError
    from .cli_matrix import cmd_matrix
    from .harness.results import RunDir
    if a.list:
        sys.stdout.write(FL.catalogue_md())
        return 0
    if a.report:
        if a.resume:
            raise UserError("--report reads a run as it stands; drop --resume")
        try:
            run = RunDir.open(a.report, a.out)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        if a.spec is None and not a.resume:
            from .harness.matrix import resolve_backend
            a.spec = "faults-gpu" if resolve_backend(a.backend or "auto")[0] == "cupy" else "faults-tiny"
        cmd_matrix(a)
        run = RunDir.open(str(a.run_path), a.out)
    recs = run.records()
    planned = run.meta().get("cells") or []
    if not any(FAULT_VAR in (r.get("env") or {}) for r in recs) and not any(
            FAULT_VAR in ((c.get("params") or {}).get("env") or {}) for c in planned):
        raise UserError(f"run {run.run_id}: no cell sets {FAULT_VAR}; a faults spec needs an env axis "
                        f"{FAULT_VAR} = [\"unset\", <faults>]")
    table = confusion(recs)
    md = confusion_md(table, run.run_id)
    missing = len(planned) - len(recs)
    if missing > 0:
        table["missing"] = missing
        md += (f"\n(partial: {missing} of {len(planned)} cells have no record; finish them with "
               f"`ds4bench faults --resume {run.run_id}`)\n")
    (run.path / "confusion.md").write_text(md, encoding="utf-8")
    (run.path / "confusion.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    sys.stdout.write("\n" + md)
    print(f"confusion table: {run.path / 'confusion.md'}", file=sys.stderr)
    return int(bool(table["escaped"] or table["false_broken"] or table.get("missing")))


def confusion(recs: list[dict]) -> dict:
    """Per faulted cell and per healthy cell, what the verdicts made of it."""
    from .engine.faults import FAULTS
    faults, healthy = [], []
    for r in recs:
        names = [n for n in (r.get("env") or {}).get(FAULT_VAR, "").split(",") if n.strip()]
        verdict = r.get("verdict")
        cell = r.get("key") or r.get("cell_id")
        if not names:
            healthy.append({"cell": cell, "verdict": verdict, "broken": verdict == "broken"})
            continue
        stages = sorted({st for n in names if n in FAULTS for st in FAULTS[n].stages})
        named = r.get("verdict_stage")
        faults.append({"fault": ",".join(names), "stage": ",".join(stages), "cell": cell, "verdict": verdict,
                       "verdict_stage": named, "verdict_layer": r.get("verdict_layer"),
                       "caught": verdict == "broken",
                       "stage_match": None if named is None else named in stages,
                       "reason": r.get("verdict_reason") or ""})
    return {"faults": faults, "healthy": healthy,
            "escaped": sorted({f["fault"] for f in faults if not f["caught"]}),
            "false_broken": [h["cell"] for h in healthy if h["broken"]]}


def _yn(v) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


def confusion_md(table: dict, run_id: str) -> str:
    out = [f"# Fault-injection confusion table (run {run_id})", "",
           "| fault | made in | cell | verdict | named stage | layer | caught | stage matches |",
           "|---|---|---|---|---|---|---|---|"]
    for f in table["faults"]:
        out.append(f"| `{f['fault']}` | {f['stage']} | {f['cell']} | {f['verdict']} | {f['verdict_stage'] or '–'} "
                   f"| {'–' if f['verdict_layer'] is None else f['verdict_layer']} | {_yn(f['caught'])} "
                   f"| {_yn(f['stage_match'])} |")
    out += ["", "| healthy cell | verdict | falsely broken |", "|---|---|---|"]
    out += [f"| {h['cell']} | {h['verdict']} | {'**yes**' if h['broken'] else 'no'} |" for h in table["healthy"]]
    n = len({f["fault"] for f in table["faults"]})
    out += ["", f"{n - len(table['escaped'])} of {n} faults caught"
            + (f"; escaped: {', '.join(table['escaped'])}" if table["escaped"] else "")
            + f"; {len(table['false_broken'])} of {len(table['healthy'])} healthy cells falsely broken"
            + (f" ({', '.join(table['false_broken'])})" if table["false_broken"] else "") + ".", ""]
    return "\n".join(out)
