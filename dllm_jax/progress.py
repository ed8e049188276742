"""Progress bars for the long-running commands (convert, train, train-controller, bench, batch).

One way of showing progress: a tqdm bar on stderr, drawn only when stderr is a terminal and
the user did not pass ``--quiet`` (so logs, CI and pipes get no carriage-return noise), and a
one-line summary that every command prints when it finishes (unless quiet), terminal or not.
tqdm is used rather than hand-written carriage-return code because it handles terminal
width, rate smoothing and ETA, and is already a dependency of the tokenizer stack.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

__all__ = ["bar", "line", "summary", "shows_bar"]


def shows_bar(quiet: bool, stream: IO[str] | None = None) -> bool:
    """True when a bar would be drawn: not quiet and the stream is a terminal."""
    stream = sys.stderr if stream is None else stream
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int | None, desc: str, *, quiet: bool = False, unit: str = "it",
        stream: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar of ``total`` units labelled ``desc``; disabled (a no-op object with the
    same methods) when ``quiet`` or when ``stream`` (default stderr) is not a terminal."""
    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False,
                disable=not shows_bar(quiet, stream), dynamic_ncols=True, **kwargs)


def summary(line: str, *, quiet: bool = False, stream: IO[str] | None = None) -> None:
    """Print the command's final one-line summary to ``stream`` (default stderr)."""
    if quiet:
        return
    stream = sys.stderr if stream is None else stream
    print(line, file=stream, flush=True)


def line(text: str, *, quiet: bool = False, stream: IO[str] | None = None) -> None:
    """Print one progress line to ``stream`` (default stderr) without breaking a bar that is
    being drawn there (tqdm clears and redraws it)."""
    if quiet:
        return
    tqdm.write(text, file=sys.stderr if stream is None else stream)
