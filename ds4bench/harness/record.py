"""The one flat `CellRecord` of a matrix cell, and the measurements that fill it.

Every view (markdown, CSV, parquet, JSON, compare, plots, asv tracks) reads these fields and
nothing else. A field is either a real measurement or None; every None has its reason in
`unavailable[field]` (for example "numpy backend: no device memory"), so an absent GPU is
never mistaken for a zero.

Units are in the names: `_s` seconds, `_ms` milliseconds, `_bytes`, `_tps` tokens per second,
`_gbs` 1e9 bytes per second, `_mhz`, `_c` degrees Celsius, `_w` watts, `_pct` percent.

Timing conventions
  prefill_tps       prompt tokens / prefill seconds, median over repetitions
  decode_tps        generated tokens / decode seconds (B tokens per step), median over repetitions
  ttft_ms           median time from a sequence's prefill start to its first token
  latency_p*_ms     per-token latency = decode step time: each of the B sequences gets one token
                    per step; percentiles over the raw steps of all repetitions (`step_ms`)
Roofline (decode, weights only, ds4-spec 5.6)
  bytes_per_step    gguf_io.decode_read_bytes for the final context of the longest prompt.
                    For batch B > 1 a step is assumed to read every weight once for the whole
                    batch and the routed experts as for one token (full overlap), so the bytes
                    are a lower bound there: bytes_per_token = bytes_per_step / B, and
                    achieved_gbs / roofline_pct are lower bounds at B > 1.
  roofline_pct      achieved_gbs over the GPU's peak memory bandwidth (NVML: max memory clock x
                    bus width x 2); GPU only.
Memory
  host_rss_peak_bytes  the cell process's peak resident set (getrusage)
  device_peak_bytes    GPU: CuPy's pool total at the end (it keeps freed blocks: the pool's
                       high-water mark, holding device-placed weights, caches and run state)
  managed_bytes        GPU: weights placed in managed memory (0 under device or host placement)
Each `prompts` entry: prompt_id, prompt_tokens, sha256, text, tokens, nonfinite,
replica_mismatch, then from the verdict: first_divergence, steps_compared, max_dlogprob,
median_dlogprob, margin_at_divergence, nmse, verdict, reason.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.metadata as md
import json
import os
import platform
import resource
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.options import commit_given

SCHEMA = 1
REPO = Path(__file__).resolve().parents[2]                  # the checkout: ds4bench/harness/../..
PACKAGES = ("ds4bench", "numpy", "scipy", "pandas", "pyarrow", "gguf", "tokenizers", "tqdm", "nvidia-ml-py")
TRACE_FIELDS = ("trace_file", "trace_gpu_ms", "trace_calls", "trace_kernels", "trace_kernel_ms")   # --trace
RELIABLE_SPREAD = 0.15          # decode and prefill tok/s: (max - min) / median across repetitions


@dataclass
class CellRecord:
    # identity and outcome
    schema: int = SCHEMA
    run_id: str = ""
    cell_id: str = ""
    key: str = ""                       # the varying parameters, "cache=q8 batch=4"
    status: str = "ok"                  # ok | failed
    error: str | None = None            # failed: the cell's last stderr line, timeout or signal
    is_baseline: bool = False
    baseline_cell: str | None = None    # cell_id this cell was judged against
    verdict: str | None = None          # identical | close | drift | broken | failed
    verdict_reason: str = ""
    deterministic: bool | None = None   # every repetition generated the same tokens
    median_dlogprob: float | None = None  # median |Δlogprob| over every compared step of every prompt
    verdict_stage: str | None = None    # broken by the stage probe: the first stage over its limit ("attn.out")
    verdict_layer: int | None = None    # ... and its layer (n_layer for the head)
    # teacher-forced KL against the baseline's greedy tokens (kl.py), over every step of every prompt
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agree: float | None = None     # fraction of steps whose argmax is the baseline's token
    dp_mean: float | None = None        # mean of p_cell - p_base of the baseline's token
    dp_rms: float | None = None
    kl_steps: int | None = None
    kl_s: float | None = None           # seconds the teacher-forced pass took
    # stage probe against the NumPy reference (probe.py)
    probe_mode: str | None = None       # the reference engine's mode
    probe_positions: int | None = None  # positions probed (prefill tokens + decode steps)
    probe_lead: int | None = None       # tokens run in the reference alone before them (probe.lead_for)
    probe_stages: list = field(default_factory=list)   # per (stage, layer): nmse, max_abs[, sel_differ]
    probe_reason: str = ""              # the first stage over its limit, in words
    probe_cached: bool | None = None    # the reference's stage outputs came from the cache
    probe_s: float | None = None        # seconds the probe took (reference included when not cached)
    # parameters
    engine: str = "ds4bench"                # ours, or an external engine's adapter (command_engine.py)
    engine_paths: dict = field(default_factory=dict)   # an external engine's [paths]: path, bytes, sha256, build
    preset: str | None = None
    model_file: str | None = None
    variant: str | None = None
    seed: int = 0
    backend: str = "numpy"
    cache: str = "f32"
    placement: str | None = None
    batch: int = 1
    n_gen: int = 32
    prompt_set: str = "smoke"
    reps: int = 1
    warmup: int = 0
    ctx: int = 0
    chunk: int = 512
    stages: bool = False
    nvtx: bool = False                  # NVTX ranges (domain ds4bench) on during the timed repetitions
    trace: bool = False                 # the cell ran under Nsight Systems (implies nvtx)
    timeout_s: float = 0.0
    env: dict = field(default_factory=dict)     # DS4BENCH_* and spec variables the cell ran with
    rounds: int = 1                     # processes the cell was measured in (ds4bench/harness/rounds.py)
    settle: float = 0.05                # warm-up stops when pass medians agree within this, relative
    warmup_cap_s: float = 3.0           # ... or after this long
    pass_stat: str = "median"           # a round's tok/s from its timed passes: median, or best (the fastest)
    tree: str | None = None             # the tree axis: which source tree's `cell` ran (label)
    tree_source: str | None = None      # that tree's path or commit as given
    decode_path: str = "eager"          # eager | graph (DS4BENCH_DECODE_GRAPH=on) | eager (why the graph did not apply)
    # provenance
    git_commit: str | None = None
    git_dirty: bool | None = None
    python: str = ""
    numpy: str = ""
    cupy: str | None = None
    cuda_runtime: str | None = None
    packages: dict = field(default_factory=dict)
    host: str = ""
    platform: str = ""
    cpu: str = ""
    n_cpus: int = 0
    utc_start: str = ""
    utc_end: str = ""
    gpu_name: str | None = None
    gpu_driver: str | None = None
    gpu_uuid: str | None = None             # the card the cell ran on (NVML), to split a run by device
    gpu_pci_bus_id: str | None = None
    executor_host: str | None = None        # --executor pool/slurm: the worker's host and job
    executor_job: str | None = None
    gpu_shared: int | None = None           # --gpus repeating an index: jobs that held this GPU at once
    cuda_driver: str | None = None
    gpu_mem_bw_gbs: float | None = None
    gpu_sm_clock_mhz_start: float | None = None
    gpu_sm_clock_mhz_end: float | None = None
    gpu_sm_clock_mhz_min: float | None = None
    gpu_temp_c_start: float | None = None
    gpu_temp_c_end: float | None = None
    gpu_power_w_start: float | None = None
    gpu_power_w_end: float | None = None
    gpu_throttle: list = field(default_factory=list)   # NVML slowdown reasons seen during the timed reps
    # timing
    wall_s: float | None = None
    compile_s: float | None = None                      # the untimed prime pass: kernel compilation, lazy weights
    capture_s: float | None = None                      # the decode graph's capture (graph path only)
    warmup_passes: int | None = None                    # warm-up passes run before the timed ones
    warmup_settled: bool | None = None                  # whether the step time settled before the cap
    warmup_s: float | None = None
    # rounds: one entry per round (process), in round order
    round_decode_tps: list = field(default_factory=list)
    round_prefill_tps: list = field(default_factory=list)
    round_gpu: list = field(default_factory=list)       # per round at its start: SM clock, temperature, power; throttle seen
    round_slot: list = field(default_factory=list)      # the round's position in its pass (0: the first process)
    round_wall_s: list = field(default_factory=list)
    round_compile_s: list = field(default_factory=list)
    round_warmup_passes: list = field(default_factory=list)
    # DS4BENCH_SLOWDOWN (ds4bench/engine/slowdown.py): the known slowdown a sensitivity test injects
    slowdown: str | None = None                         # stage:fraction
    slowdown_step_s: float | None = None                # wait added per forward call
    slowdown_base_step_s: float | None = None           # the un-slowed decode step it is a fraction of
    slowdown_true_ratio: float | None = None            # decode tok/s with / without the toggle: 1 / (1 + fraction)
    load_s: float | None = None                         # reading the model (mapping and validating a GGUF)
    setup_s: float | None = None                        # building the engine: weights to the device, state
    timed_s: float | None = None                        # the timed repetitions, wall
    correctness_s: float | None = None                  # round 1's KL pass and stage probe
    prefill_tps: float | None = None
    decode_tps: float | None = None
    ttft_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    prefill_tps_reps: list = field(default_factory=list)
    decode_tps_reps: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)         # raw decode step samples, all repetitions
    ttft_samples_ms: list = field(default_factory=list)
    timing_spread: float | None = None                  # the larger of decode and prefill (max - min) / median
    timing_reliable: bool | None = None
    timing_note: str = ""
    stage_s: dict = field(default_factory=dict)         # --stages: seconds per stage in one extra rep (CUDA events on a GPU, host time on the CPU)
    # Nsight Systems (--trace): GPU time projected onto each NVTX range over the timed repetitions
    trace_file: str | None = None                       # the .nsys-rep, relative to the run directory
    trace_gpu_ms: dict = field(default_factory=dict)    # range name (layer.3, attn.q, ...) -> GPU ms
    trace_calls: dict = field(default_factory=dict)     # range name -> instances
    trace_kernels: list = field(default_factory=list)   # top kernels: name, ms, calls, share of kernel time
    trace_kernel_ms: float | None = None                # every kernel's GPU time in the capture
    # memory
    host_rss_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    managed_bytes: int | None = None
    state_bytes: int | None = None
    weights_bytes: int | None = None
    # roofline
    bytes_per_step: int | None = None
    bytes_per_token: float | None = None
    achieved_gbs: float | None = None
    roofline_pct: float | None = None
    # correctness
    prompts: list = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)     # field -> why it is None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CellRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


FIELDS = tuple(f.name for f in dataclasses.fields(CellRecord))
# Fields that are not measurements: None there means "not applicable", never "not measured".
NOT_MEASURED = ("error", "baseline_cell", "verdict_reason", "timing_note", "tree", "tree_source", "slowdown",
                "verdict_stage", "verdict_layer", "probe_reason")

def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def table_row(rec: dict) -> dict:
    """A record as one flat row: scalars as they are, lists and dicts as JSON text."""
    return {k: (json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v) for k, v in rec.items()}


# ---- provenance ------------------------------------------------------------------------------
def start_record(params: dict) -> tuple["CellRecord", dict]:
    """A cell's record begun from its parameters (the fields CellRecord has), with the software
    provenance and the start time; and the `unavailable` reasons so far."""
    rec = CellRecord.from_dict({k: v for k, v in params.items() if k in FIELDS})
    sw, na = software()
    for k, v in sw.items():
        setattr(rec, k, v)
    rec.utc_start = utc_now()
    return rec, dict(na)


@functools.lru_cache(maxsize=1)
def software() -> tuple[dict, dict]:
    """(fields, unavailable) for git, package versions, Python and the host."""
    out: dict = {"python": platform.python_version(), "numpy": np.__version__, "host": socket.gethostname(),
                 "platform": platform.platform(), "cpu": _cpu_model(), "n_cpus": len(os.sched_getaffinity(0))}
    na: dict = {}
    out["packages"] = {p: _version(p) for p in PACKAGES}
    cupy = next((d for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("cupy")), None)
    out["packages"]["cupy"] = f"{cupy.metadata['Name']} {cupy.version}" if cupy else None
    given = commit_given()                             # a copied checkout (the GPU box): said, not guessed
    if given:
        out["git_commit"] = given
        na["git_dirty"] = "commit given by DS4BENCH_COMMIT; the tree's state is not checked"
        return out, na
    try:
        out["git_commit"] = _git("rev-parse", "HEAD")
        out["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError) as e:
        reason = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        na["git_commit"] = na["git_dirty"] = (f"git: {reason[0] if reason else 'unavailable'} (in {REPO}); "
                                              f"set DS4BENCH_COMMIT")
    return out, na


def _git(*args) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024      # Linux reports KiB


# ---- GPU facts through NVML (nvidia-ml-py) ---------------------------------------------------
SLOWDOWN = {"SwPowerCap": "power cap", "HwSlowdown": "hw slowdown", "SwThermalSlowdown": "sw thermal",
            "HwThermalSlowdown": "hw thermal", "HwPowerBrakeSlowdown": "power brake"}
GPU_FIELDS = ("gpu_name", "gpu_driver", "gpu_uuid", "gpu_pci_bus_id", "cuda_driver", "gpu_mem_bw_gbs", "gpu_sm_clock_mhz_start",
              "gpu_sm_clock_mhz_end", "gpu_sm_clock_mhz_min", "gpu_temp_c_start", "gpu_temp_c_end",
              "gpu_power_w_start", "gpu_power_w_end")


class GpuProbe:
    """One GPU seen through NVML; `reason` says why not when NVML or the device is unavailable.

    A background sampler (start/stop) watches the SM clock and the slowdown reasons while a
    cell's timed repetitions run, so a throttled measurement is flagged."""

    def __init__(self, pci_bus_id: str | None = None, index: int = 0, interval_s: float = 0.2):
        self.nvml = self.handle = None
        self.reason = ""
        self.interval_s = interval_s
        self.min_clock: float | None = None
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
            self.handle = (pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id) if pci_bus_id
                           else pynvml.nvmlDeviceGetHandleByIndex(index))
            self.nvml = pynvml
        except Exception as e:              # NVMLError subclasses: no library, no driver, no device
            self.reason = f"NVML unavailable: {e}"

    def static(self) -> dict:
        p, h = self.nvml, self.handle
        out = {"gpu_name": _s(p.nvmlDeviceGetName(h)), "gpu_driver": _s(p.nvmlSystemGetDriverVersion()),
               "gpu_uuid": _s(p.nvmlDeviceGetUUID(h)), "gpu_pci_bus_id": _s(p.nvmlDeviceGetPciInfo(h).busId)}
        v = int(p.nvmlSystemGetCudaDriverVersion_v2())
        out["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
        try:
            mem_mhz = p.nvmlDeviceGetMaxClockInfo(h, p.NVML_CLOCK_MEM)
            bus_bits = p.nvmlDeviceGetMemoryBusWidth(h)
            out["gpu_mem_bw_gbs"] = mem_mhz * 1e6 * 2 * bus_bits / 8 / 1e9     # double data rate
        except p.NVMLError:
            out["gpu_mem_bw_gbs"] = None
        return out

    def sample(self) -> dict:
        p, h = self.nvml, self.handle
        reasons = self._reasons()
        self.seen |= reasons
        return {"sm_clock_mhz": float(p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_SM)),
                "temp_c": float(p.nvmlDeviceGetTemperature(h, p.NVML_TEMPERATURE_GPU)),
                "power_w": p.nvmlDeviceGetPowerUsage(h) / 1000.0, "throttle": sorted(reasons)}

    def _reasons(self) -> set[str]:
        p = self.nvml
        get = getattr(p, "nvmlDeviceGetCurrentClocksEventReasons", None) or p.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = int(get(self.handle))
        return {text for name, text in SLOWDOWN.items()
                if mask & int(getattr(p, f"nvmlClocksEventReason{name}", getattr(p, f"nvmlClocksThrottleReason{name}", 0)))}

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                clk = self.sample()["sm_clock_mhz"]
            except Exception:               # a sampler must never take the cell down
                return
            self.min_clock = clk if self.min_clock is None else min(self.min_clock, clk)

    def start(self) -> None:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def close(self) -> None:
        self.stop()
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def gpu_fields(probe: GpuProbe | None, start: dict | None, end: dict | None, reason: str) -> tuple[dict, dict]:
    """(fields, unavailable) for the GPU provenance of a cell."""
    if probe is None or probe.handle is None or start is None or end is None:
        why = reason or (probe.reason if probe is not None else "no GPU")
        return {f: None for f in GPU_FIELDS} | {"gpu_throttle": []}, {f: why for f in GPU_FIELDS + ("gpu_throttle",)}
    out = probe.static()
    out.update(gpu_sm_clock_mhz_start=start["sm_clock_mhz"], gpu_sm_clock_mhz_end=end["sm_clock_mhz"],
               gpu_temp_c_start=start["temp_c"], gpu_temp_c_end=end["temp_c"],
               gpu_power_w_start=start["power_w"], gpu_power_w_end=end["power_w"],
               gpu_sm_clock_mhz_min=min(x for x in (probe.min_clock, start["sm_clock_mhz"], end["sm_clock_mhz"])
                                        if x is not None),
               gpu_throttle=sorted(probe.seen))
    na = {"gpu_mem_bw_gbs": "NVML does not report the memory clock or bus width"} if out["gpu_mem_bw_gbs"] is None else {}
    return out, na


