"""``SeqioData``: the training DataSource (see slm_jax/training/loop.py) over a SeqIO task or mixture.

    train.data = @SeqioData()
    SeqioData.mixture_or_task = 'asr_ast_instruct'
    SeqioData.corpus_dir = 'data/tiny'
    SeqioData.feature_lengths = {'audio_frames': 512, 'prefix': 16, 'suffix': 8, 'targets': 32}

Order and position. Batch ``k`` of a run is a pure function of (mixture, seed, k): the sources
shuffle with the seed, the mixture samples with the seed, and the pipeline is deterministic.
``train_batches(start_batch=k)`` skips the first k batches of that sequence, so the train
loop's ``batches_consumed`` (saved in every checkpoint) resumes at the exact next batch. The
skipped examples are still decoded (tf.data cannot seek inside a mixture), which costs about
as much as reading them.

Multi-host: ``shard_index/num_shards`` give each host a disjoint part of every task (by shard
file where a task has enough files, else by record), each host batching its own rows.

Bad data stops the run with one line naming the example (too long for ``feature_lengths``,
empty text, undecodable audio) or the shard (corrupt or truncated): never a silent skip.
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from slm_jax.data.errors import DataError
from slm_jax.data.prompting import PromptFormat

log = logging.getLogger(__name__)


# tf.data iterators whose pipelines run numpy_function: one still alive when the interpreter
# shuts down deadlocks the exit (its threads wait for a GIL that is gone), so they are torn
# down while Python is fully alive: when their generator ends or fails, or at exit.
class _Pipeline:
    def __init__(self, ds):
        self.iterator = iter(ds)

    def close(self) -> None:
        if self.iterator is not None:
            self.iterator = None
            gc.collect()


_LIVE: "weakref.WeakSet[_Pipeline]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pipeline in list(_LIVE):
        pipeline.close()


def iterate_numpy(ds, label: str, on_data_loss) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a dict dataset as numpy, turning TensorFlow errors into the project's one-line
    errors (``on_data_loss(error)`` names the corrupt shard); the pipeline is torn down on exit."""
    import tensorflow as tf

    from slm_jax.data.seqio.preprocessors import translate_tf_error

    pipeline = _Pipeline(ds)
    _LIVE.add(pipeline)
    try:
        while True:
            error = None
            try:
                element = next(pipeline.iterator)
            except StopIteration:
                return
            except tf.errors.DataLossError as e:
                error = on_data_loss(e)
            except tf.errors.OpError as e:
                error = translate_tf_error(e) or DataError(
                    f"{label}: reading failed ({e.message.strip().splitlines()[0]})")
            if error is not None:
                raise error
            yield {k: v.numpy() for k, v in element.items()}
    finally:
        pipeline.close()


def corrupt_shard_error(provider, error) -> DataError:
    """Finds and names the corrupt shard of ``provider`` (TensorFlow's DataLossError does not)."""
    from slm_jax.data.corpus import builder as corpus

    for task in getattr(provider, "tasks", [provider]):
        source = task.source
        if hasattr(source, "corpus_dir"):
            for split in source.splits:
                try:
                    found = corpus.find_corrupt_record(source.list_shards(split))
                except DataError:
                    continue
                if found is not None:
                    return found
    return DataError(f"{provider.name}: corrupt input record ({error.message.strip().splitlines()[0]})")


class UnknownTaskError(DataError):
    """A task or mixture name that is not registered; the message lists the close matches."""


def get_provider(name: str):
    """The registered seqio Task or Mixture ``name``; unknown names list the closest ones."""
    import difflib

    import seqio

    from slm_jax import tasks  # noqa: F401  (registers everything)

    names = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(names)}"
        raise UnknownTaskError(f"unknown task or mixture {name!r}; {hint} (see `slm-mixture list`)")
    return seqio.get_mixture_or_task(name)


def _check_lengths(example_id, task, frames, prefix, suffix, targets, limits, audio_features):
    """numpy side: raises for the first feature longer than its configured length, naming the
    example; passes ``audio_features`` through (a data dependency, so the check cannot be pruned)."""
    from slm_jax.data.seqio.preprocessors import _text

    names = ("audio_frames", "prefix", "suffix", "targets")
    for what, n, limit in zip(names, (frames, prefix, suffix, targets), limits):
        if int(n) > int(limit):
            raise DataError(f"{_text(task)} example {_text(example_id)}: {int(n)} {what} "
                            f"{'frames' if what == 'audio_frames' else 'tokens'}, more than "
                            f"feature_lengths['{what}'] = {int(limit)}; raise it in the gin config")
    return audio_features


