"""Embeddings: our vectors load in gensim, our evaluation equals gensim's, GloVe learns (its co-occurrence counts are
the brute-force ones, its loss falls, planted topics come apart), analogies and the odd one out work on hand-made
vectors, MiniLM sentence vectors equal sentence-transformers, and FAISS search returns the brute-force top-k."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from llmkit.embed import static
from llmkit.embed.vectors import Vectors, benchmark_dir
from llmkit.errors import LlmkitError

from conftest import run_cli

TOPICS = (
    "ship sail sea wave harbour captain anchor mast tide storm".split(),
    "bread oven flour baker dough yeast crust loaf butter salt".split(),
)


def _planted(lines: int = 1500, seed: int = 0, stray: float = 0.1) -> str:
    """Lines of 8 words, each line about one topic: a word from the other topic strays in with probability `stray`
    (so the counts say how rarely the topics meet, not only that they never do)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        t = rng.randrange(2)
        out.append(" ".join(rng.choice(TOPICS[1 - t] if rng.random() < stray else TOPICS[t]) for _ in range(8)))
    return "\n".join(out)


def _topic_gap(vectors: Vectors) -> float:
    """Mean cosine within a topic minus mean cosine across the topics."""
    within, across = [], []
    for t, words in enumerate(TOPICS):
        for i, a in enumerate(words):
            within += [vectors.similarity(a, b) for b in words[i + 1 :]]
            across += [vectors.similarity(a, b) for b in TOPICS[1 - t]]
    return float(np.mean(within) - np.mean(across))


# --- GloVe ---------------------------------------------------------------------------------------------------------


def test_glove_cooccurrence_equals_a_brute_force_count():
    text = "the cat sat on the mat\nthe dog sat on the log with the cat\na cat and a dog\nmat"
    lines = static.sentences([text])
    vocab = static.build_vocab(lines, min_count=1)
    index = vocab.index
    for window in (1, 3, 10):
        brute = np.zeros((len(vocab.words),) * 2)
        for line in lines:
            for p, w in enumerate(line):
                for d in range(1, window + 1):
                    if p + d < len(line):
                        brute[index[w], index[line[p + d]]] += 1 / d
                        brute[index[line[p + d]], index[w]] += 1 / d
        for chunk in (2, 1_000_000):  # chunks of 2 words add up to the same matrix
            assert np.allclose(static.cooccurrence(lines, vocab, window, chunk_tokens=chunk).toarray(), brute)
    # out-of-vocabulary words are dropped before the window is counted, as the reference does
    small = static.build_vocab(lines, min_count=3)  # the, cat, sat, on ... seen 3+ times
    X = static.cooccurrence([["the", "zebra", "cat"]], small, 1).toarray()
    assert X[small.index["the"], small.index["cat"]] == 1.0


def test_glove_loss_falls_and_planted_topics_come_apart():
    lines = static.sentences([_planted()])
    vocab = static.build_vocab(lines, min_count=1)
    X = static.cooccurrence(lines, vocab, 5)
    matrix, losses = static.glove(X, 16, epochs=15, x_max=10, seed=0)
    assert losses[-1] < 0.5 * losses[0] and all(np.isfinite(losses))
    vectors = Vectors(vocab.words, matrix)
    assert _topic_gap(vectors) > 0.3, _topic_gap(vectors)
    once, again = (static.glove(X, 16, epochs=2, x_max=10, seed=0, threads=1)[0] for _ in range(2))
    assert once.tolist() == again.tolist()  # one worker thread: deterministic in the seed


