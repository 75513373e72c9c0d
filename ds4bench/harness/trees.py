"""The tree axis: two (or more) source trees measured in one matrix, their cells interleaved.

    ds4bench matrix --tree A=80a58af --tree B=. --rounds 5 --preset flash-4l --cache q8

Each value is a label and a source: a directory holding a ds4bench checkout, or a commit of
this repository, checked out once with `git worktree add --detach` under
~/.cache/ds4bench/trees/<sha> (or $DS4BENCH_TREE_CACHE; from the git bundle
.gitcarry/ds4bench.bundle where the checkout has no .git, as on a copied GPU machine). A cell
of tree T runs `python -m ds4bench cell` with T first on PYTHONPATH, so T's engine and T's
`cell` measure it, while this tree's runner schedules the rounds and judges every cell
against the baseline (the first tree's baseline cell).

Every commit since a90c046 (where `ds4bench cell` appeared) works: its `cell` builds the record
from the parameter keys it knows and ignores the others (rounds, settle, tree, ...). Trees older
than this one run without the warm-up stopping rule and without DS4BENCH_SLOWDOWN (their
records leave those fields empty).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from . import record as R
from ..engine.options import tree_cache_dir

FIRST_CELL_COMMIT = "a90c046"


def check_labels(trees: dict, where: str) -> None:
    for label, source in trees.items():
        if not re.fullmatch(r"[A-Za-z0-9_.]+", label) or not source:
            raise ValueError(f"{where}: tree {label}={source!r}: give LABEL=<path or commit> with a label of "
                             f"letters, digits, '_' or '.'")


def parse_trees(items: list[str]) -> dict:
    """['A=80a58af', 'B=.'] -> {'A': '80a58af', 'B': '.'}."""
    out = {}
    for it in items:
        label, eq, source = it.partition("=")
        if not eq or not label.strip() or not source.strip():
            raise ValueError(f"--tree {it!r}: expected LABEL=<path or commit>, e.g. --tree A=80a58af --tree B=.")
        if label.strip() in out:
            raise ValueError(f"--tree: label {label.strip()} given twice")
        out[label.strip()] = source.strip()
    return out


def _git(*args, cwd=R.REPO) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def resolve(source: str, say=print) -> tuple[str, str | None]:
    """(directory to put on PYTHONPATH, commit or None) for a tree's source; ValueError names
    what is wrong (no such path or commit, a commit without `ds4bench cell`)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "ds4bench" / "__main__.py").is_file():
            raise ValueError(f"tree {source}: {p.resolve()} is not a ds4bench checkout (no ds4bench/__main__.py)")
        return str(p.resolve()), None
    if not re.fullmatch(r"[0-9A-Za-z_./~^-]+", source):
        raise ValueError(f"tree {source!r}: neither a directory nor a commit name")
    bundle = R.REPO / ".gitcarry" / "ds4bench.bundle"
    git_dir = None
    try:
        git_dir = _git("rev-parse", "--git-dir")
    except (OSError, subprocess.CalledProcessError):
        if not bundle.is_file():
            raise ValueError(f"tree {source}: no such directory, and {R.REPO} has neither .git nor "
                             f"{bundle.relative_to(R.REPO)} to check a commit out of") from None
    root = tree_cache_dir()
    try:
        if git_dir:
            sha = _git("rev-parse", "--verify", f"{source}^{{commit}}")
        else:
            mirror = root / "bundle.git"
            if not mirror.is_dir():
                subprocess.run(["git", "clone", "-q", "--mirror", str(bundle), str(mirror)], check=True,
                               capture_output=True, timeout=300)
            sha = _git("rev-parse", "--verify", f"{source}^{{commit}}", cwd=mirror)
    except subprocess.CalledProcessError as e:
        raise ValueError(f"tree {source}: not a commit of this repository ({e.stderr.strip().splitlines()[-1:]})") from None
    dest = root / sha
    if not (dest / "ds4bench" / "__main__.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        say(f"checking out {sha[:12]} into {dest}")
        if git_dir:
            _git("worktree", "prune")
            _git("worktree", "add", "--detach", "-f", str(dest), sha)
        else:
            subprocess.run(["git", "clone", "-q", "--no-checkout", str(root / "bundle.git"), str(dest)], check=True,
                           capture_output=True, timeout=300)
            _git("checkout", "-q", "--detach", sha, cwd=dest)
    pkg, m = dest / "ds4bench", dest / "ds4bench" / "matrix.py"        # cell.py: harness/ since the grouping, flat before
    has_cell = (pkg / "harness" / "cell.py").is_file() or (pkg / "cell.py").is_file()
    if not has_cell and (not m.is_file() or "def run_cell(" not in m.read_text()):
        raise ValueError(f"tree {source} ({sha[:12]}) predates `ds4bench cell` ({FIRST_CELL_COMMIT}): it cannot "
                         f"run matrix cells")
    return str(dest), sha


def with_trees(cells: list, trees: dict, tree_env: dict | None = None, say=print) -> list:
    """Every cell once per tree, labelled (cell id `<label>-...`, key `tree=<label> ...`), all
    judged against the first tree's baseline cell; `tree_env[label]` adds to that tree's cells'
    environment (e.g. DS4BENCH_SLOWDOWN on one of two identical trees: a sensitivity test)."""
    import copy
    out = []
    resolved = {label: resolve(src, say) for label, src in trees.items()}
    here = str(R.REPO.resolve())
    for c in cells:                  # tree innermost: a cell's trees run next to each other
        for label, (path, sha) in resolved.items():
            n = copy.deepcopy(c)
            n.cell_id = f"{label}-{c.cell_id}"
            n.key = f"tree={label} {c.key}" if c.key != c.cell_id else f"tree={label}"
            n.params.update(tree=label, tree_source=trees[label], tree_path=path,
                            tree_commit=sha if path != here else None)
            n.params["env"] = {**n.params["env"], **(tree_env or {}).get(label, {})}
            n.is_baseline = c.is_baseline and label == next(iter(trees))
            out.append(n)
    first = next(iter(trees))
    base_of = {c.cell_id: f"{first}-{c.baseline_cell}" for c in cells}
    for n, c in zip(out, [c for c in cells for _ in trees]):
        n.baseline_cell = base_of[c.cell_id]
    return sorted(out, key=lambda n: not n.is_baseline)        # stable: each baseline before its group
