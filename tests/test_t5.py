"""T5-family parity with Hugging Face (T5 v1.1 gated-GELU untied, T5 v1.0 ReLU tied, mT5), the
decoder cache, padding between prompt blocks, greedy generation, presets and converter errors."""

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
from slm_jax.weights.convert import hf_t5
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.models.llms import t5
from slm_jax.models.llms.t5 import T5, T5Config

VOCAB = 128
_SIZES = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)


def _untie_head(model):
    """transformers 5 always ties lm_head to shared when building a model; v1.1 / mT5 checkpoints
    have their own head, so give the reference one."""
    generator = torch.Generator().manual_seed(7)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    return model


HF_MODELS = {
    "t5_v1_1": lambda: _untie_head(transformers.T5ForConditionalGeneration(
        transformers.T5Config(**_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False))),
    "t5_v1_0": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(**_SIZES, feed_forward_proj="relu")),
    "mt5": lambda: _untie_head(transformers.MT5ForConditionalGeneration(transformers.MT5Config(**_SIZES))),
}


def _pair(name):
    torch.manual_seed(0)
    reference = HF_MODELS[name]().eval()
    perturb_vectors(reference, seed=1)
    cfg = hf_t5.config_from_hf(reference.config.to_dict())
    return reference, cfg, hf_t5.params_from_state_dict(reference.state_dict(), cfg)


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def pair(request):
    return (request.param, *_pair(request.param))


@pytest.fixture(scope="module")
def v1_1_pair():
    return _pair("t5_v1_1")


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(cfg, params, ids, mask, decoder_ids):
    return T5(cfg).apply({"params": params}, ids, mask, decoder_ids, method=lambda m, i, k, d: m(m.embed(i), k, d))


def _logits(cfg, params, ids, mask, decoder_ids):
    return np.asarray(_jit_logits(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(decoder_ids)))


def _batch(seed):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, VOCAB, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row
    return ids, mask, rng.randint(2, VOCAB, (2, 7))


def test_config_from_hf_reads_each_family(pair):
    name, _, cfg, _ = pair
    assert cfg.tie_word_embeddings == (name == "t5_v1_0")
    assert cfg.feed_forward_proj == ("relu" if name == "t5_v1_0" else "gated-gelu")
    assert (cfg.mlp_activation, cfg.mlp_gated) == (("relu", False) if name == "t5_v1_0" else ("gelu_tanh", True))
    assert cfg.relative_attention_num_buckets == 8 and cfg.num_decoder_layers == 2


def test_logits_match_hf(pair):
    _, reference, cfg, params = pair
    ids, mask, decoder_ids = _batch(0)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    assert relative_error(_logits(cfg, params, ids, mask, decoder_ids), want) < 1e-4


def test_param_count_matches_hf(pair):
    _, reference, cfg, params = pair
    hf_count = sum(p.numel() for p in reference.parameters())  # tied weights counted once
    assert cfg.num_params() == hf_count == sum(x.size for x in jax.tree.leaves(params))