def _glove_c(X, dim, epochs, x_max, seed, alpha=0.75, eta=0.05):
    """glove.c's training loop, one entry at a time in plain Python (its `glove_thread`), started from the same
    initial parameters and order as `static.glove` draws them."""
    import torch

    coo = X.tocoo()
    V = X.shape[0]
    g = torch.Generator().manual_seed(seed)
    W = ((torch.rand(2 * V, dim + 1, generator=g) - 0.5) / dim).double().numpy()
    order = torch.randperm(coo.nnz, generator=g).numpy()
    gradsq = np.ones_like(W)
    for _ in range(epochs):
        for e in order:
            l1, l2, val = coo.row[e], coo.col[e] + V, coo.data[e]
            diff = W[l1, :dim] @ W[l2, :dim] + W[l1, dim] + W[l2, dim] - np.log(val)
            fdiff = diff if val > x_max else (val / x_max) ** alpha * diff
            temp1 = np.clip(fdiff * W[l2, :dim], -100, 100) * eta
            temp2 = np.clip(fdiff * W[l1, :dim], -100, 100) * eta
            W[l1, :dim] -= temp1 / np.sqrt(gradsq[l1, :dim])
            W[l2, :dim] -= temp2 / np.sqrt(gradsq[l2, :dim])
            gradsq[l1, :dim] += temp1 * temp1
            gradsq[l2, :dim] += temp2 * temp2
            W[l1, dim] -= fdiff / np.sqrt(gradsq[l1, dim])
            W[l2, dim] -= fdiff / np.sqrt(gradsq[l2, dim])
            gradsq[l1, dim] += fdiff * fdiff
            gradsq[l2, dim] += fdiff * fdiff
    return W[:V, :dim] + W[V:, :dim]


def test_glove_one_entry_at_a_time_is_the_reference_update_rule():
    lines = static.sentences([_planted(60, seed=3)])
    vocab = static.build_vocab(lines, min_count=1)
    X = static.cooccurrence(lines, vocab, 3)
    ours, _ = static.glove(X, 6, epochs=3, x_max=5, seed=4, batch_size=1, threads=1)
    assert np.allclose(ours, _glove_c(X, 6, 3, 5, seed=4), rtol=1e-4, atol=1e-5)
    # minibatches sized by glove_batch_size (the busiest row takes a few steps at once) end where the reference does
    _, one_by_one = static.glove(X, 6, epochs=30, x_max=5, seed=4, batch_size=1, threads=1)
    _, batched = static.glove(X, 6, epochs=30, x_max=5, seed=4, threads=2)
    assert static.glove_batch_size(X) < X.nnz and batched[-1] == pytest.approx(one_by_one[-1], rel=0.1), (batched[-1], one_by_one[-1])


# --- training, files, gensim ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["word2vec", "glove"])
def test_train_command_writes_vectors_gensim_loads(tmp_path, method):
    from gensim.models import KeyedVectors

    (tmp_path / "corpus.txt").write_text(_planted(800, seed=1, stray=0.03))
    out = tmp_path / method
    args = [
        "embed",
        "train",
        "--method",
        method,
        "--dim",
        "50",
        "--source",
        str(tmp_path / "corpus.txt"),
        "--out",
        str(out),
        "--min-count",
        "2",
    ]
    run_cli(*args, *(["--sg", "--epochs", "10"] if method == "word2vec" else ["--window", "5", "--epochs", "20"]))
    ours = static.load_static(out)
    theirs = KeyedVectors.load_word2vec_format(str(out / "vectors.txt"), binary=False)
    assert theirs.index_to_key == ours.words and np.allclose(theirs.vectors, ours.matrix, atol=1e-6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == method and meta["dim"] == 50 and meta["vocab_size"] == 20 and len(meta["corpus_sha256"]) == 64
    assert meta["window"] == (5 if method == "glove" else 5) and meta["tokens"] == 6400
    assert _topic_gap(ours) > 0.2, (method, _topic_gap(ours))
    similar = json.loads(run_cli("embed", "similar", "--vectors", str(out), "ship", "--top", "5", "--json").stdout)
    assert len(similar) == 5 and sum(s["word"] in TOPICS[0] for s in similar) >= 4


def test_train_rejects_what_it_cannot_learn_from(tmp_path):
    (tmp_path / "tiny.txt").write_text("one two three\n")
    out = run_cli("embed", "train", "--source", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "v"), check=False)
    assert out.returncode == 1 and "no word occurs 5 times or more" in out.stderr and "--min-count" in out.stderr
    with pytest.raises(LlmkitError, match="dimension 1 is out of range"):
        static.train(["a b c"] * 10, dim=1)
    with pytest.raises(LlmkitError, match="no word co-occurs"):
        static.glove(static.cooccurrence([["a"], ["b"]], static.build_vocab([["a"], ["b"]], 1), 5), 8)


