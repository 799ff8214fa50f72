"""Jitted, sharded train and eval steps for an SLM. Only the adapter is trained.

What is frozen and how that is enforced:
  * The front end runs before ``jax.value_and_grad`` and its output passes through
    ``stop_gradient``: no backward pass through it is ever traced.
  * ``value_and_grad`` differentiates with respect to the adapter parameters only; the frozen
    LLM parameters are ordinary (non-differentiated) inputs of the step, so XLA computes the
    cotangents that flow *through* the LLM to the adapter but none *for* its weights.
  * The optimizer is built over the adapter tree only, so moment buffers exist for adapter
    parameters alone; the frozen trees are inputs and never outputs of the step.

The trainer knows no loss: each train step minimises the objective it is given
(slm_jax/training/objectives.py), and one step is compiled per objective. Evaluation is the
teacher-forced next-token loss. Optionally the front end's rows are masked in training steps
(``speech_masking``, slm_jax/training/augment.py), from a key derived from (seed, step) so that
resumed runs mask the same.

The numerical guard: an update is skipped (parameters and optimizer state kept) when the loss or
the gradient is not finite, or when it would leave parameters that are not finite or whose norm
jumped past ``MAX_PARAM_NORM_GROWTH`` times the old one: a run is never continued, or
checkpointed, from a step that poisoned its weights.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from slm_jax.models.front_end import as_rows
from slm_jax.models.slm import SLM, merge_params
from slm_jax.parallel import partitioning
from slm_jax.parallel.placement import ModelPlacement, batch_shapes, zeros_like_batch
from slm_jax.training.augment import SpeechMasking, mask_speech
from slm_jax.training.objectives import NextToken
from slm_jax.training.optimizers import update_count

Batch = Mapping[str, Any]

# 'speech_hidden'/'speech_mask' (and 'speech_token_ids' for a front end that writes text) replace
# the audio features when the frozen front end's outputs were computed offline (encoder caching).
AUDIO_KEYS = ("audio_features", "audio_mask")
CACHED_SPEECH_KEYS = ("speech_hidden", "speech_mask")

# An update whose parameters' global norm would grow past this factor (of the old norm + 1) is
# skipped like a non-finite one: a learning rate 1e30 gives a finite loss and weights of 1e29.
MAX_PARAM_NORM_GROWTH = 1e3


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    adapter_params: Any
    opt_state: Any
    # Numerical guard: skipped updates (see the module docstring), in a row and in all.
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array


class Trainer:
    """Builds the sharded initialisation, train step and eval step for one model and mesh."""

    def __init__(
        self,
        model: SLM,
        optimizer: optax.GradientTransformation,
        schedule: optax.Schedule | None,
        mesh: Mesh,
        rules=partitioning.DEFAULT_RULES,
        speech_masking: SpeechMasking | None = None,
        masking_seed: int = 0,
    ):
        self.model = model
        self.speech_masking = speech_masking
        self.masking_seed = masking_seed
        self.optimizer = optimizer
        self.schedule = schedule
        self.mesh = mesh
        self.rules = tuple(rules)
        self.batch_sharding = partitioning.batch_sharding(mesh, self.rules)
        self._train_steps: dict[Any, Any] = {}  # objective -> its compiled step
        self._frozen_shardings = None
        self._eval_step = None
        self.placement = ModelPlacement(model, mesh, self.rules)

    # --- shapes and shardings (the model's own: ModelPlacement) ------------------------------
    def abstract_variables(self, sample_batch: Batch) -> Any:
        return self.placement.abstract_variables(sample_batch)

    def param_shardings(self, sample_batch: Batch) -> Any:
        return self.placement.param_shardings(sample_batch)

    def init_frozen_randomly(self, name: str, seed: int, sample_batch: Batch) -> Any:
        return self.placement.init_frozen_randomly(name, seed, sample_batch)

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
        abstract = jax.eval_shape(lambda b: self._boxed_state(jax.random.key(0), b), batch_shapes(sample_batch))
        return partitioning.shardings_for_tree(abstract, self.mesh, self.rules)

    def abstract_state(self, sample_batch: Batch) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        abstract = nn.unbox(jax.eval_shape(lambda b: self._boxed_state(jax.random.key(0), b), batch_shapes(sample_batch)))
        shardings = self.state_shardings(sample_batch)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def init_state(self, seed: int, sample_batch: Batch) -> TrainState:
        shardings = self.state_shardings(sample_batch)
        init = lambda rng, batch: nn.unbox(self._boxed_state(rng, batch))  # noqa: E731
        return jax.jit(init, out_shardings=shardings)(jax.random.key(seed), zeros_like_batch(sample_batch))

    def warm_start_state(self, adapter_params: Any, sample_batch: Batch) -> TrainState:
        """Step 0 with the given adapter weights and a fresh optimizer state (fine-tuning)."""
        return jax.jit(self._fresh_state, out_shardings=self.state_shardings(sample_batch))(adapter_params)

    # --- data placement --------------------------------------------------------------------
    def place_batch(self, batch: Batch, objective=None) -> dict[str, jax.Array]:
        """Host numpy batch -> global arrays sharded over the batch mesh axes.

        Each process passes only its own rows (multi-host: every host reads its data shard).
        With an ``objective``, only what it reads is placed (``objective.inputs``).
        """
        if objective is not None:
            batch = objective.inputs(batch)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in batch.items()}

    # --- steps -----------------------------------------------------------------------------
    def _rows(self, frozen: Mapping[str, Any], batch: Batch):
        if all(k in batch for k in CACHED_SPEECH_KEYS):
            rows = as_rows(batch)
        else:
            rows = self.model.apply({"params": {"speech_encoder": frozen["speech_encoder"]}},
                                    batch["audio_features"], batch["audio_mask"], method=SLM.encode_speech)
        # The front end is frozen: its output is a constant of the step.
        return rows.replace(hidden=jax.lax.stop_gradient(rows.hidden))

    def loss_and_grads(self, adapter_params, frozen, batch, objective=NextToken(), masking_rng=None):
        """(loss, metrics), adapter gradients of ``objective`` on ``batch``. With ``masking_rng``
        (and ``speech_masking`` set) the front end's rows are masked first."""
        rows = self._rows(frozen, batch)
        if masking_rng is not None and self.speech_masking is not None:
            rows = rows.replace(hidden=mask_speech(masking_rng, rows.hidden, rows.mask, self.speech_masking))

        def loss(adapter):
            return objective.loss(self.model, merge_params(adapter, {"llm": frozen["llm"]}), rows, batch)

        return jax.value_and_grad(loss, has_aux=True)(adapter_params)

    def _train_step_fn(self, state: TrainState, frozen, batch, objective):
        with nn.logical_axis_rules(self.rules):
            masking_rng = jax.random.fold_in(jax.random.key(self.masking_seed), state.step)
            (loss, metrics), grads = self.loss_and_grads(state.adapter_params, frozen, batch, objective, masking_rng)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = self.optimizer.update(grads, state.opt_state, state.adapter_params)
        new_params = optax.apply_updates(state.adapter_params, updates)
        old_norm, new_norm = optax.global_norm(state.adapter_params), optax.global_norm(new_params)
        good = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_norm)
                & (new_norm <= MAX_PARAM_NORM_GROWTH * (old_norm + 1.0)))
        # Skip the update (keep parameters and optimizer state) when it is not good.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            adapter_params=keep(new_params, state.adapter_params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=jnp.where(good, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + jnp.where(good, 0, 1),
        )
        learning_rate = self.schedule(update_count(state.opt_state)) if self.schedule is not None else jnp.nan
        return new_state, {**metrics, "grad_norm": grad_norm, "param_norm": jnp.where(good, new_norm, old_norm),
                           "finite": good, "learning_rate": learning_rate}

    def _eval_step_fn(self, state: TrainState, frozen, batch):
        with nn.logical_axis_rules(self.rules):
            params = merge_params(state.adapter_params, {"llm": frozen["llm"]})
            return NextToken().evaluate(self.model, params, self._rows(frozen, batch), batch)

    def compile(self, sample_batch: Batch, frozen_shardings: Any, objectives=(NextToken(),)) -> None:
        """Prepares the eval step and one train step per objective (more compile on first use)."""
        self._state_shardings = self.state_shardings(sample_batch)
        self._frozen_shardings = frozen_shardings
        self._train_steps = {}
        for objective in objectives:
            self._step_for(objective)
        self._eval_step = jax.jit(
            self._eval_step_fn,
            in_shardings=(self._state_shardings, frozen_shardings, self.batch_sharding),
            out_shardings=partitioning.replicated(self.mesh),
        )

    def _step_for(self, objective):
        if objective not in self._train_steps:
            self._train_steps[objective] = jax.jit(
                functools.partial(self._train_step_fn, objective=objective),
                in_shardings=(self._state_shardings, self._frozen_shardings, self.batch_sharding),
                out_shardings=(self._state_shardings, partitioning.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._train_steps[objective]

    def lower_train_step(self, sample_batch: Batch, objective=NextToken()) -> Any:
        """The train step lowered for abstract, sharded arguments of this batch signature
        (nothing is allocated): what memory plans and FLOP counts read. Compiles the steps'
        jit wrappers with the default parameter shardings if that was not done yet."""
        shardings = self.param_shardings(sample_batch)
        frozen_shardings = {k: v for k, v in shardings.items() if k != "adapter"}
        if self._frozen_shardings is None:
            self.compile(sample_batch, frozen_shardings, ())
        abstract = nn.unbox(self.abstract_variables(sample_batch)["params"])
        frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              {k: abstract[k] for k in frozen_shardings}, frozen_shardings)
        batch = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=self.batch_sharding)
                 for k, v in sample_batch.items()}
        return self._step_for(objective).lower(self.abstract_state(sample_batch), frozen, batch)

    def train_step(self, state: TrainState, frozen, batch, objective=NextToken()
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of ``objective``; ``batch`` should come from ``place_batch(..., objective)``."""
        if self._frozen_shardings is None:
            raise RuntimeError("call Trainer.compile(sample_batch, frozen_shardings) first")
        return self._step_for(objective)(state, frozen, batch)

    def eval_step(self, state: TrainState, frozen, batch) -> dict[str, jax.Array]:
        if self._eval_step is None:
            raise RuntimeError("call Trainer.compile(sample_batch, frozen_shardings) first")
        return self._eval_step(state, frozen, batch)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))
