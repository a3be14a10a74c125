"""Text to token ids and back (vLLM's /tokenize and /detokenize)."""

from __future__ import annotations

from fastapi import APIRouter

from llmkit.serve.jobs import prompt_of_messages
from llmkit.serve.protocol import DetokenizeRequest, TokenizeRequest
from llmkit.serve.state import APIError, AppState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: AppState):
    served = state.get(body.model, embedding=None)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send either prompt or messages", param="prompt")
    ids = (
        served.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        if body.prompt is not None
        else prompt_of_messages(served, body.messages)
    )
    return {"count": len(ids), "max_model_len": served.input_limit, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: AppState):
    served = state.get(body.model, embedding=None)
    limit = served.tok.id_limit
    bad = next((i for i in body.tokens if i < 0 or i >= limit), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary (0..{limit - 1})", param="tokens")
    return {"prompt": served.tok.decode(body.tokens)}