# --- what people do with vectors -------------------------------------------------------------------------------------


def _hand_made() -> Vectors:
    """Axes: royalty, maleness, femaleness, food, person."""
    words = {
        "king": [1, 1, 0, 0, 1],
        "queen": [1, 0, 1, 0, 1],
        "man": [0, 1, 0, 0.1, 1],
        "woman": [0, 0, 1, 0.1, 1],
        "prince": [0.8, 0.9, 0, 0, 1],
        "breakfast": [0, 0, 0, 1, 0],
        "lunch": [0.05, 0, 0, 1, 0],
        "dinner": [0, 0.05, 0, 1, 0],
        "cereal": [0.3, 0.3, 0.3, 0.4, 0],
    }
    return Vectors(list(words), np.array(list(words.values()), dtype=np.float32))


def test_analogy_and_odd_one_out_on_hand_made_vectors_equal_gensim():
    from gensim.models import KeyedVectors

    v = _hand_made()
    assert v.analogy("king", "man", "woman")[0][0] == "queen"
    assert v.analogy("king", "man", "woman", method="3cosmul")[0][0] == "queen"
    assert v.odd_one_out(["breakfast", "cereal", "dinner", "lunch"]) == "cereal"
    kv = KeyedVectors(5)
    kv.add_vectors(v.words, v.matrix)
    for (w, s), (gw, gs) in zip(v.most_similar(["king", "woman"], ["man"], top=4), kv.most_similar(["king", "woman"], ["man"], topn=4)):
        assert w == gw and s == pytest.approx(gs, abs=1e-5)
    for (w, s), (gw, gs) in zip(
        v.analogy("king", "man", "woman", method="3cosmul", top=4), kv.most_similar_cosmul(["king", "woman"], ["man"], topn=4)
    ):
        assert w == gw and s == pytest.approx(gs, abs=1e-4)
    assert kv.doesnt_match(["breakfast", "cereal", "dinner", "lunch"]) == "cereal"
    with pytest.raises(LlmkitError, match="'kingdom' is not in the vocabulary"):
        v.analogy("kingdom", "man", "woman")
    with pytest.raises(LlmkitError, match="three words or more"):
        v.odd_one_out(["king", "queen"])


