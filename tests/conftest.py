"""Shared fixtures and helpers: small real text (a few Shakespeare plays) and tokenizers trained on it once per session,
one tiny-model factory, the llmkit command in a subprocess, and a live server with its HTTP helpers. Test modules
import from here, never from each other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from llmkit.data.clean import normalize
from llmkit.data.sources import shakespeare
from llmkit.model import build_model, preset
from llmkit.serve.browser import BackgroundServer
from llmkit.tokenizer import KINDS, train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# `llmkit generate`/`chat` compile their decode step by default (a minute per new model on 2 cores): the suite turns that
# off and compiles only where a test asks for it (tests/test_fast_decode.py), so CI stays within its time
os.environ.setdefault("LLMKIT_COMPILE", "0")
# Pretraining keeps prepared shards for the next run with the same text and options: the suite's in a folder of its own,
# so a run of the tests starts cold as CI does and leaves nothing in the user's ~/.cache
os.environ["LLMKIT_CACHE"] = tempfile.mkdtemp(prefix="llmkit-test-cache-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test worker (and per process a test starts): two workers on two cores, never four spinning
    # OpenMP threads fighting for two cores, which slows everything tenfold.
    n = max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "2")))
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def plays() -> list[str]:
    """Three short plays, cleaned: real text, small enough to train every kind in seconds."""
    docs = shakespeare("the-comedy-of-errors") + shakespeare("macbeth") + shakespeare("the-tempest")
    return [normalize(d.text) for d in docs]


@pytest.fixture(scope="session")
def tokenizers_by_kind(plays):
    return {kind: train_tokenizer(plays, kind, 2048, min_frequency=1) for kind in KINDS}


def run_cli(
    *args: str, input: str | None = None, cwd=None, check: bool = True, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `llmkit ARGS` as a user would, in a fresh process (`env`: variables set on top of this one's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llmkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_in_terminal(*args: str, columns: int = 80, timeout: float = 600, env: dict | None = None) -> tuple[int, str]:
    """Run `llmkit ARGS` in a pseudo-terminal `columns` wide, as a person at a terminal sees it: (exit code, what the
    screen received with its colour and cursor codes removed)."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", b"".join(chunks).decode("utf-8", "replace"))
    return proc.returncode, screen.replace("\r\n", "\n")


def tiny_model(kind: str = "tiny-llama", vocab_size: int = 101, *, seed: int = 0, confident: bool = False, tokenizer=None, **shape):
    """A tiny random model of a preset (2 layers, width 64, 4 heads unless `shape` says otherwise), in eval mode, the
    same for the same arguments. `confident`: the LM head scaled 30x, so greedy paths stay far from ties."""
    torch.manual_seed(seed)
    model = build_model(preset(kind, **{"vocab_size": vocab_size, "d_model": 64, "n_layers": 2, "n_heads": 4, **shape})).eval()
    if confident:
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizers_by_kind):
    """A saved tiny Llama (2 layers, width 64, context 128) with the byte-level BPE tokenizer: the base model of the
    fine-tuning tests."""
    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["byte-bpe"]
    out = tmp_path_factory.mktemp("base")
    save_model(tiny_model("tiny-llama", tok.vocab_size, max_seq_len=128), out, tokenizer=tok)
    return out


def small_finetune(base, out, **overrides):
    """A FinetuneConfig that runs in seconds on `base` (the `tiny_base` model): LoRA on the reverse task, 2 steps, fp32,
    no forgetting tasks; `overrides` change any field."""
    from llmkit.finetune.recipe import FinetuneConfig

    fields = dict(
        model=str(base),
        task="reverse",
        n_train=64,
        n_val=4,
        batch_size=8,
        max_new_tokens=4,
        forgetting_tasks="none",  # as a user writes "no task" on the command line
        general_text="shakespeare:macbeth",
        general_tokens=64,
        precision="fp32",
        show=0,
        method="lora",
        budget="2steps",
        warmup=1,
        lr=1e-2,
        out=str(out),
    )
    return FinetuneConfig(**{**fields, **overrides})


def served_model(tok, kind: str = "tiny-llama", **overrides):
    """The tiny decoder the server tests serve: `tok`'s vocabulary, a context of 1,024, a confident head."""
    shape = {"max_seq_len": 1024, **({"n_kv_heads": 2, "d_ff": 128} if kind == "tiny-llama" else {}), **overrides}
    return tiny_model(kind, tok.vocab_size, confident=True, tokenizer=tok, **shape)


