"""Model config, presets, GGUF writing/reading/validation, synthetic weights, `ds4bench model`."""
import dataclasses
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4bench import cli
from ds4bench.engine import config as C, modelinfo
from ds4bench.engine.gguf_io import ModelFileError, load_gguf, read_index, tensor_specs, write_gguf
from ds4bench.engine.synth import make_model, make_tensor, synth_metadata, write_model

TINY = C.preset("tiny")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "tiny.gguf")
    write_model(TINY, path, seed=0)
    return path


def run_cli(args, capsys):
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- derived sizes against ds4-spec section 5 ------------------------------------------------------
def test_flash_totals_match_spec():
    q2 = modelinfo.summary(C.preset("flash", "q2"))
    q4 = modelinfo.summary(C.preset("flash", "q4"))
    assert q2["total_bytes"] == 86_714_778_972                      # 80.76 GiB
    assert round(q2["total_bytes"] / 2**30, 2) == 80.76
    assert q4["total_bytes"] == 164_628_170_076
    assert round(q4["total_bytes"] / 2**30, 1) == 153.3
    assert q2["n_tensors"] == 1331


def test_flash_per_layer_bytes_match_spec():
    per = modelinfo.summary(C.preset("flash"))["per_layer"]
    assert per[0] == per[1] == 1_959_130_584                         # uncompressed, with tid2eid
    assert per[2] == 1_997_416_408                                   # ratio 4 with tid2eid
    assert per[4] == per[42] == 1_994_313_688                        # ratio 4
    assert per[3] == per[41] == 1_964_549_592                        # ratio 128


def test_flash_decode_read_bytes():
    s = modelinfo.summary(C.preset("flash"))
    rd, rn = s["decode_read"], s["decode_read_no_indexer"]
    assert abs(rd["total"] - 9.56e9) < 0.01e9                        # "about 9.55 GB" (9.559)
    assert abs(rn["total"] - 9.20e9) < 0.01e9
    assert abs(rd["attention"] - 4.886e9) < 1e6
    assert abs(rd["experts"] - 1.826e9) < 1e6
    assert abs(rd["output"] - 0.563e9) < 1e6
    q4 = modelinfo.summary(C.preset("flash", "q4"))["decode_read"]["total"]
    assert abs(q4 - 11.39e9) < 0.01e9


# ---- config ------------------------------------------------------------------------------------
def test_presets_have_the_ds4_structure():
    flash = C.preset("flash")
    assert (flash.n_layer, flash.n_embd, flash.n_vocab, flash.n_expert) == (43, 4096, 129280, 256)
    assert flash.compress_ratios[:5] == (0, 0, 4, 128, 4) and flash.compress_ratios[-1] == 4
    assert C.preset("flash-4l").compress_ratios == (0, 0, 4, 128)
    assert C.preset("flash-4l").n_embd == 4096
    for name in ("tiny", "small"):
        cfg = C.preset(name)
        r = cfg.compress_ratios
        assert 0 in r and 4 in r and any(x > 4 for x in r), name
        assert 0 < cfg.n_hash_layers < cfg.n_layer
        assert cfg.indexer_topk < 64 + 16 * (name == "small") * 4        # a few hundred tokens select


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        C.preset("huge")
    with pytest.raises(ValueError, match="compress_ratios has 3 entries for 4 layers"):
        dataclasses.replace(TINY, n_layer=4, compress_ratios=(0, 0, 4))


def test_metadata_round_trip():
    fields = {k: v for k, (_, v) in C.to_gguf_metadata(TINY).items()}
    back = C.from_gguf_metadata(fields, name="tiny", variant="q2")
    assert C.config_diff(TINY, back) == []
    del fields["deepseek4.attention.indexer.top_k"]
    with pytest.raises(ValueError, match="deepseek4.attention.indexer.top_k is missing"):
        C.from_gguf_metadata(fields)


