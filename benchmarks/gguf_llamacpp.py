"""llmkit's GGUF export opened by llama.cpp: the same file's logits in llama.cpp and in llmkit, per quantization.

    python benchmarks/gguf_llamacpp.py                  # SmolLM2 (f32, f16, q8_0, q4_0) and tiny random Qwen2 / Qwen3
    python benchmarks/gguf_llamacpp.py --skip smollm2

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


def llama_cpp_logits(path: Path, prompts: list[list[int]], texts: list[str]) -> tuple[list[np.ndarray], int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
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
    theirs, same = llama_cpp_logits(path, prompts, PROMPTS)
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
    """A tiny random Qwen2 / Qwen3 from transformers with llmkit's byte-level BPE trained on three plays."""
    import transformers

    from llmkit.tokenizer import train_tokenizer

    from conftest import normalize, shakespeare

    docs = shakespeare("the-comedy-of-errors") + shakespeare("macbeth")
    tok = train_tokenizer([normalize(d.text) for d in docs], "byte-bpe", 2048, min_frequency=1)
    shape = dict(
        vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    if family == "qwen2":
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, max_position_embeddings=512, tie_word_embeddings=True))
    else:
        ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=64, max_position_embeddings=512))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in n else 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(5.0)  # confident logits: top-1 far from ties
    ref.save_pretrained(folder)
    tok.save(folder)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip", default="", help="comma-separated: smollm2, qwen2, qwen3")
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
        for family in ("qwen2", "qwen3"):
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
