"""slm-demo's real-speech section: WER per system from the systems' own answers, the table that
shows them with the reference, the statement that says plainly how each did (the paper-design
release included), the recordings it reads and refuses, and Whisper-base alone (the cascade's
first stage) on one short real recording."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from slm_jax.apps import demo
from slm_jax.errors import UserError

REAL_SPEECH = pathlib.Path(__file__).resolve().parents[1] / "release" / "real_speech"


def _whisper_available() -> bool:
    from slm_jax.weights import assets

    return assets.whisper_base_available()


def test_wer_per_system_is_computed_from_its_answers():
    references = ["Go forward ten meters.", "And so my fellow Americans"]
    answers = {
        "exact": ["go forward ten meters", "and so, my fellow Americans!"],  # case and punctuation do not count
        "one digit": ["Go forward 10 meters.", "And so my fellow Americans."],  # 1 substitution in 9 words
        "unrelated": ["I'll send you a post.", ""],  # 5 substitutions + 5 deletions
    }
    scores = demo.real_speech_scores(references, answers)
    assert scores["exact"] == {"wer": 0.0, "per_file": [0.0, 0.0]}
    assert scores["one digit"]["wer"] == pytest.approx(1 / 9)
    assert scores["one digit"]["per_file"] == [pytest.approx(1 / 4), 0.0]
    assert scores["unrelated"]["wer"] == pytest.approx((5 + 5) / 9)  # 4 substitutions + 1 insertion; 5 deletions
    assert scores["unrelated"]["per_file"] == [pytest.approx(5 / 4), 1.0]


def _section(speech_wer_answers):
    references = ["go forward ten meters", "he turned sharply"]
    answers = {"shipped release": speech_wer_answers, demo.WHISPER_ALONE: ["Go forward 10 meters.", "He turned sharply."],
               demo.CASCADE: ["Go forward ten meters.", "He turned sharply."]}
    return {"names": ["/x/sphinx_goforward.wav", "/x/arctic_a0009.wav"], "references": references,
            "speech_system": "shipped release", "answers": answers,
            "scores": demo.real_speech_scores(references, answers), "wavs": {}, "whisper_missing": None}


def test_the_table_shows_each_systems_wer_and_answers_and_the_statement_does_not_hide_a_failure():
    section = _section(["I'll send you a post after tomorrow.", "Stern Monday."])
    table = demo.real_speech_table(section, shown=1)
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in table.splitlines()[2:5]}
    assert rows == {"shipped release": f"{100 * section['scores']['shipped release']['wer']:.1f}%",
                    demo.WHISPER_ALONE: "14.3%", demo.CASCADE: "0.0%"}
    assert "2 recordings, 7 words" in table.splitlines()[0]
    assert "sphinx_goforward.wav" in table and "'go forward ten meters'" in table
    assert "\"I'll send you a post after tomorrow.\"" in table and "(WER 25%)" in table
    assert "arctic_a0009" not in table  # only the first `shown`
    said = demo.real_speech_statement(section)
    wer = section["scores"]["shipped release"]["wer"]
    assert wer > 1 and f"the shipped release has WER {100 * wer:.1f}% (it does not transcribe)" in said
    assert "Whisper-base alone, its own decoder: WER 14.3%" in said and "(the cascade): 0.0%" in said
    good = demo.real_speech_statement(_section(["go forward ten meters", "he turned sharply"]))
    assert "WER 0.0% (usable transcripts)." in good and "does not" not in good


def test_recordings_are_read_from_the_tsv_and_bad_ones_refused_before_any_work(tmp_path):
    rows = demo.read_transcripts(str(REAL_SPEECH / "transcripts.tsv"))
    assert len(rows) == 7 and rows[0] == (str(REAL_SPEECH / "arctic_a0007.wav"),
                                          "And you always want to see it in the superlative degree.")
    bad = tmp_path / "bad.tsv"
    bad.write_text("# comment\n\nclip.wav\n")
    with pytest.raises(UserError, match="bad.tsv:3: expected 'path<TAB>transcript'"):
        demo.read_transcripts(str(bad))
    import soundfile

    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(16000 * 31, np.float32), 16000)
    with pytest.raises(UserError, match="long.wav"):
        demo.load_recording(str(long))
    with pytest.raises(UserError, match="no such audio file"):
        demo.load_recording(str(tmp_path / "missing.wav"))
    assert demo.load_recording(rows[0][0]).ndim == 1


@pytest.mark.skipif(not _whisper_available(), reason="needs the Whisper-base packages")
@pytest.mark.slow
def test_whisper_base_alone_transcribes_a_short_real_recording():
    from slm_jax.data import audio
    from slm_jax.contrib.whisper_cascade.text_cascade import WhisperBaseTranscriber
    from slm_jax.inference import metrics

    features = audio.log_mel_spectrogram(audio.load_audio(str(REAL_SPEECH / "sphinx_goforward.wav")))
    whisper = WhisperBaseTranscriber()
    said = whisper.transcribe([features])
    # Whisper-base writes "Go forward 10 meters." (a digit for "ten": one word of four wrong).
    assert metrics.word_error_rate(["go forward ten meters"], said) <= 0.25, said
    with pytest.raises(ValueError, match="longer than Whisper's window"):
        whisper.transcribe([np.zeros((whisper.max_frames + 1, 80), np.float32)])