# ---- synthetic weights and the file round trip ----------------------------------------------------
def test_synthetic_weights_are_deterministic_per_tensor():
    spec = next(s for s in tensor_specs(TINY) if s.name == "blk.3.ffn_down_exps.weight")
    a, b, c = make_tensor(TINY, spec, 7), make_tensor(TINY, spec, 7), make_tensor(TINY, spec, 8)
    assert a.dtype == np.uint8 and a.nbytes == spec.nbytes
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_written_file_loads_validated_and_matches_memory(tiny_file):
    mf = load_gguf(tiny_file, TINY)
    mem = make_model(TINY, seed=0)
    assert set(mf.tensors) == set(mem.tensors) == {s.name for s in tensor_specs(TINY)}
    for name, t in mem.tensors.items():
        assert np.array_equal(np.asarray(mf[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    assert isinstance(mf["output.weight"].data.base, np.memmap) or isinstance(mf["output.weight"].data, np.memmap)
    assert mf.seed == 0 and mf.cfg.name == "tiny"


@pytest.mark.parametrize("preset,variant", [("tiny", "q2"), ("small", "q4")])
def test_the_parallel_writer_writes_the_same_bytes(tmp_path, tiny_file, preset, variant):
    cfg = C.preset(preset, variant)
    one = tiny_file if (preset, variant) == ("tiny", "q2") else str(tmp_path / "one.gguf")
    if one != tiny_file:
        write_model(cfg, one, seed=0)
    many = tmp_path / "many.gguf"
    assert write_model(cfg, str(many), seed=0, workers=3) == os.path.getsize(one)
    with open(one, "rb") as a, open(many, "rb") as b:
        assert a.read() == b.read()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]     # written under a temporary name, renamed


def _killed(*args):
    os._exit(9)                                                     # as the OOM killer ends a worker


def test_a_dead_writer_process_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from ds4bench.engine import synth
    monkeypatch.setattr(synth, "_fill_tensor", _killed)
    rc, _, err = run_cli(["model", "make", "--preset", "tiny", "--workers", "2", "-o", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "a process writing tensors died" in err
    assert list(tmp_path.iterdir()) == []
    rc, _, err = run_cli(["model", "make", "--workers", "0", "-o", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2 and "--workers must be at least 1, got 0" in err


def test_auto_workers_one_per_cpu_as_far_as_memory_holds():
    from ds4bench.engine.synth import auto_workers
    flash = C.preset("flash")
    assert auto_workers(TINY, 1 << 40, 16) == 1                     # small models: one process
    assert auto_workers(flash, 128 << 30, 16) == 16
    assert auto_workers(flash, 23 << 30, 16) == 7                   # 80%: 8 GiB for the head, 1.5 GiB each other
    assert auto_workers(flash, 4 << 30, 16) == 1 and auto_workers(flash, 0, 16) == 1


def test_gguf_reader_sees_the_same_tensors(tiny_file):
    r = gguf.GGUFReader(tiny_file)
    got = {t.name: (tuple(int(d) for d in t.shape), QT(int(t.tensor_type))) for t in r.tensors}
    want = {s.name: (s.gguf_dims, s.qtype) for s in tensor_specs(TINY)}
    assert got == want
    assert r.fields["general.architecture"].contents() == "deepseek4"
    assert r.fields["deepseek4.block_count"].contents() == TINY.n_layer


def test_the_parsed_header_is_cached_and_a_changed_header_is_parsed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4BENCH_GGUF_INDEX", str(tmp_path / "idx"))
    p = tmp_path / "m.gguf"
    write_model(TINY, str(p), seed=0)
    size = os.path.getsize(p)
    a, b = read_index(str(p), size), read_index(str(p), size)
    assert not a.cached and b.cached and len(list((tmp_path / "idx").glob("*.json"))) == 1
    assert (b.fields, b.tensors, b.alignment, b.data_offset) == (a.fields, a.tensors, a.alignment, a.data_offset)
    assert np.array_equal(load_gguf(str(p)).tensors["output.weight"].data, make_model(TINY, 0).tensors["output.weight"].data)
    # the header rewritten in place with the same size and modification time (file times can be
    # coarser than a fast rewrite): the cached entry no longer matches the header's hash
    st, blob = os.stat(p), bytearray(p.read_bytes())
    at = blob.index(b"deepseek4")
    p.write_bytes(bytes(blob[:at]) + b"deepseek5" + bytes(blob[at + 9:]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ModelFileError, match="architecture is 'deepseek5'"):
        load_gguf(str(p))
    p.write_bytes(bytes(blob))
    for f in (tmp_path / "idx").glob("*.json"):
        f.write_text("{")                                   # a damaged entry: parsed again, rewritten
    assert not read_index(str(p), size).cached and read_index(str(p), size).cached
    monkeypatch.setenv("DS4BENCH_GGUF_INDEX", "off")
    assert not read_index(str(p), size).cached


def test_q2_and_q4_expert_types(tmp_path):
    q4 = C.preset("tiny", "q4")
    types = {s.name.split(".", 2)[2]: s.qtype for s in tensor_specs(q4) if s.layer == 0}
    assert types["ffn_gate_exps.weight"] == types["ffn_down_exps.weight"] == QT.Q4_K
    q2 = {s.name.split(".", 2)[2]: s.qtype for s in tensor_specs(TINY) if s.layer == 0}
    assert (q2["ffn_gate_exps.weight"], q2["ffn_down_exps.weight"]) == (QT.IQ2_XXS, QT.Q2_K)
    path = str(tmp_path / "q4.gguf")
    write_model(q4, path)
    assert load_gguf(path).cfg.variant == "q4"


# ---- the loader refuses bad files with one line ----------------------------------------------------
def _write(path, specs=None, meta=None, source=None):
    write_gguf(str(path), TINY, source or (lambda s: make_tensor(TINY, s, 0)), specs,
               {**synth_metadata(TINY, 0), **(meta or {})})
    return str(path)


def _bad_spec(name, **change):
    return [dataclasses.replace(s, **change) if s.name == name else s for s in tensor_specs(TINY)]


def _fill(s):
    """Data of the right size for a (possibly altered) spec."""
    n = s.nbytes
    return np.zeros(n // np.dtype(np.float16).itemsize, np.float16) if s.qtype == QT.F16 \
        else np.zeros(n, np.uint8)


@pytest.mark.parametrize("case,pattern", [
    ("text", "not a GGUF file"),
    ("header", "truncated or damaged header: it claims 181 tensors"),
    ("data", "truncated: a tensor's data run past the end of the file"),
    ("last_byte", "truncated: a tensor's data run past the end of the file"),
    ("missing", "tensor blk.2.attn_kv.weight is missing"),
    ("shape", r"tensor blk.1.attn_q_a.weight: expected Q8_0 \[256, 128\], found Q8_0 \[256, 96\]"),
    ("type", r"tensor blk.0.ffn_gate_inp.weight: expected F16 \[256, 16\], found F32 \[256, 16\]"),
    ("unsupported", "type Q6_K is not supported"),
    ("arch", "architecture is 'deepseek5'"),
    ("metadata", "inconsistent metadata"),
    ("extra", "unexpected tensor"),
])
def test_bad_files_give_one_line(tmp_path, tiny_file, capsys, case, pattern):
    p = tmp_path / f"{case}.gguf"
    blob = open(tiny_file, "rb").read()
    if case == "text":
        p.write_text("hello, not a model\n")
    elif case == "header":
        p.write_bytes(blob[:2000])
    elif case == "data":
        p.write_bytes(blob[: len(blob) - 5000])
    elif case == "last_byte":
        p.write_bytes(blob[:-1])
    elif case == "missing":
        _write(p, [s for s in tensor_specs(TINY) if s.name != "blk.2.attn_kv.weight"])
    elif case == "shape":
        _write(p, _bad_spec("blk.1.attn_q_a.weight", shape=(96, 256)), source=_fill)
    elif case == "type":
        specs = _bad_spec("blk.0.ffn_gate_inp.weight", qtype=QT.F32)
        _write(p, specs, source=lambda s: np.zeros(s.shape, np.float32) if s.qtype == QT.F32 else make_tensor(TINY, s, 0))
    elif case == "unsupported":
        bsz, tsz = gguf.GGML_QUANT_SIZES[QT.Q6_K]
        spec = next(s for s in tensor_specs(TINY) if s.name == "blk.0.ffn_down_exps.weight")
        n = int(np.prod(spec.shape)) // bsz * tsz
        specs = [s for s in tensor_specs(TINY) if s.name != spec.name]

        class Q6(type(spec)):
            nbytes = n
        specs.insert(tensor_specs(TINY).index(spec), Q6(**{**dataclasses.asdict(spec), "qtype": QT.Q6_K}))
        _write(p, specs, source=lambda s: np.zeros(n, np.uint8) if s.name == spec.name else make_tensor(TINY, s, 0))
    elif case == "arch":
        at = blob.index(b"general.architecture") + len("general.architecture") + 4 + 8
        assert blob[at:at + 9] == b"deepseek4"
        p.write_bytes(blob[:at] + b"deepseek5" + blob[at + 9:])
    elif case == "metadata":
        _write(p, meta={"deepseek4.attention.value_length": 64})
    elif case == "extra":
        big = dataclasses.replace(TINY, n_layer=7, compress_ratios=TINY.compress_ratios + (4,))
        write_gguf(str(p), TINY, lambda s: make_tensor(big, s, 0),
                   tensor_specs(TINY) + [s for s in tensor_specs(big) if s.layer == 6][:1],
                   synth_metadata(TINY, 0))
    with pytest.raises(ModelFileError, match=pattern):
        load_gguf(str(p))
    rc, out, err = run_cli(["model", "info", str(p)], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ds4bench: error: ") and "Traceback" not in err


def test_file_against_wrong_preset(tiny_file, capsys):
    rc, _, err = run_cli(["model", "info", tiny_file, "--preset", "small"], capsys)
    assert rc == 2 and "does not match preset small" in err


# ---- CLI -------------------------------------------------------------------------------------------
def test_model_make_and_info(tmp_path, capsys):
    path = str(tmp_path / "t.gguf")
    rc, out, _ = run_cli(["model", "make", "--preset", "tiny", "--seed", "3", "-o", path], capsys)
    assert rc == 0 and "wrote" in out
    rc, out, _ = run_cli(["model", "info", path], capsys)
    assert rc == 0
    assert f"{len(tensor_specs(TINY))} tensors validated" in out
    assert "decode read per token" in out and "experts" in out and "IQ2_XXS" in out


def test_model_info_flash_preset(capsys):
    rc, out, _ = run_cli(["model", "info", "--preset", "flash"], capsys)
    assert rc == 0
    assert "86,714,778,972 B" in out and "80.76 GiB" in out
    assert "9.56 GB with the indexer active" in out


def test_a_terminated_write_leaves_no_temporary_file(tmp_path):
    """SIGTERM (`timeout`, `kill`) mid-write removes the half-written file, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time
    code = (
        "import sys, time, numpy as np\n"
        "from ds4bench.engine import config as C\n"
        "from ds4bench.engine.gguf_io import write_gguf\n"
        "def slow(s):\n"
        "    print('writing', flush=True); time.sleep(30)\n"
        "    return np.zeros(s.nbytes, np.uint8)\n"
        "write_gguf(sys.argv[1], C.preset('tiny'), slow)\n")
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"          # the temporary file exists now
    assert [p.name for p in tmp_path.iterdir()] == [f"m.gguf.tmp{proc.pid}"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []
