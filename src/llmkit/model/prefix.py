"""A prefix cache: keys and values of earlier prompts (and of the answers that followed them), kept so that a new
prompt that starts with the same tokens is prefilled only from where it differs. The serving engine keeps one per
model (`llmkit.serve.engine`), a chat session one for its turns (`llmkit.chat.ChatSession`, through `stream_batch`).

A decoder's keys and values at a position depend only on the tokens up to it, so the columns of a shared start (a
system prompt, few-shot examples, the earlier turns of a conversation) are the same whichever request computed them.
vLLM keeps them in hashed blocks, llama.cpp's server per slot (`cache_prompt`); here each finished prefill and each
finished answer is one entry (its token ids and its columns, layer by layer), the longest shared start of any entry
is reused, and entries leave least recently used first when the cache would hold more than its bytes.

    entry "You are a helpful assistant. ... What is 2 + 2?" + answer "4"
    new    "You are a helpful assistant. ... What is 2 + 2?" + answer "4" + "And 3 + 3?"   -> prefill only the new turn
"""

from __future__ import annotations

import collections

import torch

MIN_TOKENS = 16  # shorter shared starts are prefilled again: a lookup and a copy would cost about what they save


class PrefixCache:
    """Token ids -> their keys and values (per layer: (n_kv_heads, tokens, head_dim)), at most `max_bytes`."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_TOKENS):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = collections.OrderedDict()
        self.arrays: dict[tuple[int, ...], torch.Tensor] = {}  # each entry's ids as a tensor, for the comparisons
        self.bytes = 0
        self.hits = self.reused_tokens = 0

    @staticmethod
    def _size(ks: list[torch.Tensor], vs: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in (*ks, *vs))

    def _best(self, ids: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """(how many of `ids`' first tokens an entry holds, at most all but the last; that entry), compared in C: a
        2,000-token prompt in microseconds."""
        best, best_key = 0, None
        want = torch.tensor(ids, dtype=torch.long)
        for key, have in self.arrays.items():
            n = min(len(key), len(ids) - 1)
            if n <= best:
                continue
            differ = torch.nonzero(have[:n] != want[:n])
            same = int(differ[0, 0]) if len(differ) else n
            if same > best:
                best, best_key = same, key
        return best, best_key

    def longest(self, ids: list[int]) -> int:
        """How many of `ids`' first tokens an entry holds (0 below `min_tokens`), without touching the entries' order."""
        best, _ = self._best(ids)
        return best if best >= self.min_tokens else 0

    def lookup(self, ids: list[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]] | None:
        """(n, keys, values) of the longest start of `ids` an entry holds (at most all but its last token: that one is
        prefilled, for its logits), each (n_kv_heads, n, head_dim) per layer; None below `min_tokens`."""
        best, best_key = self._best(ids)
        if best_key is None or best < self.min_tokens:
            return None
        self.entries.move_to_end(best_key)
        ks, vs = self.entries[best_key]
        self.hits += 1
        self.reused_tokens += best
        return best, [k[:, :best] for k in ks], [v[:, :best] for v in vs]

    def restore(self, ids: list[int], cache) -> int:
        """Write the longest cached start of `ids` into row 0 of `cache` (a KVCache) and move its position past it;
        returns how many tokens it holds now (0: none cached), from where the prefill goes on."""
        hit = self.lookup(ids)
        if hit is None:
            return 0
        n, ks, vs = hit
        for layer, (k, v) in enumerate(zip(ks, vs)):
            cache.k[layer][0, :, :n] = k
            cache.v[layer][0, :, :n] = v
        cache.pos = n
        return n

    def add(self, ids: list[int], ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Keep `ids`' keys and values (copied), unless an entry already starts with all of them; entries that are
        starts of `ids` give way (the new one holds them)."""
        if len(ids) < self.min_tokens or self._size(ks, vs) > self.max_bytes:  # (views: nothing copied yet)
            return
        key = tuple(ids)
        for other in self.entries:
            if len(other) >= len(key) and other[: len(key)] == key:
                self.entries.move_to_end(other)
                return
        for other in [o for o in self.entries if len(o) < len(key) and key[: len(o)] == o]:
            self.bytes -= self._size(*self.entries.pop(other))
            del self.arrays[other]
        ks, vs = [k.detach().clone() for k in ks], [v.detach().clone() for v in vs]
        size = self._size(ks, vs)
        self.entries[key] = (ks, vs)
        self.arrays[key] = torch.tensor(key, dtype=torch.long)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, (old_k, old_v) = self.entries.popitem(last=False)
            del self.arrays[old]
            self.bytes -= self._size(old_k, old_v)

    def clear(self) -> None:
        self.entries.clear()
        self.arrays.clear()
        self.bytes = 0
