"""An engine outside this package, driven as a command: the matrix's `engine` parameter.

`--engine ds4bench` (the default) is this package's engine (cell.py). Any other value names an
adapter, a TOML file in benchmarks/engines/ (by name) or anywhere (by path), that says how to
run one greedy generation of one prompt with another engine and where its answer comes out:

    name = "fake"
    command = ["{python}", "{here}/fake_engine.py", "--model", "{model}", "--prompt", "{prompt}",
               "-n", "{n}", "--dump", "{dump}"]
    prompt = "text"                 # text: the prompt's text | chat_ids: our chat template's ids, comma-separated
    speed_command = [...]           # optional: a second run per repetition for the speed line, for an
                                    # engine that prints none while it dumps its steps
    timeout = 600                   # seconds per run (default: the cell's timeout)
    env = { }                       # fixed environment of every run (the cell's env axes come on top)
    [paths]                         # more placeholders: files or folders the user names in the environment
    ds4 = { env = "DS4_BIN", what = "the ds4 binary (ds4bench engines build ds4 --src CHECKOUT)" }
    [speed]                         # regexes over stdout + stderr; group 1 is tokens per second
    decode = 'generation: ([0-9.]+) t/s'
    prefill = 'prefill: ([0-9.]+) t/s'
    [tokens]                        # the JSON the engine writes to {dump}
    steps = "steps"                 # the list of generated steps
    id = "selected.id"              # a step's greedy token id
    top = "top_logprobs"            # a step's best-first list of alternatives
    top_id = "id"
    top_logprob = "logprob"

Placeholders: {model} (the cell's GGUF; a preset is written to one first), {prompt}, {n},
{ctx}, {dump} (a file the engine writes its steps to), {python} (this interpreter), {here}
(the adapter's folder), and one per [paths] entry: the value of its environment variable (the
cell's env first, so `--env DS4_BIN=/a/ds4,/b/ds4` makes two builds an axis), which must name
an existing file or folder. A cell records each such path with its size and SHA-256, and the
build description (`ds4bench-build.json`, written by `ds4bench engines build`) found beside
it, in `engine_paths`. Each prompt runs `reps` times, each run its own process; the cell's
decode and prefill tok/s are the medians of what the engine printed, and its fingerprints
(token ids, sha256, top-k logprobs) come from the first run, so verdicts, `compare` and plots
work as for our engine. An external engine has no teacher-forced KL pass and no stage probe:
its cells are judged by the free-running rules against their group's baseline.

Its toggles are environment variables, so they are matrix axes (`--env VAR=unset,1`): each
value runs in its own processes. The numeric-mode and placement axes are this package's engine
and do not apply (the cells record mode `native`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENGINES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "engines"     # ds4bench/harness/../..
OURS = "ds4bench"
NATIVE = "native"                   # the numeric mode an external engine's cells record
PROMPT_FORMS = ("text", "chat_ids")
BUILTIN = ("model", "prompt", "n", "ctx", "dump", "python", "here")     # placeholders every adapter has
BUILD_INFO = "ds4bench-build.json"  # what `ds4bench engines build` writes beside a binary


@dataclass
class Adapter:
    name: str
    command: list
    path: Path
    prompt: str = "text"
    speed_command: list | None = None
    timeout: float | None = None
    env: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)       # placeholder -> (environment variable, what it is)


def adapter_path(engine: str) -> Path:
    p = Path(engine)
    if p.suffix == ".toml" or p.parent != Path("."):
        return p
    return ENGINES_DIR / f"{engine}.toml"


def load_adapter(engine: str) -> Adapter:
    """The adapter `engine` names; ValueError (one line naming the file and the key) when it is
    missing or malformed."""
    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        import tomli as tomllib
    path = adapter_path(engine)
    if not path.is_file():
        known = sorted(p.stem for p in ENGINES_DIR.glob("*.toml")) if ENGINES_DIR.is_dir() else []
        raise ValueError(f"engine {engine!r}: no adapter {path} (engines: {', '.join([OURS, *known])}, or a TOML path)")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"engine adapter {path}: {str(e).splitlines()[0]}") from None
    where = f"engine adapter {path}"
    cmd = doc.get("command")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise ValueError(f"{where}: command must be a non-empty list of strings")
    if not any("{prompt}" in c for c in cmd) or not any("{dump}" in c for c in cmd):
        raise ValueError(f"{where}: command must pass {{prompt}} and {{dump}} to the engine")
    scmd = doc.get("speed_command")
    if scmd is not None and (not isinstance(scmd, list) or not scmd or not all(isinstance(c, str) for c in scmd)):
        raise ValueError(f"{where}: speed_command must be a non-empty list of strings")
    form = doc.get("prompt", "text")
    if form not in PROMPT_FORMS:
        raise ValueError(f"{where}: prompt must be one of {', '.join(PROMPT_FORMS)}, found {form!r}")
    speed, toks = doc.get("speed", {}), doc.get("tokens", {})
    for k in ("decode", "prefill"):
        if k not in speed:
            raise ValueError(f"{where}: [speed] needs a {k} regex (group 1: tokens per second)")
        try:
            if re.compile(speed[k]).groups < 1:
                raise ValueError(f"{where}: [speed] {k} regex has no group")
        except re.error as e:
            raise ValueError(f"{where}: [speed] {k} regex: {e}") from None
    toks = {"steps": "steps", "id": "selected.id", "top": "top_logprobs", "top_id": "id",
            "top_logprob": "logprob", **toks}
    unknown = sorted(set(doc) - {"name", "command", "speed_command", "prompt", "timeout", "env", "speed", "tokens",
                                 "paths"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]}")
    paths = {}
    for k, v in doc.get("paths", {}).items():
        if k in BUILTIN or not isinstance(v, dict) or not isinstance(v.get("env"), str) or set(v) - {"env", "what"}:
            raise ValueError(f"{where}: [paths] {k} must be {{ env = \"VARIABLE\", what = \"...\" }}"
                             + (f" and not a built-in placeholder ({', '.join(BUILTIN)})" if k in BUILTIN else ""))
        paths[k] = (v["env"], str(v.get("what", "a path")))
    for c in cmd + (scmd or []):
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(c) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: command item {c!r}: {e}") from None
        bad = [f for f in names if f not in BUILTIN and f not in paths]
        if bad:
            raise ValueError(f"{where}: command uses {{{bad[0]}}}, which is neither a built-in placeholder "
                             f"({', '.join(BUILTIN)}) nor a [paths] entry")
    return Adapter(str(doc.get("name", path.stem)), cmd, path, form, scmd, doc.get("timeout"),
                   {str(k): str(v) for k, v in doc.get("env", {}).items()}, speed, toks, paths)


def path_values(adapter: Adapter, env: dict, environ=None) -> dict:
    """{placeholder: path} of the adapter's [paths], each from its variable in `env` (a cell's:
    None means unset) or else `environ` (default: this process's). ValueError (one line naming the
    variable) when one is unset or names nothing."""
    from ..engine.options import adapter_path_var
    out = {}
    for name, (var, what) in adapter.paths.items():
        value = env[var] if var in env else adapter_path_var(var, environ)
        if not value:
            raise ValueError(f"engine {adapter.name}: {{{name}}} is ${var}, which is not set: give {what}")
        if not os.path.exists(value):
            raise ValueError(f"engine {adapter.name}: {var}={value}: no such file or folder ({what})")
        out[name] = value
    return out


def path_provenance(values: dict) -> dict:
    """What a cell records of each [paths] value: the path, and for a file its size, SHA-256 and
    the build description beside it (BUILD_INFO), when there is one."""
    out = {}
    for name, value in values.items():
        p = Path(value)
        d: dict = {"path": str(p.resolve())}
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            d.update(bytes=p.stat().st_size, sha256=h.hexdigest())
        info = (p.parent if p.is_file() else p) / BUILD_INFO
        if info.is_file():
            try:
                d["build"] = json.loads(info.read_text())
            except (OSError, ValueError) as e:
                d["build"] = f"unreadable {info}: {e}"
        out[name] = d
    return out


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def parse_steps(doc, adapter: Adapter, n: int) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """(greedy ids, top-k ids, top-k logprobs) of the first n steps of an engine's JSON dump."""
    t = adapter.tokens
    steps = _get(doc, t["steps"])[:n]
    ids = [int(_get(s, t["id"])) for s in steps]
    top = [[(int(_get(a, t["top_id"])), float(_get(a, t["top_logprob"]))) for a in _get(s, t["top"])] for s in steps]
    return ids, [[i for i, _ in s] for s in top], [[lp for _, lp in s] for s in top]


