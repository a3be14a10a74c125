"""What structured output costs: decoding under a JSON schema's grammar against the same decoding without one.

    python benchmarks/structured_cost.py                 # SmolLM2, greedy, eager decode step, 2 threads

Peer, in the same run: the same prompts decoded without a schema, as many tokens (`ignore` the end: a fixed count), so
the difference is the grammar's mask per step and the llguidance table built once per tokenizer (reported apart).
Prints per-step milliseconds, the ratio, whether every constrained answer parses, and the first run's table build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}
QUESTIONS = ["The capital of France, as JSON.", "The capital of Japan, as JSON.", "The capital of Italy, as JSON."]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    import llmkit
    from llmkit.chat import chat_prompt_ids
    from llmkit.generate import GenerationConfig, generate
    from llmkit.grammar import _ll_tokenizer

    model = llmkit.load(args.model)
    tok = model.tokenizer
    started = time.perf_counter()
    _ll_tokenizer(tok, max(tok.id_limit, model.config.vocab_size), sorted(model.config.eos_ids))
    table_s = time.perf_counter() - started
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    rows = {"free": [], "json": []}
    parsed, example = 0, ""
    with torch.no_grad():
        for _ in range(args.repeats):
            for p_ids in prompts:
                stats: dict = {}
                g = generate(model, tok, [p_ids], GenerationConfig(max_new_tokens=96, do_sample=False, json_schema=SCHEMA), stats=stats)[0]
                n, example = len(g.ids), g.text
                parsed += isinstance(json.loads(g.text), dict) if g.finish_reason == "stop" else 0
                rows["json"].append(stats["decode_s"] / max(stats["decode_tokens"], 1))
                stats = {}
                generate(model, tok, [p_ids], GenerationConfig(max_new_tokens=n, do_sample=False, stop_token_ids=[]), stats=stats)
                rows["free"].append(stats["decode_s"] / max(stats["decode_tokens"], 1))
    free, constrained = statistics.median(rows["free"]) * 1e3, statistics.median(rows["json"]) * 1e3
    print(f"llguidance table for {args.model}'s tokenizer: {table_s:.2f} s (once per process and tokenizer)")
    print(f"decode step, median of {len(rows['free'])}: free {free:.1f} ms, under the schema {constrained:.1f} ms")
    print(f"ratio constrained / free: {constrained / free:.3f}; answers that parse: {parsed}/{len(rows['json'])}")
    print("an answer:", example)


if __name__ == "__main__":
    main()
