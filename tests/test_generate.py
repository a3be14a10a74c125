"""Generation: greedy equal to transformers, seeded sampling, streaming equal to the whole text, beam search equal to
transformers, chat templates equal to transformers, and clear messages for bad input."""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.chat import ChatSession, chat_prompt_ids, render_chat
from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, TextStream, filter_top_k_top_p, generate, stream
from llmkit.model import build_model, preset

from conftest import run_cli


@pytest.fixture(scope="module")
def smollm2():
    return llmkit.load("smollm2")


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    from llmkit.embedded import embedded_path

    path = embedded_path("smollm2")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_greedy_smollm2_equals_transformers_generate(smollm2, hf_smollm2):
    tok = smollm2.tokenizer
    cfg = GenerationConfig(max_new_tokens=64, do_sample=False)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = generate(smollm2, tok, [ids], cfg)[0]
        theirs = hf_smollm2.generate(
            torch.tensor([ids]),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=2,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=2,
        )[0, len(ids) :].tolist()
        if ours.finish_reason == "stop":  # transformers keeps the eos token it stopped on
            assert theirs[-1] == 2
            theirs = theirs[:-1]
        assert ours.ids == theirs, prompt


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_equal_each_alone(smollm2):
    tok = smollm2.tokenizer
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False)
    together = generate(smollm2, tok, PROMPTS[:2], cfg)
    for prompt, result in zip(PROMPTS[:2], together):
        assert result.ids == generate(smollm2, tok, [prompt], cfg)[0].ids


@pytest.mark.slow
def test_streaming_yields_exactly_the_text_and_seeds_reproduce(smollm2):
    tok = smollm2.tokenizer
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=40, seed=7, repetition_penalty=1.1)
    prompt = "Write three emoji and a French sentence: "
    whole = generate(smollm2, tok, [prompt], cfg)[0]
    assert "".join(stream(smollm2, tok, prompt, cfg)) == whole.text
    assert generate(smollm2, tok, [prompt], cfg)[0].ids == whole.ids  # same seed, same tokens
    other = generate(smollm2, tok, [prompt], GenerationConfig(**{**cfg.__dict__, "seed": 8}))[0]
    assert other.ids != whole.ids
    stopped = GenerationConfig(**{**cfg.__dict__, "stop_strings": [whole.text[10:14]]})
    cut = generate(smollm2, tok, [prompt], stopped)[0]
    assert cut.finish_reason == "stop" and whole.text.startswith(cut.text) and len(cut.text) <= 10 + 3
    assert "".join(stream(smollm2, tok, prompt, stopped)) == cut.text


def test_text_stream_waits_for_whole_utf8_characters_and_stop_strings(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    text = "Fair 🌹 rose, café — 日本 stop here and more"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK are several byte tokens
    s = TextStream(tok, [])
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    s = TextStream(tok, ["stop here"])
    pieces = []
    for i in ids:
        pieces.append(s.push(i))
        if s.stopped:
            break
    assert "".join(pieces) == "Fair 🌹 rose, café — 日本 " and s.stopped


def test_top_k_top_p_keep_the_right_tokens():
    scores = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_top_k_top_p(scores, 2, None)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_k_top_p(scores, None, 0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_top_k_top_p(scores, None, 0.01)).tolist() == [[True, False, False, False, False]]


def test_seeded_sampling_reproduces_on_a_tiny_model(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=64)).eval()
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=[])
    a, b = generate(model, tok, ["To be"], cfg)[0], generate(model, tok, ["To be"], cfg)[0]
    assert a.ids == b.ids and len(a.ids) == 20 and a.finish_reason == "length"


