"""Random batches with the model's input signature: for tests, benchmarks and planning.

The targets are a deterministic function of the audio (each target token is the quantised
mean of one audio chunk), so a model can actually learn them: a loss that falls on this data is
evidence that gradients reach the adapter through the frozen LLM.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


class SyntheticData:
    def __init__(self, feature_lengths: Mapping[str, int], vocab_size: int, num_mel_bins: int = 80, seed: int = 0):
        self.feature_lengths = dict(feature_lengths)
        self.vocab_size = vocab_size
        self.num_mel_bins = num_mel_bins
        self.seed = seed

    def batch(self, batch_size: int, index: int, split: str = "train") -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index, 0 if split == "train" else 1])
        fl = self.feature_lengths
        t, lp, ls, lt = fl["audio_frames"], fl["prefix"], fl["suffix"], fl["targets"]
        audio = rng.normal(size=(batch_size, t, self.num_mel_bins)).astype(np.float32)
        audio_len = rng.integers(t // 2, t + 1, size=batch_size)
        audio_mask = (np.arange(t)[None] < audio_len[:, None]).astype(np.int32)
        audio *= audio_mask[..., None]
        target_len = rng.integers(2, lt + 1, size=batch_size)
        target_mask = (np.arange(lt)[None] < target_len[:, None]).astype(np.int32)
        chunks = np.array_split(np.arange(t // 2), lt)
        levels = np.stack([audio[:, c, :4].mean(axis=(1, 2)) for c in chunks], axis=1)
        targets = (2 + np.clip((levels * 4 + 4), 0, 7).astype(np.int32) % (self.vocab_size - 2)) * target_mask
        decoder_input = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
        prefix = rng.integers(2, self.vocab_size, size=(batch_size, lp)).astype(np.int32)
        suffix = rng.integers(2, self.vocab_size, size=(batch_size, ls)).astype(np.int32)
        return {
            "audio_features": audio,
            "audio_mask": audio_mask,
            "prefix_tokens": prefix,
            "prefix_mask": np.ones((batch_size, lp), np.int32),
            "suffix_tokens": suffix,
            "suffix_mask": (np.arange(ls)[None] < rng.integers(1, ls + 1, size=(batch_size, 1))).astype(np.int32),
            "decoder_input_tokens": decoder_input,
            "target_tokens": targets,
            "target_mask": target_mask,
        }

    def batches(self, batch_size: int, start_batch: int = 0, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
        index = start_batch
        while True:
            yield self.batch(batch_size, index, split)
            index += 1

    # The DataSource protocol of slm_jax/training/loop.py.
    def train_batches(self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0, num_shards: int = 1):
        """Host ``shard_index`` gets its rows of the global batch (batch_size * num_shards rows)."""
        del seed  # synthetic rows are a pure function of the batch index
        rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
        for batch in self.batches(batch_size * num_shards, start_batch, "train"):
            yield {k: v[rows] for k, v in batch.items()}

    def eval_batches(self, batch_size: int, num_batches: int):
        return (self.batch(batch_size, i, "eval") for i in range(num_batches))
