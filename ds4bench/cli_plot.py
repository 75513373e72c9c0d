"""`ds4bench plot`: PNG figures of matrix runs and of the asv history (ds4bench/views/plots.py)."""
from __future__ import annotations

from pathlib import Path


def cmd_plot(a) -> int:
    from .views import plots
    from .harness.results import RunDir
    if not a.run and not a.asv:
        raise ValueError("nothing to plot: give --run RUN (a matrix run) and/or --asv [DIR] (asv results)")
    for name in a.run or []:
        run = RunDir.open(name, a.root)
        written, skipped = plots.plot_run(run.meta(), run.records(), a.out)
        for p in written:
            print(f"wrote {p}")
        for s in skipped:
            print(s)
    if a.asv:
        from .views.asvdata import machines
        found = machines(a.asv)
        for m in found if a.machine is None and len(found) > 1 else [a.machine]:   # each machine on its own
            path, commits = plots.history(a.asv, Path(a.out) / f"asv-history{'-' + m if m else ''}.png", m)
            print(f"wrote {path} ({len(commits)} commits: {', '.join(c[:8] for c in commits)})")
    return 0


def register(sub) -> None:
    from .views import asvdata, plots
    from .harness.results import DEFAULT_ROOT
    p = sub.add_parser("plot", help="PNG figures: speed vs correctness, roofline, stages per run; asv history")
    p.add_argument("--run", action="append", metavar="RUN",
                   help="a matrix run directory or id under --root (repeatable)")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"where run ids are looked up (default {DEFAULT_ROOT})")
    p.add_argument("--asv", nargs="?", const=asvdata.DEFAULT_DIR, metavar="DIR",
                   help=f"draw the history from asv results (default dir {asvdata.DEFAULT_DIR})")
    p.add_argument("--machine", help="asv machine name (default: each machine in the results, a figure each)")
    p.add_argument("--out", default=plots.DEFAULT_OUT, help=f"output directory (default {plots.DEFAULT_OUT})")
    p.set_defaults(func=cmd_plot)
