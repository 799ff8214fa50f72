"""The cascade baseline's front end: Whisper's encoder *and* decoder write a transcript.

log-mel -> Whisper encoder -> Whisper decoder, greedy, from
``<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>`` -> one hidden state per
token it writes -> ``SpeechRows`` (slm_jax/models/front_end.py) for the adapter.

This is not the paper's design (whose front end is the encoder alone): it is the cascade the
paper compares against, with an adapter between Whisper's transcript and the LLM. The adapter,
the LLM and the training are unchanged; only the speech slot holds a few rows per word, so the
adapter runs without subsampling (``AdapterConfig.subsample_rate = 1``).

State k is the decoder's output at the step that chose token k, so the kept states are
those that chose the transcript's tokens and the one that chose end-of-text (never empty).
The language token is Whisper's own choice among ``language_ids`` (one id = forced).

With ``llm_vocabulary`` the rows are one per LLM token of the transcript and carry its id, and
with ``decoder_states=False`` the states are zeroed so the adapter reads those tokens alone. The
shipped config (gin/cascade/whisper_base_transcriber_smollm2.gin) does both: adapters that read the
states learned the training corpus's synthetic voices and rewrote the words of real speakers
(docs/experiments).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.inference.processors import repeated_ngram_copy
from slm_jax.models.front_end import NO_TOKEN, SpeechRows
from slm_jax.contrib.whisper_cascade.whisper_decoder import WhisperDecoder, WhisperDecoderConfig
from slm_jax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig, check_speech_inputs

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[3])

# Multilingual Whisper's special tokens (tokenizer.json of every multilingual checkpoint).
END_OF_TEXT = 50257
START_OF_TRANSCRIPT = 50258
ENGLISH, FRENCH = 50259, 50265
TRANSCRIBE, NO_TIMESTAMPS = 50359, 50363


@dataclasses.dataclass(frozen=True)
class WhisperTranscriberConfig:
    encoder: WhisperEncoderConfig = WhisperEncoderConfig()
    decoder: WhisperDecoderConfig = WhisperDecoderConfig()
    language_ids: tuple[int, ...] = (ENGLISH, FRENCH)  # Whisper picks one; a single id forces it
    task_ids: tuple[int, ...] = (TRANSCRIBE, NO_TIMESTAMPS)
    start_of_transcript: int = START_OF_TRANSCRIPT
    end_of_text: int = END_OF_TEXT  # ids above it are special tokens, never written
    max_new_tokens: int = 128
    # Whisper learned on 30 s windows where speech is followed by silence; cut right after the
    # last word it does not see the end coming and repeats the sentence until max_new_tokens.
    # One second of silence (appended as Whisper's own padding value) is enough to stop it.
    trailing_silence_frames: int = 100
    # The LLM's tokens of the transcript (a vocabulary spec, e.g. 'package:smollm2-135m-instruct';
    # '' = off). When set, the rows carry them as ints (SpeechRows.token_ids) and the SLM gives the
    # adapter the LLM's own embeddings of them (slm_jax/models/slm.py): words the adapter never saw
    # arrive spelled in the LLM's tokens. ``llm_tokens_per_token``: the most LLM tokens one Whisper
    # token's text is spelled with.
    # Whisper's greedy decoding can fall into a loop ("Good morning. Good morning. ..."; 14% of
    # one synthetic corpus). n > 0: the transcript stops where its last n tokens repeat an earlier
    # n-gram, and that second copy is dropped. 4 keeps "ask not what your country can do for you,
    # ask what you can do for your country" whole (3 would cut it at the second "can do for").
    stop_on_repeated_ngram: int = 4
    llm_vocabulary: str = ""
    llm_tokens_per_token: int = 4
    # At most this many rows, one per LLM token of Whisper's transcript, each holding the state of the
    # Whisper token it spells and that LLM token's id (spell_out_rows): the LLM then reads Whisper's
    # transcript exactly as its own text. Needed with llm_vocabulary.
    llm_token_rows: int = 0
    # False: the decoder states are zeroed and the adapter reads only the LLM's tokens of Whisper's
    # transcript. The shipped config does this: adapters that read the states learned the training
    # corpus's voices from them and rewrote real speakers' words
    # (docs/experiments/2026-12-01-transcript-as-llm-tokens.md).
    decoder_states: bool = True
    whisper_tokenizer: str = "package:whisper-base"  # tokenizer.json of Whisper's vocabulary
    # Several speeds: Whisper transcribes the speech played at each (tempo and pitch together,
    # made from the log-mel features by change_speed), and each utterance keeps the transcript
    # Whisper was surest of (Transcript.confidence). Whisper-base mishears synthetic voices where
    # it is unsure, and a slower or faster copy is sometimes heard right
    # (docs/experiments/2026-12-02-whisper-at-several-speeds.md).
    # () = the speech as it is, one pass.
    speeds: tuple[float, ...] = ()
    # A low-rank adapter on Whisper's decoder (a file of slm-tune-whisper, slm_jax/contrib/whisper_cascade/tuning.py):
    # its factors are merged into the frozen decoder's kernels when the front end's weights load
    # (apply_decoder_lora). Whisper-base mishears the corpus's synthetic voices and rooms, and no
    # adapter behind it has those words back; trained on the corpus's transcripts, it hears them.
    # '' = Whisper as released.
    decoder_lora: str = ""

    def __post_init__(self):
        object.__setattr__(self, "language_ids", tuple(int(i) for i in self.language_ids))
        object.__setattr__(self, "task_ids", tuple(int(i) for i in self.task_ids))
        if not self.language_ids:
            raise ValueError("language_ids must name at least one language token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.encoder.d_model != self.decoder.d_model:
            raise ValueError(f"encoder d_model {self.encoder.d_model} != decoder d_model {self.decoder.d_model}")
        if not self.decoder_states and not self.llm_vocabulary:
            raise ValueError("decoder_states=False needs llm_vocabulary: the adapter would read nothing but zeros")
        if self.llm_vocabulary and self.llm_token_rows < 1:
            raise ValueError("llm_vocabulary needs llm_token_rows >= 1: the transcript's LLM tokens go one per row")
        object.__setattr__(self, "speeds", tuple(float(v) for v in self.speeds))
        if any(not 0.5 <= v <= 2.0 for v in self.speeds):
            raise ValueError(f"speeds must lie between 0.5 and 2.0, got {self.speeds}")
        if self.speeds and 1.0 not in self.speeds:  # transcribe() falls back on it where a slowed copy is cut
            raise ValueError(f"speeds must include 1.0, the speech as it is, got {self.speeds}")
        if self.llm_token_rows < 0:
            raise ValueError(f"llm_token_rows must be >= 0, got {self.llm_token_rows}")
        if self.prompt_length + self.max_new_tokens > self.decoder.max_target_positions:
            raise ValueError(f"prompt ({self.prompt_length}) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                             f"decoder's {self.decoder.max_target_positions} positions")

    @property
    def prompt_length(self) -> int:
        return 2 + len(self.task_ids)

    @property
    def front_end(self) -> str:
        """The name checkpoints record for what the adapter read (ModelSpec.speech_front_end): the
        two LLM-token layouts, or zeroed states, give rows of the same width but another meaning."""
        name = "whisper_transcriber"
        if self.llm_vocabulary:
            name += "_llm_token_rows"
        if not self.decoder_states:
            name += "_no_states"
        return name

    @property
    def writes_llm_tokens(self) -> bool:
        """Whether the rows carry the LLM's tokens of the transcript (SpeechRows.token_ids)."""
        return bool(self.llm_vocabulary)

    @property
    def output_dim(self) -> int:
        return self.decoder.d_model

    def weight_files_digest(self) -> dict[str, str]:
        """What the weights depend on beyond this config: the content of the decoder LoRA's file,
        whose path alone would not change when it is trained again (front-end cache keys)."""
        if not self.decoder_lora:
            return {}
        from slm_jax.contrib.whisper_cascade import lora

        return {"decoder_lora_sha256": lora.file_sha256(decoder_lora_file(self))}

    def prepare_params(self, params: Any) -> Any:
        """The loaded weights as this front end runs them: ``decoder_lora``'s factors merged into
        Whisper's decoder (slm_jax/models/front_end.py: the loaders' hook)."""
        from slm_jax.contrib.whisper_cascade import lora

        try:
            return apply_decoder_lora(self, params)
        except lora.LoraError as e:
            raise ValueError(f"decoder_lora: {e}") from None

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.num_mel_bins


