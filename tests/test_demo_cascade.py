"""The cascade baseline's prompt (slm_jax/contrib/whisper_cascade/text_cascade.py): asked for the
corpus's answer format, it shows the frozen LLM the form of the answers the corpus scores, and
keeps the SLM's template around the transcript. A toy vocabulary and a stand-in generation loop:
no model is loaded."""

from __future__ import annotations

import types

import numpy as np
import pytest

from slm_jax.contrib.whisper_cascade import text_cascade as tc
from slm_jax.data.corpus import builder, grammar
from slm_jax.data.prompting import CHATML_PROMPT, T5_PROMPT


class Words:
    """A toy vocabulary: one id per whitespace-separated word, decoded back with spaces."""

    eos_id = 1

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text):
        return [self.ids.setdefault(w, len(self.ids) + 10) for w in text.split()]

    def decode(self, ids):
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words.get(i, "\n") for i in ids)


def test_every_corpus_task_has_an_answer_format_and_the_answers_are_the_corpus_form():
    tasks = {spec.task for spec in builder.plan_corpus(300, seed=0, languages=("en", "fr"))}
    kinds = {task: tc.answer_format(task) for task in tasks}
    assert kinds["asr_en"] == kinds["instruct_biasing"] == kinds["zeroshot_biasing_unseen"] == "transcript"
    assert kinds["ast_en_fr"] == "translation" and kinds["instruct_dialog"] == "reply"
    assert kinds["instruct_qa"] == kinds["instruct_count"] == kinds["zeroshot_which_colour"] == "answer"
    # The worked answers are in the grammar's own form: a colour word, a location phrase, a number word.
    examples = tc.ANSWER_FORMATS["answer"].examples
    assert examples[0][2] in grammar.NUMBERS["en"] and examples[1][2] in [v["en"] for v in grammar.LOCATIONS.values()]
    # None of them is a test example of the demo corpus (same plan as the release's corpus).
    test = {(s.text, s.target) for s in builder.plan_corpus(1500, seed=0, languages=("en", "fr")) if s.split == "test"}
    assert not test & {(said, answer) for form in tc.ANSWER_FORMATS.values() for said, _, answer in form.examples}


def test_the_format_prompt_adds_a_system_turn_examples_and_a_hint_around_the_same_template():
    vocab = Words()
    answerer = tc.TextAnswerer(llm=None, llm_params=None, vocabulary=vocab, prompt_format=CHATML_PROMPT)
    plain, start = answerer.prompt_ids("the red cup is on the table", "What colour is the cup?")
    ids, formatted_start = answerer.prompt_ids("the red cup is on the table", "What colour is the cup?", "instruct_qa")
    form = tc.ANSWER_FORMATS["answer"]
    # The question's own turn comes last, the transcript in the speech slot and the hint after the question.
    last, last_start = answerer.prompt_ids("the red cup is on the table", f"What colour is the cup? {form.hint}")
    assert ids[-len(last):] == last and formatted_start == last_start == start
    assert plain == CHATML_PROMPT.encode(vocab, "What colour is the cup?").prefix + vocab.encode(
        "the red cup is on the table") + CHATML_PROMPT.encode(vocab, "What colour is the cup?").suffix
    before = ids[: -len(last)]
    assert before[: len(vocab.encode(f"<|im_start|>system\n{tc.SYSTEM_PROMPT}<|im_end|>\n"))] == vocab.encode(
        f"<|im_start|>system\n{tc.SYSTEM_PROMPT}<|im_end|>\n")
    # Each worked example is a whole exchange: its turn, the answer, end of turn.
    for said, asked, answered in form.examples:
        turn, turn_start = answerer.prompt_ids(said, f"{asked} {form.hint}")
        exchange = turn + [turn_start] + vocab.encode(answered) + [vocab.eos_id] + vocab.encode("\n")
        assert any(before[i: i + len(exchange)] == exchange for i in range(len(before)))
    # An encoder-decoder template has no earlier turns: only the hint is added.
    t5 = tc.TextAnswerer(llm=None, llm_params=None, vocabulary=vocab, prompt_format=T5_PROMPT)
    assert t5.prompt_ids("a b", "Where is it?", "instruct_qa") == t5.prompt_ids("a b", f"Where is it? {form.hint}")
    assert t5.prompt_ids("a b", "Reply.", "instruct_dialog")[0] != t5.prompt_ids("a b", "Where?", "instruct_qa")[0]


def test_formatted_answers_are_their_first_line_and_every_prompt_has_one_length():
    vocab = Words()
    for word in ("green", "In", "French", "it", "is", "vert"):
        vocab.encode(word)
    answerer = tc.TextAnswerer(llm=None, llm_params=None, vocabulary=vocab, prompt_format=CHATML_PROMPT,
                               batch_size=4, prompt_bucket=16, min_prompt_length=200)
    shapes = []

    def generate(params, ids, mask, start):  # stands in for the jitted loop: "green \n In French it is vert"
        shapes.append(ids.shape)
        row = [vocab.ids["green"], 0, vocab.ids["In"], vocab.ids["French"], vocab.ids["it"], vocab.ids["is"], vocab.ids["vert"]]
        return types.SimpleNamespace(tokens=np.asarray([row] * ids.shape[0]), lengths=np.full(ids.shape[0], len(row)))

    answerer._generate = generate
    assert answerer.answer(["the green cup"], ["Which colour?"], ["instruct_qa"]) == ["green"]
    assert answerer.answer(["the green cup"], ["Which colour?"]) == ["green \n In French it is vert"]  # as generated
    answerer.answer(["a"] * 5, ["Reply."] * 5, ["instruct_dialog"] * 5)
    assert shapes == [(4, 208)] * 4  # fixed batch, every prompt padded to one length: one compile
    with pytest.raises(ValueError, match="2 tasks"):
        answerer.answer(["a"], ["b"], ["asr_en", "asr_en"])
    assert tc.first_line("\n\n  five \nsix") == "five" and tc.first_line("  ") == ""
