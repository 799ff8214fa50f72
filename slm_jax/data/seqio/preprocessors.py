"""SeqIO preprocessors: raw speech examples -> log-mel frames + prompt and target tokens.

Every speech task (the generated corpus, LibriSpeech, FLEURS, CoVoST 2, VoxPopuli) first turns
its raw records into one common example::

    id, task (strings), samples (float32 [N], 16 kHz mono), instruction, target (strings)

(``decode_corpus_example`` for the corpus' TFRecords; the real corpora have their own readers in
``tasks/real_corpora.py``), then shares ``speech_preprocessors``:

    log_mel            samples -> audio_features [N // 160, 80] (audio.tf_log_mel_spectrogram)
    encode_prompt      instruction -> prefix / suffix tokens around the speech (PromptFormat),
                       target -> targets tokens + EOS, and the decoder start token

Tokens follow ``PromptFormat.encode`` exactly (the whole prompt string is encoded at once), so
training sees what ``slm-infer`` builds at inference time.

Bad data raises, never skips: the checks run inside the pipeline as ``tf.numpy_function`` and
raise ``DataError``/``AudioError`` naming the example; ``translate_tf_error`` turns the
TensorFlow error that carries them back into that one-line error.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from slm_jax.data import audio as audio_lib
from slm_jax.data.errors import DataError
from slm_jax.data.prompting import PromptFormat

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module import


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def check_example(example_id, task, samples, declared_samples, instruction, target) -> np.ndarray:
    """Validates one decoded example (numpy side); returns the samples as float32.

    Raises DataError/AudioError naming the task and example: empty instruction or target, audio
    whose length differs from the length its record declares (``declared_samples``; -1: none),
    zero-length or non-finite audio.
    """
    name = f"{_text(task)} example {_text(example_id)}"
    if int(declared_samples) >= 0 and int(declared_samples) != np.size(samples):
        raise DataError(f"{name}: the record declares {int(declared_samples)} audio samples but holds "
                        f"{np.size(samples)} (corrupt or truncated audio)")
    if not _text(target).strip():
        raise DataError(f"{name}: empty target text")
    if not _text(instruction).strip():
        raise DataError(f"{name}: empty instruction text")
    return audio_lib.check_audio(np.asarray(samples, np.float32), audio_lib.SAMPLE_RATE, name=name)


def checked_samples(ex: dict, declared_samples=-1) -> Any:
    """``check_example`` inside a tf.data map: the samples, or the named error when iterated."""
    import tensorflow as tf

    samples = tf.numpy_function(check_example, [ex["id"], ex["task"], ex["samples"],
                                                tf.cast(declared_samples, tf.int64), ex["instruction"],
                                                ex["target"]], tf.float32, stateful=False)
    samples.set_shape([None])
    return samples


def decode_corpus_example(dataset):
    """Corpus TFRecord fields -> the common example (PCM16 decoded, lengths and text checked)."""
    import tensorflow as tf

    def decode(ex):
        # An odd byte count cannot be decoded as int16: keep the whole samples only, so the
        # length check below reports it instead of TensorFlow's anonymous error.
        pcm = tf.strings.substr(ex["audio"], 0, (tf.strings.length(ex["audio"]) // 2) * 2)
        samples = tf.cast(tf.io.decode_raw(pcm, tf.int16, little_endian=True), tf.float32) / 32768.0
        out = {"id": ex["id"], "task": ex["task"], "samples": samples,
               "instruction": ex["instruction"], "target": ex["target"], "text": ex["text"]}
        out["samples"] = checked_samples(out, ex["num_samples"])
        return out

    return dataset.map(decode, num_parallel_calls=AUTOTUNE)


def log_mel(dataset, normalization: str = "whisper"):
    """samples -> audio_features [frames, 80] (the same numbers as audio.log_mel_spectrogram)."""

    def featurize(ex):
        ex = dict(ex)
        ex["audio_features"] = audio_lib.tf_log_mel_spectrogram(ex.pop("samples"), normalization=normalization)
        return ex

    return dataset.map(featurize, num_parallel_calls=AUTOTUNE)


def encode_prompt(dataset, output_features, prompt_format: PromptFormat):
    """instruction -> prefix/suffix tokens, target -> targets (+ EOS), decoder_start.

    Mirrors ``PromptFormat.encode`` and ``batching.target_ids`` in TensorFlow.
    """
    import tensorflow as tf

    vocab = output_features["targets"].vocabulary
    if output_features["prefix"].vocabulary != vocab or output_features["suffix"].vocabulary != vocab:
        raise ValueError("prefix, suffix and targets must share one vocabulary")

    def encode(text):
        ids = vocab.encode_tf(text)
        return tf.cast(ids, tf.int32)

    def fn(ex):
        ex = dict(ex)
        instruction = ex["instruction"]
        if prompt_format.instruction_position == "before":
            before = tf.strings.join([prompt_format.before_speech, instruction, prompt_format.separator])
            after = tf.constant(prompt_format.after_speech)
        else:
            before = tf.constant(prompt_format.before_speech)
            after = tf.strings.join([prompt_format.separator, instruction, prompt_format.after_speech])
        prefix, suffix = encode(before), encode(after)
        if prompt_format.decoder_start == "pad":
            decoder_start = tf.constant(0, tf.int32)
        else:
            decoder_start, suffix = suffix[-1], suffix[:-1]
        ex["prefix"], ex["suffix"], ex["decoder_start"] = prefix, suffix, decoder_start
        ex["targets"] = tf.concat([encode(ex["target"]), [tf.cast(vocab.eos_id, tf.int32)]], axis=0)
        return ex

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def speech_output_features(vocabulary) -> dict:
    """The output features every speech task shares (a Mixture requires the same keys)."""
    import seqio
    import tensorflow as tf

    return {
        "audio_features": seqio.ContinuousFeature(dtype=tf.float32, rank=2),
        "prefix": seqio.Feature(vocabulary, add_eos=False),
        "suffix": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
        "decoder_start": seqio.ContinuousFeature(dtype=tf.int32, rank=0),
    }


def speech_preprocessors(prompt_format: PromptFormat, normalization: str = "whisper") -> list:
    """The shared preprocessors after a source's own decoding step (see the module docstring)."""
    import functools

    return [functools.partial(log_mel, normalization=normalization),
            functools.partial(encode_prompt, prompt_format=prompt_format)]


# --------------------------------------------------------------------------------------------
# Errors raised inside tf.data, brought back as one line
# --------------------------------------------------------------------------------------------
_PY_ERROR = re.compile(r"(DataNotPreparedError|CorruptShardError|DataError|AudioError|TooLongError): (.+)")


def translate_tf_error(error: BaseException) -> BaseException | None:
    """The project error carried by a TensorFlow error raised in a numpy_function, or None."""
    from slm_jax.data import errors

    message = getattr(error, "message", None) or str(error)
    match = _PY_ERROR.search(message)
    if match is None:
        return None
    kind, text = match.group(1), match.group(2).strip()
    cls = {"DataNotPreparedError": errors.DataNotPreparedError, "CorruptShardError": errors.CorruptShardError,
           "AudioError": audio_lib.AudioError}.get(kind, DataError)
    return cls(text)
