"""Human evaluation: ratings of models from pairwise votes (the chatbot arena's statistics) and A/B tests.

A battle is (model_a, model_b, winner) with winner "a", "b", "tie" or "both_bad" (a tie of two bad answers).

    online Elo       each vote moves both ratings by K (expected - actual), K = 4, scale 400, base 10, start 1000,
                     in the order the votes came (as the LMSYS arena publishes it; order-dependent by design)
    Bradley-Terry    P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)), the ratings R that maximize the likelihood of
                     every vote (a tie counts as half a win for each side), centered at 1000; order-free. It is a
                     logistic regression without intercept on +-log(10) indicator features (scikit-learn gives the
                     same numbers); a tiny L2 term (C = 1e6) keeps a model that never lost finite
    intervals        95% bootstrap percentiles: the battles resampled with replacement N times (seeded), refitted
    A/B test         the win rate of A against B with its Wilson interval, the two-sided exact binomial (sign) test
                     against 1/2, and how many more votes would detect the observed rate at 80% power
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from llmkit.errors import LlmkitError

WINNERS = ("a", "b", "tie", "both_bad")
PROVISIONAL_GAMES = 10  # below this many games a model's rating is marked provisional (maximum likelihood is extreme)


def _score(winner: str) -> float:
    """A's result: 1 win, 0 loss, 1/2 a tie (both_bad included)."""
    if winner not in WINNERS:
        raise LlmkitError(f"unknown winner {winner!r}", f"use one of: {', '.join(WINNERS)}")
    return {"a": 1.0, "b": 0.0}.get(winner, 0.5)


def online_elo(
    battles: Iterable[tuple[str, str, str]], k: float = 4.0, scale: float = 400.0, base: float = 10.0, init: float = 1000.0
) -> dict[str, float]:
    """The arena's online Elo, the votes applied in order."""
    rating: dict[str, float] = defaultdict(lambda: init)
    for a, b, winner in battles:
        ra, rb = rating[a], rating[b]
        expected_a = 1 / (1 + base ** ((rb - ra) / scale))
        s = _score(winner)
        rating[a] = ra + k * (s - expected_a)
        rating[b] = rb + k * ((1 - s) - (1 - expected_a))
    return dict(rating)


def _design(battles: list[tuple[str, str, str]], models: list[str], base: float):
    """Logistic-regression rows: each battle once as an A win with weight s and once as an A loss with weight 1 - s."""
    index = {m: i for i, m in enumerate(models)}
    X = np.zeros((len(battles), len(models)))
    for r, (a, b, _) in enumerate(battles):
        X[r, index[a]] += math.log(base)
        X[r, index[b]] -= math.log(base)
    s = np.array([_score(w) for _, _, w in battles])
    return X, s


