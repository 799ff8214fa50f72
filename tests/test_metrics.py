import pytest

from slm_jax.inference import metrics


def test_wer_counts_substitutions_insertions_deletions():
    assert metrics.word_error_rate(["the red cup"], ["the red cup"]) == 0.0
    assert metrics.word_error_rate(["the red cup"], ["the blue cup"]) == pytest.approx(1 / 3)
    assert metrics.word_error_rate(["the red cup"], ["the red cup now"]) == pytest.approx(1 / 3)
    assert metrics.word_error_rate(["the red cup", "a b"], ["red cup", ""]) == pytest.approx(3 / 5)
    # Normalisation: case and punctuation do not count as errors.
    assert metrics.word_error_rate(["The red cup."], ["the RED cup"]) == 0.0


def test_bleu_and_exact_match():
    assert metrics.bleu(["le chat est sur la table"], ["le chat est sur la table"]) == pytest.approx(100.0)
    assert metrics.bleu(["le chat est sur la table"], ["un chien dort"]) < 10
    assert metrics.exact_match(["Paris", "blue"], ["paris.", "red"]) == 0.5
    with pytest.raises(ValueError, match="2 references but 1"):
        metrics.word_error_rate(["a", "b"], ["a"])
