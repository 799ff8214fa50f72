"""Runs many command-line cases in one process (imports and JAX start once, not per case).

  python tests/bad_input_runner.py CASES.json RESULTS.json

CASES.json is a list of {"id", "prog", "argv"}; ``prog`` is a console script of setup.py. Each
case calls that script's ``main(argv)`` exactly as the console script does, with a fresh gin
configuration, and records its exit status, stdout, stderr, and the traceback of any exception
that escaped ``main`` (which on a console would be printed as a traceback). A script that does
not exist yet is recorded as missing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import sys
import traceback

ENTRY_POINTS = {
    "slm-train": "slm_jax.cli.train",
    "slm-infer": "slm_jax.cli.infer",
    "slm-eval": "slm_jax.cli.evaluate",
    "slm-make-corpus": "slm_jax.cli.make_corpus",
    "slm-mixture": "slm_jax.cli.mixture",
    "slm-convert": "slm_jax.cli.convert",
    "slm-plan": "slm_jax.cli.plan",
}


def run_case(prog: str, argv: list[str]) -> dict:
    import gin

    try:
        module = importlib.import_module(ENTRY_POINTS[prog])
    except ModuleNotFoundError as e:
        if e.name == ENTRY_POINTS[prog]:
            return {"missing": True}
        raise
    gin.clear_config()
    out, err = io.StringIO(), io.StringIO()
    for handler in logging.getLogger().handlers:  # log lines of this case go to this case's stderr
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(err)
    rc, escaped = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = module.main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - recorded: the test fails on it
            escaped = traceback.format_exc()
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": escaped}


def main() -> None:
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        results[case["id"]] = run_case(case["prog"], case["argv"])
        with open(results_path, "w") as f:  # written after every case: a crash keeps the earlier ones
            json.dump(results, f)


if __name__ == "__main__":
    main()
