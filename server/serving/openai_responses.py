"""How the HTTP API writes a generation call's pieces in OpenAI's shapes: a whole chat or text
completion, its stream chunks, usage, and logprobs (with `echo`, the prompt's first)."""

from __future__ import annotations

import time

from .generation import Generations, Piece


def _usage(finals: list[Piece], n: int) -> dict:
    """One request's usage from its choices' last pieces: each prompt once (with the cached tokens
    of the sample that computed it), every choice's completion tokens."""
    firsts = [min(own, key=lambda p: p.index).output for own in _by_prompt(finals, n)]
    prompt, completion = sum(o.prompt_tokens for o in firsts), sum(len(p.output.token_ids) for p in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in firsts)}}


def _by_prompt(pieces: list[Piece], n: int) -> list[list[Piece]]:
    groups: dict[int, list[Piece]] = {}
    for piece in pieces:
        groups.setdefault(piece.index // n, []).append(piece)
    return [groups[k] for k in sorted(groups)]


class Responses:
    """How one endpoint writes pieces: whole (collected) or as stream chunks."""

    object_whole = object_chunk = id_prefix = ""

    def __init__(self, body, generations: Generations, echoes: list[str] | None = None):
        self.body = body  # the request's body (server/serving/openai_requests.py): model, n, logprobs
        self.echoes = echoes  # each prompt's text, when the answer echoes it (completions)
        self.generations = generations
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}  # sample -> its next token's offset in its text (completions' logprobs)
        self.started: set[int] = set()  # samples whose first chunk has gone out
        self.id: str | None = None  # the response's: its first piece's request id (several prompts are several requests)

    def _envelope(self, piece: Piece, obj: str, choices: list) -> dict:
        self.id = self.id or f"{self.id_prefix}-{piece.request_id}"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.body.model, "choices": choices}

    def whole(self, pieces: list[Piece]) -> dict:
        choices, finals = [], []
        for index in sorted({p.index for p in pieces}):
            own = [p for p in pieces if p.index == index]
            last = own[-1]
            whole = Piece("".join(p.text for p in own), [t for p in own for t in p.token_ids],
                          [lp for p in own for lp in p.logprobs], last.request_id, last.adapter, index=index,
                          prompt_token_ids=own[0].prompt_token_ids, prompt_logprobs=own[0].prompt_logprobs)
            choices.append(self._choice(whole, last.finish_reason, whole=True))
            finals.append(last)
        return {**self._envelope(finals[0], self.object_whole, choices), "usage": _usage(finals, self.body.n)}

    def chunk(self, piece: Piece) -> dict:
        first = piece.index not in self.started
        self.started.add(piece.index)
        return self._envelope(piece, self.object_chunk, [self._choice(piece, piece.finish_reason, first=first)])

    def usage_chunk(self, finals: list[Piece]) -> dict:
        return {**self._envelope(finals[0], self.object_chunk, []), "usage": _usage(finals, self.body.n)}

    def _texts(self, piece: Piece) -> dict[int, str]:
        return self.generations.logprob_texts(piece.logprobs)


class ChatResponses(Responses):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _choice(self, piece: Piece, finish_reason: str | None, whole: bool = False, first: bool = False) -> dict:
        if whole:
            content = {"message": {"role": "assistant", "content": piece.text}}
        else:
            content = {"delta": {"role": "assistant", "content": piece.text} if first else {"content": piece.text}}
        return {"index": piece.index, **content, "logprobs": self._logprobs(piece), "finish_reason": finish_reason}

    def _logprobs(self, piece: Piece) -> dict | None:
        if not self.body.logprobs:
            return None
        texts = self._texts(piece)
        entry = lambda token_id, logprob: {"token": texts[token_id], "logprob": logprob,  # noqa: E731
                                           "bytes": list(texts[token_id].encode())}
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in piece.logprobs]}


class CompletionResponses(Responses):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, piece: Piece, finish_reason: str | None, whole: bool = False, first: bool = False) -> dict:
        echo = self.echoes[piece.index // self.body.n] if self.echoes is not None and (whole or first) else ""
        return {"index": piece.index, "text": echo + piece.text, "logprobs": self._logprobs(piece),
                "finish_reason": finish_reason}

    def _logprobs(self, piece: Piece) -> dict | None:
        """OpenAI's completions logprobs; with echo the prompt's tokens come first, the first of
        them with null (nothing before it to predict it)."""
        if self.body.logprobs is None:
            return None
        scored = (piece.prompt_logprobs or []) + piece.logprobs
        tokens, chosen, tops = [], [], []
        if piece.prompt_token_ids is not None:
            tokens, chosen, tops = [piece.prompt_token_ids[0]], [None], [None]
        texts = self.generations.token_texts([*tokens, *(i for lp in scored for i in (lp.token_id, *(t for t, _ in lp.top)))])
        for lp in scored:
            tokens.append(lp.token_id)
            chosen.append(lp.logprob)
            tops.append({texts[t]: v for t, v in lp.top})
        offsets = []
        for token in tokens:
            offsets.append(self.text_offsets.get(piece.index, 0))
            self.text_offsets[piece.index] = offsets[-1] + len(texts[token])
        return {"tokens": [texts[t] for t in tokens], "token_logprobs": chosen, "top_logprobs": tops,
                "text_offset": offsets}