def test_cached_decoding_equals_teacher_forcing(v1_1_pair):
    _, cfg, params = v1_1_pair
    model = T5(cfg)
    ids, mask, decoder_ids = _batch(1)
    full = _logits(cfg, params, ids, mask, decoder_ids)

    def prepare(m):
        return m.init_decoder_cache(m.encode(m.embed(jnp.asarray(ids)), jnp.asarray(mask)), 10)

    @jax.jit
    def step(token, cache, index):
        def fn(m):
            hidden, new_cache = m.decode(None, jnp.asarray(mask), token, cache=cache, cache_index=index)
            return m.logits(hidden), new_cache

        return model.apply({"params": params}, method=fn)

    cache = jax.jit(lambda: model.apply({"params": params}, method=prepare))()
    steps = []
    for t in range(decoder_ids.shape[1]):
        logits, cache = step(jnp.asarray(decoder_ids[:, t:t + 1]), cache, t)
        steps.append(np.asarray(logits))
    assert relative_error(np.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.slow
def test_padding_between_blocks_equals_compacted_prompt(v1_1_pair):
    """Encoder input text | speech | text, each block right-padded == the compacted prompt."""
    _, cfg, params = v1_1_pair
    rng = np.random.RandomState(2)
    blocks = [(3, 5), (4, 4), (2, 3)]  # (real tokens, block width)
    tokens = [rng.randint(2, VOCAB, n) for n, _ in blocks]
    padded = np.concatenate([np.pad(t, (0, w - n)) for t, (n, w) in zip(tokens, blocks)])[None]
    padded_mask = np.concatenate([np.pad(np.ones(n, np.int64), (0, w - n)) for n, w in blocks])[None]
    compact = np.concatenate(tokens)[None]
    decoder_ids = rng.randint(2, VOCAB, (1, 6))
    got = _logits(cfg, params, padded, padded_mask, decoder_ids)
    want = _logits(cfg, params, compact, np.ones_like(compact), decoder_ids)
    assert relative_error(got, want) < 1e-5

    model = T5(cfg)
    embed = jax.jit(lambda x: model.apply({"params": params}, x, method=T5.embed))
    start = jnp.zeros((1,), jnp.int32)
    a = decoding.generate(model, params, embed(jnp.asarray(padded)), jnp.asarray(padded_mask), start, 8, None)
    b = decoding.generate(model, params, embed(jnp.asarray(compact)), jnp.ones(compact.shape, jnp.int32), start, 8,
                          None)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def _hf_greedy(reference, ids, mask, max_new_tokens, eos_id):
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
    return pad_generated(out[:, 1:].numpy(), max_new_tokens, 0)  # drop the decoder start token


@pytest.mark.slow
def test_greedy_generation_matches_hf(pair):
    _, reference, cfg, params = pair
    ids, mask, _ = _batch(3)
    free_run = _hf_greedy(reference, ids, mask, 12, eos_id=None)
    eos_id = mid_sequence_token(free_run)
    want = _hf_greedy(reference, ids, mask, 12, eos_id=eos_id)
    model = T5(cfg)
    embeds = jax.jit(lambda x: model.apply({"params": params}, x, method=T5.embed))(jnp.asarray(ids))
    out = decoding.generate(model, params, embeds, jnp.asarray(mask), jnp.zeros((2,), jnp.int32), 12, eos_id)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    length = int(out.lengths[0])
    assert length < 12 and out.tokens[0, length - 1] == eos_id


# --- presets ----------------------------------------------------------------------------------

def _abstract_param_count(cfg: T5Config) -> int:
    def init():
        x = jnp.zeros((1, 2, cfg.d_model))
        ones = jnp.ones((1, 2), jnp.int32)
        return T5(cfg).init(jax.random.PRNGKey(0), x, ones, ones, ones)

    return sum(x.size for x in jax.tree.leaves(jax.eval_shape(init)))


@pytest.mark.slow
def test_mt0_xxl_has_12_9b_parameters():
    """mT0-XXL = mT5-XXL shape: d_model 4096, 24 + 24 layers, 64 heads, vocab 250112, untied."""
    cfg = t5.mt0_xxl()
    shape = (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.vocab_size, cfg.tie_word_embeddings)
    assert shape == (4096, 10240, 64, 250112, False)
    count = _abstract_param_count(cfg)  # shapes only: nothing is allocated
    assert count == cfg.num_params() == 12_921_057_280


@pytest.mark.parametrize("name,expected", [("t5_v1_1_small", 76_961_152), ("mt5_small", 300_176_768)])
def test_small_presets_have_the_published_sizes(name, expected):
    cfg = t5.T5_PRESETS[name]()
    assert cfg.num_params() == expected == _abstract_param_count(cfg)


# --- converter: files and errors --------------------------------------------------------------

def test_transformers_5_tied_save_loads_as_untied_head(v1_1_pair, tmp_path):
    """transformers 5 saves a v1.1 model with its head tied to shared (no lm_head.weight):
    the converter takes the head from shared.weight, which is what the reference computes."""
    torch.manual_seed(0)
    reference = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False)).eval()
    reference.save_pretrained(tmp_path / "tied", max_shard_size="40KB")
    assert (tmp_path / "tied" / "model.safetensors.index.json").exists()
    cfg, params = hf_t5.load_checkpoint(tmp_path / "tied")
    assert not cfg.tie_word_embeddings
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["token_embedder"]["embedding"].T)
    ids, mask, decoder_ids = _batch(4)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    assert relative_error(_logits(cfg, params, ids, mask, decoder_ids), want) < 1e-4
    jax.tree.map(np.testing.assert_array_equal, hf_t5.load_params(tmp_path / "tied", cfg), params)
    with pytest.raises(ConversionError, match="d_ff=64 but the configured model has 128"):
        hf_t5.load_params(tmp_path / "tied", dataclasses.replace(cfg, d_ff=128))


