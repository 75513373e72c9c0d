"""The `ds4bench` command: a thin front that maps subcommands onto library calls.

User errors (bad files, unknown modes, invalid specs) become one line on stderr and exit 2 here,
in one place; the library raises, it never prints or exits.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .engine import config as C
from .engine.config import check_placement
from .engine.models import load_model              # noqa: F401  (also the asv suite's entry, at every commit)
from .engine.options import get as env_get


class UserError(Exception):
    """A problem with the user's input; printed as one line."""


def model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("file", nargs="?", help="a DS4 GGUF file")
    else:
        p.add_argument("--model", "-m", help="a DS4 GGUF file (default: a synthetic preset)")
    p.add_argument("--preset", help=f"synthetic preset: {', '.join(C.PRESETS)} (default tiny)")
    p.add_argument("--variant", choices=("q2", "q4"), help="routed-expert weights of the preset")
    p.add_argument("--seed", type=int, default=0, help="synthetic weight seed (default 0)")


# ---- model ---------------------------------------------------------------------------------
def cmd_model_make(a) -> int:
    from .engine.synth import auto_workers, write_model
    cfg = C.preset(a.preset or "tiny", a.variant)
    if a.workers is not None and a.workers < 1:
        raise UserError(f"--workers must be at least 1, got {a.workers}")
    workers = a.workers or auto_workers(cfg)
    t0 = time.perf_counter()
    size = write_model(cfg, a.output, a.seed, workers)
    print(f"wrote {a.output}: preset {cfg.name} ({cfg.variant}), seed {a.seed}, {size:,} bytes "
          f"in {time.perf_counter() - t0:.1f} s ({workers} process{'es' if workers > 1 else ''})")
    return 0


def cmd_model_info(a) -> int:
    from .engine.gguf_io import load_gguf
    from .engine.modelinfo import report
    if a.file:
        mf = load_gguf(a.file, C.preset(a.preset) if a.preset else None, a.variant)
        print(report(mf.cfg, f"{a.file} ({os.path.getsize(a.file):,} bytes; "
                              f"{len(mf.tensors)} tensors validated: names, shapes, types)"))
    else:
        cfg = C.preset(a.preset or "tiny", a.variant)
        print(report(cfg, f"preset {cfg.name}"))
    return 0


# ---- generate --------------------------------------------------------------------------------
def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", "--cache", dest="cache", metavar="MODE", default=env_get("DS4BENCH_CACHE") or "f32",
                   help="numeric mode: q8 | f16 | f32 (--cache is the old name; env DS4BENCH_CACHE; default f32)")
    p.add_argument("--backend", default=env_get("DS4BENCH_BACKEND") or "auto",
                   help="numpy | cupy | auto: cupy when a GPU is visible (env DS4BENCH_BACKEND; default auto)")
    p.add_argument("--placement", default=env_get("DS4BENCH_PLACEMENT"),
                   help="GPU weight placement: device | managed | managed-hinted | host (env DS4BENCH_PLACEMENT; "
                        "default device)")
    p.add_argument("--profile", default=env_get("DS4BENCH_PROFILE") or "none",
                   help="none | nvtx (ranges for Nsight Systems) | stages (per-stage time) "
                        "(env DS4BENCH_PROFILE; default none)")
    p.add_argument("--batch", "-b", type=int, default=1, help="sequences decoded per step, 1..64 (default 1)")
    p.add_argument("--ctx", type=int, help="context allocated per sequence (default 4096, or prompt + n + 1 "
                                          "when that is more)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default 512)")


def resolve_backend(name: str) -> str:
    """'auto' is cupy when the GPU backend can run here, else numpy."""
    from .engine.generate import gpu_unavailable_reason
    if name not in ("numpy", "cupy", "auto"):
        raise UserError(f"unknown backend {name!r}; choose numpy, cupy or auto")
    if name == "numpy":
        return name
    why = gpu_unavailable_reason()
    if name == "cupy" and why:
        raise UserError(f"the cupy backend needs CuPy and a visible CUDA GPU: {why} "
                        f"(pip install -e '.[gpu]'; check nvidia-smi)")
    return "numpy" if why else "cupy"


