"""Length-grouped batches and bucketed padding of the cached-encoder data source."""

import itertools

import numpy as np
import pytest

from slm_jax.data import batching
from slm_jax.data.vocabularies import load_vocabulary
from slm_jax.data.cached.encoder_cache import CachedSpeechData
from slm_jax.data.prompting import PromptFormat


class _FakeCache:
    """Encoder outputs of random lengths, keyed by id (the EncoderCache interface the source uses)."""

    def __init__(self, frames: dict[str, int], dim: int = 4):
        self._frames = frames
        self.dim = dim

    def frames(self, example_id: str) -> int:
        return self._frames[example_id]

    def __getitem__(self, example_id: str) -> np.ndarray:
        n = self._frames[example_id]
        return np.full((n, self.dim), float(int(example_id[1:]) + 1), np.float32)


def _source(n=203, group_batches=8, seed=1, max_frames=224):
    rng = np.random.default_rng(seed)
    frames = {f"e{i}": int(rng.integers(20, max_frames + 1)) for i in range(n)}
    words = ["yes", "a much longer answer with several more words in it", "no", "the red car stops"]
    instructions = ["Transcribe.", "Translate the speech into French, please, word for word."]
    examples = [{"id": f"e{i}", "instruction": instructions[i % 2], "target": words[(i * 7) % 4]} for i in range(n)]
    return CachedSpeechData(_FakeCache(frames), examples, examples[:16], load_vocabulary("byte"),
                            PromptFormat(), speech_frames=max_frames, prefix=80, suffix=8, targets=64,
                            group_batches=group_batches)


def test_bucket_length_rounds_up_and_caps():
    assert batching.bucket_length(1, 64, 224) == 64
    assert batching.bucket_length(64, 64, 224) == 64
    assert batching.bucket_length(65, 64, 224) == 128
    assert batching.bucket_length(200, 64, 224) == 224
    with pytest.raises(batching.TooLongError, match="225"):
        batching.bucket_length(225, 64, 224)


def test_grouped_batches_cover_the_same_examples_as_the_plain_stream():
    grouped, plain = _source(group_batches=8), _source(group_batches=1)
    for window in range(3):
        batches = range(window * 8, (window + 1) * 8)
        got = sorted(i for k in batches for i in grouped._indices(0, k, 4))
        want = sorted(i for k in batches for i in plain._indices(0, k, 4))
        assert got == want


def test_grouped_batches_are_deterministic_and_resume_exactly():
    a, b = _source(), _source()
    first = [x["speech_hidden"] for x in itertools.islice(a.train_batches(4, seed=3), 20)]
    resumed = [x["speech_hidden"] for x in itertools.islice(b.train_batches(4, seed=3, start_batch=13), 7)]
    for x, y in zip(first[13:], resumed):
        np.testing.assert_array_equal(x, y)
    other_seed = next(b.train_batches(4, seed=4))["speech_hidden"]
    assert not np.array_equal(first[0], other_seed)


def test_batches_are_padded_to_buckets_and_keep_every_row_whole():
    source = _source()
    for batch in itertools.islice(source.train_batches(4, seed=0), 30):
        frames = batch["speech_hidden"].shape[1]
        assert frames % 64 == 0 or frames == 224
        lengths = batch["speech_mask"].sum(1)
        assert frames - lengths.max() < 64  # the smallest bucket that holds the longest row
        for row, n in enumerate(lengths):  # real frames kept, then zeros
            assert (batch["speech_hidden"][row, :n] != 0).all() and (batch["speech_hidden"][row, n:] == 0).all()
        assert batch["target_tokens"].shape[1] % 8 == 0
        assert batch["target_mask"].sum(1).max() > batch["target_tokens"].shape[1] - 8


def test_grouping_reduces_padding():
    report = _source().padding_report(batch_size=4, num_batches=40)
    ungrouped = _source(group_batches=1).padding_report(batch_size=4, num_batches=40)
    assert report["padding_bucketed"] < ungrouped["padding_bucketed"] < report["padding_fixed"]
    assert report["tokens_bucketed_over_fixed"] < 0.8


def test_window_must_hold_whole_batches():
    with pytest.raises(ValueError, match="multiple of batch size"):
        batching.length_grouped_batches([1, 2, 3], [1, 2, 3, 4], 2, np.random.default_rng(0))


def test_shape_plan_predicts_the_batches_without_building_them():
    source = _source()
    plan = source.shape_plan(batch_size=4, seed=2, num_batches=24)
    batches = list(itertools.islice(source.train_batches(4, seed=2), 24))
    keys = ("speech_hidden", "prefix_tokens", "suffix_tokens", "target_tokens")
    assert plan["distinct_shapes"] == len({tuple(b[k].shape[1] for k in keys) for b in batches})
    tokens = [b["speech_hidden"].shape[1] // 4 + sum(b[k].shape[1] for k in keys[1:]) for b in batches]
    assert plan["mean_llm_tokens"] == pytest.approx(np.mean(tokens))
