"""The front door: a model folder loaded once, then prompts in and answers out.

Every command (`generate`, `batch`, `bench`, `train-controller`, later `serve`) and every
notebook goes through this module, so that the small jobs around a decode exist once:
resolving the model folder (the bundled default, `~` expanded), loading config + params +
tokenizer + the fitted controller files, picking the params layout for the backend,
encoding prompts (chat template), left-padding a batch, cutting answers at EOS.

    from dllm_jax import session
    s = session.load()                              # the bundled model
    gen = GenerateConfig(gen_length=32, steps=32)
    [a] = s.generate(["sort: 9 4 7 1"], gen, make_controller("threshold"))
    a.text, a.tokens, a.nfe
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dllm_jax.config import ConfigError, GenerateConfig, ModelConfig
from dllm_jax.tokenizer import cut_at_eos  # noqa: F401  (part of the front door's API)

TRAIN_CONFIG_FILE = "train_config.json"


class SessionError(ConfigError):
    """A model folder or prompt that cannot be used; the message says how to fix it."""


# ----------------------------------------------------------------------------- small jobs
def resolve_model_dir(model_dir: str | os.PathLike | None, flag: str = "--model") -> Path:
    """The model folder to use: `model_dir` with `~` expanded, or the bundled model for None.

    Raises SessionError (naming `flag`) when the folder does not exist.
    """
    if model_dir is None:
        from dllm_jax.pretrained import bundled_model_dir

        try:
            return bundled_model_dir()
        except FileNotFoundError as e:
            raise SessionError(str(e)) from None
    path = Path(os.path.expanduser(os.fspath(model_dir)))
    if path.exists() and not path.is_dir():
        raise SessionError(f"{flag} {path} is a file, not a model folder; pass {flag} DIR (a "
                           f"folder made by `dllm-jax convert` or `dllm-jax train`).")
    if not path.is_dir():
        raise SessionError(f"model folder {path} does not exist; pass {flag} DIR (a folder made "
                           f"by `dllm-jax convert` or `dllm-jax train`).")
    return path


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists into a batch.

    Args:
      seqs: the prompts, each a non-empty list of ids.
      pad_id: id written on padding (never attended to: `valid` is False there).
      width: columns (default: the longest prompt); must be >= every prompt.
      rows: rows (default: len(seqs)); extra rows are copies of the first prompt, for a
        fixed batch shape (their answers are the caller's to drop).
    Returns:
      ids int32 `[rows, width]`, valid bool `[rows, width]`.
    """
    if not seqs:
        raise SessionError("no prompts given; pass at least one.")
    longest = max(len(s) for s in seqs)
    width = longest if width is None else int(width)
    rows = len(seqs) if rows is None else int(rows)
    if width < longest or rows < len(seqs):
        raise SessionError(f"a batch of {len(seqs)} prompts up to {longest} tokens does not fit "
                           f"[{rows}, {width}].")
    padded = list(seqs) + [seqs[0]] * (rows - len(seqs))
    ids = np.full((rows, width), pad_id, np.int32)
    valid = np.zeros((rows, width), bool)
    for r, s in enumerate(padded):
        if len(s):
            ids[r, width - len(s):] = s
            valid[r, width - len(s):] = True
    return ids, valid


