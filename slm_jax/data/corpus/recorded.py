"""Real recordings -> a corpus in the synthetic corpus's format (``slm-import-speech``).

The synthetic corpus (``builder.py``) teaches the adapter synthetic voices only. This module turns
a collection of real human recordings (a local folder, or one commit of a git snapshot) into the
same thing ``slm-make-corpus`` writes: TFRecord shards per task and split, serialised by
``builder.serialize_example`` and written by the builder's shard writer, 16 kHz mono 16-bit PCM,
and a ``manifest.json`` that ``builder.load_manifest``, ``check_shard``, ``read_examples``, the
SeqIO ``CorpusSource`` and ``CachedCorpusData`` read unchanged. On top of the synthetic
manifest's fields it records where every example came from (``sources``: repository, commit,
path, licence, content hash, speaker, whether its transcript was given or a pseudo-label and the
label's confidence) and every file it left out and why (``excluded``).

  1. list: the collection's audio files (``Collection``: ``LocalFolder`` or ``GitSnapshot``);
  2. label: a ``SourceSpec`` says how a file's speaker and transcript are found: named groups of
     a path pattern (``speaker``, and ``label`` mapped through a label map or ``text`` as it is,
     e.g. FSDD's ``7_jackson_32.wav`` -> speaker jackson, "Seven."), a TSV/CSV table of path ->
     transcript, or none: Whisper-base's own transcript as a pseudo-label, kept only when it
     passes ``PseudoLabelFilter`` (mean token log-probability, finished, no repeated n-gram, a
     sane compression ratio: the filters distil-whisper and Whisper's own fallback use);
  3. check: every file is decoded and resampled to 16 kHz mono; a file whose audio is one of the
     held-out evaluation recordings (release/real_speech: same bytes, same samples, same samples
     after resampling, or the same loudness envelope at the same length) is left out, as are
     duplicates inside the collection, files that do not decode, and clips outside the length
     limits;
  4. split by speaker: whole speakers go to validation and test (``split_speakers``), so the
     held-out splits measure voices the adapter never heard;
  5. write into a temporary sibling of ``--out`` and rename it into place when complete (an
     existing ``--out`` is refused).

``mix_corpora`` then writes one corpus directory that holds a synthetic corpus with recorded
training examples added to one task (``asr_en``) at a given share; the data sources read it as
any corpus (they read one corpus directory each).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import time
import zlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from slm_jax.data import audio as audio_lib
from slm_jax.data.corpus import builder
from slm_jax.data.errors import DataError

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
# The recordings the real-speech evaluation uses (release/real_speech/SOURCES.md): never training data.
DEFAULT_HELDOUT_DIR = str(REPO_ROOT / "release" / "real_speech")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
RECORDED_SYNTHESIZER = "recorded"  # manifest config.synthesizer of an imported corpus
DIGIT_WORDS = {str(d): w for d, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
TEXT_STYLES = ("sentence", "as_is")
SILENCE_PEAK = 1e-3  # a clip that never gets louder than this (-60 dBFS) holds no speech


# --------------------------------------------------------------------------------------------
# Collections: where the files are
# --------------------------------------------------------------------------------------------
class Collection:
    """The files of a collection, by path relative to its root ('/'-separated)."""

    kind = "collection"
    repo: str | None = None
    commit: str | None = None
    root: str = ""

    def paths(self) -> list[str]:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        raise NotImplementedError

    def has(self, path: str) -> bool:
        return path in set(self.paths())

    def describe(self) -> dict:
        return {"kind": self.kind, "repo": self.repo, "commit": self.commit, "root": self.root}

    def close(self) -> None:
        pass


class LocalFolder(Collection):
    """A folder on this machine; ``repo``/``commit`` say where it was taken from (or None)."""

    kind = "folder"

    def __init__(self, root: str, repo: str | None = None, commit: str | None = None):
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such folder")
        self.root = os.path.abspath(root)
        self.repo, self.commit = repo, commit
        self._paths: list[str] | None = None

    def paths(self) -> list[str]:
        if self._paths is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if d != ".git")
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    if os.path.isfile(full) and not os.path.islink(full):
                        found.append(os.path.relpath(full, self.root).replace(os.sep, "/"))
            self._paths = sorted(found)
        return self._paths

    def has(self, path: str) -> bool:
        return os.path.isfile(os.path.join(self.root, path))

    def read(self, path: str) -> bytes:
        with open(os.path.join(self.root, path), "rb") as f:
            return f.read()


class GitSnapshot(Collection):
    """One commit of a bare git directory (e.g. a fetched snapshot), read without a work tree."""

    kind = "git"

    def __init__(self, git_dir: str, commit: str = "HEAD", repo: str | None = None):
        if not os.path.isdir(git_dir):
            raise DataError(f"{git_dir}: no such git directory")
        self.root = os.path.abspath(git_dir)
        self.commit = self._git("rev-parse", "--verify", f"{commit}^{{commit}}").decode().strip()
        self.repo = repo or repo_from_snapshot_path(self.root)
        self._blobs: dict[str, str] | None = None
        self._reader: subprocess.Popen | None = None

    def _git(self, *args: str) -> bytes:
        result = subprocess.run(["git", f"--git-dir={self.root}", *args], capture_output=True)
        if result.returncode != 0:
            raise DataError(f"git {' '.join(args)} in {self.root} failed: "
                            f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def _tree(self) -> dict[str, str]:
        if self._blobs is None:
            blobs = {}
            for entry in self._git("ls-tree", "-r", "-z", "--full-tree", self.commit).split(b"\0"):
                if not entry:
                    continue
                meta, _, path = entry.partition(b"\t")
                mode, kind, sha = meta.decode().split()
                if kind == "blob" and mode != "120000":  # files, not symbolic links
                    blobs[path.decode("utf-8", errors="surrogateescape")] = sha
            self._blobs = blobs
        return self._blobs

    def paths(self) -> list[str]:
        return sorted(self._tree())

    def has(self, path: str) -> bool:
        return path in self._tree()

    def read(self, path: str) -> bytes:
        sha = self._tree().get(path)
        if sha is None:
            raise DataError(f"{path}: not in {self.repo or self.root} at {self.commit}")
        if self._reader is None:  # one `git cat-file --batch` for every read
            self._reader = subprocess.Popen(["git", f"--git-dir={self.root}", "cat-file", "--batch"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._reader.stdin.write(f"{sha}\n".encode())
        self._reader.stdin.flush()
        header = self._reader.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob":
            raise DataError(f"{path}: git cat-file could not read blob {sha} ({b' '.join(header).decode()})")
        data = self._reader.stdout.read(int(header[2]))
        self._reader.stdout.read(1)  # the newline after the content
        return data

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stdin.close()
            self._reader.wait()
            self._reader = None


def repo_from_snapshot_path(git_dir: str) -> str | None:
    """'owner/name' from a snapshot directory named like '.../owner+name/repo' (None otherwise)."""
    for part in reversed(pathlib.Path(git_dir).parts):
        if "+" in part:
            owner, _, name = part.partition("+")
            if owner and name:
                return f"{owner}/{name}"
    return None


# --------------------------------------------------------------------------------------------
# How speakers and transcripts are found
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """How a collection's files become labelled examples.

    ``patterns``: regular expressions searched in each file's path (relative to the collection
    root); the first that matches names the file's ``speaker`` and, optionally, its ``label``
    (looked up in ``label_map``, or used as the transcript when there is no map) or ``text`` (the
    transcript as it is). A file no pattern matches is skipped (counted in the manifest).
    ``transcripts``: a TSV/CSV table (path, transcript[, speaker]) in the collection or on this
    machine; its transcript wins over a pattern's. ``pseudo_labels``: files without a transcript
    are transcribed by Whisper-base and kept when the transcript passes the filter.
    ``under``: only files below this folder. ``licence``/``licence_file``: recorded for every file.
    """

    name: str
    patterns: tuple[str, ...] = ()
    label_map: Mapping[str, str] | None = None
    under: str = ""
    transcripts: str | None = None
    pseudo_labels: bool = False
    licence: str | None = None
    licence_file: str | None = None
    licence_file_optional: bool = False  # a preset's: recorded when the collection holds it
    description: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise DataError(f"collection name {self.name!r}: letters, digits, '_', '.', '-' only")
        for pattern in self.patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise DataError(f"path pattern {pattern!r} is not a regular expression ({e})") from None
            if "speaker" not in compiled.groupindex:
                raise DataError(f"path pattern {pattern!r} needs a named group (?P<speaker>...)")
        if not (self.patterns or self.transcripts):
            raise DataError(f"{self.name}: give path patterns (speaker, label) or a transcripts table")


PRESETS: dict[str, SourceSpec] = {
    # Jakobovski/free-spoken-digit-dataset: recordings/{digit}_{speaker}_{take}.wav, 8 kHz mono;
    # its README (section "License") puts the recordings under CC BY-SA 4.0.
    "fsdd": SourceSpec(
        name="fsdd", under="recordings", label_map=DIGIT_WORDS,
        patterns=(r"(?:^|/)(?P<label>[0-9])_(?P<speaker>[A-Za-z]+)_(?P<take>[0-9]+)\.wav$",),
        licence="CC-BY-SA-4.0", licence_file="README.md", licence_file_optional=True,
        description="Free Spoken Digit Dataset: English digits zero..nine read by several speakers"),
    # Speech Commands (Warden 2018) as laid out by its releases: WORD/SPEAKER_nohash_N.wav, and the
    # v0.02 test set's _unknown_/WORD_SPEAKER_nohash_N.wav(.wav); _silence_/ (no speech) matches
    # nothing. CC BY 4.0 (the LICENSE file next to the folders).
    "speech_commands": SourceSpec(
        name="speech_commands",
        patterns=(r"(?:^|/)(?P<label>[a-z]+)/(?P<speaker>[0-9a-f]{8})_nohash_[0-9]+\.wav$",
                  r"(?:^|/)_unknown_/(?P<label>[a-z]+)_(?P<speaker>[0-9a-f]{8})_nohash_[0-9]+\.wav(?:\.wav)?$"),
        licence="CC-BY-4.0", licence_file="LICENSE", licence_file_optional=True,
        description="Speech Commands: one English command word per clip, many crowd-sourced speakers"),
}


def parse_label_map(value: str | None) -> dict[str, str] | None:
    """'digits' (0..9 -> zero..nine), 'K=V,K=V', or None/'none' (the label is the transcript)."""
    if value is None or value == "none":
        return None
    if value == "digits":
        return dict(DIGIT_WORDS)
    out = {}
    for item in value.split(","):
        key, sep, word = item.partition("=")
        if not sep or not key.strip() or not word.strip():
            raise DataError(f"label map {value!r}: expected 'digits', 'none' or KEY=WORD,KEY=WORD")
        out[key.strip()] = word.strip()
    return out


def sentence_text(text: str) -> str:
    """The synthetic corpus's style: 'seven' -> 'Seven.', 'HE BEGAN A' -> 'He began a.'"""
    text = " ".join(text.split())
    if not text:
        return text
    if text.isupper():
        text = text.lower()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


