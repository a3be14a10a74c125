"""`llmkit embed`: static vectors (train, similar, analogy, odd-one-out, evaluate), contextual ones (text, tokens),
similarity of texts, categories (cluster), pictures (map) and semantic search (index, search)."""

from __future__ import annotations

import json
import sys

import numpy as np

from llmkit.cli.common import console, device_option, group, print_json, source_options, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    cmds = group(
        commands,
        "embed",
        "word and text embeddings: train, compare, picture, search",
        (
            "llmkit embed train --method word2vec --sg --dim 300 --source shakespeare --out runs/w2v",
            "llmkit embed similar --vectors runs/w2v king --top 10",
            "llmkit embed text --model minilm 'A man is eating food.' 'Someone eats a meal.'",
            "llmkit embed index --model minilm --source shakespeare --chunk 4lines --out runs/index",
            "llmkit embed search --index runs/index 'a ghost demands revenge' --top 5",
        ),
        "embed commands",
    )

    p = subcommand(
        cmds,
        "train",
        "train static word vectors: Word2Vec (gensim) or GloVe",
        (
            "llmkit embed train --method word2vec --sg --dim 300 --source shakespeare --out runs/w2v",
            "llmkit embed train --method glove --dim 300 --window 10 --epochs 25 --source 'corpus/*.txt' --out runs/glove",
        ),
        cmd_train,
    )
    source_options(p)
    p.add_argument("--method", default="word2vec", choices=["word2vec", "glove"])
    p.add_argument("--dim", type=int, default=100, help="vector size, 50-1024 (default: 100)")
    p.add_argument("--window", type=int, default=None, help="context words on each side (default: word2vec 5, glove 10)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the corpus (default: word2vec 5, glove 25)")
    p.add_argument("--min-count", type=int, default=5, help="drop words seen fewer times (default: 5)")
    p.add_argument("--max-vocab", type=int, default=None, help="keep the N most frequent words")
    p.add_argument("--sg", action="store_true", help="word2vec: skip-gram (default: CBOW)")
    p.add_argument("--workers", type=int, default=2, help="word2vec: worker threads (default: 2; 1 is reproducible in --seed)")
    p.add_argument("--device", default="cpu", help="glove: where to train (cpu, cuda; default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/vectors", help="output folder (default: runs/vectors)")

    p = subcommand(
        cmds,
        "text",
        "sentence vectors from any model (mean, CLS or last-token pooling)",
        (
            "llmkit embed text --model minilm 'A man is eating food.' 'Someone eats a meal.' --json",
            "llmkit embed text --model smollm2 --pooling last --file sentences.txt --out vecs.npy",
        ),
        cmd_text,
    )
    p.add_argument("texts", nargs="*", help="texts to embed (or --file)")
    p.add_argument("--model", default="minilm", help="any model llmkit.load accepts (default: minilm)")
    p.add_argument("--pooling", default=None, choices=["mean", "cls", "last"], help="default: mean for encoders, last for decoders")
    p.add_argument("--file", default=None, help="a text file, one text per line")
    p.add_argument("--batch-size", type=int, default=32)
    device_option(p)
    p.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths (default: unit length)")
    p.add_argument("--out", default=None, help="write the vectors as .npy")
    p.add_argument("--json", action="store_true", help='print {"model", "pooling", "dim", "vectors"}')

    p = subcommand(
        cmds,
        "tokens",
        "a word's vector in each sentence: the same word, different contexts",
        (
            "llmkit embed tokens --model minilm 'I sat by the river bank' 'I paid at the bank' --word bank",
            "llmkit embed tokens --model minilm --file bank.txt --word bank --png bank.png",
        ),
        cmd_tokens,
    )
    p.add_argument("sentences", nargs="*")
    p.add_argument("--word", default=None, help="the word to follow (required)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--file", default=None, help="a text file, one sentence per line")
    p.add_argument("--png", default=None, help="draw the occurrences on a 2-D map (PCA)")
    device_option(p)
    p.add_argument("--json", action="store_true")

    for name, help_, ex in (
        ("similar", "nearest words of a word (static vectors)", ("llmkit embed similar --vectors runs/w2v king --top 10",)),
        (
            "analogy",
            "a - b + c: king man woman -> queen (man is to king as woman is to ?)",
            (
                "llmkit embed analogy --vectors runs/w2v king man woman",
                "llmkit embed analogy --vectors runs/glove king man woman --method 3cosmul",
            ),
        ),
        (
            "similarity",
            "cosine similarity of two words or texts",
            ("llmkit embed similarity --vectors minilm 'a cat' 'a kitten'", "llmkit embed similarity --vectors runs/w2v king queen"),
        ),
        ("odd-one-out", "the word that does not belong", ("llmkit embed odd-one-out --vectors runs/glove breakfast cereal dinner lunch",)),
    ):
        handler = {"similar": cmd_similar, "analogy": cmd_analogy, "similarity": cmd_similarity, "odd-one-out": cmd_odd}[name]
        p = subcommand(cmds, name, help_, ex, handler)
        p.add_argument("words", nargs="*")
        p.add_argument("--vectors", default=None, help="a folder of static vectors (embed train), or a model for texts (required)")
        p.add_argument("--top", type=int, default=10)
        if name == "analogy":
            p.add_argument("--method", default="3cosadd", choices=["3cosadd", "3cosmul"])
        p.add_argument("--json", action="store_true")

    p = subcommand(
        cmds,
        "cluster",
        "group words into categories (KMeans)",
        ("llmkit embed cluster --vectors runs/w2v --words words.txt --k 8 --out clusters.json",),
        cmd_cluster,
    )
    p.add_argument("--vectors", default=None, help="static vectors, or a model (each word embedded as a text) (required)")
    p.add_argument("--words", default=None, help="a file of words (required)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the clusters as JSON")

    p = subcommand(
        cmds,
        "map",
        "a 2-D picture of words (or sentences): PCA or t-SNE, coloured by cluster or category",
        (
            "llmkit embed map --vectors runs/glove --words words.txt --method tsne --out map.png",
            "llmkit embed map --vectors minilm --words sentences.txt --k 3 --out sentences.png",
        ),
        cmd_map,
    )
    p.add_argument("--vectors", default=None, help="static vectors, or a model (required)")
    p.add_argument("--words", default=None, help="a file: one word per line, or word<TAB>category (required)")
    p.add_argument("--method", default="pca", choices=["pca", "tsne"])
    p.add_argument("--k", type=int, default=None, help="colour by this many KMeans clusters (default: the file's categories, else 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="map.png")

    p = subcommand(
        cmds,
        "evaluate",
        "WordSim-353, SimLex-999 (Spearman) and the Google analogies (accuracy)",
        ("llmkit embed evaluate --vectors runs/w2v", "llmkit embed evaluate --vectors runs/glove --json"),
        cmd_evaluate,
    )
    p.add_argument("--vectors", default=None, help="a folder of static vectors (required)")
    p.add_argument("--json", action="store_true")

    p = subcommand(
        cmds,
        "index",
        "cut a source into passages and index their vectors (FAISS)",
        ("llmkit embed index --model minilm --source shakespeare --chunk 4lines --out runs/index",),
        cmd_index,
    )
    source_options(p)
    p.add_argument("--model", default="minilm")
    p.add_argument("--chunk", default="4lines", help="4lines, 200words or paragraph (default: 4lines)")
    p.add_argument("--pooling", default=None, choices=["mean", "cls", "last"])
    p.add_argument("--batch-size", type=int, default=64)
    device_option(p)
    p.add_argument("--out", default="runs/index")

    p = subcommand(
        cmds,
        "search",
        "the passages nearest in meaning to a query",
        ("llmkit embed search --index runs/index 'a ghost demands revenge' --top 5",),
        cmd_search,
    )
    p.add_argument("query", nargs="?", default=None)
    p.add_argument("--index", default="runs/index")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")


def _texts(args, attr: str) -> list[str]:
    items = list(getattr(args, attr) or [])
    if args.file:
        from pathlib import Path

        if not Path(args.file).exists():
            raise LlmkitError(f"no file at {args.file}", "give a text file, one text per line")
        items += [line.strip() for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise LlmkitError("there is nothing to embed", "give texts as arguments or --file FILE")
    return items


def cmd_train(args) -> None:
    from llmkit.embed.static import train

    source = args.source or ["shakespeare"]  # read file by file: a corpus larger than memory streams
    vectors = train(
        source=source,
        method=args.method,
        dim=args.dim,
        window=args.window,
        epochs=args.epochs,
        min_count=args.min_count,
        max_vocab=args.max_vocab,
        sg=args.sg,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        field=args.field,
        log=lambda m: console().print(m, markup=False, highlight=False),
    )
    vectors.meta["source"] = args.source or ["shakespeare"]
    vectors.save(args.out)
    print(f"{args.method}: {len(vectors.words):,} words x {vectors.dim} in {vectors.meta['seconds']:.1f}s -> {args.out}")


def cmd_text(args) -> None:
    import llmkit
    from llmkit.embed.contextual import default_pooling, embed_texts

    texts = _texts(args, "texts")
    model = llmkit.load(args.model, device=args.device)
    pooling = args.pooling or default_pooling(model)
    vecs = embed_texts(
        model, texts, pooling=pooling, normalize=not args.no_normalize, batch_size=args.batch_size, progress=args.file is not None
    )
    if args.out:
        from llmkit import io

        with io.atomic_open(args.out, "wb") as f:
            np.save(f, vecs, allow_pickle=False)
        console().print(f"{len(texts)} vectors of {vecs.shape[1]} -> {args.out}")
    if args.json:
        print(json.dumps({"model": args.model, "pooling": pooling, "dim": int(vecs.shape[1]), "vectors": vecs.tolist()}))
    elif not args.out:
        from llmkit.embed.contextual import cosine_matrix

        sims = cosine_matrix(vecs)
        print(f"{len(texts)} texts, {vecs.shape[1]} dimensions ({pooling} pooling); cosine similarities:")
        for i, t in enumerate(texts):
            print(f"  [{i}] {t[:60]:<60} " + " ".join(f"{s:+.3f}" for s in sims[i]))


def cmd_tokens(args) -> None:
    import llmkit
    from llmkit.embed.contextual import cosine_matrix, word_vectors

    if not args.word:
        raise LlmkitError("`llmkit embed tokens` needs --word", "e.g. --word bank")
    sentences = _texts(args, "sentences")
    model = llmkit.load(args.model, device=args.device)
    pairs = word_vectors(model, sentences, args.word)
    vecs = np.stack([v for _, v in pairs])
    sims = cosine_matrix(vecs)
    if args.png:
        from llmkit.embed.explore import draw_map, draw_similarity, project

        title = f"{args.model}: '{args.word}' in {len(sentences)} sentences"
        if len(sentences) < 3:  # two points on a map say nothing: their similarity, as a matrix
            draw_similarity(sims, sentences, args.png, title=title)
        else:
            draw_map(project(vecs), sentences, args.png, title=title)
        console().print(f"{'similarity' if len(sentences) < 3 else 'map'} -> {args.png}")
    if args.json:
        print(json.dumps({"word": args.word, "sentences": sentences, "cosine": sims.round(6).tolist()}))
        return
    print(f"'{args.word}' in {len(sentences)} sentences; cosine similarity of its vectors:")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s[:60]:<60} " + " ".join(f"{x:+.3f}" for x in sims[i]))


def cmd_similar(args) -> None:
    from llmkit.embed import static_only

    if len(args.words) != 1:
        raise LlmkitError("`llmkit embed similar` takes one word", "e.g. llmkit embed similar --vectors runs/w2v king")
    out = static_only(args.vectors or "", "nearest neighbours").most_similar([args.words[0]], top=args.top)
    _print_pairs(out, args.json)


def cmd_analogy(args) -> None:
    from llmkit.embed import static_only

    if len(args.words) != 3:
        raise LlmkitError("`llmkit embed analogy` takes three words: a b c (a - b + c)", "e.g. king man woman")
    out = static_only(args.vectors or "", "an analogy").analogy(*args.words, method=args.method, top=args.top)
    _print_pairs(out, args.json)


def cmd_similarity(args) -> None:
    from llmkit.embed import vectors_of

    if len(args.words) != 2 or not args.vectors:
        raise LlmkitError("`llmkit embed similarity` takes --vectors and two words or texts", "e.g. --vectors minilm 'a cat' 'a kitten'")
    a, b = vectors_of(args.vectors, args.words)
    score = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(json.dumps({"a": args.words[0], "b": args.words[1], "cosine": score}) if args.json else f"{score:.4f}")


def cmd_odd(args) -> None:
    from llmkit.embed import is_static, load_vectors, vectors_of

    if len(args.words) < 3 or not args.vectors:
        raise LlmkitError("`llmkit embed odd-one-out` takes --vectors and three words or more", "e.g. breakfast cereal dinner lunch")
    if is_static(args.vectors):
        odd = load_vectors(args.vectors).odd_one_out(args.words)
    else:
        vecs = vectors_of(args.vectors, args.words)
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        mean = unit.mean(0)
        odd = args.words[int(np.argmin(unit @ (mean / np.linalg.norm(mean))))]
    print(json.dumps({"odd_one_out": odd}) if args.json else odd)


def _print_pairs(pairs, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"word": w, "score": s} for w, s in pairs]))
        return
    for w, s in pairs:
        print(f"{w:<20} {s:.4f}")


