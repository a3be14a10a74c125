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
    with pytest.raises(
        LlmkitError, match="sliding_window .a sliding window"
    ):  # llama.cpp would attend to everything (partial RoPE alone: phi3)
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


# --- SentencePiece vocabularies and the Gemma / Phi-3 architectures ------------------------------------------------


def _write_tokenizer_only(path, fields: dict, architecture: str):
    import gguf

    from llmkit.model.convert.gguf import _write_tokenizer

    w = gguf.GGUFWriter(str(path), architecture)
    _write_tokenizer(w, fields)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("family", "arch"), [("gemma2", "gemma2"), ("phi3", "phi3"), ("llama2", "llama")])
def test_sentencepiece_tokenizers_go_to_gguf_and_back_as_transformers_reads_them(tmp_path, plays, family, arch):
    """A family's SentencePiece BPE (byte fallback; Gemma's, Phi-3's and Llama 2's handling of spaces) written as
    llama.cpp's 'llama' tokenizer: llmkit's reading of the file and transformers' own GGUF reader encode every probe
    text (scripts, emoji, code, runs of spaces) as the original tokenizer does, and decode alike; a tokenizer whose
    spaces the architecture's reader would treat otherwise is refused."""
    import transformers

    from llmkit.tokenizer import Tokenizer
    from llmkit.tokenizer.pretrained import from_gguf

    from conftest import sentencepiece_tokenizer

    original = sentencepiece_tokenizer(plays[:2], family)
    original.save_pretrained(tmp_path / "hf")
    ours = Tokenizer.load(tmp_path / "hf")
    fields = gguf_tokenizer_fields(ours, len(original) + 8, arch)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] == (family != "gemma2")
    types = np.array(fields["tokenizer.ggml.token_type"])
    assert (types == 6).sum() == 256 and (types == 5).sum() == 8  # the byte tokens, the [PADn] rows
    assert types[ours.token_id("unk")] == 3 and types[ours.token_id("bos")] == 3  # matched whole, as the tokenizer does
    _write_tokenizer_only(tmp_path / "tok.gguf", fields, arch)
    back = from_gguf(tmp_path / "tok.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in PROBE_TEXTS + ("  two leading spaces", "a  b   c"):
        expected = original.encode(text)
        assert ours.encode(text) == expected, text
        assert back.encode(text) == expected, text
        assert theirs.encode(text) == expected, text
        assert back.decode(expected, skip_special_tokens=True) == original.decode(expected, skip_special_tokens=True)
    if family == "llama2":  # Llama 2's spaces are not Phi-3's: written for llama.cpp's phi3 it would read differently
        with pytest.raises(LlmkitError, match="handling of spaces"):
            gguf_tokenizer_fields(ours, len(original), "phi3")


def _family_model(family: str, vocab: int):
    """A tiny random transformers model of `family` with random norms. Gemma's heads are 256 wide (transformers' GGUF
    reader takes query_pre_attn_scalar 256 whatever the file says; llama.cpp scales by 1/sqrt(head_dim)) and its caps
    transformers' defaults; Phi-3's vocabulary has 32,064 rows as the real one (its reader's pad id is 32000)."""
    import transformers as T

    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**shape, vocab_size=vocab, num_hidden_layers=3, head_dim=256, sliding_window=8))
    elif family == "gemma3":  # 7 layers: Gemma 3's pattern makes layer 5 global
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**shape, vocab_size=vocab, num_hidden_layers=7, head_dim=256, sliding_window=8))
    elif family == "gemma3-scaled":  # what transformers' GGUF reader leaves out: linear scaling, a local RoPE base, a logit cap
        cfg = T.Gemma3TextConfig(
            **shape,
            vocab_size=vocab,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            },
            final_logit_softcapping=6.0,
        )
        model = T.Gemma3ForCausalLM(cfg)
    else:
        extra: dict = {}  # no window: llama.cpp gives Phi-3 none (a windowed one exports with a note, tested below)
        if family == "phi3-longrope":  # Phi-4-mini's partial RoPE, Phi-3.5's LongRoPE (context 128 grown from 32)
            from conftest import longrope_phi3

            extra = longrope_phi3(32)
        cfg = T.Phi3Config(**shape, vocab_size=32064, num_hidden_layers=2, tie_word_embeddings=False, pad_token_id=0, **extra)
        model = T.Phi3ForCausalLM(cfg)
    torch.manual_seed(0)
    model.eval()
    randomize_norms_and_biases(model, seed=1, norm_centre=0.0 if family.startswith("gemma") else 1.0)
    return model


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma3-scaled", "phi3", "phi3-longrope"])
def test_gemma_and_phi3_gguf_exports_read_back_equal_in_llmkit_and_transformers(tmp_path, plays, family):
    """Export -> GGUF (f32) -> llmkit: the logits of the transformers model at 40 positions (beyond the window of 8,
    and LongRoPE's original context of 32), and the same file read by transformers' own GGUF reader where it reads
    every setting; Gemma's norms stored as 1 + weight, its windows as a pattern, Phi-3's fused matrices; a q8_0 file's
    fused blocks cut into q/k/v exactly (the fast decode path's blocks)."""
    import transformers

    from llmkit.model.quantize import use_gguf_blocks

    from conftest import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(plays[:2], family)
    ref = _family_model(family, len(tok))
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    path = export_gguf(ours, tmp_path / "model.gguf", ours.tokenizer, quant="f32")
    back = llmkit.load(path)
    ids = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        assert _max_diff(back(ids), expected) <= 1e-4
        if family != "gemma3-scaled" and family != "phi3-longrope":  # settings transformers' reader does not take
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
            assert _max_diff(theirs(ids).logits, expected) <= 1e-4
    fields = gguf_fields(path)
    arch = family.split("-")[0]
    assert fields["general.architecture"] == arch and fields["tokenizer.ggml.model"] == "llama"
    c = back.config
    if arch == "gemma2":
        assert fields["gemma2.attention.sliding_window_pattern"] == 2 and c.layer_types == [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ]
        assert (c.logit_softcap, c.attn_softcap, c.tie_embeddings) == (30.0, 50.0, True)
    elif family == "gemma3":
        assert fields["gemma3.attention.sliding_window_pattern"] == 6 and c.layer_types[5] == "full_attention"
    elif family == "gemma3-scaled":
        assert (c.rope_local_theta, c.rope_scaling["rope_type"], c.logit_softcap) == (500.0, "linear", 6.0)
    else:
        assert c.sliding_window is None
        if family == "phi3-longrope":
            assert c.rotary_dim == 8 and c.rope_scaling["rope_type"] == "longrope" and fields["phi3.rope.dimension_count"] == 8
    for text in PROBE_TEXTS:
        assert back.tokenizer.encode(text) == tok.encode(text)
    if arch == "phi3":
        q8 = llmkit.load(export_gguf(ours, tmp_path / "q8.gguf", ours.tokenizer, quant="q8_0"))
        use_gguf_blocks(q8)  # each part's blocks decode to its weights exactly, or this refuses
        assert q8.blocks[0].attn.qkv_proj.kind == "Q8_0" and q8.blocks[0].mlp.gate_up_proj.out_features == 2 * 96


