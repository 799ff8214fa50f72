"""WhisperDecoder / WhisperTranscriber (the front end that runs all of Whisper) vs Hugging Face's
PyTorch Whisper with the same weights, the converter, and the trailing silence."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.contrib.whisper_cascade import convert as hf_whisper_transcriber
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.contrib.whisper_cascade.whisper_decoder import WhisperDecoderConfig
from slm_jax.contrib.whisper_cascade.front_end import (
    WhisperTranscriber,
    WhisperTranscriberConfig,
    append_silence,
    change_speed,
)
from slm_jax.inference.processors import repeats_an_earlier_ngram
from slm_jax.models.front_end import NO_TOKEN, SpeechRows

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 64
# Special tokens at the top of the tiny vocabulary, in Whisper's order (end-of-text first).
EOT, SOT, LANGUAGES, TASK = VOCAB - 6, VOCAB - 5, (VOCAB - 4, VOCAB - 3), (VOCAB - 2, VOCAB - 1)
TINY_HF = dict(
    vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=64,
    max_target_positions=32, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT,
)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY_HF)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF starts LayerNorms at 1/0 and biases at 0: perturb every tensor
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def tiny_config(hf_model, **overrides):
    cfg = hf_whisper_transcriber.config_from_hf(hf_model.config.to_dict())
    fields = dict(language_ids=LANGUAGES, task_ids=TASK, start_of_transcript=SOT, end_of_text=EOT,
                  max_new_tokens=10, trailing_silence_frames=0, stop_on_repeated_ngram=0)
    return dataclasses.replace(cfg, **{**fields, **overrides})


def state_dict(hf_model):
    return {k: v.numpy() for k, v in hf_model.state_dict().items()}


def hf_greedy(hf_model, features: np.ndarray, cfg) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The same rule as ours, written on transformers: language among cfg.language_ids, then
    argmax over non-special tokens until end-of-text; returns (tokens, the states that chose them,
    each token's log-probability among the non-special tokens)."""
    with torch.no_grad():
        memory = hf_model.model.encoder(torch.from_numpy(features).transpose(1, 2)).last_hidden_state

        def run(ids):
            out = hf_model(encoder_outputs=(memory,), decoder_input_ids=torch.tensor([ids]),
                           output_hidden_states=True)
            return out.logits[0, -1].numpy(), out.decoder_hidden_states[-1][0, -1].numpy()

        logits, _ = run([SOT])
        ids = [SOT, cfg.language_ids[int(np.argmax(logits[list(cfg.language_ids)]))], *cfg.task_ids]
        tokens, states, log_probs = [], [], []
        for _ in range(cfg.max_new_tokens):
            logits, state = run(ids + tokens)
            logits = torch.log_softmax(torch.from_numpy(logits[:cfg.end_of_text + 1]).double(), -1).numpy()
            tokens.append(int(np.argmax(logits)))
            states.append(state)
            log_probs.append(logits[tokens[-1]])
            if tokens[-1] == cfg.end_of_text:
                break
    return tokens, np.stack(states), np.asarray(log_probs)


@pytest.mark.slow
def test_decoder_matches_hugging_face_teacher_forced(hf_model):
    cfg = tiny_config(hf_model, encoder=dataclasses.replace(tiny_config(hf_model).encoder, mask_padding=False))
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 128, 80)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(2, 12)).astype(np.int32)
    model = WhisperTranscriber(cfg)

    def forward(module, x, t):
        memory, memory_mask = module.encoder(x)
        hidden, _ = module.decoder(t, memory, memory_mask)
        return hidden, module.decoder.logits(hidden)

    hidden, logits = model.apply({"params": params}, features, tokens, method=forward)
    with torch.no_grad():
        ref = hf_model(input_features=torch.from_numpy(features).transpose(1, 2),
                       decoder_input_ids=torch.from_numpy(tokens).long(), output_hidden_states=True)
    assert relative_error(hidden, ref.decoder_hidden_states[-1].numpy()) < 1e-5
    assert relative_error(logits, ref.logits.numpy()) < 1e-5


