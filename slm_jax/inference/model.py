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

from slm_jax.data import batching
from slm_jax.data.prompting import PromptFormat
from slm_jax.inference import decoding
from slm_jax.models import registry
from slm_jax.models.front_end import SpeechRows, pack_rows, speech_batch, unpack_rows, writes_tokens
from slm_jax.models.slm import SLM, merge_params
from slm_jax.models.spec import ModelSpec
from slm_jax.training import alignment


def _bucket(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


NO_TRANSCRIPT = ("this model's speech front end writes no transcript to follow (the cascade baseline's front end "
                 "does, e.g. gin/cascade/whisper_base_transcriber_smollm2.gin)")


def writes_transcript(model: ModelSpec) -> bool:
    """Whether the model's front end writes its own transcript (the cascade's Whisper decoder)."""
    return writes_tokens(model.speech_encoder)


class SpeechLanguageModel:
    """A ready-to-run SLM: model, frozen weights, trained adapter, vocabulary and prompt format."""

    def __init__(
        self, model: ModelSpec, frozen: Mapping[str, Any], adapter_params: Any, vocabulary: Any,
        prompt_format: PromptFormat, audio_bucket_frames: int = 200, token_bucket: int = 8,
        alignment_token_ids: Sequence[int] | None = None,
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
            alignment.AlignmentVocabulary(alignment_token_ids, registry.llm_vocab_size(model.llm))
            if alignment_token_ids else None)

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("max_new_tokens", "num_beams", "no_repeat_ngram_size",
                                        "stop_on_repeated_ngram"))
    def _generate(self, params, batch, start_tokens, *, max_new_tokens: int, num_beams: int,
                  no_repeat_ngram_size: int = 0, stop_on_repeated_ngram: int = 0, processors: tuple = ()):
        variables = {"params": params}
        if "speech_hidden" in batch:  # front-end outputs computed earlier (slm_jax/data/cached/encoder_cache.py)
            rows = SpeechRows(batch["speech_hidden"], batch["speech_mask"], batch.get("speech_token_ids"))
        else:
            rows = self.slm.apply(variables, batch["audio_features"], batch["audio_mask"], method=SLM.encode_speech)
        speech, speech_mask = self.slm.apply(variables, rows, method=SLM.adapt)
        prompt, prompt_mask = self.slm.apply(variables, speech, speech_mask, batch, method=SLM.prompt_embeddings)
        return decoding.generate(
            self.llm, params["llm"], prompt, prompt_mask, start_tokens, max_new_tokens,
            eos_id=int(self.vocabulary.eos_id), num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
            stop_on_repeated_ngram=stop_on_repeated_ngram, processors=processors,
        )

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_speech(self, params, audio, audio_mask):
        return self.slm.apply({"params": params}, audio, audio_mask, method=SLM.encode_speech)

    def _pad_frames(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """[frames, C] arrays -> one batch, its length padded up to a bucket (few shapes compile)."""
        return batching.pad_frames(features, _bucket(max(f.shape[0] for f in features), self.audio_bucket_frames))

    def front_end(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The frozen front end's outputs for log-mel arrays [frames, mels] as packed rows
        ([B, N, W], mask [B, N]; slm_jax/models/front_end.py), what ``generate(...,
        precomputed_speech=True)`` and the front-end caches read."""
        audio, audio_mask = self._pad_frames(features)
        rows = jax.device_get(self._encode_speech(self.params, audio, audio_mask))
        ids = None if rows.token_ids is None else np.asarray(rows.token_ids)
        packed = np.stack([pack_rows(h, None if ids is None else ids[b]) for b, h in enumerate(np.asarray(rows.hidden))])
        return packed, np.asarray(rows.mask)

    def front_end_width(self, features: Sequence[np.ndarray]) -> int:
        """How many rows ``front_end`` gives these log-mel arrays (padding included), from shapes
        alone: rows kept from an earlier run, padded to it, read as the front end's own output."""
        audio, audio_mask = self._pad_frames(features)
        return int(jax.eval_shape(self._encode_speech, self.params, audio, audio_mask).mask.shape[1])

    def front_end_transcripts(self, packed_rows: np.ndarray) -> list[list[int]]:
        """The LLM token ids of the transcript a front end that writes text spelled in its rows
        (``front_end``'s packed rows [B, N, W]), as the LLM's tokenizer spells the whole text: the
        rows spell each Whisper token alone, and an answer spells words whole (" Chicago", not
        " Chic" "ago"). Without the leading space, as an answer's first word has none."""
        if not writes_transcript(self.spec):
            raise ValueError(NO_TRANSCRIPT)
        _, ids = unpack_rows(packed_rows, True)
        texts = [self.vocabulary.decode([int(i) for i in row if i >= 0]).strip() for row in ids]
        return [list(self.vocabulary.encode(text)) if text else [] for text in texts]

    @functools.partial(jax.jit, static_argnums=(0,))
    def _alignment_logits(self, params, audio, audio_mask, token_ids):
        variables = {"params": params}
        rows = self.slm.apply(variables, audio, audio_mask, method=SLM.encode_speech)
        return self.slm.apply(variables, rows, token_ids, method=alignment.adapter_ctc_logits)

    def transcribe_ctc(self, features: Sequence[np.ndarray]) -> list[str]:
        """What the adapter itself 'says', without the LLM: the best path of its CTC head over the
        alignment sub-vocabulary (only for adapters trained with alignment steps). A diagnostic of
        the speech-to-embedding alignment, not the model's answer."""
        if self.alignment_vocabulary is None:
            raise ValueError("this checkpoint has no alignment vocabulary: it was trained without alignment "
                             "phase (train.phases) or before checkpoints recorded it")
        if not features:
            return []
        audio, audio_mask = self._pad_frames(features)
        ids = np.asarray(self.alignment_vocabulary.ids, np.int32)
        logits, frame_mask = self._alignment_logits(self.params, audio, audio_mask, ids)
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
        ``transcript_bias`` b > 0 (greedy only, front ends that write text: the cascade baseline): a
        logit bonus b for following the front end's own transcript
        (slm_jax/contrib/whisper_cascade/transcript_guide.py).

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
        processors = ()
        if transcript_bias:
            from slm_jax.contrib.whisper_cascade.transcript_guide import transcript_guide

            processors = (transcript_guide(self.vocabulary, self.front_end_transcripts(audio), transcript_bias,
                                           self.token_bucket),)
        prompts = batching.encode_prompts(self.vocabulary, self.prompt_format, instructions)
        prefix, prefix_mask = batching.pad_rows(
            [p.prefix for p in prompts], _bucket(max(len(p.prefix) for p in prompts), self.token_bucket))
        suffix, suffix_mask = batching.pad_rows(
            [p.suffix for p in prompts], _bucket(max(len(p.suffix) for p in prompts), self.token_bucket))
        speech = (speech_batch(audio, audio_mask, writes_transcript(self.spec)) if precomputed_speech
                  else {"audio_features": audio, "audio_mask": audio_mask})
        batch = {**speech, "prefix_tokens": prefix, "prefix_mask": prefix_mask, "suffix_tokens": suffix,
                 "suffix_mask": suffix_mask}
        start = np.asarray([p.decoder_start for p in prompts], np.int32)
        out = self._generate(self.params, batch, start, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             no_repeat_ngram_size=no_repeat_ngram_size, stop_on_repeated_ngram=stop_on_repeated_ngram,
                             processors=processors)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [self.vocabulary.decode([int(t) for t in row[:n]]).strip() for row, n in zip(tokens, lengths)]


def load_trained(checkpoint: str, model: ModelSpec, data: Any) -> tuple[SpeechLanguageModel, int]:
    """The SLM of a training run: frozen weights from their sources, the adapter from ``checkpoint``
    (a model directory, for its latest step, or one step directory). Returns (model, step). Only
    the adapter is read from the checkpoint (no optimizer state): any optimizer's run serves."""
    from slm_jax.models.spec import sample_batch
    from slm_jax.parallel import partitioning
    from slm_jax.parallel.placement import ModelPlacement
    from slm_jax.training import checkpointing
    from slm_jax.weights.frozen import load_frozen_params

    for attribute in ("vocabulary", "prompt_format", "feature_lengths"):
        if not hasattr(data, attribute):
            raise ValueError(f"the configured data source {type(data).__name__} has no {attribute}; "
                             "inference needs a corpus/task data source (e.g. gin/runs/tiny.gin)")
    placement = ModelPlacement(model.build(), partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    example = sample_batch(1, data.feature_lengths)
    restored = checkpointing.restore_adapter(checkpoint, placement.abstract_params("adapter", example),
                                             model.frozen_sources, model.speech_front_end,
                                             frozen_configs=checkpointing.frozen_configs(model))
    frozen = load_frozen_params(placement, model, example)
    metadata = restored.metadata
    retired = [key for key in ("ctc_compression", "alignment_centered") if metadata.get(key)]
    if retired:  # options this version no longer has: reading the adapter without them would mislead
        raise ValueError(f"{checkpoint} was trained with {', '.join(retired)}, which this version of slm-jax does "
                         "not support (see docs/experiments/2026-12-01-ctc-compression.md)")
    return SpeechLanguageModel(model, frozen, restored.state, data.vocabulary, data.prompt_format,
                               alignment_token_ids=metadata.get("alignment_token_ids")), restored.step


def _optimizer_name() -> str:
    """The optimizer the run was configured with (its state shape is part of the checkpoint)."""
    import gin

    try:
        return gin.query_parameter("train.optimizer")
    except ValueError:
        return "adamw"
