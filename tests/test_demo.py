"""slm-demo: budget sizing, the cascade prompt, the results table and statement, and the whole
demo end to end on a tiny random model (the real Whisper/SmolLM2 demo takes minutes; its
pieces are the same)."""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import pytest

from slm_jax.apps import demo
from slm_jax.inference import evaluation
from slm_jax.cli import demo as demo_cli

TINY_GIN = """
include 'base.gin'
include 'model_tiny.gin'
train.data = @CachedCorpusData()
CachedCorpusData.corpus_dir = %CORPUS_DIR
CachedCorpusData.prompt_format = @PromptFormat()
CachedCorpusData.max_audio_seconds = 30.0
CORPUS_DIR = 'unset'
"""


def test_steps_fill_the_budget_after_evaluation():
    assert demo.steps_for_budget(seconds_left=600, step_seconds=5, eval_seconds=100, min_steps=10) == 100
    # Too little time left: the minimum, not zero or a negative count.
    assert demo.steps_for_budget(seconds_left=30, step_seconds=5, eval_seconds=100, min_steps=10) == 10
    with pytest.raises(ValueError, match="positive"):
        demo.steps_for_budget(600, 0, 0, 1)


def test_generate_calls_count_cascade_passes_for_non_asr_tasks():
    examples = [{"task": "asr_en"}] * 9 + [{"task": "ast_en_fr"}] * 3
    # asr: 2 batches of 8; ast: 1 batch x (answer, own transcript, 2 cascades)
    assert demo.count_generate_calls(examples, 8) == 2 + 4


def test_fixed_batch_pads_and_trims():
    seen = []

    def answer(items):
        seen.append(len(items))
        return [f"a{x}" for x in items]

    padded = evaluation.fixed_batch(answer, 4)
    assert padded([1, 2]) == ["a1", "a2"]
    assert padded([1, 2, 3, 4]) == ["a1", "a2", "a3", "a4"]
    assert seen == [4, 4] and padded([]) == []
    with pytest.raises(ValueError, match="fixed batch of 4"):
        padded([1, 2, 3, 4, 5])


def _report(wer: float) -> dict:
    return {
        "slm": {"tasks": {"asr_en": {"examples": 10, "wer": wer}, "ast_en_fr": {"examples": 4, "bleu": 12.34},
                          "zeroshot_which_colour": {"examples": 3, "accuracy": 1 / 3}},
                "predictions": {"asr_en": [{"instruction": "Transcribe the speech.", "reference": "a b",
                                            "prediction": "a c"}]}},
        "cascade_reference": {"tasks": {"ast_en_fr": {"examples": 4, "bleu": 30.0},
                                        "zeroshot_which_colour": {"examples": 3, "accuracy": 1.0}}},
        "cascade_own": {"tasks": {"ast_en_fr": {"examples": 4, "bleu": 5.0},
                                  "zeroshot_which_colour": {"examples": 3, "accuracy": 0.0}}},
    }


def test_results_table_has_every_task_and_both_cascades():
    table = demo.results_table(_report(0.25)).splitlines()
    assert "cascade (reference text)" in table[0] and "cascade (SLM transcript)" in table[0]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["asr_en"][-4:] == ["WER", "25.0%", "-", "-"]  # no cascade for ASR itself
    assert rows["ast_en_fr"][-4:] == ["BLEU", "12.3", "30.0", "5.0"]
    assert rows["zeroshot_which_colour"][1] == "(zero-shot)"
    assert rows["zeroshot_which_colour"][-3:] == ["33.3%", "100.0%", "0.0%"]


@pytest.mark.parametrize("wer, verdict", [(0.08, "usable"), (0.3, "partly right"), (0.9, "not learned")])
def test_statement_says_plainly_how_good_the_transcripts_are(wer, verdict):
    run = {"adapter_params": 1234, "synthesizer": "espeak", "steps": 50, "batch_size": 8, "epochs": 0.5, "train_examples": 800,
           "train_seconds": 120, "loss": 2.5}
    text = demo.statement(_report(wer), run)
    assert f"WER {100 * wer:.1f}%" in text and verdict in text
    assert "50 steps" in text and "short CPU run" in text


def test_cli_rejects_bad_flags(capsys):
    assert demo_cli.main(["--steps=0"]) == 2
    assert "slm-demo: error: --steps must be positive" in capsys.readouterr().err
    assert demo_cli.main(["--languages=en,xx"]) == 2
    assert "--languages must include en" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_cli.main(["--help"])
    assert "zero-shot" in capsys.readouterr().out


def test_corpus_is_reused_only_with_the_same_free_form_sentence_count(tmp_path, monkeypatch):
    from slm_jax.data.corpus import builder as corpus

    made = []
    # A manifest written before --open_asr existed has no such key: it means none.
    config = {"size": 70, "seed": 0, "languages": ["en", "fr"], "synthesizer": "tones"}
    monkeypatch.setattr(corpus, "load_manifest", lambda directory: {"config": config})
    monkeypatch.setattr(corpus, "make_corpus", lambda directory, size, **kw: made.append(kw["open_asr"]))
    settings = demo.DemoSettings(out_dir=str(tmp_path), corpus_size=70, synthesizer="tones")
    demo.ensure_corpus(settings)
    assert made == []
    demo.ensure_corpus(dataclasses.replace(settings, open_asr=5))
    assert made == [5]
    config["open_asr"] = 5
    demo.ensure_corpus(dataclasses.replace(settings, open_asr=5))
    assert made == [5]
    assert demo_cli.main(["--open_asr=-1"]) == 2


