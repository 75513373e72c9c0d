"""`ds4bench bench-kernels`: achieved bandwidth of the decode kernels at DS4 Flash shapes.

Each kernel runs at batch 1 on synthetic weights of the real shapes and formats, timed with CUDA
events over many launches after a warm-up. Achieved bandwidth is the minimum bytes the kernel
must read (its weights; activations are negligible) over the time, compared with a ceiling: the
device-to-device copy rate measured in the same process (bytes read + written per second).
Each Q8_0 shape also has a peer: the same matrix as F16 weights multiplied by cuBLAS through
CuPy (`cupy.matmul`, a GEMV at batch 1), what a vendor library reaches on the bytes of the
dequant cache's f16 mode.
"""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..engine import config as C
from ..engine.formats import quantize_q8_0, random_blocks, row_bytes

# (name, out, in, groups) of the Q8_0 projections a Flash decode step runs
Q8_SHAPES = (("attn_q_a", 1024, 4096, 1), ("attn_q_b", 32768, 1024, 1), ("attn_kv", 512, 4096, 1),
             ("attn_output_a", 8192, 4096, 8), ("attn_output_b", 4096, 8192, 1),
             ("ffn_gate_shexp", 2048, 4096, 1), ("ffn_down_shexp", 4096, 2048, 1), ("output", 129280, 4096, 1))
# The rows timed for each Q8_0 shape, in order: (run, label suffix). matmul_q8_0 after
# quantize_q8_0 (two launches), with the quantization fused in, and alone on activations
# quantized beforehand; the same three of the wide matvec (DS4BENCH_Q8_KERNEL=wide); the peer.
# No FP8 peer: CuPy has no FP8 dtype and no cuBLASLt matmul to run one with.
Q8_RUNS = (("two", ""), ("fused", " fused"), ("matmul", " matmul only"),
           ("wide", " wide"), ("wide_fused", " wide fused"), ("wide_matmul", " wide, matmul only"), ("peer", ""))
PEER = "peer cuBLAS f16"


def q8_plan(shapes=Q8_SHAPES) -> list[dict]:
    """The Q8_0 rows of bench-kernels for `shapes`, in print order: {kernel (the label), shape,
    run (Q8_RUNS), bytes (the weights each must read: the Q8_0 blocks, or the peer's F16 matrix)}."""
    plan = []
    for name, O, K, G in shapes:
        Kg = K // G
        shape = f"{name} [{O}x{Kg}]" + (f" x{G} groups" if G > 1 else "")
        for run, suffix in Q8_RUNS:
            peer = run == "peer"
            plan.append({"kernel": f"{PEER} {shape}" if peer else f"q8_0 {shape}{suffix}", "shape": name,
                         "run": run, "bytes": O * Kg * 2 if peer else O * row_bytes(QT.Q8_0, Kg)})
    return plan


