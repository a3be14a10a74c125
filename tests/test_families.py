"""The families people use, against `transformers` on tiny random models with random norms and biases, at positions
beyond the sliding window: Gemma 2 (1 + weight norms, sandwich norms, scaled embeddings, query_pre_attn_scalar, soft-
capped attention and logits, windowed layers alternating with global ones), Gemma 3 (q/k norms, the local layers' own
RoPE base, the global layers' scaling), Phi-3 (fused qkv and gate_up projections; partial RoPE with LongRoPE; a
window on every layer), Mistral and Qwen2 (windows). Every path: full forward, KV-cache decoding, the static step the
compiler takes, the serving engine's batched rows; greedy tokens; export back to transformers; LoRA into peft."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.generate import GenerationConfig, generate
from llmkit.model.compiled import StaticDecoder
from llmkit.model.weights import export_hf

from conftest import engine_results, randomize_norms_and_biases

WINDOW = 8
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _reference(family: str, vocab: int = 211):
    """(a tiny random transformers model of `family` with random norms and biases, its class name)."""
    import transformers

    T = transformers
    if family == "gemma2":
        cfg = T.Gemma2Config(
            **SHAPE,
            vocab_size=vocab,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,  # not the head size: its own attention scale
            sliding_window=WINDOW,
            final_logit_softcapping=5.0,  # small caps, so that tanh bends the values
            attn_logit_softcapping=4.0,
        )
        cls = T.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = T.Gemma3TextConfig(
            **SHAPE,
            vocab_size=vocab,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            },
            final_logit_softcapping=6.0,
        )
        cls = T.Gemma3ForCausalLM
    elif family in ("phi3", "phi3-longrope"):
        extra = {}
        if family == "phi3-longrope":  # Phi-4-mini's partial RoPE and Phi-3.5's LongRoPE; context 128 grown from 32
            from conftest import longrope_phi3

            extra = longrope_phi3(32)
        else:
            extra = dict(sliding_window=WINDOW)
        cfg = T.Phi3Config(**SHAPE, vocab_size=vocab, num_hidden_layers=2, tie_word_embeddings=False, pad_token_id=0, **extra)
        cls = T.Phi3ForCausalLM
    elif family == "mistral":
        cfg = T.MistralConfig(**SHAPE, vocab_size=vocab, num_hidden_layers=2, sliding_window=WINDOW)
        cls = T.MistralForCausalLM
    else:  # qwen2 with a window on its layers from max_window_layers on
        cfg = T.Qwen2Config(
            **SHAPE, vocab_size=vocab, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
        cls = T.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    randomize_norms_and_biases(model, seed=1, norm_centre=0.0 if "gemma" in family else 1.0)  # Gemma's gain is 1 + weight
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)  # confident: greedy paths far from ties
    return model, cls.__name__


FAMILIES = ["gemma2", "gemma3", "phi3", "phi3-longrope", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        ref, cls = _reference(family)
        ref.save_pretrained(folder)
        out[family] = (folder, ref, cls)
    return out


def _ids(shape, seed=0, vocab=211):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers_beyond_the_window(tmp_path, saved, family, tokenizers_by_kind):
    import transformers

    folder, ref, cls = saved[family]
    ours = llmkit.load(folder)
    c = ours.config
    expected_window = None if family == "phi3-longrope" else WINDOW
    assert c.sliding_window == expected_window and c.max_seq_len == 128
    ids = _ids((2, 60))  # 60 positions: beyond the window (8) and LongRoPE's original context (32)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
        # KV-cache decoding: a prefill, then one token at a time past the window (and past LongRoPE's original
        # context, where transformers too rotates the new keys with the long factors and keeps the cached ones)
        cache = ours.new_cache(2, 60)
        stepped = torch.cat([ours(ids[:, :20], cache=cache), *(ours(ids[:, t : t + 1], cache=cache) for t in range(20, 60))], 1)
        if family == "phi3-longrope":
            out = ref(ids[:, :20], use_cache=True)
            theirs = [out.logits]
            for t in range(20, 60):
                out = ref(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                theirs.append(out.logits)
            expected = torch.cat(theirs, 1)
        else:
            expected = ours(ids)
        assert (stepped - expected).abs().max().item() <= 1e-4
    prompt = ids[:1, :20]
    theirs = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, stop_token_ids=[])
    assert generate(ours, tokenizers_by_kind["byte-bpe"], [prompt[0].tolist()], cfg)[0].ids == theirs
    export_hf(ours, tmp_path / "out")
    back = getattr(transformers, cls).from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == cls  # each family exports as itself
    assert back.generation_config.eos_token_id == ref.generation_config.eos_token_id  # generation_config.json goes along
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2", "mistral"])
def test_the_static_step_and_the_engine_keep_the_window(saved, family, tokenizers_by_kind):
    """The step the compiler takes (run eagerly) over 70 positions, batch 2, equals the model with its KV cache; the
    engine's batched rows (joining at different steps, left-padded) give each request's tokens alone, static step or
    not."""
    folder, _, _ = saved[family]
    model = llmkit.load(folder)
    ids = _ids((2, 80), seed=3)
    static = StaticDecoder(model, 2, 100, compile=False)
    with torch.no_grad():
        cache = model.new_cache(2, 100)
        ref = model(ids[:, :10], cache=cache)[:, -1]
        out = model(ids[:, :10], cache=static.cache())[:, -1]
        valid = torch.zeros(2, 100, dtype=torch.bool)
        valid[:, :10] = True
        for t in range(10, 80):
            torch.testing.assert_close(out, ref)
            ref = model(ids[:, t : t + 1], cache=cache)[:, -1]
            valid[:, t] = True
            out = static.step(ids[:, t], torch.full((2,), t), t, valid)
    tok = tokenizers_by_kind["byte-bpe"]
    model.tokenizer = tok
    vocab = model.config.vocab_size
    jobs = [
        (_ids((n,), seed=10 + n, vocab=vocab).tolist(), GenerationConfig(max_new_tokens=m, do_sample=False))
        for n, m in ((3, 30), (17, 20), (9, 25))
    ]
    for _, cfg in jobs:
        cfg.stop_token_ids = []
    alone = [generate(model, tok, [p], c)[0].ids for p, c in jobs]
    assert all(len(a) == c.max_new_tokens for a, (_, c) in zip(alone, jobs))
    from llmkit.serve import Engine

    for static_step in (False, True):
        model.compiled_decode = "eager" if static_step else None
        engine = Engine(model, family, max_batch=4, max_queue=8)
        try:
            together = engine_results(engine, jobs, stagger=0.02)
        finally:
            engine.close()
        assert [r["ids"] for r in together] == alone, static_step


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_a_lora_adapter_of_the_family_loads_in_peft(tmp_path, saved, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmkit.model.lora import apply_lora, save_lora

    folder, _, _ = saved[family]
    model = llmkit.load(folder)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    save_lora(model, tmp_path / "adapter")
    ids = _ids((2, 30), seed=6)
    with torch.no_grad():
        ours = model(ids)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "adapter").eval()
        assert (loaded(ids).logits - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_a_phi3_lora_on_its_stacked_projections_loads_in_peft_and_back(tmp_path, saved, rslora):
    """Phi-3 stacks q/k/v (qkv_proj) and gate/up (gate_up_proj): LoRAs on q, v and up save as PEFT LoRAs on the
    stacked matrices (rank 2r, B block-wise with zero rows for k and gate, alpha scaled to keep the update's scale),
    which peft applies to transformers' Phi-3 with the same logits; read back by llmkit, the same logits again."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmkit.model.lora import apply_lora, load_lora, save_lora

    folder = saved["phi3"][0]
    model = llmkit.load(folder)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"], rslora=rslora)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    save_lora(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
    assert config["rank_pattern"]["model.layers.0.self_attn.qkv_proj"] == 8
    ids = _ids((2, 30), seed=6)
    with torch.no_grad():
        ours = model(ids)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "adapter").eval()
        assert (loaded(ids).logits - ours).abs().max().item() <= 1e-4
        again = llmkit.load(folder)
        names = load_lora(again, tmp_path / "adapter")
        assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"}
        assert (again(ids) - ours).abs().max().item() <= 1e-5
        save_lora(again, tmp_path / "again")  # read back and saved again: the same adapter, not one of three times the rank
        config2 = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
        assert config2["rank_pattern"] == config["rank_pattern"]
        loaded2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "again").eval()
        assert (loaded2(ids).logits - ours).abs().max().item() <= 1e-4