def decoder_lora_file(config: WhisperTranscriberConfig) -> str:
    """``config.decoder_lora`` as a path: as given where it exists, else relative to the repository
    (a gin file's 'release/...' then works from any directory, as gin files themselves do)."""
    path = config.decoder_lora
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


def apply_decoder_lora(config: WhisperTranscriberConfig, params: Any) -> Any:
    """The front end's params with ``config.decoder_lora``'s factors merged into Whisper's decoder
    (``params`` itself without one). The frozen kernels are not changed; a new tree is returned."""
    if not config.decoder_lora:
        return params
    from slm_jax.contrib.whisper_cascade import lora

    factors, scale, _ = lora.load(decoder_lora_file(config))
    return dict(params, decoder=lora.merge(params["decoder"], factors, scale))


def append_silence(features: jax.Array, mask: jax.Array, frames: int, max_frames: int) -> tuple[jax.Array, jax.Array]:
    """Appends ``frames`` frames of silence after each row's real frames (fewer where the row would
    pass ``max_frames``). Silence is Whisper's padding value: log-mel features are clamped at
    8 log10 units below their maximum and scaled by 1/4, so zeros in the audio come out at the
    row's maximum minus 2."""
    if frames <= 0:
        return features, mask
    total = min(features.shape[1] + frames, max(max_frames, features.shape[1]))
    features = jnp.pad(features, ((0, 0), (0, total - features.shape[1]), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, total - mask.shape[1])))
    real = mask.astype(bool)
    lengths = real.sum(axis=1, keepdims=True)
    floor = jnp.max(jnp.where(real[..., None], features, -jnp.inf), axis=(1, 2)) - 2.0  # [B]
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0)  # a row with no real frame
    time = jnp.arange(total)[None, :]
    silence = jnp.logical_and(time >= lengths, time < lengths + frames)
    features = jnp.where(silence[..., None], floor[:, None, None].astype(features.dtype), features)
    return features, jnp.logical_or(real, silence).astype(mask.dtype)


