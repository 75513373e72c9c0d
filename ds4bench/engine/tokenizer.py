"""DS4 tokenizer: byte-level BPE with ds4's JoyAI pre-tokenizer split.

One `Tokenizer` serves real DeepSeek V4 Flash GGUFs (built from their `tokenizer.ggml.*`
metadata) and synthetic models (`byte_level`, whose vocabulary is the 256 byte tokens, the
six DS4 control tokens, a few English merges, the `｜DSML｜` marker ds4 requires and
`<unused_N>` padding). Both split text the
way ds4's `bpe_tokenize_text` does, so a piece boundary, and therefore a token count, means
the same thing for either.

BPE merging is the `tokenizers` library's; ds4 applies the same rule (lowest merge rank
first, leftmost among equals). Control tokens are never parsed out of text: `encode` treats
"<think>" as eight bytes, and `chat` inserts control ids directly, as ds4 does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Regex, Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers

SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)
# ds4's loader also requires this tool-call marker in the vocabulary ("required tokenizer token
# is missing" otherwise); synthetic vocabularies carry it in the first unused id after the
# merges, so every other id keeps its place and a synthetic file loads in ds4 too.
DSML_TOKEN = "｜DSML｜"

PRE_JOYAI = "joyai-llm"

# GGUF token types (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# ds4's JoyAI split as one ordered alternation; at each position the first alternative that
# matches wins, exactly like the if/else chain in ds4.c. "Letter" means an ASCII letter or any
# non-ASCII character (ds4 treats every non-ASCII character as letter-like, CJK included once
# a letter run has started); "punct" means ASCII punctuation and symbols only.
_PUNCT = r"!-/:-@\[-`{-~"
_LETTER = r"A-Za-z\x{80}-\x{10FFFF}"
_BLANK = r"\t\x{0B}\x{0C} "  # ASCII whitespace other than \r and \n
_JOYAI_SPLIT = "|".join([
    r"[0-9]{1,3}",                                   # digits in runs of at most three
    r"[\x{3040}-\x{30FF}\x{4E00}-\x{9FA5}]+",        # Hiragana, Katakana, CJK ideographs
    rf"[{_PUNCT}][A-Za-z]+",                          # one symbol glued to an ASCII word: 's .com
    rf"[{_LETTER}]+",                                 # a word
    # one blank or control character (never \r \n, digits or punct) leading a word: " the"
    rf"[\x{{00}}-\x{{09}}\x{{0B}}\x{{0C}}\x{{0E}}-\x{{20}}\x{{7F}}][{_LETTER}]+",
    rf" [{_PUNCT}]+[\r\n]*",                          # space + symbols, trailing newlines kept: " >;\n"
    rf"[{_PUNCT}]+[\r\n]*",
    r"[\t\n\x{0B}\x{0C}\r ]*[\r\n]",                 # whitespace up to its last newline
    rf"[{_BLANK}]+(?=[{_BLANK}][{_LETTER}{_PUNCT}])",  # a blank run leaves its last blank to the next word
    rf"[{_BLANK}]+",
    r"[\s\S]",
])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68
    bytes map in order to U+0100.. so every token is a printable string."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(0x100 + n) for n, b in enumerate(shifted)})
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class Tokenizer:
    """A byte-level BPE vocabulary plus the DS4 control-token ids.

    Build one with `Tokenizer.from_gguf_metadata` or `byte_level`; `gguf_metadata` gives back
    the keys a GGUF file stores it under.
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int],
                 merges: Sequence[str], pre: str = PRE_JOYAI):
        if pre != PRE_JOYAI:
            raise ValueError(f"tokenizer.ggml.pre: unsupported pre-tokenizer {pre!r} "
                             f"(ds4bench implements {PRE_JOYAI!r}, the split ds4 uses)")
        if len(token_types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type: {len(token_types)} entries "
                             f"for {len(tokens)} tokens")
        self._tokens = list(tokens)
        self._types = [int(t) for t in token_types]
        self._merges = list(merges)
        self._pre = pre
        self.vocab_size = len(self._tokens)

        ids = {tok: i for i, tok in enumerate(self._tokens)}
        for name in SPECIAL_TOKENS:
            if name not in ids:
                raise ValueError(f"tokenizer.ggml.tokens: required DS4 token {name!r} is missing")
        (self.bos_id, self.eos_id, self.user_id, self.assistant_id,
         self.think_start_id, self.think_end_id) = (ids[name] for name in SPECIAL_TOKENS)

        pairs = []
        for rank, merge in enumerate(self._merges):
            parts = merge.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"tokenizer.ggml.merges[{rank}]: expected 'a b', found {merge!r}")
            pairs.append((parts[0], parts[1]))
        try:
            bpe = models.BPE(vocab=ids, merges=pairs)
        except Exception as e:  # tokenizers raises a bare Exception for out-of-vocab merges
            raise ValueError(f"tokenizer.ggml.merges: {e}") from None
        self._hf = _HFTokenizer(bpe)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_JOYAI_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

        # What each id decodes to: raw bytes for byte-level tokens, literal text otherwise.
        self._pieces: list[bytes | str] = []
        for i, (tok, kind) in enumerate(zip(self._tokens, self._types)):
            if kind == TOKEN_UNUSED:
                self._pieces.append(f"<unused:{i}>")
            elif kind in (TOKEN_NORMAL, TOKEN_BYTE):
                self._pieces.append(b"".join(
                    bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in tok))
            else:
                self._pieces.append(tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; control-token spellings in it are ordinary bytes."""
        if not text:
            return []
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids. Bytes are joined before UTF-8 decoding (errors="replace"), so a
        character split over tokens survives; control tokens give their own text and unused
        or out-of-vocabulary ids give "<unused:N>"."""
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            piece = self._pieces[i] if 0 <= i < self.vocab_size else f"<unused:{i}>"
            if isinstance(piece, bytes):
                run += piece
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(piece)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def chat(self, prompt: str, system: str = "") -> list[int]:
        """ds4's chat prompt, thinking off:
        BOS [system] <｜User｜> prompt <｜Assistant｜> </think>."""
        return [self.bos_id, *(self.encode(system) if system else []), self.user_id,
                *self.encode(prompt), self.assistant_id, self.think_end_id]

    def gguf_metadata(self) -> dict[str, object]:
        return {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": self._pre,
            "tokenizer.ggml.tokens": list(self._tokens),
            "tokenizer.ggml.token_type": list(self._types),
            "tokenizer.ggml.merges": list(self._merges),
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
        }

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, object]) -> "Tokenizer":
        """The tokenizer stored in a GGUF's metadata. Control ids are found by spelling, as ds4
        does; bos/eos ids, where present, must agree with them."""
        model = _field(fields, "tokenizer.ggml.model", str)
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model: expected 'gpt2' (byte-level BPE), "
                             f"found {model!r}")
        tok = cls(tokens=_field(fields, "tokenizer.ggml.tokens", list),
                  token_types=_field(fields, "tokenizer.ggml.token_type", list),
                  merges=_field(fields, "tokenizer.ggml.merges", list),
                  pre=_field(fields, "tokenizer.ggml.pre", str))
        for key, name, want in (("tokenizer.ggml.bos_token_id", SPECIAL_TOKENS[0], tok.bos_id),
                                ("tokenizer.ggml.eos_token_id", SPECIAL_TOKENS[1], tok.eos_id)):
            if key in fields and _field(fields, key, int) != want:
                raise ValueError(f"{key}: {fields[key]} disagrees with the token table "
                                 f"({name!r} is id {want})")
        return tok


