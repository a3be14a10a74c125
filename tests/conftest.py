"""Shared fixtures: small real text (a few Shakespeare plays) and tokenizers trained on it once per session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmkit.data.clean import normalize
from llmkit.data.sources import shakespeare
from llmkit.tokenizer import KINDS, train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# `llmkit generate`/`chat` compile their decode step by default (a minute per new model on 2 cores): the suite turns that
# off and compiles only where a test asks for it (tests/test_fast_decode.py), so CI stays within its time
os.environ.setdefault("LLMKIT_COMPILE", "0")
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


def run_cli(*args: str, input: str | None = None, cwd=None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `llmkit ARGS` as a user would, in a fresh process (`env`: variables set on top of this one's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        timeout=600,
        env={**os.environ, **env} if env else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llmkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
