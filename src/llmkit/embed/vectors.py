"""A set of word vectors and what people do with them: similarity, nearest neighbours, analogies (3CosAdd, 3CosMul),
the odd one out, and the standard evaluations (WordSim-353 and SimLex-999 by Spearman correlation, the Google analogy
set by accuracy per section), computed as gensim computes them (`evaluate_word_pairs`, `evaluate_word_analogies`:
case-insensitive, the first 300,000 words, the first of the 5 nearest words that is not a question word), batched
in numpy.

On disk (a folder):  vectors.txt (word2vec text format, gensim's KeyedVectors.load_word2vec_format reads it),
                     vectors.npy + vocab.json (words and counts), meta.json (method, corpus hash, dim, window, counts)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmkit import io
from llmkit.errors import LlmkitError


def _unit(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=-1, keepdims=True)
    return m / np.where(norms == 0, 1, norms)


class Vectors:
    def __init__(self, words: list[str], matrix: np.ndarray, *, counts: list[int] | None = None, meta: dict | None = None):
        if np.ndim(matrix) != 2 or len(words) != len(matrix):
            raise LlmkitError(f"{np.shape(matrix)} vectors for {len(words)} words", "give one vector (a row) per word")
        self.words, self.matrix, self.counts, self.meta = list(words), np.asarray(matrix, dtype=np.float32), counts, dict(meta or {})
        self.index = {w: i for i, w in enumerate(self.words)}
        self._unit = None

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    @property
    def unit(self) -> np.ndarray:
        if self._unit is None:
            self._unit = _unit(self.matrix)
        return self._unit

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def id(self, word: str) -> int:
        i = self.index.get(word, self.index.get(word.lower()))
        if i is None:
            close = [w for w in self.words[:20000] if w.startswith(word.lower()[:3])][:5]
            raise LlmkitError(
                f"{word!r} is not in the vocabulary of {len(self.words):,} words",
                "choose another word" + (f" (e.g. {', '.join(close)})" if close else ""),
            )
        return i

    def vector(self, word: str) -> np.ndarray:
        return self.matrix[self.id(word)]

    # --- similarity ------------------------------------------------------------------------------------------
    def similarity(self, a: str, b: str) -> float:
        return float(self.unit[self.id(a)] @ self.unit[self.id(b)])

    def most_similar(self, positive: list[str], negative: list[str] | None = None, top: int = 10) -> list[tuple[str, float]]:
        """Nearest words by cosine to the mean of the positive minus the negative unit vectors (gensim's most_similar);
        the query words are left out."""
        negative = negative or []
        ids = [self.id(w) for w in positive + negative]
        query = _unit(
            self.unit[[self.id(w) for w in positive]].sum(0) - (self.unit[[self.id(w) for w in negative]].sum(0) if negative else 0)
        )
        scores = self.unit @ query
        scores[ids] = -np.inf
        best = np.argsort(-scores)[: min(top, len(self.words) - len(set(ids)))]
        return [(self.words[i], float(scores[i])) for i in best]

    def analogy(self, a: str, b: str, c: str, method: str = "3cosadd", top: int = 5) -> list[tuple[str, float]]:
        """The words nearest to a - b + c (`b` is to `a` as `c` is to ?): king man woman -> queen. 3CosAdd (the cosine
        to the sum of unit vectors), or Levy & Goldberg's 3CosMul (cos(x, a) . cos(x, c) / (cos(x, b) + eps), cosines
        shifted to [0, 1]); the three words are left out."""
        if method == "3cosadd":
            return self.most_similar([a, c], [b], top)
        if method != "3cosmul":
            raise LlmkitError(f"unknown analogy method {method!r}", "use 3cosadd or 3cosmul")
        sims = [(self.unit @ self.unit[self.id(w)] + 1) / 2 for w in (a, b, c)]
        scores = sims[0] * sims[2] / (sims[1] + 1e-6)
        ids = [self.id(w) for w in (a, b, c)]
        scores[ids] = -np.inf
        best = np.argsort(-scores)[: min(top, len(self.words) - len(set(ids)))]
        return [(self.words[i], float(scores[i])) for i in best]

    def odd_one_out(self, words: list[str]) -> str:
        """The word farthest from the others' mean direction (gensim's doesnt_match)."""
        if len(words) < 3:
            raise LlmkitError("the odd one out needs three words or more", "give at least three words")
        unit = self.unit[[self.id(w) for w in words]]
        mean = _unit(unit.mean(0))
        return words[int(np.argmin(unit @ mean))]

    # --- evaluation, as gensim does it --------------------------------------------------------------------------
    def _upper_index(self, restrict: int) -> dict[str, int]:
        """Upper-cased word -> its first (most frequent) index, as gensim's case-insensitive evaluations build it."""
        out = {}
        for i, w in enumerate(self.words[:restrict]):
            out.setdefault(w.upper(), i)
        return out

    def evaluate_pairs(self, path: str | Path, restrict: int = 300000) -> dict:
        """Spearman and Pearson correlation of cosine similarity with human judgements, and the share of pairs covered
        (null correlations when fewer than two pairs are)."""
        from scipy import stats

        ok = self._upper_index(restrict)
        gold, model, oov = [], [], 0
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("#"):
                continue
            parts = line.upper().split("\t")
            if len(parts) != 3:  # gensim skips lines that are not exactly word, word, score
                continue
            a, b, sim = parts
            try:
                score = float(sim)
            except ValueError:
                continue
            if a not in ok or b not in ok:
                oov += 1
                continue
            gold.append(score)
            model.append(float(self.unit[ok[a]] @ self.unit[ok[b]]))
        coverage = len(gold) / max(len(gold) + oov, 1)
        if len(gold) < 2:
            return {"spearman": None, "pearson": None, "coverage": coverage}
        return {"spearman": float(stats.spearmanr(gold, model)[0]), "pearson": float(stats.pearsonr(gold, model)[0]), "coverage": coverage}

    def evaluate_analogies(self, path: str | Path, restrict: int = 300000, batch: int = 512) -> dict:
        """Accuracy (3CosAdd) per section and in total, and the share of questions covered, as gensim's
        evaluate_word_analogies decides it: among the 5 nearest words to b - a + c (the three question words' own
        entries left out), the first whose upper-cased form is neither a, b nor c is the answer; questions with a
        word outside the first `restrict` words are skipped. Every section is listed (accuracy null when empty)."""
        ok = self._upper_index(restrict)
        unit = self.unit[:restrict]
        upper = [w.upper() for w in self.words[:restrict]]
        sections, total = [], 0
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith(": "):
                sections.append({"name": line[2:].strip(), "questions": []})
                continue
            parts = line.upper().split()
            if len(parts) != 4 or not sections:
                continue
            total += 1
            if all(p in ok for p in parts):
                sections[-1]["questions"].append(parts)
        out, correct_all, n_all = {}, 0, 0
        for s in sections:
            questions = s["questions"]
            correct = 0
            for start in range(0, len(questions), batch):
                chunk = questions[start : start + batch]
                a, b, c = (np.array([ok[q[k]] for q in chunk]) for k in range(3))
                scores = (unit[b] + unit[c] - unit[a]) @ unit.T  # (n, V); scaling does not move the order
                rows = np.arange(len(chunk))
                scores[rows, a] = scores[rows, b] = scores[rows, c] = -np.inf
                top = np.argpartition(-scores, min(5, scores.shape[1] - 1), axis=1)[:, :5]
                top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
                for q, candidates in zip(chunk, top):
                    predicted = None
                    for i in candidates:
                        predicted = upper[i]
                        if predicted not in q[:3]:
                            break
                    correct += predicted == q[3]
            out[s["name"]] = {"accuracy": correct / len(questions) if questions else None, "correct": correct, "n": len(questions)}
            correct_all += correct
            n_all += len(questions)
        return {"accuracy": correct_all / n_all if n_all else None, "coverage": n_all / max(total, 1), "sections": out}

    def evaluate(self) -> dict:
        """WordSim-353, SimLex-999 and the Google analogies, read from the copies inside gensim's wheel."""
        data = benchmark_dir()
        return {
            "wordsim353": self.evaluate_pairs(data / "wordsim353.tsv"),
            "simlex999": self.evaluate_pairs(data / "simlex999.txt"),
            "google_analogy": self.evaluate_analogies(data / "questions-words.txt"),
        }

    # --- files -------------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)  # written last: until then the folder is not a set of vectors
        fmt = " ".join(["%.6f"] * self.dim)
        lines = [f"{len(self.words)} {self.dim}"] + [f"{w} {fmt % tuple(row)}" for w, row in zip(self.words, self.matrix.tolist())]
        io.write_text(directory / "vectors.txt", "\n".join(lines) + "\n")
        with io.atomic_open(directory / "vectors.npy", "wb") as f:
            np.save(f, self.matrix, allow_pickle=False)
        io.write_json(directory / "vocab.json", {"words": self.words, "counts": self.counts})
        io.write_json(directory / "meta.json", {"vocab_size": len(self.words), "dim": self.dim, **self.meta})
        return directory


