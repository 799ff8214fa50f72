"""python -m bench: slm-jax against the PyTorch `transformers` reference, in one run.

Prints a table of ratios (> 1: slm-jax faster) and writes every measurement as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """\
sections:
  bare     train step from encoder outputs: adapter + frozen LLM forward/backward + AdamW
           (equal shapes and work on both sides), host memory, optimizer-state bytes
  e2e      train step including the speech encoder: slm-jax reading cached encoder outputs
           vs the reference running Whisper on every example padded to 30 s
  decode   greedy and beam decoding tokens/s and latency vs transformers `generate`
  padding  train step on length-grouped, bucketed batches vs fixed padding to the corpus
           maximum (same examples, demo-style espeak corpus lengths): padding %, examples/s
  memory   optimizer state vs parameter bytes at the paper's shape (from shapes alone)
  scaling  bare step as audio length (5..60 s) and batch size grow

examples:
  python -m bench --quick                      # all but padding and scaling, small, < 5 min
  nice python -m bench --out bench/results.json
  python -m bench --only decode --repeats 3
  python -m bench --weights toy --quick        # tiny random models: checks the harness only
  python -m bench --from_json bench/results.json --markdown bench/results.md   # re-print a table
"""


def parse_args(argv):
    from bench.suite import SECTIONS

    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections to run (default: all; --quick: all but padding and scaling): {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (under 5 min)")
    parser.add_argument("--weights", choices=("real", "toy"), default="real",
                        help="real: SmolLM2-135M + Whisper-base from the installed weight packages; "
                             "toy: tiny random models (harness check, numbers meaningless)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per side (after one warm-up)")
    parser.add_argument("--out", default="bench/results.json", help="JSON output path (default: %(default)s)")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--from_json", default=None, metavar="JSON",
                        help="measure nothing: print (and --markdown) the table of an earlier run's JSON")
    args = parser.parse_args(argv)
    args.sections = _sections(parser, args)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _sections(parser, args) -> tuple[str, ...]:
    from bench.suite import SECTIONS

    if args.only is None:
        return tuple(s for s in SECTIONS if not (args.quick and s in ("padding", "scaling")))
    chosen = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return chosen


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import dataclasses

    from bench import report, suite

    if args.from_json:
        with open(args.from_json) as f:
            _print_table(report.markdown(json.load(f)), args.markdown)
        return 0
    plan = suite.TOY if args.weights == "toy" else (suite.QUICK if args.quick else suite.FULL)
    if args.repeats is not None:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(results):
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    results = suite.run(args.weights, plan, args.sections, log=lambda m: print(m, file=sys.stderr, flush=True),
                        on_section=save)
    _print_table(report.markdown(results), args.markdown)
    print(f"\nwrote {args.out}", file=sys.stderr)
    if results["errors"]:
        print(f"sections that failed: {', '.join(results['errors'])}", file=sys.stderr)
        return 1
    return 0


def _print_table(table: str, markdown_path: str | None) -> None:
    print(table)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
