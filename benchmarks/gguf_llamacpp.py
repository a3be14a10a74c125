"""llmkit's GGUF export opened by llama.cpp: the same file's logits in llama.cpp and in llmkit, per quantization.

    python benchmarks/gguf_llamacpp.py                  # SmolLM2 (f32, f16, q8_0, q4_0) and tiny random Qwen2, Qwen3,
                                                        # Gemma 2, Gemma 3 and Phi-3 (LongRoPE, partial RoPE)
    python benchmarks/gguf_llamacpp.py --skip smollm2,qwen2,qwen3

For each exported file: whether llama.cpp's tokenizer gives llmkit's ids for the prompts, then over every position of
the prompts, the top-1 agreement and the largest logit difference between llama.cpp (`llama-cpp-python`, built as in
the decode benchmark) and llmkit reading the same file; and against the model before export (the quantization's own
cost, in llmkit). Needs `llama-cpp-python` (a benchmark extra, see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
]


def llama_cpp_logits(path: Path, prompts: list[list[int]], texts: list[str], n_ctx: int = 512) -> tuple[list[np.ndarray], int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    same = 0
    out = []
    for ids, text in zip(prompts, texts):
        same += llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true", special=True) == ids
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return out, same


def compare(name: str, source, path: Path) -> dict:
    import llmkit

    ours = llmkit.load(path)
    prompts = [ours.tokenizer.encode(t) for t in PROMPTS]
    scaling = ours.config.rope_scaling or {}
    # LongRoPE: llama.cpp takes the long factors whenever its context (padded to a multiple of 256) exceeds the
    # original one, llmkit (as transformers) only for sequences that do; a context of the original length (256 in
    # the tiny Phi-3) compares the same (short) factors
    n_ctx = scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else 512
    theirs, same = llama_cpp_logits(path, prompts, PROMPTS, n_ctx)
    agree = total = 0
    diff = src_diff = 0.0
    src_agree = 0
    with torch.no_grad():
        for ids, their in zip(prompts, theirs):
            mine = ours(torch.tensor([ids]))[0].numpy()
            before = source(torch.tensor([ids]))[0].numpy()
            agree += int((mine.argmax(-1) == their.argmax(-1)).sum())
            src_agree += int((mine.argmax(-1) == before.argmax(-1)).sum())
            total += len(ids)
            diff = max(diff, float(np.abs(mine - their).max()))
            src_diff = max(src_diff, float(np.abs(mine - before).max()))
    row = dict(
        model=name,
        tokens=f"{same}/{len(PROMPTS)}",
        top1_llama_cpp=agree / total,
        max_diff_llama_cpp=diff,
        top1_vs_source=src_agree / total,
        max_diff_vs_source=src_diff,
        mb=path.stat().st_size / 1e6,
    )
    print(
        f"{name:<22} tokens {row['tokens']}  llama.cpp vs llmkit: top-1 {row['top1_llama_cpp']:.3f}, max |diff| {diff:.4f}   "
        f"file vs source: top-1 {row['top1_vs_source']:.3f}, max |diff| {src_diff:.4f}   {row['mb']:.1f} MB",
        flush=True,
    )
    return row


def tiny(family: str, folder: Path):
    """A tiny random model from transformers with a tokenizer trained on three plays: Qwen2 / Qwen3 with llmkit's
    byte-level BPE; Gemma 2 (window 8, its caps), Gemma 3 (7 layers: layer 5 global, window 8, a local RoPE base
    and linear scaling of the global layers) and Phi-3 (partial RoPE, LongRoPE grown from 256 to 1,024 positions) with a
    SentencePiece BPE of the family's kind (tests/conftest.py)."""
    import transformers as T

    from llmkit.tokenizer import train_tokenizer

    from conftest import longrope_phi3, normalize, sentencepiece_tokenizer, shakespeare

    texts = [normalize(d.text) for d in shakespeare("the-comedy-of-errors") + shakespeare("macbeth")]
    if family in ("qwen2", "qwen3"):
        tok = train_tokenizer(texts, "byte-bpe", 2048, min_frequency=1)
        vocab = tok.vocab_size
    else:
        tok = sentencepiece_tokenizer(texts, family, 2048)
        vocab = len(tok)
    shape = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    if family == "qwen2":
        ref = T.Qwen2ForCausalLM(T.Qwen2Config(**shape, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=True))
    elif family == "qwen3":
        ref = T.Qwen3ForCausalLM(T.Qwen3Config(**shape, num_hidden_layers=2, head_dim=64, max_position_embeddings=512))
    elif family == "gemma2":
        ref = T.Gemma2ForCausalLM(T.Gemma2Config(**shape, num_hidden_layers=3, head_dim=64, query_pre_attn_scalar=64, sliding_window=8))
    elif family == "gemma3":
        ref = T.Gemma3ForCausalLM(
            T.Gemma3TextConfig(
                **shape,
                num_hidden_layers=7,
                head_dim=64,
                query_pre_attn_scalar=64,
                sliding_window=8,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                },
            )
        )
    else:
        cfg = T.Phi3Config(**shape, num_hidden_layers=2, max_position_embeddings=1024, pad_token_id=0, **longrope_phi3(256, 8))
        ref = T.Phi3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.dim() == 1:
                centre = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms are 1 + weight
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g) if "norm" in n else 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(5.0)  # confident logits: top-1 far from ties
    ref.save_pretrained(folder)
    if family in ("qwen2", "qwen3"):
        tok.save(folder)
    else:
        tok.save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip", default="", help="comma-separated: smollm2, qwen2, qwen3, gemma2, gemma3, phi3")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import llmkit
    from llmkit.model.convert.gguf import export_gguf

    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        sources = []
        if "smollm2" not in skip:
            sources.append(("SmolLM2-135M", "smollm2"))
        for family in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
            if family not in skip:
                tiny(family, d / family)
                sources.append((f"tiny {family}", str(d / family)))
        for name, spec in sources:
            source = llmkit.load(spec)
            for quant in ("f32", "f16", "q8_0", "q4_0"):
                t = time.perf_counter()
                path = export_gguf(source, d / f"{Path(spec).name}-{quant}.gguf", source.tokenizer, quant=quant)
                print(f"  exported {name} {quant} in {time.perf_counter() - t:.1f} s", flush=True)
                rows.append(compare(f"{name} {quant}", source, path))
                path.unlink()
    print("\n| model, export | tokens equal | top-1 llama.cpp = llmkit | max logit diff | top-1 file = source | max diff vs source | MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tokens']} | {r['top1_llama_cpp']:.3f} | {r['max_diff_llama_cpp']:.4f} | {r['top1_vs_source']:.3f} | "
            f"{r['max_diff_vs_source']:.4f} | {r['mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