def test_evaluation_equals_gensim_on_the_same_vectors():
    """WordSim-353, SimLex-999 and the Google analogies, on vectors planted so that some analogies hold."""
    from gensim.models import KeyedVectors

    data = benchmark_dir()
    words: list[str] = []
    for name in ("wordsim353.tsv", "simlex999.txt"):
        for line in (data / name).read_text().splitlines():
            if not line.startswith("#"):
                words += line.split("\t")[:2]
    sections = {}
    for line in (data / "questions-words.txt").read_text().splitlines():
        if line.startswith(": "):
            section = line[2:]
        elif section in ("family", "gram8-plural", "capital-common-countries"):
            sections.setdefault(section, []).append(line.split())
            words += line.split()
    rng = np.random.default_rng(0)
    words = list(dict.fromkeys(w.lower() for w in words))
    rng.shuffle(words)
    words = words[: int(len(words) * 0.8)]  # some words out of the vocabulary: coverage < 1
    vec = {w: rng.normal(size=24) for w in words}
    offset = rng.normal(size=24) * 2
    for a, b, _, _ in sections["gram8-plural"]:  # plural = singular + one offset: these analogies hold
        if a.lower() in vec and b.lower() in vec:
            vec[b.lower()] = vec[a.lower()] + offset + rng.normal(size=24) * 0.1
    v = Vectors(list(vec), np.array(list(vec.values())))
    kv = KeyedVectors(24)
    kv.add_vectors(v.words, v.matrix.astype(np.float32))
    ours = v.evaluate()
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        pearson, spearman, oov = kv.evaluate_word_pairs(str(data / file))
        assert ours[name]["spearman"] == pytest.approx(spearman.statistic, abs=1e-6)
        assert ours[name]["pearson"] == pytest.approx(pearson.statistic, abs=1e-6)
        assert ours[name]["coverage"] == pytest.approx(1 - oov / 100, abs=1e-9) and 0.4 < ours[name]["coverage"] < 1
    score, theirs = kv.evaluate_word_analogies(str(data / "questions-words.txt"))
    g = ours["google_analogy"]
    assert g["accuracy"] == pytest.approx(score) and g["accuracy"] > 0.05
    for s in theirs[:-1]:
        n = len(s["correct"]) + len(s["incorrect"])
        if n:
            assert g["sections"][s["section"]]["correct"] == len(s["correct"]) and g["sections"][s["section"]]["n"] == n
    assert g["sections"]["gram8-plural"]["accuracy"] > 0.5
    total = sum(1 for line in (data / "questions-words.txt").read_text().splitlines() if not line.startswith(":"))
    assert g["coverage"] == pytest.approx(sum(s["n"] for s in g["sections"].values()) / total)
    assert [s["section"] for s in theirs[:-1]] == list(g["sections"])  # every section, covered or not
    # vectors from elsewhere: mixed case ("Paris", "PARIS" and "paris" all present) and a restricted vocabulary
    mixed_words = [w.capitalize() if i % 5 == 0 else w for i, w in enumerate(v.words)]
    extra = [w.upper() for w in v.words[:300]]
    mixed = Vectors(mixed_words + extra, np.concatenate([v.matrix, v.matrix[:300] + rng.normal(size=(300, 24)).astype(np.float32)]))
    kv = KeyedVectors(24)
    kv.add_vectors(mixed.words, mixed.matrix)
    restrict = int(len(mixed.words) * 0.7)
    score, theirs = kv.evaluate_word_analogies(str(data / "questions-words.txt"), restrict_vocab=restrict)
    ours = mixed.evaluate_analogies(data / "questions-words.txt", restrict=restrict)
    assert ours["accuracy"] == pytest.approx(score)
    assert [s["correct"] for s in ours["sections"].values()] == [len(s["correct"]) for s in theirs[:-1]]
    pearson, spearman, oov = kv.evaluate_word_pairs(str(data / "wordsim353.tsv"), restrict_vocab=restrict)
    pairs = mixed.evaluate_pairs(data / "wordsim353.tsv", restrict=restrict)
    assert pairs["spearman"] == pytest.approx(spearman.statistic, abs=1e-6) and pairs["coverage"] == pytest.approx(1 - oov / 100)


def test_embed_commands_on_static_vectors(tmp_path):
    _hand_made().save(tmp_path / "v")
    (tmp_path / "words.txt").write_text(
        "king\tpeople\nqueen\tpeople\nman\tpeople\nwoman\tpeople\nbreakfast\tmeals\nlunch\tmeals\ndinner\tmeals\n"
    )
    out = json.loads(run_cli("embed", "analogy", "--vectors", str(tmp_path / "v"), "king", "man", "woman", "--json").stdout)
    assert out[0]["word"] == "queen"
    assert (
        run_cli("embed", "odd-one-out", "--vectors", str(tmp_path / "v"), "breakfast", "cereal", "dinner", "lunch").stdout.strip()
        == "cereal"
    )
    cos = json.loads(run_cli("embed", "similarity", "--vectors", str(tmp_path / "v"), "king", "prince", "--json").stdout)["cosine"]
    assert cos == pytest.approx(_hand_made().similarity("king", "prince"), abs=1e-6)
    run_cli(
        "embed",
        "cluster",
        "--vectors",
        str(tmp_path / "v"),
        "--words",
        str(tmp_path / "words.txt"),
        "--k",
        "2",
        "--out",
        str(tmp_path / "c.json"),
    )
    groups = sorted(sorted(g) for g in json.loads((tmp_path / "c.json").read_text()).values())
    assert groups == [["breakfast", "dinner", "lunch"], ["king", "man", "queen", "woman"]]
    for method in ("pca", "tsne"):
        run_cli(
            "embed",
            "map",
            "--vectors",
            str(tmp_path / "v"),
            "--words",
            str(tmp_path / "words.txt"),
            "--method",
            method,
            "--out",
            str(tmp_path / f"{method}.png"),
        )
        assert (tmp_path / f"{method}.png").read_bytes()[:4] == b"\x89PNG"
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # noqa: E731
    scores = strict(run_cli("embed", "evaluate", "--vectors", str(tmp_path / "v"), "--json").stdout)
    assert set(scores) == {"wordsim353", "simlex999", "google_analogy"} and scores["google_analogy"]["accuracy"] is not None
    assert set(scores["wordsim353"]) == {"spearman", "pearson", "coverage"} and len(scores["google_analogy"]["sections"]) == 14
    everything = strict(run_cli("embed", "similar", "--vectors", str(tmp_path / "v"), "king", "--top", "50", "--json").stdout)
    assert len(everything) == 8 and "king" not in [e["word"] for e in everything]
    (tmp_path / "two.txt").write_text("king\nqueen\n")
    bad = run_cli("embed", "map", "--vectors", str(tmp_path / "v"), "--words", str(tmp_path / "two.txt"), "--method", "tsne", check=False)
    assert bad.returncode == 1 and "t-SNE needs 3 points or more" in bad.stderr
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for args, message in (
        (["similar", "--vectors", str(tmp_path / "v"), "kingdom"], "'kingdom' is not in the vocabulary"),
        (["cluster", "--vectors", str(tmp_path / "v"), "--words", str(tmp_path / "empty.txt")], "holds no word"),
        (["analogy", "--vectors", str(tmp_path / "nowhere"), "a", "b", "c"], "needs static word vectors"),
    ):
        bad = run_cli("embed", *args, check=False)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr


