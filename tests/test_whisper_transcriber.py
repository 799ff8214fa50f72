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
from slm_jax.inference.decoding import repeats_an_earlier_ngram

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


def hf_greedy(hf_model, features: np.ndarray, cfg, previous: tuple[int, ...] = ()) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The same rule as ours, written on transformers: language among cfg.language_ids, then
    argmax over non-special tokens until end-of-text; returns (tokens, the states that chose them,
    each token's log-probability among the non-special tokens). ``previous``: ids before SOT."""
    with torch.no_grad():
        memory = hf_model.model.encoder(torch.from_numpy(features).transpose(1, 2)).last_hidden_state

        def run(ids):
            out = hf_model(encoder_outputs=(memory,), decoder_input_ids=torch.tensor([ids]),
                           output_hidden_states=True)
            return out.logits[0, -1].numpy(), out.decoder_hidden_states[-1][0, -1].numpy()

        logits, _ = run([*previous, SOT])
        ids = [*previous, SOT, cfg.language_ids[int(np.argmax(logits[list(cfg.language_ids)]))], *cfg.task_ids]
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


def test_previous_text_goes_before_the_prompt_as_hugging_face_reads_it(hf_model, tmp_path):
    # A word-level tokenizer over the tiny vocabulary stands in for Whisper's tokenizer.json.
    tokenizers = pytest.importorskip("tokenizers")
    words = {f"w{i}": i for i in range(EOT)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    sop = EOT - 1  # the tiny vocabulary has no room above end-of-text for <|startofprev|>
    cfg = tiny_config(hf_model, whisper_tokenizer=str(tmp_path / "tokenizer.json"), previous_text="w7 w21 w3",
                      start_of_previous=sop, encoder=dataclasses.replace(tiny_config(hf_model).encoder, mask_padding=False))
    assert cfg.previous_ids == (sop, 7, 21, 3) and cfg.prompt_length == 4 + 2 + len(TASK)
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    features = np.random.default_rng(3).normal(size=(1, 128, 80)).astype(np.float32)
    ours = WhisperTranscriber(cfg).apply({"params": params}, features, method=WhisperTranscriber.transcribe)
    ref_tokens, ref_states, ref_log_probs = hf_greedy(hf_model, features, cfg, previous=cfg.previous_ids)
    n = int(ours.mask[0].sum())
    assert np.asarray(ours.tokens[0, :n]).tolist() == ref_tokens
    assert relative_error(ours.states[0, :n], ref_states) < 1e-5
    assert relative_error(ours.log_probs[0, :n], ref_log_probs) < 1e-5
    # The previous text changes what Whisper writes (else this test would not tell it was read).
    plain = WhisperTranscriber(dataclasses.replace(cfg, previous_text="")).apply(
        {"params": params}, features, method=WhisperTranscriber.transcribe)
    assert not np.allclose(plain.log_probs, ours.log_probs)


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


def test_without_decoder_states_the_output_keeps_only_the_transcripts_mask(hf_model):
    """decoder_states=False (the shipped config): the same LLM-token channels and mask, states zeroed."""
    from slm_jax.weights import assets

    if not (assets.whisper_base_available() and assets.smollm2_available()):
        pytest.skip("the LLM-token table needs the Whisper-base and SmolLM2 packages")
    cfg = tiny_config(hf_model, llm_vocabulary="package:smollm2-135m-instruct")
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), cfg)
    features = np.random.default_rng(5).normal(size=(1, 64, 80)).astype(np.float32)
    rows, mask = WhisperTranscriber(cfg).apply({"params": params}, features)
    zeroed, zeroed_mask = WhisperTranscriber(dataclasses.replace(cfg, decoder_states=False)).apply(
        {"params": params}, features)
    d = cfg.decoder.d_model
    assert np.asarray(rows[..., :d]).any() and not np.asarray(zeroed[..., :d]).any()
    assert np.asarray(zeroed[..., d:]).any()
    np.testing.assert_array_equal(zeroed[..., d:], rows[..., d:])
    np.testing.assert_array_equal(zeroed_mask, mask)


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

    # One row per SmolLM2 token: the id channel spells exactly the text Whisper wrote.
    if assets.smollm2_available():
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        rows_cfg = dataclasses.replace(cfg, llm_vocabulary="package:smollm2-135m-instruct", llm_token_rows=48)
        rows, rows_mask = WhisperTranscriber(rows_cfg).apply({"params": params}, features[None])
        kept = np.asarray(rows[0, : int(rows_mask[0].sum()), -1]).astype(int)
        np.testing.assert_array_equal(np.asarray(rows[0, 0, :-1]), np.asarray(out.states[0, 0]))
        assert GgufBpeVocabulary.from_smollm2().decode([i - 1 for i in kept if i > 0]) == tokenizer.decode(
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


def test_llm_token_channels_become_the_llms_own_embeddings():
    import tiny_models

    from slm_jax.models.slm import SLM

    spec = tiny_models.model_spec(llm="llama")
    transcriber = WhisperTranscriberConfig(
        encoder=dataclasses.replace(spec.speech_encoder, d_model=32),
        decoder=dataclasses.replace(WhisperDecoderConfig(), vocab_size=VOCAB, d_model=32,
                                    num_layers=1, num_heads=8, ffn_dim=64, max_target_positions=32),
        max_new_tokens=8, llm_vocabulary="unused-here", llm_tokens_per_token=3)
    slm = dataclasses.replace(spec, speech_encoder=transcriber).build()
    states = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    ids = np.array([[[4, 0, 0], [7, 9, 0], [0, 0, 0], [1, 2, 3], [5, 0, 0]]] * 2, np.float32)  # 1 + LLM id
    hidden = jnp.asarray(np.concatenate([states, ids], -1))
    variables = nn.unbox(slm.init(jax.random.PRNGKey(0), hidden, jnp.ones((2, 5), jnp.int32), method=SLM.adapt))
    out = slm.apply(variables, hidden, 3, method=SLM.embed_llm_token_channels)
    table = np.asarray(variables["params"]["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(out[..., :32], states)
    np.testing.assert_allclose(out[0, 1, 32:], (table[6] + table[8]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[0, 3, 32:], (table[0] + table[1] + table[2]) / 3, rtol=1e-6)
    np.testing.assert_array_equal(out[0, 2, 32:], 0)  # no LLM token (end-of-text, padding)

    # The adapter's output is added to those embeddings: zero-initialised, it adds nothing, so an
    # untrained adapter hands the LLM the transcript's own token embeddings.
    spec = dataclasses.replace(spec, speech_encoder=transcriber,
                               adapter=dataclasses.replace(spec.adapter, zero_init_output=True, subsample_rate=1))
    slm = spec.build()
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    variables = nn.unbox(slm.init(jax.random.PRNGKey(1), hidden, mask, method=SLM.adapt))
    speech, speech_mask = slm.apply(variables, hidden, mask, method=SLM.adapt)
    text = slm.apply(variables, hidden, 3, method=SLM.embed_llm_token_channels)[..., 32:]
    np.testing.assert_allclose(speech, text * np.asarray(mask)[..., None], rtol=1e-6)
    np.testing.assert_array_equal(speech_mask, mask)


def test_spelled_out_rows_hold_each_llm_token_once_in_transcript_order():
    from slm_jax.contrib.whisper_cascade.front_end import spell_out_rows

    rng = np.random.default_rng(3)
    states = rng.normal(size=(2, 5, 6)).astype(np.float32)
    # 1 + LLM ids per Whisper token; the third token spells nothing (end-of-text).
    ids = np.array([[[4, 0, 0], [7, 9, 2], [0, 0, 0], [1, 2, 3], [5, 0, 0]],
                    [[8, 0, 0], [3, 3, 0], [0, 0, 0], [6, 0, 0], [6, 0, 0]]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)  # row 2 was cut after 3 tokens

    for rows in (20, 12, 5):  # more rows than Whisper tokens x slots, room for all, and too few
        out, out_mask = map(np.asarray, spell_out_rows(jnp.asarray(states), jnp.asarray(mask), jnp.asarray(ids), rows))
        assert out.shape == (2, rows, 7) and out_mask.shape == (2, rows)
        for b in range(2):
            expected = [(k, i) for k in range(5) if mask[b, k]
                        for i in ([j for j in ids[b, k] if j] or [0])][:rows]  # (Whisper token, 1 + id)
            n = int(out_mask[b].sum())
            assert out_mask[b, :n].all() and not out_mask[b, n:].any()  # kept rows first
            assert n == len(expected)
            assert out[b, :n, -1].tolist() == [i for _, i in expected]
            np.testing.assert_array_equal(out[b, :n, :-1], states[b, [k for k, _ in expected]])
            assert not out[b, n:].any()

    # Rows of the same width but another layout: checkpoints must tell the two apart.
    per_token = WhisperTranscriberConfig(llm_vocabulary="any")
    names = {per_token.front_end, dataclasses.replace(per_token, llm_token_rows=8).front_end,
             dataclasses.replace(per_token, decoder_states=False).front_end}
    assert len(names) == 3
    with pytest.raises(ValueError, match="decoder_states=False needs llm_vocabulary"):
        WhisperTranscriberConfig(decoder_states=False)
    assert dataclasses.replace(per_token, llm_token_rows=8).llm_token_channels == 1
    rows_cfg = dataclasses.replace(per_token, llm_token_rows=8)
    assert dataclasses.replace(rows_cfg, encoder_rows_every=4).front_end not in names | {rows_cfg.front_end}
    with pytest.raises(ValueError, match="encoder_rows_every needs llm_vocabulary and llm_token_rows"):
        dataclasses.replace(per_token, encoder_rows_every=4)


def test_encoder_rows_come_before_the_transcript_rows_every_nth_frame():
    from slm_jax.contrib.whisper_cascade.front_end import encoder_rows_before

    rng = np.random.default_rng(5)
    memory = rng.normal(size=(2, 10, 3)).astype(np.float32)
    memory_mask = np.array([[1] * 10, [1] * 5 + [0] * 5], np.int32)
    rows = rng.normal(size=(2, 4, 4)).astype(np.float32)
    rows_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.int32)
    rows = rows * rows_mask[..., None]
    out, out_mask = map(np.asarray, encoder_rows_before(jnp.asarray(memory), jnp.asarray(memory_mask),
                                                        jnp.asarray(rows), jnp.asarray(rows_mask), 4))
    assert out.shape == (2, 3 + 4, 4) and out_mask.shape == (2, 7)
    for b in range(2):
        frames = [t for t in range(0, 10, 4) if memory_mask[b, t]]  # frames 0, 4, 8 (row 1: 0, 4)
        n_rows = int(rows_mask[b].sum())
        n = int(out_mask[b].sum())
        assert n == len(frames) + n_rows and out_mask[b, :n].all() and not out_mask[b, n:].any()
        np.testing.assert_array_equal(out[b, :len(frames), :3], memory[b, frames])
        assert not out[b, :len(frames), 3].any()  # no LLM token on the encoder's rows
        np.testing.assert_array_equal(out[b, len(frames):n], rows[b, :n_rows])
        assert not out[b, n:].any()


def test_encoder_rows_go_only_to_the_utterances_whisper_was_unsure_of(hf_model):
    from slm_jax.weights import assets

    if not (assets.whisper_base_available() and assets.smollm2_available()):
        pytest.skip("the LLM-token table needs the Whisper-base and SmolLM2 packages")
    tokens_only = tiny_config(hf_model, llm_vocabulary="package:smollm2-135m-instruct", llm_token_rows=24,
                              decoder_states=False)
    with_rows = dataclasses.replace(tokens_only, encoder_rows_every=4)
    params = hf_whisper_transcriber.params_from_state_dict(state_dict(hf_model), tokens_only)
    features = np.random.default_rng(7).normal(size=(2, 64, 80)).astype(np.float32)

    def rows(cfg):
        return tuple(map(np.asarray, WhisperTranscriber(cfg).apply({"params": params}, features)))

    confidence = np.asarray(WhisperTranscriber(tokens_only).apply(
        {"params": params}, features, method=WhisperTranscriber.transcribe).confidence())
    unsure, sure = int(np.argmin(confidence)), int(np.argmax(confidence))
    assert confidence[unsure] < confidence[sure] < 0
    (plain, plain_mask), (every, every_mask) = rows(tokens_only), rows(with_rows)
    for threshold, expect_rows in ((0.0, (True, True)), (float(confidence.mean()), None), (-1e9, (False, False))):
        gated, gated_mask = rows(dataclasses.replace(with_rows, encoder_rows_below_confidence=threshold))
        if expect_rows is None:
            expect_rows = {unsure: True, sure: False}
        for b in (0, 1):
            want, want_mask = (every, every_mask) if expect_rows[b] else (plain, plain_mask)
            n = int(want_mask[b].sum())
            assert int(gated_mask[b].sum()) == n
            np.testing.assert_array_equal(gated[b, :n], want[b, :n])
    with pytest.raises(ValueError, match="encoder_rows_below_confidence needs encoder_rows_every"):
        dataclasses.replace(tokens_only, encoder_rows_below_confidence=-0.3)


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
    cfg = tiny_config(hf_model, llm_vocabulary="package:smollm2-135m-instruct", trailing_silence_frames=50,
                      encoder=dataclasses.replace(tiny_config(hf_model).encoder, mask_padding=False,
                                                  dtype="bfloat16"))
    params = hf_whisper_transcriber.load_params(str(tmp_path), cfg)
    assert set(params) == {"encoder", "decoder"}
    wrong = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layer_norm_eps=1e-6))
    with pytest.raises(ConversionError, match=r"decoder\.layer_norm_eps=1e-05 but the configured model has 1e-06"):
        hf_whisper_transcriber.load_params(str(tmp_path), wrong)


def test_transcriber_gin_files_differ_only_in_the_encoder_rows_and_the_speeds():
    """The three transcriber configs give rows of one width (each adapter can warm-start the
    next); the gated one reads the encoder rows as the ungated one does, so one adapter serves both."""
    import gin

    from slm_jax.cli import common

    def front_end(name):
        gin.clear_config()  # the previous file's bindings (conftest clears after the test)
        common.parse_gin([name], [])
        return gin.query_parameter("train.model").scoped_configurable_fn().speech_encoder

    tokens = front_end("whisper_base_transcriber_smollm2.gin")
    rows = front_end("whisper_base_transcriber_encoder_rows_smollm2.gin")
    gated = front_end("whisper_base_transcriber_gated_rows_smollm2.gin")
    assert (tokens.encoder_rows_every, rows.encoder_rows_every, gated.encoder_rows_every) == (0, 4, 4)
    assert (rows.encoder_rows_below_confidence, gated.encoder_rows_below_confidence) == (None, -0.3)
    assert tokens.output_dim == rows.output_dim == gated.output_dim
    assert gated.front_end == rows.front_end != tokens.front_end
    assert dataclasses.replace(gated, encoder_rows_below_confidence=None) == rows
    speeds = front_end("whisper_base_transcriber_speeds_smollm2.gin")  # the release adapter serves it too
    assert speeds.speeds[0] == 1.0 and len(speeds.speeds) > 1 and speeds.front_end == tokens.front_end
    assert dataclasses.replace(speeds, speeds=(), decoder_lora="") == tokens
    assert speeds.decoder_lora and os.path.exists(speeds.decoder_lora)  # the release's Whisper LoRA ships


def test_encoder_rows_cache_script_refuses_a_gated_config(tmp_path, capsys, load_script):
    """Its input cache holds the transcript's rows but not Whisper's confidence, so it cannot
    tell which utterances the gated front end gives the encoder's rows; nothing is written."""
    script = load_script("encoder_rows_cache")
    assert script.main([str(tmp_path), "0123", "--gin_file=whisper_base_transcriber_gated_rows_smollm2.gin"]) == 2
    assert "only where Whisper was unsure" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("front_end,speeds", [(False, ""), (True, ""), (True, "1.0,0.9,1.1")])
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
