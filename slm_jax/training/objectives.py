"""Training objectives: what a phase of training minimises. The trainer knows none of them.

An objective is a frozen dataclass (hashable: the trainer compiles one train step per objective)
with
  ``name``                       how logs and event files call its loss;
  ``for_run(data, model)``       a copy bound to what only the run knows (e.g. the transcripts'
                                 sub-vocabulary); the default returns itself;
  ``inputs(batch)``              host side: the batch keys it reads, transformed if need be (a key it
                                 ignores would still be a jit input, and its varying length a
                                 recompilation);
  ``loss(slm, params, rows, batch)``  device side: (scalar loss, metrics) for the adapter + LLM
                                 ``params`` and the frozen front end's ``rows`` (SpeechRows);
                                 metrics hold at least ``loss`` (what is logged) and
                                 ``num_target_tokens``;
  ``metadata()``                 what checkpoints record so that the adapter can be read later.

A run is a schedule of phases ``[(steps, objective), ...]`` (slm_jax/training/loop.py); the
paper's objective is ``NextToken``. ``CtcAlignment`` is a cheap first phase that aligns the
adapter's outputs with the LLM's token embeddings (slm_jax/training/alignment.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.models.front_end import SpeechRows
from slm_jax.models.slm import SLM
from slm_jax.training import alignment

log = logging.getLogger(__name__)

# The spoken words as LLM token ids (no EOS), read by the alignment objective only.
TRANSCRIPT_KEYS = ("transcript_tokens", "transcript_mask")


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over real target tokens, and the number of those tokens.

    Log-softmax in float32: the frozen LLM may run in bf16, the loss must not.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _mean(loss_sum: jax.Array, num_tokens: jax.Array) -> jax.Array:
    return loss_sum / jnp.maximum(num_tokens, 1.0)


@dataclasses.dataclass(frozen=True)
class NextToken:
    """The paper's objective: cross-entropy of the answer tokens through the frozen LLM."""

    name = "next_token"

    def for_run(self, data: Any, model: Any) -> "NextToken":
        return self

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in TRANSCRIPT_KEYS}

    @staticmethod
    def _scored(slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]):
        """(logits, summed cross entropy, target tokens) of the teacher-forced answers."""
        logits = slm.apply({"params": params}, rows, batch, method=SLM.logits_from_speech)
        return (logits, *masked_cross_entropy(logits, batch["target_tokens"], batch["target_mask"]))

    def loss(self, slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]):
        _, loss_sum, num_tokens = self._scored(slm, params, rows, batch)
        return _mean(loss_sum, num_tokens), {"loss": _mean(loss_sum, num_tokens), "num_target_tokens": num_tokens}

    def evaluate(self, slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums for a teacher-forced evaluation: loss, target tokens and correctly predicted ones."""
        logits, loss_sum, num_tokens = self._scored(slm, params, rows, batch)
        correct = (jnp.argmax(logits, -1) == batch["target_tokens"]) * batch["target_mask"]
        return {"loss_sum": loss_sum, "num_target_tokens": num_tokens, "correct_tokens": jnp.sum(correct)}

    def metadata(self) -> dict[str, Any]:
        return {}


def _speech_keys(batch: Mapping[str, Any]) -> tuple[str, ...]:
    if "speech_hidden" in batch:
        return tuple(k for k in ("speech_hidden", "speech_mask", "speech_token_ids") if k in batch)
    return ("audio_features", "audio_mask")


@dataclasses.dataclass(frozen=True)
class CtcAlignment:
    """CTC of the adapter's outputs against the LLM's embeddings of the transcript's tokens
    (slm_jax/training/alignment.py). No LLM layer runs: a step costs a few percent of a
    next-token step. Needs the data's transcripts; ``for_run`` takes its sub-vocabulary from them."""

    token_ids: tuple[int, ...] = ()  # the sub-vocabulary; () until bound by for_run
    vocab_size: int = 0

    name = "alignment"

    def for_run(self, data: Any, model: Any) -> "CtcAlignment":
        from slm_jax.errors import UserError
        from slm_jax.models import registry

        if getattr(model.speech_encoder, "writes_llm_tokens", False):
            raise UserError(alignment.TEXT_FRONT_END)
        if not hasattr(data, "alignment_token_ids"):
            raise UserError(f"the CTC alignment objective needs transcripts; the data source {type(data).__name__} "
                            "has none (use CachedCorpusData, as gin/runs/whisper_base_smollm2.gin does)")
        vocabulary = alignment.AlignmentVocabulary(data.alignment_token_ids(), registry.llm_vocab_size(model.llm))
        log.info("alignment objective: %d distinct transcript tokens", len(vocabulary))
        return dataclasses.replace(self, token_ids=tuple(int(i) for i in vocabulary.ids),
                                   vocab_size=registry.llm_vocab_size(model.llm))

    @property
    def vocabulary(self) -> alignment.AlignmentVocabulary:
        if not self.token_ids:
            raise ValueError("CtcAlignment has no sub-vocabulary yet: bind it with for_run(data, model)")
        return alignment.AlignmentVocabulary(self.token_ids, self.vocab_size)

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [k for k in TRANSCRIPT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"the alignment objective needs transcripts in the batch ({', '.join(missing)} "
                             "missing); the cached-corpus data source (CachedCorpusData) provides them")
        tokens, mask = np.asarray(batch["transcript_tokens"]), np.asarray(batch["transcript_mask"])
        return {**{k: batch[k] for k in _speech_keys(batch)},
                "transcript_tokens": self.vocabulary.to_classes(tokens, mask), "transcript_mask": mask}

    def loss(self, slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]):
        ids = jnp.asarray(self.token_ids, jnp.int32)  # a constant of the compiled step
        logits, frame_mask = slm.apply({"params": params}, rows, ids, method=alignment.adapter_ctc_logits)
        loss_sum, num_tokens = alignment.ctc_alignment_loss(logits, frame_mask, batch["transcript_tokens"],
                                                            batch["transcript_mask"])
        return _mean(loss_sum, num_tokens), {"loss": _mean(loss_sum, num_tokens), "num_target_tokens": num_tokens}

    def metadata(self) -> dict[str, Any]:
        # Kept with each checkpoint: the adapter's CTC head can then be read without the corpus
        # (slm-eval --decoder=ctc).
        return {"alignment_token_ids": list(self.token_ids)}