def test_a_peft_adapter_with_ranks_of_its_own_loads_saves_back_and_what_cannot_be_placed_is_refused(tmp_path, saved):
    """An adapter peft made (rank_pattern / alpha_pattern: layers of their own rank and alpha) gives peft's logits in
    llmkit and saves back with those ranks; a DoRA adapter or one with tensors llmkit cannot place is refused, and the
    model is left as it was."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmkit.errors import LlmkitError
    from llmkit.model.lora import load_lora, lora_layers, save_lora

    folder = saved["qwen2"][0]
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], rank_pattern={"o_proj": 8}, alpha_pattern={"down_proj": 2}
    )
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = _ids((2, 20), seed=8)
    with torch.no_grad():
        expected = peft_model(ids).logits
        ours = llmkit.load(folder)
        load_lora(ours, tmp_path / "peft")
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        save_lora(ours, tmp_path / "back")
        back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "back").eval()
        assert (back(ids).logits - expected).abs().max().item() <= 1e-4
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (tmp_path / "dora" / "adapter_model.safetensors").write_bytes((tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    fresh = llmkit.load(folder)
    with pytest.raises(LlmkitError, match="DoRA"):
        load_lora(fresh, tmp_path / "dora")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 211)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "extra" / "adapter_model.safetensors"))
    with pytest.raises(LlmkitError, match="lora_embedding_A"):
        load_lora(fresh, tmp_path / "extra")
    assert not lora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())  # left as it was


def test_gemma_edge_configs_read_and_export_as_transformers_runs_them(tmp_path):
    """Gemma 2 with null soft-caps (no cap, not the defaults) and its own RoPE base; Gemma 3 from a
    config.json in transformers 4's form (rope_theta, rope_local_base_freq, sliding_window_pattern, no layer_types):
    logits equal transformers', and an export reads back in transformers alike."""
    import json

    import transformers

    g2 = transformers.Gemma2Config(
        **SHAPE,
        vocab_size=97,
        num_hidden_layers=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        rope_theta=50000.0,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        sliding_window=WINDOW,
    )
    torch.manual_seed(0)
    ref = transformers.Gemma2ForCausalLM(g2).eval()
    ref.save_pretrained(tmp_path / "g2")
    raw = json.loads((tmp_path / "g2" / "config.json").read_text())
    assert raw["final_logit_softcapping"] is None and raw["attn_logit_softcapping"] is None
    ours = llmkit.load(tmp_path / "g2")
    assert (ours.config.logit_softcap, ours.config.attn_softcap, ours.config.rope_theta) == (None, None, 50000.0)
    ids = _ids((2, 30), vocab=97)
    export_hf(ours, tmp_path / "g2-out")
    back = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "g2-out").eval()
    with torch.no_grad():
        expected = ref(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        assert (back(ids).logits - expected).abs().max().item() <= 1e-4
    # Gemma 3 in transformers 4's words: the same model as transformers 5 reads it
    folder, ref3, _ = _gemma3_in_v4_form(tmp_path)
    ours3 = llmkit.load(folder)
    assert ours3.config.rope_local_theta == 500.0 and ours3.config.layer_types == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    ids = _ids((2, 40), vocab=211)
    with torch.no_grad():
        assert (ours3(ids) - ref3(ids).logits).abs().max().item() <= 1e-4


def _gemma3_in_v4_form(tmp_path):
    """The test's Gemma 3 saved by transformers 5, its config.json rewritten in transformers 4's words."""
    import json

    ref, cls = _reference("gemma3")
    folder = tmp_path / "g3-v4"
    ref.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        raw.pop(key, None)
    raw.update(
        rope_theta=100000.0, rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_window_pattern=2
    )
    (folder / "config.json").write_text(json.dumps(raw))
    return folder, ref, cls