@dataclasses.dataclass(frozen=True)
class Candidate:
    path: str  # relative to the collection root
    speaker: str
    text: str | None  # None: needs a pseudo-label
    label: str  # 'given' | 'pseudo'


def _read_table(data: bytes, name: str) -> list[dict[str, str]]:
    """Rows (path, transcript[, speaker]) of a TSV/CSV table; '#' lines are comments."""
    text = data.decode("utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"{name}: an empty transcripts table")
    delimiter = "\t" if name.endswith(".tsv") or "\t" in lines[0] else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]]
    path_keys, text_keys = ("path", "file", "filename", "audio", "wav"), ("transcript", "text", "sentence",
                                                                          "transcription")
    if any(k in header for k in path_keys) and any(k in header for k in text_keys):
        p = next(header.index(k) for k in path_keys if k in header)
        t = next(header.index(k) for k in text_keys if k in header)
        s = header.index("speaker") if "speaker" in header else None
        body = rows[1:]
    else:
        p, t, s = 0, 1, (2 if len(rows[0]) > 2 else None)
        body = rows
    out = []
    for i, row in enumerate(body):
        if len(row) <= max(p, t):
            raise DataError(f"{name}: row {i + 1} has {len(row)} columns; expected path and transcript")
        out.append({"path": row[p].strip(), "text": row[t].strip(),
                    "speaker": row[s].strip() if s is not None and len(row) > s else ""})
    return out


