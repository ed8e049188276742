"""OpenAI-format bodies from decoded rows: whole responses and the stream's chunks.

Streaming the denoising. The decode is one compiled loop over all steps of a batch, so no
token leaves the device before the batch has finished; a streamed request is decoded with
`GenerateConfig(trace=True)` and its denoising is REPLAYED from the trace once the decode
is done: one chunk per loop step in which the row committed tokens. Each chunk's text
(`choices[0].text`, chat: `choices[0].delta.content`) is the newly settled left-to-right
prefix (the text up to the first position still masked, cut at EOS and at `stop`), so the
chunks concatenate to exactly the non-streamed answer; the extension field `dllm` carries
that step's commits `{"step", "block", "committed": [{"position", "token", "text",
"confidence"}], "masked"}` so that a client can draw the canvas. The stream therefore shows
the denoising faithfully, but its first token arrives when the batch's decode ends, not
earlier (a chat stream sends the role chunk at once).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Iterator, Sequence

import numpy as np

from dllm_jax.serve.engine import RowResult
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


def _dllm(ch: Choice) -> dict[str, Any]:
    return {"tokens": ch.ids, "nfe": ch.row.nfe, "steps": ch.row.steps,
            "batch_rows": ch.row.batch_rows, "queued_s": round(ch.row.queued_s, 6),
            "decode_s": round(ch.row.decode_s, 6)}


def completion_body(rid: str, model: str, chat: bool, choices: Sequence[Choice],
                    use: dict[str, int]) -> dict[str, Any]:
    out = []
    for ch in choices:
        c: dict[str, Any] = {"index": ch.index, "logprobs": None,
                             "finish_reason": ch.finish_reason, "dllm": _dllm(ch)}
        if chat:
            c["message"] = {"role": "assistant", "content": ch.text}
        else:
            c["text"] = ch.text
        out.append(c)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": out, "usage": use}


# ----------------------------------------------------------------------------- streaming
def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def replay(session: Any, ch: Choice) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(step, text delta, dllm field) for each loop step in which the row committed tokens;
    the deltas concatenate to a prefix of `ch.text` (the final chunk sends the rest)."""
    row, eos = ch.row, session.cfg.eos_token_id
    fix, tokens = np.asarray(row.fix_step), np.asarray(row.tokens)
    lb = row.confidence.shape[1] if row.confidence is not None else 0
    sent = 0
    for step in sorted(set(int(s) for s in fix if s >= 0)):
        settled = (fix >= 0) & (fix <= step)
        first = int(np.argmin(settled)) if not settled.all() else len(tokens)
        prefix = session.decode_text(cut_at_eos(tokens[:first], eos))
        upto = _common_prefix(prefix, ch.text)
        delta = ch.text[sent:upto] if upto > sent else ""
        sent = max(sent, upto)
        block = int(row.block[step]) if row.block is not None else -1
        committed = []
        for pos in np.flatnonzero(fix == step):
            tok = int(tokens[pos])
            conf = None
            if row.confidence is not None and block >= 0:
                conf = round(float(row.confidence[step, pos - block * lb]), 6)
            committed.append({"position": int(pos), "token": tok,
                              "text": session.decode_text([tok]), "confidence": conf})
        yield step, delta, {"step": step, "block": block, "committed": committed,
                            "masked": int((~settled).sum())}


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


def stream_chunks(session: Any, rid: str, model: str, chat: bool,
                  choices: Sequence[Choice]) -> Iterator[dict[str, Any]]:
    """Every chunk after the decode: per-step chunks of all choices in step order, then each
    choice's final chunk (the rest of its text, finish_reason, and `dllm` totals)."""
    events = [(step, ch.index, delta, d) for ch in choices
              for step, delta, d in replay(session, ch)]
    sent = {ch.index: 0 for ch in choices}
    for step, index, delta, d in sorted(events, key=lambda e: (e[0], e[1])):
        sent[index] += len(delta)
        yield chunk(rid, model, chat, index, delta, None, d)
    for ch in choices:
        yield chunk(rid, model, chat, ch.index, ch.text[sent[ch.index]:], ch.finish_reason,
                    _dllm(ch))


__all__ = ["Choice", "chunk", "completion_body", "finish", "new_id", "replay",
           "stream_chunks", "usage"]
