"""One cell, measured in this process: the one way ds4bench times and fingerprints a configuration.

    prepare(params)                  the model, its tokenized prompts and an Engine built from
                                     EngineOptions (the environment's toggles, the params' fields)
    measure(params, fingerprints)    prepare, then the prime pass, the warm-up, `reps` timed passes,
                                     fingerprints and (round 1) the correctness passes -> Measured
    run_cell(params, out, fp)        `ds4bench cell`: measure and write the record to `out`

The matrix runs each round of a cell as a `ds4bench cell` process (matrix.run_cell_process);
the asv suite (benchmarks/bench_decode.py) and bench-kernels' decode rows (kbench.decode_layers)
build their engines with `prepare` and the asv suite measures with `measure`, so the three agree
on what a cell is: its options, its prime pass and its warm-up rule.

`params` are a matrix cell's (matrix.expand): model_file / preset / variant / seed, prompt_set,
n_gen, ctx (0: the longest prompt + n_gen + 1), cache (the numeric mode), backend, placement,
batch, chunk, env, nvtx, trace, warmup, settle, warmup_cap_s, reps, pass_stat, stages, and for
the matrix's rounds correctness, baseline_fingerprints, probe_cache.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import record
from . import verdict
from ..engine.options import EngineOptions, toggles_in_effect
from .record import TRACE_FIELDS
from .rounds import SETTLE, WARMUP_CAP_S, warm_up

PRIME_TOKENS, PRIME_GEN = 8, 2          # the untimed prime pass: 8 prompt tokens, 2 generated


@dataclass
class Prepared:
    model: object                       # gguf_io.ModelFile
    tokenizer: object
    prompts: list                       # [(prompt id, token ids)]
    options: EngineOptions
    engine: object                      # generate.Engine
    load_s: float
    setup_s: float


def options_for(params: dict, ctx: int, environ=None) -> EngineOptions:
    """The cell's EngineOptions: its params' fields over the toggles of `environ` (default: this
    process's, which the matrix sets from the cell's env)."""
    return EngineOptions.from_env(environ, mode=params["cache"], backend=params["backend"], batch=params["batch"],
                                  ctx=ctx, chunk=params.get("chunk") or 512,
                                  placement=params.get("placement") or None)


def prepare(params: dict, profiler=None, environ=None) -> Prepared:
    """Load the cell's model, tokenize its prompts and build its Engine (not yet primed)."""
    from ..engine.generate import Engine
    from ..engine.models import load_model
    from ..engine.prompts import load_prompts
    from ..engine.tokenizer import Tokenizer
    p = params
    t0 = time.perf_counter()
    mf = load_model(p.get("model_file"), p.get("preset"), p.get("variant"), p.get("seed", 0))
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_gguf_metadata(mf.metadata)
    prompts = [(q.id, tok.chat(q.text)) for q in load_prompts(p["prompt_set"])]
    longest = max(len(ids) for _, ids in prompts)
    opts = options_for(p, p.get("ctx") or longest + p["n_gen"] + 1, environ)
    t0 = time.perf_counter()
    eng = Engine(mf, opts, profiler=profiler)
    if opts.gpu:
        import cupy
        cupy.cuda.runtime.deviceSynchronize()
    return Prepared(mf, tok, prompts, opts, eng, load_s, time.perf_counter() - t0)


def prime(eng, prompts) -> float:
    """The untimed prime pass (lazily built weights, kernel compilation, the decode graph's
    capture); returns its seconds."""
    from ..engine.generate import generate
    t0 = time.perf_counter()
    generate(eng, [(prompts[0][0], prompts[0][1][:PRIME_TOKENS])], PRIME_GEN)
    return time.perf_counter() - t0


@dataclass
class Measured:
    record: dict                        # the CellRecord, as a dict
    results: list                       # the timed passes' generate.GenerationResult
    prepared: Prepared


