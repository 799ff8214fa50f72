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

Mixtures for training (the paper's ASR + AST mixture, rates by size) are named in a gin file with
``real_corpora_mixture`` (gin/data/real_corpora_data.gin): it sets where the data lies
(``TFDS_DATA_DIR``, ``COVOST2_DIR``, ``VOXPOPULI_DIR``), registers the tasks over those
directories and the mixture of the listed tasks, each at a rate equal to its number of training
examples. A location left at ``%gin.REQUIRED`` stops the run with one line naming its macro.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

from slm_jax.data import audio as audio_lib
from slm_jax.data.seqio import preprocessors as prep
from slm_jax.data.errors import DataError, DataNotPreparedError
from slm_jax.data.prompting import T5_PROMPT, PromptFormat

LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}
FLEURS_LOCALES = {"en": "en_us", "fr": "fr_fr", "de": "de_de", "es": "es_419"}
COVOST2_PAIRS = (("en", "de"), ("fr", "en"), ("de", "en"), ("es", "en"))
SEQIO_SPLITS = ("train", "validation", "test")

_registered: list[str] = []
# Set by ``real_corpora_mixture`` (a gin configuration): the data locations and the mixtures that
# every later (re)registration keeps, e.g. SeqioData's registration with the LLM's vocabulary.
_configured: dict = {"tfds_data_dir": None, "covost2_dir": None, "voxpopuli_dir": None,
                     "max_audio_seconds": None, "mixtures": {}}


def _tfds_data_dir() -> str:
    return (_configured["tfds_data_dir"] or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


class PreparedTfdsSource(seqio.TfdsDataSource):
    """A TfdsDataSource that checks, before any read, that the dataset was built on this machine."""

    def __init__(self, tfds_name: str, splits: dict, task: str, how_to_prepare: str,
                 data_dir: Optional[str] = None):
        data_dir = data_dir or _tfds_data_dir()
        super().__init__(tfds_name=tfds_name, splits=splits, tfds_data_dir=data_dir)
        self._task, self._tfds_name, self._how, self._data_dir = task, tfds_name, how_to_prepare, data_dir
        self._split_parts = dict(splits)

    def check_prepared(self) -> None:
        import tensorflow_datasets as tfds

        data_dir = self._data_dir
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
        """From the prepared dataset's info; a split such as 'a+b' (LibriSpeech's train) sums its parts."""
        import tensorflow_datasets as tfds

        self.check_prepared()
        info = tfds.builder(self._tfds_name, data_dir=self._data_dir).info
        parts = self._split_parts.get(split, split).split("+")
        return sum(int(info.splits[part].num_examples) for part in parts)


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


def drop_longer_than(dataset, max_seconds: float):
    """Keeps the examples of at most ``max_seconds`` of audio: the speech encoder's window (Whisper:
    30 s). The real corpora hold a few longer utterances (LibriSpeech's train, up to 35 s), which the
    encoder cannot take; they are left out of training by design, as in the paper's 30 s windows."""
    import tensorflow as tf

    limit = int(round(max_seconds * audio_lib.SAMPLE_RATE))
    return dataset.filter(lambda ex: tf.size(ex["samples"]) <= limit)


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
_last_registration: dict = {"vocabulary": None, "prompt_format": T5_PROMPT}


def register_real_corpus_tasks(vocabulary: seqio.Vocabulary, prompt_format: PromptFormat = T5_PROMPT,
                               covost2_dir: Optional[str] = None, voxpopuli_dir: Optional[str] = None,
                               tfds_data_dir: Optional[str] = None,
                               max_audio_seconds: Optional[float] = None) -> list[str]:
    """(Re)registers the real-corpus tasks with ``vocabulary`` and ``prompt_format``, and the
    mixtures ``real_corpora_mixture`` configured. Locations: the arguments, else the configured
    ones, else $SLM_COVOST2_DIR / $SLM_VOXPOPULI_DIR / $TFDS_DATA_DIR, else the defaults.
    ``max_audio_seconds``: examples with longer audio are left out (``drop_longer_than``)."""
    import functools

    covost2_dir = (covost2_dir or _configured["covost2_dir"] or os.environ.get("SLM_COVOST2_DIR")
                   or "data/covost2")
    voxpopuli_dir = (voxpopuli_dir or _configured["voxpopuli_dir"] or os.environ.get("SLM_VOXPOPULI_DIR")
                     or "data/voxpopuli")
    tfds_data_dir = tfds_data_dir or _tfds_data_dir()
    max_audio_seconds = max_audio_seconds or _configured["max_audio_seconds"]
    _last_registration.update(vocabulary=vocabulary, prompt_format=prompt_format)
    for name in _registered:
        seqio.TaskRegistry.remove(name)
    _registered.clear()
    features = prep.speech_output_features(vocabulary)
    shared = prep.speech_preprocessors(prompt_format)
    if max_audio_seconds:
        shared = [functools.partial(drop_longer_than, max_seconds=float(max_audio_seconds)), *shared]

    def add(name: str, source, first: Callable):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=source, preprocessors=[first, *shared], output_features=features,
                               shuffle_buffer_size=256)
        _registered.append(name)

    librispeech_build = "build it on a machine with internet: `tfds build librispeech` (about 60 GB)"
    add("librispeech_asr",
        PreparedTfdsSource("librispeech:2.1.1", {"train": "train_clean100+train_clean360+train_other500",
                                                  "validation": "dev_clean", "test": "test_clean"},
                           "librispeech_asr", librispeech_build, tfds_data_dir),
        functools.partial(from_tfds_fields, task="librispeech_asr", audio_key="speech", text_key="text",
                          instruction="Transcribe the speech.", lower=True))
    for lang, locale in FLEURS_LOCALES.items():
        name = f"fleurs_asr_{lang}"
        add(name,
            PreparedTfdsSource(f"xtreme_s/fleurs.{locale}:2.0.0", {s: s for s in SEQIO_SPLITS}, name,
                               f"build it on a machine with internet: `tfds build xtreme_s --config fleurs.{locale}`",
                               tfds_data_dir),
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
    for mixture, task_names in _configured["mixtures"].items():
        _add_mixture(mixture, task_names)
    return list(_registered)


def real_task_names() -> list[str]:
    return list(_registered)


# --------------------------------------------------------------------------------------------
# Training mixtures from gin: the paper's ASR + AST mixture, rates by size
# --------------------------------------------------------------------------------------------
def _add_mixture(name: str, task_names: Sequence[str]) -> None:
    from slm_jax.tasks.corpus_tasks import ExamplesRate

    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(task, ExamplesRate()) for task in task_names])


