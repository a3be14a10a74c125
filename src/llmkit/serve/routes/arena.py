"""The votes API behind the web page: blind A/B battles, votes, ratings and the leaderboard (statistics in
`llmkit.evaluate.arena`, storage in `llmkit.serve.votes`).

    POST /arena/battles     {"prompt", "system"?, "max_tokens"?, "temperature"?} -> {"battle_id", "a": {"text"}, "b": {"text"}}
                            (?stream=true: server-sent events {"side": "a"|"b", "delta"} ... then {"battle_id"})
    POST /arena/votes       {"battle_id", "winner": "a"|"b"|"tie"|"both_bad"} -> {"a": model, "b": model}
    POST /ratings           {"answer_id", "score": 1..5, "correctness"?, "fluency"?, "comment"?}
    GET  /arena/leaderboard the leaderboard as JSON
    POST /arena/train       {"model"?, "steps"?, "beta"?}: a DPO LoRA trained on the decided battles, then served
                            beside its base (`llmkit.serve.training`); GET /arena/train says how it goes
    GET  /applications      the application presets (llmkit.applications)

Two served generating models are drawn at random for each battle (any two names: two models, a model and its LoRA
fine-tune, or one model under two names with different `--sampling`); their names stay hidden until the vote. Battle
and answer ids are signed by the database, so only battles this server ran can be voted on, once. Votes and ratings
and battles are limited per client address; each answer is rated once per session.
"""

from __future__ import annotations

import asyncio
import json
import random
import re

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from llmkit.applications import presets_json
from llmkit.evaluate.arena import leaderboard
from llmkit.serve.jobs import chat_events, disconnected
from llmkit.serve.protocol import Body
from llmkit.serve.state import APIError, AppState
from llmkit.serve.training import MIN_PAIRS, start_training
from llmkit.serve.votes import VoteError

SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BattleRequest(Body):
    prompt: str = Field(min_length=1, max_length=20_000)
    system: str | None = Field(default=None, max_length=20_000)
    max_tokens: int = Field(default=256, ge=1, le=2048)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)


class TrainRequest(Body):
    model: str | None = Field(default=None, max_length=200)
    steps: int = Field(default=40, ge=1, le=2000)
    beta: float = Field(default=0.1, gt=0, le=10)


class VoteRequest(Body):
    battle_id: str = Field(max_length=200)
    winner: str


class RatingRequest(Body):
    answer_id: str = Field(max_length=200)
    score: int = Field(ge=1, le=5)
    correctness: int | None = Field(default=None, ge=1, le=5)
    fluency: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=4000)


def session_of(request: Request) -> str:
    """The page's anonymous session id (X-Llmkit-Session), else the client's address: stored with votes and ratings."""
    given = request.headers.get("x-llmkit-session", "")
    return given if SESSION.match(given) else f"ip-{request.client.host if request.client else 'unknown'}"


def client_of(request: Request) -> str:
    """What the limits count by: the address (a client that invents a new session id per request is still one client)."""
    return request.client.host if request.client else "unknown"


router = APIRouter()


def votes(state):
    if state.votes is None:
        raise APIError(404, "this server keeps no votes (it was started with --db none)", code="no_votes_db")
    return state.votes


def vote_error(e: VoteError) -> APIError:
    return APIError(e.status, e.message + (f" ({e.fix})" if e.fix else ""), code="invalid_vote" if e.status != 409 else "already_voted")


@router.get("/applications")
async def applications():
    return presets_json()


