"""asv suite: prefill and decode speed, and greedy-output correctness, per cell.

A cell is preset x cache mode x placement x batch, as in the matrix runner. Placement `cpu` is
the NumPy reference backend; device | managed | managed-hinted | host are the CuPy engine's
weight placements (n/a without a GPU). Correctness is tracked like speed, so a perf toggle
that changes the answer shows as a step in asv's graphs:

  track_first_divergence    decode steps until the cell's greedy tokens leave the baseline's
                            (f32, batch 1, same backend; the device placement on a GPU), the
                            earliest over the prompts; the generated length when they never do
  track_max_logprob_delta   max |Δlogprob| (nats) over the compared steps of every prompt

The default parameters fit a CPU (tiny preset, placement cpu, batch 1 and 4). On the GPU box
DS4BENCH_ASV_FULL=1 widens them to tiny and flash-4l, every placement, batch 1 and 16;
DS4BENCH_ASV_PRESETS / _CACHES / _PLACEMENTS / _BATCHES (comma lists) and DS4BENCH_ASV_N
(generated tokens) override single axes. Set them before `asv run`: asv discovers the
parameters and runs the benchmarks in separate processes that read the same variables.

Cost per commit. Every cell's correctness tracks, decode tokens/s and device memory come from
one pass over the grid in `setup_cache` (one process per commit, one engine per cell, freed
before the next), so asv's one-process-per-benchmark-and-parameter launches cost nothing for
them. `time_prefill` and `time_decode_step` need their own engine in their own process (asv
times them there); DS4BENCH_ASV_TIME_PRESETS and DS4BENCH_ASV_TIME_PLACEMENTS (comma lists;
default all; benchmarks/asv_range.sh: tiny, device) limit them to the cells they list (asv
starts no process for the others). DS4BENCH_ASV_SKIP leaves cells out altogether (e.g.
flash-4l:host); DS4BENCH_ASV_LOG names a file that gets each setup_cache cell's outcome and time.

A cell is built and measured by the harness's cell module (prepare, prime, measure: the code a
matrix cell runs, so the environment's engine toggles apply here too); at a commit before that
module the engine API every benchmarked commit shares is used instead (cli.load_model,
generate.Engine, generate.generate). synth.write_model, prompts.load_prompts and
verdict.compare_prompt serve both; the prompts come from this checkout's benchmarks/prompts,
since an installed package has none. Modules are imported through `_ds4`: from ds4bench/engine/
and ds4bench/harness/, or from the flat package of the commits before those folders.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

FULL = os.environ.get("DS4BENCH_ASV_FULL", "") not in ("", "0")
GPU_PLACEMENTS = ("device", "managed", "managed-hinted", "host")
PROMPTS = Path(__file__).resolve().parent / "prompts" / "smoke.toml"
BASELINE_CACHE = "f32"


def _axis(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def _ints(name: str, default: str) -> list[int]:
    try:
        return [int(v) for v in _axis(name, default)]
    except ValueError:
        raise ValueError(f"{name}={os.environ.get(name)!r}: expected comma-separated integers") from None


PRESETS = _axis("DS4BENCH_ASV_PRESETS", "tiny,flash-4l" if FULL else "tiny")
CACHES = _axis("DS4BENCH_ASV_CACHES", "f32,q8,f16")
PLACEMENTS = _axis("DS4BENCH_ASV_PLACEMENTS", ",".join(GPU_PLACEMENTS) if FULL else "cpu")
BATCHES = _ints("DS4BENCH_ASV_BATCHES", "1,16" if FULL else "1,4")
N_GEN = _ints("DS4BENCH_ASV_N", "16")[0]
TIME_PRESETS = _axis("DS4BENCH_ASV_TIME_PRESETS", ",".join(PRESETS))
TIME_PLACEMENTS = _axis("DS4BENCH_ASV_TIME_PLACEMENTS", ",".join(PLACEMENTS))
# cells left out (n/a), e.g. "flash-4l:host,flash-4l:managed": a cell matching every value of
# one pattern (preset, cache, placement or batch values, colon-separated) is not measured
SKIP = [tuple(v.split(":")) for v in _axis("DS4BENCH_ASV_SKIP", "")]


# The subpackage of each module this suite imports (commits before the grouping have them flat).
_PACKAGE = {"config": "engine", "formats": "engine", "generate": "engine", "gguf_io": "engine", "ops_gpu": "engine",
            "prompts": "engine", "synth": "engine", "tokenizer": "engine",
            "cell": "harness", "rounds": "harness", "verdict": "harness"}


def _ds4(name: str):
    """ds4bench's module `name`: ds4bench.<engine|harness>.<name>, or ds4bench.<name> at a commit
    before the package was grouped. ModuleNotFoundError when the commit has neither; an import
    error inside the module itself is raised as it is."""
    import importlib
    grouped = f"ds4bench.{_PACKAGE[name]}"
    try:
        return importlib.import_module(f"{grouped}.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (grouped, f"{grouped}.{name}"):
            raise
    return importlib.import_module(f"ds4bench.{name}")


def _has(name: str) -> bool:
    """Whether this commit's ds4bench has module `name` (grouped or flat), without importing it."""
    for full in (f"ds4bench.{_PACKAGE[name]}.{name}", f"ds4bench.{name}"):
        try:
            if importlib.util.find_spec(full) is not None:
                return True
        except ModuleNotFoundError:                  # the commit has no such subpackage
            pass
    return False


