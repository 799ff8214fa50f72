"""CTranslate2 ``model.bin`` reader, and Whisper CTranslate2 -> Hugging Face state-dict layout.

File format (little endian; versions 1..6 are read, Whisper-base from ``faster-whisper`` is 6)::

    uint32  binary_version
    if version >= 2:  string spec_name, uint32 spec_revision
    uint32  num_variables
    repeated num_variables times:
        string  name
        uint8   rank
        uint32  dims[rank]
        if version >= 4:  uint8 dtype_id, uint32 num_bytes    (dtype ids below)
        else:             uint8 item_size, uint32 num_items
        bytes   data
    if version >= 3:
        uint32  num_aliases
        repeated:  string alias, string variable_name
    string = uint16 length (including the trailing NUL) + bytes

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Quantized weights (int8 / int16) come with a float ``<name>_scale`` companion, one scale per output
row: ``weight = q / scale``. ``read_ctranslate2`` dequantizes those and drops the ``_scale`` entry.
Float variables are returned as float32. Integer variables without a scale are spec constants
(``encoder/num_heads``, ``decoder/activation`` ...) and keep their integer dtype.

The index is read with small sequential reads; data is read from a memory map, so a caller asking
for the encoder only (``prefix="encoder/"``) never reads the decoder's bytes.

Whisper (``WhisperSpec``) variable names map onto ``transformers``' ``WhisperEncoder`` /
``WhisperDecoder`` state dicts as follows (N = layer)::

    encoder/conv{1,2}/{weight,bias}                    conv{1,2}.{weight,bias}     [out, in, k]
    encoder/position_encodings/encodings               embed_positions.weight
    encoder/layer_N/self_attention/linear_0 (fused)    layers.N.self_attn.{q,k,v}_proj.{weight,bias}
    encoder/layer_N/self_attention/linear_1            layers.N.self_attn.out_proj
    encoder/layer_N/self_attention/layer_norm/{gamma,beta}  layers.N.self_attn_layer_norm.{weight,bias}
    encoder/layer_N/ffn/linear_{0,1}                   layers.N.fc{1,2}
    encoder/layer_N/ffn/layer_norm                     layers.N.final_layer_norm
    encoder/layer_norm                                 layer_norm
  decoder, in addition:
    decoder/embeddings/weight                          embed_tokens.weight (and proj_out.weight)
    decoder/layer_N/attention/linear_0                 layers.N.encoder_attn.q_proj
    decoder/layer_N/attention/linear_1 (fused k,v)     layers.N.encoder_attn.{k,v}_proj
    decoder/layer_N/attention/linear_2                 layers.N.encoder_attn.out_proj
    decoder/layer_N/attention/layer_norm               layers.N.encoder_attn_layer_norm

HF Whisper's ``k_proj`` has no bias; CTranslate2 stores a (zero) key bias in the fused matrix. It is
dropped: a per-head constant added to every key shifts all attention logits of a query by the same
amount, which softmax ignores, so dropping it is exact even when it is not zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import struct
from typing import Any, Iterable, Mapping

import numpy as np

from slm_jax.weights.convert.errors import ConversionError

CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16, widened to float32 on read
}
_BFLOAT16_ID = 5
# Version < 4 files store an item size instead of a dtype id; those versions only had these types.
_LEGACY_ITEM_SIZES = {4: 0, 2: 2, 1: 1}
SUPPORTED_VERSIONS = range(1, 7)

# CTranslate2's ActivationType enum -> Hugging Face activation names.
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "gelu_sigmoid", 5: "tanh"}


class Ct2FormatError(ConversionError):
    """A CTranslate2 model file is truncated, corrupt, or not what the caller expects."""


@dataclasses.dataclass(frozen=True)
class Ct2Variable:
    name: str
    shape: tuple[int, ...]
    dtype_id: int
    offset: int  # byte offset of the data in the file
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        return CT2_DTYPES[self.dtype_id]


@dataclasses.dataclass(frozen=True)
class Ct2Index:
    path: pathlib.Path
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]  # alias -> variable name
    file_size: int


class _Reader:
    """Sequential little-endian reads with errors that say where the file broke."""

    def __init__(self, f, path: pathlib.Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.where = "the header"

    def read(self, n: int) -> bytes:
        pos = self.f.tell()
        b = self.f.read(n)
        if len(b) != n:
            raise Ct2FormatError(
                f"{self.path}: truncated or corrupt CTranslate2 file: needed {n} bytes at offset "
                f"{pos} while reading {self.where}, but the file has {self.size} bytes"
            )
        return b

    def unpack(self, fmt: str):
        fmt = "<" + fmt
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.read(n)
        if n == 0 or raw[-1] != 0:
            raise Ct2FormatError(
                f"{self.path}: corrupt CTranslate2 file: string without NUL terminator at offset "
                f"{self.f.tell() - n} while reading {self.where}"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Ct2FormatError(
                f"{self.path}: corrupt CTranslate2 file: undecodable string while reading {self.where}"
            ) from e


def read_index(path: str | os.PathLike) -> Ct2Index:
    """Parse the header and variable table of a CTranslate2 ``model.bin`` (no tensor data read)."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    variables: dict[str, Ct2Variable] = {}
    aliases: dict[str, str] = {}
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        (version,) = r.unpack("I")
        if version not in SUPPORTED_VERSIONS:
            raise Ct2FormatError(
                f"{path}: not a CTranslate2 model.bin this reader knows (binary version {version}, "
                f"supported {SUPPORTED_VERSIONS.start}..{SUPPORTED_VERSIONS.stop - 1})"
            )
        spec_name, spec_revision = "", 1
        if version >= 2:
            spec_name = r.string()
            (spec_revision,) = r.unpack("I")
        (count,) = r.unpack("I")
        previous = None
        for i in range(count):
            r.where = f"variable #{i} (after {previous!r})" if previous else f"variable #{i}"
            name = r.string()
            r.where = f"variable {name!r}"
            (rank,) = r.unpack("B")
            shape = tuple(r.unpack(f"{rank}I")) if rank else ()
            if version >= 4:
                dtype_id, nbytes = r.unpack("BI")
                if dtype_id not in CT2_DTYPES:
                    raise Ct2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
            else:
                item_size, num_items = r.unpack("BI")
                if item_size not in _LEGACY_ITEM_SIZES:
                    raise Ct2FormatError(f"{path}: variable {name!r} has item size {item_size}")
                dtype_id, nbytes = _LEGACY_ITEM_SIZES[item_size], item_size * num_items
            expected = int(np.prod(shape, dtype=np.int64)) * CT2_DTYPES[dtype_id].itemsize
            if nbytes != expected:
                raise Ct2FormatError(
                    f"{path}: corrupt CTranslate2 file: variable {name!r} of shape {shape} and dtype "
                    f"{CT2_DTYPES[dtype_id]} declares {nbytes} bytes, expected {expected}"
                )
            offset = f.tell()
            if offset + nbytes > size:
                raise Ct2FormatError(
                    f"{path}: truncated CTranslate2 file: variable {name!r} needs bytes "
                    f"[{offset}, {offset + nbytes}) but the file has {size} bytes"
                )
            f.seek(nbytes, os.SEEK_CUR)
            variables[name] = Ct2Variable(name, shape, dtype_id, offset, nbytes)
            previous = name
        if version >= 3:
            r.where = "the alias table"
            (num_aliases,) = r.unpack("I")
            for _ in range(num_aliases):
                alias, target = r.string(), r.string()
                if target not in variables:
                    raise Ct2FormatError(f"{path}: alias {alias!r} points to unknown variable {target!r}")
                aliases[alias] = target
        if f.tell() != size:
            raise Ct2FormatError(
                f"{path}: corrupt CTranslate2 file: {size - f.tell()} unexpected trailing bytes after "
                "the alias table"
            )
    return Ct2Index(path, version, spec_name, spec_revision, variables, aliases, size)