def cmd_generate(a) -> int:
    from .engine.generate import Engine, generate
    from .engine.profiling import make_profiler
    from .engine.tokenizer import Tokenizer
    mf = load_model(a.model, a.preset, a.variant, a.seed)
    tok = Tokenizer.from_gguf_metadata(mf.metadata)
    ids = tok.encode(a.prompt) if a.raw else tok.chat(a.prompt)
    from .harness.guards import context_needed
    need = context_needed(len(ids), a.n)
    if a.ctx is not None and a.ctx < need:
        raise UserError(f"--ctx {a.ctx} is too small: the prompt is {len(ids)} tokens, + -n {a.n} + 1 = {need}; "
                        f"give --ctx {need} or more, or leave it out")
    ctx = max(4096, need) if a.ctx is None else a.ctx
    backend = resolve_backend(a.backend)
    if a.placement:
        check_placement(a.placement)
    if backend == "numpy" and a.placement:
        raise UserError(f"placement {a.placement} needs the GPU backend (no GPU is in use)")
    prof = make_profiler(a.profile, backend)
    from .engine.options import EngineOptions
    opts = EngineOptions.from_env(mode=a.cache, backend=backend, batch=a.batch, ctx=ctx, chunk=a.chunk,
                                  placement=a.placement)
    slow = opts.slowdown
    eng = Engine(mf, opts)
    # an untimed prime pass: kernel compilation, lazily built weights and the decode graph's
    # capture stay out of the tok/s below and are printed on their own
    t0 = time.perf_counter()
    generate(eng, [("prime", ids[:8])], 2)
    prime_s = time.perf_counter() - t0
    capture_s = eng.graph.capture_s if eng.graph is not None else 0.0
    if slow is not None:                # the known slowdown is a fraction of the settled step
        from .harness.rounds import warm_up
        eng.net.delay.calibrate(warm_up(lambda: generate(eng, [("prompt", ids)], a.n).timing)["step_s"])
    eng.net.prof = prof
    res = generate(eng, [("prompt", ids)], a.n, tok.decode)
    fp, t = res.fingerprints[0], res.timing
    print(fp.text)
    where = backend + (f", placement {getattr(eng.ops, 'placement', '')}" if backend == "cupy" else "")
    if eng.faults:
        where += f", injected faults {','.join(sorted(eng.faults))}"
    if eng.decode_path != "eager":
        where += f", decode {eng.decode_path}" + (f" ({eng.graph.info()})" if eng.graph else "")
    if prof.enabled and a.profile == "stages":
        print("stages (s): " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(prof.summary().items(), key=lambda kv: -kv[1])
                                          if not k.startswith("layer.")))
    print(f"--- {mf.cfg.name} ({where}, cache {a.cache}, batch {a.batch}): prompt {len(ids)} tokens, "
          f"prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.1f} tok/s, {a.n} tokens, sha256 {fp.sha256[:16]}"
          + (" NON-FINITE LOGITS" if fp.nonfinite else "")
          + (f" REPLICA MISMATCH x{fp.replica_mismatch}" if fp.replica_mismatch else ""))
    print(f"--- not in tok/s: prime pass {prime_s - capture_s:.2f} s (kernel compilation, lazy weights)"
          + (f", graph capture {capture_s:.2f} s" if eng.graph is not None else "")
          + (f"; slowdown {slow}: +{eng.net.delay.step_s * 1e3:.2f} ms per step" if slow is not None else ""))
    return 1 if fp.nonfinite or fp.replica_mismatch else 0


def cmd_bench_kernels(a) -> int:
    resolve_backend("cupy")
    from .harness.kbench import bench
    return bench(a.variant, a.model, a.json)


# ---- entry -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds4bench", description="DeepSeek V4 Flash engine benchmarks: "
                                 "speed and greedy-output correctness recorded together")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mp = sub.add_parser("model", help="make or inspect DS4 GGUF models").add_subparsers(dest="model_cmd", required=True)
    p = mp.add_parser("make", help="write a synthetic DS4 GGUF",
                      description="Write a synthetic DS4 GGUF: the preset's shapes and types, seeded random "
                                  "weights, a byte-level tokenizer. Its text output is meaningless by design.")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(C.PRESETS)} (default tiny)")
    p.add_argument("--variant", choices=("q2", "q4"), help="routed-expert weights: q2 (IQ2_XXS/Q2_K) or q4 "
                                                           "(Q4_K) (default: the preset's, q2)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write (written under a temporary "
                                                         "name, then renamed)")
    p.add_argument("--workers", type=int, help="processes making tensors in parallel, each written in place "
                                               "(the same bytes; default: one per CPU for models of 1 GiB and "
                                               "more, as far as host memory allows)")
    p.set_defaults(func=cmd_model_make)
    p = mp.add_parser("info", help="tensors, sizes and per-token read bytes of a file or preset")
    model_args(p, positional=True)
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("generate", help="greedy generation with timing and a fingerprint")
    model_args(p)
    engine_args(p)
    p.add_argument("-p", "--prompt", default="What is the capital of France? One word.",
                   help="the prompt (default: %(default)r)")
    p.add_argument("-n", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-kernels", help="GPU kernel bandwidth at Flash shapes (needs a GPU)")
    p.add_argument("--variant", default="q2", choices=("q2", "q4"), help="routed-expert weights (default q2)")
    p.add_argument("--model", help="also time decode per layer of this GGUF in every cache mode and placement")
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=cmd_bench_kernels)

    for mod in ("cli_matrix", "cli_plot", "cli_faults", "cli_engines"):
        try:
            m = __import__(f"ds4bench.{mod}", fromlist=["register"])
        except ImportError as e:
            if e.name != f"ds4bench.{mod}":
                raise
            continue
        m.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .engine.generate import load_plugins
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        from .engine.options import check_engine_env
        check_engine_env()                      # a mistyped toggle fails here, on a CPU run too
        if (getattr(a, "seed", 0) or 0) < 0:
            raise UserError(f"--seed must be a non-negative integer, got {a.seed}")
        load_plugins()
        return int(a.func(a) or 0)
    except KeyboardInterrupt as e:              # SIGINT 130; SIGTERM (guards.Terminated) 143
        print("ds4bench: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except BrokenPipeError:                     # the reader went away (`ds4bench show RUN | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UserError, ValueError, OSError, MemoryError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ds4bench: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