def _norm(path: str) -> str:
    """'a/./b/' -> 'a/b'; '' and '.' -> '' (the collection root)."""
    normal = os.path.normpath(path).replace(os.sep, "/") if path else "."
    return "" if normal == "." else normal.lstrip("/")


def find_candidates(collection: Collection, spec: SourceSpec,
                    text_style: str = "sentence") -> tuple[list[Candidate], dict[tuple[str, str], list[str]]]:
    """The collection's audio files with speaker and transcript (None: to be pseudo-labelled),
    and the files skipped before any audio is read, by (kind, reason)."""
    under = _norm(spec.under)
    audio = [p for p in collection.paths() if p.lower().endswith(AUDIO_EXTENSIONS)
             and (not under or p.startswith(under + "/"))]
    if not audio:
        raise DataError(f"{collection.repo or collection.root}: no audio files ({', '.join(AUDIO_EXTENSIONS)})"
                        + (f" under {under}/" if under else ""))
    table: dict[str, dict[str, str]] = {}
    if spec.transcripts:
        if collection.has(_norm(spec.transcripts)):
            name = _norm(spec.transcripts)
            data, base = collection.read(name), os.path.dirname(name)
        elif os.path.isfile(spec.transcripts):
            with open(spec.transcripts, "rb") as f:
                data = f.read()
            # A table on this machine names files relative to the collection root (or, for a
            # local folder, by a path that leads into it).
            name, base = spec.transcripts, ""
        else:
            raise DataError(f"transcripts table {spec.transcripts}: neither in the collection nor a file here")
        for row in _read_table(data, name):
            path = row["path"]
            if isinstance(collection, LocalFolder) and os.path.isabs(path):
                path = os.path.relpath(path, collection.root)
            table[_norm(os.path.join(base, path))] = row
    compiled = [re.compile(p) for p in spec.patterns]
    style = sentence_text if text_style == "sentence" else (lambda t: " ".join(t.split()))
    out: list[Candidate] = []
    skipped: dict[tuple[str, str], list[str]] = {}  # (kind, reason) -> paths
    unmapped: set[str] = set()
    for path in audio:
        match = next((m for m in (c.search(path) for c in compiled) if m), None)
        groups = match.groupdict() if match else {}
        row = table.get(path)
        speaker = (row or {}).get("speaker") or groups.get("speaker") or ""
        text = None
        if row is not None and row["text"]:
            text = row["text"]
        elif groups.get("text"):
            text = groups["text"].replace("_", " ")
        elif groups.get("label") is not None:
            label = groups["label"]
            if spec.label_map is None:
                text = label
            elif label in spec.label_map:
                text = spec.label_map[label]
            else:
                unmapped.add(label)
                continue
        if not speaker:
            skipped.setdefault(("no_speaker", "no speaker (no pattern matched the path and no speaker column)"),
                               []).append(path)
            continue
        if text is None and not spec.pseudo_labels:
            skipped.setdefault(("no_transcript", "no transcript (pass --pseudo_labels to transcribe it with Whisper)"),
                               []).append(path)
            continue
        out.append(Candidate(path, speaker, style(text) if text is not None else None,
                             "given" if text is not None else "pseudo"))
    if unmapped:
        raise DataError(f"labels {sorted(unmapped)} are not in the label map {dict(spec.label_map or {})}")
    unknown = sorted(set(table) - set(audio))
    if table and len(unknown) == len(table):
        raise DataError(f"no path of the transcripts table {spec.transcripts} names an audio file of the collection "
                        f"(e.g. {unknown[0]}; paths are relative to the table's folder in the collection, else to "
                        "the collection's root)")
    if unknown:
        log.warning("%d rows of %s name no audio file of the collection, e.g. %s", len(unknown), spec.transcripts,
                    unknown[0])
    if not out:
        reasons = "; ".join(f"{len(v)} files: {reason}" for (_, reason), v in skipped.items())
        raise DataError(f"no file of {collection.repo or collection.root} has a speaker and a transcript ({reasons})")
    return out, skipped


