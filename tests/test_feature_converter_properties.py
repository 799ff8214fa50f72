"""Properties of the SeqIO feature converter (slm_jax/data/seqio/feature_converter.py) over generated
examples (hypothesis): whatever the lengths and values, the model batch holds the example
unchanged at the front of each block, masks count exactly the real positions, padding is zero,
and the decoder input is the target shifted right behind the start token."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slm_jax.data.seqio.feature_converter import SpeechFeatureConverter, task_feature_lengths

LENGTHS = {"audio_frames": 24, "prefix": 6, "suffix": 5, "targets": 7}
MELS = 80
SIGNATURE = {
    "audio_features": tf.TensorSpec([None, MELS], tf.float32),
    "prefix": tf.TensorSpec([None], tf.int32),
    "suffix": tf.TensorSpec([None], tf.int32),
    "targets": tf.TensorSpec([None], tf.int32),
    "decoder_start": tf.TensorSpec([], tf.int32),
}


def _tokens(max_len: int, min_len: int = 0):
    return arrays(np.int32, st.integers(min_len, max_len), elements=st.integers(1, 50_000))


examples = st.fixed_dictionaries({
    # Frames may hold exact zeros: the mask must come from the length, not from the values.
    "audio_features": arrays(np.float32, st.tuples(st.integers(1, LENGTHS["audio_frames"]), st.just(MELS)),
                             elements=st.sampled_from([0.0, -1.5, 2.25, 1e-6])),
    "prefix": _tokens(LENGTHS["prefix"]),
    "suffix": _tokens(LENGTHS["suffix"]),
    "targets": _tokens(LENGTHS["targets"], min_len=1),
    "decoder_start": st.integers(0, 50_000).map(np.int32),
})


def _convert(batch: list[dict]) -> list[dict]:
    ds = tf.data.Dataset.from_generator(lambda: iter(batch), output_signature=SIGNATURE)
    return list(SpeechFeatureConverter()(ds, task_feature_lengths(LENGTHS)).as_numpy_iterator())


def _check_block(values: np.ndarray, mask: np.ndarray, original: np.ndarray, length: int) -> None:
    n = original.shape[0]
    assert values.shape[0] == length and mask.shape == (length,)
    assert mask.tolist() == [1] * n + [0] * (length - n)
    np.testing.assert_array_equal(values[:n], original)
    assert not values[n:].any()


@settings(max_examples=12, deadline=None)  # each example builds a tf.data pipeline (~1 s)
@given(batch=st.lists(examples, min_size=1, max_size=3))
@pytest.mark.slow
def test_blocks_masks_and_decoder_input_follow_the_true_lengths(batch):
    converted = _convert(batch)
    assert len(converted) == len(batch)
    for ex, out in zip(batch, converted):
        _check_block(out["audio_features"], out["audio_mask"], ex["audio_features"], LENGTHS["audio_frames"])
        _check_block(out["prefix_tokens"], out["prefix_mask"], ex["prefix"], LENGTHS["prefix"])
        _check_block(out["suffix_tokens"], out["suffix_mask"], ex["suffix"], LENGTHS["suffix"])
        _check_block(out["target_tokens"], out["target_mask"], ex["targets"], LENGTHS["targets"])
        n = ex["targets"].size
        expected_decoder_input = [int(ex["decoder_start"])] + ex["targets"][:-1].tolist()
        assert out["decoder_input_tokens"][:n].tolist() == expected_decoder_input
        assert not out["decoder_input_tokens"][n:].any()


@settings(max_examples=4, deadline=None)
@given(example=examples, extra=st.integers(1, 4), block=st.sampled_from(["prefix", "suffix", "targets"]))
def test_a_block_longer_than_its_length_is_refused_not_truncated(example, extra, block):
    example = dict(example)
    limit = LENGTHS[block]
    example[block] = np.arange(1, limit + extra + 1, dtype=np.int32)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        _convert([example])
