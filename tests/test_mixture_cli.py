"""slm-mixture list / inspect on the small session corpus."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from corpus_fixture import small_corpus, use_corpus

pytest.importorskip("seqio")

from slm_jax.cli import mixture  # noqa: E402


@pytest.fixture(autouse=True)
def _default_registration():
    yield
    use_corpus(small_corpus())  # the CLI re-registers with --corpus_dir; leave the default behind


def test_list_shows_mixtures_and_tasks(capsys):
    root = small_corpus()
    assert mixture.main(["list", f"--corpus_dir={root}"]) == 0
    out = capsys.readouterr().out
    assert f"corpus: {root}" in out
    assert re.search(r"asr_ast_instruct\s+11 tasks: .*instruct_qa", out)
    assert re.search(r"^  asr\s+4 tasks: asr_de, asr_en, asr_es, asr_fr$", out, re.M)
    for name in ("ast_en_de", "zeroshot_which_colour", "librispeech_asr", "fleurs_asr_es", "covost2_en_de",
                 "voxpopuli_asr_fr"):
        assert re.search(rf"^  {name}\s", out, re.M), name
    assert re.search(r"zeroshot_which_colour\s+\[test\]", out)


@pytest.mark.slow  # builds several full pipelines: about 30 s measured on a busy 2-core machine
def test_inspect_reports_counts_rates_lengths_and_writes_png_and_wavs(tmp_path, capsys):
    import soundfile
    from matplotlib import image

    root = small_corpus()
    png, wavs = tmp_path / "mix.png", tmp_path / "wav"
    rc = mixture.main(["inspect", "asr_ast_instruct", f"--corpus_dir={root}", f"--png={png}", f"--wav={wavs}",
                       "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    manifest = json.loads(open(os.path.join(root, "manifest.json")).read())
    sizes = {n: i["splits"].get("train", {}).get("examples", 0) for n, i in manifest["tasks"].items()
             if not i["zero_shot"] and i["splits"].get("train", {}).get("examples", 0)}
    rows = {m.group(1): m for m in re.finditer(r"^(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)", out, re.M)}
    assert set(rows) == set(sizes)
    rates = {n: float(rows[n].group(4)) for n in rows}
    assert sum(rates.values()) == pytest.approx(1.0, abs=0.01)
    for name, size in sizes.items():
        assert int(rows[name].group(2)) == size
        assert rates[name] == pytest.approx(size / sum(sizes.values()), abs=0.001)
        hours = manifest["tasks"][name]["splits"]["train"]["seconds"] / 3600
        assert float(rows[name].group(3)) == pytest.approx(hours, abs=1e-4)
    assert out.count("    instruction: ") == len(sizes) and out.count("    target:      ") == len(sizes)
    # The picture: a spectrogram and histograms make a wide, colourful image.
    pixels = image.imread(str(png))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    assert np.std(pixels[..., :3]) > 0.1
    # One clip per task, 16 kHz, with its instruction and target beside it.
    clips = sorted(wavs.glob("*.wav"))
    assert len(clips) == len(sizes)
    audio, rate = soundfile.read(clips[0])
    assert rate == 16000 and audio.ndim == 1 and len(audio) > 1600
    assert len((wavs / clips[0].name.replace(".wav", ".txt")).read_text().splitlines()) == 2


def test_inspect_unknown_name_lists_close_matches(capsys):
    assert mixture.main(["inspect", "asr_ast_instrukt", f"--corpus_dir={small_corpus()}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm-mixture: error: unknown task or mixture 'asr_ast_instrukt'; did you mean asr_ast_instruct")
    assert "Traceback" not in err


def test_inspect_without_data_says_how_to_prepare(tmp_path, capsys):
    missing = tmp_path / "none"
    assert mixture.main(["inspect", "asr", f"--corpus_dir={missing}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"slm-make-corpus --out={missing}" in err and err.count("\n") == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        mixture.main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--png" in out and "--wav" in out and "--subsample" in out
