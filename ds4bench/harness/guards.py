"""Reliability of run directories and of the runner: who runs a run and whether it still does,
the shape of run.json, writes that fail (disk full) and the temporaries they leave, and the host
memory a NumPy cell needs before anything is written.

    run.json "runner": {"pid", "host", "started", "proc_start"}   # written when a run starts or resumes

A run whose run.json says `running` while its runner's pid is gone on this host was killed
without clean-up (SIGKILL, a crash of the machine): `show`, `compare` and `--resume` say so.
`proc_start` (the process start time from /proc) tells a recycled pid from the runner itself.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from . import record as R
from ..engine.fileio import host_available

# Every temporary ds4bench writes ends in .tmp<pid> (run.json, tables, fingerprints, GGUF files);
# tmp/ holds the record a cell process hands to the runner.
TEMP_GLOBS = ("*.tmp[0-9]*", ".*.tmp[0-9]*", "fingerprints/*.tmp[0-9]*", "fingerprints/.*.tmp[0-9]*", "tmp/*")


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into the interrupt path (finished cells are saved); exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum, frame):
    raise Terminated(signum)


# ---- the runner ----------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def runner_identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": R.utc_now(),
            "proc_start": _proc_start(os.getpid())}


def _alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                    # someone else's process: it exists
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def runner_state(meta: dict) -> tuple[str, str]:
    """('done' | 'alive' | 'gone' | 'unknown', a sentence for the user) for a run's runner."""
    if meta.get("status") != "running":
        return "done", ""
    rid = meta.get("run_id", "RUN")
    hint = f"finish with `ds4bench matrix --resume {rid}`"
    r = meta.get("runner")
    if not isinstance(r, dict) or not isinstance(r.get("pid"), int):
        return "unknown", (f"run.json records no runner, so ds4bench cannot tell whether the run is still going; "
                           f"if it is not, {hint}")
    here = socket.gethostname()
    who = f"pid {r['pid']} on {r.get('host')}"
    if r.get("host") != here:
        return "unknown", (f"the runner ({who}) ran on another host than this one ({here}); ds4bench cannot tell "
                           f"whether it is still running; if it is not, {hint}")
    if _alive(r["pid"], r.get("proc_start")):
        return "alive", f"the runner ({who}, started {r.get('started')}) is still running"
    return "gone", f"the runner ({who}) is gone; {hint}"


# ---- run.json ------------------------------------------------------------------------------
def check_meta(meta, path: Path, for_resume: bool = False) -> dict:
    """`meta` if it has run.json's shape, else ValueError naming the file and what is wrong."""
    def bad(what: str):
        raise ValueError(f"{path}: not a ds4bench run.json: {what}")
    if not isinstance(meta, dict):
        bad(f"the top level is a JSON {type(meta).__name__}, not an object")
    for key in ("cells", "status"):
        if key not in meta:
            bad(f"'{key}' is missing")
    cells = meta["cells"]
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("cell_id"), str)
                                              for c in cells):
        bad("'cells' must be a list of objects with a cell_id")
    for key, kind in (("status", str), ("backend", str), ("notes", list), ("thresholds", dict), ("spec", dict)):
        if key in meta and not isinstance(meta[key], kind):
            bad(f"'{key}' must be a {kind.__name__}, found {type(meta[key]).__name__}")
    if for_resume:
        for key in ("backend", "thresholds"):
            if key not in meta:
                bad(f"'{key}' is missing")
        if not meta["cells"]:
            bad("'cells' is empty: there is nothing to resume")
        need = {"cell_id", "key", "group", "params"}
        for c in meta["cells"]:
            if not need <= set(c) or not isinstance(c["params"], dict):
                bad(f"cell {c['cell_id']} lacks {', '.join(sorted(need - set(c))) or 'a params object'}")
    return meta


def remove_temporaries(run_path: Path) -> list[Path]:
    """Delete what failed or killed writes left in a run directory; the paths removed."""
    gone = []
    for pattern in TEMP_GLOBS:
        for p in run_path.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


# ---- host memory ---------------------------------------------------------------------------
def numpy_cell_bytes(cfg, cache: str) -> int:
    """Host bytes a NumPy-backend cell holds: the weights as stored, plus what RefOps.prepare
    builds up front: projections expanded to float64 (8 B/element) in the f16/f32 modes and for
    F16 weights, integer decompositions (about 1 B/element) for Q8_0 on the q8 path and experts."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from ..engine.gguf_io import tensor_specs
    from ..engine.ops_ref import cache_eligible
    total = 0
    for s in tensor_specs(cfg):
        total += s.nbytes
        n = int(np.prod(s.shape))
        if s.kind == "experts":
            total += n
        elif s.qtype in (QT.Q8_0, QT.F16) and len(s.shape) == 2 and s.kind != "embedding":
            dense = s.qtype == QT.F16 or (cache != "q8" and cache_eligible(s.name))
            total += 8 * n if dense else n
    return total


def check_host_memory(cells, available: int | None = None, share: float = 0.8) -> None:
    """Refuse, before any model file is written, NumPy cells that would not fit in host memory."""
    from ..engine import config as C
    avail = host_available() if available is None else available
    if not avail:
        return
    worst = None
    for c in cells:
        p = c.params
        if p.get("backend") != "numpy" or not p.get("preset"):
            continue
        need = numpy_cell_bytes(C.preset(p["preset"], p.get("variant")), p["cache"])
        if worst is None or need > worst[0]:
            worst = (need, c)
    if worst and worst[0] > share * avail:
        need, c = worst
        raise ValueError(f"cell {c.cell_id}: the numpy backend needs about {need / 2**30:.1f} GiB of host memory "
                         f"for preset {c.params['preset']} in cache mode {c.params['cache']}, "
                         f"{avail / 2**30:.1f} GiB is available; use a smaller preset (tiny, small) or a GPU")


# ---- options -------------------------------------------------------------------------------
def context_needed(prompt_tokens: int, n_gen: int) -> int:
    """Positions a sequence uses: its prompt, the generated tokens, one more for the last step."""
    return prompt_tokens + n_gen + 1


def check_ctx(ctx: int | None, n_gen: int, prompt_set: str, models: list, where: str) -> None:
    """A context given by the user must hold the longest prompt of the set (chat-templated with
    each model's tokenizer) plus the generated tokens, and fit the model's context length."""
    if ctx is None:
        return
    if ctx < 1:
        raise ValueError(f"{where}: ctx must be a positive number of positions, found {ctx}")
    from ..engine.prompts import load_prompts
    from ..engine.tokenizer import Tokenizer
    texts = [q.text for q in load_prompts(prompt_set)]
    for label, cfg, metadata in models:
        tok = Tokenizer.from_gguf_metadata(metadata)
        longest = max(len(tok.chat(t)) for t in texts)
        need = context_needed(longest, n_gen)
        if ctx < need:
            raise ValueError(f"{where}: ctx {ctx} is too small for {label}: the longest prompt of set {prompt_set} "
                             f"is {longest} tokens, + n {n_gen} + 1 = {need}; give ctx {need} or more, or leave "
                             f"it out")
        if ctx > cfg.context_length:
            raise ValueError(f"{where}: ctx {ctx} exceeds {label}'s context length {cfg.context_length}")


def remove_orphans(directory, pattern: str = "*.tmp[0-9]*") -> list[Path]:
    """Delete temporaries in a shared directory (the model cache) whose writer, named by the pid
    after `.tmp`, is no longer alive; another process's write in progress is left alone."""
    gone = []
    for p in Path(directory).glob(pattern):
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid), None) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
