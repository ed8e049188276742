"""Suite-wide hygiene: the compiled programs of one test module are dropped when it ends, and
the CLIs' persistent compilation cache is off.

The suite compiles many decode shapes (hundreds of programs); kept for the whole session
they grow the process past what a 2-core CI machine gives comfortably, and XLA's CPU compiler
has crashed there late in the run. Each module still reuses its own compilations."""

from __future__ import annotations

import gc
import os

import pytest

# The CLIs turn JAX's persistent compilation cache on (dllm_jax/compile_cache.py); the tests
# that call them in-process or in subprocesses must not read or fill the user's cache folder
# (tests/test_compile_cache.py turns it on explicitly, in a temporary folder).
os.environ["DLLM_JAX_COMPILE_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def torch_threads_2():
    """Torch with 2 threads for a module (another module sets 1 for the whole session): the
    DiffusionGemma references' seeds were chosen so that no transformers decision sits within
    float32 noise of flipping, which holds for the thread count of the 2-core machines."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
