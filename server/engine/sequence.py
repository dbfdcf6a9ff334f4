"""A request as the engine runs it: its tokens so far, where its keys live (its row and KV
blocks), its adapter, where it is in its grammar. The scheduler moves it between queues, the runner computes on it, the engine
hands its tokens to the caller's handle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .requests import Request, RequestHandle, TokenLogprob
from .slots import LoadedAdapter
from .structured import TokenMatcher


@dataclass(eq=False)
class Sequence:
    request: Request
    handle: RequestHandle
    adapter: LoadedAdapter | None
    stop_ids: frozenset[int]
    seed: int | None  # of its sampling noise (server/model/sampling.py); None: never sampled (scoring)
    matcher: TokenMatcher | None = None  # the request's place in its grammar
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    generated: list[int] = field(default_factory=list)
    row: int = -1  # its batch row while admitted (its seen-token table, its block table)
    blocks: list[int] = field(default_factory=list)  # its KV cache blocks, in order (server/engine/blocks.py)
    prefilled: int = 0  # tokens already in the KV cache (a cached prefix, chunks prefilled so far)
    cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    prefix_keys: tuple[int, list[bytes]] | None = None  # (len(tokens), its blocks' prefix keys), server/engine/blocks.py
    submitted: float = field(default_factory=time.monotonic)
    missed: bool = False  # its adapter had no slot when it was first up for admission
    preempted: int = 0  # times its blocks were taken back mid-decode (it is recomputed on readmission)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.., when asked for

    @property
    def shares_prefix(self) -> bool:
        """Whether it may take a cached prefix's blocks: not while its prompt's logprobs are still
        to be computed, which needs every prompt position's logits."""
        wanted = self.request.sampling.prompt_logprobs is not None
        return not wanted or len(self.prompt_logprobs) == len(self.request.prompt_ids) - 1

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter else 0

    @property
    def queue_key(self) -> tuple[str | None, str | None]:
        """Whose turn it waits for: its tenant's, then its adapter's (None: no tenants; the base model)."""
        return self.request.tenant, self.adapter.name if self.adapter else None

    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.request.sampling.max_new_tokens - len(self.generated)
