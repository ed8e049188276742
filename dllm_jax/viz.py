"""Pictures of the denoising, shared by the notebooks and the command line.

    out = s.generate_ids(ids, valid, GenerateConfig(..., trace=True), controller)
    for line in canvas_frames(s, out):      # the answer after each step: `_` still masked,
        print(line)                         # [tok] committed at that step
    commit_heatmap(out)                     # the step each answer position was committed
    confidence_trajectories(out, [0, 5])    # confidence of a few positions over the steps
    save_figure(ax.figure, "trace.png")     # atomic: temp file + rename

The text frames need only `out.tokens` and `out.stats.fix_step`; the trajectories need a
traced decode (`GenerateConfig(trace=True)`). matplotlib is an optional dependency, imported
inside the plotting functions.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np

from dllm_jax.config import ConfigError

MASK = "_"
EOS_MARK = "[<eos>]"
INSTALL_HINT = ('matplotlib is needed for plots; install it with pip install -e ".[plot]" '
                '(or pip install matplotlib).')


class VizError(ConfigError):
    """A decode output that cannot be drawn; the message says what to pass instead."""


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return plt


def _tokenizer(session_or_tokenizer: Any) -> Any:
    tok = getattr(session_or_tokenizer, "tokenizer", session_or_tokenizer)
    if tok is None or not hasattr(tok, "decode"):
        raise VizError("canvas_frames needs a tokenizer (or a Session with one) to print text.")
    return tok


def _eos_id(session_or_tokenizer: Any, tok: Any) -> int | None:
    cfg = getattr(session_or_tokenizer, "cfg", None)
    if cfg is not None:
        return int(cfg.eos_token_id)
    return None if getattr(tok, "eos_id", None) is None else int(tok.eos_id)


def canvas_frames(session_or_tokenizer: Any, out: Any, row: int = 0, mark: bool = True,
                  eos_id: int | None = None) -> list[str]:
    """The answer of batch row `row` as text after each decode step.

    Frame k shows every position committed at a step <= k; positions still masked are `_`,
    tokens committed at step k are in brackets (with `mark`). Each frame is cut at its first
    committed EOS (shown as `[<eos>]` at the step it is committed, with `mark`), so the last
    frame without marks equals the answer's text.

    Args:
      session_or_tokenizer: a `session.Session` (its tokenizer and EOS id) or a tokenizer.
      out: a `decode.generate` output (no trace needed).
      eos_id: EOS id (default: the session's `cfg.eos_token_id`, else the tokenizer's).
    Returns:
      one string per step, `int(out.stats.steps)` of them.
    """
    tok = _tokenizer(session_or_tokenizer)
    eos = eos_id if eos_id is not None else _eos_id(session_or_tokenizer, tok)
    tokens = np.asarray(out.tokens)[row]
    fix = np.asarray(out.stats.fix_step)[row]
    frames = []
    for k in range(int(out.stats.steps)):
        shown = (fix >= 0) & (fix <= k)
        parts: list[str] = []
        run: list[int] = []
        for t, s, new in zip(tokens, shown, (fix == k) & mark):
            if s and eos is not None and int(t) == eos:
                if new:   # the EOS committed at this step, where the answer now ends
                    parts.extend([tok.decode(run)] if run else [])
                    run = []
                    parts.append(EOS_MARK)
                break
            if s and not new:
                run.append(int(t))
                continue
            if run:
                parts.append(tok.decode(run))
                run = []
            parts.append(f"[{tok.decode([int(t)]).strip()}]" if s else MASK)
        if run:
            parts.append(tok.decode(run))
        frames.append(" ".join(parts))
    return frames


def _masked_fix(out: Any) -> np.ma.MaskedArray:
    fix = np.asarray(out.stats.fix_step)
    return np.ma.masked_less(fix, 0)


def commit_heatmap(out: Any, ax: Any = None, cmap: str = "viridis") -> Any:
    """Image of the step each answer position was committed (`out.stats.fix_step [B, G]`):
    one row per batch row, never-committed positions blank. Returns the Axes."""
    plt = _pyplot()
    fix = _masked_fix(out)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.18 * fix.shape[1] + 1.5),
                                      max(1.6, 0.35 * fix.shape[0] + 1.0)))
    im = ax.imshow(fix, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xlabel("answer position")
    ax.set_ylabel("batch row")
    ax.set_title("commit step per position")
    if fix.shape[0] <= 16:
        ax.set_yticks(range(fix.shape[0]))
    ax.figure.colorbar(im, ax=ax, label="step")
    return ax


def _trace(out: Any) -> dict[str, np.ndarray]:
    tr = getattr(out.stats, "trace", None)
    if tr is None:
        raise VizError("the decode was not traced; pass GenerateConfig(trace=True) to record "
                       "per-step confidences.")
    return {k: np.asarray(v) for k, v in tr.items()}


def position_confidence(out: Any, position: int, row: int = 0,
                        field: str = "confidence") -> np.ndarray:
    """`field` of answer `position` at each executed step, NaN at steps where its block was
    not the active one or after it was committed (needs a traced decode)."""
    tr = _trace(out)
    lb = tr[field].shape[-1]
    steps = int(out.stats.steps)
    blk, off = divmod(int(position), lb)
    vals = tr[field][:steps, row, off].astype(np.float64)
    live = (tr["block"][:steps] == blk) & tr["masked"][:steps, row, off]
    return np.where(live, vals, np.nan)


def confidence_trajectories(out: Any, positions: Sequence[int], ax: Any = None, row: int = 0,
                            field: str = "confidence") -> Any:
    """Line per answer position: its confidence (or another traced field: entropy, margin)
    at each step while still masked, a dot at the step it was committed. Returns the Axes."""
    plt = _pyplot()
    fix = np.asarray(out.stats.fix_step)[row]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.2))
    for p in positions:
        y = position_confidence(out, p, row, field)
        (line,) = ax.plot(np.arange(len(y)), y, marker=".", label=f"pos {p}")
        k = int(fix[p])
        if 0 <= k < len(y) and not np.isnan(y[k]):
            ax.plot([k], [y[k]], "o", ms=9, mfc="none", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(field)
    ax.set_title(f"{field} until commit (circle: committed)")
    ax.legend(fontsize="small", ncol=2)
    return ax


def accuracy_vs_nfe(points: Sequence[tuple[str, float, float]], ax: Any = None) -> Any:
    """Scatter of (label, mean forward passes, accuracy) points, labelled. Returns the Axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.8))
    for label, nfe, acc in points:
        ax.scatter([nfe], [acc])
        ax.annotate(label, (nfe, acc), fontsize="small", xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("forward passes (mean per row)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.05)
    return ax


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write `fig` to `path` (format from the suffix) atomically: a temp file in the same
    folder, then a rename, so a reader never sees half a file. Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def trace_png(out: Any, path: str | os.PathLike) -> str:
    """The commit heatmap of `out` written to `path` (PNG), figure closed afterwards."""
    plt = _pyplot()
    ax = commit_heatmap(out)
    try:
        return save_figure(ax.figure, path)
    finally:
        plt.close(ax.figure)


def generate_showing_steps(sess: Any, ids: Sequence[int], gen: Any, controller: Any, key: Any,
                           show_steps: bool = False, trace_png_path: str | None = None,
                           file: Any = None, draft: Any = None) -> Any:
    """`dllm-jax generate --show-steps / --trace-png FILE`: decode one prompt (ids) with
    `sess`, print its canvas after each step (one line per step, committed tokens in brackets)
    to `file` (default stdout) and/or write the commit heatmap to `trace_png_path`. Returns the
    Answer (`draft`: a draft model's session, see `Session.generate_ids`). Raises VizError
    before decoding when a PNG is asked for and matplotlib is missing."""
    import importlib.util
    import sys

    from dllm_jax.session import check_prompt_ids

    if trace_png_path and importlib.util.find_spec("matplotlib") is None:
        raise VizError("--trace-png needs matplotlib; " + INSTALL_HINT.split("; ", 1)[1])
    check_prompt_ids(ids, sess.cfg, gen.gen_length)
    padded, valid = sess.pad([list(ids)])
    out = sess.generate_ids(padded, valid, gen, controller, key, draft)
    if show_steps:
        file = sys.stdout if file is None else file
        if sess.tokenizer is not None:
            frames = canvas_frames(sess, out)
        else:   # ids only: the committed ids, `_` for masks
            fix, toks = np.asarray(out.stats.fix_step)[0], np.asarray(out.tokens)[0]
            frames = [" ".join(str(int(t)) if 0 <= f <= k else MASK for t, f in zip(toks, fix))
                      for k in range(int(out.stats.steps))]
        for k, line in enumerate(frames):
            print(f"step {k:3d}: {line}", file=file)
    if trace_png_path:
        trace_png(out, trace_png_path)
    [answer] = sess.answers(out)
    return answer


__all__ = ["EOS_MARK", "INSTALL_HINT", "MASK", "VizError", "accuracy_vs_nfe", "canvas_frames",
           "commit_heatmap", "confidence_trajectories", "generate_showing_steps",
           "position_confidence", "save_figure", "trace_png"]