def _raw(mm: np.ndarray, var: Ct2Variable) -> np.ndarray:
    a = mm[var.offset : var.offset + var.nbytes].view(var.dtype).reshape(var.shape)
    if var.dtype_id == _BFLOAT16_ID:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def read_ctranslate2(
    path: str | os.PathLike,
    *,
    prefix: str | Iterable[str] | None = None,
    dequantize: bool = True,
    index: Ct2Index | None = None,
) -> dict[str, np.ndarray]:
    """Read a CTranslate2 ``model.bin`` into ``{name: array}``.

    Float variables come back as float32 copies (independent of the file). Quantized int8/int16
    weights with a ``<name>_scale`` companion are dequantized to float32 (unless
    ``dequantize=False``, then both are returned raw). Integer spec constants keep their dtype.
    Aliases are included and share the array of their target. ``prefix`` limits the read to names
    starting with it (or any of several prefixes); aliases whose name matches are kept.
    """
    index = index or read_index(path)
    prefixes = (prefix,) if isinstance(prefix, str) else (tuple(prefix) if prefix else None)
    wanted = lambda n: prefixes is None or n.startswith(prefixes)  # noqa: E731
    mm = np.memmap(index.path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    try:
        names = [n for n in index.variables if wanted(n)]
        scales = {n[: -len("_scale")] for n in names if n.endswith("_scale")}
        for name in names:
            var = index.variables[name]
            if dequantize and name.endswith("_scale") and name[: -len("_scale")] in index.variables:
                continue
            a = _raw(mm, var)
            if var.dtype_id in (1, 2) and name in scales and dequantize:
                scale = _raw(mm, index.variables[name + "_scale"]).astype(np.float32)
                q = a.astype(np.float32)
                if scale.ndim == 1 and q.ndim >= 1 and scale.shape[0] == q.shape[0]:
                    scale = scale.reshape((-1,) + (1,) * (q.ndim - 1))
                out[name] = q / scale
            elif np.issubdtype(a.dtype, np.floating):
                out[name] = np.array(a, dtype=np.float32)
            else:
                out[name] = np.array(a)
        for alias, target in index.aliases.items():
            if wanted(alias) and target in out:
                out[alias] = out[target]
            elif wanted(alias):
                out[alias] = read_ctranslate2(index.path, prefix=target, index=index)[target]
    finally:
        del mm
    return out


# --- Whisper ----------------------------------------------------------------------------------------


def _layer_ids(variables: Mapping[str, Any], stack: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(stack)}/layer_(\d+)/")
    ids = sorted({int(m.group(1)) for n in variables if (m := pat.match(n))})
    if ids != list(range(len(ids))):
        raise Ct2FormatError(f"{stack} layers are not numbered 0..N-1: {ids}")
    return ids


def _get(variables: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return variables[name]
    except KeyError:
        raise Ct2FormatError(f"Whisper CTranslate2 variables lack {name!r}") from None


def _split_rows(a: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if a.shape[0] % parts:
        raise Ct2FormatError(f"{name}: {a.shape[0]} rows cannot be split into {parts} equal parts")
    return [np.ascontiguousarray(x) for x in np.split(a, parts, axis=0)]


def _linear(out: dict, hf: str, variables: Mapping[str, np.ndarray], ct2: str, bias: bool = True) -> None:
    out[f"{hf}.weight"] = _get(variables, f"{ct2}/weight")
    if bias:
        out[f"{hf}.bias"] = _get(variables, f"{ct2}/bias")


def _layer_norm(out: dict, hf: str, variables: Mapping[str, np.ndarray], ct2: str) -> None:
    out[f"{hf}.weight"] = _get(variables, f"{ct2}/gamma")
    out[f"{hf}.bias"] = _get(variables, f"{ct2}/beta")


def _fused(out: dict, hf_names: list[str], variables: Mapping[str, np.ndarray], ct2: str) -> None:
    """Split a fused [q;k;v] or [k;v] linear into HF projections; k_proj gets no bias."""
    ws = _split_rows(_get(variables, f"{ct2}/weight"), len(hf_names), f"{ct2}/weight")
    bs = _split_rows(_get(variables, f"{ct2}/bias"), len(hf_names), f"{ct2}/bias")
    for hf, w, b in zip(hf_names, ws, bs):
        out[f"{hf}.weight"] = w
        if not hf.endswith("k_proj"):
            out[f"{hf}.bias"] = b


def whisper_encoder_to_hf(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 ``encoder/...`` variables -> ``transformers.WhisperEncoder`` state dict (numpy)."""
    out: dict[str, np.ndarray] = {}
    for i in (1, 2):
        _linear(out, f"conv{i}", variables, f"encoder/conv{i}")
    out["embed_positions.weight"] = _get(variables, "encoder/position_encodings/encodings")
    layers = _layer_ids(variables, "encoder")
    if not layers:
        raise Ct2FormatError("no encoder/layer_N variables: not a Whisper CTranslate2 model?")
    for n in layers:
        src, dst = f"encoder/layer_{n}", f"layers.{n}"
        _fused(out, [f"{dst}.self_attn.{p}_proj" for p in "qkv"], variables, f"{src}/self_attention/linear_0")
        _linear(out, f"{dst}.self_attn.out_proj", variables, f"{src}/self_attention/linear_1")
        _layer_norm(out, f"{dst}.self_attn_layer_norm", variables, f"{src}/self_attention/layer_norm")
        _linear(out, f"{dst}.fc1", variables, f"{src}/ffn/linear_0")
        _linear(out, f"{dst}.fc2", variables, f"{src}/ffn/linear_1")
        _layer_norm(out, f"{dst}.final_layer_norm", variables, f"{src}/ffn/layer_norm")
    _layer_norm(out, "layer_norm", variables, "encoder/layer_norm")
    return out


def whisper_decoder_to_hf(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 ``decoder/...`` variables -> ``transformers.WhisperDecoder`` state dict (numpy)."""
    if int(np.asarray(variables.get("decoder/scale_embeddings", 0))) != 0:
        raise Ct2FormatError("decoder/scale_embeddings is set; HF Whisper does not scale embeddings")
    out: dict[str, np.ndarray] = {}
    out["embed_tokens.weight"] = _get(variables, "decoder/embeddings/weight")
    out["embed_positions.weight"] = _get(variables, "decoder/position_encodings/encodings")
    for n in _layer_ids(variables, "decoder"):
        src, dst = f"decoder/layer_{n}", f"layers.{n}"
        _fused(out, [f"{dst}.self_attn.{p}_proj" for p in "qkv"], variables, f"{src}/self_attention/linear_0")
        _linear(out, f"{dst}.self_attn.out_proj", variables, f"{src}/self_attention/linear_1")
        _layer_norm(out, f"{dst}.self_attn_layer_norm", variables, f"{src}/self_attention/layer_norm")
        _linear(out, f"{dst}.encoder_attn.q_proj", variables, f"{src}/attention/linear_0")
        _fused(out, [f"{dst}.encoder_attn.{p}_proj" for p in "kv"], variables, f"{src}/attention/linear_1")
        _linear(out, f"{dst}.encoder_attn.out_proj", variables, f"{src}/attention/linear_2")
        _layer_norm(out, f"{dst}.encoder_attn_layer_norm", variables, f"{src}/attention/layer_norm")
        _linear(out, f"{dst}.fc1", variables, f"{src}/ffn/linear_0")
        _linear(out, f"{dst}.fc2", variables, f"{src}/ffn/linear_1")
        _layer_norm(out, f"{dst}.final_layer_norm", variables, f"{src}/ffn/layer_norm")
    _layer_norm(out, "layer_norm", variables, "decoder/layer_norm")
    return out


def whisper_to_hf(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All variables -> ``transformers.WhisperForConditionalGeneration`` state dict (numpy).

    ``proj_out.weight`` is the decoder embedding (tied, as in the CTranslate2 alias).
    """
    out = {f"model.encoder.{k}": v for k, v in whisper_encoder_to_hf(variables).items()}
    out.update({f"model.decoder.{k}": v for k, v in whisper_decoder_to_hf(variables).items()})
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def whisper_hf_config(
    variables: Mapping[str, np.ndarray], config_json: Mapping[str, Any] | str | os.PathLike | None = None
) -> dict[str, Any]:
    """``transformers.WhisperConfig`` keyword arguments, from the tensor shapes and spec constants.

    Decoder entries are included when decoder variables are present. ``config_json`` (the
    CTranslate2 ``config.json``, a dict or a path) adds the suppress / alignment-head lists.
    """
    conv1 = _get(variables, "encoder/conv1/weight")
    enc_layers = _layer_ids(variables, "encoder")
    cfg: dict[str, Any] = {
        "model_type": "whisper",
        "d_model": int(conv1.shape[0]),
        "num_mel_bins": int(conv1.shape[1]),
        "encoder_layers": len(enc_layers),
        "encoder_attention_heads": int(np.asarray(_get(variables, "encoder/num_heads"))),
        "encoder_ffn_dim": int(_get(variables, "encoder/layer_0/ffn/linear_0/weight").shape[0]),
        "max_source_positions": int(_get(variables, "encoder/position_encodings/encodings").shape[0]),
        "activation_function": "gelu",
    }
    if "decoder/embeddings/weight" in variables:
        dec_layers = _layer_ids(variables, "decoder")
        act = int(np.asarray(variables.get("decoder/activation", 3)))
        cfg.update(
            vocab_size=int(variables["decoder/embeddings/weight"].shape[0]),
            decoder_layers=len(dec_layers),
            decoder_attention_heads=int(np.asarray(_get(variables, "decoder/num_heads"))),
            decoder_ffn_dim=int(_get(variables, "decoder/layer_0/ffn/linear_0/weight").shape[0]),
            max_target_positions=int(_get(variables, "decoder/position_encodings/encodings").shape[0]),
            activation_function=CT2_ACTIVATIONS.get(act, "gelu"),
            tie_word_embeddings=True,
        )
    if config_json is not None:
        if not isinstance(config_json, Mapping):
            config_json = json.loads(pathlib.Path(config_json).read_text())
        if "suppress_ids" in config_json:
            cfg["suppress_tokens"] = list(config_json["suppress_ids"])
        if "suppress_ids_begin" in config_json:
            cfg["begin_suppress_tokens"] = list(config_json["suppress_ids_begin"])
        if "alignment_heads" in config_json:
            cfg["alignment_heads"] = [list(x) for x in config_json["alignment_heads"]]
        if "lang_ids" in config_json:
            cfg["lang_ids"] = list(config_json["lang_ids"])
    return cfg


def load_whisper_encoder_hf(
    path: str | os.PathLike, config_json: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read only the encoder of a CTranslate2 Whisper ``model.bin``: (HF state dict, config dict)."""
    index = read_index(path)
    if index.spec_name and index.spec_name != "WhisperSpec":
        raise Ct2FormatError(f"{path}: spec {index.spec_name!r} is not WhisperSpec")
    variables = read_ctranslate2(path, prefix="encoder/", index=index)
    return whisper_encoder_to_hf(variables), whisper_hf_config(variables, config_json)


def whisper_encoder_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The HF ``WhisperEncoder`` state dict (float32 numpy) of a CTranslate2 Whisper ``model.bin``."""
    return load_whisper_encoder_hf(path)[0]


def load_whisper_hf(
    path: str | os.PathLike, config_json: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Whole CTranslate2 Whisper -> (``WhisperForConditionalGeneration`` state dict, config dict)."""
    index = read_index(path)
    if index.spec_name and index.spec_name != "WhisperSpec":
        raise Ct2FormatError(f"{path}: spec {index.spec_name!r} is not WhisperSpec")
    variables = read_ctranslate2(path, index=index)
    return whisper_to_hf(variables), whisper_hf_config(variables, config_json)
