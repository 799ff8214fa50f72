"""Model FLOPs utilisation (MFU) of the training step for any gin config, against the peak this
device measures for a large matmul in the same run. Meant for a GPU or TPU; on a CPU it runs
too (tests, small configs), where the absolute numbers mean little.

    python -m bench.mfu --gin_file=gin/runs/paper_whisper_llama8b.gin --batch_size=8 --out=bench/results_mfu.json

What is measured:
- *step time*: the median of ``--repeats`` train steps (after ``--warmup``) of the config as it
  is (its dtype, remat policy, attention implementation, mesh over every local device), on a
  synthetic batch (random frozen weights from the config's ``random:`` sources or random
  initialisation in place; the FLOPs of a step do not depend on the weights' values).
- *model FLOPs per step*: XLA's count for the same step lowered with no rematerialisation and
  the plain XLA attention (so a fused cuDNN kernel and recomputation are neither missed nor
  double counted): the frozen encoder's forward, the frozen LLM's forward and its backward to
  the speech embeddings (no weight gradients), the adapter's forward and backward and the
  optimizer update.
- *measured peak*: FLOP/s of a jitted ``--peak_size``-square matmul in the config's compute dtype
  (2 n^3 FLOPs a call), median of several calls: the ceiling this device actually reaches.
- *MFU* = model FLOPs / step time / measured peak (per device: the peak is one device's, the step
  runs on all of them).
- *device memory*: the device's peak bytes in use, where the runtime reports it (GPU, TPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Mapping

def lowered_flops(lowered: Any) -> float:
    """FLOPs XLA counts for a lowered (unoptimised) computation."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA gave no FLOP count for this computation")
    return float(cost["flops"])