def test_quick_settings():
    args = demo_cli.build_parser().parse_args(["--quick", "--steps=7"])
    settings = demo_cli.settings_from_args(args)
    assert settings.minutes == 5.0 and settings.corpus_size == 400 and settings.steps == 7
    assert 0 < settings.alignment_steps < demo.DemoSettings().alignment_steps
    args = demo_cli.build_parser().parse_args(["--alignment_steps=0"])
    assert demo_cli.settings_from_args(args).alignment_steps == 0
    assert settings.eval_per_task < demo.DemoSettings().eval_per_task


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    gin_file = tmp_path / "tiny_demo.gin"
    gin_file.write_text(TINY_GIN)
    out = tmp_path / "demo"
    settings = demo.DemoSettings(
        out_dir=str(out), gin_files=(str(gin_file),), corpus_size=70, languages=("en", "fr"),
        synthesizer="tones", workers=1, steps=3, alignment_steps=2, batch_size=8, warmup_steps=1, eval_per_task=2,
        eval_batch_size=2, max_new_tokens=8, minutes=5,
        gin_bindings=(f"CachedCorpusData.vocabulary='corpus:{out / 'corpus'}'",),
    )
    report = demo.run_demo(settings)
    printed = capsys.readouterr().out

    saved = json.loads((out / "report.json").read_text())
    # 2 CTC alignment steps, then the 3 next-token steps.
    assert saved["run"]["steps"] == 5 and report["run"]["steps"] == 5 and saved["run"]["alignment_steps"] == 2
    tasks = set(saved["slm"]["tasks"])
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    with_test = {t for t, info in manifest["tasks"].items() if info["splits"].get("test", {}).get("examples")}
    assert tasks == with_test and {"asr_en", "zeroshot_which_colour"} <= tasks
    # The cascade covers exactly the non-ASR tasks, from both transcripts.
    assert set(saved["cascade_reference"]["tasks"]) == {t for t in tasks if not t.startswith("asr_")}
    assert set(saved["cascade_own"]["tasks"]) == set(saved["cascade_reference"]["tasks"])
    assert all(0 <= s["wer"] for t, s in saved["slm"]["tasks"].items() if t.startswith("asr_"))
    assert "WER" in printed and "cascade (reference text)" in printed and "Measured:" in printed
    assert os.path.isdir(out / "train" / "5")  # the checkpoint slm-infer reads

    assert "tone sequences standing in for speech" in printed  # says what the audio was

    # The small release export of that run reads back as the same adapter (float16 rounding).
    from slm_jax.inference import model as inference

    from slm_jax.weights import release
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    data = gin.query_parameter("train.data").scoped_configurable_fn()
    release.export_release(str(out / "train"), str(out / "release"), model, data, note="test")
    trained, _ = inference.load_trained(str(out / "train"), model, data)
    shipped, step = inference.load_trained(str(out / "release"), model, data)
    assert step == 5 and release.directory_bytes(out / "release") < release.directory_bytes(out / "train") / 3
    for a, b in zip(jax.tree.leaves(trained.params["adapter"]), jax.tree.leaves(shipped.params["adapter"])):
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-6)
    with pytest.raises(Exception, match="not empty"):
        release.export_release(str(out / "train"), str(out / "release"), model, data)
    # A second run reuses the corpus (and with it the encoder cache).
    assert demo.ensure_corpus(settings) == str(out / "corpus")
    assert "corpus: reusing" in capsys.readouterr().out

    # Without --steps the demo times the step on one bucketed batch and sizes the run from the
    # planned batches' shapes (a short budget: at least min_steps).
    sized = demo.run_demo(dataclasses.replace(settings, steps=None, minutes=1.0, min_steps=2))
    printed = capsys.readouterr().out
    assert "batch shapes to compile" in printed and "s per mean step" in printed and "2 alignment steps" in printed
    assert sized["run"]["steps"] >= 4 and sized["run"]["step_seconds"] > 0


def test_cascade_puts_the_transcript_in_the_speech_slot(tmp_path):
    from slm_jax.contrib.whisper_cascade.text_cascade import TextAnswerer
    from slm_jax.data.prompting import CHATML_PROMPT

    class Words:  # a toy vocabulary: one id per word
        eos_id = 1

        def __init__(self):
            self.ids = {}

        def encode(self, text):
            return [self.ids.setdefault(w, len(self.ids) + 10) for w in text.split()]

    vocab = Words()
    answerer = TextAnswerer(llm=None, llm_params=None, vocabulary=vocab, prompt_format=CHATML_PROMPT)
    ids, start = answerer.prompt_ids("hello there", "Translate it.")
    pieces = CHATML_PROMPT.encode(vocab, "Translate it.")
    assert ids == pieces.prefix + vocab.encode("hello there") + pieces.suffix
    assert start == pieces.decoder_start
    assert answerer.prompt_ids("  ", "Translate it.")[0] == pieces.prefix + pieces.suffix
    np.testing.assert_array_equal(pieces.prefix, vocab.encode("<|im_start|>user\n"))
