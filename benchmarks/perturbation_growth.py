"""How much a small error grows per layer in a model's forward pass: why free-running outputs of a
deep synthetic network say little about whether a kernel is right (docs/verdicts.md).

    python -m benchmarks.perturbation_growth --preset small [--mode f32] [--eps 1e-4] [--backend numpy]
    python -m benchmarks.perturbation_growth --preset flash --model F.gguf --backend cupy --json out.json
    python -m benchmarks.perturbation_growth --preset small --branch-rms 0.05   # a conditioning experiment

Two measurements on the prompt set's prefill (teacher-forced: every run sees the same tokens):
  1. injected: the hyper-connection state after layer 0's attention is multiplied by (1 + eps*z),
     z a fixed standard normal (a relative error of RMS eps), and the relative RMS distance
     |X' - X| / |X| of the state after every later sublayer (attention and FFN of each layer) is
     recorded, then the head's: logit NMSE and the share of positions whose top-1 token changed;
  2. modes: the same distances between each other numeric mode's run and the `--mode` run,
     nothing injected: how far healthy precision moves the state, layer by layer.
The growth per layer is the geometric mean of the distance's ratio from one layer's output to the
next. A factor g over L layers turns eps into about eps * g^L at the head.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds4bench.engine import synth  # noqa: E402
from ds4bench.engine.generate import Engine  # noqa: E402
from ds4bench.engine.model import no_tap  # noqa: E402
from ds4bench.engine.models import load_model  # noqa: E402
from ds4bench.engine.prompts import load_prompts  # noqa: E402
from ds4bench.engine.tokenizer import Tokenizer  # noqa: E402

MODES = ("f32", "q8", "f16")
# layer 0's FFN sublayer, where a first amplifier shows: its input, the shared expert (float path)
# and the routed experts (Q8_K activations)
FFN0 = {"hc_pre": "ffn input", "moe.shared": "shared expert", "moe.experts": "routed experts"}


class StateTap:
    """Keeps a host copy of the state after every sublayer (`hc_post`, two a layer) and the head's
    logits; optionally perturbs layer 0's first `hc_post` by (1 + eps * z)."""

    def __init__(self, eps: float = 0.0, seed: int = 0):
        self.eps, self.seed = eps, seed
        self.states: list[np.ndarray] = []
        self.routes: list[np.ndarray] = []             # each layer's selected experts [N, A], sorted
        self.ffn0: dict[str, np.ndarray] = {}          # layer 0's FFN: its input, shared and routed outputs
        self.logits: np.ndarray | None = None

    def __call__(self, stage: str, il: int, *arrays):
        out = arrays[0] if len(arrays) == 1 else arrays
        if stage == "hc_post":
            x = out
            if self.eps and il == 0 and not self.states:
                z = np.random.default_rng(self.seed).standard_normal(x.shape).astype(np.float32)
                if not isinstance(x, np.ndarray):          # the CuPy engine's state
                    import cupy
                    z = cupy.asarray(z)
                x = out = x * (1 + self.eps * z)
            self.states.append(_host(x).astype(np.float64))
        elif stage == "moe.router":
            self.routes.append(np.sort(_host(arrays[0]), axis=-1))
        if il == 0 and stage in FFN0:                      # hc_pre twice a layer: the FFN's is the last
            self.ffn0[FFN0[stage]] = _host(arrays[0]).astype(np.float64)
        elif stage == "head":
            self.logits = _host(out).astype(np.float64)
        return out


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def run(mf, mode: str, backend: str, ids: list[int], tap: StateTap) -> StateTap:
    eng = Engine(mf, mode=mode, backend=backend, batch=1, ctx=len(ids) + 1, chunk=len(ids), decode_graph="off")
    eng.net.tap = tap
    try:
        eng.net.forward(eng.state, np.asarray([ids]), np.array([0]), all_logits=True)
    finally:
        eng.net.tap = no_tap
    return tap


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum() / max((b ** 2).sum(), 1e-300)))


