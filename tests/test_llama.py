"""Llama-family parity with Hugging Face (Llama with GQA, Qwen2 with q/k/v biases, Gemma), the
cache, padding between prompt blocks, greedy generation and the converter's errors."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import mid_sequence_token, pad_generated, perturb_vectors, relative_error
from slm_jax.inference import decoding
from slm_jax.weights.convert import hf_llama
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.models.llms import llama
from slm_jax.models.llms.llama import Llama, LlamaConfig

VOCAB = 128
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              # A wide init makes the random models' next-token distributions peaked, so greedy
              # choices are far from ties that float rounding could flip.
              initializer_range=0.2)

HF_MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SIZES, tie_word_embeddings=False)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**_SIZES, tie_word_embeddings=True, rope_theta=50000.0)
    ),
    "gemma": lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**{**_SIZES, "num_key_value_heads": 1}, head_dim=16)
    ),
}


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def pair(request):
    """(HF reference, our config, our params) for one architecture."""
    torch.manual_seed(0)
    reference = HF_MODELS[request.param]().eval()
    perturb_vectors(reference, seed=1)
    cfg = hf_llama.config_from_hf(reference.config.to_dict())
    params = hf_llama.params_from_state_dict(reference.state_dict(), cfg)
    return request.param, reference, cfg, params


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    reference = HF_MODELS["llama"]().eval()
    perturb_vectors(reference, seed=1)
    cfg = hf_llama.config_from_hf(reference.config.to_dict())
    return reference, cfg, hf_llama.params_from_state_dict(reference.state_dict(), cfg)


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(cfg: LlamaConfig, params, ids, mask):
    def run(m):
        hidden, _ = m(m.embed(ids), mask)
        return m.logits(hidden)

    return Llama(cfg).apply({"params": params}, method=run)


def _logits(cfg: LlamaConfig, params, ids, mask=None):
    ids = jnp.asarray(ids)
    return np.asarray(_jit_logits(cfg, params, ids, jnp.ones(ids.shape, jnp.int32) if mask is None else mask))


def test_config_from_hf_reads_each_family(pair):
    name, _, cfg, _ = pair
    assert cfg.num_heads == 4 and cfg.num_layers == 2
    assert cfg.num_kv_heads == (1 if name == "gemma" else 2)
    assert cfg.qkv_bias == (name == "qwen2")
    assert cfg.tie_word_embeddings == (name != "llama")
    assert cfg.scale_embeddings == (name == "gemma") and cfg.norm_scale_offset == (1.0 if name == "gemma" else 0.0)
    assert cfg.activation == ("gelu_tanh" if name == "gemma" else "silu")
    assert cfg.rope_theta == (50000.0 if name == "qwen2" else 10000.0)


def test_logits_match_hf(pair):
    _, reference, cfg, params = pair
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
    assert relative_error(_logits(cfg, params, jnp.asarray(ids)), want) < 1e-4


def test_param_count_matches_hf(pair):
    _, reference, cfg, params = pair
    hf_count = sum(p.numel() for p in reference.parameters())  # tied weights counted once
    assert cfg.num_params() == hf_count == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_cached_incremental_decoding_equals_full_forward(llama_pair):
    _, cfg, params = llama_pair
    model = Llama(cfg)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 10)))
    full = _logits(cfg, params, ids)
    prompt_length, slots = 6, 12  # spare slots beyond the sequence must stay invisible
    cache = llama.init_cache(cfg, 2, slots)
    kv_mask = jnp.zeros((2, slots), jnp.int32).at[:, :prompt_length].set(1)

    @jax.jit
    def run(chunk, cache, kv_mask, index):
        def fn(m):
            hidden, new_cache = m(m.embed(chunk), jnp.ones(chunk.shape, jnp.int32), cache=cache,
                                  cache_index=index, kv_mask=kv_mask)
            return m.logits(hidden), new_cache

        return model.apply({"params": params}, method=fn)

    logits, cache = run(ids[:, :prompt_length], cache, kv_mask, 0)
    steps = [np.asarray(logits)]
    for t in range(prompt_length, ids.shape[1]):
        kv_mask = kv_mask.at[:, t].set(1)
        logits, cache = run(ids[:, t:t + 1], cache, kv_mask, t)
        steps.append(np.asarray(logits))
    assert relative_error(np.concatenate(steps, axis=1), full) < 1e-5


def _blocks_with_padding(rng, lengths_per_row, block_widths):
    """Token blocks, each right-padded to its width, and the same tokens compacted."""
    batch = len(lengths_per_row)
    ids = np.zeros((batch, sum(block_widths)), np.int64)
    mask = np.zeros_like(ids)
    compact = []
    for b, lengths in enumerate(lengths_per_row):
        start, row = 0, []
        for width, n in zip(block_widths, lengths):
            tokens = rng.randint(1, VOCAB, n)
            ids[b, start:start + n], mask[b, start:start + n] = tokens, 1
            row.extend(tokens)
            start += width
        compact.append(row)
    return ids, mask, compact


@pytest.mark.slow
def test_padding_between_blocks_equals_compacted_sequence(llama_pair):
    """text | speech | text with each block right-padded == the same tokens without padding."""
    _, cfg, params = llama_pair
    ids, mask, compact = _blocks_with_padding(np.random.RandomState(2), [(3, 4, 2), (5, 2, 3)], (5, 5, 3))
    padded = _logits(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    for b, row in enumerate(compact):
        want = _logits(cfg, params, jnp.asarray([row]))[0]
        assert relative_error(padded[b][mask[b] == 1], want) < 1e-5


def _hf_greedy(reference, prompts, max_new_tokens, eos_id, pad_id=0):
    """HF greedy generation over left-padded prompts -> [B, max_new_tokens]."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
    return pad_generated(out[:, width:].numpy(), max_new_tokens, pad_id)


