"""Bad input to every entry point: one clear line `prog: error: ...`, a non-zero exit, no
traceback, and every existing file left as it was.

The table runs in one process (tests/bad_input_runner.py calls each console script's main()),
so JAX and TensorFlow start once. Audio the front end accepts is listed too: 8 kHz and 48 kHz
files are RESAMPLED to 16 kHz and stereo is MIXED to mono (slm-infer answers for them); a file
that is not audio, has no samples or is longer than the data source's max_audio_seconds (30 s
here, a 10-minute file) is REFUSED.
"""

import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile

import reliability_support as rs

pytestmark = pytest.mark.slow  # a module-scoped fixture or every test here takes seconds


RUNNER = os.path.join(rs.ROOT, "tests", "bad_input_runner.py")
NOT_UTF8_INSTRUCTION = "caf\udce9"  # what Python makes of the Latin-1 bytes b"caf\xe9" in argv

# (id, prog, argv, expected): expected is ("error", text in the one error line) or ("ok", text in
# stdout). {F} is the fixture directory.
INFER = ["--gin_file={F}/infer.gin", "--checkpoint={F}/ckpt"]
CASES = [
    # slm-train
    ("train-unknown-gin-name", "slm-train", ["--gin_file={F}/infer.gin", "--model_dir={F}/new", "--gin.NoSuchThing.x=3"],
     ("error", "bad gin configuration")),
    ("train-missing-gin-file", "slm-train", ["--gin_file={F}/nope.gin", "--model_dir={F}/new"], ("error", "gin file not found")),
    ("train-non-utf8-gin-file", "slm-train", ["--gin_file={F}/non_utf8.gin", "--model_dir={F}/new"],
     ("error", "bad gin configuration")),
    ("train-zero-mesh-axis", "slm-train", ["--gin_file={F}/infer.gin", "--model_dir={F}/new",
                                          "--gin.train.mesh_shape='data=0'"], ("error", "train.mesh_shape: bad mesh spec")),
    ("train-zero-steps", "slm-train", ["--gin_file={F}/infer.gin", "--model_dir={F}/new", "--gin.TRAIN_STEPS=0"],
     ("error", "train.steps must be at least 1")),
    ("train-checkpoint-of-another-config", "slm-train",
     ["--gin_file={F}/infer.gin", "--model_dir={F}/ckpt", "--gin.TRAIN_STEPS=4", "--gin.AdapterConfig.ffn_dim=32"],
     ("error", "different configuration")),
    ("train-truncated-checkpoint", "slm-train", ["--gin_file={F}/infer.gin", "--model_dir={F}/truncated", "--gin.TRAIN_STEPS=4"],
     ("error", "is damaged")),
    # slm-infer
    ("infer-not-audio", "slm-infer", INFER + ["--audio={F}/not_audio.wav"], ("error", "not a readable audio file")),
    ("infer-zero-bytes", "slm-infer", INFER + ["--audio={F}/zero_bytes.wav"], ("error", "not a readable audio file")),
    ("infer-zero-samples", "slm-infer", INFER + ["--audio={F}/zero_samples.wav"], ("error", "zero-length audio")),
    ("infer-ten-minutes", "slm-infer", INFER + ["--audio={F}/ten_minutes.wav"], ("error", "longer than the maximum of 30 s")),
    ("infer-missing-audio", "slm-infer", INFER + ["--audio={F}/nope.wav"], ("error", "no such audio file")),
    ("infer-missing-checkpoint", "slm-infer", ["--gin_file={F}/infer.gin", "--checkpoint={F}/nope", "--audio={F}/ok.wav"],
     ("error", "no checkpoint at")),
    ("infer-empty-checkpoint-dir", "slm-infer", ["--gin_file={F}/infer.gin", "--checkpoint={F}/empty", "--audio={F}/ok.wav"],
     ("error", "no completed step")),
    ("infer-truncated-checkpoint", "slm-infer",
     ["--gin_file={F}/infer.gin", "--checkpoint={F}/truncated", "--audio={F}/ok.wav"], ("error", "is damaged")),
    ("infer-checkpoint-of-another-config", "slm-infer", INFER + ["--audio={F}/ok.wav", "--gin.AdapterConfig.ffn_dim=32"],
     ("error", "different configuration")),
    ("infer-unknown-gin-name", "slm-infer", INFER + ["--audio={F}/ok.wav", "--gin.NoSuchThing.x=3"],
     ("error", "bad gin configuration")),
    ("infer-non-utf8-instruction", "slm-infer", INFER + ["--audio={F}/ok.wav", f"--instruction={NOT_UTF8_INSTRUCTION}"],
     ("error", "UTF-8")),
    ("infer-resampled-and-mixed-down", "slm-infer",
     INFER + ["--audio={F}/ok.wav", "--audio={F}/rate_8k.wav", "--audio={F}/rate_48k.wav", "--audio={F}/stereo.wav",
              "--max_new_tokens=2"], ("ok", "stereo.wav\t")),
    ("infer-zero-beams", "slm-infer", INFER + ["--audio={F}/ok.wav", "--num_beams=0"],
     ("error", "--num_beams must be >= 1, got 0")),
    ("infer-loop-stop-with-beams", "slm-infer",
     INFER + ["--audio={F}/ok.wav", "--num_beams=2", "--stop_on_repeated_ngram=4"],
     ("error", "--stop_on_repeated_ngram is a greedy-decoding rule")),
    ("infer-loop-stop-greedy", "slm-infer", INFER + ["--audio={F}/ok.wav", "--audio={F}/stereo.wav",
                                                      "--stop_on_repeated_ngram=2", "--max_new_tokens=4"],
     ("ok", "stereo.wav\t")),
    ("infer-transcript-bias-with-beams", "slm-infer", INFER + ["--audio={F}/ok.wav", "--num_beams=2",
                                                               "--transcript_bias=2"],
     ("error", "--transcript_bias is a greedy-decoding rule")),
    ("infer-transcript-bias-without-a-transcript", "slm-infer", INFER + ["--audio={F}/ok.wav", "--transcript_bias=2"],
     ("error", "--transcript_bias: this model's speech front end writes no transcript")),
    # slm-eval
    ("eval-negative-transcript-bias", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--out={F}/r.json",
                                                           "--transcript_bias=-1"],
     ("error", "--transcript_bias must be >= 0, got -1")),
    ("eval-negative-ngram-guard", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--out={F}/r.json",
                                                       "--no_repeat_ngram_size=-1"],
     ("error", "--no_repeat_ngram_size must be >= 0, got -1")),
    ("eval-zero-new-tokens", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--out={F}/r.json", "--max_new_tokens=0"],
     ("error", "--max_new_tokens must be >= 1, got 0")),
    ("eval-unknown-task", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--tasks=asr_xx", "--out={F}/r.json"],
     ("error", "unknown task 'asr_xx'")),
    ("eval-missing-corpus", "slm-eval", INFER + ["--corpus_dir={F}/nope", "--out={F}/r.json"], ("error", "nope")),
    ("eval-out-in-missing-dir", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--out={F}/nope/r.json"],
     ("error", "does not exist")),
    ("eval-missing-checkpoint", "slm-eval",
     ["--gin_file={F}/infer.gin", "--checkpoint={F}/nope", "--corpus_dir={F}/corpus", "--split=train",
      "--out={F}/r.json"],
     ("error", "no checkpoint at")),
    ("eval-non-utf8-gin-file", "slm-eval", ["--gin_file={F}/non_utf8.gin", "--checkpoint={F}/ckpt", "--out={F}/r.json"],
     ("error", "bad gin configuration")),
    ("eval-audio-tsv", "slm-eval", INFER + ["--audio_tsv={F}/own.tsv", "--out={F}/../own_report.json",
                                            "--max_new_tokens=2"], ("ok", "asr_audio_tsv")),
    ("eval-cache-front-end-audio-tsv", "slm-eval", INFER + ["--audio_tsv={F}/own.tsv", "--out={F}/../r.json",
                                                            "--cache_front_end"], ("error", "--cache_front_end")),
    ("eval-ctc-without-alignment-steps", "slm-eval",
     INFER + ["--audio_tsv={F}/own.tsv", "--decoder=ctc", "--out={F}/../r.json"],
     ("error", "records no alignment vocabulary")),
    ("eval-audio-tsv-missing-audio", "slm-eval", INFER + ["--audio_tsv={F}/own_missing.tsv", "--out={F}/../r.json"],
     ("error", "nope.wav: no such audio file")),
    ("eval-audio-tsv-no-tab", "slm-eval", INFER + ["--audio_tsv={F}/own_no_tab.tsv", "--out={F}/../r.json"],
     ("error", "own_no_tab.tsv:2: expected 'path<TAB>transcript'")),
    # slm-make-corpus
    ("corpus-zero-size", "slm-make-corpus", ["--out={F}/new_corpus", "--size=0"], ("error", "--size must be positive")),
    ("corpus-unknown-language", "slm-make-corpus", ["--out={F}/new_corpus", "--size=4", "--languages=xx"],
     ("error", "xx")),
    ("corpus-existing-out", "slm-make-corpus", ["--out={F}/corpus", "--size=4", "--synthesizer=tones"], ("error", "corpus")),
    # slm-convert
    ("convert-missing-hf-dir", "slm-convert", ["--hf_dir={F}/nope", "--out={F}/converted"], ("error", "is not a directory")),
    ("convert-not-a-hf-checkpoint", "slm-convert", ["--hf_dir={F}/ckpt", "--out={F}/converted"], ("error", "")),
    ("convert-non-utf8-config", "slm-convert", ["--hf_dir={F}/bad_hf", "--out={F}/converted"], ("error", "")),
]
# One error layer for every command: wrong numbers, outputs that cannot be written, text that is
# not UTF-8, undefined gin macros, damaged downloads, audio longer than the model takes.
EVAL_TSV = INFER + ["--audio_tsv={F}/own.tsv", "--max_new_tokens=2"]
PLAN = ["--gin_file={F}/infer.gin"]
CASES += [
    ("eval-zero-batch", "slm-eval", EVAL_TSV + ["--out={F}/r.json", "--batch_size=0"],
     ("error", "--batch_size must be >= 1, got 0")),
    ("eval-negative-batch", "slm-eval", EVAL_TSV + ["--out={F}/r.json", "--batch_size=-2"],
     ("error", "--batch_size must be >= 1, got -2")),
    ("eval-out-is-a-directory", "slm-eval", EVAL_TSV + ["--out={F}/out_dir"], ("error", "is a directory")),
    ("eval-out-read-only", "slm-eval", EVAL_TSV + ["--out=/sys/slm_report.json"], ("error", "cannot write --out")),
    ("eval-non-utf8-tsv", "slm-eval", INFER + ["--audio_tsv={F}/latin1.tsv", "--out={F}/r.json"],
     ("error", "latin1.tsv:1: not UTF-8 text")),
    ("eval-non-utf8-instruction", "slm-eval", EVAL_TSV + ["--out={F}/r.json", f"--instruction={NOT_UTF8_INSTRUCTION}"],
     ("error", "--instruction is not valid UTF-8")),
    ("eval-zero-max-examples", "slm-eval", INFER + ["--corpus_dir={F}/corpus", "--out={F}/r.json",
                                                   "--max_examples_per_task=0"],
     ("error", "--max_examples_per_task must be >= 1, got 0")),
    ("eval-audio-tsv-too-long", "slm-eval", INFER + ["--audio_tsv={F}/own_long.tsv", "--out={F}/r.json"],
     ("error", "ten_minutes.wav: audio is 600.00 s long, longer than the maximum of 30 s")),
    ("eval-frozen-config-changed", "slm-eval", EVAL_TSV + ["--out={F}/r.json", "--gin.T5Config.num_layers=2"],
     ("error", "T5Config.num_layers was 1, now 2")),
    ("infer-frozen-config-changed", "slm-infer", INFER + ["--audio={F}/ok.wav", "--gin.T5Config.num_layers=2"],
     ("error", "T5Config.num_layers was 1, now 2")),
    ("infer-undefined-macro", "slm-infer", INFER + ["--audio={F}/ok.wav", "--gin.train.learning_rate=%NOPE"],
     ("error", "macro %NOPE (used by train.learning_rate) is never defined")),
    ("infer-header-longer-than-file", "slm-infer", INFER + ["--audio={F}/cut_short.wav", "--max_new_tokens=2"],
     ("ok", "")),
    ("train-misspelt-macro-in-file", "slm-train", ["--gin_file={F}/typo.gin", "--model_dir={F}/new"],
     ("error", "macro %LEARNING_RATEE (used by train.learning_rate) is never defined; did you mean %LEARNING_RATE?")),
    ("train-missing-corpus", "slm-train", ["--gin_file=gin/runs/tiny.gin", "--model_dir={F}/new",
                                           "--gin.CORPUS_DIR='{F}/no_corpus'"], ("error", "no_corpus does not exist")),
    ("train-gin-suffix-stripped", "slm-train", ["--gin_file={F}/infer.gin", "--model_dir={F}/new",
                                                "--gin.train.max_to_keep=-1"],
     ("error", "train.max_to_keep must be a non-negative integer, got -1")),
    ("convert-garbage-safetensors", "slm-convert", ["--hf_dir={F}/hf_garbage", "--out={F}/converted"],
     ("error", "model.safetensors is not a safetensors file")),
    ("convert-truncated-safetensors", "slm-convert", ["--hf_dir={F}/hf_truncated", "--out={F}/converted"],
     ("error", "model.safetensors is truncated")),
    ("convert-out-is-a-file", "slm-convert", ["--hf_dir={F}/hf_truncated", "--out={F}/ok.wav"], ("error", "is a file")),
    ("convert-out-read-only", "slm-convert", ["--hf_dir={F}/hf_one_tensor", "--out=/sys/converted"],
     ("error", "is not writable")),
    ("convert-out-is-a-model-dir", "slm-convert", ["--hf_dir={F}/hf_truncated", "--out={F}/ckpt"],
     ("error", "is a training run's model directory")),
    ("plan-zero-mesh-axis", "slm-plan", PLAN + ["--mesh=data=0"], ("error", "axis data has size 0")),
    ("plan-negative-mesh-axis", "slm-plan", PLAN + ["--mesh=data=1,model=-2"], ("error", "axis model has size -2")),
    ("plan-zero-batch", "slm-plan", PLAN + ["--mesh=data=1", "--batch_size=0"], ("error", "--batch_size must be >= 1")),
    ("plan-batch-not-divisible", "slm-plan", PLAN + ["--mesh=data=4", "--batch_size=6"],
     ("error", "batch 6 does not divide over the 4 batch shards")),
    ("plan-negative-memory", "slm-plan", PLAN + ["--mesh=data=1", "--device_memory_gib=-1"],
     ("error", "--device_memory_gib must be > 0, got -1.0")),
    ("plan-no-compile-does-not-say-fits", "slm-plan", PLAN + ["--mesh=data=1", "--no_compile", "--device_memory_gib=80"],
     ("ok", "parameters and optimizer state fit; activations not counted")),
    ("corpus-out-is-a-file", "slm-make-corpus", ["--out={F}/ok.wav", "--size=4", "--synthesizer=tones"],
     ("error", "is a file")),
    ("corpus-out-read-only", "slm-make-corpus", ["--out=/sys/slm_corpus", "--size=4", "--synthesizer=tones"],
     ("error", "cannot write the corpus /sys/slm_corpus")),
    ("corpus-out-not-a-corpus", "slm-make-corpus", ["--out={F}/hf_garbage", "--size=4", "--synthesizer=tones"],
     ("error", "is not a corpus")),
]
# Not written yet when this suite was made; their rows run (and must pass) once they exist.
CASES += [
    ("mixture-unknown-name", "slm-mixture", ["inspect", "no_such_mixture"], ("error", "no_such_mixture")),
]


