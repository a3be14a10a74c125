"""`llmkit serve`: the OpenAI-compatible HTTP server (llmkit.serve) on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path

from llmkit.cli.common import console, decode_weight_options, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    p = subcommand(
        commands,
        "serve",
        "serve models over the OpenAI HTTP API (chat, completions, embeddings), batched",
        (
            "llmkit serve                     # SmolLM2-135M-Instruct + MiniLM embeddings on 127.0.0.1:8000; the page at /",
            "llmkit serve --model smollm2 --model sft=runs/finetune --db runs/votes.db   # an arena: SmolLM2 against its fine-tune",
            "llmkit serve --model cold=smollm2 --model hot=smollm2 --sampling cold:temperature=0.2 --sampling hot:temperature=1.2",
            "llmkit serve --model smollm2 --model sft=runs/sft --model shakes=runs/pretrain --embedding-model minilm",
            "llmkit serve --host 0.0.0.0 --port 8080 --api-key-file key.txt --max-batch 16 --max-queue 64 "
            "--cors-origin http://localhost:3000",
            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}]}\'',
        ),
        cmd_serve,
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[NAME=]MODEL",
        help="a model to serve (smollm2, a run folder, a LoRA run folder, a Hugging Face folder, a .gguf), under NAME "
        "(default: the spec as given); repeatable (default: smollm2)",
    )
    p.add_argument(
        "--embedding-model",
        action="append",
        default=None,
        metavar="[NAME=]MODEL",
        help="a model for /v1/embeddings (default: minilm when no --model is given; 'none' for none); repeatable",
    )
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name requests may carry, besides localhost / 127.0.0.1 / ::1 (refused otherwise, against DNS "
        "rebinding); repeatable; on a non-loopback --host without it, any Host is accepted (with a warning)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health "
        "(prefer --api-key-file or LLMKIT_API_KEY: a command line is visible to others)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; beyond, 429 (default: 64)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens prefilled between two decode steps, so that a long prompt never stalls the running streams "
        "(default: 256; 0: each prompt at once)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256,
        help="memory per model for the keys and values of earlier prompts and answers, so that a prompt starting with the "
        "same tokens (a system prompt, a conversation's earlier turns) is prefilled only from where it differs "
        "(default: 256; 0: none)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="new tokens of a chat answer whose request names no max_tokens (default: 1024; /v1/models shows it)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, waiting included (default: 600)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB; beyond, 413 (default: 4)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="URL", help="allow browser pages from this origin; repeatable")
    p.add_argument("--log-prompts", action="store_true", help="log the prompts (off by default: prompts may be private)")
    decode_weight_options(p)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode with the compiled one-token step on a CPU (default: on; LLMKIT_COMPILE=0 turns it off whatever the flag; "
        "each padded batch size compiles in the background while the engine serves eagerly, minutes the first time, then "
        "from inductor's cache on disk; 1.3-1.8x the eager engine's tokens/s at 1 to 16 requests, benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM / Ctrl-C, seconds to let running requests finish before they are cancelled (default: 30)",
    )
    p.add_argument(
        "--db",
        default="runs/votes.db",
        help="the SQLite file of arena votes, ratings and the answers they rate (default: runs/votes.db; 'none': no votes API)",
    )
    p.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="default sampling of a served name (temperature, top_p, top_k, repetition_penalty, max_tokens), e.g. "
        "hot:temperature=1.2 — one model under two names with two settings can meet in the arena; repeatable",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)")


def named(specs: list[str]) -> list[tuple[str, str]]:
    """'NAME=PATH' -> (NAME, PATH); a bare spec is its own name."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and path:
            out.append((name, path))
        elif sep and not (name and path):
            raise LlmkitError(f"cannot read the model {spec!r}", "write --model NAME=PATH or --model PATH")
        else:
            out.append((spec, spec))
    return out


def api_key(args) -> str | None:
    if args.api_key and args.api_key_file:
        raise LlmkitError("both --api-key and --api-key-file are given", "use one of them")
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise LlmkitError(f"the API key file {path} does not exist", "write the key into it, or fix the path")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise LlmkitError(f"the API key file {path} is empty", "write the key into it")
        return key
    key = args.api_key or os.environ.get("LLMKIT_API_KEY") or None
    if key is not None and not key.strip():
        raise LlmkitError("the API key is empty", "give a non-empty key")
    return key


