"""Text generation: greedy, temperature, top-k, top-p, repetition / presence / frequency penalties, stop strings and
tokens, seeds, batched prompts of different lengths, streaming; beam search for encoder-decoders.

The order in which the logits are changed before a token is picked follows `transformers`:

    logits ─► padded-vocabulary rows dropped ─► logit bias ─► repetition penalty ─► presence / frequency penalties
           ─► (greedy: argmax) | temperature ─► top-k ─► top-p ─► sample

Each row of a batch may carry its own settings (`Sampler`), so the server's continuous batching shares this code.
Batched decoder prompts are left-padded, so every row's next token sits in the last column:

    [pad pad  To  be  or]      attention mask 0 0 1 1 1, positions 0 0 0 1 2
    [ If  you  prick  us]      attention mask 1 1 1 1 1, positions 0 1 2 3 4

The KV cache is preallocated to prompt + new tokens: decoding writes in place and never re-allocates. The prefill
computes the logits of the last position only, the token ids cross to the host once per step (for the text), and
the text is decoded incrementally (a few tokens per step, never the whole output again).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.devices import synchronize
from llmkit.errors import LlmkitError
from llmkit.grammar import Constraint

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's rule): dividing logits by it would overflow to NaN

END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end|>", "</s>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def warn_stderr(message: str) -> None:
    """The default for `warn=`: warnings go to stderr, never into the generated text on stdout."""
    print(message, file=sys.stderr)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0  # 0 (or anything below SAMPLING_EPS) means greedy
    top_k: int | None = None  # None or 0: no top-k filter
    top_p: float | None = None  # None or 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # CTRL's, on prompt and output tokens (1.0: off)
    presence_penalty: float = 0.0  # OpenAI's, on output tokens: - penalty once a token has appeared
    frequency_penalty: float = 0.0  # OpenAI's: - penalty x the times a token has appeared in the output
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids, the tokenizer's eos, and its end-of-turn tokens
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to a token's logit before anything else ([-100, 100])
    truncate: bool = False  # cut a prompt that does not fit the context (from the left) instead of refusing it
    fit_new_tokens: bool = False  # a max_new_tokens the context cannot hold after the prompt is cut to the room left
    num_beams: int = 1  # encoder-decoders
    length_penalty: float = 1.0
    early_stopping: bool = False
    json_schema: dict | None = None  # constrained decoding: the answer is a JSON document of this schema (llmkit.grammar)

    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < SAMPLING_EPS

    def check(self) -> None:
        """Refuse settings that would silently do something else (negative temperature, top-p of 0, ...)."""
        numbers = {
            k: getattr(self, k) for k in ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty")
        }
        numbers.update({k: getattr(self, k) for k in ("top_p",) if getattr(self, k) is not None})
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise LlmkitError(f"{name} {value} is not a finite number", f"give {name} a real number")
        for token, value in (self.logit_bias or {}).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -100 <= value <= 100):
                raise LlmkitError(
                    f"logit_bias {value} for token {token} is not in [-100, 100]", "use a bias in [-100, 100] (OpenAI's range)"
                )
        bad = [
            (
                not -2 <= self.presence_penalty <= 2,
                f"presence_penalty {self.presence_penalty} is not in [-2, 2]",
                "use a value in [-2, 2] (OpenAI's range)",
            ),
            (
                not -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty {self.frequency_penalty} is not in [-2, 2]",
                "use a value in [-2, 2] (OpenAI's range)",
            ),
            (self.max_new_tokens < 0, f"max_new_tokens {self.max_new_tokens} is negative", "use 0 or more"),
            (self.temperature < 0, f"temperature {self.temperature} is negative", "use 0 (greedy) or more, e.g. 0.7"),
            (self.top_k is not None and self.top_k < 0, f"top_k {self.top_k} is negative", "use a positive k, or none"),
            (self.top_p is not None and not 0 < self.top_p <= 1, f"top_p {self.top_p} is not in (0, 1]", "use e.g. 0.9, or 1 for none"),
            (self.repetition_penalty <= 0, f"repetition_penalty {self.repetition_penalty} must be positive", "use 1.0 (off) or e.g. 1.1"),
            (self.num_beams < 1, f"num_beams {self.num_beams} must be at least 1", "use 1 (no beam search) or more"),
        ]
        for failed, message, fix in bad:
            if failed:
                raise LlmkitError(message, fix)
        if self.json_schema is not None and self.stop_strings:
            raise LlmkitError("stop strings would cut a JSON answer short of its end", "drop the stop strings, or the JSON schema")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens; a stop token (eos) that ended them is not among them (transformers keeps it)
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length"


# --- logits processing ----------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): a seen token's logit is divided by `penalty` if positive, else multiplied.
    `seen` is a (B, V) boolean mask of the tokens of each row's prompt and output (never its padding)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(scores: torch.Tensor, top_k: int | torch.Tensor | None, top_p: float | torch.Tensor | None) -> torch.Tensor:
    """Keep the k best tokens, then the smallest set whose probability reaches p; the rest get -inf.
    k and p may be per row ((B,) tensors; k = 0 and p = 1 switch the filter off for that row)."""
    V = scores.shape[-1]
    if isinstance(top_k, int):
        top_k = torch.full((scores.shape[0],), top_k, device=scores.device) if top_k > 0 else None
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, V).clamp(max=V).to(scores.device)  # (B,)
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (B, 1): ties with the kth are kept
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if isinstance(top_p, (int, float)):
        top_p = None if top_p >= 1.0 else torch.full((scores.shape[0],), float(top_p), device=scores.device)
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p.to(scores.device))[:, None]
        drop[..., -1] = False  # always keep the best token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


class Sampler:
    """Chooses the next token of every row of a batch, each row with its own GenerationConfig.

    It keeps what the penalties need: `seen` (B, V), the tokens of each row's prompt and output (repetition penalty),
    and `counts` (B, V), how often each token appeared in the output (presence and frequency penalties).
    `n_valid` is the tokenizer's vocabulary: logits of a padded vocabulary's extra rows are never sampled.
    """

    def __init__(
        self,
        configs: list[GenerationConfig],
        n_valid: int,
        device,
        *,
        generator: torch.Generator | None = None,
        generators: list[torch.Generator | None] | None = None,
        constraints: list | None = None,
    ):
        self.configs, self.n_valid, self.device = list(configs), n_valid, device
        self.generator, self.generators = generator, generators
        # each row's grammar (llmkit.grammar.Constraint, None: free): its mask before sampling, the token after
        self.constraints = list(constraints) if constraints is not None else [None] * len(self.configs)
        self._settings()
        self.seen = torch.zeros(len(configs), n_valid, dtype=torch.bool, device=device) if self.use_seen else None
        self.counts = torch.zeros(len(configs), n_valid, dtype=torch.float32, device=device) if self.use_counts else None

    def _settings(self) -> None:
        c, dev = self.configs, self.device
        self.greedy = torch.tensor([x.greedy() for x in c], device=dev)
        self.all_greedy = bool(self.greedy.all())
        self.temperature = torch.tensor([x.temperature if not x.greedy() else 1.0 for x in c], device=dev)[:, None]
        # per-row filters, or None when no row uses one (decided here, once: no host sync per step)
        ks, ps = [x.top_k or 0 for x in c], [x.top_p if x.top_p is not None else 1.0 for x in c]
        # a row without top-k keeps every token: k = the vocabulary (a larger k is the vocabulary too)
        self.top_k = torch.tensor([min(k, self.n_valid) if k > 0 else self.n_valid for k in ks], device=dev) if any(ks) else None
        self.top_p = torch.tensor(ps, device=dev) if any(p < 1 for p in ps) else None
        self.rep = torch.tensor([x.repetition_penalty for x in c], device=dev)[:, None]
        self.presence = torch.tensor([x.presence_penalty for x in c], device=dev)[:, None]
        self.frequency = torch.tensor([x.frequency_penalty for x in c], device=dev)[:, None]
        self.bias = None
        if any(x.logit_bias for x in c):  # (B, V): each row's own biases
            self.bias = torch.zeros(len(c), self.n_valid, device=dev)
            for r, x in enumerate(c):
                for token, value in (x.logit_bias or {}).items():
                    if 0 <= token < self.n_valid:
                        self.bias[r, token] = value
        self.use_seen = any(x.repetition_penalty != 1.0 for x in c)
        self.use_counts = any(x.presence_penalty or x.frequency_penalty for x in c)

    def add_prompts(self, prompts: list[list[int]], rows: list[int] | None = None) -> None:
        """Mark each row's prompt tokens as seen (for the repetition penalty)."""
        if self.seen is None:
            return
        for r, p in zip(rows if rows is not None else range(len(prompts)), prompts):
            ids = torch.tensor([i for i in p if i < self.n_valid], dtype=torch.long, device=self.device)
            self.seen[r] = False
            self.seen[r, ids] = True

    def add_rows(
        self, configs: list[GenerationConfig], generators: list[torch.Generator | None] | None = None, constraints: list | None = None
    ) -> None:
        """Grow the batch by new rows (continuous batching; a sampler made with per-row `generators`); call
        `add_prompts` for them next."""
        if self.generators is None and len(self.configs):
            raise ValueError("add_rows needs a sampler with per-row generators (make it with generators=[...])")
        self.configs += list(configs)
        self.constraints += list(constraints) if constraints is not None else [None] * len(configs)
        self.generators = (self.generators or []) + list(generators or [None] * len(configs))
        self._settings()
        for name, dtype in (("seen", torch.bool), ("counts", torch.float32)):
            want = self.use_seen if name == "seen" else self.use_counts
            old = getattr(self, name)
            if not want:
                setattr(self, name, None)
                continue
            fresh = torch.zeros(len(self.configs), self.n_valid, dtype=dtype, device=self.device)
            if old is not None:
                fresh[: old.shape[0]] = old
            setattr(self, name, fresh)

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished requests leave the batch)."""
        self.configs = [self.configs[r] for r in rows]
        self.constraints = [self.constraints[r] for r in rows]
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._settings()
        self.seen = self.seen.index_select(0, index) if self.seen is not None and self.use_seen else None
        self.counts = self.counts.index_select(0, index) if self.counts is not None and self.use_counts else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of the last position -> (B,) chosen token ids (all below n_valid)."""
        logits = logits[:, : self.n_valid].float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.rep)
        if self.counts is not None:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0)
        if any(c is not None for c in self.constraints):  # the grammar's mask, row by row (the others keep every token)
            allowed = torch.ones(logits.shape, dtype=torch.bool)
            for r, c in enumerate(self.constraints):
                if c is not None:
                    allowed[r] = c.allowed(logits.shape[1])
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        choice = logits.argmax(-1)
        if not self.all_greedy:
            scores = filter_top_k_top_p(logits / self.temperature, self.top_k, self.top_p)
            probs = scores.softmax(-1)
            if self.generators is not None:  # each row its own seed (the server's requests)
                sampled = torch.stack([torch.multinomial(probs[r], 1, generator=g).squeeze(0) for r, g in enumerate(self.generators)])
            else:
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            choice = torch.where(self.greedy, choice, sampled)
        return choice

    def observe(self, tokens: torch.Tensor) -> None:
        """Record the chosen tokens (B,) for the penalties and the grammars."""
        if any(c is not None for c in self.constraints):
            for c, t in zip(self.constraints, tokens.tolist()):
                if c is not None:
                    c.consume(t)
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1


