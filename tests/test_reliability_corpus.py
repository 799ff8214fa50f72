"""slm-make-corpus --out never deletes a file it did not write: a folder that is not a corpus is
refused in one line and left byte for byte as it was; --overwrite writes the new corpus next to
the old one and swaps it in only when complete (a failed run leaves the old corpus whole and no
staging folder behind); a file or a read-only location at --out is refused before synthesis."""

import json
import os

import pytest

import reliability_support as rs
from slm_jax.cli import make_corpus as cli
from slm_jax.data.corpus import builder

ARGS = ["--size=6", "--synthesizer=tones", "--workers=1", "--quiet", "--vocab_size=0", "--languages=en"]


def _make(out, *extra):
    return cli.main([f"--out={out}", *ARGS, *extra])


def _one_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("slm-make-corpus: error: ") and "Traceback" not in err, err
    return lines[0]


def _siblings(path):
    return sorted(n for n in os.listdir(path.parent) if n != path.name)


def _no_synthesis(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("synthesis started")

    monkeypatch.setattr(builder, "_run_jobs", refuse)


def test_a_folder_that_is_not_a_corpus_is_refused_and_left_as_it_was(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    (out / "asr_en").mkdir(parents=True)  # a task's name: the old code deleted such folders
    (out / "asr_en" / "notes.txt").write_text("my notes")
    (out / "photo.jpg").write_bytes(b"\xff\xd8 not a corpus")
    before = rs.snapshot(tmp_path)
    _no_synthesis(monkeypatch)
    for extra in ([], ["--overwrite"]):
        assert _make(out, *extra) == 2
        assert "is not a corpus" in _one_error(capsys)
        assert rs.snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_an_out_that_cannot_be_a_corpus_is_refused_before_synthesis(tmp_path, capsys, monkeypatch, where):
    if where == "file":
        out = tmp_path / "a_file"
        out.write_text("x")
        expected = "is a file"
    else:
        out = "/sys/slm_corpus_test"
        if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
            pytest.skip("no read-only location here")
        expected = "cannot write the corpus /sys/slm_corpus_test"
    before = rs.snapshot(tmp_path)
    _no_synthesis(monkeypatch)
    assert _make(out) == 2
    assert expected in _one_error(capsys)
    assert rs.snapshot(tmp_path) == before


def test_overwrite_swaps_in_a_complete_corpus_and_a_failed_one_leaves_the_old_whole(tmp_path, capsys, monkeypatch):
    out = tmp_path / "corpus"
    assert _make(out) == 0
    old_manifest = json.loads((out / builder.MANIFEST).read_text())
    before = rs.snapshot(tmp_path)
    capsys.readouterr()

    # Without --overwrite: refused, untouched.
    assert _make(out, "--seed=1") == 2
    assert "already holds a corpus" in _one_error(capsys)
    assert rs.snapshot(tmp_path) == before

    # A run that fails after writing part of its shards: the old corpus is as it was, no staging left.
    real_finish = builder._ShardedWriter.finish
    calls = []

    def failing_finish(self):
        calls.append(self.task)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_finish(self)

    monkeypatch.setattr(builder._ShardedWriter, "finish", failing_finish)
    with pytest.raises(OSError):
        builder.make_corpus(str(out), 6, seed=1, workers=1, synthesizer="tones", vocab_size=0, languages=["en"],
                            overwrite=True, progress=False)
    assert len(calls) == 2
    assert rs.snapshot(out) == {k: v for k, v in before.items() if k.startswith(str(out))}
    assert _siblings(out) == []
    monkeypatch.setattr(builder._ShardedWriter, "finish", real_finish)

    # A run that completes: the new corpus is in place, the old one is gone, nothing else is left.
    assert _make(out, "--seed=1", "--overwrite") == 0
    new_manifest = json.loads((out / builder.MANIFEST).read_text())
    assert new_manifest["config"]["seed"] == 1 and old_manifest["config"]["seed"] == 0
    assert _siblings(out) == []
    assert builder.load_manifest(str(out))["tasks"].keys() == new_manifest["tasks"].keys()


def test_overwrite_refuses_to_delete_files_that_are_not_the_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert _make(out) == 0
    (out / "my_notes.txt").write_text("keep me")
    before = rs.snapshot(tmp_path)
    capsys.readouterr()
    assert _make(out, "--overwrite") == 2
    assert "my_notes.txt" in _one_error(capsys)
    assert rs.snapshot(tmp_path) == before


def test_an_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _make(out) == 0
    assert (out / builder.MANIFEST).exists() and _siblings(out) == []
