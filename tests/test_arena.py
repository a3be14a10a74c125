"""Human evaluation: Elo equal to the published update, Bradley-Terry recovering planted strengths and equal to
scikit-learn's logistic regression, the A/B test equal to scipy's binomial test, the votes database (signed ids, one
vote per battle, two processes on one file), and the `llmkit eval arena` / `eval ab` commands."""

from __future__ import annotations

import json
import math
import random
import sqlite3

import numpy as np
import pytest

from llmkit.errors import LlmkitError
from llmkit.evaluate.arena import ab_test, bootstrap_bt, bradley_terry, leaderboard, online_elo, votes_needed, wilson
from llmkit.serve.votes import VoteError, VoteStore

from conftest import LiveServer, free_port, request, run_cli, served_model, wait_healthy


def _published_elo(battles, K=4, SCALE=400, BASE=10, INIT_RATING=1000):
    """The chatbot arena's notebook, as published (compute_online_elo), written out directly."""
    rating = {}
    for model_a, model_b, winner in battles:
        ra, rb = rating.get(model_a, INIT_RATING), rating.get(model_b, INIT_RATING)
        ea = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        eb = 1 / (1 + BASE ** ((ra - rb) / SCALE))
        sa = 1 if winner == "a" else 0 if winner == "b" else 0.5
        rating[model_a] = ra + K * (sa - ea)
        rating[model_b] = rb + K * (1 - sa - eb)
    return rating


def _simulate(strengths: dict[str, float], n: int, seed: int, tie_rate: float = 0.1):
    rng = random.Random(seed)
    names = sorted(strengths)
    battles = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        u = rng.random()
        battles.append((a, b, "tie" if u < tie_rate else "a" if rng.random() < p else "b"))
    return battles


def test_online_elo_equals_the_published_update():
    battles = [("x", "y", "a"), ("y", "z", "tie"), ("z", "x", "b"), ("x", "z", "both_bad"), ("y", "x", "a"), ("w", "y", "b")] * 7
    ours, theirs = online_elo(battles), _published_elo(battles)
    assert ours.keys() == theirs.keys()
    for m in ours:
        assert ours[m] == pytest.approx(theirs[m], abs=1e-9)
    assert online_elo([("x", "y", "a")]) == {"x": 1002.0, "y": 998.0}  # K = 4, equal ratings: +-K/2


def test_bradley_terry_recovers_planted_strengths_and_equals_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    planted = {"a": 1150.0, "b": 1060.0, "c": 1000.0, "d": 930.0, "e": 860.0}
    battles = _simulate(planted, 6000, seed=1)
    fitted = bradley_terry(battles)
    assert sorted(fitted, key=fitted.get, reverse=True) == ["a", "b", "c", "d", "e"]
    centre = np.mean(list(planted.values()))
    for m in planted:
        assert fitted[m] - 1000 == pytest.approx(planted[m] - centre, abs=25)
    # the same likelihood as scikit-learn's logistic regression: a tie is half a win each way
    models = sorted(planted)
    X, y, w = [], [], []
    for a, b, winner in battles:
        row = np.zeros(len(models))
        row[models.index(a)], row[models.index(b)] = math.log(10), -math.log(10)
        s = {"a": 1.0, "b": 0.0}.get(winner, 0.5)
        X += [row, row]
        y += [1, 0]
        w += [s, 1 - s]
    lr = LogisticRegression(fit_intercept=False, C=1e6, tol=1e-10, max_iter=10_000).fit(np.array(X), y, sample_weight=w)
    theirs = 400 * lr.coef_[0]
    theirs += 1000 - theirs.mean()
    np.testing.assert_allclose([fitted[m] for m in models], theirs, atol=0.05)
    intervals = bootstrap_bt(battles[:600], n=50, seed=0)
    assert all(
        lo < fitted_small < hi for (lo, hi), fitted_small in zip(intervals.values(), bradley_terry(battles[:600], models=models).values())
    )
    assert bootstrap_bt(battles[:600], n=50, seed=0) == intervals  # seeded


