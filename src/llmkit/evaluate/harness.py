"""llmkit models inside EleutherAI's lm-evaluation-harness: `LlmkitLM`, an `lm_eval.api.model.LM` registered as
model type `llmkit`, so any lm-eval task (and llmkit's own, see `evaluate/tasks.py`) runs on any model `llmkit.load`
accepts:

    llmkit eval tasks --model smollm2 --tasks shakespeare_cloze,arithmetic --shots 0,5 --out runs/eval
    lm_eval --model llmkit --model_args model=smollm2 --batch_size 8 --tasks my_task --include_path my_tasks/
    python -m llmkit.evaluate.harness --model llmkit ...       (lm_eval's own command line, llmkit registered)

The three request kinds follow lm-eval's `hf` model, so the numbers are the same:

    loglikelihood          log P(continuation | context), and whether the continuation is the greedy one; the
                           context is cut from the left to fit; an empty context is the prefix token (bos, else eos)
    loglikelihood_rolling  the whole text's log-likelihood in disjoint windows of the context length, the first
                           token predicted from the prefix token (perplexity benchmarks)
    generate_until         greedy (or sampled) generation, stopped at any `until` string or the eos token, batched with
                           left padding and llmkit's KV cache

Requests are sorted by length, longest first, and scored in batches; the choices of a question share one pass over
their common context (a KV cache), and generation decodes up to `gen_batch_size` prompts together.
"""

from __future__ import annotations

from typing import cast

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while it is empty)
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llmkit.errors import LlmkitError
from llmkit.model.families import Decoder, LanguageModel
from llmkit.model.layers import pad_right
from llmkit.model.weights import load as load_model
from llmkit.tokenizer.core import Tokenizer


class _TemplateView:
    """What lm-eval reads from a tokenizer for chat templates: `chat_template`."""

    def __init__(self, template):
        self.chat_template = template
        self.default_chat_template = template