@pytest.mark.parametrize("beams, length_penalty, early", [(3, 1.0, False), (4, 0.6, True), (2, 2.0, False)])
def test_beam_search_equals_transformers(tmp_path, beams, length_penalty, early):
    from transformers import T5Config, T5ForConditionalGeneration

    from llmkit.generate import beam_search

    torch.manual_seed(beams)
    ref = T5ForConditionalGeneration(
        T5Config(
            vocab_size=24, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0
        )
    ).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(8.0)  # sharper distributions, so eos and ties are realistic
    ref.save_pretrained(tmp_path)
    ours = llmkit.load(tmp_path)
    src = torch.tensor([[5, 9, 3, 17, 8, 2, 11]])
    with torch.no_grad():
        theirs = ref.generate(
            src, num_beams=beams, max_new_tokens=12, do_sample=False, length_penalty=length_penalty, early_stopping=early
        )[0].tolist()
        enc, _ = ours.encode(src)
        mine = beam_search(
            ours,
            enc,
            GenerationConfig(num_beams=beams, max_new_tokens=12, length_penalty=length_penalty, early_stopping=early),
            start_id=0,
            eos_ids=[1],
        )
    theirs = theirs[1:]  # drop the decoder start token
    if 1 in theirs:
        theirs = theirs[: theirs.index(1) + 1]
    assert mine == theirs


@pytest.mark.slow
def test_chat_template_renders_like_transformers(smollm2):
    from transformers import AutoTokenizer

    from llmkit.embedded import embedded_path

    path = embedded_path("smollm2")
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for add in (True, False):
            assert render_chat(smollm2.tokenizer, messages, add_generation_prompt=add) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add
            )


def test_default_chat_template_and_bad_templates(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    text = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tok.encode("<|user|>")[0] == tok.token_id("<|user|>")
    with pytest.raises(LlmkitError, match="chat template failed to render"):
        render_chat(tok, [{"role": "user", "content": "x"}], template="{% if %}")
    with pytest.raises(LlmkitError, match="chat template failed to render: no system"):
        render_chat(tok, [{"role": "user", "content": "x"}], template="{{ raise_exception('no system') }}")
    with pytest.raises(LlmkitError, match="'role' and 'content'"):
        render_chat(tok, [{"text": "x"}])


def test_bad_input_gets_clear_messages(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=32)).eval()
    with pytest.raises(LlmkitError, match="the prompt is empty"):
        generate(model, tok, [""])
    with pytest.raises(LlmkitError, match="exceeds the model's context of 32"):
        generate(model, tok, ["word " * 40], GenerationConfig(max_new_tokens=8))
    warnings = []
    out = generate(model, tok, ["word " * 40], GenerationConfig(max_new_tokens=8, truncate=True, stop_token_ids=[]), warn=warnings.append)[
        0
    ]
    assert len(out.prompt_ids) == 25 and "cut" in warnings[0]  # 25 + 8 new tokens use 32 positions: the last is never fed
    generate(model, tok, ["hi"], GenerationConfig(max_new_tokens=2, stop_strings=["a rather long stop string"]), warn=warnings.append)
    assert "can never stop the output" in warnings[-1]
    with pytest.raises(LlmkitError, match="no model at 'gpt-17'"):
        llmkit.load("gpt-17")
    # a default number of new tokens the context cannot hold is cut to the room left, and the user hears so once
    prompt = tok.encode("word " * 10)
    notes = []
    out = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=128, fit_new_tokens=True, stop_token_ids=[]), warn=notes.append)[0]
    assert len(out.ids) == 32 - len(prompt) + 1 and len(notes) == 1 and "new tokens at most" in notes[0]


