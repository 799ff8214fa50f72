"""Shared command-line plumbing: gin flags (T5X style), logging, and one-line user errors."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

from slm_jax.errors import UserError  # re-exported: the CLIs raise common.UserError

REPO_GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"

GIN_HELP = (
    "gin: --gin_file=FILE (repeatable; searched in the current directory and in the repo's gin/ "
    "folder) and --gin.NAME=VALUE overrides, e.g. --gin.TRAIN_STEPS=50 or "
    "--gin.train.batch_size=16."
)


def gin_argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser every gin-configured command starts from: --gin_file/--gin_bindings, and the
    --gin.NAME=VALUE help as epilog (those overrides are split off by ``split_gin_overrides``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=GIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="a gin config file (repeatable)")
    parser.add_argument(
        "--gin_bindings", action="append", default=[], help="a gin binding 'NAME=VALUE' (same as --gin.NAME=VALUE)"
    )
    return parser


def split_gin_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pulls '--gin.NAME=VALUE' out of argv (argparse cannot declare them)."""
    rest, bindings = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--gin."):
            body = a[len("--gin."):]
            if "=" not in body:
                if i + 1 >= len(args):
                    raise UserError(f"{a} needs a value: --gin.NAME=VALUE")
                body = f"{body}={args[i + 1]}"
                i += 1
            name, _, value = body.partition("=")
            bindings.append(f"{name}={value}")
        else:
            rest.append(a)
        i += 1
    return rest, bindings


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    import gin

    from slm_jax import gin_registry  # noqa: F401  (registers every configurable)

    gin.add_config_file_search_path(str(REPO_GIN_DIR))
    gin.add_config_file_search_path(os.getcwd())
    for f in gin_files:
        if not (os.path.exists(f) or (REPO_GIN_DIR / f).exists() or (REPO_GIN_DIR / os.path.basename(f)).exists()):
            raise UserError(f"gin file not found: {f}")
    files = [f if os.path.exists(f) else str(REPO_GIN_DIR / os.path.basename(f)) for f in gin_files]
    for attempt in range(2):
        try:
            gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
            return
        except (ValueError, KeyError, SyntaxError, IOError, SystemError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # CPython 3.11.0-3.11.7 share one AST recursion counter between threads (gh-106905,
            # fixed in 3.11.8): gin's literal parsing can fail spuriously while another thread
            # (a tf.data pipeline, garbage collection) builds an AST. That is no user error:
            # parse once more from a clean slate.
            if attempt == 0 and "AST constructor recursion depth mismatch" in first:
                gin.clear_config()
                continue
            if isinstance(e, SystemError):
                raise
            raise UserError(f"bad gin configuration: {first}") from None


def comma_separated(example: str) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated list, e.g. ``example``."""

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one, e.g. {example}")
        return names

    return parse


def gin_macro(name: str, default: Any) -> Any:
    """The value of gin macro ``%name`` in the parsed config, or ``default`` when it has none."""
    import gin

    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return default


def add_decoding_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The LLM decoding options slm-infer and slm-eval share (checked by ``check_decoding_arguments``)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--num_beams", type=int, default=1, help="beam width; 1 = greedy (default)")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                       help="longest answer in tokens (default %(default)s)")
    group.add_argument("--no_repeat_ngram_size", type=int, default=0,
                       help="n > 0: an answer never repeats an n-gram of its tokens (a guard against "
                            "repetition loops; 0: off, the default)")
    group.add_argument("--stop_on_repeated_ngram", type=int, default=0,
                       help="n > 0 (greedy only): an answer ends where its last n tokens repeat an earlier "
                            "n-gram, and that copy is dropped (a transcript caught in a loop keeps its words "
                            "once; 0: off, the default)")
    group.add_argument("--transcript_bias", type=float, default=0.0,
                       help="b > 0 (greedy only; a front end that writes its own transcript, e.g. "
                            "gin/whisper_base_transcriber_smollm2.gin): add b to the logit of the next token of "
                            "Whisper's transcript while the answer keeps to it, and to end-of-turn once it is "
                            "used up: a copy prior against dropped and reworded words (0: off, the default)")


def check_decoding_arguments(args: argparse.Namespace) -> None:
    if args.num_beams < 1:
        raise UserError(f"--num_beams must be >= 1, got {args.num_beams}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.no_repeat_ngram_size < 0:
        raise UserError(f"--no_repeat_ngram_size must be >= 0, got {args.no_repeat_ngram_size}")
    if args.stop_on_repeated_ngram < 0:
        raise UserError(f"--stop_on_repeated_ngram must be >= 0, got {args.stop_on_repeated_ngram}")
    if args.stop_on_repeated_ngram and args.num_beams > 1:
        raise UserError("--stop_on_repeated_ngram is a greedy-decoding rule; use it with --num_beams=1")
    if not args.transcript_bias >= 0:  # also refuses nan
        raise UserError(f"--transcript_bias must be >= 0, got {args.transcript_bias}")
    if args.transcript_bias and args.num_beams > 1:
        raise UserError("--transcript_bias is a greedy-decoding rule; use it with --num_beams=1")


def check_transcript_bias(args: argparse.Namespace, model: Any) -> None:
    """--transcript_bias needs a front end that writes a transcript (checked before loading weights)."""
    from slm_jax.inference import model as inference

    if args.transcript_bias and not inference.writes_transcript(model):
        raise UserError(f"--transcript_bias: {inference.NO_TRANSCRIPT}")


def configured_step_shape(batch_size: int | None, audio_frames: int | None, prompt_tokens: int,
                          target_tokens: int | None) -> tuple[Any, int, dict[str, int]]:
    """(model spec, global batch, feature lengths) of the parsed config's train step, with the
    command line's choices over the config's BATCH_SIZE / AUDIO_FRAMES / TARGET_TOKENS."""
    import gin

    model = gin.query_parameter("train.model").scoped_configurable_fn()
    lengths = {
        "audio_frames": audio_frames or gin_macro("AUDIO_FRAMES", 3000),
        "prefix": prompt_tokens // 2,
        "suffix": prompt_tokens - prompt_tokens // 2,
        "targets": target_tokens or gin_macro("TARGET_TOKENS", 128),
    }
    return model, batch_size or gin_macro("BATCH_SIZE", 8), lengths


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # gin logs every include-path probe on the root logger ("Path not found: base.gin") even
    # when a later search path has the file; keep those out of the console.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: not str(r.msg).startswith(("Path not found", "system_path_file_exists")))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the input or configuration is wrong', not 'the program is broken'."""
    from slm_jax.training.checkpointing import CheckpointError
    from slm_jax.weights.frozen import FrozenSourceError

    types: list[type[BaseException]] = [UserError, CheckpointError, FrozenSourceError, FileNotFoundError]
    for module, name in (
        ("slm_jax.data.audio", "AudioError"),
        ("slm_jax.training.loop", "TrainingStopped"),
        ("slm_jax.weights.convert.errors", "ConversionError"),
        ("slm_jax.weights.assets", "AssetError"),
        ("slm_jax.data.errors", "DataError"),
        ("slm_jax.contrib.whisper_cascade.lora", "LoraError"),
    ):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def run_main(prog: str, main: Callable[[], int | None]) -> int:
    """Runs ``main``; user errors become 'prog: error: message' on stderr and exit status 2."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - filtered just below
        if isinstance(e, user_error_types()):
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        raise