def test_transformers_4_configs_map_tying_and_scaling():
    base = {k: v for k, v in _SIZES.items() if not k.endswith("token_id")}
    assert hf_t5.config_from_hf({"model_type": "t5", **base, "feed_forward_proj": "relu"}).tie_word_embeddings
    assert not hf_t5.config_from_hf({"model_type": "t5", **base, "tie_word_embeddings": False}).tie_word_embeddings
    mt5 = {"model_type": "mt5", **base, "feed_forward_proj": "gated-gelu"}
    assert not hf_t5.config_from_hf(mt5).tie_word_embeddings


def _state_dict(reference):
    return {k: v.numpy().copy() for k, v in reference.state_dict().items()}


def test_missing_tensor_is_named(v1_1_pair):
    reference, cfg, _ = v1_1_pair
    state = _state_dict(reference)
    del state["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    message = r"missing tensor 'decoder.block.1.layer.1.EncDecAttention.k.weight' \(expected shape \(32, 32\)"
    with pytest.raises(ConversionError, match=message):
        hf_t5.params_from_state_dict(state, cfg)


def test_wrong_shape_is_named(v1_1_pair):
    reference, cfg, _ = v1_1_pair
    state = _state_dict(reference)
    state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((32, 4), np.float32)
    message = r"relative_attention_bias.weight' has shape \(32, 4\) but the config expects \(8, 4\)"
    with pytest.raises(ConversionError, match=message):
        hf_t5.params_from_state_dict(state, cfg)


def test_mismatched_architecture_tensors_are_rejected(v1_1_pair):
    reference, cfg, _ = v1_1_pair
    relu = dataclasses.replace(cfg, feed_forward_proj="relu")
    with pytest.raises(ConversionError, match="missing tensor 'encoder.block.0.layer.1.DenseReluDense.wi.weight'"):
        hf_t5.params_from_state_dict(_state_dict(reference), relu)
    with pytest.raises(ConversionError, match="no place for.*decoder.block.1"):
        hf_t5.params_from_state_dict(_state_dict(reference), dataclasses.replace(cfg, num_decoder_layers=1))
    with pytest.raises(ConversionError, match="own lm_head.weight but the config ties"):
        hf_t5.params_from_state_dict(_state_dict(reference), dataclasses.replace(cfg, tie_word_embeddings=True))


def test_unknown_architecture_is_rejected():
    with pytest.raises(ConversionError, match="unknown architecture: model_type='bart'"):
        hf_t5.config_from_hf({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]})
    umt5 = json.loads(transformers.T5Config(**_SIZES).to_json_string()) | {"model_type": "umt5"}
    with pytest.raises(ConversionError, match="unknown architecture: model_type='umt5'"):
        hf_t5.config_from_hf(umt5)
    with pytest.raises(ConversionError, match="unknown feed_forward_proj 'gated-tanh'"):
        hf_t5.config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-tanh"})