@pytest.mark.slow
def test_greedy_transcript_and_states_match_hugging_face(hf_model):
    lengths = []
    # Pulling the end-of-text embedding towards the final LayerNorm's bias (a part of every
    # state) makes random weights stop sooner; the scales give both endings: a transcript that
    # chose end-of-text and one cut at max_new_tokens.
    for scale in (0.0, 2.0, 8.0):
        model = copy.deepcopy(hf_model)
        with torch.no_grad():
            model.model.decoder.embed_tokens.weight[EOT] += scale * model.model.decoder.layer_norm.bias
        cfg = tiny_config(model, encoder=dataclasses.replace(tiny_config(model).encoder, mask_padding=False))
        params = hf_whisper_transcriber.params_from_state_dict(state_dict(model), cfg)
        for seed in range(1):
            features = np.random.default_rng(seed).normal(size=(1, 128, 80)).astype(np.float32)
            ours = WhisperTranscriber(cfg).apply({"params": params}, features, method=WhisperTranscriber.transcribe)
            ref_tokens, ref_states, ref_log_probs = hf_greedy(model, features, cfg)
            n = int(ours.mask[0].sum())
            assert n == len(ref_tokens)
            assert np.asarray(ours.tokens[0, :n]).tolist() == ref_tokens
            assert relative_error(ours.states[0, :n], ref_states) < 1e-5
            assert relative_error(ours.log_probs[0, :n], ref_log_probs) < 1e-5
            assert not np.any(np.asarray(ours.log_probs[0, n:]))
            np.testing.assert_allclose(ours.confidence()[0], ref_log_probs.mean(), rtol=1e-5)
            assert not np.any(np.asarray(ours.states[0, n:]))  # dropped states are zeros
            lengths.append(n)
    assert min(lengths) < cfg.max_new_tokens and max(lengths) == cfg.max_new_tokens, lengths


@pytest.mark.slow
def test_batch_rows_transcribe_as_they_do_alone(hf_model):
    cfg = tiny_config(hf_model, trailing_silence_frames=20)
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    rng = np.random.default_rng(3)
    lengths = [100, 61]
    features = np.zeros((2, 110, 80), np.float32)
    mask = np.zeros((2, 110), np.int32)
    for row, n in enumerate(lengths):
        features[row, :n] = rng.normal(size=(n, 80))
        mask[row, :n] = 1
    run = jax.jit(lambda x, m: WhisperTranscriber(cfg).apply({"params": params}, x, m,
                                                             method=WhisperTranscriber.transcribe))
    together = run(features, mask)
    for row, n in enumerate(lengths):
        alone = run(features[row:row + 1, :n], mask[row:row + 1, :n])
        k = int(alone.mask[0].sum())
        assert int(together.mask[row].sum()) == k
        np.testing.assert_array_equal(together.tokens[row, :k], alone.tokens[0, :k])
        np.testing.assert_allclose(together.states[row, :k], alone.states[0, :k], atol=2e-5)


@pytest.mark.slow
def test_without_decoder_states_the_output_keeps_only_the_transcripts_mask(hf_model):
    """decoder_states=False (the shipped config): the same LLM tokens and mask, states zeroed."""
    from slm_jax.weights import assets

    if not (assets.whisper_base_available() and assets.smollm2_available()):
        pytest.skip("the LLM-token table needs the Whisper-base and SmolLM2 packages")
    cfg = tiny_config(hf_model, llm_vocabulary="package:smollm2-135m-instruct", llm_token_rows=24)
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    features = np.random.default_rng(5).normal(size=(1, 64, 80)).astype(np.float32)
    rows = WhisperTranscriber(cfg).apply({"params": params}, features)
    zeroed = WhisperTranscriber(dataclasses.replace(cfg, decoder_states=False)).apply({"params": params}, features)
    assert isinstance(rows, SpeechRows) and rows.token_ids.dtype == jnp.int32
    assert np.asarray(rows.hidden).any() and not np.asarray(zeroed.hidden).any()
    assert (np.asarray(zeroed.token_ids) != NO_TOKEN).any()
    np.testing.assert_array_equal(zeroed.token_ids, rows.token_ids)
    np.testing.assert_array_equal(zeroed.mask, rows.mask)


