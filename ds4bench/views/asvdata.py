"""Reading the asv suite's results (results/asv/results/<machine>/<commit>-<env>.json).

asv's results format 2 keeps, per benchmark, `[result, params, version, started_at, ...]`
(`result_columns` names them) where `result` is flat over itertools.product(params) and a
value of None means n/a or failed. Parameter values are stored as their repr ("'tiny'", "1").
"""
from __future__ import annotations

import ast
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = "results/asv/results"


@dataclass
class CommitResult:
    commit: str
    date: int                                   # the commit's date, ms since the epoch (asv's)
    machine: str
    env: str
    values: dict = field(default_factory=dict)  # benchmark name -> {param tuple: value}


def _unrepr(s: str):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def machines(results_dir: str = DEFAULT_DIR) -> list[str]:
    """The asv machine names with results under `results_dir`."""
    return sorted(p.parent.name for p in Path(results_dir).glob("*/machine.json"))


def load(results_dir: str = DEFAULT_DIR, machine: str | None = None) -> list[CommitResult]:
    """Every commit's results under `results_dir` (one machine), oldest commit first."""
    root = Path(results_dir)
    machines_ = machines(results_dir)
    if not machines_:
        raise ValueError(f"no asv results under {root}: run `asv run` (benchmarks/asv_range.sh A..B) first")
    if machine is None:
        if len(machines_) > 1:
            raise ValueError(f"asv results of several machines under {root} ({', '.join(machines_)}); pick one with --machine")
        machine = machines_[0]
    elif machine not in machines_:
        raise ValueError(f"no asv results of machine {machine!r} under {root} (machines: {', '.join(machines_)})")
    out = []
    for path in sorted((root / machine).glob("*.json")):
        if path.name == "machine.json":
            continue
        doc = json.loads(path.read_text())
        cols = doc.get("result_columns", ["result", "params"])
        cr = CommitResult(doc["commit_hash"], int(doc.get("date") or 0), machine, doc.get("env_name", ""))
        for name, row in doc.get("results", {}).items():
            entry = dict(zip(cols, row))
            result, params = entry.get("result"), entry.get("params") or []
            if result is None:
                continue
            combos = list(itertools.product(*[[_unrepr(v) for v in vals] for vals in params])) or [()]
            cr.values[name] = {c: v for c, v in zip(combos, result) if v is not None}
        out.append(cr)
    if not out:
        raise ValueError(f"no asv results of machine {machine!r} under {root}: only machine.json is there")
    return sorted(out, key=lambda c: (c.date, c.commit))


def param_names(results_dir: str = DEFAULT_DIR, name: str = "") -> list[str]:
    """The benchmark's param_names from asv's benchmarks.json (empty when unknown)."""
    p = Path(results_dir) / "benchmarks.json"
    if not p.is_file():
        return []
    return list(json.loads(p.read_text()).get(name, {}).get("param_names", []))
