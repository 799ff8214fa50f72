"""Decoding benchmark: ``slm_jax.inference.decoding.generate`` (one jitted loop, preallocated KV cache)
against ``transformers`` ``generate`` on the same frozen LLM, the same prompt, timed interleaved.

The prompt stands for an SLM prompt (text + adapted speech): ``prompt_tokens`` random token ids
embedded with the LLM's table. transformers gets all of them as ``inputs_embeds``; slm-jax gets
all but the last as the prefilled prompt and the last as its start token, so both predict the
same first new token. Neither side stops at eos (every run makes exactly ``new_tokens`` tokens),
so tokens/s compare equal work; greedy outputs are compared token by token.

Each side is also timed making a single token: that is the prefill (the whole prompt through the
LLM, plus one step). The difference to the full run is the decoding loop alone, reported as
``loop_tokens_per_s`` and ``loop_speedup_vs_transformers``. The split matters at larger batches:
the prefill is a compute-bound pass over batch x prompt_tokens positions that costs both sides
alike, so it caps the end-to-end ratio however fast the loop gets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import common


def _prompt_ids(ws: common.WeightSet, batch_size: int, prompt_tokens: int, seed: int = 0) -> np.ndarray:
    vocab = int(ws.llm_config["vocab_size"])
    return np.random.default_rng(seed).integers(3, vocab, size=(batch_size, prompt_tokens)).astype(np.int32)


def _jax_generate(weights_name: str, ids: np.ndarray, new_tokens: int, num_beams: int):
    import jax
    import jax.numpy as jnp

    from slm_jax.inference import decoding

    js = common.jax_side(weights_name)
    llm, params = js.llm, js.frozen["llm"]
    embeds = jax.jit(lambda p, x: llm.apply({"params": p}, x, method=type(llm).embed))(params, ids[:, :-1])
    mask = jnp.ones(ids[:, :-1].shape, jnp.int32)
    start = jnp.asarray(ids[:, -1])
    out: dict[str, Any] = {}

    def run():
        result = decoding.generate(llm, params, embeds, mask, start, new_tokens, None, num_beams=num_beams)
        out["tokens"] = np.asarray(result.tokens)  # blocks

    return run, out


def _torch_generate(weights_name: str, ids: np.ndarray, new_tokens: int, num_beams: int):
    import torch

    model = common.torch_side(weights_name).llm
    with torch.no_grad():
        embeds = model.model.embed_tokens(torch.from_numpy(ids).long())
    mask = torch.ones(ids.shape, dtype=torch.long)
    out: dict[str, Any] = {}

    def run():
        with torch.no_grad():
            tokens = model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, num_beams=num_beams, eos_token_id=None, pad_token_id=0,
            )
        out["tokens"] = tokens.numpy()

    return run, out


def decode(weights_name: str, batch_size: int, prompt_tokens: int, new_tokens: int, num_beams: int,
           repeats: int) -> dict[str, Any]:
    """Tokens/s and latency per call of both sides for one (batch, beams) case."""
    ws = common.weights(weights_name)
    ids = _prompt_ids(ws, batch_size, prompt_tokens)
    jax_run, jax_out = _jax_generate(weights_name, ids, new_tokens, num_beams)
    torch_run, torch_out = _torch_generate(weights_name, ids, new_tokens, num_beams)
    runs = {"slm-jax": jax_run, "transformers": torch_run}
    if new_tokens > 1:  # the same call making one token: the prefill (see the module docstring)
        runs["slm-jax prefill"] = _jax_generate(weights_name, ids, 1, num_beams)[0]
        runs["transformers prefill"] = _torch_generate(weights_name, ids, 1, num_beams)[0]
    timings = common.interleaved(runs, repeats)
    generated = batch_size * new_tokens
    sides = {}
    for name in ("slm-jax", "transformers"):
        t = timings[name]
        sides[name] = {"median_s": t.median, "spread": t.spread, "tokens_per_s": generated / t.median,
                       "latency_per_utterance_s": t.median if batch_size == 1 else None, "times_s": t.times}
        if f"{name} prefill" in timings:
            prefill = timings[f"{name} prefill"].median
            loop = t.median - prefill
            sides[name].update(prefill_s=prefill, loop_s=loop,
                               loop_tokens_per_s=batch_size * (new_tokens - 1) / loop if loop > 0 else None)
    loop_speedup = None
    if all(sides[n].get("loop_tokens_per_s") for n in sides):
        loop_speedup = sides["slm-jax"]["loop_tokens_per_s"] / sides["transformers"]["loop_tokens_per_s"]
    agreement = float(np.mean(jax_out["tokens"] == torch_out["tokens"])) if jax_out["tokens"].shape == \
        torch_out["tokens"].shape else 0.0
    return {
        "batch_size": batch_size, "num_beams": num_beams, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "sides": sides,
        "speedup_vs_transformers": common.ratio(timings["slm-jax"], timings["transformers"]),
        "loop_speedup_vs_transformers": loop_speedup,
        # Same weights, fp32 both: greedy tokens should agree; beams may differ on near ties.
        "token_agreement": agreement,
    }
