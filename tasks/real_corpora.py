"""SeqIO tasks over real speech corpora, for users on a machine that has them.

Same output features and shared preprocessors as the corpus tasks (log-mel, prompt, tokens), so
they mix with them and feed the same FeatureConverter.

  librispeech_asr              TFDS librispeech (train_clean100+360+other500 / dev_clean / test_clean)
  fleurs_asr_{en,fr,de,es}     TFDS xtreme_s/fleurs.<locale> (train / validation / test)
  covost2_en_de, covost2_{fr,de,es}_en
                               CoVoST 2 TSVs + Common Voice clips (no TFDS builder), from
                               $SLM_COVOST2_DIR (default data/covost2)
  voxpopuli_asr_{en,fr,de,es}  VoxPopuli transcribed data (no TFDS builder), from
                               $SLM_VOXPOPULI_DIR (default data/voxpopuli)

They register without any data. Using one whose data is missing raises a single
``DataNotPreparedError`` that says how to prepare it.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

from slm_jax.data import audio as audio_lib
from slm_jax.data.seqio import preprocessors as prep
from slm_jax.data.errors import DataNotPreparedError
from slm_jax.data.prompting import T5_PROMPT, PromptFormat

LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}
FLEURS_LOCALES = {"en": "en_us", "fr": "fr_fr", "de": "de_de", "es": "es_419"}
COVOST2_PAIRS = (("en", "de"), ("fr", "en"), ("de", "en"), ("es", "en"))
SEQIO_SPLITS = ("train", "validation", "test")

_registered: list[str] = []


def _tfds_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


class PreparedTfdsSource(seqio.TfdsDataSource):
    """A TfdsDataSource that checks, before any read, that the dataset was built on this machine."""

    def __init__(self, tfds_name: str, splits: dict, task: str, how_to_prepare: str):
        super().__init__(tfds_name=tfds_name, splits=splits)
        self._task, self._tfds_name, self._how = task, tfds_name, how_to_prepare

    def check_prepared(self) -> None:
        import tensorflow_datasets as tfds

        data_dir = _tfds_data_dir()
        builder = tfds.builder(self._tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            raise DataNotPreparedError(
                f"task {self._task}: TFDS dataset {self._tfds_name} is not prepared in {data_dir}; {self._how}, "
                f"then set TFDS_DATA_DIR to that directory")

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        self.check_prepared()
        return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)

    def list_shards(self, split: str) -> Sequence[str]:
        self.check_prepared()
        return super().list_shards(split)

    def num_input_examples(self, split: str):
        self.check_prepared()
        return super().num_input_examples(split)


class TsvManifestSource(seqio.DataSource):
    """Rows of a corpus' own TSV files -> (id, path, target); audio decoded in the pipeline.

    ``read_rows(split)`` returns ``[(id, audio_path, target), ...]`` or raises
    DataNotPreparedError; it is called only when a dataset is asked for.
    """

    def __init__(self, task: str, read_rows: Callable[[str], list[tuple[str, str, str]]]):
        super().__init__(splits=SEQIO_SPLITS, caching_permitted=False)
        self._task, self._read_rows = task, read_rows

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [path for _, path, _ in self._read_rows(split)]

    def num_input_examples(self, split: str) -> int:
        return len(self._read_rows(split))

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs) -> tf.data.Dataset:
        rows = self._read_rows(split)
        ds = tf.data.Dataset.from_tensor_slices({k: [r[i] for r in rows] for i, k in enumerate(("id", "path", "target"))})
        if shard_info is not None:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed)
        return ds


def _read_audio_file(path):  # the numpy side of a tf.numpy_function: returns float32 samples
    return audio_lib.load_audio(path.decode() if isinstance(path, bytes) else str(path))


def decode_audio_files(dataset, task: str, instruction: str):
    """(id, path, target) -> the common example; the file is read and resampled to 16 kHz."""

    def decode(ex):
        samples = tf.numpy_function(_read_audio_file, [ex["path"]], tf.float32, stateful=False)
        out = {"id": ex["id"], "task": tf.constant(task), "samples": samples,
               "instruction": tf.constant(instruction), "target": ex["target"]}
        out["samples"] = prep.checked_samples(out)
        return out

    return dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def from_tfds_fields(dataset, task: str, audio_key: str, text_key: str, instruction: str, lower: bool = False):
    """A TFDS speech example (int PCM at 16 kHz + transcript) -> the common example."""

    def convert(ex):
        target = ex[text_key]
        out = {"id": tf.strings.as_string(ex["id"]) if ex["id"].dtype != tf.string else ex["id"],
               "task": tf.constant(task), "samples": tf.cast(ex[audio_key], tf.float32) / 32768.0,
               "instruction": tf.constant(instruction), "target": tf.strings.lower(target) if lower else target}
        out["samples"] = prep.checked_samples(out)
        return out

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------
# Local manifests in the corpora's own formats
# --------------------------------------------------------------------------------------------
def _read_tsv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def covost2_rows(root: str, src: str, tgt: str, task: str) -> Callable[[str], list]:
    """CoVoST 2 as split by its get_covost_splits.py: ROOT/SRC/covost_v2.SRC_TGT.{train,dev,test}.tsv
    (columns path, sentence, translation, client_id) and Common Voice clips in ROOT/SRC/clips/."""

    def read(split: str) -> list:
        lang_dir = os.path.join(root, src)
        tsv = os.path.join(lang_dir, f"covost_v2.{src}_{tgt}.{'dev' if split == 'validation' else split}.tsv")
        if not os.path.exists(tsv):
            raise DataNotPreparedError(
                f"task {task}: {tsv} not found; prepare CoVoST 2: download Common Voice (version 4) {src} into "
                f"{lang_dir} (clips/ and validated.tsv) and covost_v2.{src}_{tgt}.tsv from the CoVoST repository, run "
                f"`python get_covost_splits.py --version 2 --src-lang {src} --tgt-lang {tgt} --root {lang_dir} "
                f"--cv-tsv {lang_dir}/validated.tsv`, and set SLM_COVOST2_DIR={root}")
        return [(r["path"], os.path.join(lang_dir, "clips", r["path"]), r["translation"]) for r in _read_tsv(tsv)]

    return read


def voxpopuli_rows(root: str, lang: str, task: str) -> Callable[[str], list]:
    """VoxPopuli transcribed data: ROOT/transcribed_data/LANG/asr_{train,dev,test}.tsv (columns id,
    raw_text, normalized_text, ...) and audio ROOT/transcribed_data/LANG/YEAR/ID.ogg."""

    def read(split: str) -> list:
        lang_dir = os.path.join(root, "transcribed_data", lang)
        tsv = os.path.join(lang_dir, f"asr_{'dev' if split == 'validation' else split}.tsv")
        if not os.path.exists(tsv):
            raise DataNotPreparedError(
                f"task {task}: {tsv} not found; prepare VoxPopuli with its repository: "
                f"`python -m voxpopuli.download_audios --root {root} --subset asr` then "
                f"`python -m voxpopuli.get_asr_data --root {root} --lang {lang}`, and set SLM_VOXPOPULI_DIR={root}")
        return [(r["id"], os.path.join(lang_dir, r["id"][:4], f"{r['id']}.ogg"), r["raw_text"]) for r in _read_tsv(tsv)]

    return read


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def register_real_corpus_tasks(vocabulary: seqio.Vocabulary, prompt_format: PromptFormat = T5_PROMPT,
                               covost2_dir: Optional[str] = None, voxpopuli_dir: Optional[str] = None) -> list[str]:
    """(Re)registers the real-corpus tasks with ``vocabulary`` and ``prompt_format``."""
    import functools

    covost2_dir = covost2_dir or os.environ.get("SLM_COVOST2_DIR") or "data/covost2"
    voxpopuli_dir = voxpopuli_dir or os.environ.get("SLM_VOXPOPULI_DIR") or "data/voxpopuli"
    for name in _registered:
        seqio.TaskRegistry.remove(name)
    _registered.clear()
    features = prep.speech_output_features(vocabulary)
    shared = prep.speech_preprocessors(prompt_format)

    def add(name: str, source, first: Callable):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=source, preprocessors=[first, *shared], output_features=features,
                               shuffle_buffer_size=256)
        _registered.append(name)

    librispeech_build = "build it on a machine with internet: `tfds build librispeech` (about 60 GB)"
    add("librispeech_asr",
        PreparedTfdsSource("librispeech:2.1.1", {"train": "train_clean100+train_clean360+train_other500",
                                                  "validation": "dev_clean", "test": "test_clean"},
                           "librispeech_asr", librispeech_build),
        functools.partial(from_tfds_fields, task="librispeech_asr", audio_key="speech", text_key="text",
                          instruction="Transcribe the speech.", lower=True))
    for lang, locale in FLEURS_LOCALES.items():
        name = f"fleurs_asr_{lang}"
        add(name,
            PreparedTfdsSource(f"xtreme_s/fleurs.{locale}:2.0.0", {s: s for s in SEQIO_SPLITS}, name,
                               f"build it on a machine with internet: `tfds build xtreme_s --config fleurs.{locale}`"),
            functools.partial(from_tfds_fields, task=name, audio_key="audio", text_key="raw_transcription",
                              instruction=f"Transcribe the {LANGUAGE_NAMES[lang]} speech."))
    for src, tgt in COVOST2_PAIRS:
        name = f"covost2_{src}_{tgt}"
        add(name, TsvManifestSource(name, covost2_rows(covost2_dir, src, tgt, name)),
            functools.partial(decode_audio_files, task=name,
                              instruction=f"Translate the speech into {LANGUAGE_NAMES[tgt]}."))
    for lang in FLEURS_LOCALES:
        name = f"voxpopuli_asr_{lang}"
        add(name, TsvManifestSource(name, voxpopuli_rows(voxpopuli_dir, lang, name)),
            functools.partial(decode_audio_files, task=name, instruction="Transcribe the speech."))
    return list(_registered)


def real_task_names() -> list[str]:
    return list(_registered)
