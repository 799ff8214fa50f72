"""GGUF (llama.cpp) -> Hugging Face Llama-layout numpy state dict + ``LlamaConfig``-like dict.

The header, metadata and tensor table are parsed here (a small, fast reader: the 49k-entry
tokenizer arrays of SmolLM2 take ~0.1 s, against ~2 s for ``gguf.GGUFReader``); tensor data is
read from a memory map one tensor at a time and dequantized with ``gguf.quants.dequantize`` (F32,
F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and the rest that ``gguf`` implements).
``iter_tensors`` yields one float32 tensor at a time, so a large model never sits in memory twice.

Layout notes:
  * GGUF lists dims fastest-first (``ne[0]`` = input features); arrays here are numpy/PyTorch
    order, so a linear weight comes out as (out, in) like ``torch.nn.Linear.weight``.
  * llama.cpp's converter permutes the rows of Llama ``q_proj`` / ``k_proj`` (and their biases)
    from the Hugging Face rotate-half layout to interleaved-pair rotary layout:
    per head, rows ``[0..d/2) , [d/2..d)`` become ``0, d/2, 1, d/2+1, ...``. ``unpermute_rotary``
    undoes it (``k_proj`` uses the kv-head count).
  * A GGUF without ``output.weight`` ties the LM head to ``token_embd``: the state dict then has no
    ``lm_head.weight`` (as ``transformers``' GGUF loader) unless ``include_tied_lm_head=True``,
    and the config says ``tie_word_embeddings=True``.
  * Float metadata are stored as float32; they are returned as the shortest decimal that rounds to
    the same float32 (``1e-05`` rather than ``9.999999747378752e-06``).

HF names produced (N = layer)::

    model.embed_tokens.weight                     token_embd.weight
    model.layers.N.input_layernorm.weight         blk.N.attn_norm.weight
    model.layers.N.self_attn.q_proj.weight        blk.N.attn_q.weight     (un-permuted)
    model.layers.N.self_attn.k_proj.weight        blk.N.attn_k.weight     (un-permuted)
    model.layers.N.self_attn.v_proj.weight        blk.N.attn_v.weight
    model.layers.N.self_attn.o_proj.weight        blk.N.attn_output.weight
    model.layers.N.post_attention_layernorm.weight blk.N.ffn_norm.weight
    model.layers.N.mlp.gate_proj.weight           blk.N.ffn_gate.weight
    model.layers.N.mlp.up_proj.weight             blk.N.ffn_up.weight
    model.layers.N.mlp.down_proj.weight           blk.N.ffn_down.weight
    model.norm.weight                             output_norm.weight
    lm_head.weight                                output.weight (absent when tied)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import struct
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np

from slm_jax.weights.convert.errors import ConversionError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Bump when the conversion changes, so stale .npz caches are not reused.
CONVERTER_VERSION = 1

# GGUF metadata value types.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_FORMATS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


class GgufFormatError(ConversionError):
    """A GGUF file is truncated, corrupt, or holds something this converter does not support."""


@dataclasses.dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): reversed GGUF ``ne``
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


@dataclasses.dataclass(frozen=True)
class GgufFile:
    path: pathlib.Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _f32_value(x: float) -> float:
    """The shortest decimal that rounds to the same float32."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


