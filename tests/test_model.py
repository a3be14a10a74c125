"""The transformer against the references: `transformers` on tiny random configs and on the real embedded models,
KV-cache decoding against a full forward pass, causality, padding, export round trips."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.errors import LlmkitError
from llmkit.model import KVCache, ModelConfig, build_model, preset
from llmkit.model.weights import export_hf, save_model

from conftest import randomize_norms_and_biases

torch.manual_seed(0)
TOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ids(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- equality with transformers on tiny random configs ---------------------------------------------------


def test_gpt2_equals_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    ids = _ids(101)
    with torch.no_grad():
        assert _max_diff(ours(ids), ref(ids).logits) <= TOL


def test_llama_with_gqa_equals_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=False,
    )
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    assert ours.config.n_kv_heads == 2 and ours.config.rope_theta == 500.0 and not ours.config.tie_embeddings
    ids = _ids(101, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    with torch.no_grad():
        assert _max_diff(ours(ids), ref(ids).logits) <= TOL
        assert _max_diff(ours(ids, attention_mask=mask)[1, :15], ref(ids, attention_mask=mask).logits[1, :15]) <= TOL


@pytest.mark.parametrize("head", ["mlm", "none"])
def test_bert_equals_transformers(tmp_path, head):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
    )
    ref = (BertForMaskedLM(cfg) if head == "mlm" else BertModel(cfg, add_pooling_layer=False)).eval()
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    ids = _ids(101, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask, token_type_ids=types)
        theirs = theirs.logits if head == "mlm" else theirs.last_hidden_state
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
    assert mine.shape == theirs.shape
    assert _max_diff(mine[0, :10], theirs[0, :10]) <= TOL and _max_diff(mine[1], theirs[1]) <= TOL


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_equals_transformers(tmp_path, ff):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=101,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=ff,
        tie_word_embeddings=(ff == "relu"),
        decoder_start_token_id=0,
    )
    ref = T5ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    src, tgt = _ids(101, (2, 30)), _ids(101, (2, 25), seed=1)
    mask = torch.ones_like(src)
    mask[1, 20:] = 0
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert _max_diff(ours(src, tgt, attention_mask=mask), theirs) <= TOL
    export_hf(ours, tmp_path / "export")  # and back out: transformers reads it as the same model
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert _max_diff(back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits, theirs) <= TOL


def test_a_t5_pretrained_by_llmkit_exports_to_transformers(tmp_path):
    from transformers import T5ForConditionalGeneration

    model = build_model(preset("tiny-t5", vocab_size=97, d_model=64, n_heads=4, d_ff=96, n_layers=2)).eval()
    export_hf(model, tmp_path)
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src, tgt = _ids(97, (2, 14)), _ids(97, (2, 9), seed=2)
    with torch.no_grad():
        assert _max_diff(ref(input_ids=src, decoder_input_ids=tgt).logits, model(src, tgt)) <= TOL


# --- the real embedded models ----------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome!",
    "Shall I compare thee to a summer's day?",
    "Ein Mann isst Essen.",
    "Le café est très bon, n'est-ce pas ?",
    "🤗 emoji and numbers 12345",
]


@pytest.mark.slow
def test_minilm_sentence_embeddings_equal_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from llmkit.embedded import embedded_path

    model = llmkit.load("minilm")
    tok = model.tokenizer
    batch = [tok.encode(s) for s in SENTENCES]  # the plain path: [CLS] ... [SEP] by default, as transformers
    width = max(map(len, batch))
    ids = torch.tensor([b + [tok.pad_id] * (width - len(b)) for b in batch])
    mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
    with torch.no_grad():
        ours = model.embed_sentences(ids, mask, pooling="mean", normalize=True)
    theirs = SentenceTransformer(str(embedded_path("minilm")), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, normalize_embeddings=True
    )
    cos = torch.nn.functional.cosine_similarity(ours, theirs.cpu(), dim=-1)
    assert cos.min().item() >= 0.9999, cos


@pytest.mark.slow
def test_smollm2_from_gguf_equals_transformers():
    from transformers import AutoModelForCausalLM

    from llmkit.embedded import embedded_path

    path = embedded_path("smollm2")
    ours = llmkit.load("smollm2")
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = ours.tokenizer
    prompts = [
        "The capital of France is",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    ]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            assert _max_diff(ours(ids), theirs(ids).logits) <= 1e-3, p
    assert tok.decode([ours(torch.tensor([tok.encode(prompts[0])]))[0, -1].argmax().item()]) == " Paris"


# --- decoding, causality, padding --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "tiny-vaswani", "tiny-t5"])
def test_kv_cache_decoding_equals_full_forward(name):
    cfg = preset(name, vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2 if name == "tiny-llama" else None, max_seq_len=64)
    model = build_model(cfg).eval()
    ids = _ids(97, (2, 24))
    with torch.no_grad():
        if cfg.family == "decoder":
            full = model(ids)
            cache = model.new_cache(2, 40)
            steps = [model(ids[:, :10], cache=cache)]  # a prompt, then one token at a time
            steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 24)]
        else:
            src = _ids(97, (2, 15), seed=3)
            enc, _ = model.encode(src)
            full = model(src, ids)
            cache = model.new_cache(2, 40)
            steps = [model.decode(ids[:, :10], enc, cache=cache)[0]]
            steps += [model.decode(ids[:, t : t + 1], enc, cache=cache)[0] for t in range(10, 24)]
    assert cache.pos == 24
    assert _max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "tiny-vaswani"])
def test_a_future_token_never_changes_an_earlier_output(name):
    cfg = preset(name, vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)
    model = build_model(cfg).eval()
    a = _ids(97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97
    with torch.no_grad():
        if cfg.family == "decoder":
            out_a, out_b = model(a), model(b)
        else:
            src = _ids(97, (1, 8), seed=5)
            out_a, out_b = model(src, a), model(src, b)
    assert _max_diff(out_a[:, :10], out_b[:, :10]) == 0.0
    assert _max_diff(out_a[:, 10:], out_b[:, 10:]) > 1e-3


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt", "tiny-t5"])
def test_padding_never_changes_the_unpadded_positions(name):
    cfg = preset(name, vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)
    model = build_model(cfg).eval()
    real = _ids(97, (1, 9))
    padded = torch.cat([real, torch.full((1, 5), 3)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        if cfg.family == "encoder-decoder":
            tgt = _ids(97, (1, 6), seed=2)
            assert _max_diff(model(real, tgt), model(padded, tgt, attention_mask=mask)) <= 1e-5
        else:
            assert _max_diff(model(real), model(padded, attention_mask=mask)[:, :9]) <= 1e-5


def test_left_padded_batch_equals_each_prompt_alone():
    model = build_model(preset("tiny-llama", vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)).eval()
    short, long = _ids(97, (1, 6)), _ids(97, (1, 10), seed=1)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])  # (2, 10), row 0 left-padded
    mask = torch.tensor([[0] * 4 + [1] * 6, [1] * 10])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions)
        assert _max_diff(out[0, 4:], model(short)[0]) <= 1e-5 and _max_diff(out[1], model(long)[0]) <= 1e-5


def test_attention_maps_match_the_fast_path_and_are_distributions():
    model = build_model(preset("tiny-llama", vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)).eval()
    ids = _ids(97, (1, 12))
    with torch.no_grad():
        maps = model.attention_maps(ids)
        slow, _ = model.hidden_states(ids, need_weights=True)
        fast, _ = model.hidden_states(ids)
    assert len(maps) == 6 and maps[0].shape == (1, 4, 12, 12)
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, 4, 12), atol=1e-5)
    assert maps[0][0, :, 0, 1:].abs().max() == 0  # causal: the first token sees only itself
    assert _max_diff(slow, fast) <= 1e-5


# --- presets, sizes, files ------------------------------------------------------------------------------


def test_presets_build_and_gpt2_has_the_published_124m_parameters():
    assert preset("gpt2").param_count() == 124_439_808
    assert preset("t5").param_count() == 60_506_624  # t5-small
    assert preset("llama").param_count() == 6_738_415_616  # Llama-2-7B
    assert preset("smollm2-135m").param_count() == 134_515_008
    flops = preset("gpt2").flops_per_token(1024)
    assert flops["train"] == 6 * flops["matmul_params"] + 12 * 12 * 768 * 1024
    with pytest.raises(LlmkitError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(LlmkitError, match="not a multiple"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=96)


@pytest.mark.parametrize(
    "name, hf_class", [("tiny-gpt", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM"), ("tiny-bert", "BertForMaskedLM")]
)
def test_export_round_trip_through_transformers(tmp_path, name, hf_class):
    import transformers

    cfg = preset(name, vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)
    model = build_model(cfg).eval()
    export_hf(model, tmp_path)
    ref = getattr(transformers, hf_class).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(97, (2, 16))
    with torch.no_grad():
        assert _max_diff(model(ids), ref(ids).logits) <= TOL
        assert _max_diff(llmkit.load(tmp_path)(ids), model(ids)) <= TOL


def test_export_refuses_architectures_transformers_lacks(tmp_path):
    with pytest.raises(LlmkitError, match="no Hugging Face architecture"):
        export_hf(build_model(preset("tiny-vaswani", vocab_size=97, d_model=64)), tmp_path)


def test_own_format_round_trip_and_bad_files(tmp_path, tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-t5", vocab_size=tok.vocab_size, d_model=64, n_heads=4)).eval()
    save_model(model, tmp_path / "run", tokenizer=tok)
    loaded = llmkit.load(tmp_path / "run")
    src, tgt = _ids(tok.vocab_size, (1, 8)), _ids(tok.vocab_size, (1, 5))
    with torch.no_grad():
        assert _max_diff(loaded(src, tgt), model(src, tgt)) == 0.0
    assert loaded.tokenizer.fingerprint() == tok.fingerprint() and not loaded.training
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(LlmkitError, match="not a readable safetensors"):
        llmkit.load(tmp_path / "run")
    with pytest.raises(LlmkitError, match="no model at"):
        llmkit.load(tmp_path / "nothing")
    small = build_model(preset("tiny-gpt", vocab_size=300, d_model=64, n_heads=4))
    save_model(small, tmp_path / "small", tokenizer=tok)
    with pytest.raises(LlmkitError, match="tokenizer has .* tokens but the model only 300"):
        llmkit.load(tmp_path / "small")


def test_inputs_longer_than_the_context_or_outside_the_vocabulary_are_refused():
    model = build_model(preset("tiny-gpt", vocab_size=97, d_model=64, n_heads=4, max_seq_len=16))
    with pytest.raises(LlmkitError, match="longer than the model's context of 16"):
        model(_ids(97, (1, 17)))
    with pytest.raises(LlmkitError, match="outside the model's vocabulary"):
        model(torch.tensor([[5, 200]]))
    cache = KVCache.for_model(model.config, 1, 4)
    with pytest.raises(ValueError, match="full"):
        model(_ids(97, (1, 5)), cache=cache)


# --- variants users load: RoPE scaling, llama.cpp files, several eos, dtypes, positions in every family -------------

ROPE_SCALINGS = {
    "linear": (dict(rope_type="linear", factor=2.0), 128),  # a model of 64 positions stretched to 128
    "dynamic": (dict(rope_type="dynamic", factor=4.0), 32),
    "llama3": (dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16), 128),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32), 128),
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_equals_transformers_beyond_the_original_context(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling, max_pos = ROPE_SCALINGS[kind]
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_theta=500.0,
        rope_scaling=dict(scaling),
    )
    torch.manual_seed(1)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention, so that positions matter to the logits
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == kind
    ids = _ids(101, (1, 100))  # well past the original 16 / 32 / 64 positions
    with torch.no_grad():
        theirs = ref(ids).logits
        assert _max_diff(ours(ids), theirs) <= TOL
        default = build_model(ours.config.replace(rope_scaling=None, max_seq_len=128))
        default.load_state_dict(ours.state_dict())
        assert _max_diff(default(ids), theirs) > 1e-2  # the scaling matters at these positions
    if kind != "dynamic":  # the export keeps the scaling (dynamic's growth point too)
        export_hf(ours, tmp_path / "export")
        again = LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
        with torch.no_grad():
            assert _max_diff(again(ids).logits, theirs) <= TOL
        assert llmkit.load(tmp_path / "export").config.max_seq_len == ours.config.max_seq_len  # no growth per round trip


def test_unknown_rope_scaling_is_refused(tmp_path):
    from llmkit.model.convert.hf import config_from_hf

    hf = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=96, vocab_size=50)
    with pytest.raises(LlmkitError, match="RoPE scaling 'mrope' is not implemented"):  # Qwen2-VL's multimodal RoPE
        config_from_hf({**hf, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})
    with pytest.raises(LlmkitError, match="lacks low_freq_factor"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def _llama3_ref(vocab: int, eos):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
        eos_token_id=eos,
        bos_token_id=1,
    )
    torch.manual_seed(2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_llama3_style_gguf_loads_like_transformers_and_tokenizes_like_llama_cpp(tmp_path):
    """A Llama-3.1-shaped GGUF: rope_freqs factors, the llama-bpe pre-tokenizer, bos by llama.cpp's default, eos + eot."""
    from transformers import AutoTokenizer

    from llmkit.model.layers import rope_frequencies
    from llmkit.tokenizer import Tokenizer

    from gguf_files import smollm2_tokenizer_fields, write_llama_gguf

    ref = _llama3_ref(49152, [2, 0])
    base, _ = rope_frequencies(8, 500.0)
    scaled, _ = rope_frequencies(8, 500.0, {**ref.config.rope_parameters, "rope_type": "llama3"})
    fields = smollm2_tokenizer_fields(pre="llama-bpe", eot=0)
    write_llama_gguf(tmp_path / "m.gguf", ref, fields, rope_freqs=base / scaled)
    ours = llmkit.load(tmp_path / "m.gguf")
    assert ours.config.rope_scaling["rope_type"] == "freq_factors" and ours.config.eos_ids == [2, 0]
    ids = _ids(49152, (1, 90))
    with torch.no_grad():
        assert _max_diff(ours(ids), ref(ids).logits) <= TOL
    tok = ours.tokenizer
    text = "(Hello) world's 12345 numbers:\n\n  indented\ttabs, café 🤗 <|im_end|>"
    assert tok.encode(text)[0] == 1  # llama.cpp adds bos for the Llama 3 group when the file does not say
    assert tok.encode(text, add_special_tokens=False) != Tokenizer.load(embedded_path_smollm2()).encode(text)  # another split
    write_llama_gguf(tmp_path / "flag" / "m.gguf", None, {**fields, "add_bos": True})
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "flag"), gguf_file="m.gguf")
    for t in [text, "I'm 2024-03-07 [x] done...", "   leading spaces and 1,000,000"]:
        assert tok.encode(t) == theirs(t)["input_ids"], t
    write_llama_gguf(tmp_path / "nobos" / "m.gguf", None, {**fields, "add_bos": False})
    assert Tokenizer.load(tmp_path / "nobos" / "m.gguf").encode("hi")[0] != 1
    write_llama_gguf(tmp_path / "odd" / "m.gguf", None, {**fields, "pre": "made-up-pre"})
    with pytest.raises(LlmkitError, match="pre-tokenizer 'made-up-pre' is not supported"):
        Tokenizer.load(tmp_path / "odd" / "m.gguf")