def _skipped(key: tuple) -> str | None:
    vals = {str(v) for v in key}
    hit = next((pat for pat in SKIP if set(pat) <= vals), None)
    return f"left out by DS4BENCH_ASV_SKIP ({':'.join(hit)})" if hit else None


def _backend(placement: str) -> str:
    """numpy for placement cpu, cupy for the GPU placements; NotImplementedError (asv: n/a)
    where this machine cannot run it."""
    if placement == "cpu":
        return "numpy"
    if placement not in GPU_PLACEMENTS:
        raise NotImplementedError(f"placement {placement!r}: choose cpu or one of {', '.join(GPU_PLACEMENTS)}")
    if importlib.util.find_spec("cupy") is None or not _has("ops_gpu"):
        raise NotImplementedError(f"placement {placement} needs CuPy and ds4bench's ops_gpu")
    import cupy
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise NotImplementedError("no CUDA device is visible")
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise NotImplementedError(f"no CUDA device: {e}") from None
    return "cupy"


def _model_dir() -> Path:
    """Synthetic GGUFs, keyed by the source of the code that writes and reads them, so one
    commit's file is reused by every commit whose writer and reader are the same."""
    import ds4bench
    pkg = Path(ds4bench.__file__).resolve().parent
    engine = pkg / "engine" if (pkg / "engine").is_dir() else pkg          # flat before the grouping
    h = hashlib.sha256()
    for name in ("config.py", "synth.py", "gguf_io.py", "formats.py"):
        p = engine / name
        h.update(p.read_bytes() if p.is_file() else b"")
    root = Path(os.environ.get("DS4BENCH_MODEL_CACHE") or Path.home() / ".cache" / "ds4bench" / "models")
    return root / f"asv-{h.hexdigest()[:16]}"


def _write_models() -> dict[str, str]:
    C = _ds4("config")
    write_model = _ds4("synth").write_model
    out = {}
    for preset in PRESETS:
        cfg = C.preset(preset)
        path = _model_dir() / f"{cfg.name}-{cfg.variant}-seed0.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            write_model(cfg, str(tmp), 0)
            os.replace(tmp, path)
        out[preset] = str(path)
    return out


def _cell_module():
    """The cell module (the one way a cell is built and measured), or None at a commit before it."""
    try:
        return _ds4("cell")
    except ImportError:
        return None


def _params(model_file: str, preset: str, cache: str, backend: str, placement: str, batch: int, ctx: int) -> dict:
    """The cell's parameters as the matrix gives them to the cell module."""
    return {"model_file": model_file, "preset": preset, "variant": None, "seed": 0, "prompt_set": str(PROMPTS),
            "n_gen": N_GEN, "ctx": ctx, "cache": cache, "backend": backend,
            "placement": placement if backend == "cupy" else None, "batch": batch, "chunk": 512, "reps": 1,
            "warmup": 0, "env": {}, "correctness": False}


