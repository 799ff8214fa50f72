"""Test-wide setup: 8 host CPU devices (sharding tests), quiet TensorFlow, offline Hugging Face."""

import os
import shutil
import tempfile

import pytest

# Must happen before jax is imported anywhere: gives the sharding tests 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole run, shared by both xdist workers (they inherit this
# process's environment) and by the CLI tests' subprocesses. Why: most tests train or decode the
# same tiny models at the same shapes, and compiling them again in every test was a large share of the
# suite's time (measured here, the whole suite on 2 workers: 1,180 s without, 903 s with). The key of
# an entry covers the program, the devices and the flags, so a hit is the same executable. A fresh
# directory per run keeps every run's timing the same as CI's clean clone.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="slm-jax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the run's first process made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