def check_prompt_ids(ids: Sequence[int], cfg: ModelConfig, gen_length: int) -> None:
    """Raise SessionError unless `ids` is a non-empty prompt of in-vocabulary ids that leaves
    room for `gen_length` answer tokens within the model's maximum length (the rules of
    `dllm_jax.prompt_checks`, the same `decode.generate` applies to a batch)."""
    from dllm_jax.prompt_checks import prompt_problem

    row = np.asarray([[int(t) for t in ids]], np.int64).reshape(1, len(ids))
    problem = prompt_problem(row, None, cfg, gen_length)
    if problem is not None:
        raise SessionError(problem)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One decoded answer: ids before the first EOS, their text ('' without a tokenizer),
    forward passes spent on the row, and loop steps of its batch."""

    tokens: list[int]
    text: str
    nfe: int
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "text": self.text, "nfe": self.nfe, "steps": self.steps}


# ----------------------------------------------------------------------------- the session
@dataclasses.dataclass(frozen=True)
class Session:
    """A loaded model. Build with `load`.

    Attributes:
      model_dir: the resolved folder.
      cfg: its ModelConfig.
      params: params in the layout `generate` runs fastest with on this backend (see
        `models.decode_layout`).
      tokenizer: `dllm_jax.tokenizer.Tokenizer`, or None when the folder has no
        tokenizer.json (then prompts must be ids).
      train_config: the folder's train_config.json (models made by `dllm-jax train`), or None.
      mesh: the device mesh the params are placed on, or None for one device.
    """

    model_dir: Path
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    train_config: dict[str, Any] | None
    mesh: Any = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else self.cfg.pad_token_id

    @property
    def answer_length(self) -> int | None:
        """The answer length a task model was trained with (None for other models)."""
        if self.train_config is None:
            return None
        return int(self.train_config["train"]["answer_length"])

    def file(self, name: str) -> Path:
        """Path of a file in the model folder (fitted controller files: `tspd.json`, ...)."""
        return self.model_dir / name

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise SessionError(f"{self.model_dir} has no tokenizer.json, so text cannot be "
                               f"encoded or decoded; pass prompt ids, or copy tokenizer.json "
                               f"(and tokenizer_config.json) into the folder.")
        return self.tokenizer

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Prompt text (with `chat`: wrapped in the chat template) or ids -> ids."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if not prompt.strip():
            raise SessionError("the prompt is empty; give some text.")
        tok = self.require_tokenizer()
        if chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
        return tok.encode(prompt)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def pad(self, seqs: Sequence[Sequence[int]], width: int | None = None,
            rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`left_pad` with this model's pad id."""
        return left_pad(seqs, self.pad_id, width, rows)

    def generate_ids(self, ids: np.ndarray, valid: np.ndarray, gen: GenerateConfig,
                     controller: Any, key: Any = None, draft: "Session | None" = None) -> Any:
        """`decode.generate` on a padded batch `[B, P]` with this session's params and mesh;
        returns its GenerateOutput. `draft`: a smaller model's session (same tokenizer) whose
        predictions draft the masked positions for a speculative controller (`simsd`)."""
        from controllers.entropy_bound import EntropyBound
        from dllm_jax.canvas_decode import decode_canvas
        from dllm_jax.decode import generate

        if self.cfg.arch == "diffusion_gemma":
            return decode_canvas(self.params, self.cfg, ids, valid, gen, controller, key=key,
                                 mesh=self.mesh)
        if isinstance(controller, EntropyBound) and controller.canvas_only_changes():
            flags = ", ".join("--" + n.replace("_", "-") for n in controller.canvas_only_changes())
            raise SessionError(f"{flags} apply to DiffusionGemma's canvas only; this is a "
                               f"{self.cfg.arch} model, leave them out.")
        if draft is not None and draft.mesh is not self.mesh:
            raise SessionError("the draft model must be loaded on the same mesh as the target "
                               "(session.load(draft_dir, mesh=target.mesh)).")
        return generate(self.params, self.cfg, ids, gen, controller, prompt_valid=valid,
                        key=key, mesh=self.mesh,
                        draft_params=None if draft is None else draft.params,
                        draft_cfg=None if draft is None else draft.cfg)

    def answers(self, out: Any, n: int | None = None) -> list[Answer]:
        """The first `n` rows of a GenerateOutput as Answers (cut at EOS, decoded)."""
        tokens, nfe = np.asarray(out.tokens), np.asarray(out.stats.nfe)
        steps = int(out.stats.steps)
        rows = tokens.shape[0] if n is None else n
        result = []
        for r in range(rows):
            ids = cut_at_eos(tokens[r], self.cfg.eos_token_id)
            result.append(Answer(ids, self.decode_text(ids), int(nfe[r]), steps))
        return result

    def generate(self, prompts: Sequence[str | Sequence[int]], gen: GenerateConfig,
                 controller: Any, *, key: Any = None, chat: bool = False,
                 width: int | None = None, rows: int | None = None,
                 draft: "Session | None" = None) -> list[Answer]:
        """Decode a batch of prompts (text or id lists) in one compiled call.

        width / rows: pad the batch to this shape (so that batches of one run share a
        compile); extra rows are dropped from the result. draft: see `generate_ids`.
        """
        seqs = [self.encode(p, chat) for p in prompts]
        for s in seqs:
            check_prompt_ids(s, self.cfg, gen.gen_length)
        ids, valid = self.pad(seqs, width, rows)
        return self.answers(self.generate_ids(ids, valid, gen, controller, key, draft),
                            len(seqs))