def test_chat_session_keeps_turns_and_drops_old_ones_to_fit(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=64)).eval()
    notes = []
    chat = ChatSession(model, tok, system="Be brief.", config=GenerationConfig(max_new_tokens=8, seed=0), warn=notes.append)
    for text in ["Hello there", "Tell me of Hamlet and of Denmark", "And of Ophelia, fair and sad, and all the rest"]:
        "".join(chat.send(text))
    assert chat.messages[-2]["content"].startswith("And of Ophelia") and chat.messages[-1]["role"] == "assistant"
    assert notes and "dropped" in notes[0]
    chat.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["system"] == "Be brief."
    with pytest.raises(LlmkitError, match="does not fit"):
        "".join(chat.send("word " * 200))
    with pytest.raises(LlmkitError, match="empty"):
        "".join(chat.send("  "))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_chat_session_prefills_only_each_new_message_and_answers_the_same(tokenizers_by_kind, compiled):
    """Each turn's prompt starts with the last one and its answer: the session's prefix cache gives those columns
    (all but the last answer token), so only the new message is prefilled, and every greedy answer equals a session
    that prefills all of it each time (the eager and the static one-token step)."""
    from llmkit.model.compiled import use_compiled_decode

    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=512)).eval()
    if compiled:
        use_compiled_decode(model, "eager")  # the static step's path, uncompiled (same numbers, no compile in a test)
    answers = {}
    for cached in (True, False):
        chat = ChatSession(model, tok, system="Be brief.", config=GenerationConfig(max_new_tokens=10, do_sample=False, stop_token_ids=[]))
        if not cached:
            chat.prefix = None
        answers[cached] = ["".join(chat.send(t)) for t in ("Hello there", "Tell me of Hamlet", "And of Ophelia?")]
        if cached:
            assert chat.prefix.hits == 2
            second = chat_prompt_ids(tok, chat.conversation()[:-1])  # the third turn's prompt
            assert chat.prefix.reused_tokens > len(second) // 2
    assert answers[True] == answers[False]
    # a caller that stops between two pieces keeps every column fed; an error inside a step keeps nothing
    from llmkit.generate import stream
    from llmkit.model.prefix import PrefixCache

    ids = tok.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind", add_special_tokens=False)
    kept = PrefixCache(2**26)
    pieces = stream(model, tok, ids, GenerationConfig(max_new_tokens=10, do_sample=False, stop_token_ids=[]), prefix=kept)
    next(pieces), next(pieces), next(pieces)
    pieces.close()
    assert [len(k) for k in kept.entries] == [len(ids) + 2]  # the prompt and the two tokens fed after it
    broken = PrefixCache(2**26)
    calls = {"n": 0}

    def fail_on_the_third_step(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a step broken off")

    handle = model.blocks[-1].register_forward_pre_hook(fail_on_the_third_step)
    try:
        with pytest.raises(RuntimeError, match="broken off"):
            "".join(stream(model, tok, ids, GenerationConfig(max_new_tokens=10, do_sample=False), prefix=broken))
    finally:
        handle.remove()
    assert not broken.entries


@pytest.mark.slow
def test_generate_and_chat_commands(tmp_path):
    out = run_cli("generate", "--model", "smollm2", "--greedy", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json")
    row = json.loads(out.stdout)
    assert row["text"].strip().startswith("Paris") and len(row["ids"]) == 4 and row["finish_reason"] == "length"
    assert row["prompt_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0  # the run's own speeds, to measure without a benchmark
    # the chat template, with the command's default weights (the float32 weights; the compiled step reads the same from
    # the file's blocks): the first answer token is a near-tie ("The" 25.325 against "L" 25.243) that int4 flips
    chat = ["generate", "--model", "smollm2", "--greedy", "--chat", "--max-new-tokens", "24"]
    out = run_cli(*chat, input="What is the capital of France?")
    assert "Paris" in out.stdout
    (tmp_path / "p.jsonl").write_text('{"q": "One, two,"}\n{"q": "Monday, Tuesday,"}\n')
    rows = [
        json.loads(line)
        for line in run_cli(
            "generate",
            "--model",
            "smollm2",
            "--greedy",
            "--prompts-file",
            str(tmp_path / "p.jsonl"),
            "--field",
            "q",
            "--max-new-tokens",
            "3",
            "--json",
        ).stdout.splitlines()
    ]
    assert [r["prompt"] for r in rows] == ["One, two,", "Monday, Tuesday,"] and "three" in rows[0]["text"].lower()
    bad = run_cli("generate", "--model", "smollm2", "--prompt", "   ", check=False)
    assert bad.returncode == 1 and "prompt is empty" in bad.stderr
    session = run_cli(
        "chat",
        "--greedy",
        "--max-new-tokens",
        "12",
        "--system",
        "Answer in one word.",
        input=f"What color is the sky?\n/save {tmp_path / 'chat.json'}\n/reset\n/exit\n",
        cwd=tmp_path,
    )
    assert "assistant>" in session.stdout
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "What color is the sky?"} and saved["messages"][1]["content"]


def test_int8_weight_only_quantization_stays_close_to_float():
    from llmkit.model.quantize import Int8Linear, quantize

    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", vocab_size=97, d_model=64, n_heads=4, max_seq_len=64)).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        quantize(model)
        out = model(ids)
    qkv = model.blocks[0].attn.qkv_proj  # q, k and v fused into one matrix before quantizing
    assert isinstance(qkv, Int8Linear) and qkv.weight_int8.dtype == torch.int8 and model.blocks[0].attn.q_proj is None
    assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    with pytest.raises(LlmkitError, match="unknown quantization"):
        quantize(model, "int3")


@pytest.mark.slow
def test_generate_with_int8_and_bf16(tmp_path):
    for flags in (["--quantize", "int8"], ["--dtype", "bf16"]):
        out = run_cli(
            "generate",
            "--model",
            "smollm2",
            "--greedy",
            "--chat",
            "--max-new-tokens",
            "24",
            *flags,
            "--prompt",
            "What is the capital of France?",
        )
        assert "Paris" in out.stdout, flags


# --- edges: stops, several eos, padded vocabularies, penalties in batches, bad settings, incremental text -------------


def test_stop_strings_cut_at_the_earliest_whichever_is_listed_first(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    text = "Hello there. Bye now. User: more"
    for stops in (["User:", "Bye"], ["Bye", "User:"]):
        s = TextStream(tok, stops)
        pieces = [s.push(i) for i in tok.encode(text)] + [s.flush()]
        assert "".join(pieces) == "Hello there. " and s.text == "Hello there. " and s.stopped


@pytest.mark.parametrize("kind", ["byte-bpe", "unigram", "wordpiece", "word", "char"])
def test_incremental_text_equals_a_whole_decode(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    rng = torch.Generator().manual_seed(len(kind))
    for _ in range(20):
        ids = torch.randint(0, tok.vocab_size, (30,), generator=rng).tolist()
        s = TextStream(tok, [])
        text = "".join([s.push(i) for i in ids] + [s.flush()])
        assert text == tok.decode(ids, skip_special_tokens=True)


def _tiny_llama_folder(path, tok, eos, gen_eos=None):
    from transformers import GenerationConfig as HFGen
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    ref = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=eos,
            bos_token_id=None,
            pad_token_id=None,
        )
    ).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(30.0)  # confident, so the greedy path is far from ties
    if gen_eos is not None:
        ref.generation_config = HFGen(eos_token_id=gen_eos)
    ref.save_pretrained(path)
    return ref


def test_several_eos_ids_and_generation_config_stop_like_transformers(tmp_path, tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    prompt = tok.encode("To be, or not to be", add_special_tokens=False)
    ref = _tiny_llama_folder(tmp_path / "probe", tok, eos=None)
    free = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(prompt) :].tolist()
    eos = [free[6], free[3]]  # the second listed comes first in the text
    for folder, config_eos, gen_eos in (("config", eos, None), ("generation", free[9], eos)):
        ref = _tiny_llama_folder(tmp_path / folder, tok, eos=config_eos, gen_eos=gen_eos)
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
        ours = generate(llmkit.load(tmp_path / folder), tok, [prompt], GenerationConfig(max_new_tokens=12, do_sample=False))[0]
        assert theirs[-1] in eos and ours.finish_reason == "stop"
        assert ours.ids == theirs[:-1]  # transformers keeps the eos it stopped on


@pytest.mark.slow
def test_a_special_token_as_stop_string_stops_like_transformers(smollm2, hf_smollm2):
    from transformers import AutoTokenizer

    from llmkit.chat import chat_prompt_ids
    from llmkit.embedded import embedded_path

    tok = smollm2.tokenizer
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Name one colour."}])
    cfg = GenerationConfig(max_new_tokens=24, do_sample=False, stop_strings=["<|im_end|>"], stop_token_ids=[])
    ours = generate(smollm2, tok, [ids], cfg)[0]
    path = embedded_path("smollm2")
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    x = torch.tensor([ids])
    theirs = hf_smollm2.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=24,
        do_sample=False,
        stop_strings=["<|im_end|>"],
        tokenizer=hf_tok,
        eos_token_id=None,
        pad_token_id=2,
    )[0, len(ids) :].tolist()
    assert ours.finish_reason == "stop" and theirs[-1] == tok.token_id("<|im_end|>")
    assert ours.ids == theirs[:-1] and "<|im_end|>" not in ours.text


def test_padded_vocabulary_rows_are_never_sampled_and_decode_to_nothing(tmp_path, tokenizers_by_kind):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tokenizers_by_kind["unigram"]  # the model has 64 more rows than the tokenizer has tokens, as T5 (32,128 / 32,100)
    torch.manual_seed(0)
    ref = T5ForConditionalGeneration(
        T5Config(
            vocab_size=tok.vocab_size + 64,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            eos_token_id=tok.eos_id,
        )
    ).eval()
    with torch.no_grad():
        ref.lm_head.weight[tok.vocab_size :] = ref.lm_head.weight[:64] * 50  # the padding rows would win every argmax
    ref.save_pretrained(tmp_path)
    model = llmkit.load(tmp_path)
    for cfg in (
        GenerationConfig(max_new_tokens=10, do_sample=False),
        GenerationConfig(max_new_tokens=10, seed=0),
        GenerationConfig(max_new_tokens=6, num_beams=3),
    ):
        out = generate(model, tok, ["Where is the king?"], cfg)[0]
        assert out.ids and max(out.ids) < tok.vocab_size
    assert tok.decode([5, tok.vocab_size + 3, 6], strict=False) == tok.decode([5, 6])
    with pytest.raises(LlmkitError, match=f"token id {tok.vocab_size + 3} is outside"):
        tok.decode([5, tok.vocab_size + 3])


@pytest.mark.slow
def test_repetition_penalty_never_counts_left_padding(smollm2):
    from llmkit.chat import chat_prompt_ids

    tok = smollm2.tokenizer
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("Say hi.", "List three fruits, then stop, please.")]
    cfg = GenerationConfig(max_new_tokens=20, do_sample=False, repetition_penalty=1.5)
    together = generate(smollm2, tok, prompts, cfg)
    for p, g in zip(prompts, together):
        alone = generate(smollm2, tok, [p], cfg)[0]
        assert g.ids == alone.ids and g.finish_reason == alone.finish_reason


