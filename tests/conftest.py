"""Suite-wide hygiene: the compiled programs of one test module are dropped when it ends.

The suite compiles many decode shapes (hundreds of programs); kept for the whole session
they grow the process past what a 2-core CI machine gives comfortably, and XLA's CPU compiler
has crashed there late in the run. Each module still reuses its own compilations."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax

    jax.clear_caches()
    gc.collect()
