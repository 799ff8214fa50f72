"""Training data for a frozen-encoder SLM from a generated corpus, with the encoder run once.

``CachedCorpusData`` reads a corpus written by ``slm-make-corpus`` (every task's train split,
zero-shot tasks excluded), computes log-mel features, runs the frozen speech encoder once over
every clip (``encoder_cache.py``) and then serves batches of cached encoder outputs + prompt and
target tokens. It is gin-configurable; ``train()`` hands it the frozen encoder through
``attach_model`` before the first batch. Vocabulary and prompt format are available without
touching the corpus, so ``slm-infer`` can use the same config cheaply.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from slm_jax.data import audio as audio_lib
from slm_jax.data.cached.encoder_cache import (CachedSpeechData, EncoderCache, adopt_cache, build_cache, encoder_fingerprint,
                                   reusable_cache)
from slm_jax.data.prompting import PromptFormat
from slm_jax.data.vocabularies import load_vocabulary
from slm_jax.models.front_end import writes_tokens

log = logging.getLogger(__name__)


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
    """Examples (id, task, split, text, instruction, target, audio) of the given splits."""
    from slm_jax.data.corpus import builder as corpus

    manifest = corpus.load_manifest(corpus_dir)
    wanted = set(tasks) if tasks is not None else None
    out = []
    for task, info in sorted(manifest["tasks"].items()):
        if (wanted is not None and task not in wanted) or (info["zero_shot"] and not include_zero_shot):
            continue
        for split in splits:
            if split not in info["splits"]:
                continue
            for path in corpus.shard_paths(corpus_dir, manifest, task, split):
                out.extend(corpus.read_examples(path))
    return out


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
    ):
        self.corpus_dir = corpus_dir
        # The paper mixes tasks in proportion to their size; {'asr_en': 3} lists that task's training
        # examples three times, tripling its share (a mixing rate for a task too small to be heard).
        self.task_repeats = dict(task_repeats or {})
        for task, times in self.task_repeats.items():
            if not isinstance(times, int) or times < 1:
                raise ValueError(f"task_repeats[{task!r}] must be a whole number >= 1, got {times!r}")
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
        train = read_corpus(self.corpus_dir, ["train"], self.tasks)
        evaluation = read_corpus(self.corpus_dir, [self.eval_split], self.tasks)
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
        self._data = self._make(cache, self._repeated(train), evaluation, writes_tokens(model_spec.speech_encoder))

    def _repeated(self, train: list[dict]) -> list[dict]:
        present = {ex["task"] for ex in train}
        unknown = sorted(set(self.task_repeats) - present)
        if unknown:
            raise ValueError(f"task_repeats names tasks with no training examples in {self.corpus_dir}: {unknown}; "
                             f"its training tasks are {sorted(present)}")
        return [ex for ex in train for _ in range(self.task_repeats.get(ex["task"], 1))]

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