def test_bad_generation_settings_are_refused_and_a_prompt_that_fits_is_taken(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=32)).eval()
    for change, message in (
        (dict(temperature=-1.0), "temperature -1.0 is negative"),
        (dict(top_k=-2), "top_k -2 is negative"),
        (dict(top_p=0.0), "top_p 0.0 is not in"),
        (dict(top_p=1.5), "top_p 1.5 is not in"),
        (dict(repetition_penalty=0.0), "repetition_penalty 0.0 must be positive"),
        (dict(max_new_tokens=-1), "max_new_tokens -1 is negative"),
    ):
        with pytest.raises(LlmkitError, match=message):
            generate(model, tok, ["hi"], GenerationConfig(**change))
    prompt = list(range(300, 323))  # 23 + 10 new tokens: 32 positions are fed, the last token never is
    out = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=10, stop_token_ids=[], seed=0))[0]
    assert out.prompt_ids == prompt and len(out.ids) == 10
    with pytest.raises(LlmkitError, match="exceeds the model's context"):
        generate(model, tok, [prompt + [5]], GenerationConfig(max_new_tokens=10))
    assert generate(model, tok, ["hi"], GenerationConfig(max_new_tokens=0))[0].ids == []
    with pytest.raises(LlmkitError, match="token id -4 is outside"):
        generate(model, tok, [[5, -4]], GenerationConfig(max_new_tokens=2))
    t5 = build_model(preset("tiny-t5", vocab_size=tok.vocab_size, d_model=64, n_heads=4)).eval()
    out = generate(t5, tok, ["hi"], GenerationConfig(max_new_tokens=0, num_beams=3))[0]
    assert out.ids == [] and out.text == "" and out.prompt_ids == tok.encode("hi")


