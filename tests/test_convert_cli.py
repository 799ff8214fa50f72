"""slm-convert and the 'hf:DIR' / 'converted:DIR' frozen sources: tiny random Hugging Face
checkpoints saved to disk, loaded tensor by tensor into a sharded (data=2, model=4) mesh."""

from __future__ import annotations

import dataclasses
import json

import gin
import jax
import numpy as np
import pytest
import torch
import transformers

from slm_jax.parallel import partitioning
from slm_jax.cli import convert as convert_cli
from slm_jax.weights.convert import converted, hf_llama, hf_whisper
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.weights.frozen import FrozenSourceError, load_frozen_params, load_on_host
from slm_jax.data.synthetic import SyntheticData
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer
from tiny_models import FEATURE_LENGTHS, VOCAB, llm_config, model_spec


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """HF checkpoints with the shapes of tiny_models' Whisper encoder and Llama (sharded save)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama", max_shard_size="20KB")
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=8, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=64, max_source_positions=64,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    whisper.save_pretrained(root / "whisper")
    return {"llama": str(root / "llama"), "whisper": str(root / "whisper")}


@pytest.fixture(scope="module")
def converted_llama(hf_dirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "llama")
    assert convert_cli.main([f"--hf_dir={hf_dirs['llama']}", f"--out={out}"]) == 0
    return out


def _load(spec):
    mesh = partitioning.make_mesh(data=2, model=4, devices=jax.devices()[:8])
    optimizer, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=2)
    trainer = Trainer(spec.build(), optimizer, schedule, mesh)
    example = SyntheticData(FEATURE_LENGTHS, VOCAB, seed=0).batch(8, 0)
    return load_frozen_params(trainer, spec, example), trainer.param_shardings(example)


def _assert_equal_trees(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w), got, want)


def test_hf_and_converted_sources_load_into_their_shardings(hf_dirs, converted_llama):
    spec = dataclasses.replace(model_spec("llama"), speech_encoder_source=f"hf:{hf_dirs['whisper']}",
                               llm_source=f"converted:{converted_llama}")
    frozen, shardings = _load(spec)
    _, want_llm = hf_llama.load_checkpoint(hf_dirs["llama"])
    _, want_encoder = hf_whisper.load_whisper_encoder(hf_dirs["whisper"])
    _assert_equal_trees(frozen["llm"], want_llm)
    _assert_equal_trees(frozen["speech_encoder"], want_encoder)
    for name in ("llm", "speech_encoder"):
        jax.tree.map(lambda x, s: (x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding))),
                     frozen[name], shardings[name])
    # The model axis really splits the loaded weights (8 query heads over 4 devices).
    query = frozen["llm"]["layers_0"]["self_attention"]["query"]["kernel"]
    assert query.addressable_shards[0].data.shape == (32, 2, 8)

    spec = dataclasses.replace(spec, llm_source=f"hf:{hf_dirs['llama']}")
    _assert_equal_trees(_load(spec)[0]["llm"], want_llm)


def test_load_on_host_reads_one_model_without_a_trainer(hf_dirs):
    _, want_encoder = hf_whisper.load_whisper_encoder(hf_dirs["whisper"])
    got = load_on_host(model_spec("llama").speech_encoder, f"hf:{hf_dirs['whisper']}")
    _assert_equal_trees(got, want_encoder)
    for bad in ("random:0", "hf:", "converted:/x"):
        with pytest.raises(FrozenSourceError, match=f"bad source '{bad}'"):
            load_on_host(model_spec("llama").speech_encoder, bad)


def test_convert_writes_config_json_and_gin_bindings(converted_llama, capsys):
    meta = json.loads(open(f"{converted_llama}/slm_convert.json").read())
    assert meta["family"] == "llama" and meta["config"]["num_layers"] == 2
    gin.clear_config()
    from slm_jax import gin_registry  # noqa: F401

    gin.parse_config_file(f"{converted_llama}/model.gin")
    assert gin.query_parameter("LlamaConfig.hidden_size") == 32
    assert gin.query_parameter("LlamaConfig.tie_word_embeddings") is True
    gin.clear_config()


def test_converted_source_rejects_a_different_architecture(converted_llama):
    # The checks come before anything is read, so no restore target is needed.
    wider = dataclasses.replace(llm_config("llama"), intermediate_size=128)
    with pytest.raises(ConversionError, match="intermediate_size=64 but the configured model has 128"):
        converted.restore(converted_llama, wider, None)
    with pytest.raises(ConversionError, match="holds a converted llama model but the configured one is t5"):
        converted.restore(converted_llama, llm_config("t5"), None)
    with pytest.raises(FrozenSourceError, match="bad source 'converted:' for speech_encoder"):
        _load(dataclasses.replace(model_spec("llama"), speech_encoder_source="converted:"))


def _cli_error(capsys, *args) -> str:
    assert convert_cli.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(hf_dirs, converted_llama, tmp_path, capsys):
    (tmp_path / "bart").mkdir()
    (tmp_path / "bart" / "config.json").write_text(json.dumps({"model_type": "bart"}))
    hf_dirs_bart = tmp_path / "bart"
    (hf_dirs_bart / "model.safetensors").write_bytes(open(f"{hf_dirs['whisper']}/model.safetensors", "rb").read())
    err = _cli_error(capsys, f"--hf_dir={hf_dirs_bart}", f"--out={tmp_path / 'o'}")
    assert err.startswith("slm-convert: error: unknown architecture: model_type='bart'")
    err = _cli_error(capsys, f"--hf_dir={hf_dirs['llama']}", f"--out={converted_llama}")
    assert "already holds a converted checkpoint" in err
    err = _cli_error(capsys, f"--hf_dir={tmp_path}", f"--out={tmp_path / 'o'}")
    assert "neither model.safetensors nor model.safetensors.index.json" in err


def test_help_names_every_family(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("whisper", "mt5", "qwen2", "gemma", "converted:OUT"))