def cmd_cluster(args) -> None:
    from llmkit.embed import is_static, vectors_of
    from llmkit.embed.explore import cluster, read_words

    if not args.vectors or not args.words:
        raise LlmkitError("`llmkit embed cluster` needs --vectors and --words", "e.g. --vectors runs/w2v --words words.txt --k 8")
    words, _ = read_words(args.words, lines=not is_static(args.vectors))
    groups = cluster(vectors_of(args.vectors, words), words, args.k, args.seed)
    if args.out:
        from llmkit import io

        io.write_json(args.out, groups)
    for k, members in groups.items():
        print(f"{k}: {' '.join(members)}")


def cmd_map(args) -> None:
    from llmkit.embed import is_static, vectors_of
    from llmkit.embed.explore import cluster, draw_map, project, read_words

    if not args.vectors or not args.words:
        raise LlmkitError("`llmkit embed map` needs --vectors and --words", "e.g. --vectors runs/glove --words words.txt --out map.png")
    words, categories = read_words(args.words, lines=not is_static(args.vectors))
    vecs = vectors_of(args.vectors, words)
    if categories is None or args.k:
        found = cluster(vecs, words, min(args.k or 5, len(words)), args.seed)
        categories = [next(k for k, members in found.items() if w in members) for w in words]
    draw_map(project(vecs, args.method, args.seed), words, args.out, groups=categories, title=f"{args.vectors} ({args.method})")
    print(f"{len(words)} points -> {args.out}")


