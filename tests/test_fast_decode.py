"""Fast CPU decoding (issues 15 and 25): a GGUF's own blocks, fused projections, int4 weights, the compiled one-token step
with a static KV cache, compiled only where it pays. Each must give the numbers of the plain model (int8 and int4, which
round, numbers close to them)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, generate
from llmkit.model import build_model, compiled
from llmkit.model.compiled import StaticDecoder, compilable, use_compiled_decode
from llmkit.model.config import preset
from llmkit.model.quantize import GEMV_ROWS, BlockLinear, Int4Linear, Int8Linear, fuse_projections, int4_codes, quantize

from conftest import tiny_model


def tiny(name: str, vocab_size: int = 101, **kw):
    return tiny_model(name, vocab_size, **{"max_seq_len": 96, **kw})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_fused_projections_give_the_same_logits(name):
    model = tiny(name)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        fuse_projections(model)
        out = model(ids)
    assert model.blocks[0].attn.q_proj is None and model.blocks[0].attn.qkv_proj.out_features == 64 + 2 * model.config.n_kv_heads * 16
    assert (model.blocks[0].mlp.gate_up_proj is not None) == model.config.gated
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_int4_finds_q4_1_codes_again_and_its_kernel_matches_the_dequantized_weights():
    torch.manual_seed(0)
    # a matrix on a Q4_1 grid: per group of 32, w = code * d + m (as a Q4_1 GGUF holds it); bf16-exact d and m
    codes = torch.randint(0, 16, (48, 96))
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group uses its whole range, as Q4_1's rounding does
    d = torch.rand(48, 3).bfloat16().float() * 0.05 + 0.01
    m = -torch.rand(48, 3).bfloat16().float() * 0.4
    w = (codes.reshape(48, 3, 32) * d[..., None] + m[..., None]).reshape(48, 96)
    found, scale, lo = int4_codes(w)
    assert torch.equal(found, codes.to(torch.int32))
    linear = torch.nn.Linear(96, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(w)
    q = Int4Linear(linear)
    torch.testing.assert_close(q.dequantized(), w, rtol=0, atol=2e-3)  # the zero point is stored in bf16
    x = torch.randn(5, 96)
    ref = F.linear(x.bfloat16().float(), q.dequantized(), linear.bias)
    torch.testing.assert_close(q(x), ref, rtol=2e-2, atol=2e-2)


def test_int4_quantization_keeps_the_head_at_8_bits_and_the_logits_close():
    model = tiny("tiny-llama", tie_embeddings=False)
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        quantize(model, "int4")
        out = model(ids)
    assert isinstance(model.blocks[0].attn.qkv_proj, Int4Linear) and isinstance(model.blocks[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.activations == "int8"
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.8


def test_int8_activations_after_the_rotation_keep_the_outputs_close():
    """The int4 head's int8 × int8 product: the rotation is orthogonal, the product stays close to the float one, and
    with a few outlier input dimensions (as LLM hidden states have) it errs far less than rounding the unrotated rows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 300, bias=False)
    x = torch.randn(64, 128)
    x[:, [3, 40, 77]] *= 25  # outlier dimensions
    q = Int8Linear(linear, activations="int8")
    torch.testing.assert_close(q.rotation @ q.rotation.t(), torch.eye(128), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.dequantized(), linear.weight.detach(), rtol=0, atol=2e-3)
    ref = F.linear(x, linear.weight.detach())
    err = (q(x) - ref).pow(2).mean().sqrt()
    # the same int8 rows without the rotation: one scale per row, set by the outliers
    w = Int8Linear(linear).dequantized()
    s = x.abs().amax(-1, keepdim=True) / 127
    plain = (F.linear(torch.round(x / s) * s, w) - ref).pow(2).mean().sqrt()
    assert err < 0.02 * ref.pow(2).mean().sqrt() and err < 0.5 * plain
    assert q.weight_int8.dtype == torch.int8 and q(x[:1]).shape == (1, 300)
    before = q(x)
    q.to(torch.bfloat16)  # a cast after quantizing (in place) leaves the rotation exact
    assert q.rotation.dtype == torch.float32
    torch.testing.assert_close(q.rotation @ q.rotation.t(), torch.eye(128), rtol=0, atol=1e-5)
    torch.testing.assert_close(q(x.bfloat16()).float(), before, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("name,dtype", [("tiny-llama", torch.float32), ("tiny-gpt", torch.float32), ("tiny-llama", torch.bfloat16)])
def test_the_static_step_gives_the_logits_of_the_model_with_its_kv_cache(name, dtype):
    """Step by step over 150 tokens (three 64-column widths of the static cache), batch 2: the static step's logits
    equal the eager model's with its own cache (bf16: to bf16's precision)."""
    model = tiny(name, max_seq_len=256).to(dtype)
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2, 160))
    static = StaticDecoder(model, 2, 200, compile=False)
    with torch.no_grad():
        cache = model.new_cache(2, 200)
        ref = model(ids[:, :10], cache=cache)[:, -1]
        out = model(ids[:, :10], cache=static.cache())[:, -1]
        valid = torch.zeros(2, 200, dtype=torch.bool)  # the columns each row has filled
        valid[:, :10] = True
        for t in range(10, 160):
            torch.testing.assert_close(out, ref, **({} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}))
            ref = model(ids[:, t : t + 1], cache=cache)[:, -1]
            valid[:, t] = True
            out = static.step(ids[:, t], torch.full((2,), t), t, valid)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_the_static_step_equals_the_model_with_its_kv_cache(name, tokenizers_by_kind):
    """The step the compiler takes, run eagerly: batch of 2 rows, left padding, the cache column shared, positions not."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = tiny(name, tok.vocab_size)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    cfg = GenerationConfig(max_new_tokens=70, do_sample=False, stop_token_ids=[])
    with torch.no_grad():
        ref = generate(model, tok, prompts, cfg)
        model.compiled_decode = "eager"  # the static step, not compiled
        out = generate(model, tok, prompts, cfg)
    assert [g.ids for g in out] == [g.ids for g in ref]  # past the first 64-column block of the cache


def test_models_whose_step_does_not_compile_say_why_and_decode_eagerly():
    t5 = build_model(preset("tiny-t5", vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32))
    assert "encoder-decoder" in compilable(t5)
    assert "post-norm" in compilable(build_model(preset("tiny-vaswani", family="decoder", vocab_size=50, d_model=32, n_layers=1)))
    assert use_compiled_decode(t5) is not None and not t5.compiled_decode
    with pytest.raises(ValueError, match="does not compile"):
        StaticDecoder(t5, 1, 8)


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(tokenizers_by_kind):
    """The real torch.compile graph (inductor's C++ backend) on a tiny Llama: greedy tokens equal the eager model's for
    one prompt and for a padded batch, across cache widths (one graph for all)."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = tiny("tiny-llama", tok.vocab_size)
    cfg = GenerationConfig(max_new_tokens=80, do_sample=False, stop_token_ids=[])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    from torch._dynamo.utils import counters

    with torch.no_grad():
        ref = generate(model, tok, prompts, cfg)
        ref1 = generate(model, tok, prompts[:1], cfg)
        assert use_compiled_decode(model) is None
        graphs = counters["stats"]["unique_graphs"]
        out = generate(model, tok, prompts, cfg)
        out1 = generate(model, tok, prompts[:1], cfg)
        again = generate(model, tok, [[7] * 40], GenerationConfig(max_new_tokens=30, do_sample=False, stop_token_ids=[]))
    assert [g.ids for g in out] == [g.ids for g in ref] and out1[0].ids == ref1[0].ids and len(again[0].ids) == 30
    # one graph per batch size (2 and 1), whatever the cache length or the attended width
    assert counters["stats"]["unique_graphs"] - graphs == 2


@pytest.mark.slow
def test_each_model_has_its_own_compiled_step_and_a_changed_model_compiles_again():
    """The compiled step skips dynamo's guards on the model's modules, so two models with caches of the same shape
    (a model and its int8 copy) must never share a graph, and a model quantized after its first compiled step must
    compile again: each compiled step gives the logits of the same step run eagerly."""

    a = tiny("tiny-llama")
    b = quantize(copy.deepcopy(a), "int8")
    ids = torch.randint(0, 101, (1, 9))
    valid = torch.ones(1, 9, dtype=torch.bool)

    def step_logits(model, compiled: bool) -> torch.Tensor:
        static = StaticDecoder(model, 1, 64, compile=compiled)
        with torch.no_grad():
            model(ids[:, :8], cache=static.cache())
            return static.step(ids[:, 8], torch.tensor([8]), 8, valid)

    eager_a, eager_b = step_logits(a, False), step_logits(b, False)
    assert (eager_a - eager_b).abs().max() > 1e-3  # the int8 copy's logits differ: a shared graph would show
    for model, ref in [(a, eager_a), (b, eager_b), (a, eager_a)]:
        torch.testing.assert_close(step_logits(model, True), ref, rtol=1e-4, atol=1e-4)
    quantize(a, "int8")  # the same model object, its modules replaced
    torch.testing.assert_close(step_logits(a, True), step_logits(a, False), rtol=1e-4, atol=1e-4)

    # a LoRA merged after the first compiled step changes a flag, not a module type: it compiles again too
    from llmkit.model.lora import apply_lora, merge_lora

    c = tiny("tiny-llama")
    apply_lora(c, r=4)
    with torch.no_grad():
        for layer in c.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(0, 0.5)  # a delta that shows
    unmerged = step_logits(c, True)
    merge_lora(c)
    assert StaticDecoder(c, 1, 64, compile="pays").job is None  # the default mode never reuses the unmerged model's graph
    merged = step_logits(c, True)
    torch.testing.assert_close(merged, step_logits(c, False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, unmerged, rtol=1e-3, atol=1e-3)  # merging keeps the function

    # the compiled step does not keep its model alive
    import gc
    import weakref

    gone = weakref.ref(c)
    del c
    gc.collect()
    assert gone() is None


def _gguf_blocks(kind: str, out: int, inp: int, seed: int = 0):
    """Raw GGUF blocks of `kind` (rows, blocks, bytes) with random codes and float16 scales (and minimums), and the
    float32 weights the gguf package decodes them to."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    nb = inp // 32
    d = (rng.random((out, nb, 1)) * 0.02 + 0.001).astype(np.float16)
    if kind == "Q8_0":
        raw = np.concatenate([d.view(np.uint8), rng.integers(-127, 128, (out, nb, 32)).astype(np.int8).view(np.uint8)], -1)
    else:
        mins = [(-rng.random((out, nb, 1)) * 0.1).astype(np.float16).view(np.uint8)] if kind == "Q4_1" else []
        raw = np.concatenate([d.view(np.uint8), *mins, rng.integers(0, 256, (out, nb, 16)).astype(np.uint8)], -1)
    weights = gguf.quants.dequantize(raw.reshape(out, -1), gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(raw), torch.from_numpy(weights)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_to_the_files_weights_exactly(kind):
    """BlockLinear holds a GGUF file's blocks as they are: they decode to the gguf package's float32 weights bit for
    bit; eagerly it is F.linear on those weights; compiled (one row: the decode step) it reads the blocks and gives the
    same products to float32 precision; a weight that no longer matches its blocks is refused."""
    raw, w = _gguf_blocks(kind, 48, 96)
    linear = torch.nn.Linear(96, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = BlockLinear(linear, kind, raw)
    assert torch.equal(layer.dequantized(), w)
    x = torch.randn(1, 1, 96)
    exact = x.double() @ w.double().t() + linear.bias.double()
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    y = torch.compile(lambda x: layer(x), fullgraph=True)(x)
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    traced = []  # the block path, traced for GEMV_ROWS rows too (a batch of 8 in the engine)
    from_blocks = layer._from_blocks
    layer._from_blocks = lambda x: traced.append(x.shape[0]) or from_blocks(x)
    x = torch.randn(GEMV_ROWS, 1, 96)
    y = torch.compile(lambda x: layer(x), fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t() + linear.bias.double(), rtol=1e-5, atol=1e-5)
    assert traced == [GEMV_ROWS]
    del layer._from_blocks
    with torch.no_grad():
        linear.weight[0, 0] += 1e-3
    with pytest.raises(LlmkitError, match="no longer equal"):
        BlockLinear(linear, kind, raw)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_stacked_gguf_blocks_give_each_layers_outputs(kind):
    """q/k/v (or gate/up) as one BlockLinear over their row-stacked blocks: eagerly each layer multiplies its own float
    weights (the same modules, not copies) and the outputs are joined, bit for bit what the layers give; compiled, the
    stacked blocks give the same products to float32 precision; one layer off its blocks refuses the whole stack."""
    shapes = [(64, 96), (32, 96), (32, 96)]
    parts, raws = [], []
    for i, (out, inp) in enumerate(shapes):
        raw, w = _gguf_blocks(kind, out, inp, seed=i)
        linear = torch.nn.Linear(inp, out, bias=True)
        with torch.no_grad():
            linear.weight.copy_(w)
        parts.append(linear)
        raws.append(raw)
    layer = BlockLinear(parts, kind, torch.cat(raws))
    assert layer.parts[0] is parts[0] and layer.weight is None and layer.out_features == 128
    x = torch.randn(1, 1, 96)
    separate = torch.cat([p(x) for p in parts], -1)
    assert torch.equal(layer(x), separate)
    y = torch.compile(lambda x: layer(x), fullgraph=True)(x)
    torch.testing.assert_close(y, separate, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        parts[2].weight[0, 0] += 1e-3
    with pytest.raises(LlmkitError, match="no longer equal"):
        BlockLinear(parts, kind, torch.cat(raws))


def test_a_model_whose_weights_left_its_gguf_blocks_keeps_its_float_layers():
    """A fine-tune (a LoRA merged) of a GGUF model: auto picks no blocks for it, and blocks that no longer match one
    layer change no layer (the swap is all or nothing)."""
    from llmkit.model.compiled import auto_quantization
    from llmkit.model.quantize import use_gguf_blocks

    model = tiny("tiny-llama", n_layers=1)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0]
    blocks = {}
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        raw, w = _gguf_blocks("Q4_1", layer.out_features, layer.in_features, seed=i)
        with torch.no_grad():
            layer.weight.copy_(w)
        blocks[f"{name}.weight"] = ("Q4_1", raw)

    class Source:
        def read(self):
            return blocks

    model.gguf_blocks, model.gguf_weights = Source(), "Q4_1"
    assert auto_quantization(model) == "gguf"
    # what a compile cost is remembered under: the same key before the blocks are swapped in (pending) and after
    model.pending_gguf_blocks = True
    before = compiled._record_key(model, 1)
    swapped = copy.deepcopy(model)
    use_gguf_blocks(swapped)
    swapped.pending_gguf_blocks = False
    assert any(isinstance(m, BlockLinear) for m in swapped.modules()) and compiled._record_key(swapped, 1) == before
    count = sum(isinstance(m, BlockLinear) for m in swapped.modules())
    use_gguf_blocks(swapped)  # again: the stacked layers' float parts stay float
    assert sum(isinstance(m, BlockLinear) for m in swapped.modules()) == count
    from llmkit.model.lora import apply_lora

    with pytest.raises(LlmkitError, match="decodes from its GGUF blocks"):  # the compiled step would not see a LoRA
        apply_lora(swapped, r=4)
    model.pending_gguf_blocks = False
    with torch.no_grad():
        model.get_submodule(names[1]).weight[0, 0] += 1e-3  # one layer no longer matches its blocks
    with pytest.raises(LlmkitError, match="no longer equal"):
        use_gguf_blocks(model)
    assert not any(isinstance(m, BlockLinear) or hasattr(m, "gguf_block") for m in model.modules())
    model.gguf_weights = None  # what loading a LoRA run sets (its merged weights are off the file's grid)
    assert auto_quantization(model) is None


def test_the_int4_kernel_rounds_to_bf16_where_the_blocks_do_not():
    """Why int4 is opt-in: PyTorch's fast CPU int4 kernel takes bf16 activations and bf16 scales and zero points and
    writes bf16, so even a Q4_1 file's own codes give products ~1e-3 off (relative), where the blocks read by the
    compiled step are float32-exact."""
    raw, w = _gguf_blocks("Q4_1", 64, 128, seed=1)
    linear = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    x = torch.randn(1, 128)
    exact = x.double() @ w.double().t()
    int4 = Int4Linear(linear)
    assert int4.scale_zero.dtype == torch.bfloat16
    assert torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), int4.weight_int4, 32, int4.scale_zero).dtype == torch.bfloat16
    scale = exact.abs().max()
    rounded = (int4(x).double() - exact).abs().max() / scale
    blocks = BlockLinear(linear, "Q4_1", raw)
    exact_err = (torch.compile(lambda x: blocks(x))(x).double() - exact).abs().max() / scale
    assert rounded > 1e-4 and exact_err < 1e-6


def test_the_decode_step_compiles_only_where_it_pays(monkeypatch, tokenizers_by_kind):
    """compile="pays": a short generation never compiles; a long one compiles after a few eager steps when the
    steps left save more than twice the compile's expected time; a step compiled already is used at once. The
    tokens are the same either way."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = tiny("tiny-llama", tok.vocab_size)
    calls = []

    def fake_compile(m, batch, **kw):
        calls.append((batch, kw.get("background", False)))
        job = compiled.CompileJob(batch)
        job.done.set()  # failed, say: decoding goes on eagerly
        job.error = "not compiled in this test"
        return job

    monkeypatch.setattr(compiled, "compile_step", fake_compile)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, stop_token_ids=[])
    with torch.no_grad():
        ref = generate(model, tok, [[5, 6, 7]], cfg)
        use_compiled_decode(model, "auto")
        monkeypatch.setattr(compiled, "compile_estimate", lambda m, b: (1e6, False))  # a compile that never pays
        short = generate(model, tok, [[5, 6, 7]], cfg)
        assert calls == [] and short[0].ids == ref[0].ids
        monkeypatch.setattr(compiled, "compile_estimate", lambda m, b: (1e-6, True))  # one that always does
        long = generate(model, tok, [[5, 6, 7]], cfg)
    assert calls == [(1, False)] and long[0].ids == ref[0].ids  # compiled in place (a failed compile decodes eagerly)


@pytest.mark.slow
def test_a_background_process_compiles_the_step_and_this_one_loads_it(tmp_path, monkeypatch, tokenizers_by_kind):
    """compile_step(background="process"): a child process loads the same model folder and compiles its step into
    inductor's cache on disk; this process then loads it (`built`, then `ready`), decodes the eager tokens with it,
    and the machine's record says the next compile comes from the cache."""
    from llmkit.model.weights import save_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tok = tokenizers_by_kind["byte-bpe"]
    save_model(tiny("tiny-llama", tok.vocab_size), tmp_path / "m", tokenizer=tok)
    import llmkit
    from llmkit.model.compiled import compile_estimate, compile_step, prepare_for_decoding

    model = llmkit.load(tmp_path / "m")
    cfg = GenerationConfig(max_new_tokens=40, do_sample=False, stop_token_ids=[])
    with torch.no_grad():
        ref = generate(model, tok, [[5, 6, 7, 8]], cfg)
    monkeypatch.setenv("LLMKIT_COMPILE", "1")
    prepare_for_decoding(model, "auto")
    assert model.compiled_decode == "auto" and model.decode_spec["model"] == str(tmp_path / "m")
    notes: list[str] = []
    job = compile_step(model, 1, background="process", log=notes.append)
    assert job.done.wait(600) and job.error is None, job.error
    assert job.built.is_set() and job.ready.is_set() and "background process" in notes[0] and "ready" in notes[-1]
    with torch.no_grad():
        out = generate(model, tok, [[5, 6, 7, 8]], cfg)
    assert out[0].ids == ref[0].ids
    assert compile_estimate(model, 1)[1] and (tmp_path / "inductor" / "llmkit-decode-compiles.json").exists()


@pytest.mark.slow
def test_the_default_path_on_smollm2_answers_as_the_float_weights(monkeypatch):
    """The embedded SmolLM2 (a Q4_1 GGUF, its head Q8_0) as `generate`, `chat` and `serve` prepare it by default, with
    the compiled step forced (LLMKIT_COMPILE=always): the file's own blocks in the compiled step give the greedy tokens
    of the plain float32 model (the dequantized GGUF) on the France question, the applications' chat prompts and a
    set of plain prompts, 32 tokens each (int4's rounding changed the France answer and 2 of 3 such prompts)."""
    import llmkit
    from llmkit.applications import PRESETS, render
    from llmkit.chat import chat_prompt_ids
    from llmkit.cli.generate import load_for_generation

    monkeypatch.setenv("LLMKIT_COMPILE", "always")
    fast = load_for_generation("smollm2")
    plain = llmkit.load("smollm2")
    tok = plain.tokenizer
    chats = [[{"role": "user", "content": "What is the capital of France?"}]]
    chats += [render(name, "The weather is lovely today, and the whole town walks by the river.") for name in PRESETS]
    prompts = [chat_prompt_ids(tok, messages) for messages in chats]
    prompts += [tok.encode(p) for p in ("Once upon a time", "The three laws of motion are", "def fibonacci(n):", "Dear Sir,")]
    cfg = GenerationConfig(max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        for ids in prompts:
            want = generate(plain, tok, [ids], cfg)[0]
            got = generate(fast, tok, [ids], cfg)[0]
            assert got.ids == want.ids, (tok.decode(ids), got.text, want.text)
    assert isinstance(fast.lm_head, BlockLinear) and fast.lm_head.kind == "Q8_0" and fast.blocks[0].mlp.down_proj.kind == "Q4_1"
    assert fast.blocks[0].attn.qkv_proj.parts is not None and fast.blocks[0].mlp.gate_up_proj.kind == "Q4_1"
    assert "Paris" in generate(fast, tok, prompts[:1], cfg)[0].text
