"""Text generation: greedy, temperature, top-k, top-p, repetition penalty, stop strings and tokens, seeds, batched
prompts of different lengths, streaming; beam search for encoder-decoders.

The order in which the logits are changed before a token is picked follows `transformers`:

    logits ─► repetition penalty ─► (greedy: argmax) | temperature ─► top-k ─► top-p ─► sample

Batched decoder prompts are left-padded, so every row's next token sits in the last column:

    [pad pad  To  be  or]      attention mask 0 0 1 1 1, positions 0 0 0 1 2
    [ If  you  prick  us]      attention mask 1 1 1 1 1, positions 0 1 2 3 4

The KV cache is preallocated to prompt + new tokens: decoding writes in place and never re-allocates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.errors import LlmkitError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's eos (and <|endoftext|> / <|end|> when it has them)
    seed: int | None = None
    truncate: bool = False  # cut a prompt that does not fit the context (from the left) instead of refusing it
    num_beams: int = 1  # encoder-decoders
    length_penalty: float = 1.0
    early_stopping: bool = False

    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens (without a stop string's tokens cut from the text; see `text`)
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length"


# --- logits processing ----------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): a seen token's logit is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    picked = torch.gather(logits, 1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k_top_p(scores: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the k best tokens, then the smallest set whose probability reaches p; the rest get -inf."""
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1] = False  # always keep the best token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen token ids."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.greedy():
        return logits.argmax(-1)
    scores = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = scores.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


# --- stop conditions and streaming text ------------------------------------------------------------------------------


def default_stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    for token in ("<|endoftext|>", "<|im_end|>", "<|end|>", "</s>"):
        if token in added:
            ids.add(tokenizer.backend.token_to_id(token))
    return sorted(ids)


class TextStream:
    """Turns a growing list of token ids into text pieces, emitting only what is final:

    - text ending in an incomplete UTF-8 character (U+FFFD at the end) waits for the next token;
    - text that could be the start of a stop string waits until it is not (so the stream never shows what `stop`
      later cuts off);
    - once a stop string appears, the text before it is emitted and the stream is done.
    """

    def __init__(self, tokenizer, stop_strings: list[str], skip_special_tokens: bool = True):
        self.tok, self.stops, self.skip = tokenizer, [s for s in stop_strings if s], skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""
        self.stopped = False
        self.finish_reason = "length"
        self.prompt_ids: list[int] = []

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        for s in self.stops:
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                self.stopped = True
                text = text[:cut]
                break
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        final = len(text)
        if text.endswith("\ufffd"):
            final = len(text.rstrip("\ufffd"))
        for s in self.stops:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, final - self.emitted), 0, -1):
                if text[final - k:final] == s[:k]:
                    final -= k
                    break
        return self._emit(final)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


# --- decoder-only generation --------------------------------------------------------------------------------------------


def _prepare_prompt(ids: list[int], cfg: GenerationConfig, context: int, warn) -> list[int]:
    if not ids:
        raise LlmkitError("the prompt is empty", "give a prompt with some text")
    room = context - cfg.max_new_tokens
    if room < 1:
        raise LlmkitError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the context of {context}",
                          f"use --max-new-tokens {context // 2} or less")
    if len(ids) > room:
        if not cfg.truncate:
            raise LlmkitError(f"the prompt is {len(ids)} tokens; with {cfg.max_new_tokens} new tokens it exceeds the model's context of {context}",
                              f"shorten the prompt, lower --max-new-tokens, or pass --truncate to keep its last {room} tokens")
        warn(f"warning: the prompt was cut from {len(ids)} to its last {room} tokens to fit the context of {context}")
        ids = ids[-room:]
    return ids


def _check_stop_strings(tokenizer, cfg: GenerationConfig, warn) -> None:
    for s in cfg.stop_strings:
        if len(tokenizer.encode(s)) > cfg.max_new_tokens:
            warn(f"warning: the stop string {s!r} is longer than the {cfg.max_new_tokens} new tokens allowed, so it can never stop the output")


