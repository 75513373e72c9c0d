"""Nsight Systems capture and its per-range GPU time, for `ds4bench trace` and `matrix --trace`.

A traced cell runs under

    nsys profile --trace=cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop ...

and the cell process opens the capture (cudaProfilerStart) just before its timed repetitions
and closes it after them, so model loading, kernel compilation and the prime pass stay out of
the report. The engine's NVTX ranges (domain `ds4bench`: `prefill`, `decode`, `layer.N`,
`attn.q`, `moe.experts`, ...) are on in traced cells. Afterwards

    nsys stats --report nvtx_gpu_proj_sum,cuda_gpu_kern_sum --format csv

gives, per range, the GPU time projected onto it (the kernels and copies it launched, however
the launches overlap) and the kernels' totals; `summarize` turns the two CSVs into the record
fields `trace_gpu_ms`, `trace_calls` and `trace_kernels`.

Finding nsys: $NSYS (the executable or a folder holding it), PATH, then the usual install
folders (/opt/nvidia/nsight-systems/*/bin, the CUDA toolkit's, and the copy that ships inside
Nsight Compute). On a machine whose nsys lacks its report importer's libraries (libdw, libelf)
put them on LD_LIBRARY_PATH before running: README, "Nsight Systems".
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..engine.options import environment
from ..engine.profiling import stage_of

DOMAIN = "ds4bench"
REPORTS = ("nvtx_gpu_proj_sum", "cuda_gpu_kern_sum")
SEARCH = ("/opt/nvidia/nsight-systems/*/bin/nsys", "/opt/nvidia/nsight-systems/*/target-linux-x64/nsys",
          "/usr/local/cuda*/bin/nsys", "/usr/local/cuda*/nsight-systems-*/bin/nsys",
          "/usr/lib/nsight-systems/bin/nsys", "/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys")
TOP_KERNELS = 12
_UNIT_NS = {"ns": 1.0, "us": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9}


class NsysError(RuntimeError):
    """nsys is missing, failed, or wrote something this module cannot read (one line)."""


def find_nsys(env: dict | None = None) -> str:
    """Path of the nsys executable, or NsysError saying where it looked and how to point at it."""
    env = environment() if env is None else env
    given = env.get("NSYS")
    if given:
        for cand in (given, os.path.join(given, "nsys"), os.path.join(given, "bin", "nsys")):
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
        raise NsysError(f"NSYS={given} is not an nsys executable nor a folder holding one")
    found = shutil.which("nsys", path=env.get("PATH"))
    if found:
        return found
    for pattern in SEARCH:
        for cand in sorted(glob.glob(pattern), reverse=True):           # newest version first
            if os.access(cand, os.X_OK):
                return cand
    raise NsysError("Nsight Systems (nsys) not found on PATH nor under /opt/nvidia/nsight-systems; "
                    "install it or set NSYS=/path/to/nsys")


def profile_command(nsys: str, out_base: str | Path, cmd: list[str]) -> list[str]:
    """`cmd` under nsys: CUDA API, kernels and NVTX, only between cudaProfilerStart and Stop;
    CUDA graphs traced node by node; no CPU sampling (it perturbs the host-bound decode)."""
    return [nsys, "profile", "--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none",
            "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "--cuda-graph-trace=node",
            "--force-overwrite=true", "--output", str(out_base), *cmd]


def report_path(out_base: str | Path) -> Path:
    return Path(f"{out_base}.nsys-rep")


def run_stats(nsys: str, rep: str | Path, timeout: float = 600.0) -> dict[str, str]:
    """Run `nsys stats` on a report; the CSVs are written beside it (<base>_<report>.csv) and
    returned as {report: csv text}."""
    rep = Path(rep)
    if not rep.is_file():
        raise NsysError(f"{rep}: no report (did the cell reach cudaProfilerStart?)")
    base = str(rep.with_suffix(""))
    for name in REPORTS:                    # a failed run must not leave an older run's CSVs to be read
        for stale in glob.glob(f"{glob.escape(base)}_{name}*.csv"):
            os.unlink(stale)
    cmd = [nsys, "stats", "--report", ",".join(REPORTS), "--format", "csv", "--force-export=true",
           "--force-overwrite=true", "--output", base, str(rep)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NsysError(f"nsys stats on {rep} did not finish in {timeout:g} s") from None
    out = {}
    for name in REPORTS:
        hits = sorted(glob.glob(f"{glob.escape(base)}_{name}*.csv"))
        if hits:
            out[name] = Path(hits[0]).read_text(encoding="utf-8", errors="replace")
    if len(out) < len(REPORTS):
        said = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise NsysError(f"nsys stats wrote no {', '.join(n for n in REPORTS if n not in out)} for {rep}"
                        + (f": {said[-1]}" if said else f" (exit {r.returncode})"))
    return out


# ---- parsing ---------------------------------------------------------------------------------
def read_csv(text: str) -> list[dict]:
    """Rows of an nsys stats CSV (notices before the header line are skipped)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.count(",") >= 2 and not ln.startswith(("NOTICE", "WARNING"))),
                 None)
    if start is None:
        return []
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def _column(rows: list[dict], *words: str) -> str:
    """The header that contains every word (case-insensitive)."""
    if not rows:
        raise NsysError("empty nsys stats table")
    for h in rows[0]:
        if h and all(w.lower() in h.lower() for w in words):
            return h
    raise NsysError(f"nsys stats table has no column with {' '.join(words)!r}: {', '.join(map(str, rows[0]))}")


