"""ChatML prompts (SmolLM2's chat template) as text and token ids, with a slot for speech.

SmolLM2-Instruct's GGUF carries this Jinja template (``tokenizer.chat_template``)::

    for each message:  <|im_start|>{role}\\n{content}<|im_end|>\\n
    when the first message is not a system message, first insert
                       <|im_start|>system\\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\\n
    add_generation_prompt:  <|im_start|>assistant\\n

``ChatMLTemplate`` renders it in plain python (no Jinja): ``render`` equals
``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` of ``transformers``. The model ends
its turn with ``<|im_end|>`` (``end_of_turn_id``; also the GGUF's EOS id).

For the SLM model the speech embeddings sit inside the user turn: ``speech_prompt`` returns the
token ids before and after that slot, e.g. (no system message given)::

    prefix: <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{instruction_before}
    [speech embeddings]
    suffix: {instruction_after}<|im_end|>\\n<|im_start|>assistant\\n

and the training target is the answer text followed by ``<|im_end|>``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Mapping, Sequence, Union

from slm_jax.weights.tokenizers.gguf_bpe import GgufBpeVocabulary

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

Message = Union[Mapping[str, str], Sequence[str]]  # {"role": ..., "content": ...} or (role, content)


class ChatTemplateError(ValueError):
    """The GGUF's chat template is not ChatML, or messages are malformed."""


def _role_content(m: Message) -> tuple[str, str]:
    if isinstance(m, Mapping):
        return str(m["role"]), str(m["content"])
    role, content = m
    return str(role), str(content)


@dataclasses.dataclass(frozen=True)
class PromptPieces:
    """Text and token ids around a slot (speech) inside the last user turn."""

    prefix_text: str
    suffix_text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]


class ChatMLTemplate:
    """ChatML rendering and tokenization for a GGUF vocabulary."""

    def __init__(
        self,
        vocab: GgufBpeVocabulary,
        default_system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ):
        self.vocab = vocab
        self.default_system_prompt = default_system_prompt
        self.im_start_id = vocab.token_to_id(IM_START)
        self.im_end_id = vocab.token_to_id(IM_END)

    @classmethod
    def from_vocabulary(cls, vocab: GgufBpeVocabulary) -> "ChatMLTemplate":
        """Read the template from the vocabulary's GGUF; it must be ChatML.

        The default system prompt is taken from the template (``None`` if it inserts none).
        """
        template = vocab.chat_template
        if not template or IM_START not in template or IM_END not in template:
            raise ChatTemplateError(f"{vocab.gguf_path}: chat template is not ChatML: {template!r}")
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, flags=re.S)
        return cls(vocab, default_system_prompt=m.group(1) if m else None)

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike) -> "ChatMLTemplate":
        return cls.from_vocabulary(GgufBpeVocabulary(gguf_path))

    @classmethod
    def smollm2(cls) -> "ChatMLTemplate":
        return cls.from_vocabulary(GgufBpeVocabulary.from_smollm2())

    # -- ids --------------------------------------------------------------------------------------
    @property
    def end_of_turn_id(self) -> int:
        """``<|im_end|>``: where the assistant's answer stops (append it to training targets)."""
        return self.im_end_id

    @property
    def end_of_turn_text(self) -> str:
        return IM_END

    # -- text -------------------------------------------------------------------------------------
    @staticmethod
    def turn(role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    @staticmethod
    def generation_prompt() -> str:
        return f"{IM_START}assistant\n"

    def render(self, messages: Iterable[Message], add_generation_prompt: bool = False) -> str:
        """The prompt text, exactly as SmolLM2's Jinja template renders it."""
        parts = []
        for i, m in enumerate(messages):
            role, content = _role_content(m)
            if i == 0 and role != "system" and self.default_system_prompt is not None:
                parts.append(self.turn("system", self.default_system_prompt))
            parts.append(self.turn(role, content))
        if add_generation_prompt:
            parts.append(self.generation_prompt())
        return "".join(parts)

    def encode(self, messages: Iterable[Message], add_generation_prompt: bool = False) -> list[int]:
        return list(self.vocab.encode(self.render(messages, add_generation_prompt)))

    # -- speech slot ----------------------------------------------------------------------------------
    def speech_prompt(
        self,
        instruction_before: str = "",
        instruction_after: str = "",
        *,
        system: str | None = None,
        history: Sequence[Message] = (),
        add_generation_prompt: bool = True,
    ) -> PromptPieces:
        """Text/ids before and after a slot in a new user turn (speech embeddings go in the slot).

        ``history``: earlier turns. ``system``: a system message (else the template's default
        is inserted when the conversation does not start with one). Rendering the conversation
        with ``instruction_before + X + instruction_after`` as the user content gives
        ``prefix_text + X + suffix_text``.

        The pieces are tokenized on their own, so ``prefix_ids + ids(X) + suffix_ids`` equals the
        whole-text ids when the boundaries are token boundaries anyway (newlines, special tokens,
        or no instruction). A trailing space in ``instruction_before`` stays a separate ``Ġ``
        token instead of merging into the next word; for speech in the slot that is what we want.
        """
        messages: list[Message] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.extend(history)
        head = self.render(messages)
        if not messages and self.default_system_prompt is not None:
            head = self.turn("system", self.default_system_prompt)
        prefix = f"{head}{IM_START}user\n{instruction_before}"
        suffix = f"{instruction_after}{IM_END}\n"
        if add_generation_prompt:
            suffix += self.generation_prompt()
        return PromptPieces(
            prefix_text=prefix,
            suffix_text=suffix,
            prefix_ids=tuple(self.vocab.encode(prefix)),
            suffix_ids=tuple(self.vocab.encode(suffix)),
        )

    def target_ids(self, answer: str) -> list[int]:
        """Token ids of an assistant answer followed by the end-of-turn token."""
        return list(self.vocab.encode(answer)) + [self.end_of_turn_id]
