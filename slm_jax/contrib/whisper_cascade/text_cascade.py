"""The cascade baseline: the same frozen LLM, given a transcript as text where the speech would be.

An SLM answers from ``[prefix | adapted speech | suffix]``. The cascade answers from
``[prefix | transcript tokens | suffix]``: identical template, instruction and decoding, so the
only difference is whether the LLM reads speech embeddings or words. Given the *reference*
transcript this is the ceiling an ideal ASR front end would reach with this LLM; given the
SLM's *own* transcript it is a real ASR -> LLM pipeline.

Every call is padded to one batch size and one prompt length so the jitted generation compiles
once per ``TextAnswerer``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.data import batching
from slm_jax.inference import decoding
from slm_jax.data.prompting import PromptFormat


class TextAnswerer:
    """Greedy answers of a frozen LLM to (transcript, instruction) pairs."""

    def __init__(self, llm: Any, llm_params: Any, vocabulary: Any, prompt_format: PromptFormat,
                 batch_size: int = 8, prompt_bucket: int = 32, max_new_tokens: int = 32):
        self.llm = llm
        self.params = llm_params
        self.vocabulary = vocabulary
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.prompt_bucket = prompt_bucket
        self.max_new_tokens = max_new_tokens

    def prompt_ids(self, transcript: str, instruction: str) -> tuple[list[int], int]:
        """(prompt ids with the transcript in the speech slot, first decoder token)."""
        pieces = self.prompt_format.encode(self.vocabulary, instruction)
        words = list(self.vocabulary.encode(transcript)) if transcript.strip() else []
        return pieces.prefix + words + pieces.suffix, pieces.decoder_start

    @functools.partial(jax.jit, static_argnums=(0,))
    def _generate(self, params, ids, mask, start):
        embeds = self.llm.apply({"params": params}, ids, method=type(self.llm).embed)
        return decoding.generate(self.llm, params, embeds, mask, start, self.max_new_tokens,
                                 eos_id=int(self.vocabulary.eos_id))

    def answer(self, transcripts: Sequence[str], instructions: Sequence[str]) -> list[str]:
        if len(transcripts) != len(instructions):
            raise ValueError(f"{len(transcripts)} transcripts but {len(instructions)} instructions")
        out: list[str] = []
        for i in range(0, len(transcripts), self.batch_size):
            rows = [self.prompt_ids(t, q) for t, q in zip(transcripts[i: i + self.batch_size],
                                                          instructions[i: i + self.batch_size])]
            real = len(rows)
            rows += [rows[-1]] * (self.batch_size - real)  # a fixed batch shape: one compile
            longest = max(len(ids) for ids, _ in rows)
            length = -(-longest // self.prompt_bucket) * self.prompt_bucket
            ids, mask = batching.pad_rows([r for r, _ in rows], length, "cascade prompt")
            start = np.asarray([s for _, s in rows], np.int32)
            result = self._generate(self.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(start))
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            out += [self.vocabulary.decode([int(t) for t in tokens[r, :lengths[r]]]).strip() for r in range(real)]
        return out
