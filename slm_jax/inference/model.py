"""Answering instructions about speech with a trained adapter: the library behind slm-infer and
slm-eval.

The whole path runs in one jitted function per shape bucket: frozen encoder -> adapter ->
prompt embeddings -> LLM decoding (greedy or beam search) with a preallocated KV cache inside one
``lax.while_loop``. Audio and prompt lengths are padded up to buckets so that a new file rarely
means a new compile.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from slm_jax.training import alignment
from slm_jax.data import batching
from slm_jax.inference import decoding
from slm_jax.models.spec import ModelSpec
from slm_jax.models import registry
from slm_jax.models.slm import SLM, llm_token_ids, merge_params
from slm_jax.data.prompting import PromptFormat


def _bucket(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


# Tokens an answer that follows the transcript may write beyond it (closing punctuation Whisper
# left out); past that, end-of-turn gets a growing bonus (decoding.TranscriptGuide.answer_length).
GUIDE_END_SLACK = 2

NO_TRANSCRIPT = ("this model's speech front end writes no transcript to follow (a transcriber front end does, "
                 "e.g. gin/whisper_base_transcriber_smollm2.gin)")


def writes_transcript(model: ModelSpec) -> bool:
    """Whether the model's front end writes its own transcript (Whisper's decoder), which
    ``generate(..., transcript_bias=b)`` can follow."""
    return bool(getattr(model.speech_encoder, "llm_token_channels", 0))


def number_tokens(pieces: Sequence[str]) -> list[bool]:
    """Which of a transcript's token texts spell a number: those with a digit, and the bare space
    before one (a byte-level BPE writes " 1977" as " ", "1", "9", "7", "7"). The transcript guide
    leaves them to the model: Whisper writes digits, and an adapter trained on spelled-out numbers
    ("nine four three four") converts them; a bonus on them would undo that."""
    digit = [any(c.isdigit() for c in piece) for piece in pieces]
    return [d or (not piece.strip() and i + 1 < len(pieces) and digit[i + 1])
            for i, (piece, d) in enumerate(zip(pieces, digit))]


class SpeechLanguageModel:
    """A ready-to-run SLM: model, frozen weights, trained adapter, vocabulary and prompt format."""

    def __init__(
        self, model: ModelSpec, frozen: Mapping[str, Any], adapter_params: Any, vocabulary: Any,
        prompt_format: PromptFormat, audio_bucket_frames: int = 200, token_bucket: int = 8,
        alignment_token_ids: Sequence[int] | None = None, alignment_centered: bool = False,
        ctc_compression: str = "",
    ):
        self.spec = model
        self.slm: SLM = model.build()
        self.llm = registry.module_for(model.llm)
        self.params = merge_params(adapter_params, frozen)
        self.vocabulary = vocabulary
        self.prompt_format = prompt_format
        self.audio_bucket_frames = audio_bucket_frames
        self.token_bucket = token_bucket
        # The sub-vocabulary of the alignment objective the adapter was trained with, if any.
        self.alignment_vocabulary = (
            alignment.AlignmentVocabulary(alignment_token_ids, registry.llm_vocab_size(model.llm), alignment_centered)
            if alignment_token_ids else None)
        if ctc_compression and self.alignment_vocabulary is None:
            raise ValueError("ctc_compression needs the alignment vocabulary the adapter was trained with")
        # '' or the mode of CTC compression the adapter was trained with (alignment.ctc_compress).
        self.ctc_compression = ctc_compression

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("max_new_tokens", "num_beams", "no_repeat_ngram_size",
                                                      "stop_on_repeated_ngram"))
    def _generate(self, params, batch, start_tokens, *, max_new_tokens: int, num_beams: int,
                  no_repeat_ngram_size: int = 0, stop_on_repeated_ngram: int = 0,
                  guide: decoding.TranscriptGuide | None = None):
        variables = {"params": params}
        if "speech_hidden" in batch:  # encoder outputs computed offline (slm_jax/data/cached/encoder_cache.py)
            hidden, mask = batch["speech_hidden"], batch["speech_mask"]
        else:
            hidden, mask = self.slm.apply(variables, batch["audio_features"], batch["audio_mask"],
                                          method=SLM.encode_speech)
        compression = ((np.asarray(self.alignment_vocabulary.ids, np.int32), self.alignment_vocabulary.centered,
                        self.ctc_compression) if self.ctc_compression else ())
        speech, speech_mask = self.slm.apply(variables, hidden, mask, *compression, method=SLM.adapt)
        prompt, prompt_mask = self.slm.apply(variables, speech, speech_mask, batch, method=SLM.prompt_embeddings)
        return decoding.generate(
            self.llm, params["llm"], prompt, prompt_mask, start_tokens, max_new_tokens,
            eos_id=int(self.vocabulary.eos_id), num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
            stop_on_repeated_ngram=stop_on_repeated_ngram, guide=guide,
        )

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_speech(self, params, audio, audio_mask):
        return self.slm.apply({"params": params}, audio, audio_mask, method=SLM.encode_speech)

    def _pad_frames(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """[frames, C] arrays -> one batch, its length padded up to a bucket (few shapes compile)."""
        return batching.pad_frames(features, _bucket(max(f.shape[0] for f in features), self.audio_bucket_frames))

    def front_end(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The frozen front end's outputs for log-mel arrays [frames, mels]: ([B, N, D], mask [B, N]),
        what ``generate(..., precomputed_speech=True)`` reads."""
        audio, audio_mask = self._pad_frames(features)
        hidden, mask = self._encode_speech(self.params, audio, audio_mask)
        return np.asarray(hidden), np.asarray(mask)

    def front_end_width(self, features: Sequence[np.ndarray]) -> int:
        """How many rows ``front_end`` gives these log-mel arrays (padding included), from shapes
        alone: rows kept from an earlier run, padded to it, read as the front end's own output."""
        audio, audio_mask = self._pad_frames(features)
        return int(jax.eval_shape(self._encode_speech, self.params, audio, audio_mask)[0].shape[1])

    def front_end_transcripts(self, speech_hidden: np.ndarray) -> list[list[int]]:
        """The LLM token ids of the transcript a transcriber front end wrote into its rows
        [B, N, D] (frozen-encoder outputs), as the LLM's tokenizer spells the whole text: the rows
        spell each Whisper token alone, and an answer spells words whole (" Chicago", not " Chic"
        "ago"). Without the leading space, as an answer's first word has none."""
        if not writes_transcript(self.spec):
            raise ValueError(NO_TRANSCRIPT)
        channels = self.slm.speech_encoder.config.llm_token_channels
        ids = np.asarray(llm_token_ids(np.asarray(speech_hidden, np.float32), channels)).reshape(len(speech_hidden), -1)
        texts = [self.vocabulary.decode([int(i) - 1 for i in row if i > 0]).strip() for row in ids]
        return [list(self.vocabulary.encode(text)) if text else [] for text in texts]

    def _transcript_guide(self, speech_hidden: np.ndarray, bias: float) -> decoding.TranscriptGuide:
        transcripts = self.front_end_transcripts(speech_hidden)
        width = _bucket(max(len(t) for t in transcripts), self.token_bucket)
        tokens, mask = batching.pad_rows(transcripts, width)
        numbers = np.zeros(tokens.shape, bool)
        for i, row in enumerate(transcripts):
            numbers[i, :len(row)] = number_tokens([self.vocabulary.decode([t]) for t in row])
        lengths = np.asarray(mask).sum(axis=1).astype(np.int32)
        # An answer that follows the transcript writes each of its tokens once, a number's digits as
        # words (" nine" for "9": the digit and its word each take a token, so two per digit token
        # allows "twenty-one" for "21"), and may close with punctuation Whisper left out.
        answer_length = lengths + numbers.sum(axis=1).astype(np.int32) + GUIDE_END_SLACK
        return decoding.TranscriptGuide(
            np.asarray(tokens, np.int32), lengths, np.where(numbers, 0.0, bias).astype(np.float32),
            np.asarray(bias, np.float32), answer_length)

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def _alignment_logits(self, params, audio, audio_mask, token_ids, centered):
        variables = {"params": params}
        hidden, mask = self.slm.apply(variables, audio, audio_mask, method=SLM.encode_speech)
        return self.slm.apply(variables, hidden, mask, token_ids, centered, method=SLM.alignment_logits)

    def transcribe_ctc(self, features: Sequence[np.ndarray]) -> list[str]:
        """What the adapter itself 'says', without the LLM: the best path of its CTC head over the
        alignment sub-vocabulary (only for adapters trained with alignment steps). A diagnostic of
        the speech-to-embedding alignment, not the model's answer."""
        if self.alignment_vocabulary is None:
            raise ValueError("this checkpoint has no alignment vocabulary: it was trained without alignment "
                             "steps (train.alignment_steps) or before checkpoints recorded it")
        if not features:
            return []
        audio, audio_mask = self._pad_frames(features)
        ids = np.asarray(self.alignment_vocabulary.ids, np.int32)
        logits, frame_mask = self._alignment_logits(self.params, audio, audio_mask, ids,
                                                    self.alignment_vocabulary.centered)
        decoded = alignment.greedy_decode(np.asarray(logits), np.asarray(frame_mask), self.alignment_vocabulary)
        return [self.vocabulary.decode(tokens).strip() for tokens in decoded]

    def generate(
        self, features: Sequence[np.ndarray], instructions: Sequence[str] | str, max_new_tokens: int = 64,
        num_beams: int = 1, precomputed_speech: bool = False, no_repeat_ngram_size: int = 0,
        stop_on_repeated_ngram: int = 0, transcript_bias: float = 0.0, speech_width: int | None = None,
    ) -> list[str]:
        """Answers for a batch of log-mel feature arrays [frames, mels] and their instructions.

        ``no_repeat_ngram_size`` n > 0: no answer repeats an n-gram of its tokens (0: off).
        ``stop_on_repeated_ngram`` n > 0 (greedy only): an answer ends where it repeats one.
        ``transcript_bias`` b > 0 (greedy only, transcriber front ends): a logit bonus b for
        following the front end's own transcript (``decoding.TranscriptGuide``).

        With ``precomputed_speech=True`` the arrays are the frozen encoder's outputs [frames, D],
        padded to ``speech_width`` rows when given (``front_end_width``), else to a bucket.
        """
        if isinstance(instructions, str):
            instructions = [instructions] * len(features)
        if len(instructions) != len(features):
            raise ValueError(f"{len(features)} audio inputs but {len(instructions)} instructions")
        if transcript_bias < 0:
            raise ValueError(f"transcript_bias must be >= 0, got {transcript_bias}")
        if transcript_bias and num_beams > 1:
            raise ValueError("transcript_bias is a greedy-decoding rule; use num_beams=1 with it")
        if not features:
            return []
        if transcript_bias and not precomputed_speech:  # the front end first: its transcript is the guide
            audio, audio_mask = self.front_end(features)
            precomputed_speech = True
        elif precomputed_speech and speech_width is not None:
            audio, audio_mask = batching.pad_frames(features, speech_width)
        else:
            audio, audio_mask = self._pad_frames(features)
        guide = self._transcript_guide(audio, transcript_bias) if transcript_bias else None
        prompts = batching.encode_prompts(self.vocabulary, self.prompt_format, instructions)
        prefix, prefix_mask = batching.pad_rows(
            [p.prefix for p in prompts], _bucket(max(len(p.prefix) for p in prompts), self.token_bucket))
        suffix, suffix_mask = batching.pad_rows(
            [p.suffix for p in prompts], _bucket(max(len(p.suffix) for p in prompts), self.token_bucket))
        speech_keys = ("speech_hidden", "speech_mask") if precomputed_speech else ("audio_features", "audio_mask")
        batch = {
            speech_keys[0]: audio, speech_keys[1]: audio_mask, "prefix_tokens": prefix, "prefix_mask": prefix_mask,
            "suffix_tokens": suffix, "suffix_mask": suffix_mask,
        }
        start = np.asarray([p.decoder_start for p in prompts], np.int32)
        out = self._generate(self.params, batch, start, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             no_repeat_ngram_size=no_repeat_ngram_size, stop_on_repeated_ngram=stop_on_repeated_ngram,
                             guide=guide)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [self.vocabulary.decode([int(t) for t in row[:n]]).strip() for row, n in zip(tokens, lengths)]