def read_text_vectors(path: str | Path) -> Vectors:
    """Word vectors in text: one `word x1 x2 ...` per line, after word2vec's `count dim` header or without it (GloVe)."""
    path = Path(path)
    words, rows, dim = [], [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])
                continue
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise LlmkitError(
                    f"{path}:{n} has {len(parts) - 1} numbers after its word, not {dim}",
                    "every vector needs the same dimension: fix or drop that line",
                )
            try:
                rows.append(np.array(parts[1:], dtype=np.float32))
            except ValueError:
                raise LlmkitError(f"{path}:{n} holds something that is not a number", "give `word x1 x2 ...` lines") from None
            words.append(parts[0])
    if not words:
        raise LlmkitError(f"{path} holds no word vector", "give `word x1 x2 ...` lines (word2vec or GloVe text format)")
    return Vectors(words, np.stack(rows), meta={"source": str(path)})


def benchmark_dir() -> Path:
    """gensim/test/test_data: WordSim-353, SimLex-999 and questions-words.txt ship inside gensim's wheel."""
    import gensim

    path = Path(os.path.dirname(gensim.__file__)) / "test" / "test_data"
    if not (path / "questions-words.txt").exists():
        raise LlmkitError(f"gensim's test data is missing at {path}", "pip install --force-reinstall gensim")
    return path
