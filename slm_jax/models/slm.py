"""The SLM: frozen speech encoder -> trainable adapter -> frozen LLM.

Parameters live under three top-level names, which is what lets the trainer keep the frozen
parts out of gradients, optimizer state and checkpoints:
  params['speech_encoder']  frozen
  params['adapter']         trained
  params['llm']             frozen

Prompt layout (built by the data pipeline, see slm_jax/data/seqio/feature_converter.py):
  [prefix text | adapted speech | suffix text]  -> encoder input (encoder-decoder LLM)
  [prefix text | adapted speech | suffix text | decoder input] -> one sequence (decoder-only)
Each block is right-padded; positions come from the combined mask so the padding between
blocks is invisible to the LLM.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.training import alignment
from slm_jax.layers.embeddings import positions_from_mask
from slm_jax.models.adapter import Adapter, AdapterConfig

FROZEN_COLLECTIONS = ("speech_encoder", "llm")
TRAINABLE_COLLECTION = "adapter"


def is_encoder_decoder(llm: nn.Module) -> bool:
    return hasattr(type(llm), "encode")


class SLM(nn.Module):
    speech_encoder: nn.Module
    adapter: Adapter
    llm: nn.Module

    # --- the three stages -------------------------------------------------------------
    def encode_speech(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Frozen encoder: log-mel [B, T, 80] -> hidden [B, T', D]. Run outside the gradient."""
        return self.speech_encoder(features, mask)

    def adapt(
        self, speech_hidden: jax.Array, speech_mask: jax.Array, ctc_token_ids: jax.Array | None = None,
        centered: bool = False, compression: str = "outputs",
    ) -> tuple[jax.Array, jax.Array]:
        """Adapter outputs in the LLM's embedding space. With ``ctc_token_ids`` (the alignment
        sub-vocabulary [V]) they are CTC-compressed: one embedding per token of the adapter's
        own CTC best path, its outputs' mean or its expected token embedding by ``compression``
        (slm_jax/training/alignment.py)."""
        channels = getattr(self.speech_encoder.config, "llm_token_channels", 0)
        if channels:
            speech_hidden = self.embed_llm_token_channels(speech_hidden, channels)
        speech_embeds, speech_mask = self.adapter(speech_hidden, speech_mask)
        if channels:
            # The adapter's output is a correction to the LLM's embeddings of the spoken tokens: with
            # its output layer zero-initialised (AdapterConfig.zero_init_output) training starts
            # from the LLM reading Whisper's transcript as text, and learns what text lacks (the
            # answer's format, what the words sounded like).
            text = speech_hidden[..., -self.adapter.config.output_dim:]
            speech_embeds = speech_embeds + text[:, :: self.adapter.config.subsample_rate] * speech_mask[..., None]
        if ctc_token_ids is None:
            return speech_embeds, speech_mask
        problem = (alignment.compression_problem(compression, "compression", off_allowed=False)
                   or alignment_front_end_problem(self.speech_encoder.config, compression))
        if problem:
            raise ValueError(problem)
        table = self.llm.embed(ctc_token_ids[None, :])[0]
        logits = alignment.alignment_logits(speech_embeds, table, centered)
        if compression == "tokens":
            speech_embeds = alignment.expected_token_embeddings(logits, table).astype(speech_embeds.dtype)
        return alignment.ctc_compress(speech_embeds, speech_mask, logits)

    def embed_llm_token_channels(self, speech_hidden: jax.Array, channels: int) -> jax.Array:
        """A front end's last ``channels`` channels hold 1 + LLM token ids (0 = none; see
        whisper_transcriber.py): they become the mean of the LLM's own embeddings of those tokens,
        next to the remaining channels. [B, N, D + channels] -> [B, N, D + D_llm]."""
        states = speech_hidden[..., :-channels]
        ids = llm_token_ids(speech_hidden, channels)
        present = (ids > 0)[..., None]
        embeds = self.llm.embed(jnp.maximum(ids - 1, 0)).astype(states.dtype) * present
        mean = embeds.sum(-2) / jnp.maximum(present.sum(-2), 1).astype(states.dtype)
        return jnp.concatenate([states, mean], axis=-1)

    def prompt_embeddings(
        self, speech_embeds: jax.Array, speech_mask: jax.Array, batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """[prefix | speech | suffix] embeddings and mask; text goes through the LLM's own table."""
        prefix = self.llm.embed(batch["prefix_tokens"]).astype(speech_embeds.dtype)
        suffix = self.llm.embed(batch["suffix_tokens"]).astype(speech_embeds.dtype)
        embeds = jnp.concatenate([prefix, speech_embeds, suffix], axis=1)
        mask = jnp.concatenate(
            [batch["prefix_mask"], speech_mask.astype(batch["prefix_mask"].dtype), batch["suffix_mask"]], axis=1
        )
        return embeds, mask

    # --- training forward pass ---------------------------------------------------------
    def logits_from_speech(
        self, speech_hidden: jax.Array, speech_mask: jax.Array, batch: Mapping[str, jax.Array],
        ctc_token_ids: jax.Array | None = None, centered: bool = False, compression: str = "outputs",
    ) -> jax.Array:
        """Teacher-forced logits over the target block [B, Lt, V], from encoder outputs
        (``ctc_token_ids``, ``centered``, ``compression``: CTC compression, see ``adapt``)."""
        speech_embeds, speech_mask = self.adapt(speech_hidden, speech_mask, ctc_token_ids, centered, compression)
        embeds, mask = self.prompt_embeddings(speech_embeds, speech_mask, batch)
        decoder_input, target_mask = batch["decoder_input_tokens"], batch["target_mask"]
        if is_encoder_decoder(self.llm):
            memory = self.llm.encode(embeds, mask, positions_from_mask(mask))
            hidden, _ = self.llm.decode(memory, mask, decoder_input, target_mask)
        else:
            decoder_embeds = self.llm.embed(decoder_input).astype(embeds.dtype)
            full = jnp.concatenate([embeds, decoder_embeds], axis=1)
            full_mask = jnp.concatenate([mask, target_mask.astype(mask.dtype)], axis=1)
            hidden, _ = self.llm(full, full_mask, positions_from_mask(full_mask))
            # Only the decoder block is scored: skip the vocabulary projection of the prompt.
            hidden = hidden[:, -decoder_input.shape[1]:]
        return self.llm.logits(hidden)

    def alignment_logits(
        self, speech_hidden: jax.Array, speech_mask: jax.Array, token_ids: jax.Array, centered: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """CTC logits of the adapter's outputs against the LLM's embeddings of ``token_ids`` [V]
        (slm_jax/training/alignment.py): [B, T', 1 + V] and the frame mask. No LLM layer runs.

        A front end whose rows carry the LLM's tokens (Whisper's transcript, whisper_transcriber.py)
        is aligned on its encoder rows alone: the token rows spell the transcript, and CTC over
        them, or over rows that can attend to them, is met by copying it. Masking them out of the
        adapter's input leaves the sound as the only way to the words."""
        speech_mask = self.sound_rows(speech_hidden, speech_mask)
        speech_embeds, speech_mask = self.adapt(speech_hidden, speech_mask)
        table = self.llm.embed(token_ids[None, :])[0]
        return alignment.alignment_logits(speech_embeds, table, centered), speech_mask

    def sound_rows(self, speech_hidden: jax.Array, speech_mask: jax.Array) -> jax.Array:
        """The mask of the rows that hold no LLM token: every row, for a front end without LLM
        token channels; a transcriber's encoder rows (WhisperTranscriberConfig.encoder_rows_every),
        whose id channels are 0. Refused for a transcriber without them: it has no sound rows."""
        config = self.speech_encoder.config
        channels = getattr(config, "llm_token_channels", 0)
        if not channels:
            return speech_mask
        problem = alignment_front_end_problem(config)
        if problem:
            raise ValueError(problem)
        no_token = jnp.all(llm_token_ids(speech_hidden, channels) == 0, axis=-1)
        return speech_mask * no_token.astype(speech_mask.dtype)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Full forward from log-mel features (used for initialisation and tests)."""
        speech_hidden, speech_mask = self.encode_speech(batch["audio_features"], batch["audio_mask"])
        return self.logits_from_speech(speech_hidden, speech_mask, batch)


def llm_token_ids(speech_hidden: jax.Array, channels: int) -> jax.Array:
    """A front end's last ``channels`` channels as integers: 1 + LLM token id, 0 = none."""
    return jnp.round(speech_hidden[..., -channels:]).astype(jnp.int32)


def alignment_front_end_problem(front_end_config: Any, compression: str = "") -> str | None:
    """Why the CTC alignment (or, with ``compression``, CTC compression) cannot read this front
    end's rows (see SLM.sound_rows), or None."""
    if not getattr(front_end_config, "llm_token_channels", 0):
        return None
    if compression:
        # Compression keeps the rows of the adapter's own CTC best path over every row, and a
        # transcriber's token rows are Whisper's tokens already, one row each; its CTC head is
        # trained on the encoder rows with the token rows masked out, which this path does not do.
        return ("CTC compression (train.ctc_compression) reads every row of the adapter's output, and a "
                "transcriber front end's token rows are Whisper's transcript itself: leave it off for a "
                "transcriber (the CTC alignment of its encoder rows, alignment_steps/alignment_weight, is fine)")
    if not getattr(front_end_config, "encoder_rows_every", 0):
        return ("the CTC alignment of a transcriber front end reads its encoder rows, and this one has none: set "
                "WhisperTranscriberConfig.encoder_rows_every (its token rows are Whisper's transcript itself)")
    return None


def build_slm(speech_encoder: nn.Module, llm: nn.Module, adapter_config: AdapterConfig) -> SLM:
    return SLM(speech_encoder=speech_encoder, adapter=Adapter(adapter_config), llm=llm)


def split_params(params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """params -> (adapter params, {frozen name: params})."""
    missing = {TRAINABLE_COLLECTION, *FROZEN_COLLECTIONS} - set(params)
    if missing:
        raise KeyError(f"SLM params lack {sorted(missing)}; got {sorted(params)}")
    return params[TRAINABLE_COLLECTION], {k: params[k] for k in FROZEN_COLLECTIONS}


def merge_params(adapter_params: Any, frozen_params: Mapping[str, Any]) -> dict[str, Any]:
    return {**frozen_params, TRAINABLE_COLLECTION: adapter_params}


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over real target tokens, and the number of those tokens.

    Log-softmax in float32: the frozen LLM may run in bf16, the loss must not.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)
