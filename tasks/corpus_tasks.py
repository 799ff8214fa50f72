"""SeqIO tasks and mixtures over the generated corpus (``slm-make-corpus``).

Registered on ``import slm_jax.tasks``:

  asr_en, asr_fr, asr_de, asr_es            speech recognition
  ast_en_fr, ast_en_de, ast_en_es           English speech -> French/German/Spanish text
  instruct_qa, instruct_biasing, instruct_dialog, instruct_count
  zeroshot_answer_in_french, zeroshot_which_colour, zeroshot_biasing_unseen
                                            held out (test split only; in no training mixture)
  asr_en_open                               free-form English speech recognition; opt-in
                                            (``slm-make-corpus --open_asr=N``): registered, and
                                            in both mixtures, only when the corpus holds it
  any other task of the corpus's manifest   e.g. recordings imported under a name of their own
                                            (``slm-import-speech``), as its manifest describes it
  mixture asr_ast_instruct                  every ASR/AST/instruction task the corpus holds,
                                            rate = its number of training examples (the paper's
                                            proportional mixing), times its rate multiplier
  mixture asr                               the ASR tasks, rates alike

Rates. A task's rate in both mixtures is ``ExamplesRate``: its number of training examples times
a whole multiplier (``rate_multipliers``, default 1), so {'asr_en': 3} triples that task's share.
These mixtures are the one place where the corpus's mixing rates are defined: ``SeqioData`` samples
them, and ``CachedCorpusData`` (slm_jax/data/cached/corpus_data.py) lists each training example
rate / size times in its epoch.

Reading. ``CorpusSource`` is the one reader of the corpus's shards: seqio reads it through
``get_dataset``, and ``CorpusSource.examples`` (also behind ``corpus_examples``) gives the same
records, in shard order, as python dicts with float32 audio for the cached-encoder path and tools.

Where the corpus is: ``register_corpus_tasks(corpus_dir)`` (re)registers everything over that
directory; on import it uses ``$SLM_CORPUS_DIR``, or ``data/corpus`` when that is unset. The
directory is read lazily: registering needs no data (only its manifest, when there is one, says
which opt-in tasks to add), and using a task whose corpus is missing raises one
``DataNotPreparedError`` saying how to make it. The vocabulary defaults to the
corpus' own SentencePiece model (``DIR/spm.model``) and the prompt to the T5 layout; pass others
for a real LLM (``SeqioData`` does this from its gin configuration).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from slm_jax.data import audio as audio_lib
from slm_jax.data.corpus import builder as corpus
from slm_jax.data.seqio import preprocessors as prep
from slm_jax.data.errors import DataError, DataNotPreparedError
from slm_jax.data.prompting import T5_PROMPT, PromptFormat

DEFAULT_CORPUS_DIR = "data/corpus"
CORPUS_DIR_ENV = "SLM_CORPUS_DIR"
TRAINING_MIXTURE = "asr_ast_instruct"
ASR_MIXTURE = "asr"

RECORD_SHUFFLE_BUFFER = 2000  # raw records (~100 kB each): a full shuffle of a split of up to 2,000

_registered: dict[str, Any] = {"corpus_dir": None, "prompt_format": None, "tasks": [], "mixtures": []}


def default_corpus_dir() -> str:
    return os.environ.get(CORPUS_DIR_ENV) or DEFAULT_CORPUS_DIR


def registered_corpus_dir() -> Optional[str]:
    """The corpus directory the registered tasks read (None before registration)."""
    return _registered["corpus_dir"]


def registered_prompt_format() -> Optional[PromptFormat]:
    """The prompt layout the registered tasks build (None before registration): inference must
    place an instruction exactly as training saw it."""
    return _registered["prompt_format"]


class CorpusSource(seqio.DataSource):
    """One task of a generated corpus: its TFRecord shards, listed and checked via the manifest.

    Nothing is read at construction. Every ``get_dataset`` re-reads the manifest and checks the
    framing and record count of the shards it is about to read (``corpus.check_shard``), so a
    truncated or corrupt shard is reported by name before training starts.
    """

    def __init__(self, corpus_dir: str, task: str):
        self.corpus_dir = corpus_dir
        self.task = task
        splits = ("test",) if _kind_of(corpus_dir, task)[1] else corpus.SPLITS
        # The source shuffles records itself (before decoding and log-mel), so the Task needs no
        # shuffle buffer of decoded features (hundreds of MB for 1,000 clips).
        super().__init__(splits=splits, caching_permitted=False, performs_internal_shuffling=True)

    def manifest(self) -> dict:
        path = os.path.join(self.corpus_dir, corpus.MANIFEST)
        if not os.path.exists(path):
            raise DataNotPreparedError(
                f"task {self.task}: no corpus in {self.corpus_dir} ({corpus.MANIFEST} missing); make one with "
                f"`slm-make-corpus --out={self.corpus_dir} --size=2000` or point {CORPUS_DIR_ENV} at an existing corpus")
        manifest = corpus.load_manifest(self.corpus_dir)
        if manifest.get("sample_rate") != audio_lib.SAMPLE_RATE:
            raise DataNotPreparedError(f"{path}: audio at {manifest.get('sample_rate')} Hz, the front end needs "
                                       f"{audio_lib.SAMPLE_RATE} Hz; regenerate the corpus")
        if self.task not in manifest["tasks"]:
            langs = ",".join(manifest["config"].get("languages", []))
            raise DataNotPreparedError(
                f"task {self.task}: the corpus in {self.corpus_dir} has no such task (made with --languages={langs}); "
                f"regenerate it with the languages this task needs")
        return manifest

    @property
    def splits(self) -> Sequence[str]:
        """The splits that hold examples (a mixture skips a task without the split it reads:
        an empty split inside a mixture would end it). All possible splits before the corpus exists."""
        path = os.path.join(self.corpus_dir, corpus.MANIFEST)
        if not os.path.exists(path):
            return self._splits
        info = corpus.load_manifest(self.corpus_dir)["tasks"].get(self.task)
        if info is None:
            return self._splits
        return tuple(s for s in self._splits if info["splits"].get(s, {}).get("examples", 0) > 0)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return corpus.shard_paths(self.corpus_dir, self.manifest(), self.task, split)

    def num_input_examples(self, split: str) -> int:
        splits = self.manifest()["tasks"][self.task]["splits"]
        return int(splits[split]["examples"]) if split in splits else 0

    def seconds(self, split: str) -> float:
        splits = self.manifest()["tasks"][self.task]["splits"]
        return float(splits[split]["seconds"]) if split in splits else 0.0

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        manifest = self.manifest()
        if split not in manifest["tasks"][self.task]["splits"]:
            raise DataNotPreparedError(f"task {self.task} has no {split!r} split in {self.corpus_dir}")
        corpus.check_task_split(self.corpus_dir, manifest, self.task, split)
        files = corpus.shard_paths(self.corpus_dir, manifest, self.task, split)
        files_ds = tf.data.Dataset.from_tensor_slices(files)
        if shard_info is not None:
            files_ds = files_ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            files_ds = files_ds.shuffle(len(files), seed=seed)
        description = corpus.feature_description()
        ds = files_ds.interleave(tf.data.TFRecordDataset, cycle_length=1)  # file order = record order
        if shuffle:
            examples = manifest["tasks"][self.task]["splits"][split]["examples"]
            ds = ds.shuffle(min(max(examples, 1), RECORD_SHUFFLE_BUFFER), seed=seed)
        return ds.map(lambda r: tf.io.parse_single_example(r, description), num_parallel_calls=tf.data.AUTOTUNE)

    def examples(self, split: str) -> Iterator[dict]:
        """The split's records in shard order (unshuffled ``get_dataset``) as python dicts: id, task,
        split, lang, text, instruction, target (str), audio (float32 samples), num_samples (int).
        A record that cannot be read is named (file and record)."""
        import tensorflow as tf

        info = self.manifest()["tasks"][self.task]["splits"].get(split)
        if info is not None and not info["shards"]:
            return  # a split listed without shards holds no examples (and tf.data cannot list no files)
        dataset = self.get_dataset(split, shuffle=False)
        iterator, index = iter(dataset), 0
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as e:
                found = corpus.find_corrupt_record(self.list_shards(split))
                raise found or DataError(f"task {self.task} ({split}): record {index} is unreadable "
                                         f"({e.message.strip().splitlines()[0]})") from None
            ex = {k: v.numpy() for k, v in record.items()}
            out = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items() if k != "audio"}
            out["audio"] = audio_lib.from_pcm16(ex["audio"], name=f"task {self.task} ({split}) record {index} "
                                                                      f"({out['id']})")
            yield out
            index += 1


def corpus_vocabulary(corpus_dir: str) -> seqio.Vocabulary:
    """The corpus' SentencePiece model; seqio loads it on first use, so registration needs no file."""
    return seqio.SentencePieceVocabulary(os.path.abspath(os.path.join(corpus_dir, f"{corpus.SPM_PREFIX}.model")))


