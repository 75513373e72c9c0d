"""DS4 GGUF files: the tensor table, writing (synthetic models) and reading with validation.

This is the one module that knows tensor names. Shapes here are NumPy shapes (last dim
contiguous); GGUF stores the reverse ([ne0 = in, ne1 = out, ne2 = expert]). Quantized tensors
keep their file layout: a tensor is its raw bytes (uint8 [..., rows, row_bytes]) plus its type.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from . import config as C
from .formats import FORMATS, row_bytes, tensor_bytes
from .options import gguf_index_dir

PLAIN_DTYPES = {QT.F32: np.float32, QT.F16: np.float16, QT.I32: np.int32}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]      # NumPy order: [..., out, in]
    qtype: QT
    kind: str                   # what `model info` groups by and what a decode token reads
    layer: int                  # -1 for global tensors
    optional: bool = False

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qtype, self.shape)

    @property
    def gguf_dims(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def expert_types(variant: str) -> tuple[QT, QT]:
    """(gate/up type, down type) of the routed experts."""
    return (QT.IQ2_XXS, QT.Q2_K) if variant == "q2" else (QT.Q4_K, QT.Q4_K)


def tensor_specs(cfg: C.ModelConfig) -> list[TensorSpec]:
    """Every tensor of a DS4 file, in file order (ds4 `weights_bind`)."""
    D, V, S, H, hd = cfg.n_embd, cfg.n_vocab, cfg.hc_streams, cfg.n_head, cfg.head_dim
    E, F = cfg.n_expert, cfg.expert_ff
    gate_t, down_t = expert_types(cfg.variant)
    specs = [
        TensorSpec("token_embd.weight", (V, D), QT.F16, "embedding", -1),
        TensorSpec("output_hc_fn.weight", (S, cfg.hc_dim), QT.F16, "output", -1),
        TensorSpec("output_hc_scale.weight", (1,), QT.F32, "output", -1),
        TensorSpec("output_hc_base.weight", (S,), QT.F32, "output", -1),
        TensorSpec("output_norm.weight", (D,), QT.F32, "output", -1),
        TensorSpec("output.weight", (V, D), QT.Q8_0, "output", -1),
    ]
    for il in range(cfg.n_layer):
        def t(name, shape, qtype, kind, optional=False):
            specs.append(TensorSpec(f"blk.{il}.{name}", tuple(shape), qtype, kind, il, optional))
        ratio = cfg.ratio(il)
        t("hc_attn_fn.weight", (cfg.hc_mix, cfg.hc_dim), QT.F16, "hc")
        t("hc_attn_scale.weight", (3,), QT.F32, "hc")
        t("hc_attn_base.weight", (cfg.hc_mix,), QT.F32, "hc")
        t("attn_norm.weight", (D,), QT.F32, "norm")
        t("attn_q_a.weight", (cfg.q_lora_rank, D), QT.Q8_0, "attention")
        t("attn_q_a_norm.weight", (cfg.q_lora_rank,), QT.F32, "norm")
        t("attn_q_b.weight", (H * hd, cfg.q_lora_rank), QT.Q8_0, "attention")
        t("attn_kv.weight", (hd, D), QT.Q8_0, "attention")
        t("attn_kv_a_norm.weight", (hd,), QT.F32, "norm")
        t("attn_sinks.weight", (H,), QT.F32, "norm")
        t("attn_output_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.heads_per_group * hd), QT.Q8_0, "attention")
        t("attn_output_b.weight", (D, cfg.o_groups * cfg.o_lora_rank), QT.Q8_0, "attention")
        if ratio:
            w = cfg.compressor_width(il)
            t("attn_compressor_ape.weight", (ratio, w), QT.F16, "compressor")
            t("attn_compressor_kv.weight", (w, D), QT.F16, "compressor")
            t("attn_compressor_gate.weight", (w, D), QT.F16, "compressor")
            t("attn_compressor_norm.weight", (hd,), QT.F32, "compressor")
        if cfg.has_indexer(il):
            iw = 2 * cfg.indexer_dim
            t("indexer.attn_q_b.weight", (cfg.indexer_heads * cfg.indexer_dim, cfg.q_lora_rank), QT.F16, "indexer")
            t("indexer.proj.weight", (cfg.indexer_heads, D), QT.F16, "indexer")
            t("indexer_compressor_ape.weight", (4, iw), QT.F16, "indexer")
            t("indexer_compressor_kv.weight", (iw, D), QT.F16, "indexer")
            t("indexer_compressor_gate.weight", (iw, D), QT.F16, "indexer")
            t("indexer_compressor_norm.weight", (cfg.indexer_dim,), QT.F32, "indexer")
        t("hc_ffn_fn.weight", (cfg.hc_mix, cfg.hc_dim), QT.F16, "hc")
        t("hc_ffn_scale.weight", (3,), QT.F32, "hc")
        t("hc_ffn_base.weight", (cfg.hc_mix,), QT.F32, "hc")
        t("ffn_norm.weight", (D,), QT.F32, "norm")
        t("ffn_gate_inp.weight", (E, D), QT.F16, "router")
        t("exp_probs_b.bias", (E,), QT.F32, "router", optional=True)
        t("ffn_gate_exps.weight", (E, F, D), gate_t, "experts")
        t("ffn_up_exps.weight", (E, F, D), gate_t, "experts")
        t("ffn_down_exps.weight", (E, D, F), down_t, "experts")
        t("ffn_gate_shexp.weight", (F, D), QT.Q8_0, "shared")
        t("ffn_up_shexp.weight", (F, D), QT.Q8_0, "shared")
        t("ffn_down_shexp.weight", (D, F), QT.Q8_0, "shared")
        if il < cfg.n_hash_layers:
            t("ffn_gate_tid2eid.weight", (V, cfg.n_expert_used), QT.I32, "tid2eid")
    return specs


def decode_read_bytes(cfg: C.ModelConfig, indexer_active: bool = True) -> dict[str, int]:
    """Weight bytes one decode token must read, by part (ds4-spec 5.3).

    Whole tensors for everything but the embedding table and tid2eid (one row each) and the
    routed experts (n_expert_used of n_expert per layer). Norms, sinks and HC scales count
    under `norms`. Without an active indexer (n_comp <= top-k) its query side is not read.
    """
    parts: dict[str, int] = {}
    for s in tensor_specs(cfg):
        n = s.nbytes
        part = s.kind
        if s.kind in ("embedding", "tid2eid"):                  # one row per token
            n //= cfg.n_vocab
        elif s.kind == "experts":
            n = n * cfg.n_expert_used // cfg.n_expert
        elif s.kind == "indexer" and not indexer_active and s.name.split(".", 2)[2].startswith("indexer."):
            continue
        if s.kind == "norm" or (s.kind == "hc" and s.qtype == QT.F32):
            part = "norms"
        parts[part] = parts.get(part, 0) + n
    parts["total"] = sum(parts.values())
    return parts


# ---- model container ------------------------------------------------------------------------
@dataclass
class Tensor:
    spec: TensorSpec
    data: np.ndarray            # quantized: uint8 [..., rows, row_bytes]; plain: typed array of spec.shape

    @property
    def qtype(self) -> QT:
        return self.spec.qtype


@dataclass
class ModelFile:
    cfg: C.ModelConfig
    tensors: dict[str, Tensor]
    metadata: dict[str, object] = field(default_factory=dict)   # every non-tensor key, decoded
    path: str | None = None
    seed: int | None = None

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors.values())


def raw_view(spec: TensorSpec, flat: np.ndarray) -> np.ndarray:
    """View flat file bytes (or a typed array) in the layout `Tensor.data` promises, without copying."""
    if spec.qtype in PLAIN_DTYPES:
        dt = PLAIN_DTYPES[spec.qtype]
        arr = flat if flat.dtype == dt else flat.view(np.uint8).view(dt)
        return arr.reshape(spec.shape)
    rb = row_bytes(spec.qtype, spec.shape[-1])
    return flat.view(np.uint8).reshape(*spec.shape[:-1], rb)


# ---- writing ----------------------------------------------------------------------------------
def _add_kv(w: GGUFWriter, key: str, kind: str, value) -> None:
    scalar = {"u32": GGUFValueType.UINT32, "u64": GGUFValueType.UINT64, "f32": GGUFValueType.FLOAT32,
              "bool": GGUFValueType.BOOL, "i32": GGUFValueType.INT32, "str": GGUFValueType.STRING}
    arrays = {"arr_u32": GGUFValueType.UINT32, "arr_f32": GGUFValueType.FLOAT32, "arr_i32": GGUFValueType.INT32,
              "arr_str": GGUFValueType.STRING}
    if kind in scalar:
        w.add_key_value(key, value, scalar[kind])
    else:
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=arrays[kind])


def _kind_of(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "u32" if 0 <= value < 2 ** 32 else "i32"
    if isinstance(value, float):
        return "f32"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], str):
            return "arr_str"
        if value and isinstance(value[0], float):
            return "arr_f32"
        return "arr_i32"
    raise TypeError(f"cannot store metadata value of type {type(value).__name__}")


def _term_raises():
    """Make SIGTERM (`timeout`, `kill`) raise SystemExit while a file is written, so the clean-up
    that Ctrl-C gets runs for it too; returns the handler to restore (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, _raise)


