"""Jitted, sharded train and eval steps for an SLM. Only the adapter is trained.

What is frozen and how that is enforced:
  * The speech encoder runs before ``jax.value_and_grad`` and its output passes through
    ``stop_gradient``: no backward pass through it is ever traced.
  * ``value_and_grad`` differentiates with respect to the adapter parameters only; the frozen
    LLM parameters are ordinary (non-differentiated) inputs of the step, so XLA computes the
    cotangents that flow *through* the LLM to the adapter but none *for* its weights.
  * The optimizer is built over the adapter tree only, so moment buffers exist for adapter
    parameters alone; the frozen trees are inputs and never outputs of the step.

Two objectives share the state, optimizer and guards: 'next_token' (the answer tokens' cross
entropy through the frozen LLM) and 'alignment' (CTC of the adapter outputs against the LLM's
token embeddings, slm_jax/training/alignment.py; cheap, used to start training). Optionally the speech
encoder's output is masked in training steps (``speech_masking``, slm_jax/training/augment.py), from a key
derived from (seed, step) so that resumed runs mask the same.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from slm_jax.parallel import partitioning
from slm_jax.training.alignment import AlignmentVocabulary, compression_problem, ctc_alignment_loss
from slm_jax.training.augment import SpeechMasking, mask_speech
from slm_jax.models.slm import SLM, masked_cross_entropy, merge_params

Batch = Mapping[str, Any]

# Keys a batch may carry. 'speech_hidden'/'speech_mask' replace the audio features when the
# frozen encoder's outputs were computed offline (encoder caching).
AUDIO_KEYS = ("audio_features", "audio_mask")
CACHED_SPEECH_KEYS = ("speech_hidden", "speech_mask")
# The spoken words as LLM token ids (no EOS), for the alignment objective only.
TRANSCRIPT_KEYS = ("transcript_tokens", "transcript_mask")
OBJECTIVES = ("next_token", "alignment")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    adapter_params: Any
    opt_state: Any
    # Numerical guard: updates with a non-finite loss or gradient are skipped and counted.
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array


OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    total_steps: int = 10_000,
    end_learning_rate_fraction: float = 0.1,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.98,
    name: str = "adamw",
    restarts: Sequence[int] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW or Adafactor with linear warm-up and cosine decay, after global-norm clipping.

    Adafactor (T5X's default) factors the second moment into row and column statistics, so its
    state is a small fraction of AdamW's two full moments: the choice for paper-scale adapters.
    ``restarts``: steps where the schedule starts over (warm-up and cosine decay over the steps
    up to the next restart), e.g. where a run switches objective.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
    bounds = [0, *restarts, total_steps]
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(f"schedule restarts {list(restarts)} must increase strictly inside (0, {total_steps})")

    def phase(length: int) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=max(1, min(warmup_steps, length - 1)),
            decay_steps=max(length, 2),
            end_value=learning_rate * end_learning_rate_fraction,
        )

    phases = [phase(e - b) for b, e in zip(bounds, bounds[1:])]
    schedule = phases[0] if len(phases) == 1 else optax.join_schedules(phases, list(restarts))
    if name == "adamw":
        inner = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        inner = optax.adafactor(schedule, weight_decay_rate=weight_decay or None, multiply_by_parameter_scale=False)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
    return tx, schedule


def _shapes(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape-only view of a batch. Parameter shapes never depend on batch size, so one row is
    enough, which keeps planning a paper-scale batch free of host allocations."""
    return {k: jax.ShapeDtypeStruct((1,) + tuple(v.shape[1:]), v.dtype) for k, v in batch.items()}


def _zeros(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in _shapes(batch).items()}


def _has_cached_speech(batch: Batch) -> bool:
    return all(k in batch for k in CACHED_SPEECH_KEYS)


