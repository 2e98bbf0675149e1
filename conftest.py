"""Shared by the whole suite (``tests/`` and the doctests under ``jcompress/``).

Compiled XLA:CPU executables stay alive in JAX's caches for the life of the process, and each
holds memory mappings of its own. The suite compiles thousands of programs in one process; left
alone it passes the kernel's ``vm.max_map_count`` (65530 by default) and XLA segfaults while
compiling (seen in CI, exit 139). Dropping the caches after every module keeps the count flat.
Tests that assert "no recompilation" do so within one module, so they are unaffected.
"""

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    import jax  # not at import time: tests/conftest.py sets XLA_FLAGS before jax starts

    jax.clear_caches()
    gc.collect()
