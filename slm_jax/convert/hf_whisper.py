"""Hugging Face Whisper checkpoints -> ``WhisperEncoder`` parameters.

Accepts the encoder tensors of a ``WhisperEncoder``, ``WhisperModel`` or
``WhisperForConditionalGeneration`` state dict (keys optionally prefixed ``encoder.`` or
``model.encoder.``); decoder tensors are ignored. Files are read tensor by tensor, so converting
large-v3 never holds the decoder (or a second copy of the encoder) in memory.

HF layouts and ours:
  conv{1,2}.weight      [out, in, k]           -> conv{1,2}.kernel [k, in, out]
  *_proj.weight         [out, in] (torch Linear) -> DenseGeneral kernel [in, ...out], reshaped
                                                    to heads for q/k/v ([d, H, Dh]) and out ([H, Dh, d])
  fc1 / fc2             Linear                   -> mlp.wi / mlp.wo
  *layer_norm.weight    -> scale
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from slm_jax.models.whisper_encoder import WhisperEncoderConfig

# Tried in this order; the first under which ``conv1.weight`` exists wins.
ENCODER_PREFIXES = ("", "encoder.", "model.encoder.")

# HF ``activation_function`` -> our MLP activation names.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class ConversionError(ValueError):
    """A checkpoint does not match the architecture or config it is converted to."""


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> WhisperEncoderConfig:
    """Our encoder config from a HF Whisper ``config.json`` dict; ``overrides`` win (e.g. mask_padding)."""
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    if model_type != "whisper" and not any(a.startswith("Whisper") for a in architectures):
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={architectures!r}; "
            "expected a Hugging Face Whisper config (model_type 'whisper')"
        )
    activation = config_json.get("activation_function", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise ConversionError(
            f"unsupported Whisper activation_function {activation!r}; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    try:
        fields = dict(
            num_mel_bins=int(config_json["num_mel_bins"]),
            d_model=int(config_json["d_model"]),
            num_layers=int(config_json["encoder_layers"]),
            num_heads=int(config_json["encoder_attention_heads"]),
            ffn_dim=int(config_json["encoder_ffn_dim"]),
            max_source_positions=int(config_json["max_source_positions"]),
            activation=_HF_ACTIVATIONS[activation],
            # HF's Whisper LayerNorms use torch's default eps (not read from the config).
            layer_norm_eps=1e-5,
        )
    except KeyError as e:
        raise ConversionError(f"Whisper config.json lacks the field {e.args[0]!r}") from None
    fields.update(overrides)
    return WhisperEncoderConfig(**fields)


# --- tensor mapping ----------------------------------------------------------------------------

def _linear(heads_out: tuple[int, ...] | None = None, heads_in: tuple[int, ...] | None = None):
    """torch Linear weight [out, in] -> kernel [in, out] with in/out optionally split into heads."""

    def transform(w: np.ndarray) -> np.ndarray:
        kernel = w.T
        in_shape = heads_in or (kernel.shape[0],)
        out_shape = heads_out or (kernel.shape[1],)
        return kernel.reshape(*in_shape, *out_shape)

    return transform


def _reshape(shape: tuple[int, ...]):
    return lambda b: b.reshape(shape)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 1, 0))  # [out, in, k] -> [k, in, out]


def _tensor_plan(cfg: WhisperEncoderConfig) -> list[tuple[str, tuple[int, ...], Callable, tuple[str, ...]]]:
    """(HF name, expected HF shape, transform, our param path) for every encoder tensor."""
    d, f, h, dh = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.head_dim
    heads = (h, dh)
    plan = [
        ("conv1.weight", (d, cfg.num_mel_bins, 3), _conv, ("conv1", "kernel")),
        ("conv1.bias", (d,), _identity, ("conv1", "bias")),
        ("conv2.weight", (d, d, 3), _conv, ("conv2", "kernel")),
        ("conv2.bias", (d,), _identity, ("conv2", "bias")),
        ("embed_positions.weight", (cfg.max_source_positions, d), _identity, ("embed_positions",)),
        ("layer_norm.weight", (d,), _identity, ("layer_norm", "scale")),
        ("layer_norm.bias", (d,), _identity, ("layer_norm", "bias")),
    ]
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", f"layers_{i}"
        plan += [
            (hf + "self_attn.q_proj.weight", (d, d), _linear(heads_out=heads), (ours, "self_attn", "query", "kernel")),
            (hf + "self_attn.q_proj.bias", (d,), _reshape(heads), (ours, "self_attn", "query", "bias")),
            (hf + "self_attn.k_proj.weight", (d, d), _linear(heads_out=heads), (ours, "self_attn", "key", "kernel")),
            (hf + "self_attn.v_proj.weight", (d, d), _linear(heads_out=heads), (ours, "self_attn", "value", "kernel")),
            (hf + "self_attn.v_proj.bias", (d,), _reshape(heads), (ours, "self_attn", "value", "bias")),
            (hf + "self_attn.out_proj.weight", (d, d), _linear(heads_in=heads), (ours, "self_attn", "out", "kernel")),
            (hf + "self_attn.out_proj.bias", (d,), _identity, (ours, "self_attn", "out", "bias")),
            (hf + "self_attn_layer_norm.weight", (d,), _identity, (ours, "self_attn_layer_norm", "scale")),
            (hf + "self_attn_layer_norm.bias", (d,), _identity, (ours, "self_attn_layer_norm", "bias")),
            (hf + "fc1.weight", (f, d), _linear(), (ours, "mlp", "wi", "kernel")),
            (hf + "fc1.bias", (f,), _identity, (ours, "mlp", "wi", "bias")),
            (hf + "fc2.weight", (d, f), _linear(), (ours, "mlp", "wo", "kernel")),
            (hf + "fc2.bias", (d,), _identity, (ours, "mlp", "wo", "bias")),
            (hf + "final_layer_norm.weight", (d,), _identity, (ours, "final_layer_norm", "scale")),
            (hf + "final_layer_norm.bias", (d,), _identity, (ours, "final_layer_norm", "bias")),
        ]
    return plan


def _find_prefix(names) -> str:
    names = set(names)
    for prefix in ENCODER_PREFIXES:
        if prefix + "conv1.weight" in names:
            return prefix
    raise ConversionError(
        "no Whisper encoder tensors found: looked for 'conv1.weight' under the prefixes "
        f"{[p or '(none)' for p in ENCODER_PREFIXES]}"
    )


def convert_tensors(
    names, get_tensor: Callable[[str], np.ndarray], cfg: WhisperEncoderConfig, dtype=np.float32
) -> dict:
    """Builds our params tree from a lazily read checkpoint.

    ``names`` lists every tensor in the checkpoint; ``get_tensor(name)`` reads one. Raises
    ``ConversionError`` for a missing tensor, a shape that disagrees with ``cfg``, or an encoder
    tensor the architecture has no place for (e.g. a layer beyond ``cfg.num_layers``).
    """
    names = list(names)
    available = set(names)
    prefix = _find_prefix(available)
    params: dict = {}
    used = set()
    for hf_name, hf_shape, transform, path in _tensor_plan(cfg):
        full = prefix + hf_name
        if full not in available:
            raise ConversionError(f"missing tensor {full!r} (expected shape {hf_shape} for this config)")
        array = np.asarray(get_tensor(full))
        if tuple(array.shape) != hf_shape:
            raise ConversionError(
                f"tensor {full!r} has shape {tuple(array.shape)} but the config expects {hf_shape}"
            )
        used.add(full)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(transform(array.astype(np.float32))).astype(dtype)
    unexpected = sorted(
        n for n in names if n.startswith(prefix) and n not in used and _is_encoder_tensor(n[len(prefix):])
    )
    if unexpected:
        raise ConversionError(
            f"unexpected encoder tensors for a {cfg.num_layers}-layer config: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    return params


_ENCODER_TENSOR = re.compile(r"^(conv[12]|embed_positions|layer_norm|layers\.\d+)\.")


def _is_encoder_tensor(name: str) -> bool:
    return bool(_ENCODER_TENSOR.match(name))


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: WhisperEncoderConfig, dtype=np.float32) -> dict:
    """Our params tree from an in-memory HF state dict {name: array} (numpy or torch-CPU arrays)."""
    return convert_tensors(state_dict.keys(), lambda name: np.asarray(state_dict[name]), cfg, dtype)


# --- safetensors files -------------------------------------------------------------------------

class _SafetensorsReader:
    """Reads named tensors from one or more safetensors files, one tensor at a time.

    ``safetensors``' numpy backend has no bfloat16, so bf16 tensors are read from the file's
    raw bytes (the format is an 8-byte header size, a JSON header, then the data) through
    ml_dtypes and widened to float32.
    """

    def __init__(self, files_by_name: Mapping[str, str]):
        self.files_by_name = dict(files_by_name)
        self._handles: dict[str, Any] = {}

    @classmethod
    def from_directory(cls, directory: str) -> "_SafetensorsReader":
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return cls({name: os.path.join(directory, file) for name, file in weight_map.items()})
        if os.path.exists(single):
            with safe_open(single, framework="np") as f:
                return cls({name: single for name in f.keys()})
        raise ConversionError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")

    def names(self) -> list[str]:
        return list(self.files_by_name)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self.files_by_name[name]
        if path not in self._handles:
            if not os.path.exists(path):
                raise ConversionError(f"shard {path} (holding {name!r}) does not exist")
            self._handles[path] = safe_open(path, framework="np")
        handle = self._handles[path]
        if handle.get_slice(name).get_dtype() == "BF16":
            return _read_bf16(path, name)
        return handle.get_tensor(name)


def _read_bf16(path: str, name: str) -> np.ndarray:
    import ml_dtypes

    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + header_size + begin)
        raw = f.read(end - begin)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(entry["shape"]).astype(np.float32)


_STRUCTURE_FIELDS = ("num_mel_bins", "d_model", "num_layers", "num_heads", "ffn_dim", "max_source_positions", "activation")


def load_params(path: str, config: WhisperEncoderConfig, dtype=np.float32) -> dict:
    """Params for an already chosen ``config`` from a HF checkpoint directory.

    The directory's config.json (when present) must describe the same architecture: a
    mismatch names the field rather than surfacing later as a tensor shape error.
    """
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            on_disk = config_from_hf(json.load(f))
        for field in _STRUCTURE_FIELDS:
            if getattr(on_disk, field) != getattr(config, field):
                raise ConversionError(
                    f"{config_path} has {field}={getattr(on_disk, field)!r} but the configured encoder "
                    f"has {field}={getattr(config, field)!r}"
                )
    reader = _SafetensorsReader.from_directory(path)
    return convert_tensors(reader.names(), reader.get, config, dtype)


def load_whisper_encoder(path: str, dtype=np.float32, **config_overrides) -> tuple[WhisperEncoderConfig, dict]:
    """Reads a HF Whisper checkpoint directory (config.json + safetensors, single or sharded).

    Returns ``(config, params)``: apply with ``WhisperEncoder(config).apply({'params': params}, ...)``.
    ``config_overrides`` go to ``config_from_hf`` (e.g. ``mask_padding=False`` for exact HF
    behaviour, ``dtype='bfloat16'`` for the compute dtype); ``dtype`` is the numpy dtype of the
    returned arrays.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{path} has no config.json")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f), **config_overrides)
    return cfg, load_params(path, cfg, dtype)