_HOW = {"LLM_VOCABULARY": "'spm:PATH'", "TFDS_DATA_DIR": "'DIR'", "COVOST2_DIR": "'DIR'", "VOXPOPULI_DIR": "'DIR'"}


def _required(values: dict) -> None:
    """One line naming every macro still at ``%gin.REQUIRED`` (or empty)."""
    import gin

    missing = [macro for macro, value in values.items() if value is gin.REQUIRED or value in (None, "")]
    if missing:
        how = " ".join(f"--gin.{m}=\"{_HOW[m]}\"" for m in missing)
        raise DataError(f"set {', '.join(missing)} (the LLM's vocabulary spec and the directories of the prepared "
                        f"corpora; tasks/real_corpora.py says how to prepare them): {how}")


def real_corpora_mixture(name: str, tasks: Sequence[str], tfds_data_dir=None, covost2_dir=None,
                         voxpopuli_dir=None, vocabulary=None, max_audio_seconds: Optional[float] = None) -> str:
    """Registers the mixture ``name`` of the real-corpus ``tasks`` (each at its number of training
    examples: the paper's proportional mixing) over the given locations and returns ``name``, so
    a gin file can write ``SeqioData.mixture_or_task = @real_corpora_mixture()``.

    A location is checked only where a task needs it: TFDS_DATA_DIR for librispeech_* / fleurs_*,
    COVOST2_DIR for covost2_*, VOXPOPULI_DIR for voxpopuli_*; ``vocabulary`` (LLM_VOCABULARY) always.
    One left at ``%gin.REQUIRED`` raises a DataError naming its macro (one line from the CLIs).
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in _registered]
    if unknown or not tasks:
        raise DataError(f"real_corpora_mixture.tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; "
                        f"the real-corpus tasks are {', '.join(_registered)}")
    needed = {"LLM_VOCABULARY": vocabulary}
    if any(t.startswith(("librispeech_", "fleurs_")) for t in tasks):
        needed["TFDS_DATA_DIR"] = tfds_data_dir
    if any(t.startswith("covost2_") for t in tasks):
        needed["COVOST2_DIR"] = covost2_dir
    if any(t.startswith("voxpopuli_") for t in tasks):
        needed["VOXPOPULI_DIR"] = voxpopuli_dir
    _required(needed)

    def given(value):
        return None if value is None or value is _gin_required() else str(value)

    _configured.update(tfds_data_dir=given(tfds_data_dir), covost2_dir=given(covost2_dir),
                       voxpopuli_dir=given(voxpopuli_dir), max_audio_seconds=max_audio_seconds)
    _configured["mixtures"][name] = tasks
    vocab = _last_registration["vocabulary"]
    if vocab is None:
        from slm_jax.tasks.corpus_tasks import corpus_vocabulary, registered_corpus_dir

        vocab = corpus_vocabulary(registered_corpus_dir())
    register_real_corpus_tasks(vocab, _last_registration["prompt_format"])
    return name


def _gin_required():
    import gin

    return gin.REQUIRED


def _register_with_gin() -> None:
    import gin

    gin.external_configurable(real_corpora_mixture, module="slm_jax.tasks.real_corpora")


_register_with_gin()