def embedded_path_smollm2():
    from llmkit.embedded import embedded_path

    return embedded_path("smollm2")


def test_position_buffers_stay_float32_in_bf16(tmp_path):
    model = build_model(preset("tiny-llama", vocab_size=97, d_model=64, n_heads=4, max_seq_len=4096)).eval()
    fp32 = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, fp32)
    assert model.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    vas = build_model(preset("tiny-vaswani", vocab_size=97, d_model=64)).to(torch.bfloat16)
    assert vas.enc_embed.position.weight.dtype == torch.float32
    save_model(model.float(), tmp_path / "run")
    loaded = llmkit.load(tmp_path / "run", dtype=torch.bfloat16)
    assert loaded.rotary.inv_freq.dtype == torch.float32 and loaded.embed.tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([[5] * 3000])  # far positions: float32 angles keep bf16 logits near the float32 ones
    with torch.no_grad():
        ref = model.float()(ids)[0, -1]
        assert (loaded(ids)[0, -1].float() - ref).abs().max() < 0.25 * ref.abs().max()


@pytest.mark.parametrize(
    "family, position",
    [("encoder", "rope"), ("encoder", "relative"), ("decoder", "relative"), ("encoder", "sinusoidal"), ("encoder-decoder", "rope")],
)
def test_every_position_kind_works_in_every_family(family, position):
    name = {"encoder": "tiny-bert", "decoder": "tiny-llama", "encoder-decoder": "tiny-t5"}[family]
    cfg = preset(name, vocab_size=97, d_model=64, n_heads=4, n_kv_heads=None, max_seq_len=64, position=position)
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharper attention (random weights attend almost uniformly), so that positions show
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
            elif "bias.embedding" in name:
                p.mul_(100.0)
    ids = _ids(97, (1, 12))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if family == "encoder":  # positions make a bidirectional encoder see order: permuting the input is not
            out, out_perm = model(ids), model(ids[:, perm])  # just permuting the output
            assert _max_diff(out[:, perm], out_perm) > 1e-3
        elif family == "decoder":
            full = model(ids)
            cache = model.new_cache(1, 20)
            steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
            assert _max_diff(torch.cat(steps, 1), full) <= 1e-5
            assert _max_diff(model(ids[:, perm])[:, -1], full[:, -1]) > 1e-3
        else:
            src = _ids(97, (1, 12), seed=4)
            enc, _ = model.encode(src)
            assert _max_diff(model.decode(ids, enc)[0], model(src, ids)) <= 1e-5
            assert _max_diff(model.encode(src[:, perm])[0], enc[:, perm]) > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scale_embeddings=True), "scale_embeddings"),
        (dict(attn_scale=1.0), "attn_scale"),
        (dict(lm_head_bias=True), "lm_head_bias"),
        (dict(head_dim=32), "head_dim 32"),
    ],
)
def test_export_refuses_what_transformers_would_run_differently(tmp_path, change, message):
    model = build_model(preset("tiny-gpt", vocab_size=97, d_model=64, n_heads=4, **change))
    with pytest.raises(LlmkitError, match=message):
        export_hf(model, tmp_path)


