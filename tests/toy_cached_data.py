"""A toy cached-speech data source with transcripts: each character's encoder frames carry a fixed
random pattern, so the transcript is recoverable from the 'speech' (a learnable alignment problem).
Shared by tests/test_alignment.py and tests/test_warm_start.py."""

import numpy as np

from slm_jax.data.vocabularies import load_vocabulary
from slm_jax.data.cached.encoder_cache import CachedSpeechData
from slm_jax.data.prompting import PromptFormat

# Byte tokens: one per character, so each must fit 6 encoder frames -> 1.5 adapter frames.
WORDS = ["red cup", "blue box", "green hat", "a pen", "the lamp"]


class ToyCache:
    """Encoder outputs keyed by id: each word's frames carry a fixed random pattern, so the
    transcript is recoverable from the 'speech' (a learnable toy alignment problem)."""

    def __init__(self, examples, dim=32, frames_per_char=6, seed=0):
        rng = np.random.default_rng(seed)
        patterns = {c: rng.normal(size=dim).astype(np.float32) for c in "abcdefghijklmnopqrstuvwxyz "}
        self._hidden = {e["id"]: np.repeat(np.stack([patterns[c] for c in e["text"]]), frames_per_char, axis=0)
                        for e in examples}
        self.dim = dim

    def frames(self, example_id):
        return self._hidden[example_id].shape[0]

    def __getitem__(self, example_id):
        return self._hidden[example_id]


def examples_of(n=24, with_text=True):
    out = []
    for i in range(n):
        text = WORDS[i % len(WORDS)]
        example = {"id": f"e{i}", "instruction": "Transcribe.", "target": text}
        if with_text:
            example["text"] = text
        out.append(example)
    return out


def toy_source(with_text=True):
    examples = examples_of(with_text=with_text)
    cache = ToyCache(examples_of())
    # 'byte' ids of lowercase text stay below the tiny LLM's 128-token vocabulary.
    return CachedSpeechData(cache, examples, examples[:8], load_vocabulary("byte"), PromptFormat(),
                            speech_frames=64, prefix=16, suffix=8, targets=32, group_batches=1)