@torch.no_grad()
def stream_batch(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, *, warn=print,
                 streams: list | None = None) -> Iterator[list[tuple[int, str, bool]]]:
    """Decode a batch of token prompts together; yields, per step, (row, text piece, finished) for each row that moved.
    `streams`, if given, receives each row's TextStream (its ids, text and finish_reason)."""
    mcfg = model.config
    if mcfg.family != "decoder":
        raise LlmkitError(f"this generation path is for decoders; the model is a {mcfg.family}", "use generate_seq2seq for encoder-decoders")
    _check_stop_strings(tokenizer, cfg, warn)
    prompts = [_prepare_prompt(list(p), cfg, mcfg.max_seq_len, warn) for p in prompts]
    device = next(model.parameters()).device
    B, width = len(prompts), max(map(len, prompts))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros(B, width + cfg.max_new_tokens, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(B, width + cfg.max_new_tokens)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    stop_ids = torch.tensor(cfg.stop_token_ids if cfg.stop_token_ids is not None else default_stop_ids(tokenizer), device=device)
    rows = [TextStream(tokenizer, cfg.stop_strings) for _ in range(B)]
    for row, p in zip(rows, prompts):
        row.prompt_ids = p  # as decoded: after truncation
    if streams is not None:
        streams[:] = rows
    streams = rows
    seen = ids.clone()  # for the repetition penalty: prompt and output tokens
    done = torch.zeros(B, dtype=torch.bool, device=device)
    plain = B == 1  # one prompt, no padding: the causal fast path
    logits = model(ids, attention_mask=None if plain else mask[:, :width], cache=cache,
                   position_ids=None if plain else positions)[:, -1]  # (B, V)
    next_pos = positions[:, -1] + 1
    for step in range(cfg.max_new_tokens):
        tok = next_tokens(logits, seen, cfg, generator)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        seen = torch.cat([seen, tok[:, None]], dim=1)
        events = []
        for r in torch.nonzero(~done).flatten().tolist():
            t = int(tok[r])
            if bool((stop_ids == t).any()):
                done[r] = True
                events.append((r, streams[r].flush(), True))
                streams[r].finish_reason = "stop"
                continue
            piece = streams[r].push(t)
            if streams[r].stopped:
                done[r] = True
                streams[r].finish_reason = "stop"
            events.append((r, piece, bool(done[r])))
        if step == cfg.max_new_tokens - 1:
            for r in torch.nonzero(~done).flatten().tolist():
                events.append((r, streams[r].flush(), True))
                streams[r].finish_reason = "length"
            done[:] = True
        yield events
        if bool(done.all()):
            break
        mask[:, width + step] = 1
        logits = model(tok[:, None], attention_mask=None if plain else mask[:, :width + step + 1], cache=cache,
                       position_ids=None if plain else next_pos[:, None])[:, -1]
        next_pos = next_pos + 1


def generate(model, tokenizer, prompts: list[str] | list[list[int]], cfg: GenerationConfig | None = None, *, warn=print) -> list[Generation]:
    """Generate for every prompt (text or token ids); decoders batch them, encoder-decoders use generate_seq2seq."""
    cfg = cfg or GenerationConfig()
    token_prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if model.config.family == "encoder-decoder":
        return [generate_seq2seq(model, tokenizer, p, cfg) for p in token_prompts]
    streams: list[TextStream] = []
    for _ in stream_batch(model, tokenizer, token_prompts, cfg, warn=warn, streams=streams):
        pass
    return [Generation(s.prompt_ids, s.ids, s.text, s.finish_reason) for s in streams]


def stream(model, tokenizer, prompt: str | list[int], cfg: GenerationConfig | None = None, *, warn=print) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as it is decoded."""
    cfg = cfg or GenerationConfig()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    for events in stream_batch(model, tokenizer, [ids], cfg, warn=warn):
        for _, piece, _ in events:
            if piece:
                yield piece


# --- encoder-decoder generation --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_seq2seq(model, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> Generation:
    """Greedy / sampled decoding, or beam search when num_beams > 1."""
    if not prompt_ids:
        raise LlmkitError("the prompt is empty", "give a prompt with some text")
    mcfg = model.config
    device = next(model.parameters()).device
    src = torch.tensor([prompt_ids], device=device)
    enc, _ = model.encode(src)
    eos = cfg.stop_token_ids if cfg.stop_token_ids is not None else ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    if cfg.num_beams > 1:
        ids = beam_search(model, enc, cfg, start_id=mcfg.decoder_start_token_id, eos_ids=eos)
        finish = "stop" if ids and ids[-1] in eos else "length"
    else:
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        cache = model.new_cache(1, cfg.max_new_tokens + 1)
        tok = torch.tensor([[mcfg.decoder_start_token_id]], device=device)
        seen, ids, finish = tok, [], "length"
        for _ in range(cfg.max_new_tokens):
            logits = model.decode(tok, enc, cache=cache)[0][:, -1]
            nxt = next_tokens(logits, seen, cfg, generator)
            ids.append(int(nxt))
            if int(nxt) in eos:
                finish = "stop"
                break
            tok = nxt[:, None]
            seen = torch.cat([seen, tok], 1)
    text = tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=True)
    for s in cfg.stop_strings:
        if s and s in text:
            text, finish = text[:text.index(s)], "stop"
    return Generation(prompt_ids, ids, text, finish)


@torch.no_grad()
def beam_search(model, encoder_out: torch.Tensor, cfg: GenerationConfig, *, start_id: int, eos_ids: list[int]) -> list[int]:
    """Beam search over the decoder, with the semantics of `transformers`' generate():

    - keep num_beams live hypotheses; each step, take the 2·num_beams best continuations of all of them;
    - a continuation that ends in eos (or reaches max_new_tokens) and ranks among the first num_beams becomes a
      finished hypothesis, scored sum(log p) / generated_length ** length_penalty; the best num_beams are kept;
    - the live beams are the best num_beams continuations that did not finish;
    - stop when num_beams hypotheses are finished and (early_stopping) at once, or when the best live beam, scored at
      its current length, can no longer beat the worst finished one.

        step 1      step 2              finished
        <s> ─┬─ a ─┬─ a b  (-1.2)
             │     └─ a c  (-1.9)
             └─ d ─┬─ d </s> (-1.5) ──► -1.5 / 2 ** length_penalty
                   └─ d e  (-2.3)
    """
    n, device = cfg.num_beams, encoder_out.device
    enc = encoder_out.expand(n, -1, -1)
    beams = torch.full((n, 1), start_id, dtype=torch.long, device=device)  # (n, 1 + generated)
    scores = torch.zeros(n, device=device)
    scores[1:] = -1e9  # all beams start identical: only the first may expand
    finished: list[tuple[float, list[int]]] = []
    improvable = True
    eos = set(eos_ids)
    keep = max(2, 1 + len(eos)) * n
    for step in range(cfg.max_new_tokens):
        logp = model.decode(beams, enc)[0][:, -1].float().log_softmax(-1) + scores[:, None]  # (n, V)
        V = logp.shape[-1]
        top, idx = torch.topk(logp.flatten(), keep)
        last = step == cfg.max_new_tokens - 1
        generated = beams.shape[1]  # tokens after this step, the start token not counted
        full = cfg.early_stopping and len(finished) >= n
        live, live_scores = [], []
        for rank, (score, flat) in enumerate(zip(top.tolist(), idx.tolist())):
            b, t = divmod(flat, V)
            if t in eos or last:
                if rank < n and improvable and not full:
                    finished.append((score / generated ** cfg.length_penalty, beams[b, 1:].tolist() + [t]))
            elif len(live) < n:
                live.append(torch.cat([beams[b], torch.tensor([t], device=device)]))
                live_scores.append(score)
        finished = sorted(finished, key=lambda x: -x[0])[:n]
        if last or not live:
            break
        beams, scores = torch.stack(live), torch.tensor(live_scores, device=device)
        if len(finished) >= n:
            if cfg.early_stopping:
                break
            improvable = improvable and scores.max().item() / generated ** cfg.length_penalty > finished[-1][0]
            if not improvable:
                break
    return finished[0][1]