@functools.lru_cache(maxsize=16)
def _mel_source_bins(speed: float, num_mel_bins: int, sample_rate: int) -> np.ndarray:
    """[num_mel_bins] float: where each mel bin's centre frequency was before the speech was played
    ``speed`` times as fast (f / speed), in bins of the same filterbank; beyond the top bin: inf."""
    from slm_jax.data.audio import _hz_to_mel_slaney, _mel_to_hz_slaney

    mels = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2), num_mel_bins + 2)
    source = _hz_to_mel_slaney(_mel_to_hz_slaney(mels[1:-1]) / speed)
    bins = (source - mels[1]) / (mels[2] - mels[1])  # the Slaney mel points are evenly spaced
    return np.where(bins <= num_mel_bins - 1 + 1e-6, np.minimum(bins, num_mel_bins - 1), np.inf)


def change_speed(features: jax.Array, mask: jax.Array, speed: float, frames: int,
                 sample_rate: int = 16000) -> tuple[jax.Array, jax.Array]:
    """Whisper log-mel features [B, T, M] of speech played ``speed`` times as fast, tempo and pitch
    together (audio.change_speed, a tape's speed), made from the features themselves: frame t
    reads frame t * speed, and each mel bin the frequency f / speed, both interpolated linearly.
    Frequencies that came from above the filterbank's top are silence (each row's floor).
    -> ([B, frames, M], mask [B, frames]: the first ceil(length / speed) frames, cut to ``frames``)."""
    batch, length, bins = features.shape
    if speed == 1.0:
        return (jnp.pad(features, ((0, 0), (0, frames - length), (0, 0)))[:, :frames],
                jnp.pad(mask, ((0, 0), (0, frames - length)))[:, :frames])
    real = mask.astype(bool)
    source_time = jnp.arange(frames, dtype=jnp.float32) * speed
    t0 = jnp.clip(jnp.floor(source_time).astype(jnp.int32), 0, length - 1)
    t1 = jnp.clip(t0 + 1, 0, length - 1)
    wt = (source_time - jnp.floor(source_time))[None, :, None]
    x = features[:, t0] * (1.0 - wt) + features[:, t1] * wt
    source_bin = _mel_source_bins(float(speed), bins, sample_rate)
    inside = np.isfinite(source_bin)
    b0 = np.floor(np.where(inside, source_bin, 0)).astype(np.int32)
    b1 = np.minimum(b0 + 1, bins - 1)
    wb = np.where(inside, source_bin, 0) - b0
    y = x[..., b0] * (1.0 - wb) + x[..., b1] * wb
    floor = jnp.min(jnp.where(real[..., None], features, jnp.inf), axis=(1, 2))  # [B] the row's quietest value
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0)
    y = jnp.where(inside, y, floor[:, None, None].astype(y.dtype))
    lengths = jnp.ceil(real.sum(axis=1) / speed).astype(jnp.int32)
    out_mask = jnp.arange(frames)[None, :] < lengths[:, None]
    return jnp.where(out_mask[..., None], y, 0.0).astype(features.dtype), out_mask.astype(mask.dtype)