class _Loaded:
    """One cell's model, tokenized prompts and engine: built by the cell module's prepare (the
    environment's engine toggles apply, as in a matrix cell), or at a commit before it by the
    engine API every commit shares."""

    def __init__(self, models: dict, preset: str, cache: str, placement: str, batch: int, extra_ctx: int):
        backend = _backend(placement)
        if preset not in models:
            raise NotImplementedError(f"preset {preset} has no model (setup_cache wrote {sorted(models)})")
        cell = _cell_module()
        if cell is not None:
            # context: the longest prompt + extra_ctx (prepare's default is longest + n_gen + 1)
            prep = cell.prepare(dict(_params(models[preset], preset, cache, backend, placement, batch, 0),
                                     n_gen=extra_ctx - 1))
            self.model, self.prompts, self.engine, self.ctx = prep.model, prep.prompts, prep.engine, prep.options.ctx
            return
        from ds4bench.cli import load_model
        Engine = _ds4("generate").Engine
        load_prompts = _ds4("prompts").load_prompts
        Tokenizer = _ds4("tokenizer").Tokenizer
        self.model = load_model(models[preset], preset)
        tok = Tokenizer.from_gguf_metadata(self.model.metadata)
        self.prompts = [(p.id, tok.chat(p.text)) for p in load_prompts(str(PROMPTS))]
        self.ctx = max(len(ids) for _, ids in self.prompts) + extra_ctx
        opts = {"placement": placement} if backend == "cupy" else {}
        self.engine = Engine(self.model, cache=cache, backend=backend, batch=batch, ctx=self.ctx, **opts)

    def prime(self) -> None:
        """Build the mode's lazily expanded weights (and compile kernels) outside the timing."""
        cell = _cell_module()
        if cell is not None:
            cell.prime(self.engine, self.prompts)
            return
        generate = _ds4("generate").generate
        pid, ids = self.prompts[0]
        generate(self.engine, [(pid, ids[:8])], 2)
    def settle(self) -> None:
        """Warm up as the matrix does (rounds.warm_up: passes of the first prompt until the
        decode step settles, with a time cap); a commit before that rule gets asv's warm-up."""
        try:
            warm_up = _ds4("rounds").warm_up
        except (ImportError, AttributeError):
            return
        generate = _ds4("generate").generate
        n = max(1, min(16, self.ctx - len(self.prompts[0][1])))         # Prefill's engine has no room to decode
        warm_up(lambda: generate(self.engine, self.prompts[:1], n).timing)

    def generate(self):
        return _ds4("generate").generate(self.engine, self.prompts, N_GEN)


def _steps(fps) -> dict:
    """Fingerprints as the arrays verdict.compare_prompt reads, keyed by prompt id."""
    return {f.prompt_id: {"tokens": list(f.tokens), "topk_ids": [list(s) for s in f.topk_ids],
                          "topk_lp": [list(s) for s in f.topk_logprobs]} for f in fps}


