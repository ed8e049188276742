"""The task tokenizer: a fixed vocabulary that covers every prompt and answer of the tasks.

Model: ``tokenizers`` WordPiece over a fixed vocabulary, with whitespace-only
pre-tokenisation (``WhitespaceSplit``) and the WordPiece decoder (no clean-up). Every word of
the task strings (keywords such as ``sort:``, names, grammar words, ``@ | / _ +``) is one
token; a number is split into one token per digit: the first digit as ``4`` and the following
ones as ``##5`` ``##7``, so ``decode`` glues the digits back together and
``decode(encode(s)) == s`` for every task string (tokens separated by single spaces).

Special tokens (fixed ids)::

    <pad> 0   <eos> 1   <mask> 2   <bos> 3   <unk> 4

``encode`` adds no special token (no post-processor): a training sequence is
``prompt ids + answer ids + <eos> padding`` (see :func:`encode_answer`); prepend ``<bos>``
yourself if your model wants one. ``tokenizer_config.json`` names the special tokens
(``pad_token``, ``eos_token``, ``mask_token``, ``bos_token``, ``unk_token``) so that
:meth:`dllm_jax.tokenizer.Tokenizer.from_dir` (and transformers) find them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from dllm_jax.tokenizer import Tokenizer

PAD, EOS, MASK, BOS, UNK = "<pad>", "<eos>", "<mask>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, MASK, BOS, UNK)
PAD_ID, EOS_ID, MASK_ID, BOS_ID, UNK_ID = range(5)
PUNCTUATION: tuple[str, ...] = ("@", "|", "/", "_", "+")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
CONTINUATION_PREFIX = "##"


def task_vocabulary() -> list[str]:
    """The vocabulary in id order: special tokens, task keywords, punctuation, digits,
    continuation digits, names, grammar words; then the tokens of the v2 tasks (keywords,
    symbols, record keys), appended after every v1 token so that every v1 id is unchanged."""
    from . import TASKS
    from .lists import NAMES
    from .text import GRAMMAR_WORDS
    from .v2_base import V2_TOKENS

    vocab = [
        *SPECIAL_TOKENS,
        *(t.keyword for t in TASKS.values()),
        *PUNCTUATION,
        *DIGITS,
        *(CONTINUATION_PREFIX + d for d in DIGITS),
        *NAMES,
        *GRAMMAR_WORDS,
        # ---- v2 tokens: append only, never reorder anything above
        *V2_TOKENS,
    ]
    if len(set(vocab)) != len(vocab):
        dup = sorted({t for t in vocab if vocab.count(t) > 1})
        raise AssertionError(f"task vocabulary has duplicate tokens: {dup}")
    return vocab


def build_backend():
    """The ``tokenizers.Tokenizer`` of the task vocabulary (in memory)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(task_vocabulary())}
    tok = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX, max_input_chars_per_word=100)
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t, i in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def build_task_tokenizer(out_dir: str | os.PathLike) -> "Tokenizer":
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir`` and load them back
    with :class:`dllm_jax.tokenizer.Tokenizer`."""
    from dllm_jax.tokenizer import Tokenizer

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    build_backend().save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "eos_token": EOS,
        "mask_token": MASK,
        "bos_token": BOS,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return Tokenizer.from_dir(out_dir)


def encode_answer(tokenizer: "Tokenizer", answer: str, length: int) -> list[int]:
    """Ids of ``answer`` padded with ``<eos>`` to ``length`` (the fixed answer length).

    Raises:
        ValueError: the answer needs more than ``length`` tokens.
    """
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) > length:
        raise ValueError(f"answer {answer!r} needs {len(ids)} tokens, more than the answer length {length}.")
    eos = tokenizer.eos_id
    return list(ids) + [EOS_ID if eos is None else eos] * (length - len(ids))


def decode_answer(tokenizer: "Tokenizer", ids: Sequence[int]) -> str:
    """Text of generated answer ids: everything up to the first ``<eos>``, specials dropped."""
    from dllm_jax.tokenizer import cut_at_eos

    eos = tokenizer.eos_id
    ids = [int(i) for i in ids] if eos is None else cut_at_eos(ids, eos)
    return tokenizer.decode(ids, skip_special_tokens=True)
