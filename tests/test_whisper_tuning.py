"""LoRA factors on a frozen decoder (models/lora.py), their training on transcripts
(whisper_tuning.py), the front end that loads them, and slm-tune-whisper's refusals."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.weights import frozen
from slm_jax.contrib.whisper_cascade import tuning as whisper_tuning
from slm_jax.contrib.whisper_cascade import lora
from slm_jax.contrib.whisper_cascade.whisper_decoder import WhisperDecoderConfig
from slm_jax.models.encoders.whisper import WhisperEncoderConfig
from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriber, WhisperTranscriberConfig

VOCAB = 64
EOT, SOT, ENGLISH, TRANSCRIBE = VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1
SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A word-level tokenizer over the tiny vocabulary ("w7" is token 7) stands in for Whisper's."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(EOT)}, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def tiny_config(tokenizer_json, **overrides):
    fields = dict(
        encoder=WhisperEncoderConfig(num_mel_bins=80, d_model=64, num_layers=1, num_heads=4, ffn_dim=128,
                                     max_source_positions=64),
        decoder=WhisperDecoderConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, ffn_dim=128,
                                     max_target_positions=32),
        language_ids=(ENGLISH,), task_ids=(TRANSCRIBE,), start_of_transcript=SOT, end_of_text=EOT,
        max_new_tokens=8, trailing_silence_frames=0, stop_on_repeated_ngram=0, whisper_tokenizer=tokenizer_json)
    return WhisperTranscriberConfig(**{**fields, **overrides})


def init_params(cfg, seed=0):
    features = jnp.zeros((1, 100, 80), jnp.float32)
    import flax.linen as nn

    variables = WhisperTranscriber(cfg).init(jax.random.PRNGKey(seed), features, jnp.ones((1, 100), jnp.int32))
    return nn.unbox(variables["params"])


def utterance(seed, seconds=0.8):
    """Distinct audio per seed: a chord of two tones in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f1, f2 = rng.uniform(200, 2000, size=2)
    return (0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t)
            + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def greedy_tokens(cfg, params, audio_samples):
    from slm_jax.data import audio

    features = audio.log_mel_spectrogram(audio_samples)[None]
    t = WhisperTranscriber(cfg).apply({"params": params}, features, method=WhisperTranscriber.transcribe)
    return np.asarray(t.tokens[0, :int(t.mask[0].sum())]).tolist()


# --- the factors ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_untrained_factors_leave_the_decoder_exactly_as_it_was(tokenizer_json):
    params = init_params(tiny_config(tokenizer_json))["decoder"]
    paths = lora.target_paths(params, "layers_", whisper_tuning.WhisperTuningConfig().modules)
    assert len(paths) == 2 * 10  # two layers, 8 attention projections and 2 MLP kernels each
    merged = lora.merge(params, lora.init(params, paths, 4, jax.random.PRNGKey(0)), scale=2.0)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