def _wav(path, samples, rate):
    soundfile.write(path, samples, rate, subtype="PCM_16")


def _tone(seconds, rate, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t)
    return mono if channels == 1 else np.stack([mono, -mono], axis=1)


def _run_cases(fixture, cases, results_name):
    cases_path, results_path = fixture.parent / f"{results_name}.cases.json", fixture.parent / f"{results_name}.json"
    spec = [{"id": i, "prog": p, "argv": [a.replace("{F}", str(fixture)) for a in argv]} for i, p, argv, _ in cases]
    cases_path.write_text(json.dumps(spec))
    done = rs.run([sys.executable, RUNNER, str(cases_path), str(results_path)], timeout=900,
                  PYTHONPATH=os.path.join(rs.ROOT, "tests"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results_path.read_text())


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    f = tmp_path_factory.mktemp("bad_input")
    gin_file = rs.write_config(f / "infer.gin", rs.INFER_CONFIG + "TRAIN_STEPS = 2\n")
    trained = rs.run(rs.harness_cmd(gin_file, f / "ckpt"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    shutil.copytree(f / "ckpt", f / "truncated")
    for step_dir in glob.glob(str(f / "truncated" / "[0-9]*")):
        for data_file in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
            with open(data_file, "r+b") as fh:
                fh.truncate(os.path.getsize(data_file) // 2)
    (f / "empty").mkdir()
    (f / "non_utf8.gin").write_bytes(b"include 'base.gin'\nTRAIN_STEPS = 2 # caf\xe9\n")
    (f / "bad_hf").mkdir()
    (f / "bad_hf" / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    (f / "not_audio.wav").write_bytes(b"RIFF this is not a wav file at all" * 10)
    (f / "zero_bytes.wav").write_bytes(b"")
    _wav(f / "zero_samples.wav", np.zeros(0), 16000)
    _wav(f / "ok.wav", _tone(0.5, 16000), 16000)
    _wav(f / "rate_8k.wav", _tone(0.5, 8000), 8000)
    _wav(f / "rate_48k.wav", _tone(0.5, 48000), 48000)
    _wav(f / "stereo.wav", _tone(0.5, 16000, channels=2), 16000)
    _wav(f / "ten_minutes.wav", np.zeros(600 * 8000), 8000)
    (f / "own.tsv").write_text("# my recordings\nok.wav\thello world\nrate_8k.wav\tgood morning\n")
    (f / "own_missing.tsv").write_text("nope.wav\thello\n")
    (f / "own_no_tab.tsv").write_text("ok.wav\thello\nrate_8k.wav good morning\n")
    (f / "own_long.tsv").write_text("ok.wav\thello\nten_minutes.wav\ta long one\n")
    (f / "latin1.tsv").write_bytes(b"ok.wav\tcaf\xe9\n")
    (f / "out_dir").mkdir()
    (f / "typo.gin").write_text((f / "infer.gin").read_text() + "train.learning_rate = %LEARNING_RATEE\n")
    ok = (f / "ok.wav").read_bytes()
    (f / "cut_short.wav").write_bytes(ok[: len(ok) // 2])  # the header still claims every sample
    t5 = {"model_type": "t5", "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 32}
    for name in ("hf_garbage", "hf_truncated", "hf_one_tensor"):
        (f / name).mkdir()
        (f / name / "config.json").write_text(json.dumps(t5))
    (f / "hf_garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    header = json.dumps({"shared.weight": {"dtype": "F32", "shape": [32, 8], "data_offsets": [0, 1024]}}).encode()
    (f / "hf_truncated" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    from safetensors.numpy import save_file

    save_file({"shared.weight": np.zeros((32, 8), np.float32)}, str(f / "hf_one_tensor" / "model.safetensors"))
    # A real corpus for slm-eval (tones, not speech: quick), made by the real command.
    made = _run_cases(f, [("make-corpus", "slm-make-corpus", ["--out={F}/corpus", "--size=12", "--synthesizer=tones",
                                                               "--workers=1", "--quiet"], None)], "corpus")
    assert made["make-corpus"]["rc"] == 0, made
    return f


@pytest.fixture(scope="module")
def results(fixture):
    before = rs.snapshot(fixture)
    results = _run_cases(fixture, CASES, "results")
    after = rs.snapshot(fixture)
    results["_changed"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return results


# Needs a change in slm_jax/cli/infer.py (not this suite's file): refuse an --instruction that
# is not valid UTF-8 before encoding it. Strict: the mark fails the suite once that is fixed.
_NEEDS_FIX: set[str] = set()


@pytest.mark.slow
@pytest.mark.parametrize("case_id,prog,argv,expected", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason="cli/infer.py must check --instruction is UTF-8"))
    if c[0] in _NEEDS_FIX else c for c in CASES], ids=[c[0] for c in CASES])
def test_entry_point(results, case_id, prog, argv, expected):
    result = results[case_id]
    if result.get("missing"):
        pytest.skip(f"{prog} does not exist yet")
    assert result["traceback"] is None, result["traceback"]
    kind, text = expected
    if kind == "ok":
        assert result["rc"] == 0, result["stderr"][-2000:]
        assert text in result["stdout"]
        return
    errors = rs.error_lines(result["stderr"])
    assert result["rc"] == 2, result
    assert len(errors) == 1, result["stderr"][-2000:]
    assert errors[0].startswith(f"{prog}: error: ") and text in errors[0], errors[0]
    assert "Traceback" not in result["stderr"]
    assert "In call to configurable" not in errors[0] and " at 0x" not in errors[0], errors[0]


@pytest.mark.slow
def test_a_wav_cut_short_is_read_with_a_warning(results):
    result = results["infer-header-longer-than-file"]
    assert result["rc"] == 0, result["stderr"][-2000:]
    warnings = [line for line in result["stderr"].splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "cut_short.wav: its header claims 8000 samples" in warnings[0], warnings


@pytest.mark.slow
def test_no_temporary_report_is_left_behind(results, fixture):
    leftovers = glob.glob(str(fixture / "*.tmp")) + glob.glob(str(fixture / ".*probe")) + glob.glob(str(fixture / ".*.tmp"))
    assert not leftovers
    assert not os.path.exists("/sys/slm_report.json.tmp")


@pytest.mark.slow
def test_plan_without_compile_never_says_fits(results):
    out = results["plan-no-compile-does-not-say-fits"]["stdout"]
    assert "  fits" not in out.replace("state fit;", "")


@pytest.mark.slow
def test_no_case_changed_an_existing_file(results):
    assert results["_changed"] == []


@pytest.mark.slow
def test_eval_audio_tsv_scores_every_listed_recording(results, fixture):
    assert results["eval-audio-tsv"]["rc"] == 0, results["eval-audio-tsv"]["stderr"][-2000:]
    report = json.loads((fixture.parent / "own_report.json").read_text())
    predictions = report["predictions"]["asr_audio_tsv"]
    assert [(p["id"], p["reference"]) for p in predictions] == [("ok.wav", "hello world"),
                                                                ("rate_8k.wav", "good morning")]
    assert report["tasks"]["asr_audio_tsv"]["examples"] == 2 and report["tasks"]["asr_audio_tsv"]["wer"] >= 0
    assert report["audio_tsv"].endswith("own.tsv")


@pytest.mark.slow
def test_eval_cache_front_end_keeps_the_front_ends_rows_and_reads_them_back(fixture, tmp_path):
    """slm-eval --cache_front_end: the first run computes the front end and keeps its rows, the
    second reads every example back and computes none; both answer as the run without the cache.
    Where the cache cannot be written, the run still writes its report."""
    shutil.copytree(fixture / "corpus", tmp_path / "corpus")
    shutil.copytree(fixture / "corpus", tmp_path / "blocked_corpus")
    (tmp_path / "blocked_corpus" / "encoder_cache").write_text("a file where the cache directory would go")
    infer = [a.replace("{F}", str(fixture)) for a in INFER]
    runs = [(f"eval-{name}", "slm-eval", infer + [f"--corpus_dir={tmp_path}/{corpus}", f"--out={tmp_path}/{name}.json",
                                                  "--batch_size=2"] + flags, None)
            for name, corpus, flags in (("live", "corpus", []), ("first", "corpus", ["--cache_front_end"]),
                                        ("second", "corpus", ["--cache_front_end"]),
                                        ("blocked", "blocked_corpus", ["--cache_front_end"]))]
    results = _run_cases(tmp_path, runs, "cache_runs")
    for case_id, *_ in runs:
        assert results[case_id]["rc"] == 0, results[case_id]["stderr"][-2000:]
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text())
               for name in ("live", "first", "second", "blocked")}
    examples = sum(len(p) for p in reports["live"]["predictions"].values())
    assert examples > 2
    assert f"0 examples read, {examples} computed" in results["eval-first"]["stdout"]
    assert f"{examples} examples read, 0 computed" in results["eval-second"]["stdout"]
    [cache] = glob.glob(str(tmp_path / "corpus" / "encoder_cache" / "*-eval"))
    assert len(json.loads(open(os.path.join(cache, "index.json")).read())["entries"]) == examples
    assert reports["second"]["predictions"] == reports["first"]["predictions"] == reports["live"]["predictions"]
    # A cache that cannot be written costs a warning, not the report.
    assert "were not kept" in results["eval-blocked"]["stderr"]
    assert reports["blocked"]["predictions"] == reports["live"]["predictions"]
