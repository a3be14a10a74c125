"""GloVe: llmkit's (torch, `llmkit embed train --method glove`) against the reference C implementation (Stanford's
GloVe, built here from its source in ../shared/anchors/glove, in a scratch folder) on the same corpus and settings, in one
run on this machine: wall time end to end (text in, vectors.txt out) and the three evaluation scores side by side.

    python benchmarks/glove_reference.py                          # Shakespeare, dim 100, window 10, 25 epochs, 2 threads
    python benchmarks/glove_reference.py --dim 300 --epochs 25 --source 'corpus/*.txt'

Both read the same lines: llmkit's tokenization (lower-cased words, one line a sentence) is written out for the C tools,
which split on spaces and reset the window at each line as llmkit does. Settings: min count 5, symmetric window with
1/distance weighting, x_max 100, alpha 0.75, eta 0.05, output word + context vectors (the C tool's -model 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], stdin=None, stdout=None) -> None:
    subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL, check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="shakespeare")
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3, help="runs of each, seeds 1..N: scores vary with the seed on a small corpus")
    p.add_argument("--glove-src", default=str(ROOT.parent / "shared" / "anchors" / "glove"), help="the reference's source folder")
    args = p.parse_args()
    from llmkit.data.sources import read_source
    from llmkit.embed.static import sentences
    from llmkit.embed.vectors import read_text_vectors

    scratch = Path(tempfile.mkdtemp(prefix="glove-bench-"))
    shutil.copytree(args.glove_src, scratch / "glove")
    run(["make", "-C", str(scratch / "glove")], stdout=subprocess.DEVNULL)
    build = scratch / "glove" / "build"
    lines = sentences(read_source(args.source).texts)
    corpus = scratch / "corpus.txt"
    corpus.write_text("\n".join(" ".join(line) for line in lines) + "\n")
    print(
        f"{sum(map(len, lines)):,} words in {len(lines):,} lines of {args.source}; dim {args.dim}, window {args.window}, "
        f"{args.epochs} epochs, min count {args.min_count}, {args.threads} threads",
        flush=True,
    )

    import numpy as np

    def reference(seed: int) -> Path:
        with open(corpus) as fin, open(scratch / "vocab.txt", "w") as fout:
            run([str(build / "vocab_count"), "-min-count", str(args.min_count), "-verbose", "0"], fin, fout)
        with open(corpus) as fin, open(scratch / "cooc.bin", "wb") as fout:
            run(
                [
                    str(build / "cooccur"),
                    "-memory",
                    "4",
                    "-vocab-file",
                    str(scratch / "vocab.txt"),
                    "-verbose",
                    "0",
                    "-window-size",
                    str(args.window),
                ],
                fin,
                fout,
            )
        with open(scratch / "cooc.bin", "rb") as fin, open(scratch / "cooc.shuf.bin", "wb") as fout:
            run(
                [str(build / "shuffle"), "-memory", "4", "-verbose", "0", "-seed", str(seed), "-temp-file", str(scratch / "shuf_tmp")],
                fin,
                fout,
            )
        run(
            [
                str(build / "glove"),
                "-save-file",
                str(scratch / f"reference{seed}"),
                "-threads",
                str(args.threads),
                "-input-file",
                str(scratch / "cooc.shuf.bin"),
                "-x-max",
                "100",
                "-iter",
                str(args.epochs),
                "-vector-size",
                str(args.dim),
                "-binary",
                "0",
                "-model",
                "2",
                "-vocab-file",
                str(scratch / "vocab.txt"),
                "-verbose",
                "0",
                "-write-header",
                "1",
                "-seed",
                str(seed),
            ]
        )
        return scratch / f"reference{seed}.txt"

    def ours(seed: int) -> Path:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llmkit",
                "embed",
                "train",
                "--method",
                "glove",
                "--dim",
                str(args.dim),
                "--window",
                str(args.window),
                "--epochs",
                str(args.epochs),
                "--min-count",
                str(args.min_count),
                "--source",
                args.source,
                "--seed",
                str(seed),
                "--out",
                str(scratch / f"ours{seed}"),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return scratch / f"ours{seed}" / "vectors.txt"

    times = {"reference": [], "llmkit": []}
    scores = {"reference": [], "llmkit": []}
    for seed in range(1, args.seeds + 1):
        for name, fn in (("reference", reference), ("llmkit", ours)):
            start = time.perf_counter()
            path = fn(seed)
            times[name].append(time.perf_counter() - start)
            r = read_text_vectors(path).evaluate()
            scores[name].append((r["wordsim353"]["spearman"], r["simlex999"]["spearman"], r["google_analogy"]["accuracy"]))
            print(
                f"seed {seed} {name:<10} {times[name][-1]:6.1f}s  WordSim {scores[name][-1][0]:+.4f}  SimLex {scores[name][-1][1]:+.4f}  "
                f"analogy {scores[name][-1][2]:.4f}",
                flush=True,
            )
    print(f"\nmean of {args.seeds} seed(s){'':<6}{'reference C':>14}{'llmkit':>14}{'difference':>14}")
    for k, label in enumerate(("WordSim-353 Spearman", "SimLex-999 Spearman", "Google analogy accuracy")):
        a, b = np.mean([s[k] for s in scores["reference"]]), np.mean([s[k] for s in scores["llmkit"]])
        print(f"{label:<26}{a:>14.4f}{b:>14.4f}{b - a:>+14.4f}")
    c_seconds, ours_seconds = np.median(times["reference"]), np.median(times["llmkit"])
    print(f"{'wall time (s, median)':<26}{c_seconds:>14.1f}{ours_seconds:>14.1f}")
    print(f"llmkit time / reference time: {ours_seconds / c_seconds:.2f}x")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