class Trainer:
    """Builds the sharded initialisation, train step and eval step for one model and mesh."""

    def __init__(
        self,
        model: SLM,
        optimizer: optax.GradientTransformation,
        schedule: optax.Schedule | None,
        mesh: Mesh,
        rules=partitioning.DEFAULT_RULES,
        alignment_vocabulary: AlignmentVocabulary | None = None,
        speech_masking: SpeechMasking | None = None,
        masking_seed: int = 0,
        alignment_weight: float = 0.0,
        ctc_compression: str = "",
    ):
        if not alignment_weight >= 0:
            raise ValueError(f"alignment_weight must be >= 0, got {alignment_weight}")
        self.model = model
        self.alignment_vocabulary = alignment_vocabulary
        # > 0: next-token steps also pay this times the CTC alignment loss (see _joint_loss).
        self.alignment_weight = float(alignment_weight)
        # '' (off) or a mode of alignment.COMPRESSION_MODES: the LLM reads the adapter's
        # CTC-compressed outputs; needs the alignment vocabulary like the alignment objective does.
        problem = compression_problem(ctc_compression, "ctc_compression")
        if problem:
            raise ValueError(problem)
        self.ctc_compression = ctc_compression
        self.speech_masking = speech_masking
        self.masking_seed = masking_seed
        self.optimizer = optimizer
        self.schedule = schedule
        self.mesh = mesh
        self.rules = tuple(rules)
        self.batch_sharding = partitioning.batch_sharding(mesh, self.rules)
        self._train_steps: dict[str, Any] = {}
        self._eval_step = None
        self._abstract_variables: dict[tuple, Any] = {}

    # --- shapes and shardings ------------------------------------------------------------
    def abstract_variables(self, sample_batch: Batch) -> Any:
        """Boxed (logically named) abstract parameters of the whole SLM; nothing is allocated.

        Cached per batch signature: tracing a paper-scale model takes seconds, and shardings,
        restore targets and planning all ask for it.
        """
        shapes = _shapes(sample_batch)
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in shapes.items()))
        if key not in self._abstract_variables:
            self._abstract_variables[key] = jax.eval_shape(lambda b: self.model.init(jax.random.key(0), b), shapes)
        return self._abstract_variables[key]

    def param_shardings(self, sample_batch: Batch) -> Any:
        with nn.logical_axis_rules(self.rules):
            return partitioning.shardings_for_tree(self.abstract_variables(sample_batch)["params"], self.mesh, self.rules)

    def init_frozen_randomly(self, name: str, seed: int, sample_batch: Batch) -> Any:
        """Random weights for one frozen part (tiny configs and tests), created in place sharded."""
        shardings = self.param_shardings(sample_batch)[name]

        def init(batch):
            return nn.unbox(self.model.init(jax.random.key(seed), batch))["params"][name]

        return jax.jit(init, out_shardings=shardings)(_zeros(sample_batch))

    def _boxed_state(self, rng: jax.Array, sample_batch: Batch) -> TrainState:
        adapter = self.model.init(rng, dict(sample_batch))["params"]["adapter"]  # traced: batch is abstract
        return self._fresh_state(adapter)

    def _fresh_state(self, adapter_params: Any) -> TrainState:
        """Step 0 of a run whose adapter starts at ``adapter_params``."""
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            adapter_params=adapter_params,
            opt_state=self.optimizer.init(adapter_params),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            nonfinite_total=jnp.zeros((), jnp.int32),
        )

    def state_shardings(self, sample_batch: Batch) -> TrainState:
        # Optimizer moments mirror the boxed adapter tree, so they inherit its logical names.
        abstract = jax.eval_shape(lambda b: self._boxed_state(jax.random.key(0), b), _shapes(sample_batch))
        return partitioning.shardings_for_tree(abstract, self.mesh, self.rules)

    def abstract_state(self, sample_batch: Batch) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        abstract = nn.unbox(jax.eval_shape(lambda b: self._boxed_state(jax.random.key(0), b), _shapes(sample_batch)))
        shardings = self.state_shardings(sample_batch)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def init_state(self, seed: int, sample_batch: Batch) -> TrainState:
        shardings = self.state_shardings(sample_batch)
        init = lambda rng, batch: nn.unbox(self._boxed_state(rng, batch))  # noqa: E731
        return jax.jit(init, out_shardings=shardings)(jax.random.key(seed), _zeros(sample_batch))

    def warm_start_state(self, adapter_params: Any, sample_batch: Batch) -> TrainState:
        """Step 0 with the given adapter weights and a fresh optimizer state (fine-tuning)."""
        return jax.jit(self._fresh_state, out_shardings=self.state_shardings(sample_batch))(adapter_params)

    # --- data placement --------------------------------------------------------------------
    def place_batch(self, batch: Batch, objective: str | None = None) -> dict[str, jax.Array]:
        """Host numpy batch -> global arrays sharded over the batch mesh axes.

        Each process passes only its own rows (multi-host: every host reads its data shard).
        With an ``objective``, only the keys that objective reads are placed (a key it ignores
        would still be a jit input, and its varying length a recompilation), and transcripts
        become CTC classes.
        """
        if objective is not None:
            batch = self._inputs_of(batch, objective)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in batch.items()}

    def _inputs_of(self, batch: Batch, objective: str) -> dict[str, Any]:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
        speech = CACHED_SPEECH_KEYS if _has_cached_speech(batch) else AUDIO_KEYS
        if objective == "next_token":
            text = {k: v for k, v in batch.items() if k not in TRANSCRIPT_KEYS}
            if not self.alignment_weight:
                return text
            return {**text, **self._transcript_classes(batch)}
        return {**{k: batch[k] for k in speech}, **self._transcript_classes(batch)}

    def _transcript_classes(self, batch: Batch) -> dict[str, Any]:
        if self.alignment_vocabulary is None:
            raise ValueError("the alignment objective needs Trainer(alignment_vocabulary=...)")
        missing = [k for k in TRANSCRIPT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"the alignment objective needs transcripts in the batch ({', '.join(missing)} "
                             "missing); the cached-corpus data source (CachedCorpusData) provides them")
        tokens, mask = np.asarray(batch["transcript_tokens"]), np.asarray(batch["transcript_mask"])
        return {"transcript_tokens": self.alignment_vocabulary.to_classes(tokens, mask), "transcript_mask": mask}

    # --- steps -----------------------------------------------------------------------------
    def _speech(self, frozen: Mapping[str, Any], batch: Batch) -> tuple[jax.Array, jax.Array]:
        if _has_cached_speech(batch):
            hidden, mask = batch["speech_hidden"], batch["speech_mask"]
        else:
            hidden, mask = self.model.apply(
                {"params": {"speech_encoder": frozen["speech_encoder"]}},
                batch["audio_features"], batch["audio_mask"], method=SLM.encode_speech,
            )
        # The encoder is frozen: its output is a constant of the step.
        return jax.lax.stop_gradient(hidden), mask

    def _loss(self, adapter_params, frozen, speech, speech_mask, batch):
        params = merge_params(adapter_params, {"llm": frozen["llm"]})
        logits = self.model.apply({"params": params}, speech, speech_mask, batch, *self._compression_args(),
                                  method=SLM.logits_from_speech)
        loss_sum, num_tokens = masked_cross_entropy(logits, batch["target_tokens"], batch["target_mask"])
        return loss_sum / jnp.maximum(num_tokens, 1.0), (loss_sum, num_tokens)

    def _compression_args(self) -> tuple:
        """(token ids, centered, mode) for SLM.logits_from_speech when CTC compression is on, else ()."""
        if not self.ctc_compression:
            return ()
        if self.alignment_vocabulary is None:
            raise ValueError("ctc_compression needs Trainer(alignment_vocabulary=...)")
        return jnp.asarray(self.alignment_vocabulary.ids), self.alignment_vocabulary.centered, self.ctc_compression

    def _alignment_loss(self, adapter_params, frozen, speech, speech_mask, batch):
        params = merge_params(adapter_params, {"llm": frozen["llm"]})
        token_ids = jnp.asarray(self.alignment_vocabulary.ids)  # a constant of the compiled step
        logits, frame_mask = self.model.apply({"params": params}, speech, speech_mask, token_ids,
                                              self.alignment_vocabulary.centered, method=SLM.alignment_logits)
        loss_sum, num_tokens = ctc_alignment_loss(logits, frame_mask, batch["transcript_tokens"],
                                                  batch["transcript_mask"])
        return loss_sum / jnp.maximum(num_tokens, 1.0), (loss_sum, num_tokens)

    def _joint_loss(self, adapter_params, frozen, speech, speech_mask, batch):
        """Next-token loss + alignment_weight x CTC alignment loss. The next-token loss alone
        moves the adapter's outputs away from the token embeddings the alignment steps put them
        near (release/README.md: one run's CTC transcript of real speech went from 54.5% WER after
        its alignment steps to 98% after 2,000 next-token steps); the CTC term holds them there.
        The adapter runs once per term: it is a few percent of the step next to the frozen LLM.
        aux: the next-token (loss_sum, num_tokens) and the CTC loss."""
        next_token, (loss_sum, num_tokens) = self._loss(adapter_params, frozen, speech, speech_mask, batch)
        ctc, _ = self._alignment_loss(adapter_params, frozen, speech, speech_mask, batch)
        return next_token + self.alignment_weight * ctc, (loss_sum, num_tokens, ctc)

    def loss_and_grads(self, adapter_params, frozen, batch, objective: str = "next_token", masking_rng=None):
        """(loss, (loss_sum, num_tokens[, ctc loss])), adapter gradients. Exposed for tests and
        tools. With ``masking_rng`` (and ``speech_masking`` set) the encoder output is masked
        first. Next-token steps of a trainer with ``alignment_weight`` > 0 add the CTC term."""
        speech, speech_mask = self._speech(frozen, batch)
        if masking_rng is not None and self.speech_masking is not None:
            speech = mask_speech(masking_rng, speech, speech_mask, self.speech_masking)
        if objective != "next_token":
            loss = self._alignment_loss
        else:
            loss = self._joint_loss if self.alignment_weight else self._loss
        return jax.value_and_grad(loss, has_aux=True)(adapter_params, frozen, speech, speech_mask, batch)

    def _train_step_fn(self, state: TrainState, frozen, batch, objective: str):
        with nn.logical_axis_rules(self.rules):
            masking_rng = jax.random.fold_in(jax.random.key(self.masking_seed), state.step)
            (loss, aux), grads = self.loss_and_grads(state.adapter_params, frozen, batch, objective, masking_rng)
        loss_sum, num_tokens = aux[:2]
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        extra = {}
        if objective == "next_token" and self.alignment_weight:
            # A joint step (_joint_loss): log the next-token loss, comparable with plain steps, and the CTC term.
            loss, extra = loss_sum / jnp.maximum(num_tokens, 1.0), {"alignment_loss": aux[2]}
        updates, new_opt_state = self.optimizer.update(grads, state.opt_state, state.adapter_params)
        new_params = optax.apply_updates(state.adapter_params, updates)
        # Skip the update (keep parameters and optimizer state) when anything is non-finite.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        opt_count = _adam_count(state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            adapter_params=keep(new_params, state.adapter_params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "num_target_tokens": num_tokens,
            "finite": finite,
            "learning_rate": self.schedule(opt_count) if self.schedule is not None else jnp.nan,
            **extra,
        }
        return new_state, metrics

    def _eval_step_fn(self, state: TrainState, frozen, batch):
        with nn.logical_axis_rules(self.rules):
            speech, speech_mask = self._speech(frozen, batch)
            params = merge_params(state.adapter_params, {"llm": frozen["llm"]})
            logits = self.model.apply({"params": params}, speech, speech_mask, batch, method=SLM.logits_from_speech)
        loss_sum, num_tokens = masked_cross_entropy(logits, batch["target_tokens"], batch["target_mask"])
        correct = (jnp.argmax(logits, -1) == batch["target_tokens"]) * batch["target_mask"]
        return {"loss_sum": loss_sum, "num_target_tokens": num_tokens, "correct_tokens": jnp.sum(correct)}

    def compile(self, sample_batch: Batch, frozen_shardings: Any) -> None:
        state_sh = self.state_shardings(sample_batch)
        objectives = OBJECTIVES if self.alignment_vocabulary is not None else ("next_token",)
        self._train_steps = {
            objective: jax.jit(
                functools.partial(self._train_step_fn, objective=objective),
                in_shardings=(state_sh, frozen_shardings, self.batch_sharding),
                out_shardings=(state_sh, partitioning.replicated(self.mesh)),
                donate_argnums=(0,),
            )
            for objective in objectives
        }
        self._eval_step = jax.jit(
            self._eval_step_fn,
            in_shardings=(state_sh, frozen_shardings, self.batch_sharding),
            out_shardings=partitioning.replicated(self.mesh),
        )

    def lower_train_step(self, sample_batch: Batch, objective: str = "next_token") -> Any:
        """The train step lowered for abstract, sharded arguments of this batch signature
        (nothing is allocated): what memory plans and FLOP counts read. Compiles the steps'
        jit wrappers with the default parameter shardings if that was not done yet."""
        shardings = self.param_shardings(sample_batch)
        frozen_shardings = {k: v for k, v in shardings.items() if k != "adapter"}
        if not self._train_steps:
            self.compile(sample_batch, frozen_shardings)
        abstract = nn.unbox(self.abstract_variables(sample_batch)["params"])
        frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              {k: abstract[k] for k in frozen_shardings}, frozen_shardings)
        batch = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=self.batch_sharding)
                 for k, v in sample_batch.items()}
        return self._train_steps[objective].lower(self.abstract_state(sample_batch), frozen, batch)

    def train_step(self, state: TrainState, frozen, batch, objective: str = "next_token"
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update with ``objective`` ('next_token' or 'alignment'; see the module docstring).
        ``batch`` should come from ``place_batch(..., objective)``."""
        if not self._train_steps:
            raise RuntimeError("call Trainer.compile(sample_batch, frozen_shardings) first")
        if objective not in self._train_steps:
            raise ValueError(f"objective {objective!r} is not compiled; compiled: {sorted(self._train_steps)} "
                             "('alignment' needs Trainer(alignment_vocabulary=...))")
        return self._train_steps[objective](state, frozen, batch)

    def eval_step(self, state: TrainState, frozen, batch) -> dict[str, jax.Array]:
        if self._eval_step is None:
            raise RuntimeError("call Trainer.compile(sample_batch, frozen_shardings) first")
        return self._eval_step(state, frozen, batch)


def _adam_count(opt_state: Any) -> jax.Array:
    """The optimizer's own update counter (it does not advance on skipped steps)."""
    has_count = lambda x: "count" in getattr(type(x), "_fields", ())  # noqa: E731 (optax NamedTuples)
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=has_count):
        if has_count(leaf):
            return leaf.count
    return jnp.zeros((), jnp.int32)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))