class SeqioData:
    """A DataSource over the registered SeqIO task or mixture ``mixture_or_task``.

    corpus_dir / vocabulary / prompt_format: when given, the tasks are registered again with
    them (``slm_jax.tasks.register_all``): the corpus directory, a vocabulary spec
    (``slm_jax.data.vocabularies.load_vocabulary``: 'corpus:DIR', 'spm:PATH', 'gguf:PATH',
    'package:smollm2-135m-instruct'; default the corpus' SentencePiece model) and where the
    instruction goes (default T5's layout).
    """

    def __init__(
        self,
        mixture_or_task: str,
        feature_lengths: Mapping[str, int],
        corpus_dir: Optional[str] = None,
        vocabulary: Optional[str] = None,
        prompt_format: Optional[PromptFormat] = None,
        train_split: str = "train",
        eval_split: str = "validation",
        num_parallel_batches: int = 2,
    ):
        self.mixture_or_task = mixture_or_task
        self.feature_lengths = {k: int(v) for k, v in feature_lengths.items()}
        from slm_jax.data.seqio.feature_converter import task_feature_lengths

        self._task_lengths = task_feature_lengths(self.feature_lengths)
        self.corpus_dir = corpus_dir
        self.vocabulary_spec = vocabulary
        self.prompt_format_override = prompt_format
        self.train_split = train_split
        self.eval_split = eval_split
        self.num_parallel_batches = num_parallel_batches
        self._registered = False

    # ----------------------------------------------------------------------------------------
    def _register(self) -> None:
        if self._registered:
            return
        if self.corpus_dir or self.vocabulary_spec or self.prompt_format_override:
            from slm_jax import tasks

            vocabulary = None
            if self.vocabulary_spec:
                from slm_jax.data.vocabularies import load_vocabulary

                vocabulary = load_vocabulary(self.vocabulary_spec)
            tasks.register_all(self.corpus_dir, vocabulary, self.prompt_format_override)
        self._registered = True

    @property
    def provider(self):
        self._register()
        return get_provider(self.mixture_or_task)

    @property
    def prompt_format(self) -> PromptFormat:
        """The layout the tasks were registered with (the default T5 layout unless configured)."""
        self._register()
        from slm_jax.tasks.corpus_tasks import registered_prompt_format

        return self.prompt_format_override or registered_prompt_format()

    @property
    def vocabulary(self) -> Any:
        return self.provider.output_features["targets"].vocabulary

    def task_dataset(self, split: str, shuffle: bool, seed: Optional[int], shard_index: int = 0,
                     num_shards: int = 1, num_epochs: Optional[int] = None, passthrough=("id", "task")):
        """Preprocessed task examples (before the feature converter), ``id``/``task`` kept."""
        import seqio

        provider = self.provider
        shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
        kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                      num_epochs=num_epochs, trim_output_features=False, try_in_mem_cache=False)
        if isinstance(provider, seqio.Mixture):
            return provider.get_dataset(passthrough_features=list(passthrough), **kwargs)
        return provider.get_dataset(**kwargs)

    def _model_dataset(self, ds, batch_size: int):
        import tensorflow as tf

        from slm_jax.data.seqio.feature_converter import SpeechFeatureConverter

        limits = [self.feature_lengths[k] for k in ("audio_frames", "prefix", "suffix", "targets")]

        def check(ex):
            out = {k: v for k, v in ex.items() if k in SpeechFeatureConverter.TASK_FEATURES}
            out["audio_features"] = tf.numpy_function(
                _check_lengths, [ex["id"], ex["task"], tf.shape(ex["audio_features"])[0], tf.size(ex["prefix"]),
                                 tf.size(ex["suffix"]), tf.size(ex["targets"]), limits, ex["audio_features"]],
                tf.float32, stateful=False)
            out["audio_features"].set_shape(ex["audio_features"].shape)
            return out

        ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE)
        ds = SpeechFeatureConverter()(ds, self._task_lengths)
        return ds.batch(batch_size, drop_remainder=True)

    def _numpy(self, ds, paths_hint: str) -> Iterator[dict[str, np.ndarray]]:
        return iterate_numpy(ds, paths_hint, lambda e: corrupt_shard_error(self.provider, e))

    # ----------------------------------------------------------------------------------------
    # The DataSource protocol
    # ----------------------------------------------------------------------------------------
    def attach_model(self, slm, encoder_params, model_spec) -> None:
        """Called by train() before the first batch: checks the LLM can embed every token id."""
        del slm, encoder_params
        llm_vocab = getattr(model_spec.llm, "vocab_size", None)
        size = self.vocabulary.vocab_size
        if llm_vocab is not None and size > llm_vocab:
            raise DataError(f"the data's vocabulary has {size} ids but the LLM embeds only {llm_vocab}; "
                            f"set VOCAB_SIZE >= {size} (or train the corpus with a smaller --vocab_size)")

    def train_batches(self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0,
                      num_shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches of ``batch_size`` rows for host ``shard_index``, from batch ``start_batch`` on."""
        ds = self.task_dataset(self.train_split, shuffle=True, seed=seed, shard_index=shard_index,
                               num_shards=num_shards, num_epochs=None)
        ds = self._model_dataset(ds, batch_size)
        if start_batch:
            log.info("data: skipping %d batches to resume at the saved position", start_batch)
            ds = ds.skip(start_batch)
        return self._numpy(ds.prefetch(self.num_parallel_batches), f"{self.mixture_or_task}/{self.train_split}")

    def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[dict[str, np.ndarray]]:
        """The same ``num_batches`` batches every call (fixed sampling seed, no shuffling)."""
        ds = self.task_dataset(self.eval_split, shuffle=False, seed=0, num_epochs=None)
        ds = self._model_dataset(ds, batch_size).take(num_batches)
        return self._numpy(ds, f"{self.mixture_or_task}/{self.eval_split}")
