"""Tokenizers: round trips, the ecosystem's loaders, and the real models' tokenizers against `transformers`."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmkit.errors import LlmkitError
from llmkit.tokenizer import KINDS, SpecialTokens, Tokenizer, train_tokenizer
from llmkit.tokenizer.train import WORD_SPLIT

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=st.text(max_size=200))
def test_byte_bpe_round_trips_any_unicode(tokenizers_by_kind, text):
    tok = tokenizers_by_kind["byte-bpe"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id is None  # byte-level: nothing is ever unknown


def _alphabet(plays, min_count=50):
    from collections import Counter

    counts = Counter("".join(plays))
    return "".join(sorted(c for c, n in counts.items() if n >= min_count and not c.isspace()))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_char_and_bpe_round_trip_text_in_their_alphabet(tokenizers_by_kind, plays, kind):
    tok = tokenizers_by_kind[kind]
    alphabet = _alphabet(plays, 1) + " \n"

    @SETTINGS
    @given(st.text(alphabet=alphabet, max_size=300))
    def check(text):
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)

    check()


def test_unigram_round_trips_text_in_its_alphabet(tokenizers_by_kind, plays):
    tok = tokenizers_by_kind["unigram"]
    alphabet = _alphabet(plays) + " \n"

    @SETTINGS
    @given(st.text(alphabet=alphabet, max_size=300))
    def check(text):
        text = text.lstrip(" ")  # the documented exception: spaces at the very start are dropped
        ids = tok.encode(text)
        assume(tok.unk_id not in ids)
        assert tok.decode(ids) == text

    check()


@pytest.fixture(scope="module")
def unigram_bytes(plays):
    return train_tokenizer(plays, "unigram", 1280, byte_fallback=True, special=SpecialTokens(sentinels=0))


def test_unigram_with_byte_fallback_round_trips_any_text(unigram_bytes, plays, tmp_path):
    """Characters the pieces do not cover are spelled in UTF-8 bytes, never <unk> (a plain unigram gives <unk>); text
    the pieces cover takes no byte token; transformers reads the file and gives the same ids and text back."""
    from transformers import AutoTokenizer

    tok = unigram_bytes
    assert tok.vocab_size == 1280 and "<0x00>" in tok.backend.get_vocab() and "<0xFF>" in tok.backend.get_vocab()
    plain = train_tokenizer(plays, "unigram", 1280 - 256, special=SpecialTokens(sentinels=0))
    odd = 'Enter HAMLET — naïve 😀 "quoted" costs $5 * 中文'
    assert plain.unk_id in plain.encode(odd)
    ids = tok.encode(odd)
    assert tok.unk_id not in ids and tok.decode(ids) == odd
    assert ids.count(tok.backend.token_to_id("<0xF0>")) == 1  # the emoji: 4 byte tokens, F0 9F 98 80
    known, byte_ids = plays[1][:2000].lstrip(" "), {tok.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert byte_ids.isdisjoint(tok.encode(known)) and tok.decode(tok.encode(known)) == known  # pieces cover the plays
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).fingerprint() == tok.fingerprint()
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(odd, add_special_tokens=False)["input_ids"] == ids and auto.decode(ids) == odd

    for typed in ("x <0x41> y", "<0xF0><0x9F>", "<0xZZ> <0x4>"):  # byte tokens' names typed out stay text
        assert tok.decode(tok.encode(typed)) == typed and byte_ids.isdisjoint(tok.encode(typed))

    @SETTINGS
    @given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=200))  # ▁: a space
    def check(text):
        text = unicodedata.normalize("NFC", text).lstrip(" ")  # as the plain unigram: NFC, leading spaces dropped
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text

    check()
    with pytest.raises(LlmkitError, match="unigram"):
        train_tokenizer(plays, "bpe", 1280, byte_fallback=True)


@pytest.mark.parametrize("kind", ["byte-bpe", "char", "bpe", "unigram", "unigram-bytes"])
def test_token_bytes_add_up_to_the_bytes_of_the_text(tokenizers_by_kind, unigram_bytes, plays, kind):
    """Bits per byte divides by the bytes the scored tokens stand for: summed over a text's ids, they are its UTF-8
    bytes (a unigram counts the space ▁ it puts before the first word); special tokens stand for none."""
    tok = unigram_bytes if kind == "unigram-bytes" else tokenizers_by_kind[kind]
    text = plays[2][:3000].lstrip(" ") + (" — naïve 😀 $5" if kind in ("byte-bpe", "unigram-bytes") else "")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_id not in ids
    first_space = 1 if kind.startswith("unigram") else 0
    assert sum(tok.token_bytes[i] for i in ids) == len(text.encode()) + first_space
    assert all(tok.token_bytes[i] == 0 for i in tok.special_ids)


def test_word_round_trips_text_made_of_its_words(tokenizers_by_kind):
    tok = tokenizers_by_kind["word"]
    vocab = tok.backend.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and " " + w in vocab)[:500]
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(WORD_SPLIT), "isolated")
    # A separator's trailing space joins the next word (" word"); the rest must be tokens of its own.
    seps = [
        s for s in (" ", "\n", ", ", ".\n", "; ", "! ", "\n\n") if all(piece in vocab for piece, _ in split.pre_tokenize_str(s.rstrip(" ")))
    ]
    assert len(words) > 100 and len(seps) >= 4

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(words), st.sampled_from(seps)), min_size=1, max_size=40))
    def check(pairs):
        text = "".join(w + s for w, s in pairs).rstrip(" ")  # a lone trailing space is no word
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text

    check()


def test_wordpiece_round_trip_is_bert_normalization(tokenizers_by_kind):
    tok = tokenizers_by_kind["wordpiece"]
    bert = tokenizers.pre_tokenizers.BertPreTokenizer()

    @SETTINGS
    @given(st.text(alphabet="abcdefghilmnoprstuwyABDEHMOT,.;:!? \n", max_size=200))
    def check(text):
        ids = tok.encode(text)
        assume(tok.unk_id not in ids)
        assert tok.decode(ids) == " ".join(piece for piece, _ in bert.pre_tokenize_str(text))

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tokenizer_loads_in_tokenizers_and_transformers(tokenizers_by_kind, plays, tmp_path, kind):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = tokenizers_by_kind[kind]
    tok.save(tmp_path)
    text = plays[1][:3000] + " <|user|> hi <|end|> <extra_id_3>"
    ours = tok.encode(text)
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text, add_special_tokens=False).ids == ours
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(text, add_special_tokens=False)["input_ids"] == ours
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(text, add_special_tokens=False)["input_ids"] == ours
    assert auto.convert_tokens_to_ids(auto.eos_token) == tok.eos_id
    assert auto.convert_tokens_to_ids(auto.pad_token) == tok.pad_id
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode(text) == ours and reloaded.special == tok.special and reloaded.kind == kind
    assert reloaded.fingerprint() == tok.fingerprint()  # shards and checkpoints made with it accept it back


def test_special_tokens_are_whole_and_each_kind_keeps_those_it_needs(tokenizers_by_kind):
    for kind, tok in tokenizers_by_kind.items():
        assert len(tok.sentinel_ids) == 100
        assert tok.encode("<extra_id_7>") == [tok.token_id("<extra_id_7>")]
        assert tok.encode("<|assistant|>") == [tok.token_id("<|assistant|>")]
        assert tok.mask_id is not None and tok.bos_id is not None and tok.pad_id is not None
        assert (tok.unk_id is None) == (kind == "byte-bpe")
    tok = train_tokenizer(["just a little text " * 20], "bpe", 200, special=SpecialTokens(sentinels=0, chat=False, extra=["<sep>"]))
    assert tok.sentinel_ids == [] and tok.token_id("<sep>") is not None and tok.token_id("<|user|>") is None


def test_lowercase_and_vocab_size(plays):
    tok = train_tokenizer(plays, "wordpiece", 1000, lowercase=True)
    assert tok.vocab_size <= 1000
    assert tok.encode("MACBETH") == tok.encode("macbeth")


def test_vocabulary_too_small_for_special_tokens_is_a_clear_error(plays):
    with pytest.raises(LlmkitError, match="too small for the 109 special tokens"):
        train_tokenizer(plays, "bpe", 100)
    with pytest.raises(LlmkitError, match="too small"):
        train_tokenizer(plays, "byte-bpe", 300)  # 256 bytes + 108 specials do not fit
    with pytest.raises(LlmkitError, match="empty corpus"):
        train_tokenizer(["", "  "], "bpe", 1000)
    with pytest.raises(LlmkitError, match="unknown tokenizer kind"):
        train_tokenizer(plays, "sentencepiece", 1000)


def test_decode_refuses_ids_outside_the_vocabulary(tokenizers_by_kind):
    tok = tokenizers_by_kind["bpe"]
    with pytest.raises(LlmkitError, match="outside this tokenizer's vocabulary"):
        tok.decode([1, tok.vocab_size + 5])


def test_corrupt_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(LlmkitError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(LlmkitError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


# --- the embedded real models' tokenizers --------------------------------------------------------------

TRICKY = [
    "Héllo wörld, café naïve façade — «quotes» and ‘curly’ ones.",
    "Türkçe: ğüşıöç ĞÜŞİÖÇ, ıi İI.",
    "Emoji 🤗🚀👩🏽‍💻 and flags 🇫🇷, CJK 日本語のテキスト, Arabic مرحبا.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567 3.14159 and   multiple   spaces\ttabs\n\n\nnewlines",
    "<|endoftext|>text right after<|im_end|>",
]


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer():
    from transformers import AutoTokenizer

    from llmkit.data.sources import shakespeare
    from llmkit.embedded import embedded_path

    path = embedded_path("smollm2")
    ours = Tokenizer.load("smollm2")
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hamlet = shakespeare("hamlet")[0].text
    raw_hamlet = shakespeare("hamlet", clean=False)[0].text
    for text in [hamlet, raw_hamlet, *TRICKY]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    for text in TRICKY:
        assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == 49152
    assert ours.special["eos"] == "<|im_end|>" and "im_start" in ours.chat_template


@pytest.mark.slow
def test_minilm_tokenizer_equals_transformers():
    from transformers import AutoTokenizer

    from llmkit.embedded import embedded_path

    ours = Tokenizer.load("minilm")
    theirs = AutoTokenizer.from_pretrained(str(embedded_path("minilm")))
    for text in TRICKY + ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog."]:
        assert ours.encode(text) == theirs(text)["input_ids"]  # by default, as transformers: [CLS] ... [SEP]
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.kind == "wordpiece" and ours.special["mask"] == "[MASK]"


@pytest.mark.slow
def test_gguf_pre_tokenizers_tokenize_as_llama_cpp(tmp_path):
    """llama.cpp's own ids for each pre-tokenizer, pinned by benchmarks/llama_cpp_tokenizer_check.py (SmolLM2's vocabulary
    under each pre's split rules and bos default)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_files import smollm2_tokenizer_fields, write_llama_gguf

    pinned = json.loads((Path(__file__).parent / "data" / "llama_cpp_tokens.json").read_text(encoding="utf-8"))
    for pre, cases in pinned.items():
        write_llama_gguf(tmp_path / f"{pre}.gguf", None, smollm2_tokenizer_fields(pre=pre))
        tok = Tokenizer.load(tmp_path / f"{pre}.gguf")
        for text, ids in cases.items():
            assert tok.encode(text) == ids, (pre, text)


def test_truncation_keeps_the_closing_special_token_and_bos_is_never_doubled(tokenizers_by_kind):
    from tokenizers import processors

    tok = Tokenizer.from_folder(tokenizers_by_kind["wordpiece"].save(Path(tempfile.mkdtemp()) / "t"))
    cls, sep = tok.token_id("<s>"), tok.token_id("</s>")
    tok.backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", cls), ("</s>", sep)])
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 5, max_length=8)
    assert len(ids) == 8 and ids[0] == cls and ids[-1] == sep
    assert tok.encode("hi", add_bos=True)[:2] != [cls, cls]