def test_export_and_import_refuse_bert_and_llama_variants_transformers_lacks(tmp_path):
    from llmkit.model.convert.hf import config_from_hf

    for change, message in ((dict(activation="geglu"), "activation geglu"), (dict(n_kv_heads=2), "grouped-query")):
        with pytest.raises(LlmkitError, match=message):
            export_hf(build_model(preset("tiny-bert", vocab_size=97, d_model=64, n_heads=4, **change)), tmp_path)
    hf = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=96, vocab_size=50)
    with pytest.raises(LlmkitError, match="biases on attention but not on the feed-forward"):
        config_from_hf({**hf, "attention_bias": True})  # transformers' mlp_bias defaults to False
    gpt2 = dict(model_type="gpt2", vocab_size=50, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    with pytest.raises(LlmkitError, match="scale_attn_by_inverse_layer_idx True is not implemented"):
        config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
    bert = dict(model_type="bert", vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96)
    with pytest.raises(LlmkitError, match="position_embedding_type 'relative_key' is not implemented"):
        config_from_hf({**bert, "max_position_embeddings": 32, "position_embedding_type": "relative_key"})
    assert config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": False}).n_layers == 1  # transformers' default


def test_out_of_range_ids_are_named():
    model = build_model(preset("tiny-gpt", vocab_size=97, d_model=64, n_heads=4, max_seq_len=16))
    with pytest.raises(LlmkitError, match="token id -3 is outside"):
        model(torch.tensor([[5, -3]]))
    with pytest.raises(LlmkitError, match="token id 200 is outside"):
        model(torch.tensor([[5, 200, 7]]))


def test_t5_in_float16_clamps_like_transformers(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    ref = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3000.0)  # the feed-forward overflows float16
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path, dtype=torch.float16)
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()  # `wo` stays float32 there
    assert ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert ours.encoder[0].mlp.down_proj.weight.dtype == torch.float32 and ours.encoder[0].attn.q_proj.weight.dtype == torch.float16
    src, tgt = _ids(64, (1, 10)), _ids(64, (1, 6), seed=1)
    with torch.no_grad():
        theirs = ref(input_ids=src, decoder_input_ids=tgt).logits
        mine = ours(src, tgt)
    assert torch.isfinite(theirs).all() and torch.isfinite(mine).all()
    assert _max_diff(mine, theirs) <= 0.01 * theirs.float().abs().max().item()


