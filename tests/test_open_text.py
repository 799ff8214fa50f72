"""Free-form English (``open_text``) and the opt-in corpus task ``asr_en_open``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest

from slm_jax.inference import evaluation
from slm_jax.cli import make_corpus as make_corpus_cli
from slm_jax.data.corpus import builder as corpus, open_text

pytest.importorskip("essential_generators")

# Written independently of open_text's own filter: ASCII letters, inner apostrophes or hyphens,
# commas between words, one full stop at the end; the first letter a capital.
_WORD = r"[A-Za-z]+(?:['-][A-Za-z]+)*"
SENTENCE = re.compile(rf"(?=[A-Z]){_WORD},?(?: {_WORD},?)* {_WORD}\.")


@pytest.fixture(scope="module")
def five_hundred() -> list[str]:
    return open_text.sentences(500, seed=0)


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sentences_are_deterministic_per_seed():
    a = open_text.sentence(np.random.default_rng(7))
    assert a == open_text.sentence(np.random.default_rng(7))
    assert open_text.sentences(20, seed=3) == open_text.sentences(20, seed=3)
    # One generator per sentence: the first sentences do not depend on how many are asked for.
    assert open_text.sentences(5, seed=3) == open_text.sentences(20, seed=3)[:5]


def test_different_seeds_give_different_sentences():
    a, b = open_text.sentences(20, seed=0), open_text.sentences(20, seed=1)
    assert sum(x != y for x, y in zip(a, b)) >= 18
    assert len(set(a) & set(b)) <= 2
    assert len(set(a)) >= 18  # and the sentences of one seed differ from one another


def test_sentences_pass_the_filters(five_hundred):
    for s in five_hundred:
        assert s.isascii() and SENTENCE.fullmatch(s), s
        assert not re.search(r"[0-9()\[\]{}<>\"/:;@#&=_|~]|www|http", s), s
        words = s.split()
        assert open_text.MIN_WORDS <= len(words) <= open_text.MAX_WORDS, s
        for w in words:
            letters = re.sub(r"[^A-Za-z]", "", w)
            assert len(letters) <= open_text.MAX_WORD_LETTERS, (w, s)
            assert len(letters) == 1 or not letters.isupper(), (w, s)  # no acronym espeak-ng would spell
        assert words[-1][:-1].lower() not in open_text.ABBREVIATIONS and len(words[-1]) > 2, s


def test_vocabulary_is_large(five_hundred):
    words = {w.strip(",.").lower() for s in five_hundred for w in s.split()}
    assert len(words) > 1000
    lengths = [len(s.split()) for s in five_hundred]
    assert len(set(lengths)) >= 10  # short and long sentences, not one length


@pytest.mark.parametrize("token,clean", [
    ("house", True), ("well-known", True), ("world's", True), ("Paris,", True), ("end.", True), ("I", True),
    ("1990", False), ("(see", False), ('"quoted', False), ("U.S.", False), ("NASA", False), ("II", False),
    ("Mr.", False), ("B.", False), ("http://x.org", False), ("café", False), ("'tis'", False),
    ("a" * (open_text.MAX_WORD_LETTERS + 1), False), ("word;", False), ("<br/>", False),
])
def test_word_filter(token, clean):
    assert open_text.is_clean_word(token) is clean


# --------------------------------------------------------------------------------------------
# The opt-in corpus task
# --------------------------------------------------------------------------------------------
def _fingerprint(specs) -> str:
    # Over the fields the recorded fingerprints were taken with; ``acoustics`` came later and is
    # None unless augment_share asks for it.
    assert all(s.acoustics is None for s in specs)
    names = [f.name for f in dataclasses.fields(corpus.ExampleSpec) if f.name != "acoustics"]
    return hashlib.sha256(json.dumps([[getattr(s, n) for n in names] for s in specs]).encode()).hexdigest()


def test_default_plans_are_unchanged():
    # Computed with plan_corpus before asr_en_open existed (commit 36b680e): without --open_asr,
    # every example id and content is what it was.
    assert _fingerprint(corpus.plan_corpus(60, seed=3)) == \
        "c919584fecb62ae6aab627c112e8065be9d931ff29ad4a88f79011b649948a55"
    assert _fingerprint(corpus.plan_corpus(100, seed=0, languages=("en", "fr"))) == \
        "bcd932533c9e4ce551efd8bd0ce89fdd47f92907ad50e17b583793e5ed77916f"
    assert corpus.plan_corpus(60, seed=3, open_asr=0) == corpus.plan_corpus(60, seed=3)
    assert "asr_en_open" not in corpus.TASKS and "asr_en_open" in corpus.OPT_IN_TASKS


def test_open_asr_adds_exactly_n_free_form_examples():
    base = corpus.plan_corpus(40, seed=2)
    specs = corpus.plan_corpus(40, seed=2, open_asr=30)
    assert specs[:len(base)] == base
    extra = specs[len(base):]
    assert len(extra) == 30 and all(s.task == "asr_en_open" for s in extra)
    assert [s.id for s in extra] == [f"asr_en_open-{i:06d}" for i in range(30)]
    instructions = {i.format(language="English") for i in corpus.ASR_INSTRUCTIONS}
    for s in extra:
        assert s.split == corpus.split_of(s.id) and s.lang == "en"
        assert s.target == s.text and SENTENCE.fullmatch(s.text) and s.instruction in instructions
        assert s.voice.split("+")[0] in corpus.VOICES["en"] and 130 <= s.speed <= 190
    assert len({s.text for s in extra}) == 30
    assert len({s.split for s in extra}) >= 2  # split by the id's hash, like every other task
    # Per example: more of them, or another size, leaves the first ones as they were.
    assert corpus.plan_corpus(10, seed=2, open_asr=5)[-5:] == extra[:5]
    assert corpus.plan_corpus(40, seed=3, open_asr=5)[-5:] != extra[:5]
    with pytest.raises(ValueError, match="needs languages"):
        corpus.plan_corpus(10, languages=("fr",), open_asr=2)
    with pytest.raises(ValueError, match="must not be negative"):
        corpus.plan_corpus(10, open_asr=-1)


def test_open_asr_is_scored_by_word_error_rate():
    assert evaluation.task_family("asr_en_open") == "asr"
    scores = evaluation.score_task("asr_en_open", ["The cat sat down."], ["the cat sat"])
    assert scores["wer"] == pytest.approx(1 / 4)


def test_make_corpus_cli_open_asr_writes_and_registers_the_task(tmp_path, capsys):
    seqio = pytest.importorskip("seqio")
    from slm_jax import tasks

    out = tmp_path / "c"
    rc = make_corpus_cli.main([f"--out={out}", "--size=12", "--open_asr=6", "--languages=en", "--workers=1",
                               "--synthesizer=tones", "--vocab_size=0", "--quiet", "--snr_db=inf"])
    assert rc == 0
    assert "asr_en_open" in capsys.readouterr().out
    manifest = corpus.load_manifest(str(out))
    info = manifest["tasks"]["asr_en_open"]
    assert info["family"] == "asr" and not info["zero_shot"] and manifest["config"]["open_asr"] == 6
    assert sum(s["examples"] for s in info["splits"].values()) == 6
    paths = [p for split in info["splits"] for p in corpus.shard_paths(str(out), manifest, "asr_en_open", split)]
    texts = [ex["text"] for path in paths for ex in corpus.read_examples(path)]
    assert sorted(texts) == sorted(s.text for s in corpus.plan_corpus(12, languages=("en",), open_asr=6)[-6:])

    previous = tasks.corpus_tasks.registered_corpus_dir()
    try:
        names = tasks.corpus_tasks.register_corpus_tasks(str(out))
        assert "asr_en_open" in names
        assert "asr_en_open" in {t.name for t in seqio.get_mixture_or_task("asr").tasks}
        assert "asr_en_open" in {t.name for t in seqio.get_mixture_or_task("asr_ast_instruct").tasks}
    finally:
        tasks.register_all(previous)
    assert tasks.corpus_tasks.registered_corpus_dir() == previous


@pytest.mark.parametrize("args,message", [
    (["--open_asr=-1"], "--open_asr must not be negative"),
    (["--open_asr=3", "--languages=fr"], "add en to --languages"),
])
def test_make_corpus_cli_rejects_bad_open_asr(tmp_path, capsys, args, message):
    argv = [f"--out={tmp_path / 'c'}", "--synthesizer=tones", "--quiet", "--size=8"] + args
    assert make_corpus_cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_make_corpus_help_describes_open_asr(capsys):
    with pytest.raises(SystemExit):
        make_corpus_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--open_asr" in out and "asr_en_open" in out