def cmd_evaluate(args) -> None:
    from llmkit.embed import static_only

    result = static_only(args.vectors or "", "the word-similarity and analogy evaluation").evaluate()
    if args.json:
        print(json.dumps(result))
        return
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731  (None: no pair or question is covered)
    for name in ("wordsim353", "simlex999"):
        r = result[name]
        print(f"{name:<15} spearman {fmt(r['spearman'])}  pearson {fmt(r['pearson'])}  coverage {r['coverage']:.1%}")
    g = result["google_analogy"]
    print(f"{'google_analogy':<15} accuracy {fmt(g['accuracy'])}  coverage {g['coverage']:.1%}")
    for name, s in g["sections"].items():
        print(f"  {name:<28} {fmt(s['accuracy'])} ({s['n']})")


def cmd_index(args) -> None:
    from llmkit.embed.search import build_index

    build_index(
        args.model,
        args.source or ["shakespeare"],
        args.out,
        chunking=args.chunk,
        pooling=args.pooling,
        batch_size=args.batch_size,
        device=args.device,
        log=lambda m: console().print(m),
    )


def cmd_search(args) -> None:
    from llmkit.embed.search import SearchIndex

    query = args.query if args.query is not None else sys.stdin.read()
    hits = SearchIndex(args.index).search(query, args.top)
    if args.json:
        print_json(hits)
        return
    for h in hits:
        text = h["text"].replace("\n", " / ")
        print(f"{h['score']:.3f}  [{h['source']}]  {text[:150]}")
