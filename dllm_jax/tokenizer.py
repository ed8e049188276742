"""Tokenizer: a thin wrapper around the Hugging Face ``tokenizers`` library (not ``transformers``).

Loads a model folder the way ``transformers.PreTrainedTokenizerFast.from_pretrained`` does for
the parts we need:

* ``tokenizer.json``: the fast tokenizer (required);
* ``tokenizer_config.json``: named special tokens (``bos_token``, ``eos_token``, ``pad_token``,
  ...; plain strings or ``{"content": ...}`` objects), ``clean_up_tokenization_spaces`` and
  ``chat_template`` (``add_bos_token`` / ``add_eos_token`` are ignored: the post-processor of
  ``tokenizer.json`` decides, as in transformers 5);
* ``special_tokens_map.json`` (legacy): overrides the named special tokens of the config;
* ``chat_template.jinja``: overrides the config's ``chat_template``.

Chat templates are rendered with jinja2 as transformers does: an immutable sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``{% generation %}`` block tag (rendered as its body), the ``tojson`` filter without HTML
escaping, the globals ``raise_exception`` and ``strftime_now``, and the variables
``messages``, ``add_generation_prompt``, ``tools``, ``documents`` plus every named special
token as a string (``bos_token``, ``eos_token``, ...).

Prompts for the decoder are batched LEFT-padded: ``batch_encode`` returns ``ids [B, P]``
int32 and ``valid [B, P]`` bool (False on the padding, which sits at the start of a row).

Words the vocabulary lacks (encoded as the unknown token, ``<unk>``) are never silent:
``unknown_words="error"`` raises TokenizerError naming them (what a closed vocabulary wants:
the task tokenizer, where an unknown word is a typo or a prompt from outside the tasks and the
answer would be meaningless), ``"warn"`` (the default) prints one ``warning:`` line naming them
on stderr and encodes them as the unknown token (subword tokenizers, where ``<unk>`` is a rare
unsupported character in an otherwise intact prompt), ``"ignore"`` encodes silently. The unknown
token typed literally in the text is not an unknown word.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

import numpy as np

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
UNKNOWN_WORDS_POLICIES = ("error", "warn", "ignore")


class TokenizerError(ValueError):
    """A tokenizer folder or input that cannot be used; the message says how to fix it."""


def _token_str(value: Any) -> Optional[str]:
    """A special-token entry of tokenizer_config.json as a string (str or {"content": str})."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); restore the file from the model's original files.") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object; restore the file from the model's original files.")
    return data