# --------------------------------------------------------------------------------------------
# Audio: decoding, fingerprints, the held-out recordings
# --------------------------------------------------------------------------------------------
def decode(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples at the file's own rate (stereo averaged)."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise audio_lib.AudioError(f"{name}: not a readable audio file ({type(e).__name__}: {e})") from None
    samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if samples.size == 0:
        raise audio_lib.AudioError(f"{name}: zero-length audio (no samples)")
    return samples.astype(np.float32), int(rate)


def samples_sha256(samples: np.ndarray, rate: int) -> str:
    """A hash of what is heard (the rate and 16-bit samples), whatever the file's container."""
    return hashlib.sha256(str(int(rate)).encode() + b":" + audio_lib.to_pcm16(samples)).hexdigest()


ENVELOPE_FRAME = 320  # 20 ms at 16 kHz
MIN_ENVELOPE_FRAMES = 25  # 0.5 s: shorter clips are matched by their hashes only


def envelope(samples16k: np.ndarray) -> np.ndarray:
    """Log energy per 20 ms frame: unchanged by gain, nearly unchanged by resampling or re-encoding."""
    n = samples16k.size // ENVELOPE_FRAME
    frames = np.asarray(samples16k[: n * ENVELOPE_FRAME], np.float64).reshape(n, ENVELOPE_FRAME)
    return np.log10(np.mean(frames ** 2, axis=1) + 1e-8)


def same_envelope(a: np.ndarray, b: np.ndarray, min_correlation: float = 0.98) -> bool:
    """The same recording (gain, resampling and codec aside): the same length within 2% and
    log-energy envelopes that correlate at ``min_correlation`` or more."""
    if min(a.size, b.size) < MIN_ENVELOPE_FRAMES or abs(a.size - b.size) > max(2, 0.02 * max(a.size, b.size)):
        return False
    n = min(a.size, b.size)
    x, y = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return bool(denominator > 0 and np.sum(x * y) / denominator >= min_correlation)


@dataclasses.dataclass
class HeldOut:
    """The held-out evaluation recordings: a file matches one when it has the same bytes, the same
    samples at its own rate, the same 16 kHz samples, or the same envelope at the same length."""

    dirs: list[str]
    hashes: dict[str, str]  # sha256 -> 'dir/file'
    envelopes: list[tuple[str, np.ndarray]]

    @classmethod
    def load(cls, dirs: Sequence[str]) -> "HeldOut":
        hashes: dict[str, str] = {}
        envelopes = []
        for directory in dirs:
            if not os.path.isdir(directory):
                raise DataError(f"held-out recordings {directory}: no such folder (the evaluation recordings must "
                                "be checked against; give their folder with --heldout_dir)")
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if not (os.path.isfile(path) and name.lower().endswith(AUDIO_EXTENSIONS)):
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                label = os.path.join(os.path.basename(os.path.normpath(directory)), name)
                samples, rate = decode(data, path)
                at16k = audio_lib.check_audio(samples, rate, builder.SAMPLE_RATE, name=path)
                for digest in (hashlib.sha256(data).hexdigest(), samples_sha256(samples, rate),
                               samples_sha256(at16k, builder.SAMPLE_RATE)):
                    hashes[digest] = label
                envelopes.append((label, envelope(at16k)))
        return cls([os.path.abspath(d) for d in dirs], hashes, envelopes)

    def match(self, digests: Iterable[str], env: np.ndarray) -> str | None:
        for digest in digests:
            if digest in self.hashes:
                return f"{self.hashes[digest]} (same content, sha256 {digest[:12]})"
        for label, other in self.envelopes:
            if same_envelope(env, other):
                return f"{label} (same recording: loudness envelope)"
        return None

    def holds(self, path: str) -> bool:
        """Whether ``path`` (a file on this machine) lies inside a held-out folder."""
        real = os.path.realpath(path)
        return any(real.startswith(os.path.realpath(d) + os.sep) for d in self.dirs)


# --------------------------------------------------------------------------------------------
# Speaker-disjoint splits
# --------------------------------------------------------------------------------------------
def split_speakers(counts: Mapping[str, int], seed: int = 0, validation_share: float = 0.1,
                   test_share: float = 0.1, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """speaker -> split, whole speakers per split (no speaker in two splits).

    ``fixed`` assigns speakers by hand; a split with a fixed speaker holds only the fixed ones.
    The others are taken in an order drawn from ``seed`` (a hash of seed and name: the same for
    the same speakers on every machine) into test until it holds ``test_share`` of the files,
    then into validation until ``validation_share``, at least one speaker each when the share is
    above 0; the rest train. Refuses when no speaker would be left for train.
    """
    for name, share in (("validation_share", validation_share), ("test_share", test_share)):
        if not 0.0 <= share < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {share}")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(counts))
    if unknown:
        raise DataError(f"speakers {unknown} were given a split but have no files; speakers: {sorted(counts)}")
    bad = sorted({s for s in fixed.values() if s not in builder.SPLITS})
    if bad:
        raise DataError(f"unknown splits {bad}; a corpus has {list(builder.SPLITS)}")
    total = sum(counts.values())
    order = sorted((s for s in counts if s not in fixed),
                   key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    out = dict(fixed)
    for split, share in (("test", test_share), ("validation", validation_share)):
        if split in fixed.values() or share == 0:
            continue
        held = 0
        while order and (held == 0 or held < share * total):
            speaker = order.pop(0)
            out[speaker] = split
            held += counts[speaker]
    for speaker in order:
        out[speaker] = "train"
    if "train" not in out.values():
        raise DataError(f"{len(counts)} speakers: none left for train after validation and test took theirs "
                        "(speaker-disjoint splits need at least 3 speakers, or lower the shares)")
    return out


# --------------------------------------------------------------------------------------------
# Pseudo-labels
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PseudoLabel:
    text: str
    mean_log_prob: float  # over the written tokens and end-of-text (Transcript.confidence)
    tokens: int
    finished: bool  # ended with end-of-text (not cut by the token limit or the repeat stop)


def compression_ratio(text: str) -> float:
    """Whisper's measure of repetition: bytes / zlib-compressed bytes (above 2.4: a loop)."""
    data = text.encode("utf-8")
    return len(data) / max(len(zlib.compress(data)), 1)


def repeated_ngram(text: str, n: int) -> str | None:
    """The first word n-gram that occurs twice in ``text`` (None: none does)."""
    words = re.findall(r"[\w']+", text.lower())
    seen = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            return " ".join(gram)
        seen.add(gram)
    return None


@dataclasses.dataclass(frozen=True)
class PseudoLabelFilter:
    """Which of Whisper's own transcripts are kept as training targets.

    distil-whisper keeps a pseudo-label when it is close to a given transcript; with none given,
    the signals are Whisper's own: its confidence (mean token log-probability: its transcribe()
    falls back below -1.0; Whisper-base writes real read English at a median -0.20 on
    release/real_speech), whether it finished, and repetition (a repeated word n-gram, or a
    compression ratio above Whisper's 2.4). A 4-gram: 3 would drop "ask not what your country can
    do for you, ask what you can do for your country" at the second "can do for".
    """

    min_mean_log_prob: float = -0.5
    max_compression_ratio: float = 2.4
    repeat_ngram: int = 4  # 0: no repeat check
    min_words: int = 1

    def rejection(self, label: PseudoLabel) -> str | None:
        """Why ``label`` is not kept (None: it is)."""
        words = re.findall(r"[\w']+", label.text)
        if len(words) < self.min_words:
            return f"pseudo-label has {len(words)} words"
        if not label.finished:
            return "pseudo-label did not finish (token limit or a repetition loop)"
        if not label.mean_log_prob >= self.min_mean_log_prob:
            return f"pseudo-label confidence {label.mean_log_prob:.3f} below {self.min_mean_log_prob}"
        if self.repeat_ngram:
            gram = repeated_ngram(label.text, self.repeat_ngram)
            if gram is not None:
                return f"pseudo-label repeats {gram!r}"
        ratio = compression_ratio(label.text)
        if ratio > self.max_compression_ratio:
            return f"pseudo-label compression ratio {ratio:.2f} above {self.max_compression_ratio}"
        return None


class WhisperLabeller:
    """Whisper-base's own greedy transcript of a clip (the project's ``WhisperTranscriber``: its
    encoder and decoder, forced to English, with the transcriber's 1 s of appended silence and
    repeated-4-gram stop), and its confidence. Loads the packaged weights on first use."""

    name = "whisper-base (slm_jax.contrib.whisper_cascade.front_end.WhisperTranscriber.transcribe, greedy, en)"

    def __init__(self, max_new_tokens: int = 128):
        self.max_new_tokens = max_new_tokens
        self._run = None

    def _load(self):
        import jax
        import tokenizers

        from slm_jax.contrib.whisper_cascade import convert
        from slm_jax.contrib.whisper_cascade.front_end import ENGLISH, WhisperTranscriber
        from slm_jax.weights import assets
        from slm_jax.weights.convert import ctranslate2

        files = assets.whisper_base_files()
        state, config = ctranslate2.load_whisper_hf(files.model_bin, files.config_json)
        cfg = dataclasses.replace(convert.config_from_hf(config), language_ids=(ENGLISH,),
                                  max_new_tokens=self.max_new_tokens)
        params = convert.params_from_state_dict(state, cfg)
        # The weights are an argument, not a closed-over constant that XLA would fold into the program.
        run = jax.jit(lambda p, f, m: WhisperTranscriber(cfg).apply({"params": p}, f, m,
                                                                    method=WhisperTranscriber.transcribe))
        self._cfg, self._params, self._run = cfg, params, run
        self._tokenizer = tokenizers.Tokenizer.from_file(str(files.tokenizer_json))

    def max_seconds(self) -> float:
        if self._run is None:
            self._load()
        return (self._cfg.encoder.max_frames - self._cfg.trailing_silence_frames) / 100.0

    def __call__(self, samples16k: np.ndarray) -> PseudoLabel:
        from slm_jax.data import batching

        if self._run is None:
            self._load()
        cfg = self._cfg
        features = audio_lib.log_mel_spectrogram(samples16k)
        # Lengths in 2-second buckets (room left for the appended silence): few shapes compile.
        length = batching.bucket_length(features.shape[0], 200, cfg.encoder.max_frames - cfg.trailing_silence_frames)
        out = self._run(self._params, *batching.pad_frames([features], length))
        kept = int(np.asarray(out.mask[0]).sum())
        tokens = np.asarray(out.tokens[0, :kept])
        finished = kept > 0 and int(tokens[-1]) == cfg.end_of_text
        text = self._tokenizer.decode([int(t) for t in tokens if int(t) < cfg.end_of_text]).strip()
        return PseudoLabel(text, float(np.asarray(out.confidence())[0]), int(kept), bool(finished))


# --------------------------------------------------------------------------------------------
# Importing
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImportOptions:
    task: str = "asr_en"
    lang: str = "en"
    seed: int = 0
    validation_share: float = 0.1
    test_share: float = 0.1
    fixed_speakers: Mapping[str, str] | None = None
    examples_per_shard: int = 500
    min_seconds: float = 0.1
    max_seconds: float = 30.0
    text_style: str = "sentence"
    vocab_size: int = 0
    heldout_dirs: tuple[str, ...] = (DEFAULT_HELDOUT_DIR,)
    pseudo_filter: PseudoLabelFilter = PseudoLabelFilter()
    max_files: int | None = None
    progress: bool = True


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def example_id(spec: SourceSpec, path: str) -> str:
    """'fsdd-7_jackson_32': the collection's name and the path below ``under``, extension dropped."""
    under = _norm(spec.under)
    rel = path[len(under) + 1:] if under and path.startswith(under + "/") else path
    while rel.lower().endswith(AUDIO_EXTENSIONS):
        rel = rel.rsplit(".", 1)[0]
    return f"{spec.name}-{_safe(rel)}"


def check_new_directory(path: str, flag: str = "--out") -> None:
    """Refuses an existing path: an import or a mix never writes into an existing directory."""
    if os.path.lexists(path):
        raise DataError(f"{flag}={path} already exists; give a new directory (it is written in a temporary "
                        "sibling and renamed into place when complete)")


def _temporary_sibling(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}")


def _shard_writer(out_dir: str, task: str, split: str, total: int, per_shard: int):
    """The synthetic corpus's own shard writer (builder._ShardedWriter: each shard written under a
    temporary name and renamed when full; an empty split still gets one empty shard)."""
    return builder._ShardedWriter(out_dir, task, split, total, per_shard)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _instruction(example: str, lang: str) -> str:
    from slm_jax.data.corpus import grammar

    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(example.encode()).digest()[:8], "big"))
    return str(rng.choice(builder.ASR_INSTRUCTIONS)).format(language=grammar.LANGUAGE_NAMES[lang])


@dataclasses.dataclass
class _Accepted:
    candidate: Candidate
    id: str
    pcm: bytes
    sha256: str  # of the file's bytes
    native_rate: int
    text: str
    confidence: float | None


def _progress(iterable, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="file", desc=desc, disable=not enabled)


def import_collection(collection: Collection, spec: SourceSpec, out_dir: str, options: ImportOptions = ImportOptions(),
                      labeller: Callable[[np.ndarray], PseudoLabel] | None = None) -> dict:
    """Writes the collection's labelled recordings as a corpus in ``out_dir`` (which must not exist);
    returns its manifest. ``labeller``: the pseudo-labeller (default ``WhisperLabeller``)."""
    from slm_jax.data.corpus import grammar

    check_new_directory(out_dir)
    if options.text_style not in TEXT_STYLES:
        raise DataError(f"text_style must be one of {TEXT_STYLES}, got {options.text_style!r}")
    if options.lang not in grammar.LANGUAGE_NAMES:
        raise DataError(f"unknown language {options.lang!r}; known: {sorted(grammar.LANGUAGE_NAMES)}")
    if options.examples_per_shard < 1:
        raise DataError(f"examples_per_shard must be positive, got {options.examples_per_shard}")
    if not 0 < options.min_seconds <= options.max_seconds:
        raise DataError(f"need 0 < min_seconds <= max_seconds, got {options.min_seconds}, {options.max_seconds}")
    if not spec.licence:
        raise DataError(f"{spec.name}: no licence given; every imported file records its licence (--licence)")
    start = time.time()
    licence_file = None
    if spec.licence_file:
        under = _norm(spec.under)
        tried = [_norm(os.path.join(under, spec.licence_file))] if under else []
        found = next((p for p in tried + [_norm(spec.licence_file)] if collection.has(p)), None)
        if found is None and not spec.licence_file_optional:
            raise DataError(f"licence file {spec.licence_file} is not in {collection.repo or collection.root}")
        if found is None:
            log.warning("%s: no %s in the collection; the licence %s is recorded without it", spec.name,
                        spec.licence_file, spec.licence)
        else:
            licence_file = {"path": found, "sha256": hashlib.sha256(collection.read(found)).hexdigest()}

    candidates, skipped = find_candidates(collection, spec, options.text_style)
    if options.max_files is not None and len(candidates) > options.max_files:  # spread over the sorted paths
        step = -(-len(candidates) // max(options.max_files, 1))
        candidates = candidates[::step][:options.max_files]
    heldout = HeldOut.load(options.heldout_dirs)
    if spec.pseudo_labels and any(c.text is None for c in candidates) and labeller is None:
        labeller = WhisperLabeller()

    excluded: list[dict] = [{"path": p, "kind": kind, "reason": reason}
                            for (kind, reason), paths in skipped.items() for p in paths]
    accepted: list[_Accepted] = []
    seen: dict[str, str] = {}  # content hash -> path
    ids: set[str] = set()
    rejected_pseudo = 0
    for c in _progress(candidates, len(candidates), options.progress, f"reading {spec.name}"):
        def exclude(kind: str, reason: str, digest: str | None = None):
            excluded.append({"path": c.path, "kind": kind, "sha256": digest, "reason": reason})

        if isinstance(collection, LocalFolder) and heldout.holds(os.path.join(collection.root, c.path)):
            exclude("heldout", "inside a held-out evaluation folder")
            continue
        data = collection.read(c.path)
        digest = hashlib.sha256(data).hexdigest()
        if data.startswith(b"version https://git-lfs.github.com/spec/"):
            exclude("lfs_pointer", "a git-lfs pointer: the audio is not in the snapshot", digest)
            continue
        try:
            samples, rate = decode(data, c.path)
            at16k = audio_lib.check_audio(samples, rate, builder.SAMPLE_RATE, name=c.path)
        except audio_lib.AudioError as e:
            exclude("unreadable", f"unreadable audio ({e})", digest)
            continue
        seconds = samples.size / rate
        native, resampled = samples_sha256(samples, rate), samples_sha256(at16k, builder.SAMPLE_RATE)
        same = heldout.match((digest, native, resampled), envelope(at16k))
        if same is not None:
            exclude("heldout", f"held-out evaluation recording: {same}", digest)
            continue
        if native in seen:
            exclude("duplicate", f"the same audio as {seen[native]}", digest)
            continue
        seen[native] = c.path
        if not options.min_seconds <= seconds <= options.max_seconds:
            exclude("length", f"{seconds:.2f} s, outside {options.min_seconds}..{options.max_seconds} s", digest)
            continue
        if float(np.max(np.abs(samples))) < SILENCE_PEAK:
            exclude("silent", f"silent (peak below {SILENCE_PEAK})", digest)
            continue
        text, confidence = c.text, None
        if text is None:
            if seconds > labeller_max_seconds(labeller):
                exclude("length", f"{seconds:.2f} s: too long for Whisper's window (no pseudo-label)", digest)
                continue
            label = labeller(at16k)
            confidence = round(float(label.mean_log_prob), 4)
            why = options.pseudo_filter.rejection(label)
            if why is not None:
                rejected_pseudo += 1
                excluded.append({"path": c.path, "kind": "pseudo_label_rejected", "sha256": digest, "reason": why,
                                 "pseudo_label": label.text,
                                 "confidence": confidence})
                continue
            text = sentence_text(label.text) if options.text_style == "sentence" else label.text.strip()
        eid = example_id(spec, c.path)
        if eid in ids:
            raise DataError(f"two files give the example id {eid}; rename one or import them separately")
        ids.add(eid)
        accepted.append(_Accepted(c, eid, audio_lib.to_pcm16(at16k), digest, rate, text, confidence))
    collection.close()
    if not accepted:
        kinds: dict[str, dict] = {}
        for item in excluded:
            kinds.setdefault(item["kind"], item)
        raise DataError(f"no file of {collection.repo or collection.root} was kept; left out: " + "; ".join(
            f"{sum(e['kind'] == k for e in excluded)} {k} (e.g. {e['path']}: {e['reason']})" for k, e in kinds.items()))

    counts: dict[str, int] = {}
    for a in accepted:
        counts[a.candidate.speaker] = counts.get(a.candidate.speaker, 0) + 1
    speaker_split = split_speakers(counts, options.seed, options.validation_share, options.test_share,
                                   options.fixed_speakers)
    by_split: dict[str, list[_Accepted]] = {s: [] for s in builder.SPLITS}
    for a in sorted(accepted, key=lambda a: a.id):
        by_split[speaker_split[a.candidate.speaker]].append(a)

    tmp = _temporary_sibling(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = _write_corpus(tmp, spec, collection, options, by_split, speaker_split, licence_file, excluded,
                                 len(candidates), rejected_pseudo, labeller, start)
        check_new_directory(out_dir)  # nothing appeared there meanwhile
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def labeller_max_seconds(labeller) -> float:
    limit = getattr(labeller, "max_seconds", None)
    return float(limit()) if callable(limit) else float("inf")


def _write_corpus(tmp: str, spec: SourceSpec, collection: Collection, options: ImportOptions,
                  by_split: dict[str, list[_Accepted]], speaker_split: dict[str, str], licence_file: dict | None,
                  excluded: list[dict], considered: int, rejected_pseudo: int, labeller, start: float) -> dict:
    from slm_jax.data.corpus import grammar

    task = options.task
    writers = {}
    sources = []
    for split in builder.SPLITS:
        items = by_split[split]
        writer = _shard_writer(tmp, task, split, len(items), options.examples_per_shard)
        for a in items:
            example = builder.ExampleSpec(
                id=a.id, task=task, split=split, lang=options.lang, text=a.text,
                instruction=_instruction(a.id, options.lang), target=a.text,
                voice=f"{RECORDED_SYNTHESIZER}:{spec.name}/{a.candidate.speaker}", speed=0, pitch=0, noise="none",
                noise_seed=0)
            writer.write(builder.serialize_example(example, a.pcm), len(a.pcm) // 2)
            sources.append({"id": a.id, "split": split, "speaker": a.candidate.speaker, "repo": collection.repo,
                            "commit": collection.commit, "path": a.candidate.path, "licence": spec.licence,
                            "sha256": a.sha256, "sample_rate": a.native_rate,
                            "seconds": round(len(a.pcm) / 2 / builder.SAMPLE_RATE, 3), "label": a.candidate.label,
                            "confidence": a.confidence})
        writer.finish()
        writers[split] = writer

    lines = [a.text for a in by_split["train"]]
    lines += sorted({i.format(language=grammar.LANGUAGE_NAMES[options.lang]) for i in builder.ASR_INSTRUCTIONS})
    with open(os.path.join(tmp, builder.VOCAB_TEXT), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    spm_model = None
    if options.vocab_size:
        from slm_jax.data.corpus import vocab

        vocab.train_sentencepiece(os.path.join(tmp, builder.VOCAB_TEXT), os.path.join(tmp, builder.SPM_PREFIX),
                                  options.vocab_size)
        spm_model = f"{builder.SPM_PREFIX}.model"

    known = builder.ALL_TASKS.get(task)
    description = f"speech recognition, {grammar.LANGUAGE_NAMES[options.lang]}, real recordings ({spec.name})"
    splits = {split: {"examples": w.written, "seconds": round(w.samples / builder.SAMPLE_RATE, 3),
                      "hours": round(w.samples / builder.SAMPLE_RATE / 3600, 6), "shards": w.shards}
              for split, w in writers.items()}
    speakers = {split: sorted(s for s, sp in speaker_split.items() if sp == split) for split in builder.SPLITS}
    pseudo = [s for s in sources if s["label"] == "pseudo"]
    manifest = {
        "format": builder.FORMAT,
        "sample_rate": builder.SAMPLE_RATE,
        "config": {"synthesizer": RECORDED_SYNTHESIZER, "languages": [options.lang], "seed": options.seed,
                   "examples_per_shard": options.examples_per_shard, "task": task,
                   "validation_share": options.validation_share, "test_share": options.test_share,
                   "min_seconds": options.min_seconds, "max_seconds": options.max_seconds,
                   "text_style": options.text_style, "max_files": options.max_files},
        "subset": None,
        "generation_seconds": round(time.time() - start, 2),
        "vocab_text": builder.VOCAB_TEXT,
        "spm_model": spm_model,
        "tasks": {task: {"family": known.family if known else "asr", "speech_lang": options.lang,
                         "target_lang": options.lang, "zero_shot": False, "description": description,
                         "splits": splits}},
        "recorded": {
            "collection": {"name": spec.name, "description": spec.description, **collection.describe(),
                           "under": _norm(spec.under), "licence": spec.licence, "licence_file": licence_file},
            "labels": {"patterns": list(spec.patterns), "label_map": dict(spec.label_map) if spec.label_map else None,
                       "transcripts": spec.transcripts, "pseudo_labels": spec.pseudo_labels},
            "pseudo_labels": {
                "labeller": getattr(labeller, "name", type(labeller).__name__) if labeller is not None else None,
                "filter": dataclasses.asdict(options.pseudo_filter), "kept": len(pseudo),
                "rejected": rejected_pseudo},
            "heldout_checked": [os.path.relpath(d, REPO_ROOT) if d.startswith(str(REPO_ROOT)) else d
                                for d in [os.path.abspath(d) for d in options.heldout_dirs]],
            "files_considered": considered,
            "speakers": speakers,
            "split_by": "speaker",
        },
        "sources": sources,
        "excluded": excluded,
    }
    _write_json(os.path.join(tmp, builder.MANIFEST), manifest)
    return manifest


def sources_by_id(manifest: dict) -> dict[str, dict]:
    """id -> where the example came from (repository, commit, path, licence, label, confidence)."""
    return {s["id"]: s for s in manifest.get("sources", [])}


# --------------------------------------------------------------------------------------------
# Mixing with the synthetic corpus
# --------------------------------------------------------------------------------------------
def recorded_count(synthetic: int, share: float) -> int:
    """Recorded examples to add to ``synthetic`` ones so that they are ``share`` of the sum."""
    if not 0.0 < share < 1.0:
        raise DataError(f"share must be between 0 and 1 (exclusive), got {share}")
    return int(round(share * synthetic / (1.0 - share)))


def _raw_records(paths: Sequence[str]) -> Iterator[bytes]:
    import tensorflow as tf

    for path in paths:
        for record in tf.data.TFRecordDataset(path):
            yield record.numpy()


def _retagged(record: bytes, task: str, new_id: str | None) -> tuple[bytes, int]:
    """The record with its task (and id) set; and its number of samples."""
    import tensorflow as tf

    example = tf.train.Example.FromString(record)
    feature = example.features.feature
    feature["task"].bytes_list.value[:] = [task.encode()]
    if new_id is not None:
        feature["id"].bytes_list.value[:] = [new_id.encode()]
    return example.SerializeToString(), int(feature["num_samples"].int64_list.value[0])


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mix_corpora(synthetic_dir: str, recorded_dirs: Sequence[str], out_dir: str, share: float, task: str = "asr_en",
                seed: int = 0, progress: bool = False) -> dict:
    """One corpus in ``out_dir`` (which must not exist): the synthetic corpus, with recorded
    training examples added to ``task``'s train split so that they are ``share`` of it.

    Every other task and split is the synthetic corpus's own (its shards hard-linked, or copied
    across file systems), so are its vocabulary and config; the held-out speakers of the
    recorded corpora stay in those corpora for evaluation. ``share`` of the task's training
    examples come from the recorded corpora's train splits (pooled), drawn without replacement
    with ``seed`` while they last, then repeated whole as often as needed (a repeat gets the id
    ``ID~rN``, so an encoder cache keys it apart); they are spread evenly among the synthetic
    ones. With proportional mixing (the SeqIO mixture's rates, CachedCorpusData) the task's
    weight then grows by the examples added. The manifest's ``mixed`` says what was mixed and
    ``sources`` lists every recorded example used, with its repository, commit, path and licence.
    """
    check_new_directory(out_dir, "--mixed_out")
    if not recorded_dirs:
        raise DataError("mixing needs at least one recorded corpus")
    synthetic = builder.load_manifest(synthetic_dir)
    if task not in synthetic["tasks"] or "train" not in synthetic["tasks"][task]["splits"]:
        raise DataError(f"the synthetic corpus {synthetic_dir} has no {task} train split to mix into; "
                        f"its tasks: {sorted(synthetic['tasks'])}")
    for t, info in synthetic["tasks"].items():
        for split in info["splits"]:
            builder.check_task_split(synthetic_dir, synthetic, t, split)
    pool: list[tuple[int, int]] = []  # (corpus index, record index) of every recorded training example
    recorded = []
    for i, directory in enumerate(recorded_dirs):
        manifest = builder.load_manifest(directory)
        if manifest.get("config", {}).get("synthesizer") != RECORDED_SYNTHESIZER:
            raise DataError(f"{directory} is not an imported recording corpus (config.synthesizer is "
                            f"{manifest.get('config', {}).get('synthesizer')!r}); make it with slm-import-speech")
        (own_task,) = manifest["tasks"]
        builder.check_task_split(directory, manifest, own_task, "train")
        records = list(_raw_records(builder.shard_paths(directory, manifest, own_task, "train")))
        recorded.append({"dir": directory, "manifest": manifest, "task": own_task, "records": records})
        pool += [(i, j) for j in range(len(records))]
    if not pool:
        raise DataError(f"the recorded corpora {list(recorded_dirs)} have no training examples")
    synthetic_count = synthetic["tasks"][task]["splits"]["train"]["examples"]
    wanted = recorded_count(synthetic_count, share)
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(b"mix_corpora").digest()[:4], "big")])
    copies, rest = divmod(wanted, len(pool))
    chosen = [(k, p) for k in range(copies) for p in pool]
    chosen += [(copies, pool[j]) for j in sorted(rng.choice(len(pool), size=rest, replace=False))]
    order = rng.permutation(len(chosen))
    picked = [chosen[j] for j in order]

    start = time.time()
    tmp = _temporary_sibling(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for t, info in synthetic["tasks"].items():
            for split, entry in info["splits"].items():
                if (t, split) == (task, "train"):
                    continue
                for shard in entry["shards"]:
                    _link_or_copy(os.path.join(synthetic_dir, shard), os.path.join(tmp, shard))
        for name in os.listdir(synthetic_dir):
            if name == builder.VOCAB_TEXT or name.startswith(builder.SPM_PREFIX + "."):
                shutil.copy2(os.path.join(synthetic_dir, name), os.path.join(tmp, name))
        per_shard = synthetic["config"]["examples_per_shard"]
        total = synthetic_count + len(picked)
        writer = _shard_writer(tmp, task, "train", total, per_shard)
        synthetic_records = _raw_records(builder.shard_paths(synthetic_dir, synthetic, task, "train"))
        used: dict[str, dict] = {}
        recorded_seconds = 0.0
        r = 0
        for i in _progress(range(total), total, progress, "mixing"):
            # Bresenham: position i holds a recorded example when the running share steps up.
            if (i + 1) * len(picked) // total > i * len(picked) // total:
                copy, (c, j) = picked[r]
                r += 1
                source = recorded[c]
                original = _id_of(source["records"][j])
                record, samples = _retagged(source["records"][j], task, f"{original}~r{copy}" if copy else None)
                used.setdefault(original, {"corpus": c, "copies": 0})["copies"] += 1
                recorded_seconds += samples / builder.SAMPLE_RATE
                writer.write(record, samples)
            else:
                record = next(synthetic_records)
                writer.write(record, _num_samples(record))
        if next(synthetic_records, None) is not None:
            raise DataError(f"{synthetic_dir}: {task}/train holds more records than its manifest says")
        writer.finish()
        manifest = json.loads(json.dumps(synthetic))
        manifest["tasks"][task]["splits"]["train"] = {
            "examples": writer.written, "seconds": round(writer.samples / builder.SAMPLE_RATE, 3),
            "hours": round(writer.samples / builder.SAMPLE_RATE / 3600, 6), "shards": writer.shards}
        sources = []
        for c, source in enumerate(recorded):
            by_id = sources_by_id(source["manifest"])
            for original, info in sorted(used.items()):
                if info["corpus"] == c:
                    sources.append({**by_id.get(original, {"id": original}), "copies": info["copies"]})
        manifest["mixed"] = {
            "task": task, "share": share, "seed": seed,
            "synthetic": {"dir": os.path.abspath(synthetic_dir),
                          "manifest_sha256": _file_sha256(os.path.join(synthetic_dir, builder.MANIFEST)),
                          "train_examples": synthetic_count},
            "recorded": [{"dir": os.path.abspath(s["dir"]),
                          "manifest_sha256": _file_sha256(os.path.join(s["dir"], builder.MANIFEST)),
                          "collection": s["manifest"].get("recorded", {}).get("collection", {}).get("name"),
                          "train_examples": len(s["records"]),
                          "distinct_used": sum(1 for info in used.values() if info["corpus"] == c)}
                         for c, s in enumerate(recorded)],
            "recorded_train_examples": len(picked),
            "recorded_seconds": round(recorded_seconds, 3),
            "achieved_share": round(len(picked) / max(total, 1), 6),
            "mixing_seconds": round(time.time() - start, 2),
        }
        manifest["sources"] = sources
        _write_json(os.path.join(tmp, builder.MANIFEST), manifest)
        check_new_directory(out_dir, "--mixed_out")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _id_of(record: bytes) -> str:
    import tensorflow as tf

    return tf.train.Example.FromString(record).features.feature["id"].bytes_list.value[0].decode()


def _num_samples(record: bytes) -> int:
    import tensorflow as tf

    return int(tf.train.Example.FromString(record).features.feature["num_samples"].int64_list.value[0])


def summary_lines(manifest: dict, out_dir: str) -> list[str]:
    """Per split: examples, speakers and hours; then what was left out and why (counted)."""
    lines = []
    for task, info in manifest["tasks"].items():
        speakers = manifest.get("recorded", {}).get("speakers", {})
        for split in builder.SPLITS:
            entry = info["splits"].get(split, {"examples": 0, "seconds": 0.0})
            who = speakers.get(split)
            lines.append(f"{task}/{split:<10s} {entry['examples']:>7d} examples {entry['seconds'] / 3600:>8.4f} h"
                         + (f"  {len(who)} speakers" if who is not None else ""))
    kinds: dict[str, list[str]] = {}
    for item in manifest.get("excluded", []):
        kinds.setdefault(item.get("kind", "other"), []).append(item["reason"])
    for kind, reasons in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"left out: {len(reasons):>5d} {kind:<22s} e.g. {reasons[0]}")
    if "mixed" in manifest:
        m = manifest["mixed"]
        lines.append(f"mixed: {m['recorded_train_examples']} recorded + {m['synthetic']['train_examples']} synthetic "
                     f"{m['task']} training examples (share {m['achieved_share']:.3f})")
    lines.append(f"manifest: {os.path.join(out_dir, builder.MANIFEST)}")
    return lines
