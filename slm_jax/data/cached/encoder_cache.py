"""The frozen speech encoder's outputs, computed once and reused by every training step.

The encoder is frozen, so its output for a clip never changes: an offline pass encodes every
example once and stores the hidden states keyed by example id; training then reads them and never
runs the encoder (the trainer accepts ``speech_hidden``/``speech_mask`` in place of audio).

On disk: ``<dir>/hidden-<write>-NNNNN.npy`` shards of concatenated [frames, D] float32 rows (a
front end that writes text adds its token ids as one more column: slm_jax/models/front_end.py), and
``<dir>/index.json`` (written last, atomically) mapping id -> (shard, offset, frames). A cache
directory without an index is incomplete and is rebuilt. Every write names its shards anew, so
a cache can be rewritten with more examples in place (``extend_cache``): until the new index
replaces the old one, the old index and its shards are untouched. The index records a fingerprint of
the encoder (its source and config) so a cache is never reused for another encoder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import uuid
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from slm_jax.data import batching
from slm_jax.models.front_end import pack_rows, speech_batch
from slm_jax.models.slm import SLM
from slm_jax.training.alignment import transcript_token_ids

INDEX = "index.json"
log = logging.getLogger(__name__)


def encoder_fingerprint(encoder_config: Any, source: str, feature_settings: Mapping[str, Any]) -> str:
    text = json.dumps({"config": repr(encoder_config), "source": source, "features": dict(feature_settings)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EncoderCache:
    """Read side: id -> encoder hidden states [frames, D] (memory-mapped shards)."""

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, INDEX)) as f:
            index = json.load(f)
        self.fingerprint = index["fingerprint"]
        self.dim = index["dim"]
        self._entries = index["entries"]
        self.shard_names: list[str] = index["shards"]
        self._shards = [np.load(os.path.join(directory, name), mmap_mode="r") for name in self.shard_names]

    def ids(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def frames(self, example_id: str) -> int:
        return self._entries[example_id][2]

    def __getitem__(self, example_id: str) -> np.ndarray:
        try:
            shard, offset, frames = self._entries[example_id]
        except KeyError:
            raise KeyError(f"example {example_id!r} is not in the encoder cache {self.directory}") from None
        return np.asarray(self._shards[shard][offset: offset + frames], np.float32)


def existing_cache(directory: str) -> EncoderCache | None:
    """The cache in ``directory``, of any encoder; None where there is none, or where its index or
    a shard cannot be read (a damaged cache is written again, like an incomplete one)."""
    if not os.path.exists(os.path.join(directory, INDEX)):
        return None
    try:
        return EncoderCache(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("encoder cache %s cannot be read (%s): it is written again", directory, e)
        return None


def reusable_cache(directory: str, fingerprint: str, ids: Iterable[str]) -> EncoderCache | None:
    """The cache in ``directory`` when it was made by this encoder and holds every id, else None."""
    cache = existing_cache(directory)
    return cache if cache is not None and cache.fingerprint == fingerprint and all(i in cache for i in ids) else None


def adopt_cache(old_directory: str, directory: str, fingerprint: str, ids: Iterable[str]) -> EncoderCache | None:
    """Moves a reusable cache (this fingerprint, every id) from ``old_directory`` into ``directory``,
    or returns None. Caches used to live in the corpus's ``encoder_cache/`` itself; now each front
    end has its own ``encoder_cache/<fingerprint>``, and a corpus cached by an older version moves
    there instead of being encoded again. The index moves last: an interrupted move leaves a
    directory without an index (rebuilt if used) and the old one without its shards."""
    if reusable_cache(old_directory, fingerprint, ids) is None:
        return None
    with open(os.path.join(old_directory, INDEX)) as f:
        shards = json.load(f)["shards"]
    os.makedirs(directory, exist_ok=True)
    for name in shards + [INDEX]:
        os.replace(os.path.join(old_directory, name), os.path.join(directory, name))
    return EncoderCache(directory)


def write_cache(directory: str, fingerprint: str, rows: Iterable[tuple[str, np.ndarray]],
                shard_rows: int = 200_000) -> EncoderCache:
    """Writes (id, [frames, D]) pairs as a cache: shards of about ``shard_rows`` rows, each written
    whole under a name of this write's own, then the index (atomically, last), so an interrupted
    write leaves the cache that was there before. The shards of the index it replaced go last."""
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, INDEX)
    replaced = existing_cache(directory)
    previous = replaced.shard_names if replaced is not None else []
    write = uuid.uuid4().hex[:8]
    entries: dict[str, list[int]] = {}
    shards: list[str] = []
    pending: list[np.ndarray] = []
    pending_rows = 0
    dim = None

    def flush():
        nonlocal pending, pending_rows
        if not pending:
            return
        name = f"hidden-{write}-{len(shards):05d}.npy"
        tmp = os.path.join(directory, name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(pending, axis=0))
        os.replace(tmp, os.path.join(directory, name))
        shards.append(name)
        pending, pending_rows = [], 0

    for example_id, hidden in rows:
        dim = hidden.shape[-1]
        entries[example_id] = [len(shards), pending_rows, hidden.shape[0]]
        pending.append(np.asarray(hidden, np.float32))
        pending_rows += hidden.shape[0]
        if pending_rows >= shard_rows:
            flush()
    flush()
    tmp = index_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "dim": dim, "shards": shards, "entries": entries}, f)
    os.replace(tmp, index_path)
    for name in set(previous) - set(shards):
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    return EncoderCache(directory)


def extend_cache(directory: str, fingerprint: str, rows: Mapping[str, np.ndarray]) -> EncoderCache:
    """The cache in ``directory`` with ``rows`` (id -> [frames, D]) added, rewritten in place; a
    cache there of another fingerprint is replaced, as it could never be reused."""
    old = reusable_cache(directory, fingerprint, ())
    kept = {i: np.array(old[i]) for i in old.ids() if i not in rows} if old is not None else {}  # off its shards
    return write_cache(directory, fingerprint, itertools.chain(kept.items(), rows.items()))


class FrontEndMemo:
    """The frozen front end's outputs for evaluation, kept between runs (``slm-eval
    --cache_front_end``). The front end is frozen, so a second evaluation of the same examples
    (another decoding setting, another adapter of the same front end) computes only the answers;
    for the Whisper transcriber at eight speeds the front end is most of the time.

    A batch the cache holds whole is read from it, its rows padded to the width the front end
    itself would give (``width``); any other batch runs the front end whole, as without the
    cache, and its rows are kept. ``save`` adds them to the cache on disk."""

    def __init__(self, directory: str, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint
        self.cache = reusable_cache(directory, fingerprint, ())  # None where damaged: save() writes it again
        self.new: dict[str, np.ndarray] = {}
        self.hits = self.misses = 0

    def _get(self, example_id: str) -> np.ndarray | None:
        if example_id in self.new:
            return self.new[example_id]
        return self.cache[example_id] if self.cache is not None and example_id in self.cache else None

    def rows(self, ids: Sequence[str], compute, width) -> tuple[list[np.ndarray], int]:
        """([frames, D] per example, the width to pad them to) for the examples ``ids``.
        ``compute()`` -> the front end's (hidden [B, N, D], mask [B, N]) for the batch;
        ``width()`` -> N without computing it."""
        cached = [self._get(i) for i in ids]
        if all(rows is not None for rows in cached):
            self.hits += len(ids)
            return cached, width()
        hidden, mask = compute()
        hidden, mask = np.asarray(hidden, np.float32), np.asarray(mask)
        rows = [hidden[b, : int(mask[b].sum())] for b in range(len(ids))]
        for example_id, r in zip(ids, rows):
            if self._get(example_id) is None:
                self.new[example_id] = r
                self.misses += 1
        return rows, hidden.shape[1]

    def save(self) -> None:
        if self.new:
            self.cache = extend_cache(self.directory, self.fingerprint, self.new)
            self.new = {}


def build_cache(
    directory: str, slm: SLM, encoder_params: Any, examples: Iterable[tuple[str, np.ndarray]], fingerprint: str,
    batch_size: int = 8, frame_bucket: int = 100, shard_rows: int = 200_000, progress: bool = True,
) -> EncoderCache:
    """Encodes (id, log-mel [T, 80]) pairs in batches of similar length and writes the cache.

    Reuses ``directory`` when its index already has this fingerprint and every id.
    """
    examples = list(examples)
    cache = reusable_cache(directory, fingerprint, [i for i, _ in examples])
    if cache is not None:
        return cache
    encode = jax.jit(lambda p, x, m: slm.apply({"params": {"speech_encoder": p}}, x, m, method=SLM.encode_speech))
    # Sorting by length keeps padding (and the number of compiled shapes) small.
    order = sorted(range(len(examples)), key=lambda i: examples[i][1].shape[0])

    def encoded():
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="encoding speech (frozen encoder, once)", unit="utt",
                   disable=not progress)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start: start + batch_size]]
            frames = max(f.shape[0] for _, f in chunk)
            frames = -(-frames // frame_bucket) * frame_bucket
            feats, mask = batching.pad_frames([f for _, f in chunk] + [chunk[0][1]] * (batch_size - len(chunk)),
                                              frames)
            rows = jax.device_get(encode(encoder_params, feats, mask))
            for row, (example_id, _) in enumerate(chunk):
                n = int(rows.mask[row].sum())
                yield example_id, pack_rows(rows.hidden[row, :n], None if rows.token_ids is None else rows.token_ids[row, :n])
            bar.update(len(chunk))
        bar.close()

    return write_cache(directory, fingerprint, encoded(), shard_rows)


class CachedSpeechData:
    """A training DataSource over cached encoder outputs and text examples.

    Each example is a dict with ``id``, ``instruction`` and ``target``. Batches are drawn from one
    seeded permutation per epoch over all training examples, so every task is sampled in
    proportion to how often its examples are listed (``CachedCorpusData`` lists each one as its
    task's rate in the registry's mixture asks: once under the paper's proportional mixing);
    batch ``k`` depends only on (seed, k), which makes the data position a single integer.

    Length grouping (``group_batches`` > 1): the stream is cut into windows of ``group_batches``
    batches; inside a window examples are sorted by sequence length, cut into batches and the
    batches shuffled (``batching.length_grouped_batches``). Each batch is then padded only to the
    next bucket (``speech_quantum`` encoder frames, ``token_quantum`` tokens) instead of the
    corpus maximum: on the demo corpus this cuts the padded LLM tokens to about two thirds
    (see ``padding_report``).
    """

    def __init__(
        self, cache: EncoderCache, train_examples: Sequence[Mapping[str, str]],
        eval_examples: Sequence[Mapping[str, str]], vocabulary: Any, prompt_format: Any,
        speech_frames: int, prefix: int, suffix: int, targets: int,
        group_batches: int = 16, speech_quantum: int = 64, token_quantum: int = 8, subsampling: int = 4,
        with_tokens: bool = False,
    ):
        self.cache = cache
        self.with_tokens = with_tokens  # the cached rows carry LLM token ids (a front end that writes text)
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)
        self.vocabulary = vocabulary
        self.prompt_format = prompt_format
        self.lengths = {"speech_frames": speech_frames, "prefix": prefix, "suffix": suffix, "targets": targets}
        # The model is initialised from audio shapes; 2 log-mel frames per encoder frame (Whisper).
        self.feature_lengths = {"audio_frames": 2 * speech_frames, "prefix": prefix, "suffix": suffix, "targets": targets}
        if not self.train_examples:
            raise ValueError("no training examples")
        if speech_quantum % subsampling:
            raise ValueError(f"speech_quantum {speech_quantum} must be a multiple of the subsampling {subsampling}")
        self.group_batches = max(1, int(group_batches))
        self.quanta = {"speech_frames": speech_quantum, "prefix": token_quantum, "suffix": token_quantum,
                       "targets": token_quantum}
        self.subsampling = subsampling
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._lengths: list[dict[str, int]] | None = None
        self._sizes: list[int] | None = None
        self._transcript_max: int | None = None

    def _text(self, examples: Sequence[Mapping[str, str]]):
        prompts = batching.encode_prompts(self.vocabulary, self.prompt_format, [e["instruction"] for e in examples])
        targets = [batching.target_ids(self.vocabulary, e["target"]) for e in examples]
        return prompts, targets

    def _padded_lengths(self, needed: Mapping[str, int]) -> dict[str, int]:
        return {k: batching.bucket_length(needed[k], self.quanta[k], self.lengths[k]) for k in self.lengths}

    def batch(self, examples: Sequence[Mapping[str, str]]) -> dict[str, np.ndarray]:
        """Pads ``examples`` to the smallest bucket that holds the longest of them.

        When every example has its transcript (``text``), the batch also carries it as token ids
        (``transcript_tokens``/``transcript_mask``, no EOS) for the alignment objective."""
        prompts, targets = self._text(examples)
        hidden = [self.cache[e["id"]] for e in examples]
        lengths = self._padded_lengths({
            "speech_frames": max(h.shape[0] for h in hidden), "prefix": max(len(p.prefix) for p in prompts),
            "suffix": max(len(p.suffix) for p in prompts), "targets": max(len(t) for t in targets)})
        hidden, mask = batching.pad_frames(hidden, lengths["speech_frames"], "encoder output")
        out = {**speech_batch(hidden, mask, self.with_tokens), **batching.text_batch(prompts, targets, lengths)}
        if all("text" in e for e in examples):
            transcripts = transcript_token_ids(self.vocabulary, [e["text"] for e in examples])
            out["transcript_tokens"], out["transcript_mask"] = batching.pad_rows(
                transcripts, max(self._transcript_length(), *map(len, transcripts)), "transcript")
        return out

    def _transcript_length(self) -> int:
        """One padded transcript length for the whole corpus: the alignment step is so cheap that
        padding costs nothing, while each extra shape would cost a compilation."""
        if self._transcript_max is None:
            every = [e["text"] for e in self.train_examples + self.eval_examples if "text" in e]
            longest = max([len(t) for t in transcript_token_ids(self.vocabulary, every)], default=1)
            self._transcript_max = -(-max(longest, 1) // self.quanta["targets"]) * self.quanta["targets"]
        return self._transcript_max

    def alignment_token_ids(self) -> list[int]:
        """Every token of the training transcripts: the alignment objective's sub-vocabulary."""
        missing = [e["id"] for e in self.train_examples if "text" not in e]
        if missing:
            raise ValueError(f"{len(missing)} training examples have no transcript ('text'), e.g. {missing[0]}; "
                             "the alignment objective needs one for every example")
        return sorted({t for ids in transcript_token_ids(self.vocabulary, [e["text"] for e in self.train_examples])
                       for t in ids})

    def _train_lengths(self) -> list[dict[str, int]]:
        """Each training example's block lengths (encoder frames, prompt and target tokens)."""
        if self._lengths is None:
            prompts, targets = self._text(self.train_examples)
            self._lengths = [{"speech_frames": self.cache.frames(e["id"]), "prefix": len(p.prefix),
                              "suffix": len(p.suffix), "targets": len(t)}
                             for e, p, t in zip(self.train_examples, prompts, targets)]
        return self._lengths

    def _sequence_sizes(self) -> list[int]:
        """Each training example's LLM sequence length (speech tokens after subsampling + text)."""
        if self._sizes is None:
            self._sizes = [self.llm_tokens(n) for n in self._train_lengths()]
        return self._sizes

    def llm_tokens(self, lengths: Mapping[str, int]) -> int:
        """LLM positions of one padded row with these block lengths."""
        return lengths["speech_frames"] // self.subsampling + lengths["prefix"] + lengths["suffix"] + lengths["targets"]

    def shape_plan(self, batch_size: int, seed: int, num_batches: int) -> dict[str, float]:
        """What the first ``num_batches`` training batches will cost, without building them: the
        mean padded LLM tokens per row and the number of distinct shapes (one compile each)."""
        every = self._train_lengths()
        shapes = []
        for k in range(num_batches):
            rows = [every[i] for i in self._indices(seed, k, batch_size)]
            shapes.append(tuple(sorted(self._padded_lengths({key: max(r[key] for r in rows) for key in self.lengths}).items())))
        return {"mean_llm_tokens": float(np.mean([self.llm_tokens(dict(s)) for s in shapes])),
                "distinct_shapes": len(set(shapes))}

    def _stream(self, seed: int, start: int, stop: int) -> list[int]:
        """Example indices at stream positions [start, stop): epoch after epoch of permutations."""
        n = len(self.train_examples)
        out = []
        for position in range(start, stop):
            epoch, offset = divmod(position, n)
            key = (seed, epoch)
            if key not in self._permutations:
                if len(self._permutations) > 4:
                    self._permutations.clear()
                self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(n)
            out.append(int(self._permutations[key][offset]))
        return out

    def _indices(self, seed: int, batch_index: int, batch_size: int) -> list[int]:
        if self.group_batches == 1:
            return self._stream(seed, batch_index * batch_size, (batch_index + 1) * batch_size)
        window, slot = divmod(batch_index, self.group_batches)
        size = self.group_batches * batch_size
        rows = self._stream(seed, window * size, (window + 1) * size)
        rng = np.random.default_rng([seed, window, 1])
        return batching.length_grouped_batches(rows, self._sequence_sizes(), batch_size, rng)[slot]

    def train_batches(self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0, num_shards: int = 1):
        k = start_batch
        while True:
            rows = self._indices(seed, k, batch_size * num_shards)[shard_index * batch_size: (shard_index + 1) * batch_size]
            yield self.batch([self.train_examples[i] for i in rows])
            k += 1

    def eval_batches(self, batch_size: int, num_batches: int):
        for b in range(num_batches):
            chunk = self.eval_examples[b * batch_size: (b + 1) * batch_size]
            if len(chunk) < batch_size:
                return
            yield self.batch(chunk)

    def padding_report(self, batch_size: int, seed: int = 0, num_batches: int = 64) -> dict[str, float]:
        """Padding share of the LLM sequence (speech tokens + text) over the first batches, with
        this source's bucketing and with fixed padding to the corpus maximum."""
        real, bucketed = 0, 0
        for batch in itertools.islice(self.train_batches(batch_size, seed), num_batches):
            masks = [batch["speech_mask"][:, ::self.subsampling]] + [batch[k] for k in
                                                                     ("prefix_mask", "suffix_mask", "target_mask")]
            real += sum(int(m.sum()) for m in masks)
            bucketed += sum(m.size for m in masks)
        fixed = num_batches * batch_size * self.llm_tokens(self.lengths)
        return {"padding_bucketed": 1 - real / bucketed, "padding_fixed": 1 - real / fixed,
                "tokens_bucketed_over_fixed": bucketed / fixed}