def _compile_chat_template(source: str):
    """Compile a chat template with the same jinja2 environment rules as transformers."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask marker): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def cut_at_eos(tokens: Sequence[int] | np.ndarray, eos_id: int) -> list[int]:
    """Answer ids `[gen_length]` -> the ids before the first EOS (all of them without one)."""
    out = [int(t) for t in np.asarray(tokens).reshape(-1)]
    return out[:out.index(eos_id)] if eos_id in out else out


@dataclass
class Tokenizer:
    """Text <-> token ids, chat templates and left-padded batches.

    Attributes:
        backend: the ``tokenizers.Tokenizer``.
        special_tokens: named special tokens as strings (``bos_token``, ``eos_token``, ...).
        chat_template: the jinja source, or None.
        clean_up_tokenization_spaces: apply transformers' space clean-up in ``decode``
            (skipped for BPE models, as transformers does).
        unknown_words: what ``encode`` does with words the vocabulary lacks: "error",
            "warn" or "ignore" (see the module docstring).
    """

    backend: Any
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: Optional[str] = None
    clean_up_tokenization_spaces: bool = False
    unknown_words: str = "warn"
    _compiled_template: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unknown_words not in UNKNOWN_WORDS_POLICIES:
            raise TokenizerError(f"unknown_words must be one of {', '.join(UNKNOWN_WORDS_POLICIES)}, "
                                 f"got {self.unknown_words!r}.")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, unknown_words: str = "warn") -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``chat_template.jinja`` when present) from ``model_dir``; ``unknown_words``: see the
        class."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HFTokenizer

        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise TokenizerError(f"{model_dir} is not a folder; pass the model folder that holds tokenizer.json.")
        tok_path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise TokenizerError(
                f"No tokenizer.json in {model_dir}; copy tokenizer.json (and tokenizer_config.json) from the "
                "model's Hugging Face repository into this folder."
            )
        try:
            backend = _HFTokenizer.from_file(tok_path)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(
                f"{tok_path} could not be read by the tokenizers library ({e}); download it again from the "
                "model's repository."
            ) from e
        backend.no_padding()
        backend.no_truncation()

        config: dict = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            config = _read_json(cfg_path)

        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            tok = _token_str(config.get(name))
            if tok is not None:
                special[name] = tok
        map_path = os.path.join(model_dir, "special_tokens_map.json")
        if os.path.isfile(map_path):  # legacy file; transformers lets it override the config
            for name, value in _read_json(map_path).items():
                tok = _token_str(value)
                if name in SPECIAL_TOKEN_NAMES and tok is not None:
                    special[name] = tok

        # Named special tokens that are not yet added tokens of tokenizer.json become special added
        # tokens (as transformers does on load): matched whole in the text, dropped by
        # decode(skip_special_tokens=True); a token already in the model vocabulary keeps its id.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(special.values()) if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        # The post-processor of tokenizer.json decides which special tokens encode() adds.
        # add_bos_token / add_eos_token in tokenizer_config.json are ignored, as transformers 5
        # ignores them whenever a tokenizer.json exists.

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        return cls(
            backend=backend,
            special_tokens=special,
            chat_template=template if isinstance(template, str) else None,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            unknown_words=unknown_words,
        )

    # ------------------------------------------------------------------ ids

    def token_id(self, name: str) -> Optional[int]:
        """Id of a named special token (``'eos_token'``, ``'pad_token'``, ...), or None."""
        tok = self.special_tokens.get(name)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def pad_id(self) -> int:
        """Padding id: ``pad_token``, else ``eos_token`` (as Dream and most decoders do)."""
        for name in ("pad_token", "eos_token"):
            i = self.token_id(name)
            if i is not None:
                return i
        raise TokenizerError(
            "This tokenizer has neither a pad_token nor an eos_token; set \"pad_token\" in tokenizer_config.json."
        )

    @property
    def eos_id(self) -> Optional[int]:
        return self.token_id("eos_token")

    @property
    def bos_id(self) -> Optional[int]:
        return self.token_id("bos_token")

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (like ``tokenizer(text)["input_ids"]`` in transformers).

        Set ``add_special_tokens=False`` for text that already went through a chat template
        (which writes its own BOS), as ``apply_chat_template(tokenize=True)`` does.

        Raises:
            TokenizerError: ``text`` is not a string or encodes to no token.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}.")
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids = list(enc.ids)
        if not ids:
            raise TokenizerError("The prompt is empty (it encodes to no token); pass a non-empty prompt.")
        if self.unknown_words != "ignore":
            words = self._unknown_words(text, ids, enc.offsets)
            if words:
                self._report_unknown(words)
        return ids

    @property
    def unk_token(self) -> Optional[str]:
        """The unknown token (``<unk>``, ``[UNK]``) of the vocabulary, or None without one."""
        tok = self.special_tokens.get("unk_token") or getattr(self.backend.model, "unk_token", None)
        return tok if isinstance(tok, str) and self.backend.token_to_id(tok) is not None else None

    def _unknown_words(self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[str]:
        unk = self.unk_token
        if unk is None:
            return []
        unk_id = self.backend.token_to_id(unk)
        words = [text[a:b] for i, (a, b) in zip(ids, offsets) if i == unk_id and text[a:b] != unk]
        return list(dict.fromkeys(w for w in words if w))

    def unknown_words_of(self, text: str) -> list[str]:
        """The words of ``text`` (in order, without repeats) the vocabulary lacks."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return self._unknown_words(text, enc.ids, enc.offsets)

    def _report_unknown(self, words: list[str]) -> None:
        shown = ", ".join(repr(w) for w in words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "")
        plural = "s" if len(words) > 1 else ""
        if self.unknown_words == "error":
            raise TokenizerError(
                f"the prompt has word{plural} the model's vocabulary does not have: {shown}; they would be read "
                f"as {self.unk_token}. Use only words the model was trained on (a task model knows the task "
                f"prompts, e.g. 'sort: 9 4 7 1').")
        print(f"warning: word{plural} not in the tokenizer's vocabulary, read as {self.unk_token}: {shown}.",
              file=sys.stderr, flush=True)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D array), special tokens dropped by default."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_encode(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode several prompts into one LEFT-padded batch.

        Args:
            texts: ``B`` non-empty strings.
        Returns:
            ``(ids [B, P] int32, valid [B, P] bool)`` with ``P`` the longest prompt; row ``b``
            holds ``P - len_b`` pad ids (``pad_id``, valid False) and then its tokens.
        Raises:
            TokenizerError: no text, or an empty prompt.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise TokenizerError("batch_encode got no prompt; pass a list with at least one string.")
        seqs = []
        for k, text in enumerate(texts):
            try:
                seqs.append(self.encode(text, add_special_tokens=add_special_tokens))
            except TokenizerError as e:
                raise TokenizerError(f"Prompt {k}: {e}") from None
        p = max(len(s) for s in seqs)
        ids = np.full((len(seqs), p), self.pad_id, dtype=np.int32)
        valid = np.zeros((len(seqs), p), dtype=bool)
        for b, s in enumerate(seqs):
            ids[b, p - len(s):] = s
            valid[b, p - len(s):] = True
        return ids, valid

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template.

        Same output as transformers' ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)``. Extra keyword arguments become template variables
        (and override the special tokens of the same name).

        Raises:
            TokenizerError: the tokenizer has no chat template.
            jinja2.exceptions.TemplateError: the template called ``raise_exception``.
        """
        if self.chat_template is None:
            raise TokenizerError(
                "This tokenizer has no chat template; add \"chat_template\" to tokenizer_config.json (or a "
                "chat_template.jinja file), or pass the raw prompt text instead."
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return self._compiled_template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )
