"""WhisperEncoder vs Hugging Face's PyTorch WhisperEncoder, the HF converter, and padding."""

from __future__ import annotations

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.weights.convert.hf_whisper import (
    ConversionError,
    config_from_hf,
    load_params,
    load_whisper_encoder,
    params_from_state_dict,
)
from slm_jax.models.encoders.whisper import WHISPER_PRESETS, WhisperEncoder, WhisperEncoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_HF = dict(
    vocab_size=96, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=64,
    max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def randomize_(model, seed: int):
    """HF initialises LayerNorms to 1/0 and biases to 0; perturb every tensor so each mapping is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def hf_encode(hf_encoder, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_encoder(torch.from_numpy(features).transpose(1, 2)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY_HF)).eval()
    return randomize_(model, seed=1)


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_tiny_random")
    hf_model.save_pretrained(path)
    return str(path)


def encoder_state_dict(hf_model, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.numpy() for k, v in hf_model.model.encoder.state_dict().items()}


def test_matches_hugging_face_at_30s_length(hf_model, checkpoint_dir):
    cfg, params = load_whisper_encoder(checkpoint_dir, mask_padding=False)
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.max_source_positions) == (64, 2, 4, 128, 64)
    features = np.random.default_rng(0).normal(size=(2, cfg.max_frames, 80)).astype(np.float32)
    hidden, out_mask = jax.jit(WhisperEncoder(cfg).apply)({"params": params}, jnp.asarray(features), None)
    ref = hf_encode(hf_model.model.encoder, features)
    assert hidden.shape == ref.shape == (2, 64, 64)
    assert np.asarray(out_mask).all()
    assert relative_error(hidden, ref) < 1e-4


def test_short_input_equals_reference_with_truncated_position_table(hf_model):
    # HF only accepts exactly 2 * max_source_positions frames; a reference for a 70-frame input
    # is the same encoder with its table cut to the first 35 rows.
    short_config = transformers.WhisperConfig(**{**TINY_HF, "max_source_positions": 35})
    short_reference = transformers.WhisperForConditionalGeneration(short_config).eval()
    state = hf_model.state_dict()
    state["model.encoder.embed_positions.weight"] = state["model.encoder.embed_positions.weight"][:35]
    short_reference.load_state_dict(state, strict=False)

    cfg = config_from_hf(hf_model.config.to_dict(), mask_padding=False)
    params = params_from_state_dict(encoder_state_dict(hf_model), cfg)
    features = np.random.default_rng(1).normal(size=(1, 70, 80)).astype(np.float32)
    hidden, _ = jax.jit(WhisperEncoder(cfg).apply)({"params": params}, jnp.asarray(features), None)
    assert relative_error(hidden, hf_encode(short_reference.model.encoder, features)) < 1e-4


def test_sharded_and_bfloat16_checkpoints_load(hf_model, checkpoint_dir, tmp_path):
    _, single = load_whisper_encoder(checkpoint_dir)

    sharded_dir = tmp_path / "sharded"
    hf_model.save_pretrained(sharded_dir, max_shard_size="40KB")
    assert (sharded_dir / "model.safetensors.index.json").exists()
    _, sharded = load_whisper_encoder(str(sharded_dir))
    jax.tree.map(np.testing.assert_array_equal, sharded, single)

    bf16_dir = tmp_path / "bf16"
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(bf16_dir)  # the fixture stays float32
    _, bf16 = load_whisper_encoder(str(bf16_dir))
    # bfloat16 keeps 8 mantissa bits: every weight within 2^-8 of the float32 value.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=1e-6), bf16, single)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16))


@pytest.mark.parametrize("prefix", ["", "encoder.", "model.encoder."])
def test_state_dict_prefixes_are_accepted(hf_model, checkpoint_dir, prefix):
    cfg, from_file = load_whisper_encoder(checkpoint_dir)
    from_dict = params_from_state_dict(encoder_state_dict(hf_model, prefix), cfg)
    jax.tree.map(np.testing.assert_array_equal, from_dict, from_file)


def test_load_params_for_a_chosen_config(checkpoint_dir):
    cfg, expected = load_whisper_encoder(checkpoint_dir)
    # The trainer picks the config (e.g. mask_padding=True); the weights must still fit it.
    chosen = WhisperEncoderConfig(**{**cfg.__dict__, "mask_padding": True, "dtype": "bfloat16"})
    jax.tree.map(np.testing.assert_array_equal, load_params(checkpoint_dir, chosen), expected)
    wider = WhisperEncoderConfig(**{**cfg.__dict__, "ffn_dim": 256})
    with pytest.raises(ConversionError, match="config.json gives ffn_dim=128 but the configured model has 256"):
        load_params(checkpoint_dir, wider)


def test_params_tree_matches_the_module(checkpoint_dir):
    cfg, params = load_whisper_encoder(checkpoint_dir)
    abstract = jax.eval_shape(
        lambda: WhisperEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 80)), None)
    )["params"]
    expected = jax.tree.map(lambda a: a.shape, nn.unbox(abstract))
    assert jax.tree.map(np.shape, params) == expected


class TestConversionErrors:
    @pytest.fixture
    def parts(self, hf_model):
        return config_from_hf(hf_model.config.to_dict()), encoder_state_dict(hf_model, "model.encoder.")

    def test_missing_tensor(self, parts):
        cfg, state = parts
        del state["model.encoder.layers.1.fc2.bias"]
        with pytest.raises(ConversionError, match=r"missing tensor 'model\.encoder\.layers\.1\.fc2\.bias'"):
            params_from_state_dict(state, cfg)

    def test_wrong_shape_names_tensor_and_both_shapes(self, parts):
        cfg, state = parts
        state["model.encoder.layers.0.fc1.weight"] = np.zeros((100, 64), np.float32)
        with pytest.raises(ConversionError, match=r"layers\.0\.fc1\.weight.*\(100, 64\).*\(128, 64\)"):
            params_from_state_dict(state, cfg)

    def test_extra_layer_is_rejected(self, parts):
        cfg, state = parts
        fewer_layers = WhisperEncoderConfig(**{**cfg.__dict__, "num_layers": 1})
        with pytest.raises(ConversionError, match=r"no place for.*model\.encoder\.layers\.1\."):
            params_from_state_dict(state, fewer_layers)

    def test_no_encoder_tensors(self, parts):
        cfg, _ = parts
        with pytest.raises(ConversionError, match="no Whisper encoder tensors"):
            params_from_state_dict({"decoder.embed_tokens.weight": np.zeros((3, 3))}, cfg)

    def test_unknown_architecture(self):
        with pytest.raises(ConversionError, match="unknown architecture.*'t5'"):
            config_from_hf({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 8})

    def test_missing_config_field(self):
        with pytest.raises(ConversionError, match="encoder_ffn_dim"):
            config_from_hf({k: v for k, v in {**TINY_HF, "model_type": "whisper"}.items() if k != "encoder_ffn_dim"})

    def test_directory_without_weights(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({**TINY_HF, "model_type": "whisper"}))
        with pytest.raises(ConversionError, match="model.safetensors"):
            load_whisper_encoder(str(tmp_path))


# --- our extensions: short inputs and padding ----------------------------------------------------

SMALL = WhisperEncoderConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=64, max_source_positions=40)


@pytest.fixture(scope="module")
def small_params():
    return jax.jit(WhisperEncoder(SMALL).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 80)), None)["params"]


def padded_batch(lengths, num_frames, seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), num_frames, 80)).astype(np.float32)
    mask = (np.arange(num_frames)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return features, mask


def test_padding_does_not_change_real_frames(small_params):
    features, mask = padded_batch([80, 37], 80, seed=2)
    encode = jax.jit(WhisperEncoder(SMALL).apply)
    hidden, out_mask = encode({"params": small_params}, features, mask)
    alone, alone_mask = encode({"params": small_params}, features[1:, :37], mask[1:, :37])
    assert np.asarray(out_mask).sum(1).tolist() == [40, 19] and alone.shape == (1, 19, 32)
    assert np.asarray(alone_mask).all()
    assert relative_error(hidden[1, :19], alone[0]) < 1e-5
    np.testing.assert_array_equal(np.asarray(hidden[1, 19:]), 0.0)
    # What the padding holds is irrelevant too.
    noisy = features.copy()
    noisy[1, 37:] = 1e3
    assert relative_error(encode({"params": small_params}, noisy, mask)[0][1, :19], alone[0]) < 1e-5


def test_reference_mode_attends_to_padding(small_params):
    """mask_padding=False is HF's behaviour: the padding changes the real frames' outputs."""
    cfg = WhisperEncoderConfig(**{**SMALL.__dict__, "mask_padding": False})
    features, mask = padded_batch([80, 37], 80, seed=3)
    encode = jax.jit(WhisperEncoder(cfg).apply)
    hidden, _ = encode({"params": small_params}, features, mask)
    alone, _ = encode({"params": small_params}, features[1:, :37], mask[1:, :37])
    assert relative_error(hidden[1, :19], alone[0]) > 1e-2


@pytest.mark.parametrize("num_frames", [1, 2, 7, 64, 80])
def test_frames_out_matches_output(small_params, num_frames):
    hidden, out_mask = jax.eval_shape(
        WhisperEncoder(SMALL).apply,
        {"params": small_params}, jnp.zeros((1, num_frames, 80)), jnp.ones((1, num_frames), jnp.int32),
    )
    assert hidden.shape == (1, SMALL.frames_out(num_frames), SMALL.output_dim)
    assert out_mask.shape == hidden.shape[:2]


def test_input_errors(small_params):
    encoder = WhisperEncoder(SMALL)
    with pytest.raises(ValueError, match=r"81 frames.*at most 80 frames"):
        encoder.apply({"params": small_params}, jnp.zeros((1, 81, 80)), None)
    with pytest.raises(ValueError, match=r"log-mel features \[batch, frames, 80\].*\(1, 10, 128\)"):
        encoder.apply({"params": small_params}, jnp.zeros((1, 10, 128)), None)
    with pytest.raises(ValueError, match="mask shape"):
        encoder.apply({"params": small_params}, jnp.zeros((1, 10, 80)), jnp.ones((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="not divisible"):
        WhisperEncoderConfig(d_model=30, num_heads=4)


def test_bfloat16_compute_tracks_float32(small_params):
    features, mask = padded_batch([80, 50], 80, seed=4)
    full, _ = jax.jit(WhisperEncoder(SMALL).apply)({"params": small_params}, features, mask)
    bf16_cfg = WhisperEncoderConfig(**{**SMALL.__dict__, "dtype": "bfloat16"})
    half, _ = jax.jit(WhisperEncoder(bf16_cfg).apply)({"params": small_params}, features, mask)
    assert half.dtype == jnp.bfloat16
    assert relative_error(np.asarray(half, np.float32), full) < 3e-2


def whisper_encoder_size(cfg: WhisperEncoderConfig) -> int:
    """Parameter count written out from the architecture, independently of the module code."""
    d, f = cfg.d_model, cfg.ffn_dim
    convs = (3 * cfg.num_mel_bins * d + d) + (3 * d * d + d)
    attention = 4 * d * d + 3 * d  # q, k, v, out kernels; q, v, out biases
    layer = attention + (d * f + f) + (f * d + d) + 2 * 2 * d  # + fc1, fc2, two LayerNorms
    return convs + cfg.max_source_positions * d + cfg.num_layers * layer + 2 * d


@pytest.mark.parametrize("name", sorted(WHISPER_PRESETS))
def test_preset_parameter_counts(name):
    cfg = WHISPER_PRESETS[name]()
    abstract = jax.eval_shape(lambda: WhisperEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 80)), None))
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(abstract))) == whisper_encoder_size(cfg)


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_preset_sizes_match_hugging_face(name):
    cfg = WHISPER_PRESETS[name]()
    hf_config = transformers.WhisperConfig(
        d_model=cfg.d_model, encoder_layers=cfg.num_layers, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim,
    )
    with torch.device("meta"):
        hf_encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(hf_config)
    assert sum(p.numel() for p in hf_encoder.parameters()) == whisper_encoder_size(cfg)