def test_a_model_that_never_lost_stays_finite_and_the_leaderboard_has_every_column():
    battles = [("x", "y", "a")] * 5 + [("y", "z", "tie")] * 3
    board = leaderboard(battles, {"x": [5, 4, 5], "q": [3]}, bootstrap=30)
    rows = {r["model"]: r for r in board["models"]}
    assert set(rows) == {"x", "y", "z", "q"} and board["models"][0]["model"] == "x"
    assert all(math.isfinite(r["bt"]) for r in rows.values())
    assert rows["x"]["wins"] == 5 and rows["y"]["ties"] == 3 and rows["y"]["losses"] == 5 and rows["q"]["games"] == 0
    assert rows["x"]["mean_rating"] == pytest.approx(14 / 3) and rows["x"]["rating_low"] < 14 / 3 < rows["x"]["rating_high"]
    assert board["win_rates"]["x"]["y"] == 1.0 and board["win_rates"]["y"]["z"] == 0.5 and board["win_rates"]["x"]["z"] is None


def test_ab_test_equals_scipy_binomtest_with_every_tie_rule():
    from scipy.stats import binom, binomtest

    battles = (
        [("p", "q", "a")] * 14 + [("q", "p", "a")] * 5 + [("p", "q", "tie")] * 3 + [("q", "p", "both_bad")] * 2 + [("p", "r", "a")] * 9
    )
    r = ab_test(battles, "p", "q")
    assert (r["wins"], r["losses"], r["ties"]) == (14, 5, 5)
    assert r["p_value"] == pytest.approx(binomtest(14, 19, 0.5).pvalue)
    assert ab_test(battles, "p", "q", ties="half")["p_value"] == pytest.approx(binomtest(16, 23, 0.5).pvalue)
    assert ab_test(battles, "p", "q", ties="a")["p_value"] == pytest.approx(binomtest(19, 24, 0.5).pvalue)
    assert ab_test(battles, "p", "q", ties="b")["p_value"] == pytest.approx(binomtest(14, 24, 0.5).pvalue)
    ci = binomtest(14, 19).proportion_ci(method="wilson")
    assert wilson(14, 19) == pytest.approx((ci.low, ci.high), abs=1e-12) and (r["win_rate_low"], r["win_rate_high"]) == wilson(14, 19)
    # 80% power of the exact test: the fewest votes whose rejection region (scipy's p <= 0.05) holds 80% under p
    for p in (0.7, 0.8, 1.0):
        power = [sum(binom.pmf(k, n, p) for k in range(n + 1) if binomtest(k, n, 0.5).pvalue <= 0.05) for n in range(1, 60)]
        assert votes_needed(p) == next(n for n, x in enumerate(power, 1) if x >= 0.8)
    assert votes_needed(1.0) == 6 and votes_needed(0.5) is None  # 5 wins out of 5 is not significant yet (p = 0.0625)
    assert ab_test(battles, "q", "p")["wins"] == 5
    with pytest.raises(LlmkitError, match="no vote between"):
        ab_test(battles, "q", "r")