def test_append_silence_writes_whispers_padding_value():
    features = jnp.asarray(np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2))
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    out, out_mask = append_silence(features, mask, frames=2, max_frames=7)
    assert out.shape == (2, 7, 2)
    np.testing.assert_array_equal(out_mask, [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out[0, :3], features[0, :3])
    np.testing.assert_array_equal(out[0, 3:5], np.full((2, 2), 5.0 - 2.0))  # max of row 0's real frames - 2
    np.testing.assert_array_equal(out[1, 5:7], np.full((2, 2), 21.0 - 2.0))  # capped at max_frames


def test_converter_names_a_missing_decoder_tensor(hf_model):
    cfg = tiny_config(hf_model)
    broken = state_dict(hf_model)
    del broken["model.decoder.layers.1.encoder_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match="layers.1.encoder_attn.k_proj.weight"):
        hf_whisper_transcriber.params_from_state_dict(broken, cfg)


def test_converter_refuses_a_decoder_shape_the_config_does_not_have(hf_model):
    cfg = tiny_config(hf_model)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, ffn_dim=96))
    with pytest.raises(ConversionError, match=r"fc1.weight.*\(128, 64\).*\(96, 64\)"):
        hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)


@pytest.mark.slow
def test_packaged_whisper_base_transcribes_a_real_recording():
    """Smoke test on the real weights: a CMU Arctic recording of a real speaker."""
    from slm_jax.weights import assets

    from slm_jax.data import audio
    from slm_jax.inference import metrics
    if not assets.whisper_base_available():
        pytest.skip("the Whisper-base weight packages are not installed")
    from slm_jax.weights.convert import ctranslate2

    state, config = ctranslate2.load_whisper_hf(assets.whisper_base_files()["model.bin"])
    cfg = hf_whisper_transcriber.config_from_hf(config)
    params = hf_whisper_transcriber.params_from_state_dict(state, cfg)
    root = os.path.join(os.path.dirname(__file__), "..", "release", "real_speech")
    features = audio.log_mel_spectrogram(audio.load_audio(os.path.join(root, "arctic_a0009.wav")))
    out = WhisperTranscriber(cfg).apply({"params": params}, features[None], method=WhisperTranscriber.transcribe)
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(assets.whisper_base_files()["tokenizer.json"]))
    n = int(out.mask[0].sum())
    text = tokenizer.decode(np.asarray(out.tokens[0, :n]), skip_special_tokens=True)
    assert int(out.language[0]) == cfg.language_ids[0]  # English
    assert metrics.word_error_rate(["He turned sharply and faced Gregson across the table."], [text]) < 0.3, text

    # One row per SmolLM2 token: the rows' token ids spell exactly the text Whisper wrote.
    if assets.smollm2_available():
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        rows_cfg = dataclasses.replace(cfg, llm_vocabulary="package:smollm2-135m-instruct", llm_token_rows=48)
        rows = WhisperTranscriber(rows_cfg).apply({"params": params}, features[None])
        kept = np.asarray(rows.token_ids[0, : int(rows.mask[0].sum())])
        np.testing.assert_array_equal(np.asarray(rows.hidden[0, 0]), np.asarray(out.states[0, 0]))
        assert GgufBpeVocabulary.from_smollm2().decode([int(i) for i in kept if i >= 0]) == tokenizer.decode(
            np.asarray(out.tokens[0, :n]), skip_special_tokens=True)


def cut_at_repeated_ngram(tokens: list[int], n: int) -> list[int]:
    """The stop rule written plainly: the transcript ends before the first n-gram that repeats."""
    for k in range(n, len(tokens)):
        if tokens[k] != EOT and any(tokens[j: j + n] == tokens[k - n + 1: k + 1] for j in range(k - n + 1)):
            return tokens[: k - n + 1]
    return tokens


