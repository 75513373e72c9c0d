"""Prompt sets: TOML files in benchmarks/prompts/, one [[prompt]] table per prompt.

    [[prompt]]
    id = "capital_france"
    kind = "smoke"                 # "smoke": short, has a known answer; "long": prefill-sized
    text = "What is the capital of France? One word."
    expect = "Paris"               # optional: what a real DS4 model answers

A prompt gives either `text` or `file` (a path relative to the TOML file; one trailing newline
of the file is dropped, so an editor's final newline does not become a prompt token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "prompts"       # ds4bench/engine/../..
KINDS = ("smoke", "long")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str
    expect: str | None  # the answer a real DS4 model gives, None where there is no single one


def prompt_set_names() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.toml"))


def load_prompts(path_or_name: str = "default") -> list[Prompt]:
    """Prompts of a named set (benchmarks/prompts/<name>.toml) or of a TOML file path."""
    path = Path(path_or_name)
    if path.suffix != ".toml" and path.parent == Path("."):
        path = PROMPTS_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise ValueError(f"prompt set {path_or_name!r}: no file {path} "
                         f"(known sets: {', '.join(prompt_set_names()) or 'none'})")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    entries = doc.get("prompt")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: no [[prompt]] entries")
    prompts = [_prompt(path, n, entry) for n, entry in enumerate(entries)]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: prompt id {dup!r} appears more than once")
    return prompts


def _prompt(path: Path, n: int, entry: object) -> Prompt:
    where = f"{path}: prompt #{n + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a [[prompt]] table")
    pid = entry.get("id")
    if not isinstance(pid, str) or not pid:
        raise ValueError(f"{where}: needs an id string")
    where = f"{path}: prompt {pid!r}"
    unknown = set(entry) - {"id", "kind", "text", "file", "expect"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, found {kind!r}")
    if ("text" in entry) == ("file" in entry):
        raise ValueError(f"{where}: give exactly one of text or file")
    if "file" in entry:
        source = path.parent / str(entry["file"])
        try:
            text = source.read_text(encoding="utf-8").removesuffix("\n")
        except OSError as e:
            raise ValueError(f"{where}: cannot read file {source}: {e.strerror}") from None
    else:
        text = entry["text"]
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: text must be a non-empty string")
    expect = entry.get("expect")
    if expect is not None and not isinstance(expect, str):
        raise ValueError(f"{where}: expect must be a string")
    return Prompt(id=pid, text=text, kind=kind, expect=expect)