def bradley_terry(
    battles: list[tuple[str, str, str]],
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
    C: float = 1e6,
    models: list[str] | None = None,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings (Newton's method on the logistic likelihood), centered at `init`."""
    models = models or sorted({m for a, b, _ in battles for m in (a, b)})
    if not battles:
        return {m: init for m in models}
    X, s = _design(battles, models, base)
    beta = np.zeros(len(models))
    for _ in range(100):
        p = 1 / (1 + np.exp(-(X @ beta)))  # P(A wins)
        grad = X.T @ (p - s) + beta / C  # the negative log-likelihood's gradient, ties as half a win each way
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.eye(len(models)) / C
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    ratings = scale * beta
    ratings += init - ratings.mean()
    return dict(zip(models, ratings.tolist()))


def bootstrap_bt(battles: list[tuple[str, str, str]], n: int = 200, seed: int = 0, **kw) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the Bradley-Terry ratings over `n` resamples of the battles. A model absent from a
    resample has no rating in it (as FastChat's bootstrap), rather than one held near the mean."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    if not battles:
        return {}
    rng = np.random.default_rng(seed)
    samples = np.full((n, len(models)), np.nan)
    for i in range(n):
        pick = [battles[j] for j in rng.integers(0, len(battles), len(battles))]
        fitted = bradley_terry(pick, **kw)
        samples[i] = [fitted.get(m, np.nan) for m in models]
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(models, low, high)}


def win_rates(battles: list[tuple[str, str, str]]) -> dict[str, dict[str, float | None]]:
    """matrix[a][b]: the share of a's battles against b that a won (ties half), None when they never met."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    won: dict[tuple[str, str], float] = defaultdict(float)
    played: dict[tuple[str, str], int] = defaultdict(int)
    for a, b, w in battles:
        s = _score(w)
        won[a, b] += s
        won[b, a] += 1 - s
        played[a, b] += 1
        played[b, a] += 1
    return {a: {b: (won[a, b] / played[a, b] if played[a, b] else None) for b in models if b != a} for a in models}


def mean_interval(scores: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the mean with its 95% t interval (None for no scores; the mean alone for one)."""
    if not scores:
        return None, None, None
    x = np.asarray(scores, dtype=float)
    if len(x) == 1:
        return float(x[0]), None, None
    from scipy import stats

    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def leaderboard(
    battles: list[tuple[str, str, str]], ratings: dict[str, list[float]] | None = None, *, bootstrap: int = 200, seed: int = 0
) -> dict:
    """{"models": [{model, elo, bt, bt_low, bt_high, games, wins, ties, losses, mean_rating, rating_low, rating_high,
    ratings, provisional}, ...] best first, "win_rates": matrix, "battles": count}. With few games the maximum-likelihood
    ratings are extreme (one vote: +-1000 and more): `provisional` marks them."""
    ratings = ratings or {}
    models = sorted({m for a, b, _ in battles for m in (a, b)} | set(ratings))
    elo = online_elo(battles)
    bt = bradley_terry(battles, models=models) if battles else {m: 1000.0 for m in models}
    intervals = bootstrap_bt(battles, n=bootstrap, seed=seed) if battles and bootstrap else {}
    games: dict[str, list[float]] = defaultdict(list)
    for a, b, w in battles:
        games[a].append(_score(w))
        games[b].append(1 - _score(w))
    rows = []
    for m in models:
        mean, low, high = mean_interval(ratings.get(m, []))
        g = games.get(m, [])
        rows.append(
            {
                "model": m,
                "elo": elo.get(m, 1000.0),
                "bt": bt[m],
                "bt_low": intervals.get(m, (None, None))[0],
                "bt_high": intervals.get(m, (None, None))[1],
                "games": len(g),
                "wins": sum(1 for s in g if s == 1),
                "ties": sum(1 for s in g if s == 0.5),
                "losses": sum(1 for s in g if s == 0),
                "mean_rating": mean,
                "rating_low": low,
                "rating_high": high,
                "ratings": len(ratings.get(m, [])),
                "provisional": len(g) < PROVISIONAL_GAMES,
            }
        )
    rows.sort(key=lambda r: (-bt[str(r["model"])], str(r["model"])))
    return {"models": rows, "win_rates": win_rates(battles), "battles": len(battles)}


def wilson(k: float, n: float, z: float = 1.959963984540054) -> tuple[float | None, float | None]:
    """Wilson's score interval for k successes in n trials."""
    if n <= 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def votes_needed(p: float, alpha: float = 0.05, power: float = 0.8, limit: int = 100_000) -> int | None:
    """The fewest votes with which the two-sided exact binomial test against 1/2 (the test `ab_test` reports) reaches
    `power` when the true win rate is p; None when p is 1/2 or more than `limit` votes would be needed.

    Under 1/2 the test rejects k <= c or k >= n - c, c the largest count with 2 P(K <= c) <= alpha; the power is the
    probability of that region under p (exact, so 4 wins out of 4 is never significant: p = 0.125)."""
    from scipy import stats

    if abs(p - 0.5) < 1e-12:
        return None
    n = np.arange(1, limit + 1)
    c = stats.binom.ppf(alpha / 2, n, 0.5)  # the smallest count whose lower tail reaches alpha/2
    c = np.where(2 * stats.binom.cdf(c, n, 0.5) > alpha, c - 1, c)
    reach = np.where(c >= 0, stats.binom.cdf(c, n, p) + stats.binom.sf(n - c - 1, n, p), 0.0)
    hits = np.nonzero(reach >= power)[0]
    return int(n[hits[0]]) if len(hits) else None


TIE_RULES = ("exclude", "half", "a", "b")


def ab_test(battles: list[tuple[str, str, str]], a: str, b: str, ties: str = "exclude") -> dict:
    """A against B over their battles (either side): wins, ties, win rate with its Wilson interval, the two-sided
    binomial test p-value, and the further votes needed at 80% power. `ties`: "exclude" (the sign test), "half" (split
    evenly; an odd one out is dropped), "a" or "b" (ties go to that side)."""
    from scipy import stats

    if ties not in TIE_RULES:
        raise LlmkitError(f"unknown tie rule {ties!r}", f"use one of: {', '.join(TIE_RULES)}")
    wins = losses = tied = 0
    for x, y, w in battles:
        if {x, y} != {a, b} or x == y:
            continue
        s = _score(w) if x == a else 1 - _score(w)
        if s == 1:
            wins += 1
        elif s == 0:
            losses += 1
        else:
            tied += 1
    if wins + losses + tied == 0:
        raise LlmkitError(f"there is no vote between {a!r} and {b!r}", "check the model names with llmkit eval arena")
    k, n = wins, wins + losses
    if ties == "half":
        k, n = wins + tied // 2, wins + losses + 2 * (tied // 2)
    elif ties == "a":
        k, n = wins + tied, wins + losses + tied
    elif ties == "b":
        n = wins + losses + tied
    rate = k / n if n else None
    low, high = wilson(k, n)
    p_value = float(stats.binomtest(k, n, 0.5, alternative="two-sided").pvalue) if n else None
    needed = votes_needed(rate) if rate is not None else None
    return {
        "a": a,
        "b": b,
        "wins": wins,
        "losses": losses,
        "ties": tied,
        "tie_rule": ties,
        "k": k,
        "n": n,
        "win_rate": rate,
        "win_rate_low": low,
        "win_rate_high": high,
        "p_value": p_value,
        "votes_needed": needed,
        "more_votes_needed": None if needed is None else max(needed - n, 0),
    }


def plot_ratings(board: dict, path) -> None:
    """A PNG of each model's Bradley-Terry rating with its 95% interval (and its Elo), best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit import io

    rows = board["models"][::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
    y = np.arange(len(rows))
    bt = np.array([r["bt"] for r in rows])
    low = np.array([r["bt_low"] if r["bt_low"] is not None else r["bt"] for r in rows])
    high = np.array([r["bt_high"] if r["bt_high"] is not None else r["bt"] for r in rows])
    ax.errorbar(bt, y, xerr=[bt - low, high - bt], fmt="o", color="#3056d3", capsize=4, label="Bradley-Terry (95% interval)")
    ax.scatter([r["elo"] for r in rows], y, marker="x", color="#b3261e", label="online Elo", zorder=3)
    ax.set_yticks(y, [f"{r['model']} ({r['games']} games)" for r in rows])
    ax.axvline(1000, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("rating")
    ax.set_title(f"Arena ratings from {board['battles']} votes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, path)
    plt.close(fig)


# --- votes and ratings as training data ---------------------------------------------------------------------------


def preference_pairs(exported: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The decided battles of `VoteStore.export()` rows as preference pairs, trl's plain layout plus where each came
    from: {"prompt", "system"?, "chosen", "rejected", "chosen_model", "rejected_model", "battle_id"}. Ties, "both bad"
    and answers that are the same text are left out and counted."""
    pairs, left_out = [], {"ties": 0, "both bad": 0, "same answers": 0}
    for row in exported:
        if row.get("type") != "vote":
            continue
        winner = row.get("winner")
        if winner in ("tie", "both_bad"):
            left_out["ties" if winner == "tie" else "both bad"] += 1
            continue
        if winner not in ("a", "b"):
            continue
        good, bad = ("a", "b") if winner == "a" else ("b", "a")
        chosen, rejected = row[f"answer_{good}"], row[f"answer_{bad}"]
        if chosen.strip() == rejected.strip():
            left_out["same answers"] += 1
            continue
        pair = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
        if row.get("system"):
            pair["system"] = row["system"]
        pair.update(chosen_model=row[f"model_{good}"], rejected_model=row[f"model_{bad}"], battle_id=row["id"])
        pairs.append(pair)
    return pairs, left_out


def kto_rows(exported: list[dict]) -> tuple[list[dict], int]:
    """The ratings of `VoteStore.export()` rows as KTO's unpaired layout, {"prompt", "completion", "label"}: 4-5 stars
    good (true), 1-2 bad (false); returns them and the count of neutral (3) ratings left out."""
    out, neutral = [], 0
    for row in exported:
        if row.get("type") != "rating":
            continue
        if row["score"] == 3:
            neutral += 1
            continue
        kto = {"prompt": row["prompt"], "completion": row["answer"], "label": row["score"] >= 4, "model": row["model"]}
        if row.get("system"):
            kto["system"] = row["system"]
        out.append(kto)
    return out, neutral