# --- stop conditions and streaming text ------------------------------------------------------------------------------


def default_stop_ids(tokenizer, model=None) -> list[int]:
    """What generation stops on by default, as the model's own runtime would:

    Hugging Face folder   its eos ids (generation_config.json's, else config.json's; a list in Llama 3.1), as
                          transformers' generate() does
    GGUF                  its eos, eot and eom ids and the vocabulary's end-of-turn tokens, as llama.cpp does
    llmkit runs, others   the tokenizer's eos and its end-of-turn tokens (<|end|>, <|im_end|>, ...)
    """
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    ends = {tokenizer.backend.token_to_id(t) for t in END_TOKENS if t in added} | ({tokenizer.eos_id} - {None})
    if model is None:
        return sorted(ends)
    cfg = model.config
    gen = cfg.extra.get("generation_eos_token_id")
    own = set(cfg.eos_ids if gen is None else ([gen] if isinstance(gen, int) else gen))
    if own and "hf_model_type" in cfg.extra:
        return sorted(own)
    return sorted(own | ends)


def stop_rules(tokenizer, cfg: GenerationConfig, model=None, warn=warn_stderr) -> tuple[set[int], list[str]]:
    """(stop token ids, stop strings). A stop string that is a special token (`<|im_end|>`) becomes a stop token: the
    decoded text never shows special tokens, so it could never match there."""
    ids = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else default_stop_ids(tokenizer, model))
    specials = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    strings = []
    for s in cfg.stop_strings:
        if not s:
            continue
        if s in specials:
            ids.add(specials[s])
            continue
        inside = [t for t in specials if t in s]
        if inside:
            warn(
                f"warning: the stop string {s!r} contains the special token {inside[0]!r}, which the decoded text never shows, "
                f"so it can never match; use {inside[0]!r} alone"
            )
        if len(tokenizer.encode(s, add_special_tokens=False)) > cfg.max_new_tokens:
            warn(
                f"warning: the stop string {s!r} is longer than the {cfg.max_new_tokens} new tokens allowed, "
                "so it can never stop the output"
            )
        strings.append(s)
    return ids, strings


