"""Vocabularies from spec strings (what a gin file or command line can hold):

  package:smollm2-135m-instruct   SmolLM2's byte-level BPE, from its packaged GGUF file
  corpus:DIR        the corpus's SentencePiece model (DIR/spm.model; trained if missing)
  spm:PATH          a SentencePiece model file (a bare path ending in .model works too)
  gguf:PATH         the byte-level BPE tokenizer inside a GGUF file
  byte              seqio.ByteVocabulary (UTF-8 bytes)
"""

from __future__ import annotations

import os

from slm_jax.data.errors import DataError


def corpus_vocabulary(corpus_dir: str, vocab_size: int | None = None):
    """The SentencePiece vocabulary of a corpus, trained from its vocab text if missing."""
    from slm_jax.data.corpus import builder, vocab

    manifest = builder.load_manifest(corpus_dir)
    model = os.path.join(corpus_dir, manifest.get("spm_model") or f"{builder.SPM_PREFIX}.model")
    if not os.path.exists(model):
        model = vocab.train_sentencepiece(os.path.join(corpus_dir, manifest["vocab_text"]),
                                          os.path.join(corpus_dir, builder.SPM_PREFIX),
                                          vocab_size or vocab.DEFAULT_VOCAB_SIZE)
    return vocab.sentencepiece_vocabulary(model)


def load_vocabulary(spec: str):
    """A ``seqio.Vocabulary`` from a spec string (see the module docstring)."""
    if spec == "package:smollm2-135m-instruct":
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        return GgufBpeVocabulary.from_smollm2()
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
        from slm_jax.data.corpus import vocab

        return vocab.sentencepiece_vocabulary(arg)
    if kind == "gguf":
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        return GgufBpeVocabulary(arg)
    if kind == "byte":
        import seqio

        return seqio.ByteVocabulary()
    raise DataError(f"unknown vocabulary {spec!r}; use package:smollm2-135m-instruct, corpus:DIR, spm:PATH, "
                    "gguf:PATH or byte")