# ---- timing, roofline ------------------------------------------------------------------------
PASS_STATS = {"median": np.median, "best": np.max}    # a round's tok/s from its passes' tok/s


def timing_fields(timings: list, throttle: list, pass_stat: str = "median") -> dict:
    """Summaries of the generate() Timing of each repetition (see the module docstring). The
    cell's prefill and decode tok/s are `pass_stat` over its passes: the median, or the best
    (the fastest pass: on a shared host, interference only ever slows a pass down)."""
    pick = PASS_STATS[pass_stat]
    pre = [t.prefill_tps for t in timings]
    dec = [t.decode_tps for t in timings]
    steps = [s * 1e3 for t in timings for s in t.step_s]
    ttft = [s * 1e3 for t in timings for s in t.ttft_s]
    out = {"prefill_tps_reps": pre, "decode_tps_reps": dec, "step_ms": steps, "ttft_samples_ms": ttft,
           "prefill_tps": float(pick(pre)), "decode_tps": float(pick(dec)) if steps else None,
           "ttft_ms": float(np.median(ttft))}
    if steps:
        p50, p90, p99 = np.percentile(steps, [50, 90, 99])
        out.update(latency_p50_ms=float(p50), latency_p90_ms=float(p90), latency_p99_ms=float(p99))
    notes = []
    if len(dec) > 1 and steps:
        spreads = {what: (max(v) - min(v)) / float(np.median(v)) for what, v in (("decode", dec), ("prefill", pre))}
        out["timing_spread"] = max(spreads.values())
        reliable = out["timing_spread"] <= RELIABLE_SPREAD
        notes += [f"{what} tok/s spread {sp:.1%} across {len(dec)} reps > {RELIABLE_SPREAD:.0%}"
                  for what, sp in spreads.items() if sp > RELIABLE_SPREAD]
    else:
        reliable = None
        notes.append("one repetition: spread unknown" if steps else "no decode steps (n=1)")
    if throttle:
        reliable = False
        notes.append(f"GPU clock slowdown seen: {', '.join(throttle)}")
    out.update(timing_reliable=reliable, timing_note="; ".join(notes))
    return out


