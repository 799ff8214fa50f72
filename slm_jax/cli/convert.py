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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        args = _parse(argv)
        if not os.path.isdir(args.hf_dir):
            raise common.UserError(f"--hf_dir {args.hf_dir} is not a directory")
        common.setup_logging()
        import jax
        import ml_dtypes
        import numpy as np

        from slm_jax.weights.convert import converted, hf_families
        from slm_jax.weights.convert.hf_checkpoint import HFCheckpoint

        checkpoint = HFCheckpoint(args.hf_dir)
        family = hf_families.family_of_hf_config(checkpoint.config())
        module = hf_families.converter(family)
        cfg = module.config_from_hf(checkpoint.config())
        dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
        params = module.convert_tensors(checkpoint.names(), checkpoint.get, cfg, dtype)
        converted.save(args.out, family, cfg, params, source=os.path.abspath(args.hf_dir))
        count = sum(x.size for x in jax.tree.leaves(params))
        slot = "speech_encoder_source" if family == "whisper" else "llm_source"
        out = os.path.abspath(args.out)
        print(f"converted {family} ({type(cfg).__name__}, {count:,} parameters, {args.dtype}) to {out}")
        print(f"use it with: include '{os.path.join(out, converted.GIN)}' and "
              f"--gin.ModelSpec.{slot}=\"'converted:{out}'\"")
        return 0

    return common.run_main("slm-convert", run)


if __name__ == "__main__":
    sys.exit(main())
