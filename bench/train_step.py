"""Training-step benchmarks: slm-jax's ``Trainer`` against the PyTorch reference, same weights,
same batch, timed interleaved in one process.

- ``bare``: adapter + frozen LLM forward and backward, AdamW on the adapter, from encoder outputs
  (equal work: the reference projects only the target block onto the vocabulary, as we do).
- ``end_to_end``: including the speech encoder. The reference runs as peers run it: the encoder
  on every example with the input padded to Whisper's 30 s window, and a ``labels=``-style
  forward (vocabulary logits at every position). slm-jax reads encoder outputs from an
  ``EncoderCache`` on disk (built once, offline); its one-time encoding cost and the step with
  the encoder inside (at the real length, masked) are timed too.

Each function returns a JSON-ready dict of medians, spreads, examples/s and ratios.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, Mapping

import numpy as np

from bench import common

AUDIO_KEYS = ("audio_features", "audio_mask")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: rows per batch, audio seconds (the longest row; rows are 50-100% of
    it) and text block lengths (prefix and suffix of the prompt, target tokens)."""

    batch_size: int
    seconds: float
    prefix: int = 8
    suffix: int = 8
    targets: int = 32

    @property
    def frames(self) -> int:
        return int(round(self.seconds * common.FRAMES_PER_SECOND))

    def lengths(self) -> dict[str, int]:
        return {"prefix": self.prefix, "suffix": self.suffix, "targets": self.targets}

    def llm_tokens(self, ws: common.WeightSet) -> int:
        """Sequence length the LLM sees (padded): prompt text + speech + target block."""
        return self.prefix + ws.speech_tokens(self.frames) + self.suffix + self.targets

    def describe(self, ws: common.WeightSet) -> str:
        return f"batch {self.batch_size} x {self.seconds:g} s ({self.llm_tokens(ws)} LLM tokens)"


# --- the JAX side --------------------------------------------------------------------------------

class JaxStep:
    """One ``Trainer.train_step`` per call on a fixed batch (or a batch made by ``make_batch``),
    blocking until done. Starts from the weight set's shared adapter initialisation."""

    def __init__(self, weights_name: str, example: Mapping[str, np.ndarray], **llm_overrides):
        import jax

        from slm_jax.parallel import partitioning
        from slm_jax.training.optimizers import make_optimizer
        from slm_jax.training.step import Trainer

        js = common.jax_side(weights_name, **llm_overrides)
        self.js = js
        optimizer, schedule = make_optimizer()
        self.trainer = Trainer(js.slm, optimizer, schedule, partitioning.make_mesh(devices=jax.devices()[:1]))
        shardings = self.trainer.param_shardings(example)
        self.frozen = {k: jax.device_put(v, shardings[k]) for k, v in js.frozen.items()}
        self.trainer.compile(example, {k: shardings[k] for k in self.frozen})
        state = self.trainer.init_state(0, example)
        adapter = jax.device_put(js.adapter_params, jax.tree.map(lambda x: x.sharding, state.adapter_params))
        self.state = state.replace(adapter_params=adapter)
        self.losses: list[float] = []

    def step(self, batch: Mapping[str, np.ndarray]) -> float:
        self.state, metrics = self.trainer.train_step(self.state, self.frozen, self.trainer.place_batch(batch))
        loss = float(metrics["loss"])  # blocks
        self.losses.append(loss)
        return loss

    def optimizer_state_bytes(self) -> int:
        from slm_jax.training.step import tree_bytes

        return tree_bytes(self.state.opt_state)

    def param_bytes(self) -> dict[str, int]:
        from slm_jax.training.step import tree_bytes

        return {"adapter": tree_bytes(self.state.adapter_params), "frozen": tree_bytes(self.frozen)}


