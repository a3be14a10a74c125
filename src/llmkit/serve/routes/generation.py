"""Chat completions and completions (OpenAI's), whole or streamed."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request

from llmkit.chat import call_schema
from llmkit.errors import LlmkitError
from llmkit.grammar import check_schema
from llmkit.serve.jobs import fit, log_request, prompt_of_messages, run_job, sampling_config, used_settings
from llmkit.serve.protocol import ChatRequest, CompletionRequest
from llmkit.serve.state import APIError, AppState

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, state: AppState):
    served = state.get(body.model, embedding=False)
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools = body.offered_tools()
    ids, max_new = fit(
        served,
        prompt_of_messages(served, body.messages, tools),
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        state.settings.default_max_tokens,
        body.truncate_prompt_tokens,
        "messages",
    )
    log_request(state, "chat", served, [ids], lambda: json.dumps([m.model_dump() for m in body.messages], ensure_ascii=False))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    configs = [
        sampling_config(
            body, max_new, None if body.seed is None else body.seed + i, served.tok.id_limit, state.settings.sampling.get(served.name)
        )
        for i in range(body.n)
    ]
    forced = body.forced_call()
    if forced is not None:  # the answer is a call: constrained to one call's JSON, its arguments to the function's schema
        schema = call_schema(tools or [], forced[0])
        try:
            check_schema(schema)
        except LlmkitError as e:
            raise APIError(400, f"a tool's parameters: {e.message} ({e.fix})", param="tools") from None
        if served.model.config.family != "decoder":
            raise APIError(400, f"tool_choice needs a decoder; {served.name} is a {served.model.config.family}", param="tool_choice")
        configs = [dataclasses.replace(c, json_schema=schema) for c in configs]
        if any(c.stop_strings for c in configs):
            raise APIError(400, "stop strings would cut a required tool call's JSON; drop stop", param="stop")
    record = None  # the page's answers (it sends its session) get an id, so that they can be rated
    if state.votes is not None and body.n == 1 and "x-llmkit-session" in request.headers:
        system = "\n".join(m.text() for m in body.messages if m.role in ("system", "developer")) or None
        record = {
            "model": served.name,
            "prompt": json.dumps([m.model_dump(exclude_none=True) for m in body.messages], ensure_ascii=False),
            "system": system,
            "settings": used_settings(configs[0]),
        }
    names = [t["function"]["name"] for t in tools] if tools else None
    return await run_job(state, request, served, [ids] * body.n, configs, logprobs, chat=True, body=body, record=record, tools=names)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: AppState):
    served = state.get(body.model, embedding=False)
    raw: Any = body.prompt
    if isinstance(raw, str):
        prompts = [served.tok.encode(raw)]
    elif raw and all(isinstance(x, int) for x in raw):
        prompts = [list(raw)]
    elif raw and all(isinstance(x, str) for x in raw):
        prompts = [served.tok.encode(p) for p in raw]
    elif raw:
        prompts = [list(p) for p in raw]
    else:
        raise APIError(400, "the prompt is empty", param="prompt")
    if body.echo and body.logprobs is not None:
        raise APIError(
            400, "echo with logprobs (log-probabilities of the prompt) is not supported; use llmkit eval for scoring", param="echo"
        )
    fitted = [fit(served, p, body.max_tokens, 16, body.truncate_prompt_tokens, "prompt") for p in prompts]
    log_request(state, "completions", served, [p for p, _ in fitted], lambda: json.dumps(raw, ensure_ascii=False))
    all_prompts, configs = [], []
    for p, max_new in fitted:
        for i in range(body.n):
            all_prompts.append(p)
            configs.append(
                sampling_config(
                    body,
                    max_new,
                    None if body.seed is None else body.seed + i,
                    served.tok.id_limit,
                    state.settings.sampling.get(served.name),
                )
            )
    return await run_job(state, request, served, all_prompts, configs, body.logprobs, chat=False, body=body)
