"""Health, metrics and the served models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from llmkit.serve.state import AppState, Served, State

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])  # health checkers send HEAD
async def health(state: AppState):
    if state.ready.is_set() and not state.closing:
        return {"status": "ok", "models": list(state.models)}
    status = "shutting down" if state.closing else ("failed" if state.load_error else "loading")
    return JSONResponse({"status": status, **({"error": state.load_error} if state.load_error else {})}, status_code=503)


@router.get("/metrics")
async def metrics(state: AppState):
    return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_card(served: Served) -> dict:
    return {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "llmkit",
        "max_model_len": served.input_limit,
        "kind": "embedding" if served.embedding else "generation",
    }


def generation_card(served: Served, state: State) -> dict:
    """A generating model's card: also the new tokens a chat answer gets when the request gives no max_tokens (16 for
    completions, as OpenAI's)."""
    card = model_card(served)
    if not served.embedding:
        card["default_max_tokens"] = min(state.settings.default_max_tokens, served.context)
    return card


@router.get("/v1/models")
async def list_models(state: AppState):
    state.check_ready()
    return {"object": "list", "data": [generation_card(s, state) for s in state.models.values()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, state: AppState):
    return generation_card(state.get(name, embedding=None), state)