def compare(test: StateTap, base: StateTap) -> dict:
    """Distances sublayer by sublayer, the growth per layer, and the head's differences."""
    d = [rel(t, b) for t, b in zip(test.states, base.states)]
    layer_out = d[1::2]                                  # after each layer's FFN sublayer
    ratios = [b / a for a, b in zip(layer_out, layer_out[1:]) if a > 0 and b > 0]
    lt, lb = test.logits.reshape(-1, test.logits.shape[-1]), base.logits.reshape(-1, base.logits.shape[-1])
    routed = [float((t != b).any(-1).mean()) for t, b in zip(test.routes, base.routes)]
    return {"sublayer": d, "layer": layer_out, "routes_changed": routed,
            "ffn0": {k: rel(test.ffn0[k], base.ffn0[k]) for k in base.ffn0},
            "growth_per_layer": math.exp(np.mean(np.log(ratios))) if ratios else None,
            "logit_nmse": rel(lt, lb) ** 2,
            "top1_changed": float((lt.argmax(-1) != lb.argmax(-1)).mean()),
            "positions": int(lt.shape[0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", help="a GGUF file (default: the preset synthesized in memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="f32", choices=MODES, help="the run the others are measured against")
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    ap.add_argument("--eps", default="1e-4",
                    help="relative RMS of the injected error; several (comma list) add a sweep table, the first "
                         "one is the main table's")
    ap.add_argument("--prompts", default="smoke")
    ap.add_argument("--tokens", type=int, default=64, help="prefill positions (the prompts' tokens, cut or repeated)")
    ap.add_argument("--branch-rms", type=float,
                    help="synthesize the preset with this residual-branch RMS instead of synth.BRANCH_RMS "
                         "(a conditioning experiment; not with --model)")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args(argv)
    try:
        eps = [float(e) for e in a.eps.split(",")]
    except ValueError:
        ap.error(f"--eps {a.eps!r}: numbers, comma-separated")
    if a.branch_rms is not None:
        if a.model:
            ap.error("--branch-rms changes synthesized weights; it does not apply to --model")
        synth.BRANCH_RMS = a.branch_rms
    mf = load_model(a.model, a.preset, None, a.seed)
    tok = Tokenizer.from_gguf_metadata(mf.metadata)
    ids = [t for p in load_prompts(a.prompts) for t in tok.chat(p.text)]
    ids = (ids * (a.tokens // max(1, len(ids)) + 1))[:a.tokens]
    base = run(mf, a.mode, a.backend, ids, StateTap())
    out = {"preset": mf.cfg.name, "layers": mf.cfg.n_layer, "mode": a.mode, "backend": a.backend,
           "branch_rms": synth.BRANCH_RMS if not a.model else None,
           "eps": eps[0], "tokens": len(ids),
           "sweep": {e: compare(run(mf, a.mode, a.backend, ids, StateTap(e)), base) for e in eps},
           "modes": {m: compare(run(mf, m, a.backend, ids, StateTap()), base) for m in MODES if m != a.mode}}
    rms = "" if a.branch_rms is None else f", branch RMS {a.branch_rms:g}"
    print(f"# Perturbation growth: {out['preset']} ({out['layers']} layers{rms}), {a.backend}, against {a.mode}, "
          f"{len(ids)} prefill positions\n")
    print("| run | relative distance after each layer | growth per layer | tokens routed differently, per layer "
          "| head logit NMSE | top-1 changed |")
    print("|---|---|---|---|---|---|")
    out["injected"] = out["sweep"][eps[0]]
    rows = [(f"{a.mode} with eps = {eps[0]:g} injected after layer 0's attention", out["injected"])]
    rows += [(f"{m} against {a.mode}", r) for m, r in out["modes"].items()]
    for name, r in rows:
        g = r["growth_per_layer"]
        print(f"| {name} | {', '.join(f'{x:.2g}' for x in r['layer'])} | {'–' if g is None else f'{g:.2f}'} "
              f"| {', '.join(f'{x:.0%}' for x in r['routes_changed'])} | {r['logit_nmse']:.2g} | {r['top1_changed']:.0%} |")
    f = out["injected"]["ffn0"]
    print(f"\nLayer 0's FFN with eps injected (relative distance): input {f['ffn input']:.2g}, "
          f"shared expert output {f['shared expert']:.2g}, routed experts output {f['routed experts']:.2g}")
    if len(eps) > 1:
        print("\n| eps | after layer 0's attention | after layer 0's FFN | after the last layer |\n|---|---|---|---|")
        for e, r in out["sweep"].items():
            print(f"| {e:g} | {r['sublayer'][0]:.2g} | {r['sublayer'][1]:.2g} | {r['sublayer'][-1]:.2g} |")
    out["sweep"] = {f"{e:g}": r for e, r in out["sweep"].items()}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
