"""Shared command-line plumbing: gin flags (T5X style), logging, and one-line user errors."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

from slm_jax.errors import UserError  # re-exported: the CLIs raise common.UserError

REPO_GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"

GIN_HELP = (
    "gin: --gin_file=FILE (repeatable; a path, or a name in the repo's gin/ folder, whose run configs "
    "are in gin/runs/, e.g. --gin_file=whisper_base_smollm2.gin) and --gin.NAME=VALUE overrides, e.g. "
    "--gin.TRAIN_STEPS=50 or --gin.train.batch_size=16."
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
    parser.add_argument("--verbose", action="store_true",
                        help="debug logging, and the native start-up lines of TensorFlow/XLA")
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


# gin/ in tiers: runs/ (what a user launches), cascade/ (the cascade baseline's runs), models/,
# data/ and hardware/ (fragments the run files include). File names are unique across the tiers,
# so a bare name finds its file.
GIN_TIERS = ("runs", "cascade", "models", "data", "hardware")


def resolve_gin_file(name: str) -> str:
    """A --gin_file as given (a path), relative to gin/ (with or without a leading 'gin/'), or a
    file name found in one of gin/'s tiers; one line naming it when none exists."""
    relative = name[len("gin/"):] if name.startswith("gin/") else name
    candidates = [pathlib.Path(name), REPO_GIN_DIR / relative]
    candidates += [REPO_GIN_DIR / tier / os.path.basename(name) for tier in GIN_TIERS]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"gin file not found: {name} (run configs are in {REPO_GIN_DIR / 'runs'})")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    import gin

    with quiet_native_stderr():  # the first import of JAX (and of TensorFlow, where a module needs it)
        from slm_jax import gin_registry  # noqa: F401  (registers every configurable)

    # Includes name files by their bare names (unique across the tiers): an include with a folder in
    # it would be tried as a Python package by gin's resource reader, which fails on a namespace
    # package such as a runs/ or data/ folder in the current directory.
    gin.add_config_file_search_path(str(REPO_GIN_DIR))
    for tier in GIN_TIERS:
        gin.add_config_file_search_path(str(REPO_GIN_DIR / tier))
    gin.add_config_file_search_path(os.getcwd())
    files = [resolve_gin_file(f) for f in gin_files]
    for attempt in range(2):
        try:
            gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
            break
        except (ValueError, KeyError, SyntaxError, IOError, SystemError, ImportError) as e:
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
    check_gin_macros()


def _macro_uses(value: Any, found: list[str]) -> None:
    """The names of the macros (``%NAME``) referenced anywhere inside one bound value."""
    from gin import config as gin_config

    if isinstance(value, gin_config.ConfigurableReference):
        if value.selector == "gin.macro":
            found.append("/".join(value.scopes))
    elif isinstance(value, dict):
        for item in list(value.keys()) + list(value.values()):
            _macro_uses(item, found)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _macro_uses(item, found)


def check_gin_macros() -> None:
    """Refuses a macro that is used (``train.learning_rate = %LEARNING_RATEE``) but never defined:
    gin itself only notices when the configurable is called, with a TypeError from inside it."""
    from gin import config as gin_config

    config = getattr(gin_config, "_CONFIG", None)
    if not isinstance(config, dict):  # another gin version: its own error, later
        return
    defined = {scope for (scope, selector), params in config.items()
               if selector == "gin.macro" and "value" in params}
    for (scope, selector), params in config.items():
        for param, value in params.items():
            used: list[str] = []
            _macro_uses(value, used)
            for name in used:
                if name in defined:
                    continue
                where = f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{param}"
                if selector == "gin.macro":
                    where = f"macro {scope}"
                close = difflib.get_close_matches(name, sorted(defined), n=1)
                hint = f"; did you mean %{close[0]}?" if close else ""
                raise UserError(f"bad gin configuration: macro %{name} (used by {where}) is never defined{hint}")


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
                            "gin/cascade/whisper_base_transcriber_smollm2.gin): add b to the logit of the next token of "
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
    set_verbose(verbose)
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
    if not verbose:  # Orbax's notes on every read-only restore (what slm-infer and slm-eval always do)
        logging.getLogger("absl").addFilter(lambda r: not str(r.msg).startswith(_ORBAX_READ_ONLY_NOTES))


_ORBAX_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

# Native (C++) start-up lines of TensorFlow, XLA and the CUDA plugin on a machine without a GPU:
# logged through absl before its InitializeLog, which no environment variable silences.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*"
    r"|E\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*(failed call to cuInit|Unable to register cu\w+ factory).*"
    r"|.*TF-TRT Warning: Could not find TensorRT.*)$")
_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """``--verbose``: keep every native start-up line (``quiet_native_stderr`` passes them all)."""
    global _VERBOSE
    _VERBOSE = bool(verbose)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drops the native start-up chatter (oneDNN, 'Could not find cuda drivers', 'failed call to
    cuInit' on a CPU machine) written straight to file descriptor 2 while the block runs (imports
    of TensorFlow and JAX, JAX's backend start); every other line is written to stderr afterwards.
    Nothing is changed about which platform JAX uses. Off with --verbose."""
    if _VERBOSE:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not _NATIVE_NOISE.match(line.rstrip("\n"))]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))


def start_backend_quietly(tensorflow: bool = False) -> None:
    """Starts JAX's backend (and imports TensorFlow when ``tensorflow``) inside
    ``quiet_native_stderr``: their start-up lines are printed then, or never."""
    with quiet_native_stderr():
        if tensorflow:
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                pass
        import jax

        jax.devices()


def data_needs_tensorflow() -> bool:
    """Whether the parsed config's data source reads through TensorFlow (SeqIO)."""
    import gin

    try:
        reference = gin.query_parameter("train.data")
    except ValueError:
        return False
    wrapped = getattr(getattr(reference, "configurable", None), "wrapped", None)
    return "seqio" in getattr(wrapped, "__module__", "")


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
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return 2
        macro = _undefined_macro(e)
        if macro:
            print(f"{prog}: error: bad gin configuration: macro %{macro} is used but never defined", file=sys.stderr)
            return 2
        raise


# What gin appends to an exception raised inside a configurable: "In call to configurable 'train'
# (<function train at 0x7f...>)" and the lists of bound values, one line each.
_GIN_SUFFIX = re.compile(r"^\s*(In call to configurable |No values supplied by Gin|Gin had values bound for|"
                         r"Caller supplied values for)")


def one_line(error: BaseException) -> str:
    """An error's message as one line, without what gin appends to it."""
    lines = [line for line in str(error).splitlines() if not _GIN_SUFFIX.match(line)]
    return " ".join(" ".join(lines).split()) or type(error).__name__


def _undefined_macro(error: BaseException) -> str | None:
    """gin's error for a macro used but never defined (found when its configurable is called)."""
    text = str(error)
    if isinstance(error, TypeError) and "In call to configurable 'macro'" in text:
        found = re.search(r"in scope '([^']+)'", text)
        return found.group(1) if found else "?"
    return None


def check_utf8(flag: str, value: str | None) -> None:
    """Undecodable command-line bytes reach Python as lone surrogates."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} is not valid UTF-8 text") from None


def check_output_path(flag: str, path: str) -> None:
    """Refuses, without writing anything, an output path that is a directory, lies in a folder
    that does not exist or in one this process may not write."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise UserError(f"cannot write {flag} {path}: it is a directory")
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {flag} {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {flag} {path}: directory {folder} is not writable")


def check_output_file(flag: str, path: str) -> None:
    """``check_output_path``, then a real write next to ``path`` (a read-only file system, a full
    disk): call it once the cheap checks of a command passed, before its long work. Leaves no
    file behind."""
    check_output_path(flag, path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".probe") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file next to ``path`` and renames it over ``path``; the
    temporary file is removed when anything fails (a full disk)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# Audio length, from the file's header: before any sample is read
# --------------------------------------------------------------------------------------------
def max_audio_seconds(model: Any, data: Any) -> tuple[float | None, str]:
    """The longest audio this model takes, in seconds, and where that limit comes from: the speech
    encoder's positions (Whisper: 30 s), the data source's ``max_audio_seconds``, else the frames
    it was trained on (``feature_lengths['audio_frames']``, 10 ms each)."""
    from slm_jax.data import audio

    frames_per_second = audio.SAMPLE_RATE / audio.HOP_LENGTH
    limits = []
    encoder = getattr(model, "speech_encoder", None)
    for cfg in (encoder, getattr(encoder, "encoder", None)):
        max_frames = getattr(cfg, "max_frames", None) if cfg is not None else None
        if isinstance(max_frames, int) and max_frames > 0:
            limits.append((max_frames / frames_per_second, f"the speech encoder takes at most {max_frames} frames"))
            break
    data_max = getattr(data, "max_audio_seconds", None)
    if isinstance(data_max, (int, float)) and data_max > 0:
        limits.append((float(data_max), "the data source's max_audio_seconds"))
    if not limits:
        frames = (getattr(data, "feature_lengths", None) or {}).get("audio_frames")
        if frames:
            limits.append((frames / frames_per_second, f"the model was trained on at most {frames} audio frames"))
    if not limits:
        return None, ""
    return min(limits)


def check_audio_file(path: str, max_seconds: float | None, why: str = "", prog: str = "") -> None:
    """Reads only the header of ``path``: refuses audio longer than ``max_seconds`` before its
    samples are read, and warns (one line) about a WAV whose header promises more samples than
    the file holds. Unreadable files are left to ``audio.load_audio`` (which names the problem)."""
    import soundfile

    from slm_jax.data.audio import AudioError

    if not os.path.isfile(path):
        return
    try:
        info = soundfile.info(path)
    except Exception:  # noqa: BLE001 - load_audio reports it
        return
    claimed = _wav_claimed_frames(path)
    frames = info.frames
    if claimed is not None and claimed > frames:
        print(f"{prog or 'warning'}: warning: {path}: its header claims {claimed} samples "
              f"({claimed / info.samplerate:.2f} s) but the file holds {frames} "
              f"({frames / info.samplerate:.2f} s); it is cut short, using what it holds", file=sys.stderr)
    if max_seconds is not None and info.samplerate > 0:
        seconds = max(frames, claimed or 0) / info.samplerate
        if seconds > max_seconds:
            because = f" ({why})" if why else ""
            raise AudioError(f"{path}: audio is {seconds:.2f} s long, longer than the maximum of "
                             f"{max_seconds:g} s{because}; split it into shorter files")


def _wav_claimed_frames(path: str) -> int | None:
    """Frames a RIFF/WAVE file's 'data' chunk header claims (None: not a WAV, or unreadable)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) >= 14:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                    if size % 2:
                        f.read(1)
                elif name == b"data":
                    if not block_align or size == 0xFFFFFFFF:  # RF64 keeps the size elsewhere
                        return None
                    return size // block_align
                else:
                    f.seek(size + (size % 2), os.SEEK_CUR)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# A checkpoint's frozen models, checked before any weight is loaded
# --------------------------------------------------------------------------------------------
def check_checkpoint_matches_model(checkpoint: str, model: Any) -> None:
    """Refuses, before loading anything, a checkpoint written for frozen models of another shape
    (e.g. --gin.T5Config.num_layers=3 for an adapter trained with 2 layers of the same
    'random:1' LLM). Checkpoints from before the record existed pass."""
    from slm_jax.training import checkpointing

    directory, step = checkpointing.find_checkpoint_dir(checkpoint)
    saved = checkpointing.read_metadata(directory, step)
    checkpointing.check_frozen_configs(saved, checkpointing.frozen_configs(model), directory)