def read_train_config(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(model_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise SessionError(f"{path} cannot be read ({e}); restore it or remove it.") from None
    if not isinstance(record, dict) or not isinstance(record.get("train"), dict):
        raise SessionError(f"{path} is not a training record (no \"train\" object); restore it "
                           f"or remove it.")
    return record


def load(model_dir: str | os.PathLike | None = None, *, dtype: Any = None, mesh: Any = None,
         layout: str = "auto", flag: str = "--model", quantize: str | None = None,
         quantize_flag: str = "--quantize") -> Session:
    """Load a model folder (None: the bundled model).

    Args:
      dtype: params dtype (default: as stored); with int8 weights, the dtype of the
        activations and of the params that stay in float.
      quantize: "int8": quantise the matrices at load time (`quant.quantize_params`: q/k/v/o,
        gate/up/down, lm_head; int8 per output channel, activations in `dtype`); peak memory
        is the float params plus the int8 ones. None: as stored (a folder written by
        `dllm-jax convert --quantize int8` loads int8 either way). On a `mesh` the int8
        q / scale follow their weight's sharding rule (`sharding.param_axes`); an int8 folder
        is restored onto the first device and then placed on the mesh.
      quantize_flag: the name of `quantize` in errors (the command-line flag).
      mesh: a `sharding.make_mesh` mesh: each device restores only its shards, and the params
        are laid out for it. None: one device.
      layout: "auto" (the fastest on this backend, see `models.decode_layout`), "stacked"
        (the on-disk `[num_layers, ...]` layout, for training / fitting code).
      flag: the command-line flag named in errors about the folder.
    """
    from dllm_jax import models, quant
    from dllm_jax.checkpoint import load_config, load_model, load_quantization
    from dllm_jax.tokenizer import Tokenizer

    quant.check_mode(quantize, quantize_flag)
    path = resolve_model_dir(model_dir, flag)
    int8_folder = load_quantization(path)[0] is not None
    if quantize is not None or int8_folder:
        quant.check_arch(load_config(path)[0].arch, quantize_flag)
    shardings = None
    if mesh is not None and not int8_folder:   # each device restores only its shards
        from dllm_jax import sharding as S

        cfg, _ = load_config(path)
        shardings = S.param_shardings(cfg, mesh)
    cfg, params = load_model(path, dtype=dtype, shardings=shardings)
    if quantize == "int8":
        params = quant.quantize_params(params)
    if mesh is not None and (quantize is not None or int8_folder):
        import jax

        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise SessionError(f"int8 weights ({quantize_flag} int8 or an int8 folder) are "
                               f"placed from one process; a mesh over several processes needs "
                               f"float weights: drop {quantize_flag} or convert without it.")
        from dllm_jax import sharding as S    # int8 q / scale laid out as their weight's rule

        params = S.shard_params(params, mesh)
    if layout not in ("auto", "stacked"):
        raise SessionError(f"layout must be 'auto' or 'stacked', got {layout!r}.")
    if layout == "auto" and cfg.arch != "diffusion_gemma":   # its stack has its own layout
        params = models.decode_layout(params, mesh=mesh)
    train_config = read_train_config(path)
    tok = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(path, unknown_words=unknown_words_policy(train_config))
    return Session(model_dir=path, cfg=cfg, params=params, tokenizer=tok,
                   train_config=train_config, mesh=mesh)


def unknown_words_policy(train_config: dict[str, Any] | None) -> str:
    """How prompts with words outside the vocabulary are treated (see `dllm_jax.tokenizer`):
    "error" for task models (made by `dllm-jax train`, with train_config.json: a closed
    vocabulary, so an unknown word is a typo or a prompt the model cannot answer), "warn" for
    other models (subword vocabularies, where <unk> is a rare character in an intact prompt)."""
    return "error" if train_config is not None else "warn"


__all__ = ["Answer", "Session", "SessionError", "check_prompt_ids", "cut_at_eos", "left_pad",
           "load", "read_train_config", "resolve_model_dir", "unknown_words_policy"]
