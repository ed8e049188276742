"""OpenAI-format bodies from decoded rows: whole responses and the stream's chunks.

Streaming the denoising. The scheduler decodes block by block and hands every streamed
row's state to the request after each block (`lanes.Lane.step`), so chunks leave as the
blocks are decoded: the first one block after the row started. `ChoiceStream` turns a
row's state into one chunk per step of the row that committed tokens. Each chunk's text
(`choices[0].text`, chat: `choices[0].delta.content`) is the newly settled left-to-right
prefix (the text up to the first position still masked, cut at EOS and at `stop`, less
what could still change: the last settled token's text and a tail that could begin a stop
string), so the chunks concatenate to exactly the non-streamed answer; the extension field
`dllm` carries that step's commits `{"step", "block", "committed": [{"position", "token",
"text", "confidence"}], "masked"}` (step: the row's own step, as in `generate`; masked:
positions still masked after it) so that a client can draw the canvas. The last chunk of a
choice carries the rest of its text, `finish_reason` and the `dllm` totals. Requests that
`generate` decodes whole (speculative controllers) get all their chunks at the end.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Iterator, Sequence

import numpy as np

from dllm_jax.serve.lanes import RowResult
from dllm_jax.session import cut_at_eos


@dataclasses.dataclass(frozen=True)
class Choice:
    """One answer: ids before EOS, text cut at the first stop string, and why it ended."""

    index: int
    ids: list[int]
    text: str
    finish_reason: str
    row: RowResult


def finish(session: Any, row: RowResult, index: int, stops: Sequence[str]) -> Choice:
    eos = session.cfg.eos_token_id
    ids = cut_at_eos(row.tokens, eos)
    text, reason = _cut_stop(session.decode_text(ids), stops)
    if reason is None:
        reason = "stop" if len(ids) < len(row.tokens) else "length"
    return Choice(index, ids, text, reason, row)


def _cut_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], "stop") if hits else (text, None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_lengths: Sequence[int], choices: Sequence[Choice], n: int) -> dict[str, int]:
    p = sum(prompt_lengths) * n
    c = sum(len(ch.ids) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def dllm_totals(ch: Choice) -> dict[str, Any]:
    return {"tokens": ch.ids, "nfe": ch.row.nfe, "steps": ch.row.steps,
            "batch_rows": ch.row.batch_rows, "joined_after_blocks": ch.row.joined_after,
            "queued_s": round(ch.row.queued_s, 6), "decode_s": round(ch.row.decode_s, 6)}


def completion_body(rid: str, model: str, chat: bool, choices: Sequence[Choice],
                    use: dict[str, int]) -> dict[str, Any]:
    out = []
    for ch in choices:
        c: dict[str, Any] = {"index": ch.index, "logprobs": None,
                             "finish_reason": ch.finish_reason, "dllm": dllm_totals(ch)}
        if chat:
            c["message"] = {"role": "assistant", "content": ch.text}
        else:
            c["text"] = ch.text
        out.append(c)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": out, "usage": use}


# ----------------------------------------------------------------------------- streaming
def _stop_safe(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of `text` that no stop string can still cut: before the first
    stop string in it and before any tail that begins one."""
    end = len(text)
    for s in stops:
        hit = text.find(s)
        if hit >= 0:
            end = min(end, hit)
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return end


class ChoiceStream:
    """The stream of one choice: row states in, (text delta, dllm field) per new step out.

    The deltas concatenate to a prefix of the choice's final text (`final_delta` gives the
    rest), provided the tokenizer decodes a prefix of ids to a prefix of the text up to
    the last token (true of the word-level, byte-level BPE and SentencePiece tokenizers
    used here; a trailing incomplete character is held back)."""

    def __init__(self, session: Any, stops: Sequence[str], block_length: int) -> None:
        self.session, self.stops, self.lb = session, list(stops), block_length
        self.sent = ""
        self.step = -1

    def _settled_text(self, tokens: np.ndarray, first: int) -> str:
        eos = self.session.cfg.eos_token_id
        ids = cut_at_eos(tokens[:first], eos)
        if len(ids) == len(tokens) or len(ids) < first:   # the answer is complete
            text, _ = _cut_stop(self.session.decode_text(ids), self.stops)
            return text
        text = self.session.decode_text(ids[:-1]).rstrip("\ufffd")
        return text[:_stop_safe(text, self.stops)]

    def update(self, row: RowResult) -> Iterator[tuple[str, dict[str, Any]]]:
        fix, tokens = np.asarray(row.fix_step), np.asarray(row.tokens)
        conf = np.asarray(row.confidence)
        for step in sorted(set(int(s) for s in fix if s > self.step)):
            settled = (fix >= 0) & (fix <= step)
            first = int(np.argmin(settled)) if not settled.all() else len(tokens)
            text = self._settled_text(tokens, first)
            delta = ""
            if text.startswith(self.sent) and len(text) > len(self.sent):
                delta = text[len(self.sent):]
                self.sent = text
            where = np.flatnonzero(fix == step)
            committed = [{"position": int(pos), "token": int(tokens[pos]),
                          "text": self.session.decode_text([int(tokens[pos])]),
                          "confidence": None if np.isnan(conf[pos]) else round(
                              float(conf[pos]), 6)} for pos in where]
            self.step = step
            yield delta, {"step": step, "block": int(where[0]) // self.lb,
                          "committed": committed, "masked": int((~settled).sum())}

    def final_delta(self, ch: Choice) -> str:
        return ch.text[len(self.sent):] if ch.text.startswith(self.sent) else ""


def chunk(rid: str, model: str, chat: bool, index: int, text: str | None,
          finish_reason: str | None, dllm: dict[str, Any] | None = None,
          role: bool = False) -> dict[str, Any]:
    """One `text_completion` / `chat.completion.chunk` object with one choice."""
    c: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        c["delta"] = delta
    else:
        c["text"] = text or ""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else
                            "text_completion", "created": int(time.time()), "model": model,
                            "choices": [c]}
    if dllm is not None:
        body["dllm"] = dllm
    return body


__all__ = ["Choice", "ChoiceStream", "chunk", "completion_body", "dllm_totals", "finish", "new_id",
           "usage"]