def test_the_votes_database_signs_ids_takes_one_vote_and_is_shared_safely(tmp_path):
    db = tmp_path / "votes.db"
    one, two = VoteStore(db), VoteStore(db)  # two servers on one file: SQLite's locks make it safe
    battle, answer_a, _ = one.add_battle(
        prompt="hi", system=None, settings={"temperature": 0.7}, model_a="m1", model_b="m2", answer_a="hello", answer_b="hey"
    )
    assert two.vote(battle, "b") == ("m1", "m2")
    with pytest.raises(VoteError) as e:
        one.vote(battle, "a")
    assert e.value.status == 409
    forged = battle.rsplit(".", 1)[0] + ".0123456789abcdef01234567"
    with pytest.raises(VoteError) as e:
        one.vote(forged, "a")
    assert e.value.status == 404
    with pytest.raises(VoteError) as e:
        one.vote(VoteStore(tmp_path / "other.db").sign("bat-made-up"), "a")  # signed by another database
    assert e.value.status == 404
    assert two.rate(answer_a, 4, comment="fine", session="s1", client="10.0.0.1") == "m1"
    with pytest.raises(VoteError) as e:
        one.rate(answer_a, 2, session="s1")  # once per answer and session
    assert e.value.status == 409
    with pytest.raises(VoteError) as e:
        one.rate(answer_a, 2, session="s2", client="10.0.0.1")  # a new session id from the same address: still once
    assert e.value.status == 409
    chat_id = one.sign("ans-kept-in-memory")
    with pytest.raises(VoteError):
        one.rate(chat_id, 3, session="s1")  # an unrated chat answer is not in the file
    assert (
        one.rate(chat_id, 3, session="s1", answer={"model": "m2", "prompt": "q", "answer": "a", "settings": {"temperature": 0.0}}) == "m2"
    )
    with pytest.raises(VoteError):
        two.rate(answer_a, 6)
    assert one.battles() == [("m1", "m2", "b")] and one.ratings() == {"m1": [4.0], "m2": [3.0]}
    rows = one.export()
    assert [r["type"] for r in rows] == ["vote", "rating", "rating"] and rows[0]["answer_a"] == "hello"
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LlmkitError, match="not a votes database"):
        VoteStore(tmp_path / "junk.db")


def test_eval_arena_and_ab_commands(tmp_path):
    db = tmp_path / "votes.db"
    store = VoteStore(db)
    for a, b, w in _simulate({"big": 1100.0, "small": 950.0, "tiny": 900.0}, 120, seed=3):
        battle, answer, _ = store.add_battle(prompt="p", system=None, settings={}, model_a=a, model_b=b, answer_a="x", answer_b="y")
        store.vote(battle, w)
        store.rate(answer, 5 if a == "big" else 2)
    store.close()
    out = json.loads(run_cli("eval", "arena", "--db", str(db), "--json", "--png", str(tmp_path / "r.png"), "--bootstrap", "50").stdout)
    names = [m["model"] for m in out["models"]]
    assert names[0] == "big" and set(names) == {"big", "small", "tiny"} and out["battles"] == 120
    assert {"model", "elo", "bt", "bt_low", "bt_high", "games", "wins", "mean_rating"} <= set(out["models"][0])
    assert (tmp_path / "r.png").stat().st_size > 5000
    ab = json.loads(
        run_cli("eval", "ab", "--db", str(db), "--a", "big", "--b", "tiny", "--json", "--export", str(tmp_path / "v.jsonl")).stdout
    )
    assert ab["wins"] + ab["losses"] + ab["ties"] > 0 and 0 <= ab["p_value"] <= 1
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 240
    text = run_cli("eval", "ab", "--db", str(db), "--a", "big", "--b", "small").stdout
    assert "win rate of big" in text and "binomial test p =" in text
    bad = run_cli("eval", "arena", "--db", str(tmp_path / "none.db"), check=False)
    assert bad.returncode == 1 and "no votes database" in bad.stderr


