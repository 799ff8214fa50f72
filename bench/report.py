"""The results of ``bench.suite.run`` as a Markdown table of ratios against the reference.

Each row: what was measured, the shape, slm-jax's number, the reference's, the speed-up (> 1:
slm-jax faster) and the speed-up the benchmark expects, with whether this run reached it.
"""

from __future__ import annotations

from typing import Any, Mapping

HEADER = ("benchmark", "shape", "slm-jax", "reference", "ratio", "target", "met")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _met(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "yes" if value >= target else "NO"


def _row(bench: str, shape: str, ours: str, ref: str, ratio: float | None, target: float | None,
         target_text: str = "") -> tuple[str, ...]:
    ratio_text = "" if ratio is None else f"{ratio:.2f}x"
    text = target_text or ("" if target is None else f">= {target:g}x")
    return (bench, shape, ours, ref, ratio_text, text, "" if ratio is None else _met(ratio, target))


def _case(case: Mapping[str, Any], tokens: int | None = None) -> str:
    text = f"b{case['batch_size']} x {case['seconds']:g} s"
    return text + (f" ({tokens} tok)" if tokens else "")


def rows(results: Mapping[str, Any]) -> list[tuple[str, ...]]:
    out = []
    if "bare" in results:
        r = results["bare"]
        shape = _case(r["case"], r["llm_tokens"])
        torch = r["sides"]["torch"]["examples_per_s"]
        for name, speedup in r["speedup_vs_torch"].items():
            label = "train step, bare (adapter + frozen LLM fwd/bwd)" + ("" if name == "slm-jax" else f" [{name[8:]}]")
            out.append(_row(label, shape, f"{r['sides'][name]['examples_per_s']:.2f} ex/s", f"{torch:.2f} ex/s",
                            speedup, 1.0 if name == "slm-jax" else None,
                            ">= 1x (aim 1.2x)" if name == "slm-jax" else ""))
        mem = r["memory"]
        rss = mem["step_peak_extra_rss_bytes"]
        out.append(_row("host RSS a step adds (peak)", shape, _mib(rss["slm-jax"]), _mib(rss["torch"]), None, None))
        opt = mem["optimizer_state_bytes"]
        params = mem["param_bytes"]
        out.append(_row("optimizer state (AdamW, adapter only)", "", _mib(opt["slm-jax"]), _mib(opt["torch"]), None,
                        None, f"{100 * opt['slm-jax'] / (params['adapter'] + params['frozen']):.2f}% of param bytes"))
    if "e2e" in results:
        r = results["e2e"]
        shape = _case(r["case"])
        ref = r["sides"]["torch 30 s window"]["examples_per_s"]
        for name, speedup in r["speedup_vs_torch"].items():
            ours = r["sides"].get(name, {}).get("examples_per_s")
            if ours is None:  # derived: first epoch = cached step + one-time encoding
                ours = ref * speedup
            target = 2.0 if name == "slm-jax cached" else None
            out.append(_row(f"train end to end [{name}] vs torch 30 s window", shape, f"{ours:.2f} ex/s",
                            f"{ref:.2f} ex/s", speedup, target))
    for r in results.get("decode", []):
        kind = "greedy" if r["num_beams"] == 1 else f"beam {r['num_beams']}"
        shape = f"b{r['batch_size']}, {r['prompt_tokens']}+{r['new_tokens']} tok"
        ours, ref = r["sides"]["slm-jax"], r["sides"]["transformers"]
        out.append(_row(f"decode {kind} tokens/s vs generate", shape, f"{ours['tokens_per_s']:.1f} tok/s",
                        f"{ref['tokens_per_s']:.1f} tok/s", r["speedup_vs_transformers"],
                        2.0 if r["num_beams"] == 1 else None))
        if r.get("loop_speedup_vs_transformers"):
            out.append(_row("  loop alone tokens/s (ratio); prefill = prompt + 1 token", shape,
                            f"{ours['loop_tokens_per_s']:.1f} tok/s; prefill {ours['prefill_s']:.3f} s",
                            f"{ref['loop_tokens_per_s']:.1f} tok/s; prefill {ref['prefill_s']:.3f} s",
                            r["loop_speedup_vs_transformers"], None))
        if r["batch_size"] == 1:
            out.append(_row(f"decode {kind} latency / utterance", shape, f"{ours['median_s']:.3f} s",
                            f"{ref['median_s']:.3f} s", r["speedup_vs_transformers"], None))
    if "memory" in results:
        paper = results["memory"]["paper_shape"]
        for name in ("adamw", "adafactor"):
            if name in paper:
                p = paper[name]
                share = 100 * p["share_of_param_bytes"]
                configured = " (configured)" if paper.get("configured_optimizer") == name else ""
                out.append((f"optimizer state at paper shape, {name}{configured}", "USM-2B + mT0-XXL",
                            _mib(p["optimizer_state_bytes"]),
                            f"of {p['param_bytes'] / 2**30:.1f} GiB params", f"{share:.3f}%", "< 2%",
                            "yes" if share < 2 else "NO"))
    if "padding" in results:
        r = results["padding"]
        fixed, bucketed = r["sides"]["fixed"], r["sides"]["bucketed"]
        shape = f"b{r['batch_size']} x {r['num_batches']}, demo corpus"
        out.append(_row("train step, length-grouped buckets vs fixed padding", shape,
                        f"{bucketed['examples_per_s']:.2f} ex/s, {100 * bucketed['padding']:.0f}% pad",
                        f"{fixed['examples_per_s']:.2f} ex/s, {100 * fixed['padding']:.0f}% pad",
                        r["speedup_steady"], None))
        out.append(_row("  same, first pass (incl. compiling each shape)", shape,
                        f"{bucketed['examples_per_s_first_pass']:.2f} ex/s, {bucketed['distinct_shapes']} shapes",
                        f"{fixed['examples_per_s_first_pass']:.2f} ex/s, {fixed['distinct_shapes']} shape(s)",
                        r["speedup_first_pass"], None))
    for r in results.get("scaling", []):
        eps = r["examples_per_s"]
        rss = r["step_peak_extra_rss_bytes"]
        out.append(_row("growth: bare step", _case(r["case"], r["llm_tokens"]),
                        f"{eps['slm-jax']:.2f} ex/s, +{_mib(rss['slm-jax'])}",
                        f"{eps['torch']:.2f} ex/s, +{_mib(rss['torch'])}", r["speedup_vs_torch"], None))
        for name, speedup in r.get("speedup_vs_variant", {}).items():
            out.append(_row(f"  same, default vs {name}", _case(r["case"], r["llm_tokens"]),
                            f"{eps['slm-jax']:.2f} ex/s", f"{eps[f'slm-jax {name}']:.2f} ex/s", speedup, None))
    return out


def markdown(results: Mapping[str, Any]) -> str:
    table = [HEADER, *rows(results)]
    lines = ["| " + " | ".join(r) + " |" for r in table]
    lines.insert(1, "|" + "---|" * len(HEADER))
    m = results["machine"]
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; "
                 f"jax {m['jax']} ({m['jax_backend']}), torch {m['torch']} ({m['torch_threads']} threads); "
                 f"load average {m['load_average_at_start'][0]:.1f} at start, "
                 f"{m.get('load_average_at_end', [float('nan')])[0]:.1f} at end. Weights: {results['weights']}, fp32.")
    if results.get("errors"):
        lines.append(f"Sections that FAILED (see the JSON): {', '.join(results['errors'])}.")
    return "\n".join(lines)
