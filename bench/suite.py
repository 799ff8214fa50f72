"""What ``python -m bench`` measures: the sections, their shapes (full and --quick), and the
machine description that goes with the numbers."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
import traceback
from typing import Any, Callable

from bench import common, decode, memory, padding, train_step
from bench.train_step import Case

SECTIONS = ("memory", "bare", "e2e", "decode", "padding", "scaling")  # run order: cheapest and most asked-for first


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and repetitions for one run."""

    repeats: int
    # batch 8 x 6.4 s = 128 LLM tokens (8 prefix + 80 speech + 8 suffix + 32 target) at the real
    # shapes: the "batch 8 x 128 tokens" of the baseline measurement against PyTorch.
    bare: Case
    e2e: Case
    decode_cases: tuple[tuple[int, int], ...]  # (batch, beams)
    prompt_tokens: int
    new_tokens: int
    scaling_seconds: tuple[float, ...]
    scaling_batch_at_seconds: int
    scaling_batches: tuple[int, ...]
    scaling_seconds_at_batch: float
    bare_variants: dict[str, dict[str, Any]]
    # LLM config overrides timed beside each scaling case (the same step without an optimisation)
    scaling_variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # padding: a demo-style corpus of this many utterances, batches of this size, this many
    # batches (16 = one length-grouping window, so both sides see the same examples)
    padding_corpus: int = 400
    padding_batch: int = 8
    padding_batches: int = 16


FULL = Plan(
    repeats=3, bare=Case(8, 6.4), e2e=Case(4, 10.0), decode_cases=((1, 1), (8, 1), (1, 4)),
    prompt_tokens=141, new_tokens=32, scaling_seconds=(5.0, 30.0, 60.0), scaling_batch_at_seconds=2,
    scaling_batches=(1,), scaling_seconds_at_batch=10.0,
    bare_variants={"bf16 LLM compute": {"dtype": "bfloat16"}, "remat full": {"remat_policy": "full"}},
    scaling_variants={"unblocked causal attention": {"causal_query_block": 0}},
)
QUICK = Plan(
    repeats=2, bare=Case(8, 6.4), e2e=Case(2, 10.0), decode_cases=((1, 1),), prompt_tokens=141,
    new_tokens=16, scaling_seconds=(), scaling_batch_at_seconds=2, scaling_batches=(), scaling_seconds_at_batch=10.0,
    bare_variants={},
)
# The smoke test's plan: tiny shapes, one repetition.
TOY = Plan(
    repeats=1, bare=Case(2, 1.0, 4, 4, 4), e2e=Case(2, 1.0, 4, 4, 4), decode_cases=((2, 1),), prompt_tokens=8,
    new_tokens=4, scaling_seconds=(1.0,), scaling_batch_at_seconds=1, scaling_batches=(), scaling_seconds_at_batch=1.0,
    # toy sequences are shorter than the default query block: the variant blocks them instead
    bare_variants={}, scaling_variants={"query blocks of 4": {"causal_query_block": 4}},
    padding_corpus=120, padding_batch=2,
)


def machine() -> dict[str, Any]:
    import jax
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
        "jax_backend": jax.default_backend(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }


def _scaling(weights_name: str, plan: Plan) -> list[dict[str, Any]]:
    cases = [Case(plan.scaling_batch_at_seconds, s) for s in plan.scaling_seconds]
    cases += [Case(b, plan.scaling_seconds_at_batch) for b in plan.scaling_batches
              if Case(b, plan.scaling_seconds_at_batch) not in cases]
    rows = []
    for case in cases:
        r = train_step.bare_step(weights_name, case, plan.repeats, plan.scaling_variants)
        default = r["sides"]["slm-jax"]["median_s"]
        rows.append({"case": r["case"], "llm_tokens": r["llm_tokens"],
                     "examples_per_s": {n: s["examples_per_s"] for n, s in r["sides"].items()},
                     "speedup_vs_torch": r["speedup_vs_torch"]["slm-jax"],
                     # how much faster the default step is than each variant (median step times)
                     "speedup_vs_variant": {n: r["sides"][f"slm-jax {n}"]["median_s"] / default
                                            for n in plan.scaling_variants},
                     "first_step_loss": r["first_step_loss"],
                     "step_peak_extra_rss_bytes": r["memory"]["step_peak_extra_rss_bytes"]})
    return rows


def run(weights_name: str, plan: Plan, sections: tuple[str, ...], log: Callable[[str], None] = print,
        on_section: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs ``sections`` and returns the JSON-ready results (with the machine and timings).

    A section that fails is recorded under ``errors`` and the others still run; ``on_section``
    gets the results after each section (so a long run that dies keeps what it measured).
    """
    results: dict[str, Any] = {"weights": weights_name, "plan": dataclasses.asdict(plan), "machine": machine(),
                               "errors": {}}
    ws = common.weights(weights_name)
    results["model"] = {"llm": {k: ws.llm_config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                        "encoder": {k: ws.whisper_config.get(k) for k in ("d_model", "encoder_layers")},
                        "adapter": dict(ws.adapter_kwargs)}
    runners: dict[str, Callable[[], Any]] = {
        "bare": lambda: train_step.bare_step(weights_name, plan.bare, plan.repeats, plan.bare_variants),
        "e2e": lambda: train_step.end_to_end(weights_name, plan.e2e, plan.repeats),
        "decode": lambda: [decode.decode(weights_name, b, plan.prompt_tokens, plan.new_tokens, k, plan.repeats)
                           for b, k in plan.decode_cases],
        "memory": lambda: {"paper_shape": memory.optimizer_share()},
        "padding": lambda: padding.padding(weights_name, plan.padding_corpus, plan.padding_batch, plan.padding_batches),
        "scaling": lambda: _scaling(weights_name, plan),
    }
    started = time.time()
    for section in sections:
        if section not in runners:
            raise ValueError(f"unknown section {section!r}; known: {SECTIONS}")
        t0 = time.time()
        log(f"[bench] {section} ...")
        try:
            results[section] = runners[section]()
        except Exception:  # noqa: BLE001 - one broken section must not cost the others' numbers
            results["errors"][section] = traceback.format_exc()
            log(f"[bench] {section} FAILED:\n{results['errors'][section]}")
        log(f"[bench] {section} done in {time.time() - t0:.0f} s")
        results["machine"]["load_average_at_end"] = os.getloadavg()
        results["wall_s"] = time.time() - started
        if on_section is not None:
            on_section(results)
    return results