def _to_ms(header: str, value: str) -> float:
    m = re.search(r"\((ns|us|μs|ms|s)\)", header)
    return float(value.replace(",", "")) * _UNIT_NS[m.group(1) if m else "ns"] / 1e6


def range_name(raw: str) -> str:
    """`ds4bench:layer.3` or `:layer.3` (how nsys prefixes a domain's ranges) -> `layer.3`."""
    name = raw.strip()
    for prefix in (f"{DOMAIN}:", ":"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def parse_nvtx_gpu(text: str) -> tuple[dict[str, float], dict[str, int]]:
    """nvtx_gpu_proj_sum -> ({range: projected GPU ms, summed over instances}, {range: instances}).

    A range's projected time runs from the start of the first GPU operation it launched to the
    end of the last, gaps included: on a host-bound step it approaches the wall time, while the
    kernels' own time (cuda_gpu_kern_sum) is what the GPU was busy."""
    rows = read_csv(text)
    if not rows:
        return {}, {}
    name, total = _column(rows, "range"), _column(rows, "total", "proj")
    inst = _column(rows, "instances")
    ours = [r for r in rows if r[name].strip().startswith(f"{DOMAIN}:")]
    rows = ours or rows                 # other domains (CuPy's CUB ranges) are not the engine's
    ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    for r in rows:
        n = range_name(r[name])
        ms[n] = ms.get(n, 0.0) + _to_ms(total, r[total])
        calls[n] = calls.get(n, 0) + int(float(r[inst].replace(",", "")))
    return ms, calls


def parse_kernels(text: str, top: int = TOP_KERNELS) -> tuple[list[dict], float]:
    """cuda_gpu_kern_sum -> (the `top` kernels by total time [{name, ms, share, calls}], all kernels' ms)."""
    rows = read_csv(text)
    if not rows:
        return [], 0.0
    name, total, inst = _column(rows, "name"), _column(rows, "total time"), _column(rows, "instances")
    ks = [{"name": r[name], "ms": _to_ms(total, r[total]), "calls": int(float(r[inst].replace(",", "")))}
          for r in rows]
    all_ms = sum(k["ms"] for k in ks)
    ks.sort(key=lambda k: -k["ms"])
    for k in ks:
        k["share"] = k["ms"] / all_ms if all_ms else None
    return ks[:top], all_ms


def summarize(csvs: dict[str, str]) -> dict:
    """Record fields from the two reports' CSV text."""
    ms, calls = parse_nvtx_gpu(csvs.get("nvtx_gpu_proj_sum", ""))
    kernels, kern_ms = parse_kernels(csvs.get("cuda_gpu_kern_sum", ""))
    if not ms:
        raise NsysError("the trace has no NVTX ranges with GPU work (were the engine's ranges on?)")
    return {"trace_gpu_ms": ms, "trace_calls": calls, "trace_kernels": kernels, "trace_kernel_ms": kern_ms}


# ---- views -----------------------------------------------------------------------------------
def by_stage(ms: dict[str, float]) -> dict[str, float]:
    """Per-range ms with `layer.N` summed into `layer` (stage names are the same for any depth)."""
    out: dict[str, float] = {}
    for n, v in ms.items():
        out[stage_of(n)] = out.get(stage_of(n), 0.0) + v
    return out


STAGE_ORDER = ("prefill", "decode", "layer", "hc_pre", "attn.q", "attn.kv", "compressor", "indexer", "attention",
               "attn.out", "moe.router", "moe.experts", "moe.shared", "head")


def ordered(names) -> list[str]:
    rank = {n: i for i, n in enumerate(STAGE_ORDER)}
    return sorted(names, key=lambda n: (rank.get(stage_of(n), len(rank)), _layer_no(n), n))


def _layer_no(n: str) -> int:
    head, _, tail = n.partition(".")
    return int(tail) if head == "layer" and tail.isdigit() else -1


def range_deltas(a: dict[str, float], b: dict[str, float]) -> list[dict]:
    """Per-range GPU ms of two records, biggest absolute change first."""
    rows = []
    for n in a.keys() | b.keys():
        va, vb = a.get(n), b.get(n)
        d = None if va is None or vb is None else vb - va
        rows.append({"range": n, "ms_a": va, "ms_b": vb, "delta_ms": d,
                     "delta_pct": None if d is None or not va else 100.0 * d / va})
    rows.sort(key=lambda r: (r["delta_ms"] is None, -abs(r["delta_ms"] or 0.0), r["range"]))
    return rows
