"""Fake real corpora in their real on-disk formats, for the paper configs' smoke tests (no network).

  tfds_data_dir()   TFDS datasets as `tfds build` writes them (TFRecords + dataset_info.json):
                    librispeech:2.1.1 and xtreme_s/fleurs.{en_us,fr_fr,de_de,es_419}:2.0.0, built by
                    the real TFDS builders with their download step replaced by a few generated
                    examples (same features, same split names)
  covost2_dir()     CoVoST 2 as get_covost_splits.py leaves it: ROOT/SRC/covost_v2.SRC_TGT.{train,
                    dev,test}.tsv and Common Voice clips (48 kHz MP3) in ROOT/SRC/clips/
  voxpopuli_dir()   VoxPopuli transcribed data: ROOT/transcribed_data/LANG/asr_{train,dev,test}.tsv
                    and ROOT/transcribed_data/LANG/YEAR/ID.ogg (16 kHz Ogg Vorbis)

Each is built once per test session in a temporary directory (removed at exit).
"""

from __future__ import annotations

import atexit
import csv
import functools
import os
import shutil
import tempfile
import types

import numpy as np

EXAMPLES = {"train": 6, "validation": 3, "test": 2}
WORDS = "the speech of a quiet river under seven old bridges runs north again".split()


@functools.lru_cache(maxsize=None)
def _root() -> str:
    root = tempfile.mkdtemp(prefix="slm_real_corpora_")
    atexit.register(shutil.rmtree, root, True)
    return root


def _speech(rng, rate: int = 16000) -> np.ndarray:
    """0.4-1.2 s of a voiced-like signal (harmonics and noise) in [-0.5, 0.5]."""
    n = int(rate * rng.uniform(0.4, 1.2))
    t = np.arange(n) / rate
    f0 = rng.uniform(100, 220)
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5)) * 0.2 + rng.normal(0, 0.02, n)
    return np.clip(wave, -0.5, 0.5).astype(np.float32)


def _sentence(rng, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS, n))


# ----------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------
def _build_tfds(name: str, data_dir: str, split_names: dict, make_example) -> None:
    """Runs the real builder of ``name`` into ``data_dir`` with generated examples for its splits."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)

    def split_generators(dl_manager, *args, **kwargs):
        del dl_manager, args, kwargs
        return {tfds_split: _examples(tfds_split, n) for tfds_split, n in split_names.items()}

    def _examples(split, n):
        rng = np.random.default_rng(abs(hash((name, split))) % 2**32)
        for i in range(n):
            yield f"{split}-{i}", make_example(rng, split, i)

    builder._split_generators = split_generators  # the download step: nothing is fetched
    # (nor is a download manager needed: TFDS's own needs its checksum files, which it reads
    # through importlib_resources)
    builder._make_download_manager = lambda *args, **kwargs: types.SimpleNamespace(downloaded_size=0)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assert tfds.builder(name, data_dir=data_dir).is_prepared()


@functools.lru_cache(maxsize=None)
def tfds_data_dir() -> str:
    data_dir = os.path.join(_root(), "tensorflow_datasets")

    def librispeech(rng, split, i):
        pcm = (_speech(rng) * 32767).astype(np.int16)
        return {"id": f"{100 + i}-{200}-{i:04d}", "speaker_id": 100 + i, "chapter_id": 200,
                "speech": pcm, "text": _sentence(rng).upper()}

    splits = {"train_clean100": 3, "train_clean360": 2, "train_other500": 2, "dev_clean": 3, "test_clean": 2}
    _build_tfds("librispeech:2.1.1", data_dir, splits, librispeech)
    for locale in ("en_us", "fr_fr", "de_de", "es_419"):
        def fleurs(rng, split, i, locale=locale):
            pcm = (_speech(rng) * 32767).astype(np.int64)
            text = _sentence(rng)
            return {"id": 1000 + i, "num_samples": len(pcm), "path": f"/fleurs/{locale}/{split}/{i}.wav",
                    "audio": pcm, "raw_transcription": text.capitalize() + ".", "transcription": text,
                    "gender": i % 2, "lang_id": 0, "language": locale, "lang_group_id": 0}

        _build_tfds(f"xtreme_s/fleurs.{locale}:2.0.0", data_dir, dict(EXAMPLES), fleurs)
    return data_dir


# ----------------------------------------------------------------------------------------------
# CoVoST 2 and VoxPopuli: TSV manifests and audio files
# ----------------------------------------------------------------------------------------------
def _write_tsv(path: str, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writeheader()
        writer.writerows(rows)


@functools.lru_cache(maxsize=None)
def covost2_dir() -> str:
    import soundfile

    root = os.path.join(_root(), "covost2")
    for src, tgt in (("en", "de"), ("fr", "en"), ("de", "en"), ("es", "en")):
        lang_dir = os.path.join(root, src)
        os.makedirs(os.path.join(lang_dir, "clips"), exist_ok=True)
        rng = np.random.default_rng(len(src + tgt))
        for split, file_split in (("train", "train"), ("validation", "dev"), ("test", "test")):
            rows = []
            for i in range(EXAMPLES[split]):
                clip = f"common_voice_{src}_{tgt}_{file_split}_{i}.mp3"
                soundfile.write(os.path.join(lang_dir, "clips", clip), np.repeat(_speech(rng), 3), 48000,
                                format="MP3", subtype="MPEG_LAYER_III")
                rows.append({"path": clip, "sentence": _sentence(rng), "translation": _sentence(rng),
                             "client_id": f"client{i}"})
            _write_tsv(os.path.join(lang_dir, f"covost_v2.{src}_{tgt}.{file_split}.tsv"),
                       ["path", "sentence", "translation", "client_id"], rows)
    return root


@functools.lru_cache(maxsize=None)
def voxpopuli_dir() -> str:
    import soundfile

    root = os.path.join(_root(), "voxpopuli")
    fields = ["id", "raw_text", "normalized_text", "speaker_id", "split", "gender", "is_gold_transcript",
              "accent"]
    for lang in ("en", "fr", "de", "es"):
        lang_dir = os.path.join(root, "transcribed_data", lang)
        rng = np.random.default_rng(len(lang) + 7)
        for split, file_split in (("train", "train"), ("validation", "dev"), ("test", "test")):
            rows = []
            for i in range(EXAMPLES[split]):
                utt = f"20180111-0900-PLENARY-{i}-{lang}_20180111-17:30:{i:02d}_{file_split}"
                os.makedirs(os.path.join(lang_dir, utt[:4]), exist_ok=True)
                soundfile.write(os.path.join(lang_dir, utt[:4], f"{utt}.ogg"), _speech(rng), 16000,
                                format="OGG", subtype="VORBIS")
                text = _sentence(rng)
                rows.append({"id": utt, "raw_text": text.capitalize() + ".", "normalized_text": text,
                             "speaker_id": str(i), "split": file_split, "gender": "female",
                             "is_gold_transcript": "True", "accent": "None"})
            _write_tsv(os.path.join(lang_dir, f"asr_{file_split}.tsv"), fields, rows)
    return root