def test_per_row_settings_sample_each_row_as_alone():
    from llmkit.generate import Sampler

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    configs = [
        GenerationConfig(do_sample=False),
        GenerationConfig(temperature=0.7, top_k=5, seed=1),
        GenerationConfig(temperature=1.3, top_p=0.8, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    together = Sampler(configs, 50, "cpu", generators=gens)
    together.add_prompts([[1, 2], [3], [4, 4, 5]])
    alone = [Sampler([c], 50, "cpu", generators=[torch.Generator().manual_seed(i)]) for i, c in enumerate(configs)]
    for s, p in zip(alone, [[1, 2], [3], [4, 4, 5]]):
        s.add_prompts([p])
    for _ in range(5):
        picked = together(logits)
        together.observe(picked)
        for r, s in enumerate(alone):
            one = s(logits[r : r + 1])
            s.observe(one)
            assert one.item() == picked[r].item()
    assert picked[0].item() == logits[0].argmax().item()


def test_warnings_go_to_stderr_not_into_the_text(tmp_path, tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    save_dir = tmp_path / "m"
    from llmkit.model.weights import save_model

    save_model(
        build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=32)).eval(), save_dir, tokenizer=tok
    )
    out = run_cli("generate", "--model", str(save_dir), "--prompt", "word " * 40, "--truncate", "--max-new-tokens", "4", "--seed", "1")
    assert "cut" in out.stderr and "cut" not in out.stdout


def test_the_stream_holds_back_only_what_may_become_a_stop_string(tokenizers_by_kind):
    tok = tokenizers_by_kind["char"]
    s = TextStream(tok, ["bc", "Hd"])
    pieces = [s.push(i) for i in tok.encode("Hb", add_special_tokens=False)]
    assert "".join(pieces) == "H"  # "b" may grow into "bc"; "H" is final whatever comes


def test_application_presets_on_the_command_line(tmp_path):
    from llmkit.applications import PRESETS, render

    messages = render("translate", "Good morning", to="de")
    assert messages[1]["content"] == PRESETS["translate"]["user"].format(language="German", text="Good morning")
    assert "a polite email" in render("write", "the launch", kind="email")[1]["content"]
    with pytest.raises(LlmkitError, match="unknown language"):
        render("translate", "x", to="xx")
    (tmp_path / "text.txt").write_text("The film was wonderful: I laughed, I cried, and I would watch it again tomorrow.")
    out = run_cli("generate", "--model", "smollm2", "--greedy", "--task", "sentiment", "--file", str(tmp_path / "text.txt"), "--json")
    row = json.loads(out.stdout)
    assert "positive" in row["text"].lower() and len(row["ids"]) <= PRESETS["sentiment"]["max_tokens"]
    assert "Sentiment:" in row["prompt"] and "<|im_start|>system" in row["prompt"]
    bad = run_cli("generate", "--model", "smollm2", "--to", "fr", "--prompt", "hi", check=False)
    assert bad.returncode == 1 and "--to and --kind go with --task" in bad.stderr


def test_a_chat_session_takes_the_models_own_tokenizer(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, d_model=64, n_heads=4, max_seq_len=64)).eval()
    with pytest.raises(LlmkitError, match="no tokenizer"):
        ChatSession(model)
    model.tokenizer = tok  # what llmkit.load attaches
    chat = ChatSession(model, config=GenerationConfig(max_new_tokens=3, do_sample=False))
    assert chat.tok is tok and isinstance("".join(chat.send("Hello")), str) and len(chat.messages) == 2


