"""One small generated corpus per test session, shared by the data-layer tests.

Built once (cached) into a temporary directory and removed at exit. espeak-ng speaks it when
installed (what users get); otherwise the deterministic tone synthesiser stands in.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

SIZE = 60


@functools.lru_cache(maxsize=None)
def small_corpus() -> str:
    from slm_jax.data.corpus import builder as corpus

    root = tempfile.mkdtemp(prefix="slm_corpus_")
    atexit.register(shutil.rmtree, root, True)
    out = os.path.join(root, "corpus")
    synthesizer = "espeak" if corpus.espeak_available() else "tones"
    # 4 examples per shard: every task with more than 4 training examples has several shards,
    # so multi-host sharding and the per-shard record counts are exercised.
    corpus.make_corpus(out, SIZE, seed=3, workers=2, synthesizer=synthesizer, examples_per_shard=4,
                       progress=False)
    return out


def copy_corpus(tmp_path) -> str:
    """A private copy of the small corpus, for tests that damage it."""
    dst = os.path.join(str(tmp_path), "corpus")
    shutil.copytree(small_corpus(), dst)
    return dst


def use_corpus(corpus_dir: str) -> None:
    """Registers the SeqIO tasks over ``corpus_dir`` (registration is process-wide)."""
    from slm_jax import tasks

    tasks.register_all(corpus_dir)
