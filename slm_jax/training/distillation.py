"""Distillation from the LLM reading the transcript (DiVA: Held et al. 2024, "Distilling an End-to-End
Voice Assistant Without Instruction Training Data").

The frozen LLM is its own teacher. It reads the prompt once with the transcript's token embeddings
in the speech slot and once with the adapter's outputs there:

  teacher  [prefix | embed(transcript tokens) | suffix]  (under stop_gradient)
  student  [prefix | adapt(front end rows)     | suffix]

and the adapter is trained so that the student's next-token distributions match the teacher's:
KL(teacher || student) at each distilled position of the decoder block, summed over the
vocabulary and averaged over the positions. No answer token is ever a target: what the LLM
would say to the text is, so the LLM's own instruction following carries over to speech instead
of being fitted to the corpus's answers.

Which positions are distilled (``positions``):
  * None (the default): every real position of the batch's target block, teacher-forced on the
    corpus's answer. Each answer token gives one more distribution to match, so a step carries
    more signal per example; the answer only steers where the two distributions are compared.
  * 1: DiVA's own choice: only the first response position, whose distribution depends on the
    prompt alone. No answer token is read at all; the decoder block is cut to that position
    (the LLM is causal, so its logits are unchanged), which also makes the step cheaper.
  * k: the first k positions.
Neither has been compared on this project's corpora yet.

``temperature`` T softens both distributions; the KL is multiplied by T^2 (Hinton et al. 2015) so
that the gradients' scale, and the balance with the cross-entropy term, do not move with T.
``next_token_weight`` adds that many times the usual next-token cross-entropy over every target
token (0 by default: pure distillation).

The data must carry transcripts (``transcript_tokens``/``transcript_mask``: CachedSpeechData and
CachedCorpusData write them when every example has its ``text``). A front end that writes text is
refused: its rows are the transcript already, so the student would read what the teacher reads.

Select it in gin with ``train.phases = [(None, @Distillation())]`` (after ``import
slm_jax.gin_registry``); e.g. ``Distillation.positions = 1`` for DiVA's variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from slm_jax.models.front_end import SpeechRows, writes_tokens
from slm_jax.models.slm import SLM
from slm_jax.training.objectives import TRANSCRIPT_KEYS, _mean, _speech_keys, masked_cross_entropy

PROMPT_KEYS = ("prefix_tokens", "prefix_mask", "suffix_tokens", "suffix_mask")
DECODER_KEYS = ("decoder_input_tokens", "target_mask", "target_tokens")

TEXT_FRONT_END = ("the distillation objective's teacher reads the transcript where the speech goes, and this "
                  "front end's rows spell the transcript already (it writes text), so the student would read "
                  "the same: train it with the next-token objective")


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array,
                  temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(sum over the positions in ``mask`` of KL(teacher || student) [B, L, V] -> summed over V,
    number of those positions). Log-softmax of both in float32: the LLM may run in bf16."""
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    per_position = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_position * mask), jnp.sum(mask)


def teacher_and_student_logits(slm: SLM, rows: SpeechRows, batch: Mapping[str, jax.Array]
                               ) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced logits over the batch's decoder block [B, Lt, V] with the transcript (teacher,
    no gradient) and with the adapter's outputs (student) in the speech slot. Called as
    ``slm.apply(variables, rows, batch, method=teacher_and_student_logits)``."""
    if rows.token_ids is not None:
        raise ValueError(TEXT_FRONT_END)
    transcript = slm.embed_tokens(batch["transcript_tokens"])
    teacher = jax.lax.stop_gradient(slm.logits_from_embeddings(transcript, batch["transcript_mask"], batch))
    return teacher, slm.logits_from_speech(rows, batch)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """KL(LLM reading the transcript || LLM reading the adapter's outputs), the module docstring's
    objective. ``positions``: None for every target position, k for the first k (1: DiVA's)."""

    positions: Optional[int] = None
    temperature: float = 1.0
    next_token_weight: float = 0.0

    name = "distillation"

    def __post_init__(self):
        if self.positions is not None and (not isinstance(self.positions, int) or isinstance(self.positions, bool)
                                           or self.positions < 1):
            raise ValueError(f"Distillation.positions must be None (every target position) or an integer >= 1, "
                             f"got {self.positions!r}")
        if not self.temperature > 0:  # also refuses NaN
            raise ValueError(f"Distillation.temperature must be > 0, got {self.temperature!r}")
        if not self.next_token_weight >= 0:
            raise ValueError(f"Distillation.next_token_weight must be >= 0, got {self.next_token_weight!r}")

    def for_run(self, data: Any, model: Any) -> "Distillation":
        from slm_jax.errors import UserError

        if writes_tokens(model.speech_encoder):
            raise UserError(TEXT_FRONT_END)
        # The data sources with transcripts are the ones the alignment objective reads them from.
        if not hasattr(data, "alignment_token_ids"):
            raise UserError(f"the distillation objective needs transcripts; the data source {type(data).__name__} "
                            "has none (use CachedCorpusData, whose examples carry their text)")
        try:
            data.alignment_token_ids()
        except ValueError as e:
            raise UserError(f"the distillation objective needs the transcript of every training example, "
                            f"and {type(data).__name__} lacks some: {e}") from e
        return self

    @property
    def _cut(self) -> Optional[int]:
        """How many decoder positions the forward passes need: the distilled ones, unless the
        cross-entropy term reads every target token."""
        return self.positions if self.next_token_weight == 0 else None

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [k for k in TRANSCRIPT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"the distillation objective needs transcripts in the batch ({', '.join(missing)} "
                             "missing): every example needs its text")
        decoder = DECODER_KEYS if self.next_token_weight else DECODER_KEYS[:2]
        # Cut on the host: a fixed decoder length also means one compiled step whatever the answers' lengths.
        out = {k: batch[k][:, : self._cut] for k in decoder}
        return {**{k: batch[k] for k in (*_speech_keys(batch), *PROMPT_KEYS, *TRANSCRIPT_KEYS)}, **out}

    def loss(self, slm: SLM, params: Any, rows: SpeechRows, batch: Mapping[str, jax.Array]):
        full = batch
        batch = {**batch, **{k: batch[k][:, : self._cut] for k in DECODER_KEYS if k in batch}}
        teacher, student = slm.apply({"params": params}, rows, batch, method=teacher_and_student_logits)
        mask = batch["target_mask"]
        if self.positions is not None:
            mask = mask * (jnp.arange(mask.shape[1]) < self.positions)[None, :].astype(mask.dtype)
        kl_sum, positions = kl_divergence(teacher, student, mask, self.temperature)
        kl = self.temperature ** 2 * _mean(kl_sum, positions)
        metrics = {"loss": kl, "num_target_tokens": positions}
        if not self.next_token_weight:
            return kl, metrics
        ce_sum, tokens = masked_cross_entropy(student, full["target_tokens"], full["target_mask"])
        next_token = _mean(ce_sum, tokens)
        return kl + self.next_token_weight * next_token, {**metrics, "next_token_loss": next_token}

    def metadata(self) -> dict[str, Any]:
        return {}
