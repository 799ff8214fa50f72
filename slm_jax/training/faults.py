"""Fault injection for reliability tests and drills: data sources that go wrong on purpose.

``NonFiniteBatches`` wraps any training data source (the DataSource protocol of
``slm_jax/training/loop.py``) and replaces one feature of chosen batches with NaN or inf, so the numerical
guard of the train step can be exercised end to end. Batches are numbered globally from 0, so
a resumed run (which starts at its checkpoint's ``batches_consumed``) meets the same bad batches
as an uninterrupted one.

From a gin file (the ``import`` line registers this module with gin)::

    import slm_jax.training.faults
    train.data = @NonFiniteBatches()
    NonFiniteBatches.source = @SyntheticData()
    NonFiniteBatches.bad_batches = [2, 5, 6, 7]
    NonFiniteBatches.value = 'nan'
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import gin
import numpy as np

_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@gin.configurable(module="slm_jax.training.faults")
class NonFiniteBatches:
    """Yields ``source``'s batches, with ``key`` set to ``value`` in the batches ``bad_batches``."""

    def __init__(
        self,
        source: Any = gin.REQUIRED,
        bad_batches: Iterable[int] = (),
        value: str = "nan",
        key: str = "audio_features",
    ):
        if value not in _VALUES:
            raise ValueError(f"value must be one of {sorted(_VALUES)}, got {value!r}")
        self.source = source
        self.bad_batches = frozenset(int(i) for i in bad_batches)
        self.value = value
        self.key = key

    @property
    def feature_lengths(self) -> Mapping[str, int]:
        return self.source.feature_lengths

    def __getattr__(self, name: str) -> Any:
        # Anything else (vocabulary, prompt_format, max_audio_seconds...) comes from the source.
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def spoil(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        if self.key not in batch:
            raise KeyError(f"batch has no feature {self.key!r}; it has {sorted(batch)}")
        batch[self.key] = np.full_like(np.asarray(batch[self.key], np.float32), _VALUES[self.value])
        return batch

    def train_batches(
        self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0, num_shards: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        batches = self.source.train_batches(batch_size, seed, start_batch, shard_index, num_shards)
        for index, batch in enumerate(batches, start=start_batch):
            yield self.spoil(batch) if index in self.bad_batches else dict(batch)

    def eval_batches(self, batch_size: int, num_batches: int):
        return self.source.eval_batches(batch_size, num_batches)
