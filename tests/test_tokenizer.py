"""Tokenizer (byte-level and JoyAI/DS4 vocabularies) and prompt-set loading."""

import random
import string

import pytest
from tokenizers import Regex, pre_tokenizers

from ds4bench.engine.prompts import load_prompts, prompt_set_names
from ds4bench.engine.tokenizer import (BYTE_TO_CHAR, SPECIAL_TOKENS, TOKEN_CONTROL, TOKEN_NORMAL,
                                Tokenizer, _JOYAI_SPLIT, byte_level)

TEXTS = ["", "Hello, world!", "What is 2+2? Answer in one word.",
         "naïve café — “quoted”", "日本語のテキスト", "robot 🤖🎨 paints 👩🏽‍🎨", "tabs\tand\r\nnewlines\n\n  indented",
         "<think>not a control token</think>", "\x00\x01\x7f"]


@pytest.fixture(scope="module")
def tok():
    return byte_level(512)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_level_layout(tok):
    assert tok.vocab_size == 512
    assert [tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id,
            tok.think_start_id, tok.think_end_id] == list(range(256, 262))
    assert tok.encode("A") == [ord("A")]
    assert len(tok.encode(" the")) == 1  # merges apply
    assert byte_level(262).encode("the") == [ord("t"), ord("h"), ord("e")]  # no room for merges
    with pytest.raises(ValueError, match="vocab_size 261"):
        byte_level(261)


def test_decode_special_unused_and_split_character(tok):
    assert tok.decode([tok.think_end_id]) == "</think>"
    assert (tok.decode([tok.user_id, ord("h"), ord("i"), tok.eos_id])
            == "<｜User｜>hi<｜end▁of▁sentence｜>")
    assert tok.decode([511]) == "<unused:511>"
    assert tok.decode([0xE6, 0x97, 0xA5]) == "日"  # one character over three byte tokens
    assert tok.decode([0xE6, 0x97]) == "\ufffd"


def test_chat_layout(tok):
    prompt = "What is the capital of France? One word."
    ids = tok.chat(prompt)
    assert ids == [tok.bos_id, tok.user_id, *tok.encode(prompt), tok.assistant_id, tok.think_end_id]
    with_system = tok.chat(prompt, system="Be brief.")
    assert with_system[:1 + len(tok.encode("Be brief."))] == [tok.bos_id, *tok.encode("Be brief.")]
    assert with_system[-1] == tok.think_end_id


def test_gguf_metadata_round_trip(tok):
    meta = tok.gguf_metadata()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "joyai-llm"
    assert meta["tokenizer.ggml.token_type"][tok.bos_id] == TOKEN_CONTROL
    assert meta["tokenizer.ggml.token_type"][511] == 5
    again = Tokenizer.from_gguf_metadata(meta)
    for text in TEXTS + [load_prompts("default")[-1].text]:
        assert again.encode(text) == tok.encode(text)
    assert again.gguf_metadata() == meta


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                 "tokenizer.ggml.pre", "tokenizer.ggml.token_type"])
def test_missing_key_is_named(tok, key):
    meta = tok.gguf_metadata()
    del meta[key]
    with pytest.raises(ValueError, match=f"^{key}: missing"):
        Tokenizer.from_gguf_metadata(meta)


def test_bad_metadata_is_named(tok):
    meta = tok.gguf_metadata()
    with pytest.raises(ValueError, match="tokenizer.ggml.pre: unsupported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama3"})
    with pytest.raises(ValueError, match="tokenizer.ggml.eos_token_id"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.eos_token_id": 7})
    tokens = [t for t in meta["tokenizer.ggml.tokens"] if t != "<think>"]
    with pytest.raises(ValueError, match="<think>"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": tokens,
                                      "tokenizer.ggml.token_type": [1] * len(tokens)})


def _joyai_vocab():
    """A DS4-shaped vocabulary small enough to reason about: bytes, controls, a few merges."""
    merges = ["1 2", "12 3", "4 5", "Ġ t", "h e", "Ġt he", "' s"]
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + list(SPECIAL_TOKENS)
    tokens += [m.replace(" ", "") for m in merges]
    types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * 6 + [TOKEN_NORMAL] * len(merges)
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "joyai-llm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges}), tokens


def test_joyai_vocab_splits_digits_and_applies_merges():
    tok, tokens = _joyai_vocab()
    pieces = lambda text: [tokens[i] for i in tok.encode(text)]
    assert pieces("12345") == ["123", "45"]       # "123" | "45", not "12" "34" "5"
    assert pieces("1234512") == ["123", "45", "1", "2"]  # "123" | "451" | "2"
    assert pieces(" the cat's") == ["Ġthe", "Ġ", "c", "a", "t", "'s"]
    assert pieces("2 the") == ["2", "Ġthe"]
    assert tok.decode(tok.encode("123 the 45's")) == "123 the 45's"
    ids = tok.chat("12345")
    assert [tokens[i] for i in ids] == ["<｜begin▁of▁sentence｜>", "<｜User｜>", "123", "45",
                                        "<｜Assistant｜>", "</think>"]