def test_what_llama_cpps_gemma_and_phi3_compute_otherwise_is_refused_or_said(tmp_path):
    """llama.cpp hard-codes Gemma's attention scale (by layer count), Gemma 2's caps and tied head, Gemma 3's
    uncapped attention; it gives Phi-3 no window (exported, and said)."""
    from llmkit.model.convert.gguf import gguf_architecture, llama_cpp_notes

    gemma = preset("tiny-llama", vocab_size=512, d_model=64, n_layers=3, n_heads=4).replace(
        activation="geglu",
        norm_offset=1.0,
        sandwich_norm=True,
        scale_embeddings=True,
        tie_embeddings=True,
        logit_softcap=30.0,
        attn_softcap=50.0,
        sliding_window=8,
    )
    assert gguf_architecture(gemma).name == "gemma2"
    for change, message in (
        ({"attn_scale": 24**-0.5}, r"query_pre_attn_scalar 24 .*1/sqrt\(head_dim\) = 1/sqrt\(16\)"),
        ({"tie_embeddings": False}, "LM head of its own"),
        ({"logit_softcap": None}, "always caps"),
        ({"qk_norm": True}, "capped attention scores"),  # Gemma 3's llama.cpp graph has no attention cap
        ({"qk_norm": True, "attn_softcap": None, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "scales only the global"),
    ):
        with pytest.raises(LlmkitError, match=message):
            gguf_architecture(gemma.replace(**change))
    phi3 = preset("tiny-llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4).replace(
        sliding_window=8, extra={"hf_model_type": "phi3"}
    )
    assert gguf_architecture(phi3).name == "phi3" and "no sliding window" in llama_cpp_notes(phi3)[0]
    with pytest.raises(LlmkitError, match="llama.cpp's phi3 needs them equal"):  # its output projection is d_model square
        gguf_architecture(phi3.replace(head_dim=32))


def test_a_tensor_type_the_gguf_package_cannot_read_is_named(tmp_path, folders, monkeypatch):
    """A GGUF tensor type with no dequantizer (gguf-py has none for Q8_1, Q8_K, I8..I64, F64, Q1_0) is refused in one
    line naming the tensor and its type, not loaded wrongly."""
    import gguf

    folder, _ = folders["qwen2"]
    ours = llmkit.load(folder)
    path = export_gguf(ours, tmp_path / "model.gguf", ours.tokenizer, quant="q8_0")
    real = gguf.quants.dequantize

    def no_q8_0(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError(qtype)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", no_q8_0)
    with pytest.raises(LlmkitError, match=r"tensor \S+ is stored as Q8_0, which the gguf package cannot dequantize"):
        llmkit.load(path)
