"""Deliberate, realistic bugs that a cell can switch on: the catalogue behind `ds4bench faults`.

Each fault imitates one arithmetic mistake a kernel author could make (a scale read from the
wrong block, a sign bit dropped, a window off by one) and is implemented twice where the engines
differ: in the NumPy engine (small `if name in faults` branches in ops_ref.py and model.py) and
in the CUDA kernel that does the same work (`#ifdef DS4_FAULT_<NAME>` in kernels/*.cu, compiled
as a separate module only when the fault is on). The twins make the same mistake, so the CPU and
GPU confusion tables test the same bugs. Faults in host code both engines share (model.py's RoPE
tables, the attention mask the concat path builds) need no kernel twin.

Faults are selected with DS4BENCH_FAULT=<name>[,<name>] and travel explicitly: the CLI and the
matrix cell read the variable once (`from_env`) and pass the set to `Engine(..., faults=...)`,
which hands it to the ops and the model. An engine built without `faults=` carries none, so a
reference engine in the same process stays healthy.

`stage` names the stage where the error is made, as the NVTX ranges of model.py name stages.
"""
from __future__ import annotations

from dataclasses import dataclass

STAGES = ("hc_pre", "attn.q", "attn.kv", "compressor", "indexer", "attention", "attn.out", "hc_post",
          "moe.router", "moe.experts", "moe.shared", "head")

# numeric constants of the faults, shared by the NumPy twins (the CUDA twins spell the same numbers)
SCALE_DRIFT = 1.0 + 1.0 / 64          # q8-scale-drift: every Q8_0 weight scale 1.6% too large
SUBSET_EVERY = 4                      # q8-scale-subset: blocks b % 4 == 3 take block b-1's scale
HEAD_SUBSET_EVERY = 8                 # head-scale-subset: blocks b % 8 == 7 take block b-1's scale
ACT_BLOCK_EVERY = 8                   # q8-act-block: blocks b % 8 == 7 read activation block b-1


@dataclass(frozen=True)
class Fault:
    name: str
    stage: str                        # where the error is made: an NVTX stage name, or several joined by ","
    layers: str                       # which layers it touches
    description: str                  # the bug it imitates and why it is realistic
    numpy: str                        # where the NumPy engine makes the mistake ("" = nowhere)
    cuda: str                         # the kernel file with its #ifdef twin ("" = none)
    tensors: tuple = ()               # Q8_0 tensors it is limited to (name suffixes; () = all)
    host: bool = False                # made in host code both engines run (no kernel twin needed)

    @property
    def stages(self) -> tuple:
        return tuple(self.stage.split(","))

    @property
    def define(self) -> str:
        return "DS4_FAULT_" + self.macro

    @property
    def macro(self) -> str:
        # faults that share a kernel mistake on different tensors share its macro
        return _MACRO.get(self.name, self.name.upper().replace("-", "_"))

    def targets(self, tensor: str) -> bool:
        return not self.tensors or any(tensor.endswith(t) for t in self.tensors)


_MACRO = {"head-scale-subset": "Q8_SCALE_SUBSET_HEAD"}

FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("q8-scale-subset", "attn.out", "all",
          "Q8_0 matmul on attn_output_b reads every fourth weight block (b % 4 == 3) with the scale "
          "of the block before it: an off-by-one in the scale pointer of an unrolled block loop, on "
          "one projection over part of K (the first broken build of issue 21).",
          "ops_ref.RefOps.intw (Q8_0 scales)", "kernels/q8_0.cu", ("attn_output_b.weight",)),
    Fault("q8-scale-drift", "attn.q,attn.kv,attn.out,moe.shared,head", "all",
          "every Q8_0 weight block scale 1/64 (1.6%) too large in the dp4a path: a fixed-point or "
          "half-to-float conversion off by one ulp-shift (the second broken build of issue 21).",
          "ops_ref.RefOps.intw (Q8_0 scales)", "kernels/q8_0.cu"),
    Fault("q8-act-block", "attn.q", "all",
          "Q8_0 matmul multiplies weight block b % 8 == 7 with activation block b-1 (its int8 values "
          "and scale): a wrong activation-block index in the tail of an 8-way unrolled loop.",
          "ops_ref.RefOps.linear (Q8_0 activations)", "kernels/q8_0.cu"),
    Fault("iq2-sign", "moe.experts", "all (IQ2_XXS gate/up experts, variant q2)",
          "IQ2_XXS decode drops the eighth (parity) sign of each group of 8: the ksigns byte is "
          "masked to its 7 stored bits instead of looked up whole.",
          "ops_ref.RefOps.intw (IQ2_XXS values)", "kernels/moe.cu"),
    Fault("q2k-dmin", "moe.experts", "all (Q2_K down experts, variant q2)",
          "Q2_K decode reads the super-block min scale dmin from the bytes of d (offset 80 instead "
          "of 82): a copy-pasted field offset.",
          "ops_ref.RefOps.intw (Q2_K scales)", "kernels/moe.cu"),
    Fault("moe-wrong-weight", "moe.experts", "all",
          "each routed expert's output is scaled by the router weight of the next selected slot "
          "((a + 1) % A) instead of its own: a wrong index into the [N, A] weight array.",
          "ops_ref.RefOps.experts", "kernels/moe.cu"),
    Fault("attn-sink-dropped", "attention", "all",
          "the per-head sink is left out of the softmax (its max and its denominator): the "
          "attention kernel of a model without sinks reused as is.",
          "model.attend (array code)", "kernels/attention.cu"),
    Fault("attn-window", "attention", "all (tokens at position >= sliding window)",
          "the sliding window keeps W+1 raw keys (kpos >= p - W instead of kpos > p - W): an "
          "off-by-one in the window test; only positions past the window see it.",
          "model.DS4Model.attention_keys (mask)", "kernels/attention.cu"),
    Fault("rope-compressed-base", "attn.q", "compressed layers (ratio > 0)",
          "compressed layers rotate with the plain RoPE base and no YaRN blend instead of the "
          "compressed base: the layer-type switch of the frequency table forgotten.",
          "model.DS4Model (RoPE tables, host)", "", host=True),
    Fault("fp8-kv-truncate", "attn.kv", "all",
          "the FP8 e4m3 round trip of stored KV rows truncates the mantissa toward zero instead of "
          "rounding to nearest even: a cast without rounding mode.",
          "ops_ref.RefOps.kv_round", "kernels/lowprec.cu"),
    Fault("compressor-overlap", "compressor", "ratio-4 layers (and the indexer's compressor)",
          "ratio-4 pooling ignores the previous window's half (its scores taken as -inf), so the "
          "overlapping windows stop overlapping: the 'first window' condition applied to all.",
          "model.DS4Model.pool_windows (array code)", "kernels/compress.cu"),
    Fault("indexer-topk", "indexer", "indexer layers (ratio 4) past top-k compressed rows",
          "the indexer keeps only k-1 compressed rows: an off-by-one in the rank test (rank < k-1).",
          "ops_ref.RefOps.topk_mask", "kernels/indexer.cu"),
    Fault("hc-sinkhorn", "hc_pre", "all",
          "the HC Sinkhorn normalization stops after its first iteration (one column normalization) "
          "instead of the model's count: the loop bound taken from the wrong argument.",
          "model.hc_weights (array code)", "kernels/hc.cu"),
    Fault("head-scale-subset", "head", "output head",
          "the output head's Q8_0 matmul reads every eighth weight block (b % 8 == 7) with the scale "
          "of the block before it. The head runs the q8 kernel in every mode, so an A/B against an "
          "f32 baseline cannot see it.",
          "ops_ref.RefOps.intw (Q8_0 scales of output.weight)", "kernels/q8_0.cu", ("output.weight",)),
)}


def parse(text: str | None, var: str = "DS4BENCH_FAULT") -> frozenset:
    """'a,b' -> frozenset of fault names; ValueError (one line, the known names) for an unknown one."""
    names = {t.strip() for t in (text or "").split(",") if t.strip()}
    bad = sorted(names - set(FAULTS))
    if bad:
        raise ValueError(f"{var}: unknown fault {', '.join(bad)}; known: {', '.join(FAULTS)}")
    return frozenset(names)


def from_env(environ) -> frozenset:
    """The faults DS4BENCH_FAULT names in `environ` (empty: none)."""
    return parse(environ.get("DS4BENCH_FAULT"))


def on(faults, name: str, tensor: str | None = None) -> bool:
    """Whether fault `name` is active (and, for a tensor-limited fault, targets `tensor`)."""
    return name in faults and (tensor is None or FAULTS[name].targets(tensor))


def defines(faults, cuda_file: str, tensor: str | None = None) -> tuple:
    """The -D options compiling kernels/`cuda_file` with the active faults that live there (those
    limited to tensors only for `tensor`); () for a healthy build."""
    return tuple(sorted(f"-D{FAULTS[n].define}" for n in faults
                        if FAULTS[n].cuda == f"kernels/{cuda_file}"
                        and (not FAULTS[n].tensors or (tensor is not None and FAULTS[n].targets(tensor)))))


def catalogue_md() -> str:
    """The catalogue as a markdown table (docs/faults.md, `ds4bench faults --list`)."""
    rows = ["| fault | stage | layers | NumPy | CUDA | the bug |", "|---|---|---|---|---|---|"]
    for f in FAULTS.values():
        cuda = f"`{f.cuda}` `{f.define}`" if f.cuda else ("host code, shared" if f.host else "none")
        rows.append(f"| `{f.name}` | {f.stage} | {f.layers} | `{f.numpy}` | {cuda} | {f.description} |")
    return "\n".join(rows) + "\n"
