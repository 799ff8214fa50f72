"""A low-rank adapter on the transcriber front end's frozen Whisper decoder, trained on a corpus.

Why: the transcriber front end (front_end.py) reads the speech with all of
Whisper-base, and what the SLM's adapter reads is Whisper's transcript. Where Whisper-base
mishears a voice (espeak-ng's robotic voices: 40-60% WER; reverberant rooms: 25%), no adapter
behind it has the words back (docs/experiments/2026-12-02-error-sources-held-out-english.md). A LoRA on Whisper's decoder,
trained with Whisper's own next-token loss on the training split's transcripts, teaches Whisper
the voices of the corpus while every pretrained weight stays frozen: only the factors train,
and the front end merges them into the decoder's kernels when it loads
(``WhisperTranscriberConfig.decoder_lora``).

Training reads the frozen encoder's output once per utterance (the speech as it is, and
``speed_copies`` copies at speeds drawn from the front end's ``speeds``, so that the adapter
also learns the copies the front end will choose among), then trains the factors on
[<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>] text <|endoftext|>.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slm_jax.data import audio, batching
from slm_jax.weights.assets import atomic_output
from slm_jax.contrib.whisper_cascade import lora
from slm_jax.contrib.whisper_cascade import front_end as wt
from slm_jax.contrib.whisper_cascade.whisper_decoder import WhisperDecoder

ATTENTION = tuple(f"{block}/{proj}" for block in ("self_attn", "encoder_attn") for proj in ("query", "key", "value", "out"))


# Each new batch shape is a new compilation of the step (about 15 s here): a few coarse buckets.
FRAME_QUANTUM, TOKEN_QUANTUM = 250, 32


@dataclasses.dataclass(frozen=True)
class WhisperTuningConfig:
    rank: int = 16
    scale: float = 2.0  # the factors' product is multiplied by this (LoRA's alpha / rank)
    modules: tuple[str, ...] = (*ATTENTION, "mlp/wi", "mlp/wo")  # in every decoder layer
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-4
    warmup_steps: int = 20
    speed_copies: int = 1  # extra copies of each utterance, each at a speed drawn from the front end's
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ValueError(f"steps, batch_size and rank must be >= 1, got {self.steps}, {self.batch_size}, "
                             f"{self.rank}")
        if self.speed_copies < 0:
            raise ValueError(f"speed_copies must be >= 0, got {self.speed_copies}")


class TuningExample(NamedTuple):
    memory: np.ndarray  # [T, D] float16: the frozen encoder's output, trailing silence included
    inputs: np.ndarray  # [L] int32: the prompt and the transcript
    targets: np.ndarray  # [L] int32: the same shifted by one (the transcript and end-of-text)


def language_token(config: wt.WhisperTranscriberConfig, lang: str) -> int:
    token = wt._whisper_tokenizer(config.whisper_tokenizer).token_to_id(f"<|{lang}|>")
    if token is None:
        raise ValueError(f"Whisper's tokenizer has no language token for {lang!r}")
    return token


def transcript_sequence(config: wt.WhisperTranscriberConfig, text: str, language: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of Whisper's own prompt (with the ``language`` token) and ``text`` as it
    would write it, ended by end-of-text."""
    ids = list(wt.whisper_text_ids(config.whisper_tokenizer, text))  # a space before it, no special tokens
    sequence = [config.start_of_transcript, language, *config.task_ids, *ids, config.end_of_text]
    if len(sequence) - 1 > config.decoder.max_target_positions:
        raise ValueError(f"transcript of {len(ids)} tokens does not fit Whisper's "
                         f"{config.decoder.max_target_positions} positions: {text[:60]!r}...")
    return np.asarray(sequence[:-1], np.int32), np.asarray(sequence[1:], np.int32)


def frozen_transcriber(config: wt.WhisperTranscriberConfig) -> wt.WhisperTranscriberConfig:
    """The front end without a decoder LoRA (the adapter trains on the frozen decoder itself)."""
    return dataclasses.replace(config, decoder_lora="")


def encode_examples(config: wt.WhisperTranscriberConfig, params: Any, examples: Sequence[dict],
                    tuning: WhisperTuningConfig, progress: Callable[[Iterator], Iterator] = iter,
                    languages: Mapping[str, int] | None = None) -> list[TuningExample]:
    """Each example's encoder output (as it is, and ``speed_copies`` speed copies) and transcript.
    ``languages``: language code -> Whisper's token (default: looked up in Whisper's tokenizer)."""
    config = frozen_transcriber(config)
    languages = dict(languages or {})
    for lang in sorted({e["lang"] for e in examples} - set(languages)):
        languages[lang] = language_token(config, lang)
    rng = np.random.default_rng(tuning.seed)
    others = [s for s in config.speeds if s != 1.0]
    window = config.encoder.max_frames - config.trailing_silence_frames
    encode = jax.jit(lambda p, f, m: wt.WhisperTranscriber(config).apply(
        {"params": p}, f, m, method=wt.WhisperTranscriber.encode))
    out = []
    for example in progress(examples):
        inputs, targets = transcript_sequence(config, example["text"], languages[example["lang"]])
        features = audio.log_mel_spectrogram(np.asarray(example["audio"], np.float32))
        if features.shape[0] > window:
            raise ValueError(f"example {example['id']!r}: {features.shape[0]} frames do not fit Whisper's window "
                             f"of {window}")
        speeds = [1.0] + ([float(s) for s in rng.choice(others, tuning.speed_copies)] if others else [])
        for speed in speeds:
            length = batching.bucket_length(min(math.ceil(features.shape[0] / speed), window), 200, window)
            f, m = batching.pad_frames([features], features.shape[0])
            f, m = wt.change_speed(jnp.asarray(f), jnp.asarray(m), speed, length)
            memory, memory_mask = encode(params, f, m)
            kept = int(np.asarray(memory_mask).sum())
            out.append(TuningExample(np.asarray(memory[0, :kept], np.float16), inputs, targets))
    return out


