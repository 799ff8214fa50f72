"""Where the instruction text goes around the speech, for each kind of LLM.

An encoder-decoder LLM (T5/mT0) reads ``[prefix | speech | suffix]`` in its encoder and starts
decoding from the pad token. A decoder-only chat LLM reads the same prompt, then its answer:
with ``decoder_start='last_prompt_token'`` the last prompt token (e.g. the newline after
``<|im_start|>assistant``) is moved from the suffix into the decoder block, so that the logits
of the decoder block predict the answer tokens one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

INSTRUCTION_POSITIONS = ("before", "after")
DECODER_STARTS = ("pad", "last_prompt_token")


class PromptIds(NamedTuple):
    prefix: list[int]  # tokens before the speech
    suffix: list[int]  # tokens after the speech
    decoder_start: int  # first decoder input token


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    before_speech: str = ""  # template text before the speech, e.g. "<|im_start|>user\n"
    after_speech: str = ""  # template text after it, e.g. "<|im_end|>\n<|im_start|>assistant\n"
    instruction_position: str = "before"  # the instruction sits before or after the speech
    decoder_start: str = "pad"  # 'pad' (encoder-decoder) or 'last_prompt_token' (decoder-only)
    separator: str = " "  # between the instruction and the speech

    def __post_init__(self):
        if self.instruction_position not in INSTRUCTION_POSITIONS:
            raise ValueError(f"instruction_position must be one of {INSTRUCTION_POSITIONS}")
        if self.decoder_start not in DECODER_STARTS:
            raise ValueError(f"decoder_start must be one of {DECODER_STARTS}")

    def texts(self, instruction: str) -> tuple[str, str]:
        if self.instruction_position == "before":
            return self.before_speech + instruction + self.separator, self.after_speech
        return self.before_speech, self.separator + instruction + self.after_speech

    def encode(self, vocabulary: Any, instruction: str) -> PromptIds:
        """Token ids of the prompt pieces; ``vocabulary`` is any seqio.Vocabulary."""
        before, after = self.texts(instruction)
        prefix = list(vocabulary.encode(before)) if before else []
        suffix = list(vocabulary.encode(after)) if after else []
        if self.decoder_start == "pad":
            return PromptIds(prefix, suffix, 0)
        if not suffix:
            raise ValueError("decoder_start='last_prompt_token' needs text after the speech (e.g. the chat template)")
        return PromptIds(prefix, suffix[:-1], suffix[-1])


T5_PROMPT = PromptFormat()
CHATML_PROMPT = PromptFormat(
    before_speech="<|im_start|>user\n",
    after_speech="<|im_end|>\n<|im_start|>assistant\n",
    instruction_position="after",
    decoder_start="last_prompt_token",
    separator="\n",
)
