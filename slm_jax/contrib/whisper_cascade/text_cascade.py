"""The cascade baseline: the same frozen LLM, given a transcript as text where the speech would be.

An SLM answers from ``[prefix | adapted speech | suffix]``. The cascade answers from
``[prefix | transcript tokens | suffix]``: identical template, instruction and decoding, so the
only difference is whether the LLM reads speech embeddings or words. Given the *reference*
transcript this is the ceiling an ideal ASR front end would reach with this LLM; given an SLM's
own transcript, or Whisper-base's (``WhisperBaseTranscriber``), it is a real ASR -> LLM pipeline.

The answer format. The corpus's instruction tasks answer in a short, fixed form
(slm_jax/data/corpus/grammar.py: "green", "under the bed", "at three o'clock", "seven", "cups and
books"); the SLM learns it from its training targets, the frozen LLM never saw it and answers in
full sentences ("The book is green."), which exact match scores as wrong. ``answer(...,
tasks=...)`` therefore asks for the form: a system turn, one or two worked examples of the
task's kind of answer (fixed sentences of the corpus grammar, none from a test set) and a
one-line hint after the instruction; the answer is its first line. Without ``tasks`` the prompt
is the SLM's own template and nothing else.

Every call is padded to one batch size and one prompt length so the jitted generation compiles
once per ``TextAnswerer`` (``min_prompt_length``: one length for prompts of different kinds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.data import batching
from slm_jax.inference import decoding
from slm_jax.data.prompting import PromptFormat


@dataclasses.dataclass(frozen=True)
class AnswerFormat:
    """How the corpus answers one kind of task: a hint after the instruction, and worked
    examples (transcript, instruction, answer) shown as earlier turns of the chat."""

    hint: str
    examples: tuple[tuple[str, str, str], ...]


ANSWER_FORMATS: dict[str, AnswerFormat] = {
    # ASR and the biasing tasks: the answer is the transcript itself. With one example the LLM
    # tended to answer with the example itself, and with the biasing prompt's list of names; three
    # of different kinds (a corpus sentence, a free-form one, a biasing prompt with names from
    # neither of the corpus's lists) brought the WER of the validation split's reference
    # transcripts down from 3% / 22% / 99% (asr_en / asr_en_open / instruct_biasing) to 0% / 30% / 2%.
    "transcript": AnswerFormat(
        "Repeat the text exactly, word for word, and nothing else.",
        (("The meeting is on Friday at four o'clock.", "Transcribe the speech.",
          "The meeting is on Friday at four o'clock."),
         ("the old house stood at the end of a long road", "Write down what was said.",
          "the old house stood at the end of a long road"),
         ("Please call Rosalind tomorrow.", "Transcribe the speech. Names that may occur: Tobias, Rosalind, Marguerite.",
          "Please call Rosalind tomorrow."))),
    "translation": AnswerFormat(
        "Give only the translation, in one line.",
        (("The blue box is under the bed.", "Translate the speech into French.", "La boîte bleue est sous le lit."),)),
    # Dialog replies follow fixed rules of the grammar (grammar.dialog_reply) that no prompt can
    # state without giving them away: only their length is asked for, with a reply outside them.
    "reply": AnswerFormat(
        "Reply with one short sentence.",
        (("It is raining today.", "Reply to the speaker.", "Thank you, I will take an umbrella."),)),
    # Questions about what was said (instruct_qa, instruct_count and the zero-shot questions).
    "answer": AnswerFormat(
        "Give only the answer, in as few words as possible, with numbers written as words; not a full sentence.",
        (("I see two red pens and five black hats.", "How many hats were mentioned?", "five"),
         ("The blue box is under the bed.", "Where is the box?", "under the bed"))),
}
SYSTEM_PROMPT = ("You read a short text and do what the user asks about it. "
                 "You answer in one line and write nothing else.")


def answer_format(task: str) -> str:
    """The ``ANSWER_FORMATS`` key of a corpus task."""
    if task.startswith("asr_") or "biasing" in task:
        return "transcript"
    if task.startswith("ast_"):
        return "translation"
    if task.endswith("_dialog"):
        return "reply"
    return "answer"


def first_line(text: str) -> str:
    """The first non-empty line: the LLM, once done, often goes on ("\\n\\nIn French, ...")."""
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


class TextAnswerer:
    """Greedy answers of a frozen LLM to (transcript, instruction) pairs."""

    def __init__(self, llm: Any, llm_params: Any, vocabulary: Any, prompt_format: PromptFormat,
                 batch_size: int = 8, prompt_bucket: int = 32, max_new_tokens: int = 32, min_prompt_length: int = 0):
        self.llm = llm
        self.params = llm_params
        self.vocabulary = vocabulary
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.prompt_bucket = prompt_bucket
        self.max_new_tokens = max_new_tokens
        self.min_prompt_length = min_prompt_length  # every prompt padded at least to this (one compile)

    @property
    def chat(self) -> bool:
        """Whether the prompt format is a ChatML conversation (earlier turns can be shown)."""
        return self.prompt_format.decoder_start == "last_prompt_token" and "<|im_start|>" in self.prompt_format.before_speech

    def _turn(self, transcript: str, instruction: str) -> tuple[list[int], int]:
        pieces = self.prompt_format.encode(self.vocabulary, instruction)
        words = list(self.vocabulary.encode(transcript)) if transcript.strip() else []
        return pieces.prefix + words + pieces.suffix, pieces.decoder_start

    def prompt_ids(self, transcript: str, instruction: str, task: str | None = None) -> tuple[list[int], int]:
        """(prompt ids with the transcript in the speech slot, first decoder token). With ``task``
        the prompt also asks for the corpus's answer format of that task (``ANSWER_FORMATS``)."""
        if task is None:
            return self._turn(transcript, instruction)
        form = ANSWER_FORMATS[answer_format(task)]
        ids: list[int] = []
        if self.chat:
            eos, newline = int(self.vocabulary.eos_id), list(self.vocabulary.encode("\n"))
            ids += list(self.vocabulary.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"))
            for said, asked, answered in form.examples:
                turn, start = self._turn(said, f"{asked} {form.hint}")
                ids += turn + [start] + list(self.vocabulary.encode(answered)) + [eos] + newline
        turn, start = self._turn(transcript, f"{instruction} {form.hint}")
        return ids + turn, start

    @functools.partial(jax.jit, static_argnums=(0,))
    def _generate(self, params, ids, mask, start):
        embeds = self.llm.apply({"params": params}, ids, method=type(self.llm).embed)
        return decoding.generate(self.llm, params, embeds, mask, start, self.max_new_tokens,
                                 eos_id=int(self.vocabulary.eos_id))

    def answer(self, transcripts: Sequence[str], instructions: Sequence[str],
               tasks: Sequence[str] | None = None) -> list[str]:
        """Answers; with ``tasks`` (one per pair) in the corpus's answer format of each task, and
        only their first line."""
        if len(transcripts) != len(instructions) or (tasks is not None and len(tasks) != len(transcripts)):
            raise ValueError(f"{len(transcripts)} transcripts but {len(instructions)} instructions"
                             + (f" and {len(tasks)} tasks" if tasks is not None else ""))
        kinds = list(tasks) if tasks is not None else [None] * len(transcripts)
        out: list[str] = []
        for i in range(0, len(transcripts), self.batch_size):
            rows = [self.prompt_ids(t, q, k) for t, q, k in zip(transcripts[i: i + self.batch_size],
                                                                 instructions[i: i + self.batch_size],
                                                                 kinds[i: i + self.batch_size])]
            real = len(rows)
            rows += [rows[-1]] * (self.batch_size - real)  # a fixed batch shape: one compile
            longest = max(self.min_prompt_length, max(len(ids) for ids, _ in rows))
            length = -(-longest // self.prompt_bucket) * self.prompt_bucket
            ids, mask = batching.pad_rows([r for r, _ in rows], length, "cascade prompt")
            start = np.asarray([s for _, s in rows], np.int32)
            result = self._generate(self.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(start))
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            out += [self.vocabulary.decode([int(t) for t in tokens[r, :lengths[r]]]).strip() for r in range(real)]
        if tasks is not None:
            out = [first_line(text) for text in out]
        return out


class WhisperBaseTranscriber:
    """Whisper-base run whole, encoder and its own decoder (greedy, English forced, 1 s of silence
    appended and the repeated-4-gram stop of ``WhisperTranscriberConfig``): what Whisper alone
    writes, and the first stage of the Whisper -> LLM cascade. Weights from the frozen source
    ``package:whisper-base`` (slm_jax/weights/frozen.py), as the transcriber front end loads them.

    ``transcribe`` pads a batch to a 2-second bucket, so a few lengths compile."""

    def __init__(self, config: Any = None, source: str = "package:whisper-base", params: Any = None):
        from slm_jax.contrib.whisper_cascade.front_end import ENGLISH, WhisperTranscriber, WhisperTranscriberConfig

        self.config = config or WhisperTranscriberConfig(language_ids=(ENGLISH,), llm_vocabulary="")
        if params is None:
            from slm_jax.weights import frozen

            params = frozen.load_on_host(self.config, source)
        self.params = params
        module = WhisperTranscriber(self.config)
        # The weights are an argument: closed over, XLA would fold them into the program as constants.
        self._run = jax.jit(lambda p, f, m: module.apply({"params": p}, f, m, method=WhisperTranscriber.transcribe))

    @property
    def max_frames(self) -> int:
        """The longest log-mel input it takes: Whisper's 30 s window less the appended silence."""
        return self.config.encoder.max_frames - self.config.trailing_silence_frames

    def transcribe(self, features: Sequence[np.ndarray]) -> list[str]:
        """Log-mel arrays [frames, 80] (``slm_jax.data.audio.log_mel_spectrogram``) -> transcripts."""
        from slm_jax.contrib.whisper_cascade.front_end import _whisper_tokenizer

        if not features:
            return []
        longest = max(f.shape[0] for f in features)
        if longest > self.max_frames:
            raise ValueError(f"an utterance of {longest / 100:.1f} s is longer than Whisper's window "
                             f"({self.max_frames / 100:.0f} s)")
        length = batching.bucket_length(longest, 200, self.max_frames)
        out = self._run(self.params, *batching.pad_frames(list(features), length))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        tokenizer = _whisper_tokenizer(self.config.whisper_tokenizer)
        return [tokenizer.decode([int(t) for t, keep in zip(tokens[r], mask[r]) if keep and t < self.config.end_of_text],
                                 skip_special_tokens=True).strip() for r in range(len(features))]