def test_repeated_ngram_detection():
    tokens = jnp.asarray([[1, 2, 3, 1, 2, 3, 1, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    found = [repeats_an_earlier_ngram(tokens, jnp.asarray(k), 3).tolist() for k in range(10)]
    assert [f[0] for f in found] == [False] * 5 + [True, True] + [False] * 3
    assert not any(f[1] for f in found)
    assert [repeats_an_earlier_ngram(tokens, jnp.asarray(k), 4).tolist()[0] for k in range(10)].index(True) == 6


@pytest.mark.slow
def test_a_looping_transcript_stops_at_its_first_repeat(hf_model):
    """Random weights loop readily; with n=2 the transcript must equal the reference's greedy
    tokens cut before the first repeated bigram, with the repeated copy's states dropped."""
    cut = 0
    for seed in range(3):
        features = np.random.default_rng(seed).normal(size=(1, 128, 80)).astype(np.float32)
        plain = tiny_config(hf_model, encoder=dataclasses.replace(tiny_config(hf_model).encoder, mask_padding=False))
        ref_tokens, ref_states, _ = hf_greedy(hf_model, features, plain)
        cfg = dataclasses.replace(plain, stop_on_repeated_ngram=2)
        params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
        ours = WhisperTranscriber(cfg).apply({"params": params}, features, method=WhisperTranscriber.transcribe)
        expected = cut_at_repeated_ngram(ref_tokens, 2)
        n = int(ours.mask[0].sum())
        assert np.asarray(ours.tokens[0, :n]).tolist() == expected
        assert relative_error(ours.states[0, :n], ref_states[:n]) < 1e-5
        cut += len(expected) < len(ref_tokens)
    assert cut >= 1  # the rule was exercised


@pytest.mark.slow
def test_llm_tokens_reach_the_adapter_as_the_llms_own_embeddings():
    """Rows that spell LLM tokens: with a zero-initialised output layer the adapter adds nothing,
    so an untrained adapter hands the LLM the transcript's own token embeddings (none where a row
    has no token); the rows' states still reach the adapter's input."""
    import tiny_models

    from slm_jax.models.slm import SLM

    spec = tiny_models.model_spec(llm="llama")
    transcriber = WhisperTranscriberConfig(
        encoder=dataclasses.replace(spec.speech_encoder, d_model=32),
        decoder=dataclasses.replace(WhisperDecoderConfig(), vocab_size=VOCAB, d_model=32,
                                    num_layers=1, num_heads=8, ffn_dim=64, max_target_positions=32),
        max_new_tokens=8, llm_vocabulary="unused-here", llm_token_rows=5)
    spec = dataclasses.replace(spec, speech_encoder=transcriber,
                               adapter=dataclasses.replace(spec.adapter, zero_init_output=True, subsample_rate=1))
    slm = spec.build()
    states = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32))
    ids = jnp.asarray([[3, 6, NO_TOKEN, 0, 4], [8, 8, 1, NO_TOKEN, NO_TOKEN]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rows = SpeechRows(states, mask, ids)
    variables = nn.unbox(slm.init(jax.random.PRNGKey(1), rows, method=SLM.adapt))
    speech, speech_mask = slm.apply(variables, rows, method=SLM.adapt)
    table = np.asarray(variables["params"]["llm"]["embed_tokens"]["embedding"])
    expected = np.where((np.asarray(ids) >= 0)[..., None], table[np.maximum(np.asarray(ids), 0)], 0.0)
    np.testing.assert_allclose(speech, expected * np.asarray(mask)[..., None], rtol=1e-6)
    np.testing.assert_array_equal(speech_mask, mask)
    # A trained (non-zero) output layer reads the states too: other states, other outputs.
    leaves, tree = jax.tree.flatten(variables)
    noise = np.random.default_rng(2)
    variables = jax.tree.unflatten(tree, [x + 0.1 * noise.normal(size=x.shape).astype(np.float32) for x in leaves])
    a, _ = slm.apply(variables, rows, method=SLM.adapt)
    other = jnp.asarray(np.random.default_rng(1).normal(size=states.shape).astype(np.float32))
    b, _ = slm.apply(variables, rows.replace(hidden=other), method=SLM.adapt)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.slow
def test_spelled_out_rows_hold_each_llm_token_once_in_transcript_order():
    from slm_jax.contrib.whisper_cascade.front_end import spell_out_rows

    rng = np.random.default_rng(3)
    states = rng.normal(size=(2, 5, 6)).astype(np.float32)
    # 1 + LLM ids per Whisper token; the third token spells nothing (end-of-text).
    ids = np.array([[[4, 0, 0], [7, 9, 2], [0, 0, 0], [1, 2, 3], [5, 0, 0]],
                    [[8, 0, 0], [3, 3, 0], [0, 0, 0], [6, 0, 0], [6, 0, 0]]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)  # row 2 was cut after 3 tokens

    for rows in (20, 12, 5):  # more rows than Whisper tokens x slots, room for all, and too few
        out, out_ids, out_mask = map(np.asarray, spell_out_rows(jnp.asarray(states), jnp.asarray(mask),
                                                                jnp.asarray(ids), rows))
        assert out.shape == (2, rows, 6) and out_ids.shape == out_mask.shape == (2, rows)
        for b in range(2):
            expected = [(k, i) for k in range(5) if mask[b, k]
                        for i in ([j for j in ids[b, k] if j] or [0])][:rows]  # (Whisper token, 1 + id)
            n = int(out_mask[b].sum())
            assert out_mask[b, :n].all() and not out_mask[b, n:].any()  # kept rows first
            assert n == len(expected)
            assert out_ids[b, :n].tolist() == [i - 1 if i else NO_TOKEN for _, i in expected]
            assert (out_ids[b, n:] == NO_TOKEN).all()
            np.testing.assert_array_equal(out[b, :n], states[b, [k for k, _ in expected]])
            assert not out[b, n:].any()

    # Rows of the same width but another meaning: checkpoints must tell the layouts apart.
    tokens = WhisperTranscriberConfig(llm_vocabulary="any", llm_token_rows=8)
    names = {WhisperTranscriberConfig().front_end, tokens.front_end,
             dataclasses.replace(tokens, decoder_states=False).front_end}
    assert len(names) == 3
    with pytest.raises(ValueError, match="decoder_states=False needs llm_vocabulary"):
        WhisperTranscriberConfig(decoder_states=False)
    with pytest.raises(ValueError, match="llm_vocabulary needs llm_token_rows"):
        WhisperTranscriberConfig(llm_vocabulary="any")
    assert tokens.writes_llm_tokens and not WhisperTranscriberConfig().writes_llm_tokens


def test_llm_token_table_spells_whisper_tokens_in_smollm2_tokens():
    from slm_jax.weights import assets
    from slm_jax.contrib.whisper_cascade.front_end import llm_token_table, whisper_token_texts
    from slm_jax.weights.tokenizers import GgufBpeVocabulary

    if not (assets.whisper_base_available() and assets.smollm2_available()):
        pytest.skip("the Whisper-base and SmolLM2 weight packages are not installed")
    cfg = WhisperTranscriberConfig()
    table = llm_token_table(cfg.whisper_tokenizer, "package:smollm2-135m-instruct", 4, cfg.decoder.vocab_size,
                            cfg.end_of_text)
    texts = whisper_token_texts(cfg.whisper_tokenizer, cfg.end_of_text)
    smollm2 = GgufBpeVocabulary.from_smollm2()
    for whisper_id in (634, 3574, 42893):  # " He", " turned", " sharply"
        expected = list(smollm2.encode(texts[whisper_id]))[:4]
        assert table[whisper_id, :len(expected)].tolist() == [i + 1 for i in expected]
        assert smollm2.decode(expected) == texts[whisper_id]
    assert not table[cfg.end_of_text:].any()  # special tokens spell nothing


def test_load_params_compares_the_architecture_not_the_run_time_choices(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    cfg = tiny_config(hf_model, llm_vocabulary="package:smollm2-135m-instruct", llm_token_rows=24,
                      trailing_silence_frames=50,
                      encoder=dataclasses.replace(tiny_config(hf_model).encoder, mask_padding=False,
                                                  dtype="bfloat16"))
    params = hf_whisper_transcriber.load_params(str(tmp_path), cfg)
    assert set(params) == {"encoder", "decoder"}
    wrong = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layer_norm_eps=1e-6))
    with pytest.raises(ConversionError, match=r"decoder\.layer_norm_eps=1e-05 but the configured model has 1e-06"):
        hf_whisper_transcriber.load_params(str(tmp_path), wrong)


def test_the_speeds_config_differs_from_the_one_speed_config_only_in_speeds_and_the_whisper_lora():
    """Both give rows of one meaning, so the release adapter serves both."""
    import gin

    from slm_jax.cli import common

    def front_end(name):
        gin.clear_config()  # the previous file's bindings (conftest clears after the test)
        common.parse_gin([name], [])
        return gin.query_parameter("train.model").scoped_configurable_fn().speech_encoder

    tokens = front_end("whisper_base_transcriber_smollm2.gin")
    speeds = front_end("whisper_base_transcriber_speeds_smollm2.gin")
    assert speeds.speeds[0] == 1.0 and len(speeds.speeds) > 1 and speeds.front_end == tokens.front_end
    assert dataclasses.replace(speeds, speeds=(), decoder_lora="") == tokens
    assert speeds.decoder_lora and os.path.exists(speeds.decoder_lora)  # the release's Whisper LoRA ships


@pytest.mark.parametrize("front_end,speeds", [(False, ""), (True, ""), (True, "1.0,0.9,1.1")])
@pytest.mark.slow
def test_whisper_reference_wer_transcribes_a_tsv_both_ways_into_a_report(tmp_path, load_script, front_end, speeds):
    """scripts/whisper_reference_wer.py: transformers' plain greedy decoding, or this project's
    transcriber front end (what the SLM reads), at one speed or several; on a real recording,
    into a report of slm-eval's shape."""
    from slm_jax.weights import assets

    from slm_jax.inference import metrics
    if not assets.whisper_base_available():
        pytest.skip("the Whisper-base weight packages are not installed")
    root = os.path.join(os.path.dirname(__file__), "..", "release", "real_speech")
    tsv = tmp_path / "one.tsv"
    tsv.write_text(f"{os.path.join(root, 'arctic_a0009.wav')}\tHe turned sharply and faced Gregson across the table.\n")
    out = tmp_path / "report.json"
    flags = ["--front_end"] * front_end + [f"--speeds={speeds}"] * bool(speeds)
    assert load_script("whisper_reference_wer").main([str(tsv), f"--out={out}"] + flags) == 0
    report = json.loads(out.read_text())
    [item] = report["predictions"]["tsv"]
    assert metrics.word_error_rate([item["reference"]], [item["prediction"]]) < 0.3, item["prediction"]
    assert report["tasks"]["tsv"] == {"examples": 1, "wer": metrics.word_error_rate([item["reference"]],
                                                                                      [item["prediction"]])}
    assert ("WhisperTranscriber" in report["decoder"]) == front_end
    assert ("most confident of speeds 1.0,0.9,1.1" in report["decoder"]) == bool(speeds)


def test_whisper_reference_wer_refuses_speeds_without_the_front_end(load_script, capsys):
    """transformers' decoding has no speed copies: asking for them is an error, not a silent one-speed run."""
    with pytest.raises(SystemExit):
        load_script("whisper_reference_wer").main(["some.tsv", "--speeds=1.0,0.9"])
    assert "--speeds needs --front_end" in capsys.readouterr().err


@pytest.mark.slow
def test_change_speed_moves_a_tones_pitch_and_length_as_playing_it_faster_does():
    """The log-mel speed change against audio.change_speed (the audio resampled, then its log-mel):
    the same number of frames and the tone in the same mel bin."""
    from slm_jax.data import audio

    time = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 1500 * time)).astype(np.float32)
    features = audio.log_mel_spectrogram(tone)
    ones = np.ones((1, features.shape[0]), np.int32)
    same, same_mask = change_speed(features[None], ones, 1.0, features.shape[0] + 5)
    np.testing.assert_array_equal(same[0, :features.shape[0]], features)
    assert int(same_mask.sum()) == features.shape[0]
    for speed in (0.8, 1.25):
        frames = int(np.ceil(features.shape[0] / speed))
        warped, mask = change_speed(features[None], ones, speed, frames + 3)
        reference = audio.log_mel_spectrogram(audio.change_speed(tone, speed))
        assert int(mask.sum()) == frames and abs(reference.shape[0] - frames) <= 1
        inner = slice(5, frames - 5)  # away from the edges, where the STFT pads
        ours, theirs = np.asarray(warped[0, inner]).mean(axis=0), reference[inner].mean(axis=0)
        assert int(np.argmax(ours)) == int(np.argmax(theirs)) != int(np.argmax(features.mean(axis=0)))
        unchanged = features[inner].mean(axis=0)
        # Closer to the resampled audio's features than the features it started from, by far.
        assert np.abs(ours - theirs).mean() < 0.6 * np.abs(unchanged - theirs).mean(), (
            np.abs(ours - theirs).mean(), np.abs(unchanged - theirs).mean())


@pytest.mark.slow
def test_several_speeds_keep_each_utterances_most_confident_transcript(hf_model):
    speeds = (1.0, 0.8, 1.25)
    cfg = tiny_config(hf_model)
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    rng = np.random.default_rng(5)
    features = np.zeros((5, 110, 80), np.float32)
    mask = np.zeros((5, 110), np.int32)
    for row, n in enumerate([60, 52, 45, 30, 110]):  # 110 frames do not fit the window of 128 at speed 0.8
        features[row, :n] = rng.normal(size=(n, 80))
        mask[row, :n] = 1

    def run(config, x, m):
        return jax.jit(lambda x, m: WhisperTranscriber(config).apply({"params": params}, x, m,
                                                                     method=WhisperTranscriber.transcribe))(x, m)

    chosen = run(dataclasses.replace(cfg, speeds=speeds), features, mask)
    frames = 128  # the slowest copy's (110 / 0.8), cut to the tiny encoder's window
    each = [run(cfg, *change_speed(features, mask, speed, frames)) for speed in speeds]
    confidence = np.stack([np.asarray(t.confidence()) for t in each])  # [speeds, B]
    confidence[1, 4] = -np.inf  # the cut copy does not compete
    best = confidence.argmax(axis=0)
    assert len(set(best.tolist())) > 1, confidence  # the test would not tell rows apart otherwise
    np.testing.assert_allclose(chosen.confidence(), confidence.max(axis=0), rtol=1e-5)
    for row, speed in enumerate(best):
        np.testing.assert_array_equal(chosen.tokens[row], each[speed].tokens[row])
        np.testing.assert_array_equal(chosen.mask[row], each[speed].mask[row])
    # At speeds (1.0, 0.8) the cut copy of row 4 is the more confident one, and still loses.
    assert confidence[0, 4] < np.asarray(each[1].confidence())[4]
    two = run(dataclasses.replace(cfg, speeds=(1.0, 0.8)), features, mask)
    np.testing.assert_array_equal(two.tokens[4], each[0].tokens[4])
    with pytest.raises(ValueError, match="speeds must lie between"):
        dataclasses.replace(cfg, speeds=(1.0, 3.0))
    with pytest.raises(ValueError, match="speeds must include 1.0"):
        dataclasses.replace(cfg, speeds=(0.9, 1.1))