def write_gguf(path: str, cfg: C.ModelConfig, source: "TensorSource | None",
               specs: list[TensorSpec] | None = None,
               extra_metadata: dict[str, object] | None = None,
               fill: "Callable[[str, list[tuple[TensorSpec, int]]], None] | None" = None) -> int:
    """Stream a DS4 GGUF to `path`, asking `source(spec)` for one tensor's data at a time.

    The host never holds the whole model. The file is written under a temporary name and renamed,
    so a crash never leaves a half-written model behind. Returns the file size.

    With `fill` instead of `source`, no tensor data are streamed: the header, metadata and tensor
    table are written as above, the file is extended to its full size with zeros (a sparse file),
    and `fill(temporary path, [(spec, absolute data offset)])` writes every tensor in place
    (offsets as gguf's reader finds them) before the rename. The bytes are the streamed file's.
    """
    from .fileio import check_free_space, write_error
    specs = tensor_specs(cfg) if specs is None else specs
    check_free_space(path, sum(s.nbytes for s in specs))
    tmp = f"{path}.tmp{os.getpid()}"
    w = GGUFWriter(tmp, C.ARCH)
    w.add_name(f"ds4bench synthetic {cfg.name} ({cfg.variant})")
    for key, (kind, value) in C.to_gguf_metadata(cfg).items():
        _add_kv(w, key, kind, value)
    for key, value in (extra_metadata or {}).items():
        _add_kv(w, key, _kind_of(value), value)
    for s in specs:
        plain = PLAIN_DTYPES.get(s.qtype)
        w.add_tensor_info(s.name, s.shape, np.dtype(plain or np.float32), s.nbytes,
                          raw_dtype=None if plain else s.qtype)
    on_term = _term_raises()
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if fill is not None:
            w.flush()
            # GGUFWriter pads before each tensor to the alignment and after it to a multiple of it
            pad = lambda n: -(-n // w.data_alignment) * w.data_alignment      # noqa: E731
            size = pad(w.fout[0].tell()) + sum(pad(s.nbytes) for s in specs)
            w.close()
            os.truncate(tmp, size)
            placed = {t.name: int(t.data_offset) for t in GGUFReader(tmp, "r").tensors}
            fill(tmp, [(s, placed[s.name]) for s in specs])
        else:
            for s in specs:
                data = source(s)
                if data.nbytes != s.nbytes:
                    raise ValueError(f"tensor {s.name}: source gave {data.nbytes} bytes, expected {s.nbytes}")
                w.write_tensor_data(np.ascontiguousarray(data))
            w.close()
        os.replace(tmp, path)
    except BaseException as e:
        err = write_error(path, e) if isinstance(e, OSError) else None     # before the space is freed
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if err is not None:
            raise err from None
        raise
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    return os.path.getsize(path)


# ---- reading --------------------------------------------------------------------------------
def _field_value(f):
    """Decode a GGUFReader field to a Python value (lists for arrays)."""
    try:
        return f.contents()
    except Exception:           # malformed field: report it where it is used
        return None


def read_metadata(reader: GGUFReader) -> dict[str, object]:
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _variant_from(reader_tensors: dict, fields: dict) -> str:
    v = fields.get("ds4bench.variant")
    if v in ("q2", "q4"):
        return v
    t = reader_tensors.get("blk.0.ffn_gate_exps.weight")
    if t is not None and QT(t.tensor_type) == QT.Q4_K:
        return "q4"
    return "q2"


GGUF_VERSIONS = (2, 3)
MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8      # name length, a name, n_dims, one dim, type, offset
MIN_KV = 8 + 1 + 4 + 1                       # key length, a key, value type, a byte of value


def check_header(path: str, size: int) -> None:
    """The fixed 24-byte header (magic, version, tensor and key counts) before gguf-py reads the
    rest, so a damaged one gives a line that says what is wrong rather than the reader's internals."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:4] != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (magic {head[:4]!r})")
    if len(head) < 24:
        raise ModelFileError(f"{path}: truncated: {size} bytes, shorter than the 24-byte GGUF header")
    version = int.from_bytes(head[4:8], "little")
    order = "little"
    if version not in GGUF_VERSIONS and int.from_bytes(head[4:8], "big") in GGUF_VERSIONS:
        version, order = int.from_bytes(head[4:8], "big"), "big"
    if version not in GGUF_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (ds4bench reads versions "
                             f"{' and '.join(map(str, GGUF_VERSIONS))}); the header is damaged or the file is "
                             f"from another tool")
    n_tensors, n_kv = int.from_bytes(head[8:16], order), int.from_bytes(head[16:24], order)
    if 24 + n_tensors * MIN_TENSOR_INFO + n_kv * MIN_KV > size:
        raise ModelFileError(f"{path}: truncated or damaged header: it claims {n_tensors} tensors and {n_kv} metadata keys, "
                             f"more than a {size}-byte file can hold")


def check_extents(path: str, reader: GGUFIndex, size: int) -> None:
    """Every tensor's data inside the file, at an aligned offset, and no two tensors overlapping."""
    align = reader.alignment
    spans = []
    for t in reader.tensors:
        start, n = int(t.data_offset), int(t.n_bytes)      # as the file's own type and dims say
        rel = start - int(reader.data_offset)
        if rel < 0 or rel % align:
            raise ModelFileError(f"{path}: tensor {t.name}: data offset {rel} is not a multiple of the file's "
                                 f"alignment {align} (a damaged tensor table)")
        if start + n > size:
            raise ModelFileError(f"{path}: truncated: tensor {t.name} ends at byte {start + n}, file has {size}")
        spans.append((start, start + n, t.name))
    spans.sort()
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ModelFileError(f"{path}: tensor {b} (bytes {s1}..{e1}) overlaps tensor {a} (bytes {s0}..{e0}): "
                                 f"a damaged tensor table")


# ---- the parsed header, cached ---------------------------------------------------------------
# gguf-py parses the metadata one element at a time: a DS4 file's 129k-entry vocabulary takes it
# about 3.5 s, a third of a cell process on the GPU machine. What it parsed (the metadata as
# Python values, the tensor table, the alignment) is kept as JSON under
# ~/.cache/ds4bench/gguf-index ($DS4BENCH_GGUF_INDEX; "off" to parse every time), keyed by the
# file's path, size, inode and modification time, and used only when the SHA-256 of the file's
# header (every byte before the tensor data: metadata and tensor table) is still the one parsed.
# File times can be coarser than a fast rewrite; the hash is not.
class IndexedTensor(NamedTuple):
    name: str
    tensor_type: int
    shape: tuple
    data_offset: int            # absolute, in the file
    n_bytes: int


@dataclass
class GGUFIndex:
    fields: dict                # metadata key -> Python value (read_metadata)
    tensors: list               # IndexedTensor, in file order
    alignment: int
    data_offset: int            # where the tensor data begin
    data: np.ndarray            # the whole file, memory-mapped read-only (uint8)
    cached: bool = False        # read from the index cache rather than parsed


def _index_path(path: str) -> Path | None:
    root = gguf_index_dir()
    if root is None:
        return None
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _header_sha(data: np.ndarray, end: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data[:end]))).hexdigest()


