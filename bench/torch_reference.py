"""The PyTorch reference the benchmarks measure against.

Built from ``transformers`` modules (``WhisperEncoder``, ``LlamaForCausalLM``) with the same
weights as the JAX side (both come from the same HF-layout numpy state dicts), plus
``TorchAdapter``: the architecture of ``slm_jax/models/adapter.py`` written in torch and loaded
from the JAX adapter's parameters, so both sides compute the same function.

Frozen parts are frozen the way SLAM-LLM-style pipelines do it: ``requires_grad_(False)`` on the
encoder and the LLM, an optimizer over the adapter only. Autograd then computes the cotangents
that flow through the LLM to the adapter and no weight gradients for the frozen parts.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slm_jax.models.adapter import AdapterConfig

# jax.nn.dot_product_attention's fill value for masked logits (-0.7 * float32 max): a fully
# masked row (a padded adapter query) becomes a uniform softmax, as in JAX, instead of NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.cumsum(mask.long(), dim=-1) - 1, min=0)


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, H, T, D] (HF 'rotate half' layout), positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, D]
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * torch.cos(angles) + rotated * torch.sin(angles)


class TorchAdapterLayer(nn.Module):
    def __init__(self, c: AdapterConfig):
        super().__init__()
        d = c.d_model
        self.heads, self.head_dim, self.theta = c.num_heads, d // c.num_heads, c.rope_theta
        self.attention_norm = nn.LayerNorm(d, eps=1e-5)
        self.query = nn.Linear(d, d, bias=True)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=True)
        self.out = nn.Linear(d, d, bias=True)
        self.mlp_norm = nn.LayerNorm(d, eps=1e-5)
        self.wi = nn.Linear(d, c.ffn_dim, bias=True)
        self.wo = nn.Linear(c.ffn_dim, d, bias=True)
        if c.activation != "gelu":
            raise ValueError("the torch reference adapter implements the default 'gelu' activation only")

    def forward(self, x, attn_bias, positions):
        b, t, _ = x.shape
        h = self.attention_norm(x)
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        if self.theta is not None:
            q, k = rotate_half_rope(q, positions, self.theta), rotate_half_rope(k, positions, self.theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.wo(F.gelu(self.wi(self.mlp_norm(x))))


class TorchAdapter(nn.Module):
    """Same architecture as ``slm_jax.models.adapter.Adapter`` ('pick' subsampling)."""

    def __init__(self, c: AdapterConfig, input_dim: int):
        super().__init__()
        if c.subsample_mode != "pick":
            raise ValueError("the torch reference adapter implements subsample_mode='pick' only")
        self.config = c
        self.input_projection = nn.Linear(input_dim, c.d_model)
        self.layers = nn.ModuleList([TorchAdapterLayer(c) for _ in range(c.num_layers)])
        self.output_norm = nn.LayerNorm(c.d_model, eps=1e-5)
        self.output_projection = nn.Linear(c.d_model, c.output_dim)

    def forward(self, speech: torch.Tensor, mask: torch.Tensor):
        r = self.config.subsample_rate
        x = (speech * mask[..., None].to(speech.dtype))[:, ::r]
        mask = mask[:, ::r]
        x = self.input_projection(x)
        positions = positions_from_mask(mask)
        valid = mask.bool()
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        attn_bias = torch.zeros(pair.shape, dtype=x.dtype).masked_fill(~pair, _MASKED)
        for layer in self.layers:
            x = layer(x, attn_bias, positions)
        x = self.output_projection(self.output_norm(x))
        return x * mask[..., None].to(x.dtype), mask


def load_adapter_from_jax(adapter: TorchAdapter, params: Mapping[str, Any]) -> TorchAdapter:
    """Copies JAX adapter params (slm_jax layout) into the torch adapter."""
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731

    def linear(module: nn.Linear, p, flatten_in: bool = False):
        kernel = np.asarray(p["kernel"], np.float32)
        kernel = kernel.reshape(-1, kernel.shape[-1]) if flatten_in else kernel.reshape(kernel.shape[0], -1)
        module.weight.data.copy_(t(kernel.T))
        if module.bias is not None:
            module.bias.data.copy_(t(np.asarray(p["bias"]).reshape(-1)))

    def norm(module: nn.LayerNorm, p):
        module.weight.data.copy_(t(p["scale"]))
        module.bias.data.copy_(t(p["bias"]))

    linear(adapter.input_projection, params["input_projection"])
    for i, layer in enumerate(adapter.layers):
        p = params[f"layer_{i}"]
        norm(layer.attention_norm, p["attention_norm"])
        for name in ("query", "key", "value"):
            linear(getattr(layer, name), p["attention"][name])
        linear(layer.out, p["attention"]["out"], flatten_in=True)
        norm(layer.mlp_norm, p["mlp_norm"])
        linear(layer.wi, p["mlp"]["wi"])
        linear(layer.wo, p["mlp"]["wo"])
    norm(adapter.output_norm, params["output_norm"])
    linear(adapter.output_projection, params["output_projection"])
    return adapter


def _to_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict.items()}


def build_llama(state_dict: Mapping[str, np.ndarray], config_json: Mapping[str, Any],
                attn_implementation: str = "sdpa") -> "Any":
    """A frozen ``LlamaForCausalLM`` (eval mode) from an HF-layout numpy state dict."""
    import transformers

    fields = {k: v for k, v in config_json.items() if k not in ("architectures", "model_type", "add_bos_token")}
    config = transformers.LlamaConfig(**fields)
    config._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(config).eval()
    sd = _to_torch_state_dict(state_dict)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Llama state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.requires_grad_(False)
    return model


def build_whisper_encoder(state_dict: Mapping[str, np.ndarray], config_kwargs: Mapping[str, Any],
                          attn_implementation: str = "sdpa") -> "Any":
    """A frozen HF ``WhisperEncoder`` (eval mode): it accepts exactly 30 s (3000 frames) of input."""
    import transformers

    config = transformers.WhisperConfig(**{k: v for k, v in config_kwargs.items() if k != "model_type"})
    config._attn_implementation = attn_implementation
    encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    missing, unexpected = encoder.load_state_dict(_to_torch_state_dict(state_dict), strict=True)
    encoder.requires_grad_(False)
    return encoder


class TorchSLM(nn.Module):
    """Frozen Whisper encoder -> trainable adapter -> frozen Llama, in the prompt layout of
    ``slm_jax.models.slm.SLM`` ([prefix | speech | suffix | decoder input], each block
    right-padded, positions from the combined mask)."""

    def __init__(self, encoder, adapter: TorchAdapter, llm):
        super().__init__()
        self.encoder, self.adapter, self.llm = encoder, adapter, llm

    def encode_padded_30s(self, audio_features: torch.Tensor, audio_mask: torch.Tensor):
        """As peers run it: every example padded to Whisper's 3000-frame window, no mask.

        The encoder output is then cut to the batch's longest real utterance, so the LLM sees
        the same shapes as the JAX side (only the encoder pays for the padding).
        """
        b, t, mels = audio_features.shape
        padded = torch.zeros(b, mels, 3000, dtype=audio_features.dtype)
        padded[:, :, :t] = audio_features.transpose(1, 2)
        with torch.no_grad():
            hidden = self.encoder(padded).last_hidden_state
        mask = audio_mask[:, ::2]
        return hidden[:, : mask.shape[1]], mask

    def logits(self, speech_hidden, speech_mask, batch: Mapping[str, torch.Tensor], logits_to_keep: int = 0):
        """logits_to_keep = target length: only the decoder block gets a vocabulary projection
        (equal work to the JAX side); 0: every position, as a ``labels=`` forward computes."""
        speech, speech_mask = self.adapter(speech_hidden, speech_mask)
        embed = self.llm.model.embed_tokens
        embeds = torch.cat([embed(batch["prefix_tokens"]), speech, embed(batch["suffix_tokens"]),
                            embed(batch["decoder_input_tokens"])], dim=1)
        mask = torch.cat([batch["prefix_mask"], speech_mask, batch["suffix_mask"], batch["target_mask"]], dim=1).long()
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                       logits_to_keep=logits_to_keep, use_cache=False)
        return out.logits[:, -batch["target_tokens"].shape[1]:]

    def loss(self, speech_hidden, speech_mask, batch, logits_to_keep: int = 0):
        logits = self.logits(speech_hidden, speech_mask, batch, logits_to_keep)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch["target_tokens"].long().flatten(), reduction="none")
        m = batch["target_mask"].float().flatten()
        return (nll * m).sum() / m.sum().clamp(min=1.0)


def make_optimizer(adapter: nn.Module, learning_rate: float = 1e-3):
    """AdamW with the JAX side's defaults (b1 0.9, b2 0.98, weight decay 0.01)."""
    return torch.optim.AdamW(adapter.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)


def train_step(model: TorchSLM, optimizer, batch: Mapping[str, torch.Tensor], *, from_audio: bool,
               full_logits: bool) -> float:
    """One step: (encoder) + adapter + frozen LLM forward, backward to the adapter, clip, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    if from_audio:
        hidden, mask = model.encode_padded_30s(batch["audio_features"], batch["audio_mask"])
    else:
        hidden, mask = batch["speech_hidden"], batch["speech_mask"]
    loss = model.loss(hidden, mask, batch, logits_to_keep=0 if full_logits else batch["target_tokens"].shape[1])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.adapter.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
