"""CachedCorpusData's mixing knob: task_repeats lists a task's training examples more often."""

import pytest

from slm_jax.data.cached.corpus_data import CachedCorpusData
from slm_jax.data.prompting import PromptFormat


def _data(**kwargs):
    return CachedCorpusData("corpus", "unused", PromptFormat(), **kwargs)


def test_task_repeats_multiply_only_the_named_tasks_training_examples():
    train = [{"id": f"{t}-{i}", "task": t} for t in ("asr_en", "asr_en_open", "ast_en_fr") for i in range(2)]
    repeated = _data(task_repeats={"asr_en": 3})._repeated(train)
    assert [ex["id"] for ex in repeated].count("asr_en-0") == 3
    assert sum(ex["task"] == "asr_en" for ex in repeated) == 6
    assert [ex for ex in repeated if ex["task"] != "asr_en"] == train[2:]
    assert _data()._repeated(train) == train  # the paper's rule: in proportion to size


def test_task_repeats_refuse_unknown_tasks_and_bad_counts():
    with pytest.raises(ValueError, match=r"no training examples in corpus: \['asr_xx'\].*\['asr_en'\]"):
        _data(task_repeats={"asr_xx": 2})._repeated([{"id": "a", "task": "asr_en"}])
    with pytest.raises(ValueError, match=r"task_repeats\['asr_en'\] must be a whole number >= 1, got 0.5"):
        _data(task_repeats={"asr_en": 0.5})