def _our_greedy(cfg, params, prompts, max_new_tokens, eos_id, num_beams=1, pad_id=0):
    """Our generate: the prompt minus its last token as (right-padded) embeddings, the last token
    as the start token."""
    width = max(len(p) for p in prompts) - 1
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, :len(p) - 1], mask[b, :len(p) - 1] = p[:-1], 1
    model = Llama(cfg)
    embeds = jax.jit(lambda x: model.apply({"params": params}, x, method=Llama.embed))(jnp.asarray(ids))
    start = jnp.asarray([p[-1] for p in prompts])
    out = decoding.generate(model, params, embeds, jnp.asarray(mask), start, max_new_tokens, eos_id,
                            num_beams=num_beams, length_penalty=0.0, pad_id=pad_id)
    return np.asarray(out.tokens), np.asarray(out.lengths)


def test_greedy_generation_matches_hf(pair):
    _, reference, cfg, params = pair
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(1, VOCAB, 9)), list(rng.randint(1, VOCAB, 5))]
    free_run = _hf_greedy(reference, prompts, 12, eos_id=None)
    eos_id = mid_sequence_token(free_run)
    want = _hf_greedy(reference, prompts, 12, eos_id=eos_id)
    got, lengths = _our_greedy(cfg, params, prompts, 12, eos_id)
    np.testing.assert_array_equal(got, want)
    assert lengths[0] < 12 and got[0, lengths[0] - 1] == eos_id and np.all(got[0, lengths[0]:] == 0)


@pytest.mark.slow
def test_greedy_generation_without_repeated_ngrams_matches_hf(llama_pair):
    """no_repeat_ngram_size against transformers' logits processor of the same name. HF gets the
    prompt as inputs_embeds, so (like ours) it bans n-grams of the generated tokens only."""
    reference, cfg, params = llama_pair
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(1, VOCAB, 7)), list(rng.randint(1, VOCAB, 7))]
    with torch.no_grad():
        embeds = reference.model.embed_tokens(torch.tensor(np.asarray(prompts)))
    for n in (1, 2):
        with torch.no_grad():
            want = reference.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                      do_sample=False, max_new_tokens=24, min_new_tokens=24, eos_token_id=None,
                                      pad_token_id=0, no_repeat_ngram_size=n).numpy()
        model = Llama(cfg)
        ours = decoding.generate(model, params, jnp.asarray(embeds[:, :-1].numpy()), jnp.ones((2, 6), jnp.int32),
                                 jnp.asarray([p[-1] for p in prompts]), 24, None, no_repeat_ngram_size=n)
        np.testing.assert_array_equal(np.asarray(ours.tokens), want[:, -24:])
    plain = decoding.generate(Llama(cfg), params, jnp.asarray(embeds[:, :-1].numpy()), jnp.ones((2, 6), jnp.int32),
                              jnp.asarray([p[-1] for p in prompts]), 24, None)
    repeats = [len(set(zip(r, r[1:]))) < len(r) - 1 for r in np.asarray(plain.tokens).tolist()]
    assert any(repeats), "the free run repeats no bigram: the test would not test the ban"


