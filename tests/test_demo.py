"""slm-demo: budget sizing, the cascade prompt, the results table and statement, and the whole
demo end to end on a tiny random model, with a tiny release exported from it standing in for the
shipped one (the real Whisper/SmolLM2 demo takes minutes; its pieces are the same).
tests/test_demo_real_speech.py covers the real-speech section."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import gin
import jax
import numpy as np
import pytest

from slm_jax.apps import demo
from slm_jax.inference import evaluation, metrics
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
    # The release answers every batch too; the cascade reads its transcripts instead of the live run's.
    assert demo.count_generate_calls(examples, 8, release=True) == 2 * 2 + 5


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
    assert "cascade (reference text)" in table[0] and "cascade (live transcript)" in table[0]
    assert "trained just now" in table[0] and "shipped release" not in table[0]  # none was evaluated
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["asr_en"][-4:] == ["WER", "25.0%", "-", "-"]  # no cascade for ASR itself
    assert rows["ast_en_fr"][-4:] == ["BLEU", "12.3", "30.0", "5.0"]
    assert rows["zeroshot_which_colour"][1] == "(zero-shot)"
    assert rows["zeroshot_which_colour"][-3:] == ["33.3%", "100.0%", "0.0%"]


def _with_release(report: dict, wer: float) -> dict:
    report["release"] = {"tasks": {"asr_en": {"examples": 10, "wer": wer}, "ast_en_fr": {"examples": 4, "bleu": 41.0},
                                   "zeroshot_which_colour": {"examples": 3, "accuracy": 2 / 3}},
                         "predictions": {}}
    report["release_info"] = {"step": 1100, "directory": "release/whisper_base_smollm2", "note": "600 + 500"}
    report["own_transcripts_by"] = "release"
    return report


def test_results_table_labels_the_release_and_the_live_run():
    run = {"steps": 23}
    table = demo.results_table(_with_release(_report(0.9), 0.1), run).splitlines()
    header = table[0]
    # Each column says which model it is: the release, and the run trained just now with its steps.
    assert header.index("shipped release, 1100 steps") < header.index("trained just now, 23 steps")
    assert "cascade (release transcript)" in header
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["asr_en"][-5:] == ["WER", "10.0%", "90.0%", "-", "-"]
    assert rows["ast_en_fr"][-5:] == ["BLEU", "41.0", "12.3", "30.0", "5.0"]
    assert rows["zeroshot_which_colour"][-4:] == ["66.7%", "33.3%", "100.0%", "0.0%"]


def _run(steps: int, alignment: int = 0, load: float | None = 0.1, **more) -> dict:
    return {"adapter_params": 1234, "synthesizer": "espeak", "steps": steps, "alignment_steps": alignment, "batch_size": 8,
            "epochs": 0.5, "train_examples": 800, "train_seconds": 120, "loss": 2.5, "load_at_start": load, "cores": 2,
            "minutes": 5.0, **more}


@pytest.mark.parametrize("wer, verdict", [(0.08, "usable"), (0.3, "partly right"), (0.9, "not learned")])
def test_statement_says_plainly_how_good_the_transcripts_are(wer, verdict):
    text = demo.statement(_report(wer), _run(alignment=100, steps=100 + demo.FEW_STEPS))
    assert f"WER {100 * wer:.1f}%" in text and verdict in text
    assert f"{100 + demo.FEW_STEPS} steps" in text and "short CPU run" in text and "NOTE" not in text


def test_a_busy_run_is_named_and_the_release_still_stands():
    """Few next-token steps on a loaded machine: the statement says the machine is busy and how
    many steps the live run got, and points at the release's column, whose numbers it states."""
    report = _with_release(_report(2.2), 0.107)
    text = demo.statement(report, _run(steps=170, alignment=150, load=3.9))
    assert "this machine is busy (load average 3.9 on 2 cores" in text
    assert "the live run got 170 steps (20 next-token steps after 150 alignment)" in text
    assert "shipped release's column shows what the design reaches" in text
    assert "trained just now WER 220.0%" in text and "shipped release WER 10.7% (usable transcripts)" in text
    assert "zero-shot" in text.lower() and "shipped release: which_colour 66.7%" in text
    table = demo.results_table(report, {"steps": 170})
    assert "shipped release, 1100 steps" in table and "trained just now, 170 steps" in table
    # An idle machine with too short a budget, and --steps, are named as such instead.
    idle = demo.statement(report, _run(steps=170, alignment=150, load=0.2))
    assert "busy" not in idle and "the live run got 170 steps" in idle and "5-minute budget" in idle
    assert "as --steps asked" in demo.statement(report, _run(steps=30, load=0.2, steps_asked=True))
    # Without a release there is nothing to point at; enough steps: no note at all.
    assert "release/README.md" in demo.live_run_note(_run(steps=30, load=3.9), release=False)
    assert demo.live_run_note(_run(steps=150 + demo.FEW_STEPS, alignment=150, load=3.9), release=True) is None


def test_summary_ends_on_what_each_model_reached():
    report = _with_release(_report(0.9), 0.1)
    line = demo.summary(report, {"steps": 40})
    assert line.startswith("In short: on held-out synthetic English the shipped release has WER 10.0%")
    assert line.startswith("In short: on held-out synthetic English the shipped release has WER 10.0% "
                           "(usable transcripts) and the run trained just now (40 steps) 90.0%")
    alone = demo.summary(_report(0.9), {"steps": 40})
    assert alone == "In short: on held-out synthetic English the run trained just now (40 steps) has WER 90.0%."
    report["real_speech"] = {"speech_system": "shipped release",
                             "scores": {"shipped release": {"wer": 1.08}, demo.WHISPER_ALONE: {"wer": 0.03}}}
    assert "on real human speech the shipped release has WER 108.0% and Whisper-base alone 3.0%" in demo.summary(
        report, {"steps": 40})


