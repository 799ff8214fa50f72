"""Smoke test of the benchmark harness (`python -m bench`) at toy sizes: both sides really run
the same function (equal first-step losses, equal greedy tokens), the JSON and table come out,
and the report flags missed targets."""

from __future__ import annotations

import json

import pytest

from bench import __main__ as bench_main
from bench import report


@pytest.mark.slow
def test_toy_run_matches_the_reference_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_main.main(["--weights", "toy", "--only", "bare,decode", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    losses = results["bare"]["first_step_loss"]
    # Same weights, same batch, fp32: the JAX step and the torch reference compute one function.
    assert losses["slm-jax"] == pytest.approx(losses["torch"], rel=1e-4)
    assert results["bare"]["memory"]["optimizer_state_bytes"]["slm-jax"] == pytest.approx(
        results["bare"]["memory"]["optimizer_state_bytes"]["torch"], rel=0.01)
    greedy = [r for r in results["decode"] if r["num_beams"] == 1]
    assert greedy and all(r["token_agreement"] == 1.0 for r in greedy)
    for r in results["decode"]:
        assert r["sides"]["slm-jax"]["tokens_per_s"] > 0 and r["sides"]["transformers"]["tokens_per_s"] > 0
        # The one-token run (the prefill) is timed too; the loop is the rest of the full run.
        for side in r["sides"].values():
            assert 0 < side["prefill_s"] and side["prefill_s"] + side["loop_s"] == pytest.approx(side["median_s"])
    table = capsys.readouterr().out
    assert "train step, bare" in table and "decode greedy tokens/s" in table and "Machine:" in table
    # The table can be re-made from the JSON alone.
    assert bench_main.main(["--from_json", str(out), "--markdown", str(tmp_path / "t.md")]) == 0
    assert capsys.readouterr().out == table
    assert (tmp_path / "t.md").read_text() == table


def _results(bare_speedup):
    side = {"examples_per_s": 1.0, "median_s": 1.0}
    return {
        "weights": "toy",
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "platform": "p", "jax": "j", "jax_backend": "cpu",
                    "torch": "t", "torch_threads": 2, "load_average_at_start": [1.0, 1.0, 1.0]},
        "bare": {"case": {"batch_size": 8, "seconds": 6.4}, "llm_tokens": 128,
                 "sides": {"slm-jax": side, "torch": side}, "speedup_vs_torch": {"slm-jax": bare_speedup},
                 "memory": {"step_peak_extra_rss_bytes": {"slm-jax": 0, "torch": 0},
                            "optimizer_state_bytes": {"slm-jax": 8, "torch": 8},
                            "param_bytes": {"adapter": 4, "frozen": 396}}},
    }


@pytest.mark.parametrize("speedup, met", [(0.9, "NO"), (1.3, "yes")])
def test_report_flags_missed_targets(speedup, met):
    row = report.rows(_results(speedup))[0]
    assert row[4] == f"{speedup:.2f}x" and row[-1] == met
    assert "2.00% of param bytes" in report.markdown(_results(speedup))


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main.main(["--only", "bare,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_padding_section_runs_both_sides_on_the_same_examples():
    from bench import padding

    r = padding.padding("toy", corpus_size=60, batch_size=2, num_batches=4)
    fixed, bucketed = r["sides"]["fixed"], r["sides"]["bucketed"]
    assert fixed["distinct_shapes"] == 1 and bucketed["distinct_shapes"] >= 1
    assert 0 <= bucketed["padding"] < fixed["padding"] < 1
    assert r["encoder_frames"]["max"] <= r["fixed_lengths"]["speech_frames"]
    rows = report.rows({"padding": r})
    assert rows[0][0].startswith("train step, length-grouped") and rows[0][4].endswith("x")


@pytest.mark.slow
def test_scaling_section_times_the_variant_on_the_same_losses():
    """The scaling rows carry the default step against the same step with another attention
    blocking (toy plan: blocks of 4), which must compute the same loss."""
    from bench import report, suite

    [r] = suite._scaling("toy", suite.TOY)
    losses = r["first_step_loss"]
    assert losses["slm-jax query blocks of 4"] == pytest.approx(losses["slm-jax"], rel=1e-5)
    assert losses["slm-jax"] == pytest.approx(losses["torch"], rel=1e-4)
    assert r["speedup_vs_variant"]["query blocks of 4"] > 0
    rows = report.rows({"scaling": [r]})
    assert [row[0] for row in rows] == ["growth: bare step", "  same, default vs query blocks of 4"]
