"""The corpus's own vocabulary: a small SentencePiece model trained on the corpus text.

The tiny default LLM uses a ~1,000-piece unigram SentencePiece model covering all four
languages (with byte fallback, so a name the model has never seen still encodes without
<unk>). Its ids follow T5 and SeqIO: pad 0, EOS 1, unk 2, no BOS. A real LLM brings its own
``seqio.Vocabulary`` (e.g. ``slm_jax.weights.tokenizers.GgufBpeVocabulary``); nothing in the data layer
assumes SentencePiece.

Spec strings that name a vocabulary ('corpus:DIR', 'spm:PATH', ...) are read by
slm_jax/data/vocabularies.py.
"""

from __future__ import annotations

import os

from slm_jax.data.errors import DataError

DEFAULT_VOCAB_SIZE = 1000


def train_sentencepiece(text_file: str, model_prefix: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Trains a unigram SentencePiece model on ``text_file``; returns the .model path.

    ``vocab_size`` is an upper bound: a small text gives fewer pieces rather than an error.
    """
    import sentencepiece as spm

    if not os.path.exists(text_file):
        raise DataError(f"{text_file}: no such vocabulary text file")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    spm.SentencePieceTrainer.train(
        input=text_file,
        model_prefix=tmp_prefix,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1,  # one thread: the same text always gives the same model
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"


def sentencepiece_vocabulary(model_path: str):
    """A ``seqio.SentencePieceVocabulary`` for ``model_path``."""
    import seqio

    if not os.path.exists(model_path):
        raise DataError(f"{model_path}: no such SentencePiece model")
    return seqio.SentencePieceVocabulary(os.path.abspath(model_path))