def read_index(path: str, size: int) -> GGUFIndex:
    """The parsed header of a GGUF (check_header first): from the index cache when this very
    file was parsed before, else from gguf-py (then cached). Raises ModelFileError."""
    cache = _index_path(path)
    if cache is not None and cache.is_file():
        try:
            d = json.loads(cache.read_text())
            data = np.memmap(path, dtype=np.uint8, mode="r")
            if _header_sha(data, int(d["data_offset"])) == d["header_sha256"]:
                tensors = [IndexedTensor(t[0], int(t[1]), tuple(t[2]), int(t[3]), int(t[4])) for t in d["tensors"]]
                return GGUFIndex(d["fields"], tensors, int(d["alignment"]), int(d["data_offset"]), data, cached=True)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass                # a damaged cache entry: parse the file again and rewrite it
    try:
        reader = GGUFReader(path, "r")
    except (OSError, MemoryError) as e:          # the mapping itself failed, not the file's contents
        raise ModelFileError(f"{path}: cannot memory-map the file ({type(e).__name__}: {e})") from None
    except Exception as e:       # the reader raises whatever numpy does on a short file
        if isinstance(e, ValueError) and ("reshape" in str(e) or "buffer" in str(e)):
            raise ModelFileError(f"{path}: truncated: a tensor's data run past the end of the file "
                                 f"({size} bytes)") from None
        raise ModelFileError(f"{path}: the GGUF metadata or tensor table cannot be parsed: the header is damaged "
                             f"or the file is truncated ({size} bytes)") from None
    tensors = [IndexedTensor(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset),
                             int(t.n_bytes)) for t in reader.tensors]
    idx = GGUFIndex(read_metadata(reader), tensors, int(reader.alignment), int(reader.data_offset), reader.data)
    if cache is not None:
        try:
            from .fileio import replacing
            cache.parent.mkdir(parents=True, exist_ok=True)
            with replacing(cache) as tmp:       # written under a temporary name, then renamed
                tmp.write_text(json.dumps({"header_sha256": _header_sha(idx.data, idx.data_offset),
                                           "fields": idx.fields, "alignment": idx.alignment,
                                           "data_offset": idx.data_offset, "tensors": [list(t) for t in tensors]}))
        except (OSError, TypeError, ValueError):
            pass                # an unwritable cache costs the next process the parse, nothing else
    return idx


