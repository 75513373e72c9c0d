"""Model configuration: every DS4 hyperparameter, its GGUF key, and the named presets.

Nothing else in ds4bench reads hyperparameters: the loader builds a `ModelConfig` from a file's
`deepseek4.*` metadata, the synthetic generator writes one back, and the engine only looks here.
Derived sizes (HC width, control-vector length, per-layer compression ratio) are properties, so
they are computed in exactly one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCH = "deepseek4"

# Where a GPU engine keeps the weights (the `--placement` axis, DS4BENCH_PLACEMENT; backend.Placer
# implements them). Named here, below every engine module, so that checking a name needs no CUDA.
PLACEMENTS = ("device", "managed", "managed-hinted", "host")


def check_placement(p: str) -> str:
    if p not in PLACEMENTS:
        raise ValueError(f"unknown placement {p!r}; choose one of {', '.join(PLACEMENTS)}")
    return p


@dataclass(frozen=True)
class ModelConfig:
    name: str = "flash"
    variant: str = "q2"                 # routed-expert weights: q2 (IQ2_XXS gate/up, Q2_K down) | q4 (Q4_K)
    n_layer: int = 43
    n_embd: int = 4096
    n_vocab: int = 129280
    n_head: int = 64
    n_head_kv: int = 1                  # MQA: one latent row serves as K and V
    head_dim: int = 512                 # key_length == value_length
    n_rot: int = 64                     # RoPE on the last n_rot dims of each head
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024             # per output group
    o_groups: int = 8
    n_expert: int = 256
    n_expert_used: int = 6
    n_expert_shared: int = 1
    expert_ff: int = 2048               # routed and shared expert hidden size
    n_hash_layers: int = 3              # layers routed by the token-id table
    expert_weights_scale: float = 1.5
    expert_weights_norm: bool = True
    swiglu_clamp: float = 10.0
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = ()   # per layer; empty means the Flash rule (0, 0, 4, 128, 4, ...)
    indexer_heads: int = 64
    indexer_dim: int = 128
    indexer_topk: int = 512
    hc_streams: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    compress_rope_base: float = 160000.0
    rope_scale_factor: float = 16.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    rope_orig_ctx: int = 65536
    context_length: int = 1048576
    route_score_floor: float = 6.103515625e-5

    def __post_init__(self):
        if not self.compress_ratios:
            object.__setattr__(self, "compress_ratios", flash_ratios(self.n_layer))
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ---- derived sizes (the only place they are computed) -------------------------------
    @property
    def hc_dim(self) -> int:            # the flattened residual: streams x hidden
        return self.hc_streams * self.n_embd

    @property
    def hc_mix(self) -> int:            # control vector: pre (S) + post (S) + comb (S*S)
        return 2 * self.hc_streams + self.hc_streams ** 2

    @property
    def n_nope(self) -> int:
        return self.head_dim - self.n_rot

    @property
    def heads_per_group(self) -> int:
        return self.n_head // self.o_groups

    def ratio(self, il: int) -> int:
        return self.compress_ratios[il]

    def has_indexer(self, il: int) -> bool:
        return self.compress_ratios[il] == 4

    def compressor_width(self, il: int) -> int:
        """ck/cs width: two overlapping halves on ratio-4 layers, one row elsewhere."""
        r = self.compress_ratios[il]
        return 0 if r == 0 else (2 * self.head_dim if r == 4 else self.head_dim)

    def compressor_rows(self, il: int) -> int:
        """State rows kept between emissions: previous + current window on ratio 4."""
        r = self.compress_ratios[il]
        return 0 if r == 0 else (8 if r == 4 else r)

    def validate(self) -> None:
        def need(cond: bool, what: str):
            if not cond:
                raise ValueError(f"config {self.name}: {what}")
        need(self.variant in ("q2", "q4"), f"variant must be q2 or q4, got {self.variant!r}")
        need(len(self.compress_ratios) == self.n_layer,
             f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layer} layers")
        need(all(r in (0, 4) or r > 4 for r in self.compress_ratios), "compress ratios must be 0, 4 or > 4")
        need(self.n_head_kv == 1, "DS4 attention is MQA (head_count_kv = 1)")
        need(self.n_head % self.o_groups == 0, "n_head must be a multiple of o_groups")
        need(self.n_nope % 64 == 0 and self.n_nope > 0, "head_dim - n_rot must be a positive multiple of 64 (FP8 blocks)")
        need(self.n_rot % 2 == 0, "n_rot must be even")
        need(self.n_embd % 256 == 0, "n_embd must be a multiple of 256 (Q8_K / K-quant blocks)")
        need(self.expert_ff % 256 == 0, "expert_ff must be a multiple of 256 (Q8_K / K-quant blocks)")
        need(self.q_lora_rank % 32 == 0 and self.o_lora_rank % 32 == 0, "LoRA ranks must be multiples of 32")
        need(self.indexer_dim & (self.indexer_dim - 1) == 0 and self.indexer_dim >= 64,
             "indexer_dim must be a power of two >= 64 (Hadamard)")
        need(self.indexer_dim > self.n_rot, "indexer_dim must exceed n_rot")
        need(0 < self.n_expert_used <= self.n_expert, "expert_used_count must be in 1..expert_count")
        need(self.n_hash_layers <= self.n_layer, "hash_layer_count exceeds block_count")
        need(self.n_expert_shared == 1, "DS4 has exactly one shared expert")


def flash_ratios(n_layer: int) -> tuple[int, ...]:
    """ds4_layer_compress_ratio: layers 0-1 uncompressed, then 4 on even and 128 on odd layers."""
    return tuple(0 if il < 2 else (4 if il % 2 == 0 else 128) for il in range(n_layer))


# ---- presets ----------------------------------------------------------------------------
FLASH = ModelConfig()

PRESETS: dict[str, ModelConfig] = {
    "flash": FLASH,
    # Flash dimensions, the first four layers: 2 uncompressed, 1 ratio-4 with indexer, 1 ratio-128.
    "flash-4l": dataclasses.replace(FLASH, name="flash-4l", n_layer=4, compress_ratios=flash_ratios(4)),
    # Between tiny and flash: a CPU benchmark that still has Flash's head geometry.
    "small": dataclasses.replace(
        FLASH, name="small", n_layer=6, n_embd=1024, n_vocab=4096, n_head=16, head_dim=512,
        q_lora_rank=256, o_lora_rank=256, o_groups=4, n_expert=32, n_expert_used=6, expert_ff=512,
        sliding_window=64, compress_ratios=(0, 0, 4, 32, 4, 32), indexer_heads=16, indexer_topk=64,
        context_length=65536),
    # Every structural feature (uncompressed, ratio-4 + indexer, high-ratio, hash-routed layers, shared
    # expert, hyper-connections) at a size the NumPy engine runs in seconds on two cores. A window of 32,
    # a high ratio of 16 and a top-k of 16 make prompts of a few hundred tokens exercise compression and
    # indexer selection.
    "tiny": dataclasses.replace(
        FLASH, name="tiny", n_layer=6, n_embd=256, n_vocab=512, n_head=4, head_dim=128,
        q_lora_rank=128, o_lora_rank=64, o_groups=2, n_expert=16, n_expert_used=6, expert_ff=256,
        sliding_window=32, compress_ratios=(0, 0, 4, 16, 4, 16), indexer_heads=4, indexer_dim=128,
        indexer_topk=16, context_length=16384),
}


def preset(name: str, variant: str | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, variant=variant) if variant and variant != cfg.variant else cfg


# ---- GGUF metadata ------------------------------------------------------------------------
# (config field, key under "deepseek4.", kind). Kinds: u32, u64, f32, bool, arr (one value per layer).
GGUF_KEYS: tuple[tuple[str, str, str], ...] = (
    ("n_layer", "block_count", "u32"),
    ("context_length", "context_length", "u64"),
    ("n_embd", "embedding_length", "u32"),
    ("n_vocab", "vocab_size", "u32"),
    ("n_head", "attention.head_count", "u32"),
    ("n_head_kv", "attention.head_count_kv", "u32"),
    ("head_dim", "attention.key_length", "u32"),
    ("head_dim", "attention.value_length", "u32"),
    ("n_rot", "rope.dimension_count", "u32"),
    ("q_lora_rank", "attention.q_lora_rank", "u32"),
    ("o_lora_rank", "attention.output_lora_rank", "u32"),
    ("o_groups", "attention.output_group_count", "u32"),
    ("n_expert", "expert_count", "u32"),
    ("n_expert_used", "expert_used_count", "u32"),
    ("n_expert_shared", "expert_shared_count", "u32"),
    ("expert_ff", "expert_feed_forward_length", "u32"),
    ("n_hash_layers", "hash_layer_count", "u32"),
    ("expert_weights_scale", "expert_weights_scale", "f32"),
    ("expert_weights_norm", "expert_weights_norm", "bool"),
    ("swiglu_clamp", "swiglu_clamp_exp", "arr_f32"),
    ("sliding_window", "attention.sliding_window", "u32"),
    ("compress_ratios", "attention.compress_ratios", "arr_u32"),
    ("indexer_heads", "attention.indexer.head_count", "u32"),
    ("indexer_dim", "attention.indexer.key_length", "u32"),
    ("indexer_topk", "attention.indexer.top_k", "u32"),
    ("hc_streams", "hyper_connection.count", "u32"),
    ("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", "u32"),
    ("hc_eps", "hyper_connection.epsilon", "f32"),
    ("rms_eps", "attention.layer_norm_rms_epsilon", "f32"),
    ("rope_base", "rope.freq_base", "f32"),
    ("compress_rope_base", "attention.compress_rope_freq_base", "f32"),
    ("rope_scale_factor", "rope.scaling.factor", "f32"),
    ("yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f32"),
    ("yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f32"),
    ("rope_orig_ctx", "rope.scaling.original_context_length", "u64"),
)
# Allowed values of the numeric keys a file may set: (low, high, low excluded). A value outside
# them is a damaged or foreign file; loading it would only show up later as wrong output.
META_RANGES: dict[str, tuple[float, float, bool]] = {
    "n_layer": (1, 1024, False), "context_length": (1, 1 << 24, False), "n_embd": (256, 1 << 16, False),
    "n_vocab": (1, 1 << 22, False), "n_head": (1, 1024, False), "head_dim": (64, 4096, False),
    "n_rot": (2, 4096, False), "q_lora_rank": (32, 1 << 16, False), "o_lora_rank": (32, 1 << 16, False),
    "o_groups": (1, 1024, False), "n_expert": (1, 4096, False), "n_expert_used": (1, 4096, False),
    "expert_ff": (256, 1 << 17, False), "n_hash_layers": (0, 1024, False),
    "expert_weights_scale": (0.0, 100.0, True), "swiglu_clamp": (0.0, 1e4, True),
    "sliding_window": (1, 1 << 20, False), "indexer_heads": (1, 1024, False), "indexer_dim": (64, 4096, False),
    "indexer_topk": (1, 1 << 20, False), "hc_streams": (1, 64, False), "hc_sinkhorn_iters": (1, 1000, False),
    "hc_eps": (0.0, 1e-2, True), "rms_eps": (0.0, 1e-2, True), "rope_base": (1.0, 1e9, False),
    "compress_rope_base": (1.0, 1e9, False), "rope_scale_factor": (1.0, 1e4, False),
    "yarn_beta_fast": (0.0, 1e4, True), "yarn_beta_slow": (0.0, 1e4, True), "rope_orig_ctx": (1, 1 << 24, False),
}


def check_range(fld: str, key: str, value) -> None:
    """ValueError naming the key when a value lies outside META_RANGES."""
    import math
    lo, hi, open_lo = META_RANGES[fld]
    ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"metadata key {key}={value:g} is outside the allowed range "
                         f"{'(' if open_lo else '['}{lo:g}, {hi:g}]")


# Always zero in DS4 (no group-limited routing); written so ds4's loader finds them.
GGUF_ZERO_KEYS = ("expert_group_count", "expert_group_used_count")
# ds4bench's own keys: how to rebuild the config name and weight variant from a file.


def to_gguf_metadata(cfg: ModelConfig) -> dict[str, tuple[str, object]]:
    """{full key: (kind, value)} for every deepseek4.* key ds4 reads."""
    out: dict[str, tuple[str, object]] = {}
    for fld, key, kind in GGUF_KEYS:
        value = getattr(cfg, fld)
        if fld == "swiglu_clamp":
            value = [float(value)] * cfg.n_layer
        out[f"{ARCH}.{key}"] = (kind, value)
    for key in GGUF_ZERO_KEYS:
        out[f"{ARCH}.{key}"] = ("u32", 0)
    return out


def from_gguf_metadata(fields: dict[str, object], name: str = "file", variant: str = "q2") -> ModelConfig:
    """Build a config from decoded GGUF fields ({key: python value}). Raises ValueError naming the key."""
    kw: dict[str, object] = {"name": name, "variant": variant}
    seen: dict[str, object] = {}
    for fld, key, kind in GGUF_KEYS:
        full = f"{ARCH}.{key}"
        if full not in fields:
            raise ValueError(f"metadata key {full} is missing")
        value = fields[full]
        if kind == "arr_u32":
            value = tuple(int(v) for v in value)
        elif kind == "arr_f32":
            vals = [float(v) for v in value]
            if len(set(vals)) > 1:
                raise ValueError(f"metadata key {full}: per-layer values differ ({sorted(set(vals))}); ds4bench needs one clamp")
            value = float(f"{vals[0]:.7g}") if vals else 0.0
        elif kind == "bool":
            value = bool(value)
        elif kind in ("u32", "u64"):
            value = int(value)
        else:
            value = float(f"{float(value):.7g}")     # f32 in the file: back to the written decimal
        if fld in META_RANGES:
            check_range(fld, full, value)
        if fld in seen and seen[fld] != value:
            raise ValueError(f"metadata key {full}={value} disagrees with {fld}={seen[fld]}")
        seen[fld] = value
        kw[fld] = value
    for key in GGUF_ZERO_KEYS:
        v = fields.get(f"{ARCH}.{key}", 0)
        if int(v) != 0:
            raise ValueError(f"metadata key {ARCH}.{key}={v}: group-limited routing is not DS4")
    n_layer = kw["n_layer"]
    if len(kw["compress_ratios"]) != n_layer:
        raise ValueError(f"metadata key {ARCH}.attention.compress_ratios has {len(kw['compress_ratios'])} "
                         f"entries for block_count {n_layer}")
    return ModelConfig(**kw)


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields (other than name) on which two configs differ, as 'field: a != b' strings."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name == "name":
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{f.name}: {va!r} != {vb!r}")
    return out