class _Rotating:
    """Copies of a weight tensor totalling at least ROTATE_BYTES, handed out in turn, so that
    back-to-back launches read their weights from device memory, not from the L2 cache (50 MB
    on an H100) the previous launch filled."""
    ROTATE_BYTES = 256 << 20

    def __init__(self, w):
        self.copies = [w] + [w.copy() for _ in range(min(63, -(-self.ROTATE_BYTES // w.nbytes) - 1))]
        self._turn = itertools.cycle(self.copies)

    def next(self):
        return next(self._turn)


def _time(cp, fn, iters: int, replay: str | None = "graph") -> tuple[float, float, str]:
    """Seconds per call of `fn` (kernel launches), after 3 warm-up calls: (GPU, eager, how GPU
    was timed). Eager: CUDA events around `iters` calls issued from Python, which is what an
    eager step sees; below a few microseconds of work a call costs its launches, not its kernel.
    GPU, with the host's launch cost out and back-to-back calls timed as the GPU runs them:
      graph  the `iters` calls captured in one CUDA graph, CUDA events around its replay;
      held   for calls a graph cannot hold (CuPy refuses cuBLAS during stream capture): the
             stream held by a spin kernel (spin.cu) twice as long as the eager calls took plus
             1 ms, while the host queues them, CUDA events around the queue. Where the host
             still took longer than the hold, the eager time is returned, as "eager";
      None   the eager time."""
    for _ in range(3):
        fn()
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    eager = cp.cuda.get_elapsed_time(s, e) / 1e3 / iters
    if replay is None:
        return eager, eager, "eager"
    if replay == "held":
        from ..engine import kernels
        hold_s = 2 * eager * iters + 1e-3
        for _ in range(3):
            wait_ns = cp.asarray([int(hold_s * 1e9)], dtype=cp.int64)
            kernels.function("spin.cu", "spin_ns")((1,), (1,), (wait_ns,))
            s.record()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            queued = time.perf_counter() - t0
            e.record()
            e.synchronize()
            if queued < hold_s:
                return cp.cuda.get_elapsed_time(s, e) / 1e3 / iters, eager, "held"
            hold_s *= 4
        return eager, eager, "eager"
    from ..engine.graph_gpu import capture
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    graph, _ = capture(stream, pool, lambda: [fn() for _ in range(iters)])
    with stream:
        graph.launch(stream)                            # uploaded and warm
        s.record(stream)
        graph.launch(stream)
        e.record(stream)
        e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) / 1e3 / iters, eager, "graph"


def copy_bandwidth(cp, nbytes: int = 2 ** 30) -> float:
    """Device-to-device copy rate, bytes read + written per second, issued eagerly: CuPy copies
    a contiguous array with cudaMemcpyAsync, which in a graph becomes a copy-engine node that
    moves data markedly slower than the copy does outside one (2.7 against 4.2 TB/s on an H200)."""
    a = cp.empty(nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    t = _time(cp, lambda: b.__setitem__(Ellipsis, a), 10, replay=None)[1]
    return 2 * nbytes / t


def run(variant: str = "q2", iters: int = 200) -> dict:
    import cupy as cp

    from ..engine import kernels
    from ..engine.backend import device_facts
    from ..engine.moe_gpu import GpuExperts
    rng = np.random.default_rng(0)
    ceiling = copy_bandwidth(cp)
    rows = []

    def timed(label, nbytes, fn, replay="graph"):
        t, eager, how = _time(cp, fn, iters, replay)
        rows.append({"kernel": label, "bytes": int(nbytes), "us": t * 1e6, "gbs": nbytes / t / 1e9,
                     "pct_ceiling": 100 * nbytes / t / ceiling, "eager_us": eager * 1e6, "timing": how})

    quant = kernels.function("q8_0.cu", "quantize_q8_0")
    mm = kernels.function("q8_0.cu", "matmul_q8_0")
    fused = kernels.function("q8_0.cu", "matmul_q8_0_fused")
    wide = kernels.function("q8_0.cu", "matmul_q8_0_wide_1")                    # DS4BENCH_Q8_KERNEL=wide, T = 1
    wide_fused = kernels.function("q8_0.cu", "matmul_q8_0_wide_fused_1")
    to_f16 = kernels.function("q8_0.cu", "dequant_q8_0_f16")
    plan = q8_plan()
    for name, O, K, G in Q8_SHAPES:
        Kg = K // G
        W0 = cp.asarray(quantize_q8_0((rng.standard_normal((O, Kg)) * 0.02).astype(np.float32)))
        W = _Rotating(W0)
        x = cp.asarray(rng.standard_normal((1, K)).astype(np.float32))
        xq, xd = cp.empty((1, K), cp.int8), cp.empty((1, K // 32), cp.float32)
        y = cp.empty((1, O), cp.float32)
        quant((K // 32, 1), (32,), (x, xq, xd, np.int32(K)))

        args = (np.int32(O), np.int32(Kg), np.int32(1), np.int32(O // G), np.int32(K))
        grid = ((O + 7) // 8, 1)
        S = kernels.q8_wide_split(O, Kg // 32, kernels.sm_count())
        wargs, wgrid = (np.int32(O), np.int32(Kg), np.int32(O // G), np.int32(K), np.int32(S)), (-(-O * S // 256),)
        # the peer: the same matrix as F16 (the dequant cache's values); [O, K] @ [K], or for
        # groups [G, O/G, K/G] @ [G, K/G, 1] (a strided batched GEMM)
        F0 = cp.empty((O, Kg), cp.float16)
        to_f16((-(-O * Kg // 256),), (256,), (W0, F0, np.int64(O * Kg)))
        Fw = _Rotating(F0 if G == 1 else F0.reshape(G, O // G, Kg))
        xf = x[0].astype(cp.float16) if G == 1 else x.astype(cp.float16).reshape(G, Kg, 1)
        launch = {
            "two": lambda: (quant((K // 32, 1), (32,), (x, xq, xd, np.int32(K))),
                            mm(grid, (256,), (W.next(), xq, xd, y) + args)),
            "fused": lambda: fused(grid, (256,), (W.next(), x, y) + args, shared_mem=Kg + Kg // 8),
            "matmul": lambda: mm(grid, (256,), (W.next(), xq, xd, y) + args),
            "wide": lambda: (quant((K // 32, 1), (32,), (x, xq, xd, np.int32(K))),
                             wide(wgrid, (256,), (W.next(), xq, xd, y) + wargs)),
            "wide_fused": lambda: wide_fused(wgrid, (256,), (W.next(), x, y) + wargs, shared_mem=Kg + Kg // 8),
            "wide_matmul": lambda: wide(wgrid, (256,), (W.next(), xq, xd, y) + wargs),
            "peer": lambda: cp.matmul(Fw.next(), xf)}
        for r in (r for r in plan if r["shape"] == name):
            timed(r["kernel"], r["bytes"], launch[r["run"]], "held" if r["run"] == "peer" else "graph")
    cfg = C.preset("flash", variant)
    gate_t, down_t = (QT.IQ2_XXS, QT.Q2_K) if variant == "q2" else (QT.Q4_K, QT.Q4_K)
    E, F, D, A = cfg.n_expert, cfg.expert_ff, cfg.n_embd, cfg.n_expert_used
    tens = {}
    for nm, qt, shape in (("ffn_gate_exps", gate_t, (E, F, D)), ("ffn_up_exps", gate_t, (E, F, D)),
                          ("ffn_down_exps", down_t, (E, D, F))):
        std = 0.02
        tens[f"blk.0.{nm}.weight"] = (qt, cp.asarray(random_blocks(qt, shape, rng, std)))
    moe = GpuExperts(cfg, tens)
    x = cp.asarray(rng.standard_normal((1, D)).astype(np.float32))
    # a new expert selection per launch (64 in turn), so the experts come from device memory,
    # not from the L2 cache the previous launch filled
    sel_list = [rng.choice(E, A, replace=False)[None, :] for _ in range(64)]
    sels = itertools.cycle([cp.asarray(a.astype(np.int64)) for a in sel_list])
    sels32 = itertools.cycle([cp.asarray(a.astype(np.int32)) for a in sel_list])      # the kernels' own type
    w = cp.full((1, A), 0.25, cp.float32)
    from ..engine.moe_gpu import q8k_quantize
    n_gu, n_down = A * 2 * F * row_bytes(gate_t, D), A * D * row_bytes(down_t, F)
    need = n_gu + n_down
    xq = q8k_quantize(x)
    mq = q8k_quantize(moe.gate_up(0, *xq, next(sels32), w))
    for label, nbytes, fn in (
            (f"moe {variant}: {A} experts gate/up+down (Q8_K quantize included)", need,
             lambda: moe(0, x, next(sels), w)),
            (f"moe {variant}: gate/up only", n_gu, lambda: moe.gate_up(0, *xq, next(sels32), w)),
            (f"moe {variant}: down only", n_down, lambda: moe.down(0, *mq, next(sels32)))):
        timed(label, nbytes, fn)
    return {"device": device_facts(), "copy_ceiling_gbs": ceiling / 1e9, "variant": variant, "rows": rows}


def decode_layers(model_path: str, cache: str, placement: str, steps: int = 20, ceiling_bps: float = 3.0e12) -> dict:
    """Decode step of a model file, per layer in ms (CUDA events), against its weight-read floor:
    the layer's bytes (its share of routed experts) at `ceiling_bps` (the measured copy rate)."""
    from ..engine.gguf_io import decode_read_bytes, load_gguf, tensor_specs
    from .cell import options_for
    from ..engine.generate import Engine
    from ..engine.profiling import CudaEventTimer
    mf = load_gguf(model_path)
    prof = CudaEventTimer()
    opts = options_for({"cache": cache, "backend": "cupy", "batch": 1, "placement": placement}, 256)
    eng = Engine(mf, opts.replace(decode_graph="off"), profiler=prof)

    def step_wall(e, timer=None) -> float:
        """Wall seconds per decode step after 3 untimed ones (a graph is captured in those)."""
        e.state.reset()
        e.prefill(0, list(range(1, 65)))
        tok = 5
        for _ in range(3):
            tok = int(e.decode([tok], [0])[0].argmax())
        if timer:
            timer.summary()
            timer.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(e.decode([tok], [0])[0].argmax())
        return (time.perf_counter() - t0) / steps

    wall = step_wall(eng, prof)                             # eager: per-layer events
    stages = prof.summary()
    graphed = Engine(mf, opts.replace(decode_graph="on"), ops=eng.ops)
    graph_wall = step_wall(graphed) if graphed.graph is not None else None
    cfg = mf.cfg
    per_layer_bytes = {}
    for sp in tensor_specs(cfg):
        if sp.layer >= 0:
            n = sp.nbytes * (cfg.n_expert_used / cfg.n_expert if sp.kind == "experts" else 1)
            n = n / cfg.n_vocab if sp.kind == "tid2eid" else n
            per_layer_bytes[sp.layer] = per_layer_bytes.get(sp.layer, 0) + n
    layers = [{"layer": il, "ms": stages.get(f"layer.{il}", 0) / steps * 1e3,
               "floor_ms": per_layer_bytes[il] / ceiling_bps * 1e3} for il in range(cfg.n_layer)]
    return {"model": cfg.name, "cache": cache, "placement": placement, "step_ms_wall": wall * 1e3,
            "step_ms_gpu": stages.get("decode", 0) / steps * 1e3, "layers": layers,
            "step_ms_graph": None if graph_wall is None else graph_wall * 1e3, "graph_note": graphed.decode_path,
            "bytes_per_token": decode_read_bytes(cfg, False)["total"], "fallbacks": eng.ops.fallbacks}


def report(res: dict) -> str:
    lines = [f"{res['device']['gpu_name']}: copy ceiling {res['copy_ceiling_gbs']:.0f} GB/s (read+write); "
             "us, GB/s, % ceil: GPU time (timed: graph = calls replayed from a CUDA graph, held = queued behind "
             "a spin kernel, as cuBLAS cannot be captured through CuPy); eager us: issued from Python",
             f"{'kernel':58s} {'bytes':>12s} {'us':>9s} {'GB/s':>8s} {'% ceil':>7s} {'eager us':>9s} {'timed':>6s}"]
    for r in res["rows"]:
        lines.append(f"{r['kernel']:58s} {r['bytes']:12,d} {r['us']:9.1f} {r['gbs']:8.0f} {r['pct_ceiling']:7.1f}"
                     f" {r['eager_us']:9.1f} {r['timing']:>6s}")
    return "\n".join(lines)


def bench(variant: str = "q2", model: str | None = None, json_path: str | None = None) -> int:
    res = run(variant)
    print(report(res))
    if model:
        res["decode"] = []
        ceiling = res["copy_ceiling_gbs"] * 1e9
        print(f"\n{'cache':6s} {'placement':15s} {'step ms (wall)':>15s} {'step ms (gpu)':>14s} {'graph (wall)':>13s}  "
              f"eager per layer ms (floor at {ceiling / 1e12:.2f} TB/s)")
        from ..engine.config import PLACEMENTS
        from ..engine.ops_ref import CACHE_MODES
        for cache in CACHE_MODES:
            for placement in PLACEMENTS:
                d = decode_layers(model, cache, placement, ceiling_bps=ceiling)
                res["decode"].append(d)
                lay = "  ".join(f"{x['ms']:.2f} ({x['floor_ms']:.3f})" for x in d["layers"])
                gw = "n/a" if d["step_ms_graph"] is None else f"{d['step_ms_graph']:.2f}"
                print(f"{cache:6s} {placement:15s} {d['step_ms_wall']:15.2f} {d['step_ms_gpu']:14.2f} {gw:>13s}  {lay}",
                      flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0