def roofline_fields(cfg, batch: int, max_context: int, median_step_s: float | None,
                    peak_gbs: float | None, why_no_peak: str) -> tuple[dict, dict]:
    from ..engine.gguf_io import decode_read_bytes
    indexer_active = max_context // 4 > cfg.indexer_topk
    per_step = int(decode_read_bytes(cfg, indexer_active)["total"])
    out = {"bytes_per_step": per_step, "bytes_per_token": per_step / batch, "achieved_gbs": None, "roofline_pct": None}
    na = {}
    if median_step_s:
        out["achieved_gbs"] = per_step / median_step_s / 1e9
    else:
        na["achieved_gbs"] = "no decode steps (n=1)"
    if out["achieved_gbs"] is not None and peak_gbs:
        out["roofline_pct"] = 100.0 * out["achieved_gbs"] / peak_gbs
    else:
        na["roofline_pct"] = why_no_peak or na.get("achieved_gbs", "")
    return out, na


def failed_record(base: dict, error: str, wall_s: float | None = None) -> dict:
    """A record for a cell that produced none: its parameters, provenance of the runner, the error."""
    rec = CellRecord.from_dict(base)
    sw, na = software()
    for k, v in sw.items():
        setattr(rec, k, v)
    rec.status, rec.error, rec.verdict, rec.wall_s = "failed", error, "failed", wall_s
    rec.verdict_reason = error
    rec.utc_end = utc_now()
    rec.unavailable = dict(na, measurements="the cell failed before producing a record")
    return rec.to_dict()