def test_a_vote_survives_kill_9_right_after_its_answer_and_votes_are_rate_limited(tmp_path, tokenizers_by_kind):
    """`llmkit serve` with one tiny model under two names (two sampling settings): a battle, a vote, then SIGKILL at once;
    the vote is in the database. A session that votes too fast gets 429."""
    import os
    import signal
    import subprocess
    import sys

    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["byte-bpe"]
    save_model(served_model(tok), tmp_path / "tiny", tokenizer=tok)
    db, port = tmp_path / "votes.db", free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "--model",
            f"cold={tmp_path / 'tiny'}",
            "--model",
            f"hot={tmp_path / 'tiny'}",
            "--sampling",
            "cold:temperature=0",
            "--sampling",
            "hot:temperature=1.5",
            "--db",
            str(db),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        status, battle, _ = request("POST", base + "/arena/battles", {"prompt": "Say hi", "max_tokens": 8}, key=None)
        assert status == 200 and battle["a"]["text"] is not None and set(battle) == {"battle_id", "a", "b"}
        status, names, _ = request("POST", base + "/arena/votes", {"battle_id": battle["battle_id"], "winner": "b"}, key=None)
        os.kill(proc.pid, signal.SIGKILL)  # right after the answer
        proc.wait(10)
        assert status == 200 and {names["a"], names["b"]} == {"cold", "hot"}
        assert VoteStore(db).battles() == [(names["a"], names["b"], "b")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the limiter: 30 votes a minute per session, then 429 with Retry-After
    from llmkit.serve.state import APIError, Limiter

    limiter = Limiter(per_minute=3)
    for _ in range(3):
        limiter.check("s1")
    limiter.check("s2")
    with pytest.raises(APIError) as e:
        limiter.check("s1")
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1


def test_streamed_battles_votes_and_ratings_over_http(tmp_path, tokenizers_by_kind):
    """One tiny model under two names with two sampling settings: a streamed battle (SSE), its vote once, the settings
    each side really used in the database; a chat answer from the page rated once per session."""
    from llmkit.model.weights import save_model
    from llmkit.serve import Settings, create_app

    tok = tokenizers_by_kind["byte-bpe"]
    save_model(served_model(tok), tmp_path / "tiny", tokenizer=tok)
    spec = str(tmp_path / "tiny")
    live = LiveServer(
        create_app(
            [("cold", spec), ("hot", spec)],
            [],
            Settings(db=str(tmp_path / "votes.db"), sampling={"cold": {"temperature": 0.0}, "hot": {"temperature": 1.5, "top_p": 0.9}}),
        )
    )
    try:
        live.wait_ready()
        assert live.app.state.llmkit.models["cold"].model is live.app.state.llmkit.models["hot"].model  # loaded once
        import urllib.request

        req = urllib.request.Request(
            live.base + "/arena/battles?stream=true",
            method="POST",
            data=json.dumps({"prompt": "Say hi", "max_tokens": 6}).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        sides = {e["side"] for e in events if "delta" in e}
        assert sides <= {"a", "b"} and {e["side"] for e in events if "finish_reason" in e} == {"a", "b"}
        final = events[-1]
        assert "battle_id" in final and final["a"]["text"] == "".join(e["delta"] for e in events if e.get("side") == "a" and "delta" in e)
        status, names, _ = request("POST", live.base + "/arena/votes", {"battle_id": final["battle_id"], "winner": "tie"}, key=None)
        assert status == 200 and {names["a"], names["b"]} == {"cold", "hot"}
        status, body, _ = request("POST", live.base + "/arena/votes", {"battle_id": final["battle_id"], "winner": "a"}, key=None)
        assert status == 409 and body["error"]["code"] == "already_voted"
        row = VoteStore(tmp_path / "votes.db").export()[0]
        used = {names["a"]: row["settings"]["a"], names["b"]: row["settings"]["b"]}
        assert used["cold"]["temperature"] == 0.0 and used["hot"]["temperature"] == 1.5 and used["hot"]["top_p"] == 0.9
        # a chat answer from the page (its session header) can be rated, once per session; plain API answers get no id
        page = {"X-Llmkit-Session": "session-1"}
        status, chat, _ = request(
            "POST",
            live.base + "/v1/chat/completions",
            {"model": "cold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            key=None,
            headers=page,
        )
        assert status == 200 and "answer_id" in chat
        status, plain, _ = request(
            "POST",
            live.base + "/v1/chat/completions",
            {"model": "cold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            key=None,
        )
        assert "answer_id" not in plain
        assert VoteStore(tmp_path / "votes.db").ratings() == {}  # nothing of the chat is stored before a rating
        rating = {"answer_id": chat["answer_id"], "score": 5, "comment": "good"}
        status, body, _ = request("POST", live.base + "/ratings", rating, key=None, headers=page)
        assert status == 200 and body["model"] == "cold"
        assert request("POST", live.base + "/ratings", rating, key=None, headers=page)[0] == 409
        assert VoteStore(tmp_path / "votes.db").ratings() == {"cold": [5.0]}
        status, board, _ = request("GET", live.base + "/arena/leaderboard", key=None)
        assert status == 200 and board["battles"] == 1 and all(m["provisional"] for m in board["models"])
    finally:
        live.stop()