def load_trained(checkpoint: str, model: ModelSpec, data: Any) -> tuple[SpeechLanguageModel, int]:
    """The SLM of a training run: frozen weights from their sources, the adapter from ``checkpoint``
    (a model directory, for its latest step, or one step directory). Returns (model, step)."""
    from slm_jax.training import checkpointing
    from slm_jax.parallel import partitioning
    from slm_jax.models.spec import sample_batch
    from slm_jax.weights.frozen import load_frozen_params
    from slm_jax.training.step import Trainer, make_optimizer

    for attribute in ("vocabulary", "prompt_format", "feature_lengths"):
        if not hasattr(data, attribute):
            raise ValueError(f"the configured data source {type(data).__name__} has no {attribute}; "
                             "inference needs a corpus/task data source (e.g. gin/tiny.gin)")
    optimizer, schedule = make_optimizer(name=_optimizer_name())
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    trainer = Trainer(model.build(), optimizer, schedule, mesh)
    example = sample_batch(1, data.feature_lengths)
    restored = checkpointing.restore_checkpoint(checkpoint, trainer.abstract_state(example), model.frozen_sources,
                                               model.speech_front_end)
    frozen = load_frozen_params(trainer, model, example)
    metadata = restored.metadata
    return SpeechLanguageModel(model, frozen, restored.state.adapter_params, data.vocabulary, data.prompt_format,
                               alignment_token_ids=metadata.get("alignment_token_ids"),
                               alignment_centered=bool(metadata.get("alignment_centered", False)),
                               ctc_compression=metadata.get("ctc_compression") or ""), restored.step


def _optimizer_name() -> str:
    """The optimizer the run was configured with (its state shape is part of the checkpoint)."""
    import gin

    try:
        return gin.query_parameter("train.optimizer")
    except ValueError:
        return "adamw"