def _manifest_tasks(corpus_dir: str) -> Optional[dict]:
    """The manifest's tasks (name -> info) of the corpus in ``corpus_dir``; None where there is
    no readable manifest (the tasks report a broken one when they are used)."""
    if not os.path.exists(os.path.join(corpus_dir, corpus.MANIFEST)):
        return None
    try:
        return corpus.load_manifest(corpus_dir)["tasks"]
    except DataError:
        return None


def _kind_of(corpus_dir: str, task: str) -> tuple[str, bool]:
    """(family, zero_shot) of a task: the generator's own, else what the corpus's manifest says
    (a task of imported recordings)."""
    if task in corpus.ALL_TASKS:
        return corpus.ALL_TASKS[task].family, corpus.ALL_TASKS[task].zero_shot
    info = (_manifest_tasks(corpus_dir) or {}).get(task, {})
    return info.get("family", "asr"), bool(info.get("zero_shot", False))


def task_description(corpus_dir: str, task: str) -> Optional[str]:
    """What the corpus's manifest says a task is (None where it says nothing)."""
    return (_manifest_tasks(corpus_dir) or {}).get(task, {}).get("description")


def corpus_task_kinds(corpus_dir: str) -> dict[str, tuple[str, bool]]:
    """name -> (family, zero_shot) of the tasks registered over ``corpus_dir``: every default task
    (``corpus.TASKS``; one the corpus lacks says so when used), and every other task its manifest
    lists (the opt-in ones, imported recordings)."""
    names = set(corpus.TASKS) | set(_manifest_tasks(corpus_dir) or {})
    return {name: _kind_of(corpus_dir, name) for name in sorted(names)}