def save_examples(path: str, examples: Sequence[TuningExample], key: str) -> None:
    """The encoded examples in one .npz (written atomically), tagged with ``key``: what made them."""
    with atomic_output(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), memory=np.concatenate([e.memory for e in examples]),
                 frames=np.array([len(e.memory) for e in examples]), tokens=np.concatenate([e.inputs for e in examples]),
                 lengths=np.array([len(e.inputs) for e in examples]),
                 last=np.array([e.targets[-1] for e in examples], np.int32))


def load_examples(path: str, key: str) -> list[TuningExample]:
    """Examples written by ``save_examples`` with the same ``key``; a file made otherwise is refused."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            raise ValueError(f"{path} holds examples encoded for another front end, corpus or selection "
                             f"({str(z['key'])[:80]}...); remove it or name another file")
        frames, lengths = np.cumsum(z["frames"]), np.cumsum(z["lengths"])
        memory, tokens, last = z["memory"], z["tokens"], z["last"]
    out = []
    for i in range(len(frames)):
        inputs = tokens[(lengths[i - 1] if i else 0):lengths[i]]
        out.append(TuningExample(memory[(frames[i - 1] if i else 0):frames[i]], inputs,
                                 np.append(inputs[1:], last[i]).astype(np.int32)))
    return out


def batches(examples: Sequence[TuningExample], batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless length-grouped batches in a shuffled order (padding to multiples of FRAME_QUANTUM
    frames and TOKEN_QUANTUM tokens keeps the number of compiled step shapes small)."""
    rng = np.random.default_rng(seed)
    order = np.argsort([len(e.memory) for e in examples], kind="stable")
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    while True:
        for g in rng.permutation(len(groups)):
            chosen = [examples[i] for i in groups[g]]
            frames = FRAME_QUANTUM * math.ceil(max(len(e.memory) for e in chosen) / FRAME_QUANTUM)
            tokens = TOKEN_QUANTUM * math.ceil(max(len(e.inputs) for e in chosen) / TOKEN_QUANTUM)
            batch = {
                "memory": np.zeros((batch_size, frames, chosen[0].memory.shape[1]), np.float32),
                "memory_mask": np.zeros((batch_size, frames), np.int32),
                "inputs": np.zeros((batch_size, tokens), np.int32),
                "targets": np.zeros((batch_size, tokens), np.int32),
                "weights": np.zeros((batch_size, tokens), np.float32),
            }
            for j, e in enumerate(chosen):
                batch["memory"][j, :len(e.memory)] = e.memory
                batch["memory_mask"][j, :len(e.memory)] = 1
                batch["inputs"][j, :len(e.inputs)] = e.inputs
                batch["targets"][j, :len(e.targets)] = e.targets
                batch["weights"][j, :len(e.targets)] = 1.0
            batch["memory_mask"][len(chosen):, 0] = 1  # a filler row attends to one zero frame, weighs nothing
            yield batch


def next_token_loss(decoder: WhisperDecoder, frozen_decoder: Any, factors: lora.Factors, scale: float,
                    batch: dict[str, jax.Array]) -> jax.Array:
    """Whisper's mean next-token cross-entropy over the weighted target tokens, with the factors merged."""
    params = lora.merge(frozen_decoder, factors, scale)
    hidden, _ = decoder.apply({"params": params}, batch["inputs"], batch["memory"], batch["memory_mask"])
    logits = decoder.apply({"params": params}, hidden, method=WhisperDecoder.logits).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def train(config: wt.WhisperTranscriberConfig, params: Any, examples: Sequence[TuningExample],
          tuning: WhisperTuningConfig, on_step: Callable[[int, float], None] | None = None) -> lora.Factors:
    """The LoRA factors on ``params['decoder']`` after ``tuning.steps`` AdamW steps; ``on_step(step,
    loss)`` after each (progress, logs)."""
    if not examples:
        raise ValueError("no examples to tune Whisper's decoder on")
    decoder = WhisperDecoder(config.decoder)
    frozen_decoder = params["decoder"]
    paths = lora.target_paths(frozen_decoder, "layers_", tuning.modules)
    factors = lora.init(frozen_decoder, paths, tuning.rank, jax.random.PRNGKey(tuning.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, tuning.learning_rate, min(tuning.warmup_steps, tuning.steps - 1),
                                                  tuning.steps, tuning.learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = optimizer.init(factors)

    @jax.jit  # the frozen weights are an argument: closed over, XLA would fold them as constants
    def step(factors, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(
            lambda f: next_token_loss(decoder, frozen, f, tuning.scale, batch))(factors)
        updates, opt_state = optimizer.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state, loss

    stream = batches(examples, tuning.batch_size, tuning.seed)
    for i in range(tuning.steps):
        factors, opt_state, loss = step(factors, opt_state, frozen_decoder, next(stream))
        if on_step is not None:
            on_step(i + 1, float(loss))
    return factors