@functools.lru_cache(maxsize=4)
def llm_token_table(whisper_tokenizer: str, llm_vocabulary: str, width: int, vocab_size: int,
                    end_of_text: int) -> np.ndarray:
    """[vocab_size, width] int32: 1 + the LLM token ids of each Whisper token's text, 0-padded
    (cut to ``width`` tokens; special tokens and end-of-text map to nothing)."""
    from slm_jax.data.vocabularies import load_vocabulary

    texts = whisper_token_texts(whisper_tokenizer, end_of_text)
    llm = load_vocabulary(llm_vocabulary)
    table = np.zeros((vocab_size, width), np.int32)
    for i, ids in enumerate(llm.encode_batch(texts) if hasattr(llm, "encode_batch") else map(llm.encode, texts)):
        ids = list(ids)[:width]
        table[i, :len(ids)] = np.asarray(ids, np.int32) + 1
    return table


@functools.lru_cache(maxsize=2)
def _whisper_tokenizer(whisper_tokenizer: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path, or 'package:whisper-base'."""
    import tokenizers

    if whisper_tokenizer != "package:whisper-base":
        path = whisper_tokenizer
    else:
        from slm_jax.weights import assets

        path = str(assets.whisper_base_files()["tokenizer.json"])
    return tokenizers.Tokenizer.from_file(path)


def whisper_token_texts(whisper_tokenizer: str, end_of_text: int) -> list[str]:
    """The text of every ordinary Whisper token (ids below ``end_of_text``), in id order."""
    tokenizer = _whisper_tokenizer(whisper_tokenizer)
    return [tokenizer.decode([i]) for i in range(end_of_text)]


@functools.lru_cache(maxsize=8)
def whisper_text_ids(whisper_tokenizer: str, text: str) -> tuple[int, ...]:
    """Whisper's tokens of ``text`` as a continuation (a space before it, no special tokens)."""
    return tuple(_whisper_tokenizer(whisper_tokenizer).encode(" " + text.strip(), add_special_tokens=False).ids)


def _packed_order(keep: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """The row order that puts the kept rows [B, N] first, in order, cut to ``length``, and its mask."""
    order = jnp.argsort(jnp.logical_not(keep), axis=1, stable=True)[:, :length]
    return order, jnp.take_along_axis(keep, order, axis=1)


def spell_out_rows(states: jax.Array, mask: jax.Array, ids: jax.Array, rows: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One row per LLM token: states [B, N, D], mask [B, N] and ``ids`` [B, N, W] (1 + LLM id,
    0 = none) -> the state of the Whisper token each row spells [B, rows, D], the row's LLM token id
    [B, rows] (NO_TOKEN for none) and the mask [B, rows], kept rows first in transcript order. A
    kept Whisper token with no LLM token (end-of-text) keeps one row without a token, so a
    transcript's rows are never empty; rows past ``rows`` are cut."""
    batch, n, width = ids.shape
    spelled = ids > 0
    first_slot = jnp.arange(width)[None, None, :] == 0
    keep = jnp.logical_or(spelled, jnp.logical_and(first_slot, ~jnp.any(spelled, axis=-1, keepdims=True)))
    pad = max(rows - n * width, 0)  # room for ``rows`` rows when the transcript spells fewer
    keep = jnp.pad(jnp.logical_and(keep, mask[..., None] > 0).reshape(batch, n * width), ((0, 0), (0, pad)))
    flat_states = jnp.pad(jnp.repeat(states, width, axis=1), ((0, 0), (0, pad), (0, 0)))
    flat_ids = jnp.pad(ids.reshape(batch, n * width), ((0, 0), (0, pad)))
    order, out_mask = _packed_order(keep, rows)
    packed_states = jnp.take_along_axis(flat_states, order[..., None], axis=1) * out_mask[..., None].astype(states.dtype)
    packed_ids = jnp.where(out_mask, jnp.take_along_axis(flat_ids, order, axis=1) - 1, NO_TOKEN).astype(jnp.int32)
    return packed_states, jnp.maximum(packed_ids, NO_TOKEN), out_mask.astype(mask.dtype)


class Transcript(NamedTuple):
    states: jax.Array  # [B, N, D] decoder states, N = max_new_tokens
    mask: jax.Array  # [B, N] 1 for kept states
    tokens: jax.Array  # [B, N] the token each state chose (end_of_text where it stopped)
    language: jax.Array  # [B] the language token
    memory: jax.Array  # [B, T, D] the encoder's output the decoder read (trailing silence included)
    memory_mask: jax.Array  # [B, T]
    log_probs: jax.Array  # [B, N] the log-probability of each chosen token (0 where mask is 0)

    def confidence(self) -> jax.Array:
        """[B] the mean log-probability of the kept tokens (end-of-text included): Whisper's own
        measure of how sure it was (its transcribe() falls back to sampling below -1.0)."""
        return jnp.sum(self.log_probs, axis=1) / jnp.maximum(jnp.sum(self.mask, axis=1), 1)


class _Loop(NamedTuple):
    step: jax.Array
    last_token: jax.Array  # [B]
    caches: object
    done: jax.Array  # [B] end-of-text already chosen
    states: jax.Array
    mask: jax.Array
    tokens: jax.Array
    log_probs: jax.Array


class WhisperTranscriber(nn.Module):
    config: WhisperTranscriberConfig

    def setup(self):
        self.encoder = WhisperEncoder(self.config.encoder, name="encoder")
        self.decoder = WhisperDecoder(self.config.decoder, name="decoder")

    def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> SpeechRows:
        """The transcript's rows: one per Whisper token (N = max_new_tokens), or with
        ``llm_vocabulary`` one per LLM token of it (N = llm_token_rows) carrying that token's id."""
        transcript = self.transcribe(features, mask)
        c = self.config
        if not c.decoder_states:
            transcript = transcript._replace(states=jnp.zeros_like(transcript.states))
        if not c.writes_llm_tokens:
            return SpeechRows(transcript.states, transcript.mask)
        table = jnp.asarray(llm_token_table(c.whisper_tokenizer, c.llm_vocabulary, c.llm_tokens_per_token,
                                            c.decoder.vocab_size, c.end_of_text))
        states, token_ids, rows_mask = spell_out_rows(transcript.states, transcript.mask, table[transcript.tokens],
                                                      c.llm_token_rows)
        return SpeechRows(states, rows_mask, token_ids)

    def _choose(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The greedy token among the ordinary ones and its log-probability among them."""
        logits = self.decoder.logits(hidden).astype(jnp.float32)
        special = jnp.arange(logits.shape[-1]) > self.config.end_of_text
        log_probs = jax.nn.log_softmax(jnp.where(special, -jnp.inf, logits), axis=-1)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]

    def encode(self, features: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The encoder's output [B, T, D] and mask as the decoder reads it: trailing silence appended."""
        c = self.config
        features, mask = check_speech_inputs(features, mask, c.encoder.num_mel_bins, "WhisperTranscriber")
        features, mask = append_silence(features, mask, c.trailing_silence_frames, c.encoder.max_frames)
        return self.encoder(features, mask)

    def transcribe(self, features: jax.Array, mask: jax.Array | None = None) -> Transcript:
        """Whisper's greedy transcript of each utterance; with ``config.speeds``, the most
        confident of its transcripts of the utterance played at each speed."""
        c = self.config
        if not c.speeds or c.speeds == (1.0,):
            return self._transcribe(features, mask)
        features, mask = check_speech_inputs(features, mask, c.encoder.num_mel_bins, "WhisperTranscriber")
        batch, length, _ = features.shape
        # Every copy gets the frames of the slowest one, within the window (the silence is appended after).
        frames = max(length, min(int(np.ceil(length / min(c.speeds))), c.encoder.max_frames - c.trailing_silence_frames))
        copies = [change_speed(features, mask, speed, frames) for speed in c.speeds]
        everything = self._transcribe(jnp.concatenate([f for f, _ in copies]), jnp.concatenate([m for _, m in copies]))
        # A slowed copy cut short by the window may be transcribed with confidence and lose words: only
        # the copies that fit whole compete (the speech as it is always does).
        lengths = jnp.sum(mask, axis=1)
        fits = jnp.stack([jnp.logical_or(speed == 1.0, jnp.ceil(lengths / speed) <= frames) for speed in c.speeds])
        confidence = jnp.where(fits, everything.confidence().reshape(len(c.speeds), batch), -jnp.inf)
        best = jnp.argmax(confidence, axis=0)  # [B]
        return jax.tree_util.tree_map(
            lambda x: x.reshape(len(c.speeds), batch, *x.shape[1:])[best, jnp.arange(batch)], everything)

    def _transcribe(self, features: jax.Array, mask: jax.Array | None = None) -> Transcript:
        c = self.config
        memory, memory_mask = self.encode(features, mask)
        batch = memory.shape[0]
        caches = self.decoder.init_caches(memory, c.prompt_length + c.max_new_tokens)

        # Step 0: <|startoftranscript|> -> the language, among the allowed ones.
        start = jnp.full((batch, 1), c.start_of_transcript, jnp.int32)
        hidden, caches = self.decoder(start, memory, memory_mask, caches, 0)
        languages = jnp.asarray(c.language_ids, jnp.int32)
        language_logits = self.decoder.logits(hidden[:, -1]).astype(jnp.float32)[:, languages]
        language = languages[jnp.argmax(language_logits, axis=-1)]
        # The rest of the prompt in one cached call; its last state chooses the first token.
        rest = jnp.concatenate([language[:, None], jnp.broadcast_to(jnp.asarray(c.task_ids, jnp.int32),
                                                                       (batch, len(c.task_ids)))], axis=1)
        hidden, caches = self.decoder(rest, memory, memory_mask, caches, start.shape[1])
        first, first_log_prob = self._choose(hidden[:, -1])

        n = c.max_new_tokens
        loop = _Loop(
            step=jnp.asarray(1, jnp.int32),
            last_token=first,
            caches=caches,
            done=first == c.end_of_text,
            states=jnp.zeros((batch, n, c.decoder.d_model), hidden.dtype).at[:, 0].set(hidden[:, -1]),
            mask=jnp.zeros((batch, n), jnp.int32).at[:, 0].set(1),
            tokens=jnp.full((batch, n), c.end_of_text, jnp.int32).at[:, 0].set(first),
            log_probs=jnp.zeros((batch, n), jnp.float32).at[:, 0].set(first_log_prob),
        )

        def more(module, s: _Loop):
            return jnp.logical_and(s.step < n, jnp.logical_not(jnp.all(s.done)))

        def body(module, s: _Loop):
            h, new_caches = module.decoder(s.last_token[:, None], None, memory_mask, s.caches,
                                           c.prompt_length - 1 + s.step)
            token, log_prob = module._choose(h[:, 0])
            chosen = jnp.where(s.done, c.end_of_text, token)
            live = jnp.logical_not(s.done)
            tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, chosen[:, None], s.step, axis=1)
            mask = jax.lax.dynamic_update_slice_in_dim(s.mask, live.astype(jnp.int32)[:, None], s.step, axis=1)
            done = jnp.logical_or(s.done, chosen == c.end_of_text)
            if c.stop_on_repeated_ngram:
                copy, looped = repeated_ngram_copy(tokens, s.step, live, c.stop_on_repeated_ngram)
                mask = jnp.where(copy, 0, mask)
                done = jnp.logical_or(done, looped)
            return _Loop(
                step=s.step + 1,
                last_token=chosen,
                caches=new_caches,
                done=done,
                states=jax.lax.dynamic_update_slice_in_dim(s.states, h.astype(s.states.dtype), s.step, axis=1),
                mask=mask,
                tokens=tokens,
                log_probs=jax.lax.dynamic_update_slice_in_dim(s.log_probs, jnp.where(live, log_prob, 0.0)[:, None],
                                                              s.step, axis=1),
            )

        if self.is_initializing():  # every parameter exists already; no need to trace the loop
            final = loop
        else:
            final = nn.while_loop(more, body, self, loop)
        states = final.states * final.mask[..., None].astype(final.states.dtype)
        log_probs = final.log_probs * final.mask  # a dropped loop copy does not count
        return Transcript(states, final.mask, final.tokens, language, memory, memory_mask, log_probs)
