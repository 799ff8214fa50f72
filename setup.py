"""slm-jax: frozen speech encoder + trainable adapter + frozen LLM, in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setup(
    name="slm-jax",
    version="0.1.0",
    description="SLM (arXiv 2310.00230) in JAX/Flax: frozen speech encoder + adapter + frozen LLM",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    # The SeqIO task registry lives in the top-level tasks/ folder (design-card layout) and is
    # installed as the sub-package slm_jax.tasks.
    packages=find_packages(include=["slm_jax", "slm_jax.*"]) + ["slm_jax.tasks"],
    package_dir={"slm_jax.tasks": "tasks"},
    include_package_data=True,
    install_requires=requirements("requirements.txt"),
    entry_points={
        "console_scripts": [
            "slm-train=slm_jax.cli.train:main",
            "slm-infer=slm_jax.cli.infer:main",
            "slm-eval=slm_jax.cli.evaluate:main",
            "slm-make-corpus=slm_jax.cli.make_corpus:main",
            "slm-import-speech=slm_jax.cli.import_speech:main",
            "slm-mixture=slm_jax.cli.mixture:main",
            "slm-convert=slm_jax.cli.convert:main",
            "slm-plan=slm_jax.cli.plan:main",
            "slm-demo=slm_jax.cli.demo:main",
            "slm-tune-whisper=slm_jax.contrib.whisper_cascade.tune_cli:main",
        ]
    },
)