def _ds4_pieces(text):
    """ds4's bpe_tokenize_text split, restated step by step as an oracle for the regex."""
    letters, punct, space = set(string.ascii_letters), set(string.punctuation), set(" \t\n\r\v\f")
    n = len(text)
    is_letter = lambda i: i < n and (text[i] in letters or ord(text[i]) >= 128)
    is_cjk = lambda i: i < n and (0x4E00 <= ord(text[i]) <= 0x9FA5 or 0x3040 <= ord(text[i]) <= 0x30FF)
    is_punct = lambda i: i < n and text[i] in punct
    out, pos = [], 0
    while pos < n:
        start, c = pos, text[pos]
        if c.isascii() and c.isdigit():
            while pos < n and pos - start < 3 and text[pos].isascii() and text[pos].isdigit():
                pos += 1
        elif is_cjk(pos):
            while is_cjk(pos):
                pos += 1
        elif is_punct(pos) and pos + 1 < n and text[pos + 1] in letters:
            pos += 1
            while pos < n and text[pos] in letters:
                pos += 1
        elif is_letter(pos):
            while is_letter(pos):
                pos += 1
        elif c not in "\r\n" and not is_punct(pos) and is_letter(pos + 1):
            pos += 1
            while is_letter(pos):
                pos += 1
        elif c == " " and is_punct(pos + 1) or is_punct(pos):
            pos += 1
            while is_punct(pos):
                pos += 1
            while pos < n and text[pos] in "\r\n":
                pos += 1
        elif c in space:
            end, last_nl = pos, None
            while end < n and text[end] in space:
                end += 1
                if text[end - 1] in "\r\n":
                    last_nl = end
            if last_nl is not None:
                pos = last_nl
            elif end - pos > 1 and (is_letter(end) or is_punct(end)):
                pos = end - 1
            else:
                pos = end
        else:
            pos += 1
        out.append(text[start:pos])
    return out


def test_joyai_regex_matches_ds4_split():
    split = pre_tokenizers.Split(Regex(_JOYAI_SPLIT), behavior="isolated")
    rng = random.Random(4)
    alphabet = "aZq09 \t\n\r\v\f!.,'(<>;_é日かー🤖\x01\x7f"
    cases = ["    int x;\n}", "x >;\n\ny", "a  5 b\t\t(c", "café中文かなabc 日本", "\x01a\x7f!"]
    cases += ["".join(rng.choices(alphabet, k=rng.randint(1, 24))) for _ in range(2000)]
    for text in cases:
        assert [p for p, _ in split.pre_tokenize_str(text)] == _ds4_pieces(text), repr(text)


def test_default_prompts(tok):
    prompts = load_prompts("default")
    assert [(p.id, p.kind, p.expect) for p in prompts] == [
        ("two_plus_two", "smoke", "Four"), ("capital_france", "smoke", "Paris"),
        ("robot_story", "smoke", None), ("long_story", "long", None)]
    assert [p.text for p in prompts[:3]] == [
        "What is 2+2? Answer in one word.", "What is the capital of France? One word.",
        "Tell me a short story about a robot learning to paint."]
    assert len(tok.encode(prompts[3].text)) > 2000
    assert load_prompts("smoke") == prompts[:3]
    assert {"default", "smoke"} <= set(prompt_set_names())


def test_prompt_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no_such_set"):
        load_prompts("no_such_set")
    missing = tmp_path / "gone.toml"
    with pytest.raises(ValueError, match="gone.toml"):
        load_prompts(str(missing))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[prompt]]\nid = "ok"\nkind = "smoke"\ntext = "hi"\n\n'
                   '[[prompt]]\nid = "broken"\ntext = "no kind"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: prompt 'broken': kind"):
        load_prompts(str(bad))
    bad.write_text('[[prompt]]\nid = "f"\nkind = "long"\nfile = "absent.txt"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: prompt 'f': cannot read file"):
        load_prompts(str(bad))
    bad.write_text("[[prompt]\n")
    with pytest.raises(ValueError, match=r"bad\.toml: not valid TOML"):
        load_prompts(str(bad))


def test_synthetic_vocab_carries_the_token_ds4_requires_without_moving_ids():
    from ds4bench.engine.tokenizer import BYTE_LEVEL_MIN_VOCAB, DSML_TOKEN, ENGLISH_MERGES, TOKEN_CONTROL
    for size in (512, 4096, 129280):
        tok = byte_level(size)
        i = tok._tokens.index(DSML_TOKEN)
        assert i == BYTE_LEVEL_MIN_VOCAB + len(ENGLISH_MERGES)      # after bytes, controls, merges
        assert tok._types[i] == TOKEN_CONTROL and tok.decode([i]) == DSML_TOKEN
        assert tok._tokens[i + 1] == f"<unused_{i + 1}>"            # the ids after it keep their names
        assert tok.encode(DSML_TOKEN) != [i]                        # never parsed out of text
    assert DSML_TOKEN not in byte_level(BYTE_LEVEL_MIN_VOCAB + len(ENGLISH_MERGES))._tokens   # no room: absent
