"""`ds4bench model info`: what a model holds and what one decode token must read."""
from __future__ import annotations

from collections import defaultdict

from .config import ModelConfig
from .gguf_io import decode_read_bytes, tensor_specs

GiB = 2 ** 30


def fmt_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 2 ** 20:
        return f"{n / 2 ** 20:.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_kind(cfg: ModelConfig, il: int) -> str:
    r = cfg.ratio(il)
    kind = "uncompressed" if r == 0 else (f"ratio {r} + indexer" if cfg.has_indexer(il) else f"ratio {r}")
    return kind + (", hash-routed" if il < cfg.n_hash_layers else "")


def summary(cfg: ModelConfig) -> dict:
    """Totals the report prints, as numbers (tests and records use these)."""
    specs = tensor_specs(cfg)
    by_kind: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    per_layer = defaultdict(int)
    for s in specs:
        by_kind[(s.kind, s.qtype.name)][0] += 1
        by_kind[(s.kind, s.qtype.name)][1] += s.nbytes
        if s.layer >= 0:
            per_layer[s.layer] += s.nbytes
    return {"total_bytes": sum(s.nbytes for s in specs), "n_tensors": len(specs),
            "by_kind": dict(by_kind), "per_layer": dict(per_layer),
            "decode_read": decode_read_bytes(cfg, True), "decode_read_no_indexer": decode_read_bytes(cfg, False)}


def report(cfg: ModelConfig, source: str) -> str:
    s = summary(cfg)
    out = [f"model: {source}",
           f"preset {cfg.name}, variant {cfg.variant}: {cfg.n_layer} layers, hidden {cfg.n_embd}, vocab {cfg.n_vocab}, "
           f"{cfg.n_head} heads x {cfg.head_dim}, {cfg.n_expert} experts ({cfg.n_expert_used} used), "
           f"window {cfg.sliding_window}, ratios {list(cfg.compress_ratios)}", ""]
    rows = [[kind, qt, str(n), f"{b:,}", fmt_bytes(b)] for (kind, qt), (n, b) in sorted(s["by_kind"].items())]
    out += [_table(["tensors", "type", "count", "bytes", "size"], rows), ""]
    groups: dict[str, list[int]] = defaultdict(list)
    for il in range(cfg.n_layer):
        groups[layer_kind(cfg, il)].append(il)
    rows = []
    for kind, layers in groups.items():
        sizes = sorted({s["per_layer"][il] for il in layers})
        rows.append([kind, _span(layers), f"{sizes[0]:,}" + (f"..{sizes[-1]:,}" if len(sizes) > 1 else ""),
                     fmt_bytes(sum(s["per_layer"][il] for il in layers))])
    out += [_table(["layer kind", "layers", "bytes per layer", "total"], rows), ""]
    out.append(f"model total: {s['total_bytes']:,} B = {s['total_bytes'] / 1e9:.2f} GB = "
               f"{fmt_bytes(s['total_bytes'])} in {s['n_tensors']} tensors")
    rd, rn = s["decode_read"], s["decode_read_no_indexer"]
    rows = [[k, f"{v:,}", f"{v / 1e9:.3f} GB"] for k, v in rd.items() if k != "total"]
    out += ["", "bytes one decode token reads (weights; experts: "
            f"{cfg.n_expert_used} of {cfg.n_expert} per layer; embedding and tid2eid: one row)",
            _table(["part", "bytes", "GB"], rows),
            f"decode read per token: {rd['total']:,} B = {rd['total'] / 1e9:.2f} GB with the indexer active, "
            f"{rn['total'] / 1e9:.2f} GB before it is (n_comp <= top-k)"]
    return "\n".join(out)


def _span(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    if len(layers) > 3:
        step = layers[1] - layers[0]
        if all(b - a == step for a, b in zip(layers, layers[1:])):
            return f"{layers[0]},{layers[1]},..,{layers[-1]}"
    return ",".join(map(str, layers))