def _median_seconds(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measured_peak_flops(dtype: str, size: int, repeats: int = 10) -> dict[str, Any]:
    """FLOP/s of one device on a ``size`` x ``size`` matmul in ``dtype``."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    flops = lowered_flops(matmul.lower(a, b))
    seconds, _ = _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats, warmup=2)
    return {"dtype": str(jnp.dtype(dtype)), "size": size, "flops_per_call": flops, "median_s": seconds,
            "flops_per_s": flops / seconds}


def _reference_spec(spec: Any) -> Any:
    """The same model with what changes the FLOP count but not the model turned off: remat
    (recomputation) and fused attention kernels (custom calls XLA does not count)."""
    def plain(config):
        changes = {}
        if getattr(config, "remat_policy", "none") != "none":
            changes["remat_policy"] = "none"
        if getattr(config, "attention_implementation", None) is not None:
            changes["attention_implementation"] = None
        return dataclasses.replace(config, **changes) if changes else config

    return dataclasses.replace(spec, speech_encoder=plain(spec.speech_encoder), llm=plain(spec.llm))


def _trainer(spec: Any, mesh: Any):
    from slm_jax.training.optimizers import make_optimizer
    from slm_jax.training.step import Trainer

    optimizer, schedule = make_optimizer()
    return Trainer(spec.build(), optimizer, schedule, mesh)


def measure(spec: Any, batch_size: int, feature_lengths: Mapping[str, int], *, repeats: int = 5, warmup: int = 2,
            peak_size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Step time, model FLOPs, measured peak and MFU for ``spec`` (a ModelSpec) at this batch."""
    import jax

    from slm_jax.parallel import partitioning
    from slm_jax.models.spec import sample_batch
    from slm_jax.models import registry
    from slm_jax.data.synthetic import SyntheticData

    if batch_size % len(jax.devices()):
        raise ValueError(f"batch size {batch_size} must be a multiple of the {len(jax.devices())} devices "
                         "(the batch is split over all of them)")
    mesh = partitioning.make_mesh()
    example = sample_batch(batch_size, feature_lengths, getattr(spec.speech_encoder, "num_mel_bins", 80))

    model_flops = lowered_flops(_trainer(_reference_spec(spec), mesh).lower_train_step(example))
    trainer = _trainer(spec, mesh)
    configured_flops = lowered_flops(trainer.lower_train_step(example))  # also compiles its steps
    frozen = {name: trainer.init_frozen_randomly(name, seed + i, example)
              for i, name in enumerate(("speech_encoder", "llm"))}
    vocab = registry.llm_vocab_size(spec.llm)
    data = SyntheticData(feature_lengths, vocab, num_mel_bins=example["audio_features"].shape[-1], seed=seed)
    batch = trainer.place_batch(data.batch(batch_size, 0))
    state = trainer.init_state(seed, example)

    losses = []

    def step():
        nonlocal state
        state, metrics = trainer.train_step(state, frozen, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    start = time.perf_counter()
    step()  # compiles
    first_step_s = time.perf_counter() - start
    step_s, times = _median_seconds(step, repeats, warmup=max(warmup - 1, 0))

    devices = jax.devices()
    compute_dtype = str(getattr(spec.llm, "dtype", "float32"))
    peak = measured_peak_flops(compute_dtype, peak_size or (8192 if devices[0].platform != "cpu" else 1024))
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    n = len(devices)
    return {
        "device": f"{n} x {devices[0].device_kind}",
        "platform": devices[0].platform,
        "batch_size": batch_size,
        "feature_lengths": dict(feature_lengths),
        "compute_dtype": compute_dtype,
        "remat_policy": getattr(spec.llm, "remat_policy", None),
        "attention_implementation": getattr(spec.llm, "attention_implementation", None),
        "first_step_s": first_step_s,
        "step_s": step_s,
        "times_s": times,
        "examples_per_s": batch_size / step_s,
        "model_flops_per_step": model_flops,
        # XLA's count for the step as configured (remat included; fused attention kernels are
        # custom calls it does not count, so this can read lower than the model FLOPs)
        "configured_step_flops": configured_flops,
        "peak": peak,
        "mfu": model_flops / step_s / (peak["flops_per_s"] * n),
        "peak_device_memory_bytes": (stats or {}).get("peak_bytes_in_use"),
        "device_memory_limit_bytes": (stats or {}).get("bytes_limit"),
        "losses": losses,
    }


def _flops_text(x: float, per_second: bool = False) -> str:
    unit = next((u for u, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if x >= scale), "")
    scale = {"T": 1e12, "G": 1e9, "M": 1e6, "": 1.0}[unit]
    return f"{x / scale:.2f} {unit}FLOP" + ("/s" if per_second else "")


def table(result: Mapping[str, Any]) -> str:
    r = result
    mem = r["peak_device_memory_bytes"]
    limit = r["device_memory_limit_bytes"]
    memory = "not reported" if mem is None else f"{mem / 2**30:.1f} GiB" + (f" of {limit / 2**30:.1f} GiB" if limit else "")
    rows = [
        ("device", r["device"]),
        ("batch, feature lengths", f"{r['batch_size']}, {r['feature_lengths']}"),
        ("compute dtype / remat / attention", f"{r['compute_dtype']} / {r['remat_policy']} / {r['attention_implementation']}"),
        ("step time (median)", f"{r['step_s'] * 1000:.1f} ms ({r['examples_per_s']:.1f} examples/s); first step "
                               f"incl. compile {r['first_step_s']:.1f} s"),
        ("model FLOPs per step", _flops_text(r["model_flops_per_step"])),
        ("measured peak (one device)", f"{_flops_text(r['peak']['flops_per_s'], per_second=True)} "
                                       f"({r['peak']['dtype']} {r['peak']['size']}^2 matmul)"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("peak device memory", memory),
    ]
    lines = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from slm_jax.cli import common

    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("python -m bench.mfu", __doc__)
        parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
        parser.add_argument("--audio_frames", type=int, default=None, help="log-mel frames per example "
                            "(default: the config's AUDIO_FRAMES, else 3000 = 30 s)")
        parser.add_argument("--prompt_tokens", type=int, default=32, help="text tokens before+after the speech")
        parser.add_argument("--target_tokens", type=int, default=None, help="(default: TARGET_TOKENS, else 128)")
        parser.add_argument("--repeats", type=int, default=5, help="timed steps (default: %(default)s)")
        parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, compile included")
        parser.add_argument("--peak_size", type=int, default=None,
                            help="matmul side for the measured peak (default: 8192 on accelerators, 1024 on CPU)")
        parser.add_argument("--out", default=None, help="write the result as JSON here")
        parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give a --gin_file (e.g. gin/runs/paper_whisper_llama8b.gin)")
        if args.repeats < 1 or args.warmup < 1:
            raise common.UserError("--repeats and --warmup must be >= 1")
        common.setup_logging()
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        spec, batch_size, lengths = common.configured_step_shape(args.batch_size, args.audio_frames,
                                                                 args.prompt_tokens, args.target_tokens)
        try:
            result = measure(spec, batch_size, lengths, repeats=args.repeats, warmup=args.warmup,
                             peak_size=args.peak_size)
        except ValueError as e:
            raise common.UserError(str(e)) from None
        text = table(result)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0

    return common.run_main("python -m bench.mfu", run)


if __name__ == "__main__":
    sys.exit(main())
