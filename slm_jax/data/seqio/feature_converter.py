"""The SeqIO FeatureConverter from speech task features to the SLM's batch.

SeqIO's ``EncDecFeatureConverter`` rejects float features, so the SLM has its own converter.

task features (after ``preprocessors.speech_preprocessors``):
  audio_features [frames, 80] float32, prefix [n] / suffix [n] / targets [n] int32 (targets end
  with EOS), decoder_start [] int32

model features (``experiment.sample_batch``), every block right-padded to a fixed length:
  audio_features [A, 80] f32, audio_mask [A]; prefix_tokens / prefix_mask [P];
  suffix_tokens / suffix_mask [S]; decoder_input_tokens, target_tokens, target_mask [T]

Masks come from the true lengths (not from non-zero values: a log-mel frame can be exactly 0).
``decoder_input_tokens`` is ``[decoder_start] + targets[:-1]`` masked like the targets, the same
rule as ``batching.text_batch``. Nothing is truncated: a longer feature fails SeqIO's length
check (``SeqioData`` checks first and names the example).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec

# The model's feature_lengths keys (train.DataSource) -> task feature names.
LENGTH_KEYS = {"audio_frames": "audio_features", "prefix": "prefix", "suffix": "suffix", "targets": "targets"}


def task_feature_lengths(feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """The model's ``feature_lengths`` (audio_frames, prefix, suffix, targets) as task lengths."""
    missing = sorted(set(LENGTH_KEYS) - set(feature_lengths))
    if missing:
        raise ValueError(f"feature_lengths needs {sorted(LENGTH_KEYS)}; missing {missing}")
    out = {task: int(feature_lengths[model]) for model, task in LENGTH_KEYS.items()}
    out["decoder_start"] = 1  # rank 0: SeqIO skips its length check
    return out


def _pad(x, length: int):
    """Right-pads axis 0 of ``x`` to ``length`` with zeros; returns (padded, mask)."""
    n = tf.shape(x)[0]
    paddings = [[0, length - n]] + [[0, 0]] * (len(x.shape) - 1)
    padded = tf.pad(x, paddings)
    padded.set_shape([length] + list(x.shape[1:]))
    mask = tf.cast(tf.range(length) < n, tf.int32)
    return padded, mask


class SpeechFeatureConverter(seqio.FeatureConverter):
    """Pads speech task features into the SLM batch layout (no packing)."""

    TASK_FEATURES = {
        "audio_features": FeatureSpec(dtype=tf.float32, rank=2),
        "prefix": FeatureSpec(dtype=tf.int32),
        "suffix": FeatureSpec(dtype=tf.int32),
        "targets": FeatureSpec(dtype=tf.int32),
        "decoder_start": FeatureSpec(dtype=tf.int32, rank=0),
    }
    MODEL_FEATURES = {
        "audio_features": FeatureSpec(dtype=tf.float32, rank=2),
        "audio_mask": FeatureSpec(dtype=tf.int32),
        "prefix_tokens": FeatureSpec(dtype=tf.int32),
        "prefix_mask": FeatureSpec(dtype=tf.int32),
        "suffix_tokens": FeatureSpec(dtype=tf.int32),
        "suffix_mask": FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": FeatureSpec(dtype=tf.int32),
        "target_tokens": FeatureSpec(dtype=tf.int32),
        "target_mask": FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = None

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("SpeechFeatureConverter pads; packing speech with its prompt is not supported")
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths: Mapping[str, int]):
        lengths = dict(task_feature_lengths)

        def convert(ex):
            audio, audio_mask = _pad(ex["audio_features"], lengths["audio_features"])
            prefix, prefix_mask = _pad(ex["prefix"], lengths["prefix"])
            suffix, suffix_mask = _pad(ex["suffix"], lengths["suffix"])
            targets, target_mask = _pad(ex["targets"], lengths["targets"])
            decoder_input = tf.concat([tf.reshape(ex["decoder_start"], [1]), targets[:-1]], axis=0) * target_mask
            return {
                "audio_features": audio, "audio_mask": audio_mask,
                "prefix_tokens": prefix, "prefix_mask": prefix_mask,
                "suffix_tokens": suffix, "suffix_mask": suffix_mask,
                "decoder_input_tokens": decoder_input, "target_tokens": targets, "target_mask": target_mask,
            }

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        a, p, s, t = (task_feature_lengths[k] for k in ("audio_features", "prefix", "suffix", "targets"))
        return {"audio_features": a, "audio_mask": a, "prefix_tokens": p, "prefix_mask": p,
                "suffix_tokens": s, "suffix_mask": s, "decoder_input_tokens": t, "target_tokens": t,
                "target_mask": t}
