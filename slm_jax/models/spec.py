"""What a run is made of: the model (which encoder, adapter and LLM, and where the frozen weights
come from) and the data (which corpus, mixture, vocabulary and prompt layout).

Both are plain dataclasses bound by gin (gin/*.gin); nothing here trains or reads data by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from slm_jax.models import registry
from slm_jax.models.adapter import AdapterConfig
from slm_jax.models.slm import SLM, build_slm


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    speech_encoder: Any  # an encoder config (WhisperEncoderConfig, ConformerConfig)
    llm: Any  # an LLM config (T5Config, LlamaConfig)
    adapter: AdapterConfig
    # Where the frozen weights come from (see slm_jax/weights/frozen.py): 'random:SEED', 'hf:DIR',
    # 'package:whisper-base', 'gguf:PATH' or 'package:smollm2-135m-instruct'.
    speech_encoder_source: str = "random:0"
    llm_source: str = "random:1"

    def build(self) -> SLM:
        adapter = self.adapter
        if adapter.output_dim in (0, None):
            adapter = dataclasses.replace(adapter, output_dim=registry.llm_embed_dim(self.llm))
        elif adapter.output_dim != registry.llm_embed_dim(self.llm):
            raise ValueError(
                f"adapter output_dim {adapter.output_dim} != LLM embedding width {registry.llm_embed_dim(self.llm)}"
            )
        return build_slm(registry.module_for(self.speech_encoder), registry.module_for(self.llm), adapter)

    @property
    def speech_front_end(self) -> str:
        """What the adapter reads, recorded in checkpoints: 'encoder' (encoder frames, the paper's
        design) or a front end's own name (``front_end`` of its config, e.g. Whisper's decoder
        states: same shapes, other meaning)."""
        return getattr(self.speech_encoder, "front_end", "encoder")

    @property
    def frozen_sources(self) -> Mapping[str, str]:
        return {"speech_encoder": self.speech_encoder_source, "llm": self.llm_source}


def sample_batch(
    batch_size: int, feature_lengths: Mapping[str, int], num_mel_bins: int = 80
) -> dict[str, Any]:
    """The model's input signature as ShapeDtypeStructs (init, compile and planning; no data)."""
    import jax
    import numpy as np

    audio = feature_lengths["audio_frames"]
    lp, ls, lt = feature_lengths["prefix"], feature_lengths["suffix"], feature_lengths["targets"]
    ints = lambda n: jax.ShapeDtypeStruct((batch_size, n), np.int32)  # noqa: E731
    return {
        "audio_features": jax.ShapeDtypeStruct((batch_size, audio, num_mel_bins), np.float32),
        "audio_mask": ints(audio),
        "prefix_tokens": ints(lp),
        "prefix_mask": ints(lp),
        "suffix_tokens": ints(ls),
        "suffix_mask": ints(ls),
        "decoder_input_tokens": ints(lt),
        "target_tokens": ints(lt),
        "target_mask": ints(lt),
    }
