"""Converted checkpoints: the output of ``slm-convert`` and the ``converted:DIR`` frozen source.

A converted directory holds
  params/            the parameter tree as an Orbax checkpoint (restored straight into any sharding,
                     each host reading only the shards it holds)
  slm_convert.json   the model family, our config (every field) and where the weights came from
  model.gin          gin bindings of that config, to ``include`` in a training config

Converting once on one big host and restoring on every worker of a pod avoids each worker
re-reading and re-transposing the Hugging Face files. The directory may be in a bucket
(``gs://...``): its paths go through ``slm_jax.training.paths``, the arrays through TensorStore.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from slm_jax.training import paths

from slm_jax.weights.convert import hf_families
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.weights.convert.hf_checkpoint import check_config_matches

METADATA = "slm_convert.json"
PARAMS = "params"
GIN = "model.gin"


def _architecture(family: str, cfg: Any) -> dict[str, Any]:
    """The config's architecture fields; run-time ones (dtypes, remat, ...) stay the user's choice."""
    runtime = set(hf_families.converter(family).RUNTIME_FIELDS)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in runtime}


def _gin_bindings(family: str, cfg: Any) -> str:
    name = type(cfg).__name__
    lines = [f"# {name} of a checkpoint converted by slm-convert; include it and set the source to converted:DIR"]
    lines += [f"{name}.{key} = {value!r}" for key, value in _architecture(family, cfg).items()]
    return "\n".join(lines) + "\n"


def save(out_dir: str, family: str, cfg: Any, params: Any, source: str) -> None:
    """Writes ``params`` (numpy or jax arrays) with the config they belong to."""
    import orbax.checkpoint as ocp

    out_dir = paths.absolute(out_dir)
    if paths.exists(paths.join(out_dir, PARAMS)):
        raise ConversionError(f"{out_dir} already holds a converted checkpoint; choose another --out")
    paths.makedirs(out_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths.join(out_dir, PARAMS), params)
    with paths.open(paths.join(out_dir, METADATA), "w") as f:
        json.dump({"family": family, "config_class": type(cfg).__name__, "config": _architecture(family, cfg),
                   "source": source}, f, indent=1)
    with paths.open(paths.join(out_dir, GIN), "w") as f:
        f.write(_gin_bindings(family, cfg))


def read_metadata(directory: str) -> dict:
    paths.check_bucket(directory, "converted checkpoint")
    path = paths.join(directory, METADATA)
    if not paths.exists(path):
        raise ConversionError(f"{directory} is not a converted checkpoint: it has no {METADATA} (run slm-convert)")
    with paths.open(path) as f:
        return json.load(f)


def saved_config(directory: str) -> Any:
    """Our config object as slm-convert recorded it."""
    meta = read_metadata(directory)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return hf_families.config_class(meta["family"])(**fields)


def restore(directory: str, config: Any, abstract_params: Any) -> Any:
    """The saved params restored into ``abstract_params`` (jax.ShapeDtypeStruct leaves carrying
    shardings and dtypes). ``config`` must describe the saved architecture (run-time fields aside)."""
    import orbax.checkpoint as ocp

    directory = paths.absolute(directory)
    family = hf_families.family_of_config(config)
    saved_family = read_metadata(directory)["family"]
    if saved_family != family:
        raise ConversionError(f"{directory} holds a converted {saved_family} model but the configured one is {family}")
    module = hf_families.converter(family)
    check_config_matches(config, saved_config(directory), module.RUNTIME_FIELDS, directory)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(paths.join(directory, PARAMS), abstract_params)