@register_model("llmkit")
class LlmkitLM(TemplateLM):
    """`LlmkitLM(model="smollm2", batch_size=8)`: `model` is a name or path `llmkit.load` accepts, or a loaded model
    (with `.tokenizer`)."""

    def __init__(
        self,
        model="smollm2",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        quantize: str | None = None,
        device: str | None = None,
        gen_batch_size: int = 32,
        **kwargs,
    ):
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's command line asks for cuda by default, as its hf model, which falls back too
        self.model: LanguageModel
        if isinstance(model, torch.nn.Module):
            self.model, self.name = cast(LanguageModel, model), getattr(model, "name_or_path", type(model).__name__)
        else:
            dtypes = {
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp16": torch.float16,
                "float16": torch.float16,
                "half": torch.float16,
                "fp32": None,
                "float32": None,
                "float": None,
                "auto": None,
                None: None,
            }
            if dtype not in dtypes:
                raise LlmkitError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
            dt = dtypes[dtype]
            self.model, self.name = load_model(model, dtype=dt, quantize=quantize, device=device), str(model)
        self.model.eval()
        if self.model.tokenizer is None:
            raise LlmkitError(f"{self.name} has no tokenizer", "evaluate a model folder that holds tokenizer.json")
        self.tok: Tokenizer = self.model.tokenizer
        family = self.model.config.family
        if family == "encoder":
            raise LlmkitError(
                f"{self.name} is an encoder: lm-eval tasks score decoders and encoder-decoders",
                "use a decoder (or `llmkit eval glue` for encoders)",
            )
        self.backend = "causal" if family == "decoder" else "seq2seq"
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self._gen_batch_size = max(int(gen_batch_size), self._batch_size)  # decoding reads the weights once per step for all rows
        self.tokenizer = _TemplateView(self.tok.chat_template)
        self._device = next(self.model.parameters()).device

    @property
    def device(self):
        return self._device

    @property
    def fingerprint(self) -> str:
        """A short hash of the weights (a sample of values and the sum of each tensor) and their dtypes: the request
        cache's key, so answers of a re-trained model are never served for another."""
        from llmkit.model.weights import weights_fingerprint

        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    # --- what lm-eval asks of a model ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tok.eos_id
        return eos if eos is not None else self._stop_ids()[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return 2048 if self.model.config.position == "relative" else self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def _stop_ids(self) -> list[int]:
        from llmkit.generate import default_stop_ids

        return default_stop_ids(self.tok, self.model) or [0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's own special tokens, unless the text already starts with bos
            bos = self.tok.special.get("bos")
            add_special_tokens = not (bos and string.startswith(bos))
        ids = self.tok.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([tokens] if isinstance(tokens, int) else list(tokens), skip_special_tokens=skip_special_tokens, strict=False)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        from llmkit.tokenizer.core import DEFAULT_CHAT_TEMPLATE

        return self.tok.chat_template or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from llmkit.chat import render_chat

        return render_chat(self.tok, chat_history, add_generation_prompt=add_generation_prompt)

    # --- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether greedy decoding gives it) per (key, context ids, continuation ids).

        Requests that share a context (the choices of a multiple-choice question) share its computation: the context
        runs once, into a KV cache, and all continuations run together on top of it. Others go in batches, longest
        first."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        single = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise LlmkitError("an lm-eval request has an empty continuation", "check the task's doc_to_target / doc_to_choice")
            fits = len(context) + len(continuation) <= self.max_length + 1
            if self.backend == "causal" and fits and context:
                groups.setdefault(tuple(context), []).append(i)
            else:
                single.append(i)
        shared = [(list(c), m) for c, m in groups.items() if len(m) > 1]
        single += [m[0] for m in groups.values() if len(m) == 1]
        shared.sort(key=lambda g: -len(g[0]))
        done = set()

        def record(i, r):  # into the request cache as each batch finishes, so a killed run keeps what it scored
            out[i] = r
            if requests[i][0] is not None and i not in done:
                done.add(i)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], r)

        for chunk in self._shared_chunks(shared, requests):
            per_question = self._score_shared([c for c, _ in chunk], [[requests[i][2] for i in m] for _, m in chunk])
            for (_, members), results in zip(chunk, per_question):
                for i, r in zip(members, results):
                    record(i, r)
        single.sort(key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(single), self.batch_size):
            rows = single[start : start + self.batch_size]
            scored = (
                self._score_causal([requests[i] for i in rows])
                if self.backend == "causal"
                else [self._score_seq2seq(requests[i]) for i in rows]
            )
            for i, r in zip(rows, scored):
                record(i, r)
        return cast("list[tuple[float, bool]]", out)  # every request was scored

    def _shared_chunks(self, shared, requests):
        """Batches of questions (longest context first) whose longest context plus longest choice still fits the
        model: the batch's cache holds that many positions, so each question's context and choices must fit it."""
        chunk: list = []
        ctx, cont = 0, 0
        for context, members in shared:
            longest = max(len(requests[i][2]) for i in members)
            if chunk and (len(chunk) == self.batch_size or max(ctx, len(context)) + max(cont, longest) - 1 > self.max_length):
                yield chunk
                chunk, ctx, cont = [], 0, 0
            chunk.append((context, members))
            ctx, cont = max(ctx, len(context)), max(cont, longest)
        if chunk:
            yield chunk

    def _score_shared(self, contexts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """Questions whose choices share a context: the contexts run once, as one left-padded batch into a KV cache (the
        last position predicts each continuation's first token); then every choice of every question runs as one
        batch on its question's cached keys and values (right-padded: padding never precedes a real token).

            contexts   [pad pad c0 c1 c2]        choices   q0: [a0 a1 ·]  [b0 · ·]  q1: [d0 d1 d2] ...
                        [c0  c1 c2 c3 c4]                  rows take their question's cache row
        """
        G, W = len(contexts), max(map(len, contexts))
        host = torch.device("cpu")  # the batch is built in host memory, then copied to the model's device once
        owner = torch.tensor([g for g, conts in enumerate(continuations) for _ in conts], device=host)
        flat = [c for conts in continuations for c in conts]
        width = max(map(len, flat)) - 1
        ids = torch.zeros(G, W, dtype=torch.long, device=host)
        mask = torch.zeros(G, W + max(width, 0), dtype=torch.long, device=host)
        for g, c in enumerate(contexts):
            ids[g, W - len(c) :] = torch.tensor(c, device=host)
            mask[g, W - len(c) : W] = 1
        positions = (mask[:, :W].cumsum(-1) - 1).clamp(min=0)
        cache = cast(Decoder, self.model).new_cache(G, W + max(width, 0))
        first = F.log_softmax(
            self.model(
                ids.to(self._device),
                attention_mask=mask[:, :W].to(self._device),
                cache=cache,
                position_ids=positions.to(self._device),
                last_only=True,
                check_ids=False,
            )[:, -1].float(),
            dim=-1,
        )  # (G, V)
        rest = None
        if width > 0:
            cache.reorder(owner.to(self._device))  # (R, ...): each choice on its question's context
            x = torch.zeros(len(flat), width, dtype=torch.long, device=host)
            row_mask = mask[owner].clone()
            for r, c in enumerate(flat):
                x[r, : len(c) - 1] = torch.tensor(c[:-1], device=host)
                row_mask[r, W : W + len(c) - 1] = 1
            pos = positions[owner, -1:] + 1 + torch.arange(width, device=host)  # (R, width)
            rest = F.log_softmax(
                self.model(
                    x.to(self._device),
                    attention_mask=row_mask.to(self._device),
                    cache=cache,
                    position_ids=pos.to(self._device),
                    check_ids=False,
                ).float(),
                dim=-1,
            )  # (R, width, V)
        out, r = [], 0
        for g, conts in enumerate(continuations):
            results = []
            for c in conts:
                target = torch.tensor(c, device=self._device)
                rows = first[g : g + 1] if len(c) == 1 else torch.cat([first[g : g + 1], cast(torch.Tensor, rest)[r, : len(c) - 1]])
                results.append((rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
                r += 1
            out.append(results)
        return out

    def _score_causal(self, chunk) -> list[tuple[float, bool]]:
        """One batch, right-padded: the context cut from the left so context + continuation fit the model."""
        inputs, spans = [], []
        for _, context, continuation in chunk:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            spans.append(len(continuation))
        x, mask = pad_right(inputs, 0, self._device)
        logp = F.log_softmax(self.model(x, attention_mask=mask).float(), dim=-1)  # (B, T, V)
        results = []
        for r, ((_, _context, continuation), n) in enumerate(zip(chunk, spans)):
            end = len(inputs[r])
            rows = logp[r, end - n : end]  # (n, V): the positions that predict the continuation
            target = torch.tensor(continuation, device=self._device)
            total = rows.gather(1, target[:, None]).sum().item()
            results.append((total, bool((rows.argmax(-1) == target).all())))
        return results

    def _score_seq2seq(self, request) -> tuple[float, bool]:
        _, context, continuation = request
        cfg = self.model.config
        src = torch.tensor([context[-self.max_length :]], device=self._device)
        target = torch.tensor([continuation], device=self._device)
        start = torch.full((1, 1), cfg.decoder_start_token_id, dtype=torch.long, device=self._device)
        logp = F.log_softmax(self.model(src, torch.cat([start, target[:, :-1]], 1)).float(), dim=-1)[0]  # (n, V)
        return logp.gather(1, target[0, :, None]).sum().item(), bool((logp.argmax(-1) == target[0]).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            scores = self._loglikelihood_tokens([(None, context, pred) for context, pred in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # --- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        from llmkit.generate import GenerationConfig, generate

        args = [r.args for r in requests]
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks)
            until = [u for u in kwargs.pop("until", []) if u]
            do_sample = bool(kwargs.get("do_sample"))
            temperature = kwargs.get("temperature")  # as hf: sampling without a temperature samples at 1.0
            temperature = (1.0 if temperature is None else float(temperature)) if do_sample else 0.0
            cfg = GenerationConfig(
                max_new_tokens=int(kwargs.pop("max_gen_toks")),
                do_sample=do_sample and temperature > 0,
                temperature=temperature,
                top_p=kwargs.get("top_p"),
                top_k=kwargs.get("top_k"),
                stop_strings=until,
                truncate=True,
                seed=kwargs.get("seed"),
            )
            budget = self.max_length - cfg.max_new_tokens  # the prompt's share of the context, as hf keeps it
            if budget <= 0 and self.backend == "causal":
                raise LlmkitError(
                    f"max_gen_toks {cfg.max_new_tokens} leaves no room for a prompt in the context of {self.max_length}",
                    "lower max_gen_toks (--gen-kwargs max_gen_toks=N) or raise max_length",
                )
            members = sorted(members, key=lambda i: -len(args[i][0]))
            for s in range(0, len(members), self._gen_batch_size):
                batch = members[s : s + self._gen_batch_size]
                prompts = (
                    [self.tok_encode(args[i][0])[-budget:] for i in batch]
                    if self.backend == "causal"
                    else [self.tok_encode(args[i][0]) for i in batch]
                )
                for i, g in zip(batch, generate(self.model, self.tok, prompts, cfg, warn=lambda m: None)):
                    text = g.text
                    for u in until:  # as lm-eval: cut at any stop string
                        text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return cast("list[str]", out)  # every request was answered


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own command line with `llmkit` registered: `python -m llmkit.evaluate.harness --model llmkit ...`."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from llmkit.evaluate.tasks import offline

    offline()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