@pytest.mark.parametrize("path", ["layers_1/self_attn/query", "layers_0/encoder_attn/out", "layers_1/mlp/wi"])
def test_a_merged_kernel_computes_the_frozen_layer_plus_the_scaled_low_rank_path(tokenizer_json, path):
    params = init_params(tiny_config(tokenizer_json))["decoder"]
    factors = lora.init(params, [path], 4, jax.random.PRNGKey(1))
    factors[path]["b"] = jax.random.normal(jax.random.PRNGKey(2), factors[path]["b"].shape)
    merged = lora.merge(params, factors, scale=0.5)
    node, merged_node = params, merged
    for key in path.split("/"):
        node, merged_node = node[key], merged_node[key]
    kernel, merged_kernel = np.asarray(node["kernel"]), np.asarray(merged_node["kernel"])
    fan_in = math.prod(kernel.shape[:lora.input_axes(path)])
    x = np.random.default_rng(3).normal(size=(5, fan_in)).astype(np.float32)
    a, b = np.asarray(factors[path]["a"]), np.asarray(factors[path]["b"])
    expected = x @ kernel.reshape(fan_in, -1) + 0.5 * (x @ a) @ b  # W x + scale * B A x
    np.testing.assert_allclose(x @ merged_kernel.reshape(fan_in, -1), expected, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(kernel, merged_kernel)
    # Every other kernel is the frozen one.
    other = "layers_0/self_attn/value"
    np.testing.assert_array_equal(merged["layers_0"]["self_attn"]["value"]["kernel"],
                                  params["layers_0"]["self_attn"]["value"]["kernel"])
    assert other not in factors


@pytest.mark.slow
def test_factors_save_and_load_and_bad_files_are_refused_by_name(tokenizer_json, tmp_path):
    params = init_params(tiny_config(tokenizer_json))["decoder"]
    paths = lora.target_paths(params, "layers_", ("self_attn/query", "mlp/wo"))
    factors = lora.init(params, paths, 3, jax.random.PRNGKey(0))
    sha = lora.save(tmp_path / "f.npz", factors, 2.0, {"steps": "7"})
    assert sha == lora.file_sha256(tmp_path / "f.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.npz").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600
    loaded, scale, meta = lora.load(tmp_path / "f.npz")
    assert scale == 2.0 and meta["steps"] == "7" and sorted(loaded) == sorted(paths)
    for path in paths:
        np.testing.assert_array_equal(loaded[path]["a"], factors[path]["a"])

    with pytest.raises(lora.LoraError, match="does not exist"):
        lora.load(tmp_path / "missing.npz")
    data = (tmp_path / "f.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(lora.LoraError, match="not a readable"):
        lora.load(tmp_path / "cut.npz")
    wider = init_params(tiny_config(tokenizer_json, decoder=dataclasses.replace(
        tiny_config(tokenizer_json).decoder, ffn_dim=256)))["decoder"]
    with pytest.raises(lora.LoraError, match="layers_0/mlp/wo"):
        lora.merge(wider, loaded, scale)
    with pytest.raises(lora.LoraError, match="no 'cross_attn'"):
        lora.target_paths(params, "layers_", ("cross_attn/query",))


# --- training on transcripts and the front end that loads the result ------------------------------

@pytest.mark.slow
def test_tuning_teaches_a_frozen_decoder_the_transcripts_and_the_front_end_writes_them(tokenizer_json, tmp_path):
    cfg = tiny_config(tokenizer_json, speeds=(1.0, 0.9))
    params = init_params(cfg)
    examples = [{"id": "a", "lang": "en", "text": "w7 w21 w3", "audio": utterance(0)},
                {"id": "b", "lang": "en", "text": "w5 w9", "audio": utterance(1)}]
    wanted = [[7, 21, 3, EOT], [5, 9, EOT]]
    assert [greedy_tokens(cfg, params, e["audio"]) for e in examples] != wanted  # random weights do not know them

    tuning = whisper_tuning.WhisperTuningConfig(rank=4, steps=60, batch_size=4, learning_rate=3e-2, warmup_steps=5,
                                                speed_copies=1)
    encoded = whisper_tuning.encode_examples(cfg, params, examples, tuning, languages={"en": ENGLISH})
    assert len(encoded) == 4  # each utterance as it is and at one other speed
    assert encoded[0].inputs.tolist() == [SOT, ENGLISH, TRANSCRIBE, 7, 21, 3]
    assert encoded[0].targets.tolist() == [ENGLISH, TRANSCRIBE, 7, 21, 3, EOT]
    whisper_tuning.save_examples(str(tmp_path / "encoded.npz"), encoded, key="this run")
    for again, first in zip(whisper_tuning.load_examples(str(tmp_path / "encoded.npz"), key="this run"), encoded):
        for x, y in zip(again, first):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="encoded for another front end"):
        whisper_tuning.load_examples(str(tmp_path / "encoded.npz"), key="another run")
    frozen_before = jax.device_get(params)
    losses = []
    factors = whisper_tuning.train(cfg, params, encoded, tuning, on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), frozen_before)  # frozen stays frozen

    lora.save(tmp_path / "lora.npz", factors, tuning.scale)
    tuned = dataclasses.replace(cfg, decoder_lora=str(tmp_path / "lora.npz"))
    merged = frozen.as_run(tuned, params)
    assert [greedy_tokens(cfg, merged, e["audio"]) for e in examples] == wanted
    assert frozen.as_run(cfg, params) is params  # no LoRA: the weights as loaded

    with pytest.raises(frozen.FrozenSourceError, match="decoder_lora.*does not exist"):
        frozen.as_run(dataclasses.replace(cfg, decoder_lora=str(tmp_path / "gone.npz")), params)