def _field(fields: Mapping[str, object], key: str, kind: type):
    """fields[key] as str, int or list (GGUF readers hand back bytes and numpy values)."""
    if key not in fields:
        raise ValueError(f"{key}: missing from the GGUF metadata")
    value = fields[key]
    try:
        if kind is str:
            return value.decode() if isinstance(value, bytes) else str(value)
        if kind is int:
            return int(value)
        if isinstance(value, (str, bytes)):
            raise TypeError("found a string, not an array")
        return [v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
                for v in value]
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{key}: cannot read as {kind.__name__}: {e}") from None


# Common English byte pairs, in rank order, for synthetic vocabularies ("Ġ" is the space byte).
ENGLISH_MERGES = (
    "Ġ t", "h e", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġt he", "e d", "n d", "Ġ s",
    "Ġ w", "o u", "n g", "in g", "Ġ o", "Ġ b", "Ġ c", "e s", "a t", "o r", "Ġ f", "Ġ m",
    "e n", "Ġ h", "i s", "a r", "l l", "Ġ p", "a l", "Ġ d",
)
BYTE_LEVEL_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def byte_level(vocab_size: int) -> Tokenizer:
    """The tokenizer of synthetic models: ids 0-255 are the bytes, then the six DS4 control
    tokens, then as many of ENGLISH_MERGES as fit, then ds4's "｜DSML｜" marker where there is room,
    then "<unused_N>" (N = id) up to vocab_size."""
    if vocab_size < BYTE_LEVEL_MIN_VOCAB:
        raise ValueError(f"byte-level vocab_size {vocab_size} is too small: it needs at least "
                         f"{BYTE_LEVEL_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} control tokens)")
    merges = list(ENGLISH_MERGES[:vocab_size - BYTE_LEVEL_MIN_VOCAB])
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + list(SPECIAL_TOKENS)
    tokens += [m.replace(" ", "") for m in merges]
    types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * len(SPECIAL_TOKENS) + [TOKEN_NORMAL] * len(merges)
    if len(tokens) < vocab_size:
        tokens.append(DSML_TOKEN)
        types.append(TOKEN_CONTROL)
    tokens += [f"<unused_{i}>" for i in range(len(tokens), vocab_size)]
    types += [TOKEN_UNUSED] * (vocab_size - len(types))
    return Tokenizer(tokens, types, merges)
