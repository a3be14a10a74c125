"""Health, metrics and the served models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from llmkit.serve.state import AppState, Served

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


@router.get("/v1/models")
async def list_models(state: AppState):
    state.check_ready()
    return {"object": "list", "data": [model_card(s) for s in state.models.values()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, state: AppState):
    return model_card(state.get(name, embedding=None))