def cached_speech_batch(batch: Mapping[str, np.ndarray], cache: Any, ids: list[str], frames: int) -> dict:
    """The training batch as the cached pipeline builds it: encoder outputs read from disk and
    padded to ``frames``, in place of the audio."""
    from slm_jax.data import batching

    hidden, mask = batching.pad_frames([cache[i] for i in ids], frames, "encoder output")
    text = {k: v for k, v in batch.items() if k not in AUDIO_KEYS}
    return {"speech_hidden": hidden, "speech_mask": mask, **text}


def encoder_outputs(js: common.JaxSide, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Encoder outputs of a batch; audio longer than the encoder's window (Whisper: 30 s) is
    encoded window by window and the outputs joined, as long-form pipelines do."""
    import jax

    from slm_jax.models.slm import SLM

    encode = jax.jit(lambda p, x, m: js.slm.apply({"params": {"speech_encoder": p}}, x, m, method=SLM.encode_speech))
    window = js.spec.speech_encoder.max_frames
    features, mask = batch["audio_features"], batch["audio_mask"]
    pieces = [jax.device_get(encode(js.frozen["speech_encoder"], features[:, s: s + window], mask[:, s: s + window]))
              for s in range(0, features.shape[1], window)]
    return (np.concatenate([p.hidden for p in pieces], axis=1), np.concatenate([p.mask for p in pieces], axis=1))


# --- the benchmarks ------------------------------------------------------------------------------

def _summary(timings: Mapping[str, common.Timing], batch_size: int) -> dict[str, Any]:
    return {name: {"median_s": t.median, "spread": t.spread, "examples_per_s": batch_size / t.median,
                   "times_s": t.times} for name, t in timings.items()}


def _torch_step(weights_name: str, batch: Mapping[str, np.ndarray], *, from_audio: bool, full_logits: bool):
    """A fresh reference (same initial adapter) and a closure running one of its steps."""
    import copy

    from bench import torch_reference as tr

    shared = common.torch_side(weights_name)
    # A fresh adapter and optimizer per runner; the frozen modules are shared (never written).
    model = tr.TorchSLM(shared.encoder, copy.deepcopy(shared.adapter), shared.llm)
    optimizer = tr.make_optimizer(model.adapter)
    tbatch = tr.to_torch_batch(batch)
    losses: list[float] = []

    def step():
        losses.append(tr.train_step(model, optimizer, tbatch, from_audio=from_audio, full_logits=full_logits))

    return step, losses, optimizer


def bare_step(weights_name: str, case: Case, repeats: int,
              variants: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Adapter + frozen LLM fwd+bwd + AdamW from encoder outputs: slm-jax (and ``variants``:
    name -> LLM config overrides such as dtype or remat_policy) vs the reference.

    Also records each side's first-step loss (equal weights and batch: they must agree), the
    host memory one step adds, and the optimizer-state bytes.
    """
    ws = common.weights(weights_name)
    audio_batch = common.example_batch(ws, case.batch_size, case.frames, case.lengths())
    js = common.jax_side(weights_name)
    hidden, mask = encoder_outputs(js, audio_batch)
    batch = {"speech_hidden": hidden, "speech_mask": mask,
             **{k: v for k, v in audio_batch.items() if k not in AUDIO_KEYS}}
    # Parameter shapes do not depend on length; audio beyond the encoder's window (60 s for
    # Whisper's 30 s) would only make initialisation trace an encoder input it refuses.
    window = getattr(js.spec.speech_encoder, "max_frames", None) or audio_batch["audio_features"].shape[1]
    init_example = {k: (v[:, :window] if k in AUDIO_KEYS else v) for k, v in audio_batch.items()}
    jax_runners = {"slm-jax": JaxStep(weights_name, init_example)}
    for name, overrides in (variants or {}).items():
        jax_runners[f"slm-jax {name}"] = JaxStep(weights_name, init_example, **overrides)
    torch_fn, torch_losses, torch_opt = _torch_step(weights_name, batch, from_audio=False, full_logits=False)
    fns = {name: (lambda r=r: r.step(batch)) for name, r in jax_runners.items()}
    fns["torch"] = torch_fn
    timings = common.interleaved(fns, repeats)
    out = {"case": dataclasses.asdict(case), "llm_tokens": case.llm_tokens(ws), "sides": _summary(timings, case.batch_size)}
    out["speedup_vs_torch"] = {n: common.ratio(timings[n], timings["torch"]) for n in jax_runners}
    out["first_step_loss"] = {**{n: r.losses[0] for n, r in jax_runners.items()}, "torch": torch_losses[0]}
    main = jax_runners["slm-jax"]
    with common.PeakRss() as jax_mem:
        fns["slm-jax"]()
    with common.PeakRss() as torch_mem:
        torch_fn()
    from bench import torch_reference as tr

    out["memory"] = {
        "step_peak_extra_rss_bytes": {"slm-jax": jax_mem.extra, "torch": torch_mem.extra},
        "optimizer_state_bytes": {"slm-jax": main.optimizer_state_bytes(), "torch": tr.optimizer_state_bytes(torch_opt)},
        "param_bytes": main.param_bytes(),
    }
    return out


def end_to_end(weights_name: str, case: Case, repeats: int) -> dict[str, Any]:
    """Training examples/s including the speech encoder (see the module docstring)."""
    import jax

    from slm_jax.data.cached import encoder_cache

    ws = common.weights(weights_name)
    audio_batch = common.example_batch(ws, case.batch_size, case.frames, case.lengths())
    js = common.jax_side(weights_name)
    ids = [f"utt{i}" for i in range(case.batch_size)]
    lengths = audio_batch["audio_mask"].sum(axis=1)
    clips = [(ids[i], audio_batch["audio_features"][i, : lengths[i]]) for i in range(case.batch_size)]
    speech_frames = js.spec.speech_encoder.frames_out(case.frames)
    with tempfile.TemporaryDirectory(prefix="slm-bench-cache-") as directory:
        cache = encoder_cache.build_cache(directory, js.slm, js.frozen["speech_encoder"], clips, "bench",
                                          batch_size=case.batch_size, progress=False)
        cached = JaxStep(weights_name, audio_batch)
        with_encoder = JaxStep(weights_name, audio_batch)
        encode = jax.jit(lambda p, x, m: js.slm.apply({"params": {"speech_encoder": p}}, x, m,
                                                      method=type(js.slm).encode_speech))

        def offline_encode():  # the one-time cost of the cache, per batch of clips
            jax.block_until_ready(encode(js.frozen["speech_encoder"], audio_batch["audio_features"],
                                         audio_batch["audio_mask"]))

        torch_fn, torch_losses, _ = _torch_step(weights_name, audio_batch, from_audio=True, full_logits=True)
        fns = {
            "slm-jax cached": lambda: cached.step(cached_speech_batch(audio_batch, cache, ids, speech_frames)),
            "slm-jax encoder in step": lambda: with_encoder.step(audio_batch),
            "slm-jax offline encode": offline_encode,
            "torch 30 s window": torch_fn,
        }
        timings = common.interleaved(fns, repeats)
    ref = timings["torch 30 s window"]
    first_epoch = common.Timing([a + b for a, b in zip(timings["slm-jax cached"].times,
                                                       timings["slm-jax offline encode"].times)])
    return {
        "case": dataclasses.asdict(case),
        "sides": _summary(timings, case.batch_size),
        "speedup_vs_torch": {
            "slm-jax cached": common.ratio(timings["slm-jax cached"], ref),
            "slm-jax cached, first epoch (incl. encoding once)": common.ratio(first_epoch, ref),
            "slm-jax encoder in step": common.ratio(timings["slm-jax encoder in step"], ref),
        },
        # Cached and uncached steps start from the same state on the same clips: equal losses
        # (up to float rounding from different padding) prove the cache changes nothing.
        "first_step_loss": {"slm-jax cached": cached.losses[0], "slm-jax encoder in step": with_encoder.losses[0],
                            "torch 30 s window": torch_losses[0]},
    }