def test_word2vec_text_files_from_elsewhere_load_and_mismatched_rows_are_named(tmp_path):
    from llmkit.embed import load_vectors

    (tmp_path / "glove.6B.txt").write_text("king 1 1 0\nqueen 1 0 1\nman 0 1 0\nwoman 0 0 1\n")  # GloVe's own layout: no header
    v = load_vectors(str(tmp_path / "glove.6B.txt"))
    assert v.words == ["king", "queen", "man", "woman"] and v.dim == 3 and v.analogy("king", "man", "woman")[0][0] == "queen"
    (tmp_path / "bad.txt").write_text("2 3\nking 1 1 0\nqueen 1 0\n")
    with pytest.raises(LlmkitError, match="bad.txt:3 has 2 numbers after its word, not 3"):
        load_vectors(str(tmp_path / "bad.txt"))


# --- contextual embeddings and search ------------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "Someone eats a meal.",
    "The new movie is awesome!",
    "Shall I compare thee to a summer's day?",
    "Ein Mann isst Essen.",
    "🤗 emoji and numbers 12345",
    "A much longer sentence that goes on and on about nothing in particular, so that the batch has rows of very different lengths to pad.",
    " ".join(["Now is the winter of our discontent made glorious summer by this sun of York."] * 30),
]  # > 256 tokens: cut there


@pytest.mark.slow
def test_minilm_sentence_vectors_equal_sentence_transformers_batched_and_alone():
    import torch
    from sentence_transformers import SentenceTransformer

    import llmkit
    from llmkit.embed.contextual import embed_texts
    from llmkit.embedded import embedded_path

    model = llmkit.load("minilm")
    theirs = SentenceTransformer(str(embedded_path("minilm")), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    for batch_size in (32, 3, 1):
        ours = embed_texts(model, SENTENCES, batch_size=batch_size)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ours), torch.from_numpy(theirs), dim=-1)
        assert cos.min().item() >= 0.9999, (batch_size, cos)
    one = np.stack([embed_texts(model, [s])[0] for s in SENTENCES])
    assert np.abs(one - embed_texts(model, SENTENCES)).max() < 1e-5
    # the same word in two contexts: "bank" by a river differs from "bank" with money
    from llmkit.embed.contextual import cosine_matrix, word_vectors

    banks = [
        "I sat by the river bank",
        "The boat drifted to the muddy bank of the stream",
        "I paid the cheque in at the bank",
        "The bank raised its interest rates",
    ]
    sims = cosine_matrix(np.stack([v for _, v in word_vectors(model, banks, "bank")]))
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3]) and sims[2, 3] > max(sims[2, 0], sims[2, 1])
    # a decoder's last-token pooling: batched rows (right-padded) equal each text alone
    smol = llmkit.load("smollm2")
    together = embed_texts(smol, SENTENCES[:7], batch_size=7)
    alone = np.stack([embed_texts(smol, [s])[0] for s in SENTENCES[:7]])
    assert np.abs(together - alone).max() < 1e-4
    with pytest.raises(LlmkitError, match="use --pooling last"):
        embed_texts(smol, ["hello"], pooling="cls")