class TextStream:
    """Turns a growing list of token ids into text pieces, emitting only what is final:

    - text is decoded incrementally: only the ids since the last complete piece are decoded again (with the piece
      before as context, so tokenizers that treat a leading space specially decode exactly as the whole would);
    - text ending in an incomplete UTF-8 character (U+FFFD at the end) waits for the next token;
    - text that could be the start of a stop string waits until it is not (so the stream never shows what `stop`
      later cuts off);
    - once a stop string appears (the earliest in the text, whichever stop it is), the text before it is emitted and
      the stream is done.
    """

    def __init__(self, tokenizer, stop_strings: list[str], skip_special_tokens: bool = True):
        self.tok, self.stops, self.skip = tokenizer, [s for s in stop_strings if s], skip_special_tokens
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False
        self.finish_reason = "length"
        self.prompt_ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of `text` (the context for the next piece)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, strict=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return "" if self.stopped else self._advance(final=False)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if now.endswith("\ufffd") and not final:
            return self._emit(self._final())  # an incomplete character: wait for the bytes that finish it
        start = len(self.text)
        if now.startswith(before):
            piece = now[len(before) :]
            self.text += piece
            if piece:  # the next window starts at this piece: context that shows (a special token decodes to nothing)
                self._prefix = self._read
        else:  # a tokenizer that rewrites earlier text: decode the whole from now on (never taking back what was emitted)
            whole = self._decode(self.ids)
            kept = self.text[: self.emitted]
            self.text = whole if whole.startswith(kept) else kept + whole[len(kept) :]
            start, self._prefix = min(start, len(kept)), 0
        self._read = len(self.ids)
        if self.stops:
            search_from = max(0, start - self.longest + 1)
            found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i != -1]
            if found:  # the earliest stop in the text wins, whichever is listed first
                self.text = self.text[: min(found)]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(len(self.text) if final else self._final())

    def _final(self) -> int:
        """How much of `text` is final: everything but the longest suffix that may still grow into a stop string."""
        end = len(self.text)
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end - self.emitted), hold, -1):
                if self.text[end - k :] == s[:k]:
                    hold = k
                    break
        return end - hold

    def flush(self) -> str:
        """Everything left: pending bytes of an incomplete character too (as U+FFFD, as a whole decode shows them)."""
        if self._read < len(self.ids) and not self.stopped:
            return self._advance(final=True)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


