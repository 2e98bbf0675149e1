"""Test setup shared by every test module.

* 8 virtual CPU devices, set before jax is imported, so sharding is tested everywhere.
* Hypothesis profiles: ``ci`` (default, quick) and ``deep`` (>= 1000 examples per property),
  chosen with ``HYPOTHESIS_PROFILE``.
* ``strict``: a context manager factory turning on strict dtype promotion around jcompress calls
  (not globally: optax's own optimizers raise under it).
* Warnings raised from jcompress are errors (``filterwarnings`` in ``pyproject.toml``).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def strict_promotion():
    """Strict dtype promotion for the duration of a ``with`` block."""
    return jax.numpy_dtype_promotion("strict")


@pytest.fixture
def strict():
    """Fixture form of :func:`strict_promotion`: ``with strict(): jc.something(...)``."""
    return strict_promotion


@pytest.fixture(autouse=True)
def _no_leaked_promotion_mode():
    yield
    # A test that forgot to leave a strict block would silently change later tests.
    assert jax.config.jax_numpy_dtype_promotion == "standard"


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 virtual CPU devices, got {devs}"
    return devs
