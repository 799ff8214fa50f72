"""Test-wide setup: 8 host CPU devices (sharding tests), quiet TensorFlow, offline Hugging Face."""

import os

import pytest

# Must happen before jax is imported anywhere: gives the sharding tests 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _no_gin_bindings_from_other_tests():
    """``train()`` and the data sources are gin-configurable: bindings that an in-process CLI test
    left behind (e.g. a paper-scale mesh) must not reach the next test on the same worker."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def load_script():
    """A script under scripts/ (not a package) imported as a module, to call its ``main``."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