@pytest.mark.slow
def test_embed_text_and_tokens_commands(tmp_path):
    out = json.loads(
        run_cli("embed", "text", "--model", "minilm", "A man is eating food.", "Someone eats a meal.", "The sky is blue.", "--json").stdout
    )
    assert out["model"] == "minilm" and out["pooling"] == "mean" and out["dim"] == 384 and len(out["vectors"]) == 3
    v = np.array(out["vectors"])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5) and v[0] @ v[1] > v[0] @ v[2]
    (tmp_path / "s.txt").write_text("A man is eating food.\n\nSomeone eats a meal.\n")
    run_cli("embed", "text", "--model", "smollm2", "--pooling", "last", "--file", str(tmp_path / "s.txt"), "--out", str(tmp_path / "v.npy"))
    assert np.load(tmp_path / "v.npy").shape == (2, 576)
    bad = run_cli("embed", "text", "--model", "smollm2", "--pooling", "cls", "hello", check=False)
    assert bad.returncode == 1 and "use --pooling last" in bad.stderr
    proc = run_cli(
        "embed", "tokens", "--model", "minilm", "I sat by the river bank", "I paid at the bank", "--word", "bank", "--png",
        str(tmp_path / "bank.png"), "--json",
    )  # fmt: skip
    tokens = json.loads(proc.stdout)
    assert tokens["cosine"][0][0] == pytest.approx(1.0, abs=1e-5) and tokens["cosine"][0][1] < 0.95
    assert (tmp_path / "bank.png").read_bytes()[:4] == b"\x89PNG" and "similarity -> " in proc.stderr  # two points: a matrix
    bad = run_cli("embed", "tokens", "--model", "minilm", "I sat by the river", "--word", "bank", check=False)
    assert bad.returncode == 1 and "not in the sentence" in bad.stderr


@pytest.mark.slow
def test_faiss_search_returns_the_brute_force_top_k_and_rebuilds_incrementally(tmp_path):
    from llmkit.embed.contextual import embed_texts
    from llmkit.embed.search import SearchIndex, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sea.txt").write_text(
        "\n".join(f"The ship {w} on the grey sea at dawn." for w in "sailed drifted sank waited turned rolled".split())
    )
    (docs / "bread.txt").write_text(
        "\n".join(f"The baker {w} the bread in the warm oven." for w in "baked burnt sliced sold kneaded cooled".split())
    )
    (docs / "ghost.txt").write_text(
        "The ghost of my father demands revenge.\nA spirit walks the castle walls at night.\nRemember me, the phantom cried.\n"
    )
    meta = build_index("minilm", str(docs), tmp_path / "index", chunking="1lines", log=lambda m: None)
    assert meta["passages"] == 15 and meta["embedded"] == 15 and meta["index"] == "IndexFlatIP"
    index = SearchIndex(tmp_path / "index")
    vectors = np.load(tmp_path / "index" / "vectors.npy")
    for query in ("a ghost demands revenge", "loaves from the oven", "a boat at sea"):
        hits = index.search(query, top=4)
        q = embed_texts(index.model, [query])[0]
        brute = np.argsort(-(vectors @ q))[:4]
        assert [h["text"] for h in hits] == [index.rows[i]["text"] for i in brute]
        assert [h["score"] for h in hits] == pytest.approx((vectors @ q)[brute].tolist(), abs=1e-5)
    assert index.search("a ghost demands revenge", top=1)[0]["source"].endswith("ghost.txt")
    (docs / "ghost.txt").write_text("The ghost of my father demands revenge.\n")
    again = build_index("minilm", str(docs), tmp_path / "index", chunking="1lines", log=lambda m: None)
    assert again["passages"] == 13 and again["embedded"] == 1 and again["reused"] == 12
    # a renamed file and a copy of another keep their vectors under their own names; nothing doubles on rebuilds
    (docs / "bread.txt").rename(docs / "bakery.txt")
    (docs / "copy.txt").write_text((docs / "sea.txt").read_text())
    for _ in range(2):
        again = build_index("minilm", str(docs), tmp_path / "index", chunking="1lines", log=lambda m: None)
        assert again["passages"] == 19 and again["embedded"] == 0 and again["reused"] == 19
    rows = SearchIndex(tmp_path / "index").rows
    assert {r["source"].rsplit("/", 1)[-1] for r in rows} == {"sea.txt", "bakery.txt", "ghost.txt", "copy.txt"}
    # other settings embed afresh
    assert build_index("minilm", str(docs), tmp_path / "index", chunking="1lines", pooling="cls", log=lambda m: None)["embedded"] == 19
    out = run_cli("embed", "search", "--index", str(tmp_path / "index"), "a ghost demands revenge", "--top", "2", "--json")
    assert json.loads(out.stdout)[0]["text"] == "The ghost of my father demands revenge."