def load_gguf(path: str, expect: C.ModelConfig | None = None, variant: str | None = None) -> ModelFile:
    """Memory-map a DS4 GGUF and validate metadata and every tensor; raises ModelFileError.

    Tensor data stay views of the mapping (no copy). `expect`, when given, is the config the
    caller needs (a preset); the file's metadata must agree with it, except for the routed-expert
    variant, which must agree only with `variant` when one is asked for.
    """
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    size = os.path.getsize(path)
    check_header(path, size)
    reader = read_index(path, size)
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch != C.ARCH:
        raise ModelFileError(f"{path}: architecture is {arch!r}, expected {C.ARCH!r}")
    rt = {t.name: t for t in reader.tensors}
    name = fields.get("ds4bench.preset") or "file"
    try:
        cfg = C.from_gguf_metadata(fields, name=str(name), variant=_variant_from(rt, fields))
    except ValueError as e:
        raise ModelFileError(f"{path}: inconsistent metadata: {e}") from None
    if variant is not None and cfg.variant != variant:
        raise ModelFileError(f"{path}: its routed experts are variant {cfg.variant}, not the {variant} asked for")
    if expect is not None:
        diff = C.config_diff(dataclasses.replace(expect, variant=cfg.variant), cfg)
        if diff:
            raise ModelFileError(f"{path}: metadata does not match preset {expect.name}: {'; '.join(diff[:3])}")

    tensors: dict[str, Tensor] = {}
    specs = tensor_specs(cfg)
    check_extents(path, reader, size)
    known = {s.name for s in specs}
    for s in specs:
        t = rt.get(s.name)
        if t is None:
            if s.optional:
                continue
            raise ModelFileError(f"{path}: tensor {s.name} is missing")
        try:
            qt = QT(int(t.tensor_type))
        except ValueError:
            raise ModelFileError(f"{path}: tensor {s.name} has unknown type id {int(t.tensor_type)}") from None
        dims = t.shape
        if qt != s.qtype or dims != s.gguf_dims:
            if qt not in FORMATS:
                raise ModelFileError(f"{path}: tensor {s.name}: type {qt.name} is not supported "
                                     f"(expected {s.qtype.name} {list(s.gguf_dims)})")
            raise ModelFileError(f"{path}: tensor {s.name}: expected {s.qtype.name} {list(s.gguf_dims)}, "
                                 f"found {qt.name} {list(dims)}")
        end = int(t.data_offset) + s.nbytes
        if end > size:
            raise ModelFileError(f"{path}: truncated: tensor {s.name} ends at byte {end}, file has {size}")
        flat = reader.data[int(t.data_offset):end]
        tensors[s.name] = Tensor(s, raw_view(s, flat))
    extra = sorted(set(rt) - known)
    if extra:
        raise ModelFileError(f"{path}: unexpected tensor {extra[0]} (and {len(extra) - 1} more) for a "
                             f"{cfg.n_layer}-layer DS4 model")
    seed = fields.get("ds4bench.seed")
    return ModelFile(cfg, tensors, fields, path, int(seed) if seed is not None else None)


TensorSource = Callable[[TensorSpec], np.ndarray]
