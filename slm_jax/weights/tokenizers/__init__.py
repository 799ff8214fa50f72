"""Tokenizers: the LLM's byte-level BPE from its GGUF (a seqio vocabulary) and its chat template.

Imported lazily: ``gguf_bpe`` pulls in seqio and TensorFlow.
"""

import importlib

_EXPORTS = {
    "GgufBpeVocabulary": "gguf_bpe",
    "TokenizerError": "gguf_bpe",
    "build_tokenizer": "gguf_bpe",
    "ChatMLTemplate": "chat_template",
    "ChatTemplateError": "chat_template",
    "PromptPieces": "chat_template",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