def test_a_transcript_too_long_for_the_decoder_and_an_unknown_language_are_refused(tokenizer_json):
    cfg = tiny_config(tokenizer_json)
    with pytest.raises(ValueError, match="does not fit Whisper's 32 positions"):
        whisper_tuning.transcript_sequence(cfg, " ".join(["w1"] * 40), ENGLISH)
    with pytest.raises(ValueError, match="no language token for 'xx'"):
        whisper_tuning.language_token(cfg, "xx")


def test_the_front_end_cache_key_follows_the_lora_files_content(tokenizer_json, tmp_path):
    from types import SimpleNamespace

    from slm_jax.data.cached.corpus_data import front_end_fingerprint

    cfg = tiny_config(tokenizer_json)
    params = init_params(cfg)["decoder"]
    paths = lora.target_paths(params, "layers_", ("self_attn/query",))
    path = tmp_path / "lora.npz"
    spec = lambda c: SimpleNamespace(speech_encoder=c, speech_encoder_source="package:whisper-base")  # noqa: E731
    lora.save(path, lora.init(params, paths, 2, jax.random.PRNGKey(0)), 2.0)
    first = front_end_fingerprint(spec(dataclasses.replace(cfg, decoder_lora=str(path))))
    lora.save(path, lora.init(params, paths, 2, jax.random.PRNGKey(1)), 2.0)  # trained again, same path
    second = front_end_fingerprint(spec(dataclasses.replace(cfg, decoder_lora=str(path))))
    assert len({first, second, front_end_fingerprint(spec(cfg))}) == 3
    path.unlink()
    with pytest.raises(lora.LoraError, match="does not exist"):
        front_end_fingerprint(spec(dataclasses.replace(cfg, decoder_lora=str(path))))


# --- the command line ----------------------------------------------------------------------------

@pytest.fixture
def tones_corpus():
    from corpus_fixture import small_corpus

    return small_corpus()


def test_tune_whisper_refuses_a_front_end_without_a_whisper_decoder(tmp_path, capsys, tones_corpus):
    from slm_jax.contrib.whisper_cascade import tune_cli as tune_whisper

    code = tune_whisper.main(["--gin_file=tiny.gin", f"--corpus_dir={tones_corpus}", f"--out={tmp_path / 'l.npz'}"])
    assert code == 2
    assert "not a WhisperTranscriberConfig" in capsys.readouterr().err
    assert not (tmp_path / "l.npz").exists()


def test_tune_whisper_keeps_an_existing_file_and_names_an_unknown_task(tmp_path, capsys, tones_corpus):
    from slm_jax.contrib.whisper_cascade import tune_cli as tune_whisper

    out = tmp_path / "l.npz"
    out.write_bytes(b"an earlier run's factors")
    gin_file = "--gin_file=whisper_base_transcriber_smollm2.gin"
    assert tune_whisper.main([gin_file, f"--corpus_dir={tones_corpus}", f"--out={out}"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier run's factors"
    assert tune_whisper.main([gin_file, f"--corpus_dir={tones_corpus}", f"--out={tmp_path / 'new.npz'}",
                              "--tasks=asr_xx"]) == 2
    assert "unknown --tasks asr_xx" in capsys.readouterr().err
