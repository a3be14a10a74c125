"""Pin llama.cpp's tokenization of small GGUF files, one per `tokenizer.ggml.pre` llmkit supports, for the test suite
(tests/data/llama_cpp_tokens.json): the vocabulary is SmolLM2's, the split rules and the bos default are the pre's.

    python benchmarks/llama_cpp_tokenizer_check.py            # compare llmkit with llama.cpp, print mismatches
    python benchmarks/llama_cpp_tokenizer_check.py --write    # and (re)write the pinned file

Needs `llama-cpp-python` (a benchmark extra, see benchmarks/RESULTS.md); the tests read only the pinned file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PRES = ["default", "smollm", "llama-bpe", "qwen2", "gpt-2", "falcon", "dbrx"]
TEXTS = [
    "Hello, world 12345!",
    "a ... b",
    "(Hello) world's 12345 numbers:\n\n  indented\ttabs, café 🤗",
    "I'm 2024-03-07 [x] done...",
    "   leading spaces and 1,000,000",
    "x=3.14159; y+=z^2 || a<b",
    "Don't STOP! It's 99.9% sure.\r\nNew line",
    "日本語のテキスト 123",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    from llama_cpp import Llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.tokenizer import Tokenizer

    from gguf_files import smollm2_tokenizer_fields, write_llama_gguf

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=128
        )
    )
    pinned, bad = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRES:
            path = Path(tmp) / f"{pre}.gguf"
            write_llama_gguf(path, model, smollm2_tokenizer_fields(pre=pre))
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
            ours = Tokenizer.load(path)
            pinned[pre] = {}
            for text in TEXTS:
                theirs = llm.tokenize(text.encode(), add_bos=True, special=True)  # bos when the vocabulary asks for it
                pinned[pre][text] = theirs
                if ours.encode(text) != theirs:
                    bad += 1
                    print(f"{pre} {text!r}\n  llama.cpp {theirs}\n  llmkit    {ours.encode(text)}")
    print(f"{len(PRES)} pre-tokenizers x {len(TEXTS)} texts: {bad} mismatches against llama.cpp")
    if args.write:
        out = ROOT / "tests" / "data" / "llama_cpp_tokens.json"
        out.write_text(json.dumps(pinned, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"pinned -> {out}")


if __name__ == "__main__":
    main()