def longrope_phi3(original: int, factors: int = 4) -> dict:
    """Phi3Config fields of Phi-4-mini's partial RoPE (half of each head) and Phi-3.5's LongRoPE grown from `original`
    positions: random short and long per-frequency factors (`factors` = rotated dims / 2), seeded."""
    g = torch.Generator().manual_seed(5)
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": (1.0 + 3.0 * torch.rand(factors, generator=g)).tolist(),
        "long_factor": (1.0 + 8.0 * torch.rand(factors, generator=g)).tolist(),
        "original_max_position_embeddings": original,
    }
    return {"original_max_position_embeddings": original, "rope_parameters": rope}


def sentencepiece_tokenizer(texts: list[str], family: str, vocab_size: int = 600):
    """A `transformers` tokenizer of `family`'s SentencePiece kind (BPE with byte fallback and the 256 byte tokens),
    trained with `tokenizers` on `texts` (no download): Gemma's (spaces as "▁", none put before the text), Phi-3's
    (a "▁" before the text, by its normalizer, as its tokenizer.json) or Llama 2's (Metaspace)."""
    import json

    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    gemma = family.startswith("gemma")
    # the family's own special tokens (llama.cpp looks Phi-3's up by name)
    specials = (
        ["<pad>", "<eos>", "<bos>", "<unk>"]
        if gemma
        else ["<unk>", "<s>", "</s>"] + (["<|endoftext|>"] if family.startswith("phi3") else [])
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False, limit_alphabet=100)
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]
    if gemma:
        return transformers.GemmaTokenizer(
            vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
        )
    out = transformers.LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if family.startswith("phi3"):
        out.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        out.backend_tokenizer.pre_tokenizer = None
    return out


def randomize_norms_and_biases(model, seed: int = 0, norm_centre: float = 1.0) -> None:
    """Random norms (around `norm_centre`: 0 for Gemma's 1 + weight form) and biases: a fresh model's are ones and zeros,
    which would hide a missing or misplaced one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((norm_centre if "norm" in name else 0.0) + 0.5 * torch.randn(p.shape, generator=g))


def engine_results(engine, jobs: list, stagger: float = 0.0) -> list[dict]:
    """Submit each (prompt, GenerationConfig) to a serving engine (with a pause between them: they join a running
    batch) and wait for all: per job {"ids", "text", "end" (the last event)}."""
    from llmkit.serve import Request

    results: list[dict] = [{"ids": [], "text": "", "end": None} for _ in jobs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if event[0] == "token":
                results[i]["text"] += event[1]
                if event[2] is not None:
                    results[i]["ids"].append(event[2])
            else:
                results[i]["end"] = event
                done.release()

        return emit

    for i, (prompt, cfg) in enumerate(jobs):
        engine.submit([Request(prompt, cfg, emitter(i))])
        if stagger:
            time.sleep(stagger)
    for _ in jobs:
        assert done.acquire(timeout=120), "a request never finished"
    return results


# --- a live server ------------------------------------------------------------------------------------------------------

KEY = "sk-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer(BackgroundServer):
    """uvicorn on a free local port in a thread (llmkit.serve.browser's), with what the tests ask of it."""

    def __init__(self, app):
        super().__init__(app)
        self.app = app

    def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while get(self.base + "/health")[0] != 200:
            assert time.monotonic() < deadline, f"the models did not load: {get(self.base + '/health')}"
            time.sleep(0.2)

    def engine(self, name: str):
        return self.app.state.llmkit.models[name].engine


def request(method: str, url: str, body: bytes | dict | None = None, key: str | None = KEY, headers: dict | None = None):
    """(status, parsed JSON or text, headers) of one plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(), hdrs


def get(url: str, key: str | None = KEY):
    return request("GET", url, key=key)


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the `llmkit serve` process answers /health with 200 (its models loaded); fails if it exits."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if get(base + "/health", key=None)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert proc.poll() is None, f"the server exited: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the server did not get ready in time"
        time.sleep(0.2)


def pytest_collection_modifyitems(items):
    """The longest test first (every README line in order, minutes): under xdist one worker starts it at once while the
    other takes the rest, instead of it starting last and the suite waiting for it alone."""
    items.sort(key=lambda item: item.path.name != "test_readme.py")  # stable: the rest keep their order
