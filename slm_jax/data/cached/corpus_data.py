"""Training data for a frozen-encoder SLM from a generated corpus, with the encoder run once.

``CachedCorpusData`` trains on the SeqIO registry's corpus mixture (``asr_ast_instruct`` by
default, tasks/corpus_tasks.py): it registers the corpus tasks over ``corpus_dir``, reads the
examples of the mixture's tasks through their own data sources (``CorpusSource.examples``, the
train split and ``eval_split``), computes log-mel features, runs the frozen speech encoder once
over every clip (``encoder_cache.py``, keyed by example id) and then serves batches of cached
encoder outputs + prompt and target tokens. The mixture's rates are its sampling rates: each
training example is listed rate / size times in the epoch that ``CachedSpeechData`` permutes
(1 under the paper's proportional mixing; ``task_repeats`` are the registry's rate multipliers).
It is gin-configurable; ``train()`` hands it the frozen encoder through ``attach_model`` before
the first batch. Vocabulary and prompt format are available without touching the corpus, so
``slm-infer`` can use the same config cheaply.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from slm_jax.data import audio as audio_lib
from slm_jax.data.cached.encoder_cache import (CachedSpeechData, EncoderCache, adopt_cache, build_cache, encoder_fingerprint,
                                               reusable_cache)
from slm_jax.data.errors import DataError
from slm_jax.data.prompting import PromptFormat
from slm_jax.data.vocabularies import load_vocabulary
from slm_jax.models.front_end import writes_tokens

log = logging.getLogger(__name__)

TRAINING_MIXTURE = "asr_ast_instruct"  # tasks/corpus_tasks.py (not imported here: it loads seqio)


def front_end_fingerprint(model_spec: Any) -> str:
    """The key of a corpus's cache for this model's frozen front end (CORPUS/encoder_cache/<it>):
    its config, its weights' source (and the content of a decoder LoRA's file, whose path alone
    would not change when it is trained again) and the log-mel features it reads."""
    settings = {"mel": 80, "normalization": "whisper"}
    # A front end whose weights depend on files beyond its config says so (slm_jax/models/front_end.py).
    settings.update(getattr(model_spec.speech_encoder, "weight_files_digest", lambda: {})())
    return encoder_fingerprint(model_spec.speech_encoder, model_spec.speech_encoder_source, settings)


def read_corpus(corpus_dir: str, splits: Sequence[str], tasks: Iterable[str] | None = None,
                include_zero_shot: bool = False) -> list[dict]:
    """Examples (id, task, split, lang, text, instruction, target, audio, num_samples) of the given
    splits of the corpus's tasks in name order, read by the registry's data source
    (``slm_jax.tasks.corpus_tasks.corpus_examples``)."""
    from slm_jax.tasks.corpus_tasks import corpus_examples

    return corpus_examples(corpus_dir, splits, tasks, include_zero_shot)


def copies_per_example(rate: float, examples: int, task: str) -> int:
    """How often each of a task's ``examples`` training examples is listed in an epoch so that the
    task is sampled at ``rate`` (a mixture rate in examples): rate / examples, a whole number."""
    if examples == 0:
        return 0
    copies = rate / examples
    if copies < 0 or copies != int(copies):
        raise DataError(f"task {task}: mixture rate {rate:g} is not a whole multiple of its {examples} training "
                        f"examples; the cached-encoder source lists each example a whole number of times "
                        f"(tasks/corpus_tasks.py: ExamplesRate)")
    return int(copies)


def corpus_lengths(vocabulary: Any, prompt_format: PromptFormat, examples: Sequence[Mapping[str, str]],
                   frames: Callable[[str], int]) -> tuple[dict[str, int], dict[str, int]]:
    """(needed, padded): the longest block of each kind over ``examples`` (encoder frames via
    ``frames(id)``, prompt pieces, targets with EOS) and the corpus-maximum shape that holds it
    (the largest bucket: frames rounded up to 16, tokens to 8)."""
    from slm_jax.data import batching

    prompts = batching.encode_prompts(vocabulary, prompt_format, [e["instruction"] for e in examples])
    needed = {"speech_frames": max(frames(e["id"]) for e in examples),
              "prefix": max(len(p.prefix) for p in prompts), "suffix": max(len(p.suffix) for p in prompts),
              "targets": max(len(batching.target_ids(vocabulary, e["target"])) for e in examples)}
    round_up = lambda n, q: -(-max(n, 1) // q) * q  # noqa: E731
    padded = {k: round_up(n, 16 if k == "speech_frames" else 8) for k, n in needed.items()}
    return needed, padded


class CachedCorpusData:
    def __init__(
        self,
        corpus_dir: str,
        vocabulary: str,
        prompt_format: PromptFormat,
        cache_dir: str | None = None,
        tasks: Sequence[str] | None = None,
        max_audio_seconds: float = 30.0,
        eval_split: str = "validation",
        max_prompt_tokens: int = 64,
        max_target_tokens: int = 64,
        task_repeats: Mapping[str, int] | None = None,
        mixture: str = TRAINING_MIXTURE,
    ):
        self.corpus_dir = corpus_dir
        # The paper mixes tasks in proportion to their size; {'asr_en': 3} multiplies that task's
        # rate in the registry's mixtures by 3 (each of its training examples is listed three times),
        # for a task too small to be heard. Checked here, so a bad value fails with the config (the
        # registry, and seqio with it, is imported only when there is something to check).
        self.task_repeats = {}
        if task_repeats:
            from slm_jax.tasks.corpus_tasks import check_rate_multipliers

            self.task_repeats = check_rate_multipliers(task_repeats, "task_repeats")
        self.mixture = mixture
        self.vocabulary_spec = vocabulary
        self.prompt_format = prompt_format
        # None: corpus_dir/encoder_cache/<encoder fingerprint>, so two front ends (the encoder alone,
        # the whole Whisper transcriber) keep their own caches of one corpus.
        self.cache_dir = cache_dir
        self.tasks = tasks
        self.max_audio_seconds = max_audio_seconds
        self.eval_split = eval_split
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = max_target_tokens
        self._vocabulary = None
        self._data: CachedSpeechData | None = None

    @property
    def vocabulary(self) -> Any:
        if self._vocabulary is None:
            self._vocabulary = load_vocabulary(self.vocabulary_spec)
        return self._vocabulary

    @property
    def feature_lengths(self) -> Mapping[str, int]:
        if self._data is not None:
            return self._data.feature_lengths
        # Before the corpus is read: the configured maxima (shapes for initialisation only).
        frames = int(self.max_audio_seconds * 100)
        return {"audio_frames": frames, "prefix": self.max_prompt_tokens, "suffix": self.max_prompt_tokens,
                "targets": self.max_target_tokens}

    def attach_model(self, slm, encoder_params: Any, model_spec: Any) -> None:
        """Encodes the corpus with the frozen encoder (once; cached on disk) and fixes the shapes.

        A second call for the same encoder is a no-op (the demo attaches before ``train()`` does)."""
        fingerprint = front_end_fingerprint(model_spec)
        if self._data is not None and self._data.cache.fingerprint == fingerprint:
            return
        train, evaluation = self.read_examples()
        for ex in train + evaluation:
            audio_lib.check_audio(ex["audio"], audio_lib.SAMPLE_RATE, name=ex["id"], max_seconds=self.max_audio_seconds)
        ids = [ex["id"] for ex in train + evaluation]
        cache_dir = self.cache_dir or os.path.join(self.corpus_dir, "encoder_cache", fingerprint)
        cache = reusable_cache(cache_dir, fingerprint, ids)
        if cache is None and not self.cache_dir:  # where versions before per-fingerprint caches kept it
            cache = adopt_cache(os.path.join(self.corpus_dir, "encoder_cache"), cache_dir, fingerprint, ids)
            if cache is not None:
                log.info("moved this encoder's cache into %s", cache_dir)
        if cache is None:  # log-mel features only when the encoder has to run
            features = ((ex["id"], audio_lib.log_mel_spectrogram(ex["audio"])) for ex in train + evaluation)
            cache = build_cache(cache_dir, slm, encoder_params, features, fingerprint)
        self._data = self._make(cache, train, evaluation, writes_tokens(model_spec.speech_encoder))

    def registered_mixture(self) -> Any:
        """The registry's ``mixture`` over ``corpus_dir`` (the corpus tasks registered again with
        this source's vocabulary, prompt layout and ``task_repeats`` as rate multipliers)."""
        import seqio

        from slm_jax.tasks.corpus_tasks import register_corpus_tasks

        register_corpus_tasks(self.corpus_dir, self.vocabulary, self.prompt_format,
                              rate_multipliers=self.task_repeats)
        mixture = seqio.get_mixture_or_task(self.mixture)
        if not isinstance(mixture, seqio.Mixture):
            raise DataError(f"CachedCorpusData.mixture: {self.mixture} is a task, not a mixture")
        return mixture

    def read_examples(self) -> tuple[list[dict], list[dict]]:
        """(training epoch, evaluation examples) from the mixture's tasks (``tasks`` of them, if
        given) in name order: each training example listed as often as the task's rate asks
        (``copies_per_example``), then the ``eval_split`` examples, each once."""
        mixture = self.registered_mixture()
        members = sorted(mixture.tasks, key=lambda t: t.name)
        if self.tasks is not None:
            unknown = sorted(set(self.tasks) - {t.name for t in members})
            if unknown:
                raise DataError(f"CachedCorpusData.tasks names tasks that are not in the mixture {self.mixture}: "
                                f"{unknown}; its tasks are {[t.name for t in members]}")
            members = [t for t in members if t.name in set(self.tasks)]
        train, evaluation = [], []
        for task in members:
            source = task.source
            if not hasattr(source, "examples"):
                raise DataError(f"task {task.name} of {self.mixture} is not a task of the generated corpus "
                                f"({type(source).__name__}); the cached-encoder source reads corpus tasks only")
            copies = copies_per_example(mixture.get_rate(task), source.num_input_examples("train"), task.name)
            if copies:
                train.extend(ex for ex in source.examples("train") for _ in range(copies))
            if self.eval_split in source.splits:
                evaluation.extend(source.examples(self.eval_split))
        return train, evaluation

    def _make(self, cache: EncoderCache, train: list[dict], evaluation: list[dict],
              with_tokens: bool = False) -> CachedSpeechData:
        everything = train + evaluation
        needed, lengths = corpus_lengths(self.vocabulary, self.prompt_format, everything, cache.frames)
        prompt, targets = max(needed["prefix"], needed["suffix"]), needed["targets"]
        if prompt > self.max_prompt_tokens or targets > self.max_target_tokens:
            raise ValueError(f"corpus prompts/targets need {prompt}/{targets} tokens; raise "
                             f"max_prompt_tokens/max_target_tokens ({self.max_prompt_tokens}/{self.max_target_tokens})")
        log.info("corpus: %d train / %d %s examples; %d encoder frames max", len(train), len(evaluation),
                 self.eval_split, needed["speech_frames"])
        return CachedSpeechData(cache, train, evaluation, self.vocabulary, self.prompt_format, **lengths,
                                with_tokens=with_tokens)

    def _ready(self) -> CachedSpeechData:
        if self._data is None:
            raise RuntimeError("CachedCorpusData needs attach_model(...) before batches (train() does it)")
        return self._data

    def train_batches(self, *args, **kwargs):
        return self._ready().train_batches(*args, **kwargs)

    def eval_batches(self, *args, **kwargs):
        return self._ready().eval_batches(*args, **kwargs)

    def shape_plan(self, *args, **kwargs):
        return self._ready().shape_plan(*args, **kwargs)

    def llm_tokens(self, lengths):
        return self._ready().llm_tokens(lengths)

    def batch(self, examples):
        return self._ready().batch(examples)

    def alignment_token_ids(self) -> list[int]:
        return self._ready().alignment_token_ids()

    @property
    def cache(self) -> EncoderCache:
        return self._ready().cache