def test_a_hugging_face_folder_tokenizer_adds_its_own_special_tokens(tmp_path, tokenizers_by_kind):
    """A Llama folder whose tokenizer.json adds bos (as Llama 2/3 do): encode, generate and perplexity follow it."""
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmkit.evaluate.perplexity import evaluate_text
    from llmkit.generate import GenerationConfig, generate
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tokenizers_by_kind["byte-bpe"].save(tmp_path / "tok"))
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tok.bos_id)]
    )
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    model = llmkit.load(tmp_path / "m")
    text = "Now is the winter of our discontent"
    theirs = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.tokenizer.encode(text) == theirs(text)["input_ids"] and model.tokenizer.encode(text)[0] == tok.bos_id
    out = generate(model, model.tokenizer, [text], GenerationConfig(max_new_tokens=2, do_sample=False, stop_token_ids=[]))[0]
    assert out.prompt_ids[0] == tok.bos_id
    scored = evaluate_text(model, model.tokenizer, text, window=32)
    assert scored["tokens"] == len(theirs(text)["input_ids"]) - 1  # every text token is scored, the first one after bos


def test_an_encoder_with_a_classification_head_exports_as_bert_without_it(tmp_path):
    """BertForMaskedLM has no sequence-classification head: the export leaves it out (transformers would warn of
    unexpected keys, and llmkit.load would build a head the config does not declare)."""
    from safetensors import safe_open

    model = build_model(preset("tiny-bert", vocab_size=97, d_model=64, n_heads=4, num_labels=3))
    export_hf(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "bert.embeddings.word_embeddings.weight" in keys and not any(k.startswith("classifier") for k in keys)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_qwen_and_mistral_equal_transformers_and_export_as_themselves(tmp_path, family):
    """Qwen2 (q/k/v biases, tied embeddings), Qwen3 (per-head q/k RMSNorm, its own head size) and Mistral (a sliding
    window, exercised beyond it in tests/test_families.py) read from tiny random `transformers`
    models with random norms and biases: logits and greedy tokens equal theirs; the KV-cache path equals the full
    forward; an export loads back in transformers with the same logits."""
    import transformers

    shape = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**shape, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1000.0)
        ref = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**shape, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False)
        ref = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**shape, max_position_embeddings=256, sliding_window=48, tie_word_embeddings=False)
        ref = transformers.MistralForCausalLM(cfg)
    randomize_norms_and_biases(ref)
    ref.eval().save_pretrained(tmp_path / "hf")
    ours = llmkit.load(tmp_path / "hf")
    c = ours.config
    assert (c.qkv_bias, c.bias, c.qk_norm) == {
        "qwen2": (True, False, False),
        "qwen3": (None, False, True),
        "mistral": (None, False, False),
    }[family]
    if family == "mistral":
        assert c.max_seq_len == 256 and c.sliding_window == 48 and c.layer_types is None
    ids = _ids(101, (2, 40))
    with torch.no_grad():
        assert _max_diff(ours(ids), ref(ids).logits) <= TOL
        cache = ours.new_cache(2, 40)
        stepped = torch.cat([ours(ids[:, :30], cache=cache), *(ours(ids[:, t : t + 1], cache=cache) for t in range(30, 40))], 1)
        assert _max_diff(stepped, ours(ids)) <= TOL
    prompt = ids[:1, :6]
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[6:] == theirs
    export_hf(ours, tmp_path / "out")
    again = getattr(transformers, {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[family])
    back = again.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _max_diff(back(ids).logits, ref(ids).logits) <= TOL