@dataclasses.dataclass(frozen=True)
class NextTokenWithAlignment:
    """Next-token loss + ``alignment_weight`` x the CTC alignment loss. The next-token loss alone
    moves the adapter's outputs away from the token embeddings an alignment phase put them near;
    the CTC term holds them there. The logged ``loss`` stays the next-token loss (comparable with
    plain next-token steps); ``alignment_loss`` is the CTC term."""

    alignment_weight: float = 0.5
    alignment: CtcAlignment = CtcAlignment()

    name = "next_token"

    def __post_init__(self):
        if not self.alignment_weight >= 0:  # also refuses NaN
            raise ValueError(f"alignment_weight must be >= 0, got {self.alignment_weight!r}")

    def for_run(self, data: Any, model: Any) -> "NextTokenWithAlignment":
        return dataclasses.replace(self, alignment=self.alignment.for_run(data, model))

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {**NextToken().inputs(batch), **self.alignment.inputs(batch)}

    def loss(self, slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]):
        next_token, metrics = NextToken().loss(slm, params, rows, batch)
        ctc, _ = self.alignment.loss(slm, params, rows, batch)
        return next_token + self.alignment_weight * ctc, {**metrics, "alignment_loss": ctc}

    def metadata(self) -> dict[str, Any]:
        return self.alignment.metadata()


def run_metadata(objectives) -> dict[str, Any]:
    """What a run's checkpoints record of its objectives (their metadata merged)."""
    out: dict[str, Any] = {}
    for objective in objectives:
        out.update(objective.metadata())
    return out
