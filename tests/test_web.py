"""The web page as a person uses it, in headless Chromium (Debian's package, driven by Playwright for Python through
`executable_path`): enter the API key, chat with SmolLM2 and see the answer stream in, stop an answer, export and import
a conversation, run an application preset, vote in the arena and see the leaderboard change, rate an answer, and read
clear messages for 401 and 429. Screenshots of each tab go to test-output/web/ (look at them)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from llmkit.model.weights import save_model
from llmkit.serve import Settings, create_app
from llmkit.serve.votes import VoteStore

from conftest import KEY, LiveServer, request, served_model

pytestmark = pytest.mark.xdist_group("web")
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "web"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser tests need Chromium: run `make browser` (as root it runs `apt-get install chromium`)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory, tokenizers_by_kind):

    folder = tmp_path_factory.mktemp("web")
    tok = tokenizers_by_kind["byte-bpe"]
    save_model(served_model(tok), folder / "tiny", tokenizer=tok)
    db = folder / "votes.db"
    live = LiveServer(
        create_app(
            [("smollm2", "smollm2"), ("tiny", str(folder / "tiny"))], [], Settings(api_key=KEY, max_batch=8, max_queue=8, db=str(db))
        )
    )
    live.wait_ready()
    live.db = db
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield live
    live.stop()


@pytest.fixture()
def page(browser, web):
    context = browser.new_context(viewport={"width": 1200, "height": 820}, accept_downloads=True, bypass_csp=True)
    page = context.new_page()
    page.goto(web.base + "/")
    page.wait_for_selector("#key-dialog[open]")  # the models list answered 401: the page asks for the key once
    assert "API key" in page.inner_text("#notice")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    yield page
    context.close()


def _idle(page, button: str, timeout: float = 120) -> None:
    page.wait_for_function(f"!document.getElementById('{button}').disabled", timeout=timeout * 1000)


def test_the_page_is_public_and_locked_to_its_own_files(web):
    status, html, headers = request("GET", web.base + "/", key=None)
    assert status == 200 and "<title>llmkit</title>" in html
    assert "default-src 'self'" in headers["content-security-policy"]  # no script or style from anywhere else, ever
    assert request("GET", web.base + "/ui/app.js", key=None)[0] == 200
    assert request("GET", web.base + "/arena/leaderboard", key=None)[0] == 401  # the votes API is not public
    assert request("GET", web.base + "/applications", key=None)[0] == 401


def test_the_key_is_asked_once_and_kept(browser, web):
    context = browser.new_context(bypass_csp=True)
    p = context.new_page()
    p.goto(web.base + "/")
    p.wait_for_selector("#key-dialog[open]")
    p.screenshot(path=str(SHOTS / "0-api-key.png"))
    p.fill("#key-input", "a-wrong-key")
    p.click("#key-save")
    p.wait_for_function("document.getElementById('notice').textContent.includes('key given is wrong')")
    p.fill("#key-input", KEY)
    p.click("#key-save")
    p.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    p.reload()  # kept in this browser: no question the second time
    p.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    assert not p.evaluate("document.getElementById('key-dialog').open")
    context.close()


def test_chat_streams_stops_and_exports(page, web, tmp_path):
    page.select_option("#chat-model", "smollm2")
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    lengths = []
    deadline = time.monotonic() + 120
    while page.evaluate("document.getElementById('chat-send').disabled") and time.monotonic() < deadline:
        lengths.append(page.evaluate("(document.querySelector('.msg.assistant .body') || {textContent: ''}).textContent.length"))
        time.sleep(0.02)
    answer = page.inner_text(".msg.assistant .body")
    assert "Paris" in answer
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, "the answer did not stream in piece by piece"
    assert "Rate" in page.inner_text(".msg.assistant .meta")  # the server kept the answer: it can be rated
    page.screenshot(path=str(SHOTS / "1-chat.png"))
    # stop a long answer half-way: the page keeps what came, and the server frees the slot
    page.fill("#chat-max-tokens", "600")
    page.fill("#chat-input", "Write a very long story about a dragon who learns to paint.")
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].querySelector('.body').textContent.length > 30")
    page.click("#chat-stop")
    _idle(page, "chat-send")
    assert "stopped" in page.inner_text(".msg.assistant >> nth=1")
    deadline = time.monotonic() + 20
    while web.engine("smollm2").running:
        assert time.monotonic() < deadline, "the stopped answer kept decoding"
        time.sleep(0.05)
    # export, then import it back as a second conversation
    with page.expect_download() as download:
        page.click("#chat-export")
    path = tmp_path / "conversation.json"
    download.value.save_as(path)
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "Paris" in saved["messages"][1]["content"]
    page.set_input_files("#chat-import", str(path))
    page.wait_for_function("document.querySelectorAll('#conversations li').length == 2")
    assert "Imported 1 conversation" in page.inner_text("#notice")
    # model text is text: markup in an answer is escaped, never run
    page.evaluate("""() => { const c = JSON.parse(localStorage.getItem('llmkit.conversations'));
        c[0].messages.push({role: 'assistant', content: '<img src=x onerror="window.pwned=1"> **bold**'});
        localStorage.setItem('llmkit.conversations', JSON.stringify(c)); }""")
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    last = page.locator(".msg.assistant .body").last
    assert "<img" in last.inner_text() and last.locator("strong").inner_text() == "bold"
    assert page.evaluate("window.pwned") is None and page.locator(".msg img").count() == 0


def test_an_application_preset_runs_with_its_editable_template(page):
    page.click("#tabs button[data-tab=apps]")
    page.click("#presets button:has-text('Translate')")
    assert "{language}" in page.input_value("#app-user") and page.is_visible("#app-to")
    page.select_option("#app-to", "de")
    page.select_option("#app-model", "smollm2")
    page.fill("#app-max-tokens", "30")
    page.fill("#app-text", "Good morning, my friend.")
    page.click("#app-run")
    page.wait_for_function("document.getElementById('app-output').textContent.length > 0")
    _idle(page, "app-run")
    page.screenshot(path=str(SHOTS / "2-applications.png"))
    page.click("#presets button:has-text('Summarize')")
    assert page.input_value("#app-user").startswith("Summarize") and not page.is_visible("#app-to")


def test_arena_vote_reveals_the_names_and_moves_the_leaderboard(page, web):
    page.click("#tabs button[data-tab=board]")
    page.wait_for_function("document.getElementById('board-summary').textContent.includes('votes')")
    before = int(page.inner_text("#board-summary").split()[0])
    page.click("#tabs button[data-tab=arena]")
    page.fill("#arena-prompt", "Name one animal that can fly.")
    page.fill("#arena-max-tokens", "24")
    page.click("#arena-start")
    page.wait_for_selector("#arena-votes button[data-vote=tie]:not([disabled])", timeout=120_000)
    assert page.inner_text("#arena-name-a") == page.inner_text("#arena-name-b") == ""  # hidden until the vote
    assert page.inner_text("#arena-a") + page.inner_text("#arena-b")  # SmolLM2's side has streamed in (the tiny one may be empty)
    page.click("#arena-votes button[data-vote=a]")
    page.wait_for_function("document.getElementById('arena-name-b').textContent.length > 0")
    names = {page.inner_text("#arena-name-a").strip("— "), page.inner_text("#arena-name-b").strip("— ")}
    assert names == {"smollm2", "tiny"}
    page.screenshot(path=str(SHOTS / "3-arena.png"))
    page.click("#tabs button[data-tab=board]")
    page.wait_for_function(f"document.getElementById('board-summary').textContent.startsWith('{before + 1} ')")
    rows = page.locator("#board-table tbody tr")
    assert rows.count() == 2 and "1" in rows.first.inner_text()
    page.screenshot(path=str(SHOTS / "5-leaderboard.png"))
    assert len(VoteStore(web.db).battles()) == before + 1
    # the same battle cannot be voted twice, and a made-up one not at all
    status, body, _ = request("POST", web.base + "/arena/votes", {"battle_id": "bat-made-up.0123", "winner": "a"})
    assert status == 404 and "not issued by this server" in body["error"]["message"]


def test_one_click_dpo_trains_on_the_votes_and_serves_the_result_beside_its_base(page, web):
    """The arena's "Train on the votes (DPO)": the decided battles become pairs, a DPO LoRA of the tiny model trains on
    them in a process of its own, and the trained model is then served (listed, and drawn into battles) while the page
    says how the run went. Too few decided battles is a 400 that says how many are needed."""
    page.click("#tabs button[data-tab=arena]")
    page.wait_for_function("document.getElementById('train-status').textContent.length > 0")
    store = VoteStore(web.db)  # the votes people cast (the tiny model's random answers are blank, so written here)
    for i in range(6):
        good, bad = f"{i} is a number between {i - 1} and {i + 1}.", f"no idea about {i}"
        ids = store.add_battle(prompt=f"Tell {i}.", system=None, settings={}, model_a="x", model_b="y", answer_a=good, answer_b=bad)
        store.vote(ids[0], "a")
    store.close()
    page.select_option("#train-model", "tiny")
    page.fill("#train-steps", "6")
    page.click("#train-start")
    page.wait_for_function("document.getElementById('train-status').textContent.includes('Training tiny-dpo1')", timeout=60_000)
    page.screenshot(path=str(SHOTS / "3b-arena-training.png"))
    status, body, _ = request("POST", web.base + "/arena/train", {"model": "tiny"})
    assert status == 409 and "already" in body["error"]["message"]  # one run at a time
    page.wait_for_function(
        "['is served', 'failed'].some((w) => document.getElementById('train-status').textContent.includes(w))", timeout=300_000
    )
    text = page.inner_text("#train-status")
    assert "tiny-dpo1 is served" in text and "6 steps" in text and "reward margin" in text, text
    page.wait_for_function("[...document.querySelectorAll('#train-model option')].some((o) => o.value === 'tiny-dpo1')")
    page.screenshot(path=str(SHOTS / "3c-arena-trained.png"))
    job = request("GET", web.base + "/arena/train")[1]
    assert job["status"] == "ready" and job["pairs"] + job["held_out"] == 6 and job["step"] == 6  # the run's own count
    assert "rewards/accuracies" in job["after"] and "rewards/margins" in job["after"]
    assert (Path(job["run"]) / "adapter_model.safetensors").exists() and (Path(job["run"]) / "pairs.jsonl").exists()
    models = [m["id"] for m in request("GET", web.base + "/v1/models")[1]["data"]]
    assert "tiny-dpo1" in models
    chat = {"model": "tiny-dpo1", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    assert request("POST", web.base + "/v1/chat/completions", chat)[0] == 200
    seen = set()
    for i in range(12):  # three generating models now: battles draw the new one too
        status, battle, _ = request("POST", web.base + "/arena/battles", {"prompt": f"Hi {i}", "max_tokens": 2})
        seen |= set(request("POST", web.base + "/arena/votes", {"battle_id": battle["battle_id"], "winner": "tie"})[1].values())
        if "tiny-dpo1" in seen:
            break
    assert "tiny-dpo1" in seen


def test_training_on_too_few_votes_says_how_many_it_needs(tmp_path, tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    save_model(served_model(tok), tmp_path / "tiny", tokenizer=tok)
    app = create_app([("a", str(tmp_path / "tiny")), ("b", str(tmp_path / "tiny"))], [], Settings(db=str(tmp_path / "v.db")))
    live = LiveServer(app)
    try:
        live.wait_ready()
        assert request("GET", live.base + "/arena/train", key=None)[1]["status"] == "idle"
        status, body, _ = request("POST", live.base + "/arena/train", {"model": "a"}, key=None)
        assert status == 400 and body["error"]["code"] == "too_few_pairs" and "at least 4" in body["error"]["message"]
        store = VoteStore(tmp_path / "v.db")
        for i in range(5):  # decided, but one side blank: no pair the run could use (the recipe's reading, counted)
            ids = store.add_battle(prompt=f"q{i}", system=None, settings={}, model_a="a", model_b="b", answer_a="yes", answer_b="  ")
            store.vote(ids[0], "a")
        store.close()
        status, body, _ = request("POST", live.base + "/arena/train", {"model": "a"}, key=None)
        assert status == 400 and "0 usable pairs" in body["error"]["message"] and "5 empty side" in body["error"]["message"]
        store = VoteStore(tmp_path / "v.db")
        for i in range(5):  # usable, but all on one prompt: the run holds out whole prompts, so it needs two
            ids = store.add_battle(prompt="Hi", system=None, settings={}, model_a="a", model_b="b", answer_a=f"hello {i}", answer_b="no")
            store.vote(ids[0], "a")
        store.close()
        status, body, _ = request("POST", live.base + "/arena/train", {"model": "a"}, key=None)
        assert status == 400 and "1 distinct prompt" in body["error"]["message"], body
        status, body, _ = request("POST", live.base + "/arena/train", {"model": "nope"}, key=None)
        assert status == 404 and "not a generating model" in body["error"]["message"]
    finally:
        live.stop()


def test_rate_an_answer(page, web):
    page.click("#tabs button[data-tab=rate]")
    page.select_option("#rate-model", "smollm2")
    page.fill("#rate-prompt", "Name a fruit, in one word.")
    page.click("#rate-generate")
    page.wait_for_function("document.getElementById('rate-answer').textContent.length > 0")
    page.check(".stars[data-name=score] input[value='4']")
    page.check(".stars[data-name=fluency] input[value='2']")
    page.fill("#rate-comment", "short but fine")
    page.click("#rate-submit")
    page.wait_for_function("document.getElementById('rate-result').textContent.includes('saved')")
    page.screenshot(path=str(SHOTS / "4-rate.png"))
    assert 4.0 in VoteStore(web.db).ratings()["smollm2"]


def test_a_busy_server_is_explained_in_words(browser, tmp_path, tokenizers_by_kind):

    tok = tokenizers_by_kind["byte-bpe"]
    save_model(served_model(tok), tmp_path / "tiny", tokenizer=tok)
    live = LiveServer(create_app([("tiny", str(tmp_path / "tiny"))], [], Settings(max_batch=1, max_queue=0)))
    try:
        live.wait_ready()
        stop = threading.Event()
        hog = {"model": "tiny", "prompt": "To be", "max_tokens": 1000, "ignore_eos": True}

        def hogging():  # two clients that ask again the moment they are answered: the one slot is never free for long
            while not stop.is_set():
                if request("POST", live.base + "/v1/completions", hog)[0] != 200:
                    time.sleep(0.05)  # the other one holds the slot

        hogs = [threading.Thread(target=hogging) for _ in range(2)]
        for t in hogs:
            t.start()
        deadline = time.monotonic() + 60
        while live.engine("tiny").running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        context = browser.new_context(bypass_csp=True)
        p = context.new_page()
        p.goto(live.base + "/")
        p.wait_for_function("document.getElementById('status').textContent.startsWith('ready')", timeout=120_000)
        p.fill("#chat-input", "Hello?")
        p.click("#chat-send")
        p.wait_for_function("document.getElementById('notice').textContent.includes('busy')", timeout=120_000)
        assert "queue is full" in p.inner_text("#notice") and "Try again in" in p.inner_text("#notice")
        p.screenshot(path=str(SHOTS / "6-busy.png"))
        context.close()
        stop.set()
        for t in hogs:
            t.join(120)
    finally:
        live.stop()
