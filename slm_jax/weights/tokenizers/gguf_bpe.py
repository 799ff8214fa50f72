"""A ``seqio.Vocabulary`` over the byte-level BPE tokenizer stored in a GGUF file.

The GGUF holds the vocabulary (``tokenizer.ggml.tokens``, already in GPT-2's byte-to-unicode
spelling), the merges, token types (3 = control, 4 = user-defined) and the special ids. The
tokenizer is rebuilt with the ``tokenizers`` library (a dependency of ``transformers``):

  * BPE model with the file's vocabulary and merges, no unknown token (byte-level covers all);
  * pre-tokenizer chosen by ``tokenizer.ggml.pre``, following llama.cpp's table. SmolLM2's
    ``smollm`` (like ``starcoder``, ``refact``, ...) splits every digit on its own and then applies
    the GPT-2 regex; that is also what SmolLM2's own ``tokenizer.json`` does (Digits + ByteLevel);
  * control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` ...) are added as special
    tokens, so they are matched whole in text and encoded as one id each; user-defined tokens are
    added as plain added tokens;
  * byte-level decoder.

``encode`` never adds BOS/EOS (seqio appends EOS itself; SmolLM2's GGUF says add_bos_token=false).
``decode`` skips control tokens, like SentencePiece skips its control symbols, so seqio's
"decode up to and including the first EOS" returns clean text; ``decode_with_special_tokens``
keeps them. ``pad_id`` is the GGUF's padding id (2 = ``<|im_end|>`` for SmolLM2); note that seqio's
feature converters pad with 0 regardless of the vocabulary and rely on masks.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> how to build them with `tokenizers`.
_GPT2_FAMILY = ("gpt2", "mpt", "olmo", "jais", "default")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_FAMILY = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")


class TokenizerError(ValueError):
    """The GGUF's tokenizer is missing or of a kind this module does not build."""


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_FAMILY:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_FAMILY:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                         f"{sorted(_GPT2_FAMILY + _DIGITS_THEN_GPT2 + _LLAMA3_FAMILY)})")


def build_tokenizer(metadata: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.*``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("GGUF vocabulary has duplicate tokens")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     ignore_merges=pre in _LLAMA3_FAMILY)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError("added tokens changed the vocabulary size")
    return tok


class GgufBpeVocabulary(seqio.Vocabulary):
    """seqio vocabulary over a GGUF's byte-level BPE tokenizer (python and TF encode/decode)."""

    def __init__(self, gguf_path: str | os.PathLike, extra_ids: int = 0):
        if extra_ids:
            raise ValueError("GgufBpeVocabulary does not support extra_ids (the LLM has no rows for them)")
        from slm_jax.weights.convert.gguf import read_gguf

        self._path = pathlib.Path(gguf_path)
        md = read_gguf(self._path).metadata
        self._metadata_keys = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{self._path} holds no tokenizer (tokenizer.ggml.tokens)")
        self._tokens: list[str] = list(tokens)
        types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        self._control_ids = frozenset(i for i, t in enumerate(types) if t == CONTROL)
        self._bos = md.get("tokenizer.ggml.bos_token_id")
        self._eos = md.get("tokenizer.ggml.eos_token_id")
        self._pad = md.get("tokenizer.ggml.padding_token_id")
        self._unk = md.get("tokenizer.ggml.unknown_token_id")
        self.add_bos_token = bool(md.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template: str | None = md.get("tokenizer.chat_template")
        self._tok = build_tokenizer(md)
        super().__init__(extra_ids=0)

    # -- pickling (tf.data / multiprocessing): rebuild the Rust tokenizer from the file ---------------
    def __getstate__(self):
        return {"gguf_path": str(self._path)}

    def __setstate__(self, state):
        self.__init__(state["gguf_path"])

    @classmethod
    def from_smollm2(cls) -> "GgufBpeVocabulary":
        """The tokenizer of the packaged SmolLM2-135M-Instruct GGUF (hash-checked)."""
        from slm_jax.weights import assets

        return cls(assets.smollm2_gguf_path())

    # -- ids -----------------------------------------------------------------------------------------
    @property
    def gguf_path(self) -> pathlib.Path:
        return self._path

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad is not None else seqio.vocabularies.PAD_ID

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def _base_vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (skipped by ``decode``)."""
        return self._control_ids

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    # -- python --------------------------------------------------------------------------------------
    def _encode(self, s: str) -> Sequence[int]:
        return self._tok.encode(s, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        ids = [i for i in ids if 0 <= i < len(self._tokens) and i not in self._control_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_with_special_tokens(self, ids: Iterable[int]) -> str:
        """Decode every id, control tokens included (no EOS truncation)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- TensorFlow (tf.py_function: runs the python tokenizer inside the graph) ---------------------
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """Scalar string -> int32 [n]; rank-1 strings -> int32 RaggedTensor [batch, None]."""
        s = tf.convert_to_tensor(s, dtype=tf.string)
        rank = s.shape.rank
        if rank == 0:
            def enc_one(x):
                return np.asarray(self._encode(x.numpy().decode("utf-8")), dtype=np.int32)

            ids = tf.py_function(enc_one, [s], tf.int32)
            ids.set_shape([None])
            return ids
        if rank == 1:
            def enc_many(x):
                rows = self.encode_batch([b.decode("utf-8") for b in x.numpy()])
                flat = np.asarray([i for r in rows for i in r], dtype=np.int32)
                return flat, np.asarray([len(r) for r in rows], dtype=np.int64)

            flat, lengths = tf.py_function(enc_many, [s], [tf.int32, tf.int64])
            flat.set_shape([None])
            lengths.set_shape(s.shape)
            return tf.RaggedTensor.from_row_lengths(flat, lengths)
        raise ValueError(f"_encode_tf takes a scalar or rank-1 string tensor, got rank {rank}")

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids [..., n] -> strings [...] (control tokens skipped)."""
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(default_value=self.pad_id)
        ids = tf.convert_to_tensor(ids)
        out_shape = ids.shape[:-1]

        def dec(x):
            arr = x.numpy()
            flat = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
            texts = [self._decode(row).encode("utf-8") for row in flat]
            return np.asarray(texts, dtype=object).reshape(arr.shape[:-1])

        out = tf.py_function(dec, [ids], tf.string)
        out.set_shape(out_shape)
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, GgufBpeVocabulary):
            return False
        return self._tokens == other._tokens and self._metadata_keys == other._metadata_keys

    def __hash__(self) -> int:
        return hash((len(self._tokens), self._eos, self._pad, tuple(self._tokens[:64])))

    def __repr__(self) -> str:
        return f"GgufBpeVocabulary({str(self._path)!r}, vocab_size={self.vocab_size})"
