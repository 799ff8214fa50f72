"""Padding: the training step on length-grouped, bucketed batches vs fixed padding to the
corpus maximum (the same step without the optimization), on a demo-style corpus.

The lengths are real: the demo corpus's utterances (``slm_jax.data.corpus.builder.plan_corpus``) spoken
by espeak-ng give the encoder-frame counts, and the default config's tokenizer and chat template
give the prompt and target lengths. Encoder outputs are random of those lengths (step time
depends on shapes alone), so no encoder runs here. Both sides draw the same examples
(length grouping permutes within windows of whole batches) through ``CachedSpeechData``, the
data source the demo trains with; one is configured without grouping and with one bucket.
"""

from __future__ import annotations

import itertools
import time
import zlib
from typing import Any

import numpy as np

from bench import common
from bench.train_step import JaxStep


class _LengthOnlyCache:
    """The ``EncoderCache`` interface over frame counts: random hidden states of each length."""

    def __init__(self, frames: dict[str, int], dim: int):
        self._frames, self.dim = frames, dim

    def frames(self, example_id: str) -> int:
        return self._frames[example_id]

    def __getitem__(self, example_id: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(example_id.encode()))
        return rng.standard_normal((self._frames[example_id], self.dim)).astype(np.float32)


def corpus_examples(size: int, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Training examples of a demo corpus (en + fr, zero-shot tasks left out) and each one's
    Whisper encoder frames, from the espeak-ng audio's duration."""
    from slm_jax.data import audio as audio_lib
    from slm_jax.data.corpus import builder as corpus
    from slm_jax.models.encoders.whisper import WhisperEncoderConfig

    specs = [s for s in corpus.plan_corpus(size, seed=seed, languages=("en", "fr"))
             if s.split == "train" and not s.task.startswith("zeroshot")]
    examples, frames = [], {}
    for spec in specs:
        samples, rate = corpus.speak_espeak(spec.text, spec.voice, spec.speed, spec.pitch)
        num_samples = int(round(len(samples) * audio_lib.SAMPLE_RATE / rate))
        frames[spec.id] = int(WhisperEncoderConfig().frames_out(audio_lib.num_frames(num_samples)))
        examples.append({"id": spec.id, "instruction": spec.instruction, "target": spec.target})
    return examples, frames


def _sources(ws: common.WeightSet, examples: list[dict], frames: dict[str, int]):
    """(fixed, bucketed) data sources over the same examples, with the default prompt layout."""
    from slm_jax.data.cached.corpus_data import corpus_lengths
    from slm_jax.data.cached.encoder_cache import CachedSpeechData
    from slm_jax.data.prompting import PromptFormat
    from slm_jax.weights.tokenizers import GgufBpeVocabulary

    vocabulary = GgufBpeVocabulary.from_smollm2()
    chat = PromptFormat(before_speech="<|im_start|>user\n", after_speech="<|im_end|>\n<|im_start|>assistant\n",
                        instruction_position="after", separator="\n", decoder_start="last_prompt_token")
    _, lengths = corpus_lengths(vocabulary, chat, examples, frames.__getitem__)
    cache = _LengthOnlyCache(frames, int(ws.whisper_config["d_model"]))
    rate = int(ws.adapter_kwargs["subsample_rate"])
    make = lambda **kw: CachedSpeechData(cache, examples, [], vocabulary, chat, **lengths, subsampling=rate, **kw)  # noqa: E731
    fixed = make(group_batches=1, speech_quantum=-(-lengths["speech_frames"] // rate) * rate, token_quantum=1024)
    return fixed, make(), lengths


def _step_seconds(step: JaxStep, batch: dict) -> float:
    started = time.perf_counter()
    step.step(batch)  # blocks on the loss
    return time.perf_counter() - started


def padding(weights_name: str, corpus_size: int, batch_size: int, num_batches: int) -> dict[str, Any]:
    """Padding share and examples/s over ``num_batches`` batches, fixed vs bucketed; the first
    pass includes every compilation (one per distinct shape), the second is steady state."""
    ws = common.weights(weights_name)
    examples, frames = corpus_examples(corpus_size)
    fixed_source, bucketed_source, lengths = _sources(ws, examples, frames)
    vocab_size = int(ws.llm_config["vocab_size"])
    out: dict[str, Any] = {"corpus_train_examples": len(examples), "batch_size": batch_size,
                           "num_batches": num_batches, "fixed_lengths": lengths,
                           "encoder_frames": {"mean": float(np.mean(list(frames.values()))),
                                              "max": max(frames.values())}, "sides": {}}
    runs = {}
    for name, source in (("fixed", fixed_source), ("bucketed", bucketed_source)):
        batches = []
        for batch in itertools.islice(source.train_batches(batch_size, seed=0), num_batches):
            for key in ("prefix_tokens", "suffix_tokens", "decoder_input_tokens", "target_tokens"):
                batch[key] = batch[key] % vocab_size  # toy weights: keep ids inside the small vocabulary
            batches.append(batch)
        init = dict(batches[0])
        del init["speech_hidden"], init["speech_mask"]
        init["audio_features"] = np.zeros((batch_size, 2 * lengths["speech_frames"], common.NUM_MEL_BINS), np.float32)
        init["audio_mask"] = np.ones((batch_size, 2 * lengths["speech_frames"]), np.int32)
        runs[name] = (JaxStep(weights_name, init), batches, source)
    # First pass side by side: includes compiling every distinct shape. Second pass interleaved
    # batch by batch, so a change in machine load hits both sides alike.
    first = {name: sum(_step_seconds(step, b) for b in batches) for name, (step, batches, _) in runs.items()}
    steady = {name: 0.0 for name in runs}
    for i in range(num_batches):
        for name, (step, batches, _) in runs.items():
            steady[name] += _step_seconds(step, batches[i])
    examples = batch_size * num_batches
    for name, (step, batches, source) in runs.items():
        shapes = {tuple(b[k].shape[1] for k in ("speech_hidden", "prefix_tokens", "suffix_tokens", "target_tokens"))
                  for b in batches}
        report = source.padding_report(batch_size, seed=0, num_batches=num_batches)
        out["sides"][name] = {
            "padding": report["padding_bucketed"], "distinct_shapes": len(shapes), "first_pass_s": first[name],
            "steady_pass_s": steady[name], "examples_per_s_first_pass": examples / first[name],
            "examples_per_s": examples / steady[name],
        }
    f, b = out["sides"]["fixed"], out["sides"]["bucketed"]
    out["speedup_steady"] = b["examples_per_s"] / f["examples_per_s"]
    out["speedup_first_pass"] = b["examples_per_s_first_pass"] / f["examples_per_s_first_pass"]
    return out
