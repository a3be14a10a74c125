"""GGUF out and back in: llmkit's export read back by llmkit, by `transformers` (its own GGUF reader) and by the `gguf`
package; quantized exports within their grids' error; the tokenizer's llama.cpp pre-tokenizer found by behaviour on
a multilingual, code and emoji text set; what llama.cpp cannot run refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import llmkit
from llmkit.errors import LlmkitError
from llmkit.model import build_model, preset
from llmkit.model.convert.gguf import export_gguf
from llmkit.tokenizer.pretrained import PROBE_TEXTS, gguf_fields, gguf_tokenizer_fields, tokenizer_from_gguf_fields

from conftest import randomize_norms_and_biases, run_cli


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _hf_model(family: str, vocab: int):
    """A tiny random `transformers` model of `family` with random norms and biases (ones and zeros would hide a
    misplaced one): Llama (untied head), Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms; heads of 128, wider
    than d_model / n_heads as in Qwen3-0.6B: transformers' GGUF reader takes 128 whatever the file's key_length says)."""
    import transformers

    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config, cls = {
        "llama": (transformers.LlamaConfig(**shape, max_position_embeddings=128, rope_theta=5000.0), transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config(**shape, max_position_embeddings=128, tie_word_embeddings=True), transformers.Qwen2ForCausalLM),
        "qwen3": (
            transformers.Qwen3Config(**shape, head_dim=128, max_position_embeddings=128, tie_word_embeddings=False),
            transformers.Qwen3ForCausalLM,
        ),
    }[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize_norms_and_biases(model, seed=1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizers_by_kind):
    """Each family saved as a Hugging Face folder with llmkit's byte-level BPE tokenizer (2,048 tokens)."""
    tok = tokenizers_by_kind["byte-bpe"]
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        folder = tmp_path_factory.mktemp(family)
        ref = _hf_model(family, tok.vocab_size)
        ref.save_pretrained(folder)
        tok.save(folder)
        out[family] = (folder, ref)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_gguf_export_reads_back_equal_in_llmkit_and_transformers(tmp_path, folders, family):
    import transformers

    folder, ref = folders[family]
    ours = llmkit.load(folder)
    path = export_gguf(ours, tmp_path / "model.gguf", ours.tokenizer, quant="f32")
    back = llmkit.load(path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    with torch.no_grad():
        expected = ref(ids).logits
        assert _max_diff(back(ids), expected) <= 1e-4
        assert _max_diff(theirs(ids).logits, expected) <= 1e-4  # llama.cpp's layout, read by another implementation
    c = back.config
    assert (c.qkv_bias, c.qk_norm, c.tie_embeddings, c.head_dim) == {
        "llama": (None, False, False, 16),
        "qwen2": (True, False, True, 16),
        "qwen3": (None, True, False, 128),
    }[family]
    fields = gguf_fields(path)
    assert fields["general.architecture"] == family
    assert fields[f"{family}.context_length"] == 128 and fields[f"{family}.block_count"] == 2
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llmkit's byte-level BPE splits as GPT-2 does
    assert fields["tokenizer.chat_template"] == ours.tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == ours.tokenizer.eos_id
    for text in PROBE_TEXTS:
        assert back.tokenizer.encode(text) == ours.tokenizer.encode(text)


def test_quantized_exports_stay_within_their_grids_error(tmp_path, folders):
    """f16, q8_0 and q4_0: every matrix read back within its format's rounding bound, vectors exact; the logits move
    little. Per block of 32 values with step d (amax/127 for q8_0, amax/8 for q4_0) stored in float16: q8_0 rounds to
    half a step, q4_0 up to a whole one (its 16 levels clip at +7), each plus the step's own rounding (<= 127 or 8
    steps x 2^-11); f16 rounds to 2^-11 relative."""
    folder, _ = folders["qwen2"]
    ours = llmkit.load(folder)
    ids = torch.randint(0, ours.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(ids)
    state = ours.state_dict()
    seen = {}
    for quant, step in (("f16", None), ("q8_0", 127), ("q4_0", 8)):
        back = llmkit.load(export_gguf(ours, tmp_path / f"{quant}.gguf", ours.tokenizer, quant=quant))
        for name, w in back.state_dict().items():
            original = state[name]
            if w.dim() == 1:
                assert torch.equal(w, original), name
                continue
            if quant == "f16":
                bound = original.abs() * 2**-11 + 1e-7
            else:
                blocks = original.reshape(original.shape[0], -1, 32).abs().amax(-1, keepdim=True)  # (rows, blocks, 1)
                # the embeddings stay q8_0 in a q4_0 file (as llama.cpp keeps them above 4 bits)
                s = 127 if quant == "q4_0" and name.startswith("embed") else step
                step_size = blocks / s
                bound = (step_size * ((0.5 if s == 127 else 1.0) + s * 2**-11) + 1e-7).expand(-1, -1, 32).reshape(original.shape)
            assert bool(((w - original).abs() <= bound).all()), (quant, name)
        with torch.no_grad():
            seen[quant] = _max_diff(back(ids), expected) / expected.abs().max().item()
    assert seen["f16"] < 1e-3 and seen["f16"] < seen["q8_0"] < seen["q4_0"] < 0.5, seen


def test_the_command_exports_a_run_that_llmkit_then_serves_from_the_file(tmp_path, tiny_base):
    out = tmp_path / "tiny.gguf"
    proc = run_cli("model", "export", "--model", str(tiny_base), "--out", str(out), "--quant", "q8_0")
    assert "exported llama" in proc.stdout and "q8_0" in proc.stdout and "ollama create" in proc.stdout
    assert gguf_fields(out)["general.file_type"] == 7  # MOSTLY_Q8_0
    ran = run_cli("generate", "--model", str(out), "--prompt", "To be", "--greedy", "--max-new-tokens", "6", "--json")
    assert len(json.loads(ran.stdout)["ids"]) == 6
    bad = run_cli("model", "export", "--model", str(tiny_base), "--out", str(tmp_path / "hf"), "--quant", "q4_0", check=False)
    assert bad.returncode != 0 and "--quant applies to --format gguf only" in bad.stderr


def test_what_llama_cpp_cannot_run_is_refused_by_name(tmp_path, tokenizers_by_kind):
    modern = build_model(preset("cpu-modern", vocab_size=2048, d_model=64, n_layers=1, n_heads=4)).eval()
    with pytest.raises(LlmkitError, match="activation relu2.*logit_softcap") as e:
        export_gguf(modern, tmp_path / "m.gguf", tokenizers_by_kind["byte-bpe"])
    assert "--format hf" in e.value.fix
    llama = build_model(preset("tiny-llama", vocab_size=2048, d_model=64, n_layers=1, n_heads=4)).eval()
    with pytest.raises(LlmkitError, match="unigram tokenizer"):
        export_gguf(llama, tmp_path / "m.gguf", tokenizers_by_kind["unigram"])
    windowed = build_model(preset("tiny-llama", vocab_size=2048, d_model=64, n_layers=1, n_heads=4, sliding_window=8, rotary_dim=8)).eval()
    with pytest.raises(LlmkitError, match="sliding_window.*rotary_dim"):  # llama.cpp's llama would attend to everything
        export_gguf(windowed, tmp_path / "m.gguf", tokenizers_by_kind["byte-bpe"])
    with pytest.raises(LlmkitError, match="unknown GGUF quantization 'q3_k'"):
        export_gguf(llama, tmp_path / "m.gguf", tokenizers_by_kind["byte-bpe"], quant="q3_k")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _family_tokenizer(plays, kind: str):
    """A byte-level BPE trained with `tokenizers` the way a family's tokenizer.json is built: Qwen2's split rule (one
    digit at a time) or Llama 3's (numbers in threes, whole vocabulary words skip the merges)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmkit.tokenizer.pretrained import SPLITS

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLITS[kind][0]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(plays, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


@pytest.mark.parametrize(("kind", "pre"), [("qwen2", "qwen2"), ("llama3", "llama-bpe")])
def test_a_family_tokenizer_gets_its_llama_cpp_name_and_encodes_as_transformers(tmp_path, plays, kind, pre):
    import transformers

    from llmkit.tokenizer import Tokenizer

    backend = _family_tokenizer(plays, kind)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    ours = Tokenizer.load(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    fields = gguf_tokenizer_fields(ours, 1536)
    assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"][1500:1502] == ["[PAD1500]", "[PAD1501]"] and fields["tokenizer.ggml.token_type"][1500] == 5
    as_llama_cpp = tokenizer_from_gguf_fields(fields, "test")
    for text in PROBE_TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected
        assert as_llama_cpp.encode(text) == expected, text
        assert as_llama_cpp.decode(expected) == theirs.decode(expected)
    assert np.count_nonzero(np.array(fields["tokenizer.ggml.token_type"]) == 3) == 3  # the specials are control tokens