def test_cli_rejects_bad_flags(capsys):
    assert demo_cli.main(["--steps=0"]) == 2
    assert "slm-demo: error: --steps must be positive" in capsys.readouterr().err
    assert demo_cli.main(["--languages=en,xx"]) == 2
    assert "--languages must include en" in capsys.readouterr().err
    assert demo_cli.main(["--wav=/no/such/recording.wav"]) == 2
    assert "--wav: no such file: /no/such/recording.wav" in capsys.readouterr().err
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
    # The release and the real-speech section are on by default (and found from any directory).
    assert settings.release and settings.real_speech and os.path.isdir(demo.repo_path(settings.release))
    args = demo_cli.build_parser().parse_args(["--no_release", "--no_real_speech", f"--wav={__file__}"])
    off = demo_cli.settings_from_args(args)
    assert off.release == "" and off.real_speech == "" and off.wavs == (__file__,)


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    gin_file = tmp_path / "tiny_demo.gin"
    gin_file.write_text(TINY_GIN)
    out = tmp_path / "demo"
    settings = demo.DemoSettings(
        out_dir=str(out), gin_files=(str(gin_file),), corpus_size=70, languages=("en", "fr"),
        synthesizer="tones", workers=1, steps=3, alignment_steps=2, batch_size=8, warmup_steps=1, eval_per_task=2,
        eval_batch_size=2, max_new_tokens=8, minutes=5, release="", real_speech="",
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
    # planned batches' shapes (a short budget: at least min_steps). The export above stands in for
    # the shipped release, on a machine that looks busy: the live run is short, the demo says why,
    # and the release is evaluated on the same utterances all the same.
    # The real-speech section on one short real recording and a --wav of the user: the release,
    # Whisper-base alone and the cascade (here the tiny LLM) each answer, and each WER is the
    # WER of its own answer.
    recording = pathlib.Path(demo.REPO_ROOT) / "release" / "real_speech" / "sphinx_goforward.wav"
    (tmp_path / "real.tsv").write_text(f"# one recording\n{recording}\tgo forward ten meters\n")
    monkeypatch.setattr(demo, "machine_load", lambda: {"load_at_start": 7.5, "cores": 2})
    sized = demo.run_demo(dataclasses.replace(settings, steps=None, minutes=1.0, min_steps=2,
                                              release=str(out / "release"), real_speech=str(tmp_path / "real.tsv"),
                                              wavs=(str(recording),)))
    printed = capsys.readouterr().out
    section = sized["real_speech"]
    assert section["speech_system"] == "shipped release" and section["references"] == ["go forward ten meters"]
    assert set(section["answers"]) == {"shipped release", demo.WHISPER_ALONE, demo.CASCADE}
    for system, said in section["answers"].items():
        wer = metrics.word_error_rate(["go forward ten meters"], said)
        assert section["scores"][system]["wer"] == wer
        assert f"{system}  " in printed and f"{100 * wer:.1f}%" in printed
        assert section["wavs"][str(recording)][system] == said[0]  # the same audio, the same answer
    assert section["scores"][demo.WHISPER_ALONE]["wer"] <= 0.25  # Whisper-base hears real speech
    assert "Real human speech" in printed and "Your recordings:" in printed
    assert "batch shapes to compile" in printed and "s per mean step" in printed and "2 alignment steps" in printed
    assert "(this run and the shipped release)" in printed  # its evaluation is in the plan's time
    assert sized["run"]["steps"] >= 4 and sized["run"]["step_seconds"] > 0
    steps = sized["run"]["steps"]
    header = next(line for line in printed.splitlines() if line.startswith("task "))
    assert "shipped release, 5 steps" in header and f"trained just now, {steps} steps" in header
    assert "cascade (release transcript)" in header
    # The release's column is its own answers: scored from its predictions, the same examples as the live run's.
    assert set(sized["release"]["tasks"]) == set(sized["slm"]["tasks"])
    for task, scores in sized["release"]["tasks"].items():
        rows = sized["release"]["predictions"][task]
        assert [r["id"] for r in rows] == [r["id"] for r in sized["slm"]["predictions"][task]]
        assert scores == evaluation.score_task(task, [r["reference"] for r in rows], [r["prediction"] for r in rows],
                                               [{"instruction": r["instruction"], "target": r["reference"]} for r in rows])
    asr = next(line.split() for line in printed.splitlines() if line.startswith("asr_en "))
    assert asr[3:5] == [f"{100 * sized['release']['tasks']['asr_en']['wer']:.1f}%",
                        f"{100 * sized['slm']['tasks']['asr_en']['wer']:.1f}%"]
    assert f"this machine is busy (load average 7.5 on 2 cores when the demo started): the live run got {steps} steps" in printed
    assert "the shipped release's column shows what the design reaches" in printed
    # It ends on what each model reached, the release first (only the report's path and a command follow).
    tail = [line for line in printed.strip().splitlines() if line.strip()][-3:]
    assert tail[0].startswith("In short: on held-out synthetic English the shipped release has WER "
                              f"{100 * sized['release']['tasks']['asr_en']['wer']:.1f}%")
    assert tail[1].startswith("total ") and "slm-infer" in tail[2] and str(out / "release") in tail[2]
    # A release of other frozen models is left out before the training, with the reason.
    other = dataclasses.replace(model, llm_source="random:7")
    assert "trained on the frozen models" in demo.release_mismatch(str(out / "release"), other)
    assert demo.release_mismatch(str(out / "release"), model) is None
    assert "cannot be read" in demo.release_mismatch(str(tmp_path), model)


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