# --- decoder-only generation --------------------------------------------------------------------------------------------


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator on the device the sampling runs on (no copy of the probabilities to the host), or None."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def fit_prompt(ids: list[int], max_new_tokens: int, context: int | None, truncate: bool, warn=warn_stderr) -> list[int]:
    """The prompt, checked (or cut from the left with `truncate`) to fit the context with the new tokens. The last new
    token is never fed back, so a prompt of P tokens and N new ones needs P + N - 1 positions. `context` None: no limit."""
    if not ids:
        raise LlmkitError("the prompt is empty", "give a prompt with some text")
    if context is None:
        return ids
    room = context - max(max_new_tokens - 1, 0)
    if room < 1:
        raise LlmkitError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context}",
            f"use --max-new-tokens {context // 2} or less",
        )
    if len(ids) > room:
        if not truncate:
            raise LlmkitError(
                f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the model's context of {context}",
                f"shorten the prompt, lower --max-new-tokens, or pass --truncate to keep its last {room} tokens",
            )
        warn(f"warning: the prompt was cut from {len(ids)} to its last {room} tokens to fit the context of {context}")
        ids = ids[-room:]
    return ids


def _check_prompt_ids(prompts: list[list[int]], model, tokenizer) -> None:
    """Every prompt id must be a token of the model (checked once here, not at every decoding step)."""
    limit = model.config.vocab_size
    for p in prompts:
        bad = next((i for i in p if i < 0 or i >= limit), None)
        if bad is not None:
            raise LlmkitError(
                f"token id {bad} is outside the model's vocabulary of {limit} (ids must be 0..{limit - 1})",
                "use the tokenizer that belongs to this model",
            )