@pytest.mark.slow
def test_generation_with_padding_between_blocks_equals_compacted_prompt(llama_pair):
    _, cfg, params = llama_pair
    model = Llama(cfg)
    ids, mask, compact = _blocks_with_padding(np.random.RandomState(4), [(2, 4, 2), (4, 1, 3)], (4, 4, 3))
    embed_ids = jax.jit(lambda x: model.apply({"params": params}, x, method=Llama.embed))
    embed = lambda ids: embed_ids(jnp.asarray(ids))  # noqa: E731
    start = jnp.asarray([7, 9])
    padded = decoding.generate(model, params, embed(ids), jnp.asarray(mask), start, 8, None)
    for b, row in enumerate(compact):
        alone = decoding.generate(model, params, embed([row]), jnp.ones((1, len(row)), jnp.int32), start[b:b + 1], 8,
                                  None)
        np.testing.assert_array_equal(padded.tokens[b], alone.tokens[0])


@pytest.mark.slow
def test_prefill_in_causal_query_blocks_generates_the_same_tokens(llama_pair):
    """A prefill writes the cache from the static index 0, so it runs in query blocks too
    (blocks of 3 over an 11-slot prompt with padding); generation must not change."""
    _, cfg, params = llama_pair
    ids, mask, _ = _blocks_with_padding(np.random.RandomState(5), [(2, 4, 2), (4, 1, 3)], (4, 4, 3))
    start = jnp.asarray([7, 9])
    tokens = {}
    for block in (3, 0):
        model = Llama(dataclasses.replace(cfg, causal_query_block=block))
        embeds = model.apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
        tokens[block] = decoding.generate(model, params, embeds, jnp.asarray(mask), start, 8, None).tokens
    np.testing.assert_array_equal(tokens[3], tokens[0])


@pytest.mark.slow
def test_remat_policies_give_the_same_values_and_gradients(llama_pair):
    _, cfg, params = llama_pair
    embeds = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.hidden_size))
    mask = jnp.ones((2, 6), jnp.int32)

    def loss(x, policy):
        hidden, _ = Llama(dataclasses.replace(cfg, remat_policy=policy)).apply(
            {"params": params}, x, mask)
        return jnp.sum(hidden ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_value, base_grad = value_and_grad(embeds, "none")
    for policy in ("full", "dots"):
        value, grad = value_and_grad(embeds, policy)
        assert relative_error(value, base_value) < 1e-5 and relative_error(grad, base_grad) < 1e-5


@pytest.mark.slow
def test_causal_query_blocks_match_hf_and_the_unblocked_gradients(pair):
    """Blocked causal self-attention (``causal_query_block``; the parity tests above run
    sequences shorter than the default block, so unblocked) against HF on an uneven split
    (19 = 5 + 5 + 5 + 4), and its gradients against the unblocked attention's with right
    padding: equal on every real position."""
    _, reference, cfg, params = pair
    blocked, unblocked = (dataclasses.replace(cfg, causal_query_block=n) for n in (5, 0))
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
    assert relative_error(_logits(blocked, params, jnp.asarray(ids)), want) < 1e-4

    mask = np.ones((2, 19), np.int32)
    mask[1, 12:] = 0
    embeds = jax.random.normal(jax.random.PRNGKey(4), (2, 19, cfg.hidden_size))

    def loss(x, c):
        hidden, _ = Llama(c).apply({"params": params}, x, jnp.asarray(mask))
        return jnp.sum((hidden ** 2) * mask[..., None])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (value, grad), (base_value, base_grad) = value_and_grad(embeds, blocked), value_and_grad(embeds, unblocked)
    assert relative_error(value, base_value) < 1e-5
    assert relative_error(grad * mask[..., None], base_grad * mask[..., None]) < 1e-5
    with pytest.raises(ValueError, match="causal_query_block"):
        dataclasses.replace(cfg, causal_query_block=-1)


# --- presets ----------------------------------------------------------------------------------

def _abstract_param_count(cfg: LlamaConfig) -> int:
    shapes = jax.eval_shape(
        lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, cfg.hidden_size)), jnp.ones((1, 2), jnp.int32))
    )
    return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,expected", [("smollm2_135m", 134_515_008), ("llama3_8b", 8_030_261_248)])