def corpus_examples(corpus_dir: str, splits: Sequence[str], tasks: Optional[Iterable[str]] = None,
                    include_zero_shot: bool = False) -> list[dict]:
    """The examples (``CorpusSource.examples``) of the given splits of every task the corpus in
    ``corpus_dir`` holds (or of ``tasks``), tasks in name order; zero-shot tasks only on request."""
    manifest = corpus.load_manifest(corpus_dir)
    wanted = set(tasks) if tasks is not None else None
    out = []
    for task, info in sorted(manifest["tasks"].items()):
        if (wanted is not None and task not in wanted) or (info["zero_shot"] and not include_zero_shot):
            continue
        source = CorpusSource(corpus_dir, task)
        for split in splits:
            if split in info["splits"]:
                out.extend(source.examples(split))
    return out


@dataclasses.dataclass(frozen=True)
class ExamplesRate:
    """A task's rate in the corpus mixtures: its number of training examples (the paper's
    proportional mixing) times ``multiplier``, a whole number (3: the task's examples count thrice)."""

    multiplier: int = 1

    def __call__(self, task: seqio.Task) -> float:
        return float(self.multiplier * task.source.num_input_examples("train"))


def check_rate_multipliers(multipliers: Optional[Mapping[str, int]], what: str = "rate_multipliers") -> dict[str, int]:
    """``multipliers`` as a dict, each a whole number >= 1 (``what`` names them in the error)."""
    multipliers = dict(multipliers or {})
    for task, times in multipliers.items():
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"{what}[{task!r}] must be a whole number >= 1, got {times!r}")
    return multipliers


def register_corpus_tasks(corpus_dir: Optional[str] = None, vocabulary: Optional[seqio.Vocabulary] = None,
                          prompt_format: PromptFormat = T5_PROMPT, normalization: str = "whisper",
                          rate_multipliers: Optional[Mapping[str, int]] = None) -> list[str]:
    """(Re)registers every corpus task and mixture over ``corpus_dir``; returns the task names.

    The opt-in tasks (``corpus.OPT_IN_TASKS``) and any other task of the corpus's manifest are
    registered when the corpus there holds them (a corpus made later with them needs registering
    again). Where the corpus exists, the mixtures hold the training tasks it has; before it
    exists, every default training task. ``rate_multipliers`` (task -> whole number >= 1)
    multiply those tasks' rates in both mixtures (``ExamplesRate``); each must name a training
    task of the corpus.

    Registering again replaces the previous registration (e.g. another corpus or vocabulary).
    """
    corpus_dir = corpus_dir or default_corpus_dir()
    multipliers = check_rate_multipliers(rate_multipliers)
    vocabulary = vocabulary or corpus_vocabulary(corpus_dir)
    for name in _registered["mixtures"]:
        seqio.MixtureRegistry.remove(name)
    for name in _registered["tasks"]:
        seqio.TaskRegistry.remove(name)
    output_features = prep.speech_output_features(vocabulary)
    preprocessors = [prep.decode_corpus_example, *prep.speech_preprocessors(prompt_format, normalization)]
    kinds = corpus_task_kinds(corpus_dir)
    names = []
    for name in kinds:
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=CorpusSource(corpus_dir, name), preprocessors=preprocessors,
                               output_features=output_features, shuffle_buffer_size=None)
        names.append(name)
    held = _manifest_tasks(corpus_dir)
    training = [n for n in names if not kinds[n][1] and (held is None or n in held)]
    unknown = sorted(set(multipliers) - set(training))
    if unknown:
        raise ValueError(f"rate multipliers name tasks that are not training tasks of the corpus in {corpus_dir}: "
                         f"{unknown}; its training tasks are {training}")
    mixtures = {
        TRAINING_MIXTURE: training,
        ASR_MIXTURE: [n for n in training if kinds[n][0] == "asr"],
    }
    for name, members in mixtures.items():
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, [(m, ExamplesRate(multipliers.get(m, 1))) for m in members])
    _registered.update(corpus_dir=corpus_dir, prompt_format=prompt_format, tasks=names, mixtures=list(mixtures))
    return names


def corpus_task_names() -> list[str]:
    return list(_registered["tasks"])


def corpus_mixture_names() -> list[str]:
    return list(_registered["mixtures"])