def measure(params: dict, fingerprints: str | None = None, environ=None) -> Measured:
    """Measure one cell in this process: load, prime, warm up, time the repetitions, fingerprint;
    then (unless params `correctness` is False: a later round, timing only) the teacher-forced
    KL against `baseline_fingerprints` and the stage probe (reference cached in `probe_cache`).

    The prime pass (8 tokens of the first prompt, 2 generated) is never timed: it builds the
    mode's lazily expanded weights (and compiles kernels on a GPU). `warmup` full passes follow,
    then `reps` timed ones; with `stages`, one more pass gives per-stage times (CUDA events on a
    GPU, host time on the CPU: profiling.make_profiler("stages"))."""
    if params.get("engine", "ds4bench") != "ds4bench":      # another engine, run as a command
        from .command_engine import measure as measure_command
        return Measured(measure_command(params, fingerprints), [], None)
    from ..engine.generate import generate
    from ..engine.profiling import make_profiler, stage_of
    p = params
    rec, na = record.start_record(p)
    rec.env = {**p.get("env", {}), **toggles_in_effect(environ)}         # toggles in effect
    prof = None
    if p.get("nvtx") or p.get("trace"):
        from ..engine.profiling import NvtxRanges
        prof = NvtxRanges()
    prep = prepare(p, prof, environ)
    mf, tok, prompts, opts, eng = prep.model, prep.tokenizer, prep.prompts, prep.options, prep.engine
    rec.load_s, rec.setup_s, rec.ctx = prep.load_s, prep.setup_s, opts.ctx
    rec.variant = mf.cfg.variant
    if not p.get("model_file"):
        na["model_file"] = f"synthetic preset {p['preset']} generated in memory (seed {p.get('seed', 0)})"
    if not p.get("placement"):
        na["placement"] = "numpy backend: no placement axis (weights live in host memory)"
    longest = max(len(ids) for _, ids in prompts)
    gpu = opts.gpu
    slow = opts.slowdown
    rec.decode_path = eng.decode_path
    prime_s = prime(eng, prompts)
    rec.capture_s = eng.graph.capture_s if eng.graph is not None else None
    rec.compile_s = prime_s - (rec.capture_s or 0.0)
    if rec.capture_s is None:
        na["capture_s"] = f"decode path {eng.decode_path}: no graph captured"
    wu = warm_up(lambda: generate(eng, prompts, p["n_gen"]).timing, p.get("warmup", 0), p.get("settle", SETTLE),
                 p.get("warmup_cap_s", WARMUP_CAP_S))
    rec.warmup_passes, rec.warmup_settled, rec.warmup_s = wu["passes"], wu["settled"], wu["warmup_s"]
    if slow is not None:                        # the known slowdown: a fraction of the settled step
        eng.net.delay.calibrate(wu["step_s"])
        rec.slowdown, rec.slowdown_true_ratio = str(slow), slow.true_ratio
        if gpu and eng.graph is None:           # the wait fills the idle gaps of a launch-bound step
            rec.slowdown_true_ratio = None
            na["slowdown_true_ratio"] = ("eager GPU decode: the wait can hide in the GPU's idle time between "
                                         "launches, so the ratio is not known (DS4BENCH_DECODE_GRAPH=on)")
        rec.slowdown_step_s, rec.slowdown_base_step_s = eng.net.delay.step_s, eng.net.delay.base_step_s
    else:
        for k in ("slowdown_step_s", "slowdown_base_step_s", "slowdown_true_ratio"):
            na[k] = "no DS4BENCH_SLOWDOWN"
    if gpu:
        import cupy
        v = cupy.cuda.runtime.runtimeGetVersion()
        rec.cupy, rec.cuda_runtime = cupy.__version__, f"{v // 1000}.{v % 1000 // 10}"
    else:
        na["cupy"] = na["cuda_runtime"] = "numpy backend: CuPy is not used"
    nvml = record.GpuProbe(_pci_bus_id()) if gpu else None
    start = nvml.sample() if nvml and nvml.handle else None
    if nvml:
        nvml.start()
    t0 = time.perf_counter()
    with _capture(gpu and p.get("trace")):
        results = [generate(eng, prompts, p["n_gen"], tok.decode) for _ in range(p.get("reps", 1))]
    rec.timed_s = time.perf_counter() - t0
    if nvml:
        nvml.stop()
    end = nvml.sample() if nvml and nvml.handle else None
    g, gna = record.gpu_fields(nvml, start, end, "" if gpu else "numpy backend: the cell does not use a GPU")
    for k, v in g.items():
        setattr(rec, k, v)
    na.update(gna)
    if nvml:
        nvml.close()

    for k, v in record.timing_fields([r.timing for r in results], rec.gpu_throttle,
                                     p.get("pass_stat") or "median").items():
        setattr(rec, k, v)
    for k in ("decode_tps", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "timing_spread", "timing_reliable"):
        na[k] = rec.timing_note
    if not p.get("trace"):
        for k in TRACE_FIELDS:
            na[k] = "not traced (--trace)"
    if p.get("stages"):
        from ..engine.generate import Engine
        timer = make_profiler("stages", p["backend"])
        generate(Engine(mf, opts.replace(slowdown=None, decode_graph="off"), profiler=timer, ops=eng.ops),
                 prompts, p["n_gen"])
        for name, s in timer.summary().items():
            rec.stage_s[stage_of(name)] = rec.stage_s.get(stage_of(name), 0.0) + s
    else:
        na["stage_s"] = "stage times not asked for (--stages)"

    kl_lp = None
    if p.get("correctness", True) and fingerprints:
        t0 = time.perf_counter()
        kl_lp = _cell_kl(rec, na, eng, prompts, p["n_gen"], fingerprints, p.get("baseline_fingerprints"), results[0])
        _cell_probe(rec, na, mf, eng, p, prompts,
                    Path(p.get("probe_cache") or Path(fingerprints).parent.parent / "probe-cache"), environ)
        rec.correctness_s = time.perf_counter() - t0
    else:
        from . import kl
        for k in (*kl.FIELDS, "probe_stages", "probe_s", "probe_mode", "probe_positions", "probe_lead", "probe_cached"):
            na[k] = ("a later round: timing only (correctness comes from round 1)" if fingerprints
                     else "measured without fingerprints: timing only")
        na["correctness_s"] = "timing only"

    rec.deterministic = all([f.tokens for f in r.fingerprints] == [f.tokens for f in results[0].fingerprints]
                            for r in results)
    for i, fp in enumerate(results[0].fingerprints):
        rec.prompts.append({"prompt_id": fp.prompt_id, "prompt_tokens": fp.prompt_tokens, "sha256": fp.sha256,
                            "text": fp.text, "tokens": fp.tokens,
                            "nonfinite": any(r.fingerprints[i].nonfinite for r in results),
                            "replica_mismatch": max(r.fingerprints[i].replica_mismatch for r in results)})
    if fingerprints:
        verdict.save_fingerprints(fingerprints, results[0].fingerprints, results[0].first_logits, kl_lp)

    rec.host_rss_peak_bytes = record.host_rss_peak_bytes()
    rec.state_bytes, rec.weights_bytes = int(eng.state.nbytes()), int(mf.nbytes)
    mem = _device_memory(eng) if gpu else {}
    rec.device_peak_bytes, rec.managed_bytes = mem.get("device_peak_bytes"), mem.get("managed_bytes")
    for k in ("device_peak_bytes", "managed_bytes"):
        if getattr(rec, k) is None:
            na[k] = mem.get("why", "numpy backend: no device memory")
    steps = [s for r in results for s in r.timing.step_s]
    why_peak = na.get("gpu_mem_bw_gbs", "") if gpu else "numpy backend: no GPU bandwidth roofline"
    roof, rna = record.roofline_fields(mf.cfg, p["batch"], longest + p["n_gen"],
                                  sorted(steps)[len(steps) // 2] if steps else None, rec.gpu_mem_bw_gbs, why_peak)
    for k, v in roof.items():
        setattr(rec, k, v)
    na.update(rna)
    rec.unavailable = {k: v for k, v in na.items() if getattr(rec, k, None) in (None, [], {})}
    rec.utc_end = record.utc_now()
    return Measured(rec.to_dict(), results, prep)


def run_cell(params: dict, out: str, fingerprints: str) -> dict:
    """`ds4bench cell`: measure one cell in this process (measure) and write its record to `out`."""
    from .results import write_atomic
    d = measure(params, fingerprints).record
    write_atomic(Path(out), json.dumps(d))
    return d


def _cell_kl(rec, na: dict, eng, prompts, n_gen: int, fingerprints: str, baseline_fp: str | None, result):
    """The teacher-forced KL pass (kl.py): a baseline scores its own tokens and returns its
    log-softmax to keep in its fingerprints; another cell scores the baseline's tokens and
    fills the KL fields. Returns the log-softmax to store (baseline) or None."""
    import numpy as np
    from . import kl
    t0 = time.perf_counter()
    if baseline_fp is None or Path(baseline_fp).resolve() == Path(fingerprints).resolve():
        own = {fp.prompt_id: {"tokens": np.asarray(fp.tokens)} for fp in result.fingerprints}
        lp = kl.teacher_forced(eng, prompts, n_gen, own)
        base = {pid: {"tokens": own[pid]["tokens"], "logprobs": lp[pid]} for pid in lp}
        keep = lp
    elif not Path(baseline_fp).is_file():
        for k in kl.FIELDS:
            na[k] = f"the baseline's fingerprints {baseline_fp} are missing (did the baseline fail?)"
        return None
    else:
        base, keep = verdict.load_fingerprints(baseline_fp), None
        if not all("logprobs" in base.get(pid, {}) for pid, _ in prompts):
            for k in kl.FIELDS:
                na[k] = "the baseline's fingerprints have no teacher-forcing log-softmax (an older run)"
            return None
        lp = kl.teacher_forced(eng, prompts, n_gen, base)
    for k, v in kl.cell_kl(lp, base).items():
        setattr(rec, k, v)
    rec.kl_s = time.perf_counter() - t0
    return keep


def _cell_probe(rec, na: dict, mf, eng, p: dict, prompts, cache_dir: Path, environ=None) -> None:
    """The stage probe (probe.py) of the cell's ops (and the faults its engine carries, if any):
    per-stage statistics and the first stage over its limit."""
    from . import probe
    opts = {"faults": eng.faults} if getattr(eng, "faults", None) else {}
    res = probe.probe_cell(mf, eng.ops, p, prompts, cache_dir, environ, **opts)
    if not res:
        for k in ("probe_stages", "probe_s", "probe_mode", "probe_positions", "probe_lead", "probe_cached"):
            na[k] = "probe off (DS4BENCH_PROBE_TOKENS=0)"
        return
    for k, v in res.items():
        setattr(rec, k, v)


@contextlib.contextmanager
def _capture(on: bool):
    """The Nsight Systems capture range (cudaProfilerStart/Stop) around the timed repetitions;
    the device is synchronized at both ends so the range holds exactly their GPU work."""
    if not on:
        yield
        return
    import cupy
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.profiler.start()
    try:
        yield
    finally:
        cupy.cuda.runtime.deviceSynchronize()
        cupy.cuda.profiler.stop()


def _pci_bus_id() -> str | None:
    try:
        import cupy
        return cupy.cuda.runtime.deviceGetPCIBusId(cupy.cuda.runtime.getDevice())
    except Exception:
        return None


def _device_memory(eng) -> dict:
    """Device bytes from the GPU ops' memory() report: CuPy's pool total (the pool keeps freed
    blocks, so it is the pool's high-water mark: device-placed weights, caches, run state) and
    the weights placed in managed memory (outside the pool)."""
    report = getattr(eng.ops, "memory", None)
    if report is None:
        return {"why": "the GPU ops have no memory() report"}
    m = dict(report())
    managed = m.get("weights_bytes", 0) if str(m.get("placement", "")).startswith("managed") else 0
    return {"device_peak_bytes": m.get("pool_total_bytes"), "managed_bytes": managed,
            "why": "the GPU ops' memory() report lacks it"}