def cmd_serve(args) -> None:
    import uvicorn

    from llmkit.model.compiled import compile_default
    from llmkit.serve.app import Settings, create_app

    models = named(args.model or ["smollm2"])
    embedding = args.embedding_model if args.embedding_model is not None else ([] if args.model else ["minilm"])
    embedding = named([e for e in embedding if e.lower() != "none"])
    if args.max_batch < 1 or args.max_queue < 0:
        raise LlmkitError("--max-batch must be 1 or more and --max-queue 0 or more", "e.g. --max-batch 16 --max-queue 64")
    if args.prefill_chunk < 0:
        raise LlmkitError(f"--prefill-chunk {args.prefill_chunk} is negative", "use e.g. 256, or 0 for whole prompts")
    if args.prefix_cache_mb < 0:
        raise LlmkitError(f"--prefix-cache-mb {args.prefix_cache_mb} is negative", "use e.g. 256, or 0 for no prefix cache")
    if args.default_max_tokens < 1:
        raise LlmkitError(f"--default-max-tokens {args.default_max_tokens} allows no answer", "use 1 or more, e.g. 1024")
    if args.timeout <= 0 or args.max_body_mb <= 0:
        raise LlmkitError("--timeout and --max-body-mb must be positive", "e.g. --timeout 600 --max-body-mb 4")
    names = [n for n, _ in models + embedding]
    if len(set(names)) < len(names):
        raise LlmkitError(f"two models share a name: {', '.join(names)}", "name them: --model NAME=PATH")
    key = api_key(args)
    from llmkit.devices import resolve as resolve_device

    settings = Settings(
        api_key=key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout=args.timeout,
        default_max_tokens=args.default_max_tokens,
        prefill_chunk=args.prefill_chunk or None,
        prefix_cache_mb=args.prefix_cache_mb,
        max_body=int(args.max_body_mb * 1024 * 1024),
        cors_origins=list(args.cors_origin),
        log_prompts=args.log_prompts,
        dtype=args.dtype,
        device=str(resolve_device(args.device)),  # a device that is not there is refused before the server starts
        quantize=args.quantize,
        compile=compile_default() if args.compile is None else args.compile,
        db=None if args.db.lower() == "none" else args.db,
        sampling=sampling_options(args.sampling, names),
        allowed_hosts=allowed_hosts(args.host, args.allowed_host),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    con = console()
    if not _loopback(args.host) and key is None:
        con.print(
            f"[yellow]warning: serving on {args.host} without an API key: anyone who reaches this machine can use it (--api-key-file)[/]"
        )
    if settings.allowed_hosts is None:
        con.print(
            f"[yellow]warning: serving on {args.host} accepts requests for any Host name: name this machine's with "
            "--allowed-host NAME (a page of another origin could otherwise reach the API through DNS rebinding)[/]"
        )
    app = create_app(models, embedding, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        limit_concurrency=None,
    )
    state = app.state.llmkit
    server = _Server(config, state, args.shutdown_timeout)
    failed: list[str] = []

    def stop(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    state.on_load_error = stop
    con.print(
        f"serving {', '.join(names)} on http://{args.host}:{args.port}/v1 — open http://{args.host}:{args.port}/ in a "
        "browser for chat, applications and the arena (models load in the background; /health says when they are ready)"
    )
    # uvicorn catches SIGTERM / SIGINT, shuts down gracefully, then raises the signal again for the handler it found:
    # a quiet one here, so that a clean shutdown exits 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise LlmkitError(f"the server stopped: {failed[0]}", "fix the model given to --model / --embedding-model")


class _Server:  # made a uvicorn.Server subclass on first use (uvicorn is imported lazily)
    def __new__(cls, config, state, grace: float):
        import asyncio

        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                """SIGTERM / Ctrl-C: requests still running just before the grace period ends get an error event (then
                [DONE] for streams) from their engine, rather than a connection cut mid-stream by uvicorn. (A signal
                handler may interrupt the loop anywhere: it only wakes the loop, which sets the timer.)"""
                if not self.should_exit:
                    try:
                        loop = asyncio.get_running_loop()
                        loop.call_soon_threadsafe(loop.call_later, max(0.0, grace - min(2.0, grace / 5)), state.end_requests)
                    except RuntimeError:  # no loop runs yet: nothing to end
                        pass
                super().handle_exit(sig, frame)

        return Server(config)


def allowed_hosts(bind: str, extra: list[str]) -> list[str] | None:
    """The Host names the server answers to: the loopback names (and --allowed-host names) when bound to loopback or
    given names; None (any) on another address without --allowed-host."""
    from llmkit.serve.state import LOOPBACK_HOSTS

    names = [n.strip().lower().strip("[]") for n in extra if n.strip()]
    if _loopback(bind) or names:
        return [*LOOPBACK_HOSTS, *names, *([bind.lower()] if bind not in ("0.0.0.0", "::") and not _loopback(bind) else [])]
    return None


SAMPLING_KEYS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "max_tokens": int,
}


def sampling_options(specs: list[str], names: list[str]) -> dict[str, dict]:
    """['hot:temperature=1.2,top_p=0.9'] -> {'hot': {'temperature': 1.2, 'top_p': 0.9}}."""
    out: dict[str, dict] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or name not in names:
            raise LlmkitError(
                f"--sampling {spec!r} does not name a served model ({', '.join(names)})", "write --sampling NAME:temperature=0.7"
            )
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in SAMPLING_KEYS:
                raise LlmkitError(f"--sampling {spec!r}: cannot read {item!r}", f"use KEY=VALUE with KEY one of {', '.join(SAMPLING_KEYS)}")
            try:
                out.setdefault(name, {})[key] = SAMPLING_KEYS[key](value)
            except ValueError:
                raise LlmkitError(f"--sampling {spec!r}: {value!r} is not a number", "e.g. temperature=0.7") from None
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
