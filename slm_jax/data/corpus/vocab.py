"""Vocabularies: a small SentencePiece model trained on the corpus text, and a spec-string loader.

The tiny default LLM uses a ~1,000-piece unigram SentencePiece model covering all four
languages (with byte fallback, so a name the model has never seen still encodes without
<unk>). Its ids follow T5 and SeqIO: pad 0, EOS 1, unk 2, no BOS. A real LLM brings its own
``seqio.Vocabulary`` (e.g. ``slm_jax.weights.tokenizers.GgufBpeVocabulary``); nothing in the data layer
assumes SentencePiece.

``load_vocabulary(spec)`` turns a string (what a gin file or command line can hold) into a
vocabulary:

  corpus:DIR        the corpus' SentencePiece model (DIR/spm.model; trained if missing)
  spm:PATH          a SentencePiece model file (a bare path ending in .model works too)
  gguf:PATH         the byte-level BPE tokenizer inside a GGUF file
  byte              seqio.ByteVocabulary (UTF-8 bytes)
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


def corpus_vocabulary(corpus_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The SentencePiece vocabulary of a corpus, trained from its vocab text if missing."""
    from slm_jax.data.corpus import builder as corpus

    manifest = corpus.load_manifest(corpus_dir)
    model = os.path.join(corpus_dir, manifest.get("spm_model") or f"{corpus.SPM_PREFIX}.model")
    if not os.path.exists(model):
        model = train_sentencepiece(os.path.join(corpus_dir, manifest["vocab_text"]),
                                    os.path.join(corpus_dir, corpus.SPM_PREFIX), vocab_size)
    return sentencepiece_vocabulary(model)


def load_vocabulary(spec: str):
    """A ``seqio.Vocabulary`` from a spec string (see the module docstring)."""
    kind, sep, arg = spec.partition(":")
    if not sep:
        if spec == "byte":
            kind, arg = "byte", ""
        elif spec.endswith(".model"):
            kind, arg = "spm", spec
        elif spec.endswith(".gguf"):
            kind, arg = "gguf", spec
        else:
            kind, arg = "", spec
    if kind == "corpus":
        return corpus_vocabulary(arg)
    if kind == "spm":
        return sentencepiece_vocabulary(arg)
    if kind == "gguf":
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        return GgufBpeVocabulary(arg)
    if kind == "byte":
        import seqio

        return seqio.ByteVocabulary()
    raise DataError(f"unknown vocabulary {spec!r}; use corpus:DIR, spm:PATH, gguf:PATH or byte")