def constraint_for(cfg: GenerationConfig, tokenizer, n_valid: int, stop_ids) -> Constraint | None:
    """A row's grammar for `cfg.json_schema` (None without one). The document ends on the row's stop tokens that are
    special tokens (the model's end of sequence or of turn), never on a text token a user made a stop token."""
    if cfg.json_schema is None:
        return None
    special = tokenizer.special_ids
    eos = sorted(i for i in stop_ids if i < n_valid and i in special) or sorted(i for i in stop_ids if i < n_valid)
    if not eos:
        raise LlmkitError("a JSON answer needs a token to end on, and this request stops on none", "keep the model's stop tokens")
    return Constraint(tokenizer, cfg.json_schema, max(n_valid, tokenizer.id_limit), eos)


@torch.no_grad()
def stream_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    warn=warn_stderr,
    streams: list | None = None,
    stats: dict | None = None,
    prefix=None,
) -> Iterator[list[tuple[int, str, bool]]]:
    """Decode a batch of token prompts together; yields, per step, (row, text piece, finished) for each row that moved.
    `streams`, if given, receives each row's TextStream (its ids, text and finish_reason); `stats`, if given, receives
    the speeds as llama.cpp reports them: prompt_tokens_per_s (the prefill) and decode_tokens_per_s (the tokens after
    each row's first, over the time after the first), and cached_tokens. `prefix` (`llmkit.model.prefix.PrefixCache`,
    one prompt): the prompt's start that an earlier call computed is not prefilled again, and this call's prompt and
    answer are kept for the next (a chat's next turn starts with them)."""
    mcfg = model.config
    if mcfg.family != "decoder":
        raise LlmkitError(
            f"this generation path is for decoders; the model is a {mcfg.family}", "use generate_seq2seq for encoder-decoders"
        )
    cfg.check()
    stop_ids, stop_strings = stop_rules(tokenizer, cfg, model, warn)
    context = None if mcfg.position == "relative" else mcfg.max_seq_len  # relative positions have no fixed limit
    if cfg.fit_new_tokens and context is not None and prompts:
        room = context - max(len(p) for p in prompts) + 1  # the last new token is never fed back
        if 1 <= room < cfg.max_new_tokens:
            warn(f"note: {room} new tokens at most (not {cfg.max_new_tokens}): the model's context is {context} tokens")
            cfg = dataclasses.replace(cfg, max_new_tokens=room)
    prompts = [fit_prompt(list(p), cfg.max_new_tokens, context, cfg.truncate, warn) for p in prompts]
    _check_prompt_ids(prompts, model, tokenizer)
    rows = [TextStream(tokenizer, stop_strings) for _ in prompts]
    for row, p in zip(rows, prompts):
        row.prompt_ids = p  # as decoded: after truncation
    if streams is not None:
        streams[:] = rows
    if cfg.max_new_tokens == 0:
        yield [(r, "", True) for r in range(len(rows))]
        return
    device = next(model.parameters()).device
    B, width = len(prompts), max(map(len, prompts))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    total = width + cfg.max_new_tokens - 1  # positions fed to the model: the last new token never is
    host = torch.device("cpu")  # the prompts are laid out in host memory, then copied to the model's device once
    ids = torch.full((B, width), pad, dtype=torch.long, device=host)
    mask = torch.zeros(B, total, dtype=torch.long, device=host)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, device=host)
        mask[r, width - len(p) : width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    # the compiled decode step, when the model asks for it (`use_compiled_decode`) and where it pays
    fast = static_decoder(model, B, total, steps=cfg.max_new_tokens - 1, log=warn) if cfg.max_new_tokens > 1 else None
    cache = fast.cache() if fast is not None else model.new_cache(B, total)
    # the start an earlier call computed: its keys and values, then the prefill from where it differs
    reused = prefix.restore(prompts[0], cache) if prefix is not None and B == 1 else 0
    history = list(prompts[0]) if prefix is not None and B == 1 else None  # the tokens fed, for the next call
    n_valid = min(tokenizer.id_limit, mcfg.vocab_size)
    constraints = [constraint_for(cfg, tokenizer, n_valid, stop_ids) for _ in prompts]
    sampler = Sampler([cfg] * B, n_valid, device, generator=seeded_generator(cfg.seed, device), constraints=constraints)
    sampler.add_prompts(prompts)
    done = [False] * B
    plain = B == 1  # one prompt, no padding: the causal fast path
    started = time.perf_counter()
    logits = model(
        ids[:, reused:],
        attention_mask=None if plain else mask[:, :width],
        cache=cache,
        position_ids=None if plain else positions,
        last_only=True,
        check_ids=False,
    )[:, -1]  # (B, V)
    synchronize(device)  # the prefill's time, not its launch
    prefilled = time.perf_counter()
    if stats is not None:
        stats.update(prompt_tokens=sum(map(len, prompts)), prefill_s=prefilled - started, decode_tokens=0, decode_s=0.0)
        stats["cached_tokens"] = reused
        stats["prompt_tokens_per_s"] = stats["prompt_tokens"] / max(stats["prefill_s"], 1e-9)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    first_token = prefilled  # when the first new tokens were out (set at step 0)
    whole = False  # the cache's columns are all written (no step broken off inside)
    try:
        for step in range(cfg.max_new_tokens):
            tok = sampler(logits)  # (B,)
            sampler.observe(tok)
            events = []
            last = step == cfg.max_new_tokens - 1
            for r, t in enumerate(tok.tolist()):  # the ids cross to the host once per step, for the text
                if done[r]:
                    continue
                if t in stop_ids:  # not part of the output (transformers keeps it in its ids; the text never shows it)
                    rows[r].finish_reason, done[r] = "stop", True
                    events.append((r, rows[r].flush(), True))
                    continue
                piece = rows[r].push(t)
                if rows[r].stopped:
                    rows[r].finish_reason, done[r] = "stop", True
                elif last:
                    piece += rows[r].flush()
                    rows[r].finish_reason, done[r] = "length", True
                events.append((r, piece, done[r]))
            if stats is not None and step:
                stats["decode_tokens"] += len(events)
                stats["decode_s"] = time.perf_counter() - first_token
                stats["decode_tokens_per_s"] = stats["decode_tokens"] / max(stats["decode_s"], 1e-9)
            if step == 0:
                first_token = time.perf_counter()
            yield events
            if all(done):
                break
            mask[:, width + step] = 1
            if fast is not None:
                logits = fast.step(tok, next_pos[:, 0], width + step, mask)
            else:
                logits = model(
                    tok[:, None],
                    attention_mask=None if plain else mask[:, : width + step + 1],
                    cache=cache,
                    position_ids=None if plain else next_pos,
                    check_ids=False,
                )[:, -1]
            if history is not None:  # fed whole: its column holds every layer's keys and values
                history.append(int(tok[0]))
            next_pos = next_pos + 1
        whole = True
    except GeneratorExit:  # the caller stopped between two steps (a chat's Ctrl-C at a piece): every column is whole
        whole = True
        raise
    finally:  # kept for the next call; never after an error inside a step (its last column may be half written)
        if history is not None and whole:
            n = len(history)
            prefix.add(history, [k[0, :, :n] for k in cache.k], [v[0, :, :n] for v in cache.v])


def static_decoder(model, batch: int, capacity: int, *, steps: int | None = None, log=None):
    """A StaticDecoder (the compiled one-token step) for `model` when `use_compiled_decode(model)` turned it on and the
    model's step compiles, else None: `model.compiled_decode` True compiles before the first step, "auto" compiles (in
    the background) only when the `steps` to come pay for it, "eager" runs the same static step uncompiled. `log`
    hears when a compile starts and ends."""
    mode = getattr(model, "compiled_decode", False)
    if not mode:
        return None
    from llmkit.model.compiled import StaticDecoder, compilable

    if compilable(model) is not None:
        return None
    compile: bool | str = True  # True: compile before the first step
    if mode == "eager":
        compile = False
    elif mode == "auto":
        compile = "pays"
    return StaticDecoder(model, batch, capacity, compile=compile, steps=steps, log=log)


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Text prompts are encoded with the tokenizer's own special tokens (bos for Llama, [CLS] for BERT, </s> for T5), as
    transformers does; token-id prompts are taken as they are (chat templates encode their own)."""
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    cfg: GenerationConfig | None = None,
    *,
    warn=warn_stderr,
    stats: dict | None = None,
) -> list[Generation]:
    """Generate for every prompt (text or token ids); decoders batch them, encoder-decoders use generate_seq2seq.
    `stats` (decoders) receives prompt_tokens_per_s and decode_tokens_per_s (see stream_batch)."""
    cfg = cfg or GenerationConfig()
    token_prompts = _encode_prompts(tokenizer, prompts)
    if model.config.family == "encoder-decoder":
        return [generate_seq2seq(model, tokenizer, p, cfg, warn=warn) for p in token_prompts]
    streams: list[TextStream] = []
    for _ in stream_batch(model, tokenizer, token_prompts, cfg, warn=warn, streams=streams, stats=stats):
        pass
    return [Generation(s.prompt_ids, s.ids, s.text, s.finish_reason) for s in streams]


def stream(
    model, tokenizer, prompt: str | list[int], cfg: GenerationConfig | None = None, *, warn=warn_stderr, prefix=None
) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as it is decoded. `prefix`: a PrefixCache the
    prompt's start may come from, and that keeps this prompt and answer (`stream_batch`)."""
    cfg = cfg or GenerationConfig()
    ids = _encode_prompts(tokenizer, [prompt])[0]
    if model.config.family == "encoder-decoder":
        yield generate_seq2seq(model, tokenizer, ids, cfg, warn=warn).text
        return
    for events in stream_batch(model, tokenizer, [ids], cfg, warn=warn, prefix=prefix):
        for _, piece, _ in events:
            if piece:
                yield piece


# --- encoder-decoder generation --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_seq2seq(model, tokenizer, prompt_ids: list[int], cfg: GenerationConfig, *, warn=warn_stderr) -> Generation:
    """Greedy / sampled decoding, or beam search when num_beams > 1. The encoder runs once; the decoder's self- and
    cross-attention keys and values are cached."""
    if not prompt_ids:
        raise LlmkitError("the prompt is empty", "give a prompt with some text")
    cfg.check()
    if cfg.json_schema is not None:
        raise LlmkitError("structured output (a JSON schema) is implemented for decoders", "use a decoder model, or no schema")
    mcfg = model.config
    if mcfg.position != "relative" and cfg.max_new_tokens > mcfg.max_seq_len:  # the decoder's positions run out
        raise LlmkitError(
            f"max_new_tokens {cfg.max_new_tokens} is more than the decoder's context of {mcfg.max_seq_len}",
            f"use --max-new-tokens {mcfg.max_seq_len} or less",
        )
    if cfg.max_new_tokens == 0:
        return Generation(prompt_ids, [], "", "length")
    if len(prompt_ids) > mcfg.max_seq_len and mcfg.position != "relative":
        if not cfg.truncate:
            raise LlmkitError(
                f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of {mcfg.max_seq_len}",
                f"shorten the prompt, or pass --truncate to keep its last {mcfg.max_seq_len} tokens",
            )
        warn(f"warning: the prompt was cut from {len(prompt_ids)} to its last {mcfg.max_seq_len} tokens")
        prompt_ids = prompt_ids[-mcfg.max_seq_len :]
    _check_prompt_ids([prompt_ids], model, tokenizer)
    device = next(model.parameters()).device
    src = torch.tensor([prompt_ids], device=device)
    enc, _ = model.encode(src)
    eos, stop_strings = stop_rules(tokenizer, cfg, model, warn)
    n_valid = min(tokenizer.id_limit, mcfg.vocab_size)
    if cfg.num_beams > 1:
        ids = beam_search(model, enc, cfg, start_id=mcfg.decoder_start_token_id, eos_ids=sorted(eos), n_valid=n_valid)
        finish = "stop" if ids and ids[-1] in eos else "length"
    else:
        sampler = Sampler([cfg], n_valid, device, generator=seeded_generator(cfg.seed, device))
        cache = model.new_cache(1, cfg.max_new_tokens)
        tok = torch.tensor([[mcfg.decoder_start_token_id]], device=device)
        sampler.add_prompts([[mcfg.decoder_start_token_id]])
        ids, finish = [], "length"
        for _ in range(cfg.max_new_tokens):
            nxt = sampler(model.decode(tok, enc, cache=cache, check_ids=False)[0][:, -1])
            sampler.observe(nxt)
            ids.append(int(nxt))
            if ids[-1] in eos:
                finish = "stop"
                break
            tok = nxt[:, None]
    if finish == "stop":
        ids = ids[:-1]  # the eos that ended the output is not part of it (as for decoders)
    text = tokenizer.decode(ids, skip_special_tokens=True, strict=False)
    found = [i for i in (text.find(s) for s in stop_strings) if i != -1]
    if found:
        text, finish = text[: min(found)], "stop"
    return Generation(prompt_ids, ids, text, finish)


@torch.no_grad()
def beam_search(
    model, encoder_out: torch.Tensor, cfg: GenerationConfig, *, start_id: int, eos_ids: list[int], n_valid: int | None = None
) -> list[int]:
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

    Each beam keeps its KV cache: after a step the surviving beams take their parents' cache rows.
    """
    n, device = cfg.num_beams, encoder_out.device
    if cfg.max_new_tokens == 0:
        return []
    enc = encoder_out.expand(n, -1, -1)
    cache = model.new_cache(n, cfg.max_new_tokens)
    beams = torch.full((n, 1), start_id, dtype=torch.long, device=device)  # (n, 1 + generated)
    scores = torch.zeros(n, device=device)
    scores[1:] = -1e9  # all beams start identical: only the first may expand
    finished: list[tuple[float, list[int]]] = []
    improvable = True
    eos = set(eos_ids)
    keep = max(2, 1 + len(eos)) * n
    for step in range(cfg.max_new_tokens):
        logp = model.decode(beams[:, -1:], enc, cache=cache, check_ids=False)[0][:, -1].float().log_softmax(-1)  # over all rows
        if n_valid is not None:
            logp = logp[:, :n_valid]  # then the padding rows drop out, as transformers scores them
        logp = logp + scores[:, None]  # (n, V)
        V = logp.shape[-1]
        top, idx = torch.topk(logp.flatten(), keep)
        last = step == cfg.max_new_tokens - 1
        generated = beams.shape[1]  # tokens after this step, the start token not counted
        full = cfg.early_stopping and len(finished) >= n
        live: list[torch.Tensor] = []
        parents: list[int] = []
        live_scores: list[float] = []
        for rank, (score, flat) in enumerate(zip(top.tolist(), idx.tolist())):
            b, t = divmod(flat, V)
            if t in eos or last:
                if rank < n and improvable and not full:
                    finished.append((score / generated**cfg.length_penalty, beams[b, 1:].tolist() + [t]))
            elif len(live) < n:
                live.append(torch.cat([beams[b], torch.tensor([t], device=device)]))
                parents.append(b)
                live_scores.append(score)
        finished = sorted(finished, key=lambda x: -x[0])[:n]
        if last or not live:
            break
        beams, scores = torch.stack(live), torch.tensor(live_scores, device=device)
        cache.reorder(torch.tensor(parents, device=device), cross=False)  # the beams share one encoder output
        if len(finished) >= n:
            if cfg.early_stopping:
                break
            improvable = improvable and scores.max().item() / generated**cfg.length_penalty > finished[-1][0]
            if not improvable:
                break
    return finished[0][1]
