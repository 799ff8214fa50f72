"""slm-convert: a local Hugging Face checkpoint directory -> the project's parameter tree."""

from __future__ import annotations

import argparse
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Convert a local Hugging Face checkpoint (config.json + model.safetensors, or a sharded
model.safetensors.index.json) into slm-jax parameters: an Orbax tree that training restores
straight into its sharding on every host, our config as JSON, and gin bindings for it.

Families (config.json model_type): whisper (the encoder is kept), t5 / mt5 (T5 v1.0/v1.1,
Flan-T5, mT5, mT0), llama / qwen2 / mistral / gemma (Llama 2/3, SmolLM, Qwen2, Gemma).
Tensors are read one at a time; a missing tensor, a wrong shape or an unknown architecture is
an error naming the tensor. The converted tree is held once on the host while it is written
(about 26 GB for a 13B model with --dtype=bfloat16).

Use the result with --gin.ModelSpec.llm_source="'converted:OUT'" (or speech_encoder_source for
Whisper) and include OUT/model.gin for the matching config. A HF directory can also be used
directly as 'hf:DIR'; converting once saves every worker of a pod from re-reading it.

examples:
  slm-convert --hf_dir=ckpt/mt0-xxl-mt --out=converted/mt0-xxl-mt --dtype=bfloat16
  slm-convert --hf_dir=ckpt/whisper-large-v3 --out=converted/whisper-large-v3
"""

DTYPES = ("float32", "bfloat16")


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slm-convert", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="a local Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, help="new directory for the converted checkpoint")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the stored parameters")
    parser.add_argument("--verbose", action="store_true", help="the native start-up lines of TensorFlow/XLA")
    return parser.parse_args(argv)


def _check_out(out: str, probe: bool = True) -> None:
    """--out must be a new directory, or an empty one, in a writable place: never a file, a
    training run's model directory or any other folder with something in it. ``probe``: also
    write (and remove) a file where the first write will go (a read-only location)."""
    import tempfile

    from slm_jax.training import paths

    paths.check_bucket(out, "--out")
    target = paths.absolute(out)
    if paths.exists(target) and not paths.isdir(target):
        raise common.UserError(f"--out {out} is a file; give a new directory")
    if paths.isdir(target):
        entries = paths.listdir(target)
        if paths.exists(paths.join(target, "config.gin")) or paths.isdir(paths.join(target, "checkpoints")) \
                or any(e.isdigit() for e in entries):
            raise common.UserError(f"--out {out} is a training run's model directory; give a new directory")
        if "slm_convert.json" in entries:
            raise common.UserError(f"--out {out} already holds a converted checkpoint; choose another --out")
        if entries:
            raise common.UserError(f"--out {out} already exists and is not empty; give a new directory")
    if not probe:
        return
    if paths.is_remote(target):  # a bucket has no folders to create: write where the files will go
        try:
            paths.probe_write(target)
        except OSError as e:
            raise common.UserError(f"cannot write --out {out}: {e.strerror or e}") from None
        return
    parent = target
    while not os.path.isdir(parent):  # the nearest folder that exists: where the first write goes
        parent = os.path.dirname(parent)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".slm-convert-probe-"):
            pass
    except OSError as e:
        raise common.UserError(f"cannot write --out {out}: {parent} is not writable ({e.strerror or e})") from None


def _check_safetensors(hf_dir: str) -> None:
    """Reads the header of every safetensors file the checkpoint names: a file that is not
    safetensors, or shorter than its header says (a cut-off download), is refused by name."""
    import json
    import struct

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = [os.path.join(hf_dir, "model.safetensors")]
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(hf_dir, name) for name in json.load(f)["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise common.UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    for path in files:
        if not os.path.exists(path):
            continue  # HFCheckpoint names what is missing
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{size} bytes, shorter than a safetensors header")
                length = struct.unpack("<Q", head)[0]
                if length > size - 8:
                    raise ValueError(f"its header claims {length} bytes, more than the file's {size}")
                header = json.loads(f.read(length).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise common.UserError(f"{path} is not a safetensors file ({e})") from None
        if 8 + length + end > size:
            raise common.UserError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has "
                                   f"{size} (an interrupted download?)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        args = _parse(argv)
        if not os.path.isdir(args.hf_dir):
            raise common.UserError(f"--hf_dir {args.hf_dir} is not a directory")
        _check_out(args.out, probe=False)
        _check_safetensors(args.hf_dir)
        common.setup_logging(args.verbose)
        common.start_backend_quietly()
        import jax
        import ml_dtypes
        import numpy as np

        from slm_jax.weights.convert import converted, hf_families
        from slm_jax.weights.convert.hf_checkpoint import HFCheckpoint

        try:
            checkpoint = HFCheckpoint(args.hf_dir)
            family = hf_families.family_of_hf_config(checkpoint.config())
            module = hf_families.converter(family)
            cfg = module.config_from_hf(checkpoint.config())
            _check_out(args.out)  # a real write, once the checkpoint looks convertible: before the long part
            dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
            params = module.convert_tensors(checkpoint.names(), checkpoint.get, cfg, dtype)
        except UnicodeDecodeError as e:
            raise common.UserError(f"{args.hf_dir}: a file is not UTF-8 text ({e})") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: a damaged file
            if type(e).__name__ != "SafetensorError":
                raise
            raise common.UserError(f"{args.hf_dir}: damaged safetensors file ({e})") from None
        converted.save(args.out, family, cfg, params, source=os.path.abspath(args.hf_dir))
        count = sum(x.size for x in jax.tree.leaves(params))
        slot = "speech_encoder_source" if family == "whisper" else "llm_source"
        from slm_jax.training import paths

        out = paths.absolute(args.out)
        print(f"converted {family} ({type(cfg).__name__}, {count:,} parameters, {args.dtype}) to {out}")
        print(f"use it with: include '{paths.join(out, converted.GIN)}' and "
              f"--gin.ModelSpec.{slot}=\"'converted:{out}'\"")
        return 0

    return common.run_main("slm-convert", run)


if __name__ == "__main__":
    sys.exit(main())