def _log(line: str) -> None:
    """A progress line on stderr, and appended to $DS4BENCH_ASV_LOG when set (asv shows a
    setup_cache's stderr only when it fails)."""
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("DS4BENCH_ASV_LOG"):
        with open(os.environ["DS4BENCH_ASV_LOG"], "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def _release() -> None:
    """Give a finished cell's device memory back before the next cell places its weights."""
    import gc
    gc.collect()
    if "cupy" in sys.modules:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


def _measure(models: dict, preset: str, cache: str, placement: str, batch: int) -> dict:
    """One cell, once: a greedy generation of the smoke prompts (its fingerprints and decode
    tokens/s) and the device pool's high-water mark; by the cell module's measure (prime pass,
    warm-up until the step settles, one timed pass), or at a commit before it as it did then."""
    _release()            # blocks the previous cell freed late (its results outlive its finally)
    cell = _cell_module()
    if cell is not None:
        backend = _backend(placement)
        if preset not in models:
            raise NotImplementedError(f"preset {preset} has no model (setup_cache wrote {sorted(models)})")
        m = cell.measure(_params(models[preset], preset, cache, backend, placement, batch, 0))
        try:
            return {"backend": backend, "tps": m.record["decode_tps"], "steps": _steps(m.results[0].fingerprints),
                    "device_bytes": m.record.get("device_peak_bytes")}
        finally:
            del m
            _release()
    loaded = _Loaded(models, preset, cache, placement, batch, N_GEN + 1)
    try:
        loaded.prime()
        res = loaded.generate()
        report = getattr(loaded.engine.ops, "memory", None)
        return {"backend": loaded.engine.backend, "tps": res.timing.decode_tps, "steps": _steps(res.fingerprints),
                "device_bytes": int(report()["pool_total_bytes"]) if report else None}
    finally:
        del loaded
        _release()


def _judge(cells: dict) -> None:
    """First divergence and max |Δlogprob| of every measured cell against its baseline: f32,
    batch 1, the same preset and backend (device placement on a GPU)."""
    try:
        compare_prompt = _ds4("verdict").compare_prompt
    except (ImportError, AttributeError):
        for c in cells.values():
            c["no_baseline"] = "this commit has no verdict.compare_prompt"
        return
    for (preset, cache, placement, batch), c in cells.items():
        if "steps" not in c:
            continue
        base_key = (preset, BASELINE_CACHE, "device" if placement in GPU_PLACEMENTS else placement, 1)
        base = cells.get(base_key, {}).get("steps")
        if base is None:
            c["no_baseline"] = f"the baseline cell {base_key} did not run"
            continue
        cmp = [compare_prompt(c["steps"][pid], base[pid])[0] for pid in c["steps"]]
        c["first_div"] = min(N_GEN if x["first_divergence"] is None else x["first_divergence"] for x in cmp)
        c["max_dlp"] = max(x["max_dlogprob"] for x in cmp)


class _Cells:
    """The parameter grid and the setup every benchmark of it shares."""
    params = [PRESETS, CACHES, PLACEMENTS, BATCHES]
    param_names = ["preset", "cache", "placement", "batch"]
    # asv keys results on a benchmark's version (by default a hash of its code and setup_cache),
    # and never puts results of two versions on one graph: explicit versions keep the history
    # joined across edits that measure the same thing. Bump a class's version when its numbers
    # change meaning.
    version = "1"
    timeout = 3600.0 if FULL else 600.0

    def setup_cache(self):
        """Once per commit: write each preset's synthetic GGUF, then measure every cell of the
        grid (and each backend's f32 batch-1 baseline, if the grid lacks it) and judge it."""
        models = _write_models()
        grid = [(p, c, pl, b) for p in PRESETS for pl in PLACEMENTS for c in CACHES for b in BATCHES]
        bases = {(p, BASELINE_CACHE, "device" if pl in GPU_PLACEMENTS else pl, 1) for p, _, pl, _ in grid}
        cells = {}
        for key in sorted(bases - set(grid)) + grid:     # baselines first: a later failure cannot lose them
            if _skipped(key) and key not in bases:
                cells[key] = {"na": _skipped(key)}
                continue
            t0 = time.perf_counter()
            try:
                cells[key] = _measure(models, *key)
            except NotImplementedError as e:
                cells[key] = {"na": str(e)}
            except Exception as e:                       # one cell's crash fails that cell, not the run
                cells[key] = {"error": f"{type(e).__name__}: {e}"}
            outcome = cells[key].get("error") or cells[key].get("na") or f"{cells[key]['tps']:.1f} tok/s"
            _log(f"setup_cache {':'.join(map(str, key))}: {outcome} ({time.perf_counter() - t0:.1f} s)")
        _judge(cells)
        return {"models": models, "cells": cells}


def _timed_cell(cached: dict, preset: str, cache: str, placement: str, batch: int, extra_ctx: int) -> "_Loaded":
    """A primed engine for a time_* benchmark, where DS4BENCH_ASV_TIME_PRESETS / _TIME_PLACEMENTS
    say (each needs its own process and engine per cell) and not on skipped cells."""
    if preset not in TIME_PRESETS or placement not in TIME_PLACEMENTS:
        raise NotImplementedError(f"time_* benchmarks run on presets {', '.join(TIME_PRESETS)} and placements "
                                  f"{', '.join(TIME_PLACEMENTS)} (DS4BENCH_ASV_TIME_PRESETS, _TIME_PLACEMENTS)")
    why = _skipped((preset, cache, placement, batch))
    if why:
        raise NotImplementedError(why)
    cell = _Loaded(cached["models"], preset, cache, placement, batch, extra_ctx)
    cell.prime()
    return cell


def _cell(cached: dict, key: tuple) -> dict:
    """The setup_cache measurement of one cell, or the reason it has none (asv shows n/a)."""
    c = cached["cells"].get(tuple(key))
    if c is None:
        raise NotImplementedError(f"cell {key} was not measured")
    if "na" in c:
        raise NotImplementedError(c["na"])
    if "error" in c:                 # a crash is a failure (asv: failed), never a quiet n/a
        raise RuntimeError(f"cell {key} failed in setup_cache: {c['error']}")
    return c


class _TimedCells(_Cells):
    """The grid narrowed to DS4BENCH_ASV_TIME_PRESETS x _TIME_PLACEMENTS: asv starts a process
    per parameter combination, so cells that would only say n/a are not listed at all.

    Most of a step time's variance is between processes (docs/speed.md), so each cell is timed
    in `processes` fresh processes (asv's rounds; `asv run --interleave-rounds` interleaves
    them across benchmarks) and asv's statistics see that spread: `asv compare` of two
    identical commits then reports no change. Each process is primed and warmed up until the
    step time settles (`_Loaded.settle`) before asv times it."""
    params = [[p for p in PRESETS if p in TIME_PRESETS] or PRESETS, CACHES,
              [pl for pl in PLACEMENTS if pl in TIME_PLACEMENTS] or PLACEMENTS, BATCHES]
    number = 1                       # one call per sample: each changes the engine's state
    warmup_time = 0.0                # setup primes the engine and warms it up until the steps settle
    processes = 5


class Prefill(_TimedCells):
    """Every slot of the batch prefilled with the first smoke prompt."""
    repeat = (2, 10, 2.0)

    def setup(self, cached, preset, cache, placement, batch):
        self.cell = _timed_cell(cached, preset, cache, placement, batch, 1)
        self.cell.settle()
        self.ids = self.cell.prompts[0][1]

    def time_prefill(self, cached, preset, cache, placement, batch):
        eng = self.cell.engine
        eng.state.reset()
        for b in range(eng.batch):
            eng.prefill(b, self.ids)
        eng.sync()


class DecodeStep(_TimedCells):
    """One decode step: one token for each of the batch's sequences."""
    repeat = (3, 40, 2.0)

    def setup(self, cached, preset, cache, placement, batch):
        import numpy as np
        greedy = _ds4("generate").greedy
        self.cell = _timed_cell(cached, preset, cache, placement, batch, 256)
        self.cell.settle()
        eng = self.cell.engine
        eng.state.reset()
        ids = self.cell.prompts[0][1]
        self.last = np.array([greedy(eng.prefill(b, ids)) for b in range(batch)], dtype=np.int64)
        self.slots = np.arange(batch)

    def time_decode_step(self, cached, preset, cache, placement, batch):
        eng = self.cell.engine
        if int(eng.state.pos[0]) >= eng.ctx - 1:
            raise RuntimeError(f"decode ran past the {eng.ctx}-token context; lower DecodeStep.repeat")
        eng.decode(self.last, self.slots)
        eng.sync()


class HostMemory(_Cells):
    """Peak resident memory of a NumPy cell's process through load, prime and one generation
    (placement cpu only: the others are not listed, so asv starts no process for them)."""
    params = [PRESETS, CACHES, ["cpu"], BATCHES]

    def setup(self, cached, preset, cache, placement, batch):
        if placement not in PLACEMENTS:
            raise NotImplementedError("host peak memory is tracked for the NumPy backend, and this grid "
                                      "has no placement cpu")
        self.models = cached["models"]

    def peakmem_generate(self, cached, preset, cache, placement, batch):
        cell = _Loaded(self.models, preset, cache, placement, batch, N_GEN + 1)
        cell.prime()
        cell.generate()


class Generation(_Cells):
    """One greedy generation of the smoke prompts (N_GEN tokens each) per cell, compared with the
    baseline: measured once per commit in setup_cache."""

    def setup(self, cached, preset, cache, placement, batch):
        self.c = _cell(cached, (preset, cache, placement, batch))
        if "no_baseline" in self.c:
            raise NotImplementedError(self.c["no_baseline"])

    def track_decode_tokens_per_s(self, cached, preset, cache, placement, batch):
        return self.c["tps"]
    track_decode_tokens_per_s.unit = "tokens/s"

    def track_first_divergence(self, cached, preset, cache, placement, batch):
        return self.c["first_div"]
    track_first_divergence.unit = "tokens"

    def track_max_logprob_delta(self, cached, preset, cache, placement, batch):
        return self.c["max_dlp"]
    track_max_logprob_delta.unit = "nats"


class DeviceMemory(_Cells):
    """CuPy's pool total after one generation: the device high-water mark (weights placed on the
    device, caches, run state), for the GPU placements (only those are listed). Measured in
    setup_cache. Version 2: the pool is released before each cell (version 1 could count blocks
    the previous cell freed late)."""
    params = [PRESETS, CACHES, [pl for pl in PLACEMENTS if pl in GPU_PLACEMENTS] or ["device"], BATCHES]
    version = "2"

    def setup(self, cached, preset, cache, placement, batch):
        if placement not in PLACEMENTS:
            raise NotImplementedError("device memory is tracked for the GPU placements, and this grid has none")
        self.c = _cell(cached, (preset, cache, placement, batch))
        if self.c["device_bytes"] is None:
            raise NotImplementedError(f"backend {self.c['backend']} reports no device memory")

    def track_device_peak_bytes(self, cached, preset, cache, placement, batch):
        return self.c["device_bytes"]
    track_device_peak_bytes.unit = "bytes"