def test_presets_have_the_published_sizes(name, expected):
    cfg = llama.LLAMA_PRESETS[name]()
    assert cfg.num_params() == expected == _abstract_param_count(cfg)


# --- converter: files and errors --------------------------------------------------------------

def test_load_checkpoint_from_single_and_sharded_safetensors(llama_pair, tmp_path):
    reference, cfg, params = llama_pair
    for sub, shard in (("single", "100MB"), ("sharded", "60KB")):
        reference.save_pretrained(tmp_path / sub, max_shard_size=shard)
        sharded = (tmp_path / sub / "model.safetensors.index.json").exists()
        assert sharded == (sub == "sharded")
        loaded_cfg, loaded = hf_llama.load_checkpoint(tmp_path / sub)
        assert loaded_cfg == cfg
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
        jax.tree.map(np.testing.assert_array_equal, hf_llama.load_params(tmp_path / sub, cfg), params)
    other = dataclasses.replace(cfg, rope_theta=500000.0)
    with pytest.raises(ConversionError, match="rope_theta=10000.0 but the configured model has 500000.0"):
        hf_llama.load_params(tmp_path / "single", other)


def _state_dict(reference):
    return {k: v.numpy().copy() for k, v in reference.state_dict().items()}


def test_missing_tensor_is_named(llama_pair):
    reference, cfg, _ = llama_pair
    state = _state_dict(reference)
    del state["model.layers.1.mlp.up_proj.weight"]
    message = r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(128, 64\)"
    with pytest.raises(ConversionError, match=message):
        hf_llama.params_from_state_dict(state, cfg)


def test_wrong_shape_is_named(llama_pair):
    reference, cfg, _ = llama_pair
    state = _state_dict(reference)
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    message = r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\) but the config expects \(32, 64\)"
    with pytest.raises(ConversionError, match=message):
        hf_llama.params_from_state_dict(state, cfg)


def test_extra_layers_and_untied_heads_are_rejected(llama_pair):
    reference, cfg, _ = llama_pair
    with pytest.raises(ConversionError, match="no place for.*model.layers.1"):
        hf_llama.params_from_state_dict(_state_dict(reference), dataclasses.replace(cfg, num_layers=1))
    with pytest.raises(ConversionError, match="own lm_head.weight but the config ties"):
        tied = dataclasses.replace(cfg, tie_word_embeddings=True)
        hf_llama.params_from_state_dict(_state_dict(reference), tied)


def test_unknown_architecture_and_unsupported_rope_are_rejected():
    with pytest.raises(ConversionError, match="unknown architecture: model_type='gpt2'"):
        hf_llama.config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    llama31 = json.loads(transformers.LlamaConfig(**_SIZES).to_json_string())
    llama31["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(ConversionError, match="rope scaling type 'llama3' is not supported"):
        hf_llama.config_from_hf(llama31)
    with pytest.raises(ConversionError, match="lacks the field 'intermediate_size'"):
        hf_llama.config_from_hf({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 8,
                                 "num_hidden_layers": 1})


def test_transformers_4_config_fields_are_read():
    old_style = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 250000.0, "rope_scaling": None,
                 "tie_word_embeddings": True}
    cfg = hf_llama.config_from_hf(old_style)
    assert cfg.rope_theta == 250000.0 and cfg.num_kv_heads == 4 and cfg.head_dim == 8 and cfg.tie_word_embeddings
