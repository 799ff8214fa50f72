"""Conformer encoder: shapes, padding invariance, determinism, gradients, sizes, and one block
against Hugging Face's Wav2Vec2Conformer layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.models.encoders.conformer import (
    Conformer,
    ConformerBlock,
    ConformerConfig,
    conformer_tiny,
    conformer_usm_2b,

)

pytestmark = pytest.mark.slow  # a module-scoped fixture or every test here takes seconds

TINY = conformer_tiny()


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def padded_batch(lengths, num_frames, seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), num_frames, 80)).astype(np.float32)
    mask = (np.arange(num_frames)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return features, mask


@pytest.fixture(scope="module")
def params():
    return nn.unbox(jax.jit(Conformer(TINY).init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 80)), None)["params"])


@pytest.fixture(scope="module")
def encode():
    return jax.jit(Conformer(TINY).apply)


def test_shapes_and_output_mask(params, encode):
    features, mask = padded_batch([101, 37, 1], 101, seed=0)
    hidden, out_mask = encode({"params": params}, features, mask)
    assert hidden.shape == (3, 26, TINY.output_dim) and hidden.dtype == jnp.float32
    assert np.asarray(out_mask).sum(1).tolist() == [TINY.frames_out(n) for n in (101, 37, 1)] == [26, 10, 1]
    assert np.isfinite(np.asarray(hidden)).all()


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5, 8, 9, 300])
def test_frames_out_matches_output(params, num_frames):
    hidden, out_mask = jax.eval_shape(
        Conformer(TINY).apply, {"params": params}, jnp.zeros((2, num_frames, 80)), jnp.ones((2, num_frames), jnp.int32)
    )
    assert hidden.shape == (2, TINY.frames_out(num_frames), TINY.output_dim) and out_mask.shape == hidden.shape[:2]
    assert TINY.frames_out(num_frames) == -(-num_frames // 4)  # ceil(ceil(T / 2) / 2) = ceil(T / 4)
    np.testing.assert_array_equal(TINY.frames_out(np.array([num_frames])), [TINY.frames_out(num_frames)])


def test_padding_does_not_change_real_frames(params, encode):
    lengths = [101, 37, 64]
    features, mask = padded_batch(lengths, 101, seed=1)
    features[mask == 0] = 1e3  # what the padding holds must not matter
    hidden, out_mask = encode({"params": params}, features, mask)
    for i, n in enumerate(lengths):
        alone, alone_mask = encode({"params": params}, features[i : i + 1, :n], mask[i : i + 1, :n])
        t = TINY.frames_out(n)
        assert alone.shape[1] == t and np.asarray(alone_mask).all()
        assert relative_error(hidden[i, :t], alone[0]) < 1e-5
        np.testing.assert_array_equal(np.asarray(hidden[i, t:]), 0.0)
        np.testing.assert_array_equal(np.asarray(out_mask[i]), np.arange(26) < t)


def test_deterministic_and_jit_matches_eager(params, encode):
    features, mask = padded_batch([40, 23], 40, seed=2)
    first, _ = encode({"params": params}, features, mask)
    second, _ = encode({"params": params}, features, mask)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    # Eager dispatch is slow on CPU: compare jit and eager on the first block only.
    one_block = conformer_tiny(num_layers=1)
    one_block_params = {k: v for k, v in params.items() if k not in ("layers_1", "layers_2")}
    jitted, _ = jax.jit(Conformer(one_block).apply)({"params": one_block_params}, features, mask)
    eager, _ = Conformer(one_block).apply({"params": one_block_params}, features, mask)
    assert relative_error(eager, jitted) < 1e-6


def test_gradient_reaches_real_frames_only(params):
    features, mask = padded_batch([40, 23], 40, seed=3)

    def loss(x):
        hidden, _ = Conformer(TINY).apply({"params": params}, x, mask)
        return jnp.sum(hidden ** 2)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(features)))
    assert np.isfinite(grad).all()
    assert (np.abs(grad).sum(-1)[mask == 1] > 0).all()
    np.testing.assert_array_equal(grad[mask == 0], 0.0)  # padding is zeroed at the input


def test_bfloat16_compute_tracks_float32(params):
    features, mask = padded_batch([60, 41], 60, seed=4)
    full, _ = jax.jit(Conformer(TINY).apply)({"params": params}, features, mask)
    half, _ = jax.jit(Conformer(conformer_tiny(dtype="bfloat16")).apply)({"params": params}, features, mask)
    assert half.dtype == jnp.bfloat16
    assert relative_error(np.asarray(half, np.float32), full) < 5e-2


def test_rotary_positions_change_the_output(params, encode):
    features, mask = padded_batch([40], 40, seed=5)
    with_rotary, _ = encode({"params": params}, features, mask)
    without, _ = jax.jit(Conformer(conformer_tiny(positions="none")).apply)({"params": params}, features, mask)
    assert relative_error(without, with_rotary) > 1e-3


def test_config_and_input_errors(params):
    with pytest.raises(ValueError, match="odd"):
        ConformerConfig(conv_kernel_size=4)
    with pytest.raises(ValueError, match="positions"):
        ConformerConfig(positions="relative_xl")
    with pytest.raises(ValueError, match="not divisible"):
        ConformerConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match=r"Conformer expects log-mel features \[batch, frames, 80\]"):
        Conformer(TINY).apply({"params": params}, jnp.zeros((1, 10)), None)


def conformer_size(cfg: ConformerConfig) -> int:
    """Parameter count written out from the architecture, independently of the module code."""
    d, f, c, k = cfg.d_model, cfg.ffn_dim, cfg.subsampling_channels, cfg.conv_kernel_size
    front = (9 * c + c) + (9 * c * c + c) + (cfg.subsampled_mel_bins * c * d + d)
    ffn = d * f + f + f * d + d
    attention = 4 * (d * d + d)
    conv_module = d * 2 * d + k * d + d * d  # pointwise in (no bias), depthwise, pointwise out
    norms = 6 * 2 * d  # ffn1, attention, conv, depthwise, ffn2, final
    return front + cfg.num_layers * (2 * ffn + attention + conv_module + norms)


def parameter_count(cfg: ConformerConfig) -> int:
    abstract = jax.eval_shape(lambda: Conformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 80)), None))
    return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))


def test_preset_parameter_counts():
    assert parameter_count(TINY) == conformer_size(TINY) == 341_088
    usm = conformer_usm_2b()
    count = parameter_count(usm)  # eval_shape: nothing is allocated
    assert count == conformer_size(usm)
    assert abs(count - 1.742e9) / 1.742e9 < 0.01


def test_block_matches_hugging_face_conformer_layer():
    """One block vs transformers' Wav2Vec2ConformerEncoderLayer.

    Two adjustments make the reference comparable: positions='none' (HF's 'rotary' rotates the
    layer input before the q/k projections, not q/k themselves), and its BatchNorm is replaced
    by a LayerNorm over channels (our deliberate choice; BatchNorm in eval mode is a fixed affine
    map that LayerNorm does not reproduce).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = conformer_tiny(positions="none")
    d = cfg.d_model
    x = np.random.default_rng(6).normal(size=(2, 20, d)).astype(np.float32)
    mask, positions = np.ones((2, 20), np.int32), np.tile(np.arange(20), (2, 1))
    block = ConformerBlock(cfg)
    block_params = nn.unbox(jax.jit(block.init)(jax.random.PRNGKey(1), x, mask, positions)["params"])
    rng = np.random.default_rng(7)  # non-trivial norms and biases (init makes them 1 and 0)
    block_params = jax.tree.map(lambda a: (a + 0.1 * rng.normal(size=a.shape)).astype(np.float32), block_params)
    ours = jax.jit(block.apply)({"params": block_params}, x, mask, positions)

    hf_config = transformers.Wav2Vec2ConformerConfig(
        hidden_size=d, num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim, hidden_act="swish",
        conv_depthwise_kernel_size=cfg.conv_kernel_size, position_embeddings_type=None, layer_norm_eps=1e-5,
    )
    hf_config._attn_implementation = "eager"  # the layer is used standalone, outside a PreTrainedModel
    layer = transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer.Wav2Vec2ConformerEncoderLayer(hf_config)

    class ChannelLayerNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(d, eps=cfg.layer_norm_eps)

        def forward(self, h):  # [B, C, T]
            return self.norm(h.transpose(1, 2)).transpose(1, 2)

    layer.conv_module.batch_norm = ChannelLayerNorm()
    layer.eval()
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), block_params)

    def norm(module, ours_norm):
        module.weight.copy_(ours_norm["scale"])
        module.bias.copy_(ours_norm["bias"])

    with torch.no_grad():
        for hf_ffn, name in ((layer.ffn1, "ffn1"), (layer.ffn2, "ffn2")):
            hf_ffn.intermediate_dense.weight.copy_(p[name]["wi"]["kernel"].T)
            hf_ffn.intermediate_dense.bias.copy_(p[name]["wi"]["bias"])
            hf_ffn.output_dense.weight.copy_(p[name]["wo"]["kernel"].T)
            hf_ffn.output_dense.bias.copy_(p[name]["wo"]["bias"])
        attn = p["self_attn"]
        for hf_linear, name in (("linear_q", "query"), ("linear_k", "key"), ("linear_v", "value")):
            getattr(layer.self_attn, hf_linear).weight.copy_(attn[name]["kernel"].reshape(d, d).T)
            getattr(layer.self_attn, hf_linear).bias.copy_(attn[name]["bias"].reshape(d))
        layer.self_attn.linear_out.weight.copy_(attn["out"]["kernel"].reshape(d, d).T)
        layer.self_attn.linear_out.bias.copy_(attn["out"]["bias"])
        conv = p["conv_module"]
        layer.conv_module.pointwise_conv1.weight.copy_(conv["pointwise_in"]["kernel"].T[..., None])
        layer.conv_module.depthwise_conv.weight.copy_(conv["depthwise"]["kernel"].permute(2, 1, 0))
        layer.conv_module.pointwise_conv2.weight.copy_(conv["pointwise_out"]["kernel"].T[..., None])
        norm(layer.conv_module.layer_norm, conv["norm"])
        norm(layer.conv_module.batch_norm.norm, conv["depthwise_norm"])
        for hf_norm, name in (
            (layer.ffn1_layer_norm, "ffn1_norm"), (layer.self_attn_layer_norm, "self_attn_norm"),
            (layer.ffn2_layer_norm, "ffn2_norm"), (layer.final_layer_norm, "final_norm"),
        ):
            norm(hf_norm, p[name])
        reference = layer(torch.from_numpy(x)).numpy()
    assert relative_error(ours, reference) < 1e-4