def test_stop_strings_typed_in_a_shell_mean_what_they_name():
    """`--stop "\\n\\n"` in bash passes a backslash and an n twice: the command reads it as two newlines (as llama.cpp
    reads its prompts), a doubled backslash stays one backslash, and other text is untouched."""
    from llmkit.cli import parse_args
    from llmkit.cli.generate import unescape

    assert unescape("\\n\\n") == "\n\n" and unescape("a\\tb\\r") == "a\tb\r"
    assert unescape("C:\\\\new") == "C:\\new" and unescape("naïve \\x") == "naïve \\x"
    assert parse_args(["generate", "--stop", "\\n\\n"]).stop == ["\\n\\n"]  # kept as typed until the command reads it


def test_decoding_on_a_busy_machine_says_so(monkeypatch):
    """Another process keeping a core busy is measured (its CPU time, not this process's) and named with the thread
    count that would not wait for it; a user's own OMP_NUM_THREADS, or one thread, says nothing."""
    import os
    import subprocess
    import sys

    from llmkit.threads import busy_note, others_busy

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.cpu_count() or 1
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        assert others_busy(0.5) >= cores - 0.6  # every core taken by the burners
        note = busy_note(cores) if cores > 1 else None
        assert cores == 1 or ("busy" in note and "OMP_NUM_THREADS=1" in note)
    finally:
        for b in burners:
            b.kill()
    assert busy_note(1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert busy_note(max(cores, 2)) is None