class _Cursor:
    def __init__(self, buf, path: pathlib.Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.where = "the header"

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GgufFormatError(
                f"{self.path}: truncated GGUF: needed {n} bytes at offset {self.pos} while reading "
                f"{self.where}, but the file has {len(self.buf)} bytes"
            )

    def unpack(self, fmt: str):
        fmt = "<" + fmt
        n = struct.calcsize(fmt)
        self._need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        (n,) = self.unpack("Q")
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            (etype, count) = self.unpack("IQ")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            if etype not in _NUMPY_FORMATS:
                raise GgufFormatError(f"{self.path}: unknown array type {etype} in {self.where}")
            dt = np.dtype(_NUMPY_FORMATS[etype])
            self._need(dt.itemsize * count)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += dt.itemsize * count
            return arr.tolist()
        if vtype not in _SCALAR_FORMATS:
            raise GgufFormatError(f"{self.path}: unknown metadata value type {vtype} in {self.where}")
        (v,) = self.unpack(_SCALAR_FORMATS[vtype])
        return _f32_value(v) if vtype == _FLOAT32 else v


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int, name: str, path) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GgufFormatError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    cols = shape[-1] if shape else 1
    if cols % block:
        raise GgufFormatError(f"{path}: tensor {name!r}: row of {cols} not a multiple of {qtype.name} block {block}")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * (cols // block) * type_size


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Parse header, metadata and tensor table (no tensor data is read)."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    try:
        c = _Cursor(memoryview(mm), path)
        c._need(4)
        magic = bytes(c.buf[0:4])
        c.pos = 4
        if magic != GGUF_MAGIC:
            raise GgufFormatError(f"{path}: not a GGUF file (magic {magic!r})")
        (version,) = c.unpack("I")
        if version not in (2, 3):
            hint = " (big-endian GGUF is not supported)" if version > 0xFFFF else ""
            raise GgufFormatError(f"{path}: unsupported GGUF version {version}{hint}")
        n_tensors, n_kv = c.unpack("QQ")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            c.where = f"metadata entry #{i}"
            key = c.string()
            c.where = f"metadata {key!r}"
            (vtype,) = c.unpack("I")
            metadata[key] = c.value(vtype)
        infos = []
        for i in range(n_tensors):
            c.where = f"tensor info #{i}"
            name = c.string()
            c.where = f"tensor info {name!r}"
            (n_dims,) = c.unpack("I")
            ne = c.unpack(f"{n_dims}Q") if n_dims else ()
            ggml_type, rel = c.unpack("IQ")
            infos.append((name, tuple(int(d) for d in reversed(ne)), int(ggml_type), int(rel)))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_offset = -(-c.pos // alignment) * alignment
    finally:
        del mm
    tensors: dict[str, GgufTensorInfo] = {}
    for name, shape, ggml_type, rel in infos:
        nbytes = _tensor_nbytes(shape, ggml_type, name, path)
        offset = data_offset + rel
        if offset + nbytes > size:
            raise GgufFormatError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes [{offset}, {offset + nbytes}) "
                f"but the file has {size} bytes"
            )
        tensors[name] = GgufTensorInfo(name, shape, ggml_type, offset, nbytes)
    return GgufFile(path, version, metadata, tensors, alignment, data_offset, size)


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return read_gguf(path).metadata


def dequantize_tensor(mm: np.ndarray, info: GgufTensorInfo) -> np.ndarray:
    """One tensor's bytes (from a uint8 memmap of the file) -> float32 array of ``info.shape``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = mm[info.offset : info.offset + info.nbytes]
    shape = info.shape or (1,)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = raw.reshape(rows, -1)
    try:
        out = dequantize(raw, GGMLQuantizationType(info.ggml_type))
    except NotImplementedError as e:
        raise GgufFormatError(f"tensor {info.name!r}: {e}") from None
    return np.array(out, dtype=np.float32, copy=True).reshape(info.shape)


def iter_gguf_tensors(path: str | os.PathLike, gf: GgufFile | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(gguf_name, float32 array)`` in file order, one tensor at a time (GGUF names/layout)."""
    gf = gf or read_gguf(path)
    mm = np.memmap(gf.path, dtype=np.uint8, mode="r")
    try:
        for info in gf.tensors.values():
            yield info.name, dequantize_tensor(mm, info)
    finally:
        del mm


# --- Llama -------------------------------------------------------------------------------------------

LLAMA_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_llama_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF ``LlamaForCausalLM`` state-dict key (``GgufFormatError`` if unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise GgufFormatError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order (what llama.cpp's converter does)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``permute_rotary``: llama.cpp q/k rows (or biases) -> HF order."""
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise GgufFormatError(f"cannot un-permute {w.shape[0]} rows over {n_heads} heads")
    head_dim = w.shape[0] // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama_config(gf: GgufFile | str | os.PathLike) -> dict[str, Any]:
    """``transformers.LlamaConfig`` keyword arguments from GGUF metadata (and the tensor table)."""
    if not isinstance(gf, GgufFile):
        gf = read_gguf(gf)
    md, arch = gf.metadata, gf.architecture
    if arch not in LLAMA_ARCHITECTURES:
        raise GgufFormatError(f"{gf.path}: architecture {arch!r} is not Llama")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            if required:
                raise GgufFormatError(f"{gf.path}: metadata {full!r} is missing")
            return default
        return md[full]

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GgufFormatError(f"{gf.path}: partial rotary ({rope_dim} of {head_dim} dims) is not Llama")
    if "rope_freqs.weight" in gf.tensors:
        raise GgufFormatError(f"{gf.path}: llama3-style rope_freqs tensors are not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    embd = gf.tensors.get("token_embd.weight")
    vocab = get("vocab_size") or (len(tokens) if tokens else None) or (embd.shape[0] if embd else None)
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    n_layers = int(get("block_count", required=True))
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in gf.tensors,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"), ("unk_token_id", "unknown")):
        value = md.get(f"tokenizer.ggml.{name}_token_id")
        cfg[key] = int(value) if value is not None else None
    cfg["add_bos_token"] = bool(md.get("tokenizer.ggml.add_bos_token", False))
    present = {int(m.group(1)) for n in gf.tensors if (m := _BLOCK.match(n))}
    if present != set(range(n_layers)):
        raise GgufFormatError(f"{gf.path}: block_count {n_layers} but tensors for blocks {sorted(present)}")
    return cfg


def iter_tensors(
    path: str | os.PathLike,
    *,
    gf: GgufFile | None = None,
    include_tied_lm_head: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` one tensor at a time, q/k un-permuted (HF Llama layout).

    With ``include_tied_lm_head`` a tied model also yields ``lm_head.weight`` (a copy of the
    embedding, after it).
    """
    gf = gf or read_gguf(path)
    cfg = llama_config(gf)
    for gguf_name, w in iter_gguf_tensors(gf.path, gf):
        if gguf_name == "rope_freqs.weight":
            continue
        name = hf_llama_name(gguf_name)
        if ".self_attn.q_proj." in name:
            w = unpermute_rotary(w, cfg["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            w = unpermute_rotary(w, cfg["num_key_value_heads"])
        yield name, w
        if include_tied_lm_head and cfg["tie_word_embeddings"] and name == "model.embed_tokens.weight":
            yield "lm_head.weight", w.copy()


def load_llama(
    path: str | os.PathLike, *, include_tied_lm_head: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(HF Llama state dict of float32 numpy arrays, ``LlamaConfig``-like dict) from a GGUF."""
    gf = read_gguf(path)
    cfg = llama_config(gf)
    sd = dict(iter_tensors(path, gf=gf, include_tied_lm_head=include_tied_lm_head))
    return sd, cfg


# --- .npz cache ----------------------------------------------------------------------------------------

_CONFIG_KEY = "__config_json__"


def _write_npz_streaming(dest: pathlib.Path, items: Iterator[tuple[str, np.ndarray]], config: Mapping) -> None:
    """Write arrays one by one into an uncompressed .npz (atomic), never holding them all."""
    from slm_jax.weights.assets import atomic_output

    with atomic_output(dest, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in items:
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
            with zf.open(_CONFIG_KEY + ".npy", "w") as f:
                np.lib.format.write_array(f, np.array(json.dumps(dict(config), sort_keys=True)), allow_pickle=False)


def mmap_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map every array of an uncompressed .npz (copy-on-write: writable, pages shared).

    Much faster than ``np.load`` (no copy, no CRC pass); falls back to ``np.load`` for compressed
    members. The arrays stay valid after the file is replaced (the old inode lives on).
    """
    path = pathlib.Path(path)
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[key] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise GgufFormatError(f"{path}: bad zip local header for {info.filename!r}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise GgufFormatError(f"{path}: object array {key!r} in cache")
            offset = f.tell()
            if f.tell() - start + dtype.itemsize * int(np.prod(shape, dtype=np.int64)) > info.file_size:
                raise GgufFormatError(f"{path}: member {info.filename!r} is truncated")
            if int(np.prod(shape, dtype=np.int64)) == 0:
                out[key] = np.zeros(shape, dtype)
            else:
                mm = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape,
                               order="F" if fortran else "C")
                out[key] = mm.view(np.ndarray)
    return out


def cached_npz_path(source_sha256: str, cache: str | os.PathLike | None = None) -> pathlib.Path:
    from slm_jax.weights.assets import cache_dir

    root = pathlib.Path(cache) if cache is not None else cache_dir() / "gguf"
    return root / f"llama-{source_sha256}-v{CONVERTER_VERSION}.npz"


def load_llama_cached(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    cache: str | os.PathLike | None = None,
    include_tied_lm_head: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``load_llama`` through an .npz cache keyed by the GGUF's SHA-256 (computed unless given).

    The first call converts and writes the cache (streaming); later calls read the .npz. A cache
    that cannot be read is rebuilt.
    """
    from slm_jax.weights.assets import sha256_file

    sha256 = sha256 or sha256_file(path)
    npz = cached_npz_path(sha256, cache)
    if npz.is_file():
        try:
            arrays = mmap_npz(npz)
            cfg = json.loads(str(arrays.pop(_CONFIG_KEY)[()]))
            sd = arrays
            if include_tied_lm_head and cfg.get("tie_word_embeddings") and "lm_head.weight" not in sd:
                sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
            return sd, cfg
        except Exception as e:  # corrupt / partial cache: rebuild
            log.warning("cannot read cache %s (%s); rebuilding it", npz, e)
    gf = read_gguf(path)
    cfg = llama_config(gf)
    _write_npz_streaming(npz, iter_tensors(path, gf=gf), cfg)
    return load_llama_cached(path, sha256=sha256, cache=cache, include_tied_lm_head=include_tied_lm_head)


def load_smollm2(*, include_tied_lm_head: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The packaged SmolLM2-135M-Instruct (hash-checked), via the .npz cache."""
    from slm_jax.weights import assets

    path = assets.smollm2_gguf_path()
    return load_llama_cached(path, sha256=assets.SMOLLM2_GGUF_SHA256, include_tied_lm_head=include_tied_lm_head)


def load_state_dict(path: str | os.PathLike, *, cache: bool = True) -> dict[str, np.ndarray]:
    """Only the HF Llama state dict of a GGUF (through the .npz cache unless ``cache=False``)."""
    return (load_llama_cached(path) if cache else load_llama(path))[0]