@router.post("/arena/battles")
async def battle(body: BattleRequest, request: Request, state: AppState, stream: bool = False):
    store = votes(state)
    state.check_ready()
    state.arena.battles.check(client_of(request))
    names = [n for n, s in state.models.items() if not s.embedding]
    if len(names) < 2:
        raise APIError(400, f"a battle needs two generating models and this server has {len(names)}", code="arena_needs_two_models")
    pair = random.SystemRandom().sample(names, 2)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt}]
    fields = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p}
    session = session_of(request)
    streams = [chat_events(state, state.models[name], messages, fields, request) for name in pair]
    queue: asyncio.Queue = asyncio.Queue()
    used: dict[str, dict] = {}  # each side's sampling settings as generated (a served name's --sampling wins)

    async def pump(side: str, gen):
        try:
            async for event in gen:
                await queue.put((side, event))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure ends the battle with an error, never a truncated answer)
            await queue.put((side, ("error", e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", "server_error"))))
        finally:
            await queue.put((side, ("end", None)))

    async def close_all(tasks=()):
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the tasks stop using the generators first
        for g in streams:
            try:
                await g.aclose()
            except Exception:  # noqa: BLE001
                pass

    # both are submitted before anything streams: a full queue refuses the battle whole (429)
    firsts = []
    try:
        for gen in streams:
            firsts.append(await gen.__anext__())
    except Exception as e:
        await close_all()
        if isinstance(e, APIError):
            raise
        raise APIError(500, f"generation failed: {e}", "server_error") from None
    for side, (_kind, value) in zip("ab", firsts):
        used[side] = value
    tasks = [asyncio.ensure_future(pump(side, gen)) for side, gen in zip("ab", streams)]

    async def events():
        texts, ended, error = {"a": "", "b": ""}, 0, None
        try:
            while ended < 2:
                side, (kind, value) = await queue.get()
                if kind == "delta":
                    texts[side] += value
                    yield {"side": side, "delta": value}
                elif kind == "done":
                    yield {"side": side, "finish_reason": value}
                elif kind == "error":
                    error = error or value
                    for t in tasks:  # one side failed: the battle is void, the other side stops too
                        t.cancel()
                elif kind == "end":
                    ended += 1
            if error is not None:
                raise error
            settings = {"request": fields, "a": used["a"], "b": used["b"]}
            battle_id, _, _ = await asyncio.to_thread(
                store.add_battle,
                prompt=body.prompt,
                system=body.system,
                settings=settings,
                model_a=pair[0],
                model_b=pair[1],
                answer_a=texts["a"],
                answer_b=texts["b"],
                session=session,
            )
            yield {"battle_id": battle_id, "a": {"text": texts["a"]}, "b": {"text": texts["b"]}}
        finally:
            await close_all(tasks)

    if stream:

        async def sse():
            try:
                async for event in events():
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': e.code}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect():
        last = None
        async for event in events():
            last = event
        return last

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client left: nothing is generated further, nothing is stored
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "the client closed the connection", code="cancelled")
        last = work.result()
    finally:
        gone.cancel()
    return {"battle_id": last["battle_id"], "a": last["a"], "b": last["b"]}


@router.post("/arena/votes")
async def vote(body: VoteRequest, request: Request, state: AppState):
    store = votes(state)
    state.arena.votes.check(client_of(request))
    try:
        model_a, model_b = await asyncio.to_thread(store.vote, body.battle_id, body.winner)
    except VoteError as e:
        raise vote_error(e) from None
    return {"a": model_a, "b": model_b}


@router.post("/ratings")
async def rate(body: RatingRequest, request: Request, state: AppState):
    store = votes(state)
    session = session_of(request)
    state.arena.votes.check(client_of(request))
    try:
        model = await asyncio.to_thread(
            store.rate,
            body.answer_id,
            body.score,
            correctness=body.correctness,
            fluency=body.fluency,
            comment=body.comment,
            session=session,
            answer=state.answers.get(body.answer_id),
            client=client_of(request),
        )
    except VoteError as e:
        raise vote_error(e) from None
    return {"answer_id": body.answer_id, "model": model, "saved": True}


@router.get("/arena/leaderboard")
async def board(state: AppState):
    store, arena = votes(state), state.arena
    async with arena.board_lock:  # one refit at a time, and only when a vote or a rating came
        found, ratings = await asyncio.to_thread(lambda: (store.battles(), store.ratings()))
        key = (len(found), sum(map(len, ratings.values())))
        if arena.board.get("key") != key:
            result = await asyncio.to_thread(leaderboard, found, ratings, bootstrap=200, seed=0)
            arena.board.update(key=key, value=result)
    return arena.board["value"]


@router.post("/arena/train", status_code=202)
async def train(body: TrainRequest, state: AppState):
    votes(state)
    job = await asyncio.to_thread(start_training, state, body.model, body.steps, body.beta)
    return job.view()


@router.get("/arena/train")
async def training(state: AppState):
    votes(state)
    job = state.arena.training
    return {"status": "idle", "min_pairs": MIN_PAIRS} if job is None else job.view()