def test_ivf_index_for_large_collections_finds_nearly_all_true_neighbours():
    """IVF (here from 20,000 vectors; by default from 200,000, below which exact search stays fast) finds >= 90% of the
    true top 5 on clustered vectors; below the threshold the index is exact."""
    from llmkit.embed.search import IVF_FROM, _faiss_index

    n = 20_000
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(300, 32))  # texts' vectors gather by topic: points around centres, not uniform noise
    vectors = (centres[rng.integers(0, 300, n)] + rng.normal(size=(n, 32)) * 0.5).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert type(_faiss_index(vectors)).__name__ == "IndexFlatIP" and IVF_FROM > n
    index = _faiss_index(vectors, ivf_from=n)
    assert type(index).__name__ == "IndexIVFFlat"
    queries = vectors[:50] + rng.normal(size=(50, 32)).astype(np.float32) * 0.1
    _, found = index.search(queries, 5)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)])
    assert recall >= 0.9, recall
    small = _faiss_index(vectors[:100])
    _, exact = small.search(queries[:10], 5)
    assert (exact == np.argsort(-(queries[:10] @ vectors[:100].T), axis=1)[:, :5]).all()


def test_a_passage_holding_line_separators_survives_the_index_and_its_rebuild(tmp_path):
    """passages.jsonl is JSON Lines: rows end at \\n only. A passage with U+2028 or U+0085 (which str.splitlines() cuts)
    is read back whole by the search and by the rebuild that reuses its vector."""
    from llmkit import io
    from llmkit.embed.search import SearchIndex, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    odd = "The ghost\u2028walks the walls\u0085at night; remember me."
    (docs / "odd.txt").write_text(f"{odd}\n\nThe baker bakes the bread.\n", encoding="utf-8", newline="")
    assert build_index("minilm", str(docs), tmp_path / "index", chunking="paragraph", log=lambda m: None)["passages"] == 2
    with open(tmp_path / "index" / "passages.jsonl", encoding="utf-8", newline="") as f:
        raw = f.read()
    assert "\u2028" in raw and raw.count("\n") == 2  # written as is, one row per \n
    index = SearchIndex(tmp_path / "index")
    assert index.search("a ghost at night", top=1)[0]["text"] == odd
    again = build_index("minilm", str(docs), tmp_path / "index", chunking="paragraph", log=lambda m: None)
    assert again["reused"] == 2 and again["embedded"] == 0
    assert [r["text"] for r in io.read_jsonl(tmp_path / "index" / "passages.jsonl")][0] == odd
    with pytest.raises(LlmkitError, match=r"passages.jsonl:2 is not valid JSON"):
        (tmp_path / "index" / "passages.jsonl").write_text(raw.replace("\n", "\n{broken\n", 1), encoding="utf-8")
        io.read_jsonl(tmp_path / "index" / "passages.jsonl")