def parse_speed(text: str, adapter: Adapter) -> dict:
    """{decode, prefill}: tokens per second the engine printed (the last match), or None."""
    out = {}
    for k in ("decode", "prefill"):
        m = re.findall(adapter.speed[k], text)
        out[k] = float(m[-1] if isinstance(m[-1], str) else m[-1][0]) if m else None
    return out


def run_once(adapter: Adapter, model: str, prompt: str, n: int, ctx: int, dump: Path, timeout: float,
             env: dict, command: list | None = None) -> tuple[dict | None, dict, float]:
    """One generation: (parsed JSON, parsed speed, wall seconds); RuntimeError (one line) when the
    engine fails, times out or writes no steps. With `command` (the adapter's speed_command) no
    steps are read."""
    from ..engine.options import environment
    try:
        paths = path_values(adapter, env)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    subst = {"model": model, "prompt": prompt, "n": str(n), "ctx": str(ctx), "dump": str(dump),
             "python": sys.executable, "here": str(adapter.path.parent), **paths}
    cmd = [c.format(**subst) for c in (command or adapter.command)]
    child = {**environment(), **adapter.env, **{k: v for k, v in env.items() if v is not None}}
    for k in [k for k, v in env.items() if v is None]:
        child.pop(k, None)
    dump.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{adapter.name}: timed out after {timeout:g} s") from None
    except OSError as e:
        raise RuntimeError(f"{adapter.name}: cannot run {cmd[0]}: {e.strerror or e}") from None
    wall = time.perf_counter() - t0
    text = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
        raise RuntimeError(f"{adapter.name}: exited with status {r.returncode}" + (f": {last.strip()[:300]}" if last else ""))
    if command:
        return None, parse_speed(text, adapter), wall
    try:
        doc = json.loads(dump.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{adapter.name}: no readable steps in {dump} ({e})") from None
    return doc, parse_speed(text, adapter), wall


def measure(params: dict, fingerprints: str | None = None) -> dict:
    """One cell with an external engine (see the module docstring): the CellRecord as a dict."""
    import numpy as np
    from . import record, verdict
    from ..engine.generate import Fingerprint, token_hash
    from ..engine.gguf_io import load_gguf
    from ..engine.prompts import load_prompts
    from ..engine.tokenizer import Tokenizer
    p = params
    adapter = load_adapter(p["engine"])
    rec, na = record.start_record(p)
    rec.env = dict(p.get("env", {}))
    model = p.get("model_file")
    if not model:
        raise ValueError(f"engine {adapter.name} needs a model file (the matrix writes a preset to one first)")
    t0 = time.perf_counter()
    mf = load_gguf(model)
    rec.load_s = time.perf_counter() - t0
    tok = Tokenizer.from_gguf_metadata(mf.metadata)
    prompts = [(q.id, q.text, tok.chat(q.text)) for q in load_prompts(p["prompt_set"])]
    n = p["n_gen"]
    rec.ctx = p.get("ctx") or max(len(ids) for _, _, ids in prompts) + n + 1
    env = {**p.get("env", {}), **{k: None for k in p.get("env_unset", ())}}
    rec.engine_paths = path_provenance(path_values(adapter, env))
    dump_dir = Path(fingerprints).parent if fingerprints else Path(".")
    timeout = adapter.timeout or p.get("timeout_s") or 600
    fps, dec, pre, same = [], [], [], True
    t0 = time.perf_counter()
    for pid, text, ids in prompts:
        arg = text if adapter.prompt == "text" else ",".join(str(i) for i in ids)
        first = None
        for rep in range(max(1, p.get("reps", 1))):
            dump = dump_dir / f".{p.get('cell_id', 'cell')}-{pid}.engine.json"
            doc, speed, _ = run_once(adapter, model, arg, n, rec.ctx, dump, timeout, env)
            dump.unlink(missing_ok=True)
            if adapter.speed_command:
                speed = run_once(adapter, model, arg, n, rec.ctx, dump, timeout, env, adapter.speed_command)[1]
            steps = parse_steps(doc, adapter, n)
            if len(steps[0]) < n:
                raise RuntimeError(f"{adapter.name}: {len(steps[0])} steps for prompt {pid}, asked for {n}")
            dec.append(speed["decode"])
            pre.append(speed["prefill"])
            if first is None:
                first = steps
            else:
                same &= steps[0] == first[0]
        out, top_ids, top_lp = first
        fps.append(Fingerprint(prompt_id=pid, prompt_tokens=len(ids), tokens=out, sha256=token_hash(out),
                               text=tok.decode(out), topk_ids=top_ids, topk_logprobs=top_lp))
    rec.timed_s = time.perf_counter() - t0
    rec.deterministic = same
    got = [d for d in dec if d is not None]
    rec.decode_tps = float(np.median(got)) if got else None
    got = [x for x in pre if x is not None]
    rec.prefill_tps = float(np.median(got)) if got else None
    rec.decode_tps_reps = [d for d in dec if d is not None]
    for fp in fps:
        rec.prompts.append({"prompt_id": fp.prompt_id, "prompt_tokens": fp.prompt_tokens, "sha256": fp.sha256,
                            "text": fp.text, "tokens": fp.tokens, "nonfinite": False, "replica_mismatch": 0})
    if fingerprints:
        verdict.save_fingerprints(fingerprints, fps, {})
    why = f"external engine {adapter.name}: "
    for k in ("decode_tps", "prefill_tps"):
        if getattr(rec, k) is None:
            na[k] = why + f"its output matched no [speed] {k.split('_')[0]} regex"
    for k in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agree", "kl_steps", "probe_stages", "probe_s",
              "probe_mode", "probe_positions", "probe_lead", "probe_cached", "correctness_s"):
        na[k] = why + "no teacher-forced KL pass and no stage probe (free-running verdict rules)"
    for k in ("compile_s", "capture_s", "warmup_passes", "warmup_s", "setup_s", "stage_s", "latency_p50_ms",
              "latency_p90_ms", "latency_p99_ms", "timing_spread", "ttft_ms", "gpu_name", "roofline_pct",
              "device_peak_bytes", "placement", "cupy", "cuda_runtime"):
        na[k] = why + "the engine reports tok/s only"
    rec.host_rss_peak_bytes = record.host_rss_peak_bytes()
    rec.unavailable = {k: v for k, v in na.items() if getattr(rec, k, None) in (None, [], {})}
    rec.utc_end = record.utc_now()
    return rec.to_dict()
