"""Embeddings (OpenAI's): float or base64 vectors of texts or token ids, on the model's worker thread."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter

from llmkit.serve.protocol import EmbeddingRequest
from llmkit.serve.state import APIError, AppState, embed_on_worker

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: AppState):
    served = state.get(body.model, embedding=True)
    raw = body.input
    texts: list
    if isinstance(raw, str):
        texts = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        texts = [list(raw)]
    else:
        texts = list(raw)
    if not texts:
        raise APIError(400, "the input is empty: give a text, a list of texts or token ids", param="input")
    limit = served.input_limit
    encoded = []
    for i, t in enumerate(texts):
        ids = served.tok.encode(t) if isinstance(t, str) else list(t)
        if not ids or (isinstance(t, str) and not t):
            raise APIError(400, f"input {i} is empty", param="input")
        if len(ids) > limit:
            raise APIError(
                400,
                f"input {i} is {len(ids)} tokens, more than the model's limit of {limit}; shorten it or split it",
                param="input",
                code="context_length_exceeded",
            )
        bad = next((x for x in ids if x < 0 or x >= served.model.config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"input {i}: token id {bad} is outside the model's vocabulary", param="input")
        encoded.append(ids)
    D = served.model.config.d_model
    if body.dimensions is not None and body.dimensions != D:
        raise APIError(
            400,
            f"the model {served.name!r} makes {D}-dimensional vectors; dimensions {body.dimensions} is not supported",
            param="dimensions",
        )
    if served.pending >= state.settings.max_queue + 1:  # one running, max_queue waiting
        state.metrics.errors.labels("queue_full").inc()
        raise APIError(
            429, "the embedding queue is full; retry in a second", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )
    served.pending += 1
    try:
        vectors = await asyncio.get_running_loop().run_in_executor(served.pool, lambda: embed_on_worker(served.model, encoded))
    finally:
        served.pending -= 1
    data = []
    for i, v in enumerate(vectors.astype(np.float32)):
        value = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(map(len, encoded))
    return {"object": "list", "data": data, "model": served.name, "usage": {"prompt_tokens": n, "total_tokens": n}}
