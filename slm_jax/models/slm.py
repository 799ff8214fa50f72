"""The SLM: frozen speech front end -> trainable adapter -> frozen LLM.

Parameters live under three top-level names, which is what lets the trainer keep the frozen
parts out of gradients, optimizer state and checkpoints:
  params['speech_encoder']  frozen (the front end: a speech encoder in the paper's design)
  params['adapter']         trained
  params['llm']             frozen

Prompt layout (built by the data pipeline, see slm_jax/data/seqio/feature_converter.py):
  [prefix text | adapted speech | suffix text]  -> encoder input (encoder-decoder LLM)
  [prefix text | adapted speech | suffix text | decoder input] -> one sequence (decoder-only)
Each block is right-padded; positions come from the combined mask so the padding between
blocks is invisible to the LLM.

Losses live with the training objectives (slm_jax/training/objectives.py) and decoding with
inference (slm_jax/inference/); this module is the forward pass they share.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.embeddings import positions_from_mask
from slm_jax.models.adapter import Adapter, AdapterConfig
from slm_jax.models.front_end import NO_TOKEN, SpeechRows

FROZEN_COLLECTIONS = ("speech_encoder", "llm")
TRAINABLE_COLLECTION = "adapter"


def is_encoder_decoder(llm: nn.Module) -> bool:
    return hasattr(type(llm), "encode")


class SLM(nn.Module):
    speech_encoder: nn.Module
    adapter: Adapter
    llm: nn.Module

    def encode_speech(self, features: jax.Array, mask: jax.Array) -> SpeechRows:
        """Frozen front end: log-mel [B, T, mels] -> rows [B, N, D]. Run outside the gradient. A
        speech encoder returns (hidden, mask); a front end that writes text returns SpeechRows."""
        out = self.speech_encoder(features, mask)
        return out if isinstance(out, SpeechRows) else SpeechRows(*out)

    def adapt(self, rows: SpeechRows) -> tuple[jax.Array, jax.Array]:
        """Adapter outputs in the LLM's embedding space [B, N / subsample_rate, D_llm] and their mask.

        Rows that spell LLM tokens (a front end that writes text) reach the adapter next to the
        LLM's own embeddings of those tokens, and the adapter's output is a correction added to
        them: with its output layer zero-initialised (AdapterConfig.zero_init_output) training
        starts from the LLM reading the text as text."""
        hidden, text = rows.hidden, None
        if rows.token_ids is not None:
            present = (rows.token_ids != NO_TOKEN)[..., None]
            text = self.llm.embed(jnp.maximum(rows.token_ids, 0)).astype(hidden.dtype) * present
            hidden = jnp.concatenate([hidden, text], axis=-1)
        speech_embeds, speech_mask = self.adapter(hidden, rows.mask)
        if text is not None:
            speech_embeds = speech_embeds + text[:, :: self.adapter.config.subsample_rate] * speech_mask[..., None]
        return speech_embeds, speech_mask

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

    def logits_from_speech(self, rows: SpeechRows, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Teacher-forced logits over the target block [B, Lt, V], from the front end's rows."""
        speech_embeds, speech_mask = self.adapt(rows)
        return self.logits_from_embeddings(speech_embeds, speech_mask, batch)

    def logits_from_embeddings(
        self, speech_embeds: jax.Array, speech_mask: jax.Array, batch: Mapping[str, jax.Array]
    ) -> jax.Array:
        """Teacher-forced logits over the target block [B, Lt, V] with ``speech_embeds`` [B, N, D_llm]
        in the speech slot: the adapter's outputs, or anything else in the LLM's embedding space
        (the distillation objective's teacher puts the transcript's token embeddings there)."""
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

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """The frozen LLM's input embeddings of ``token_ids`` (objectives that score the adapter's
        outputs against them, e.g. the CTC alignment)."""
        return self.llm.embed(token_ids)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Full forward from log-mel features (used for initialisation and tests)."""
        return self.logits_from_speech(self.encode_speech(batch["audio_features"], batch["audio_mask"]), batch)


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
