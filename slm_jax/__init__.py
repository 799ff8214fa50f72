"""slm-jax: a frozen speech encoder and a frozen text LLM joined by a small trainable adapter.

A JAX/Flax (linen) rebuild of "SLM: Bridge the thin gap between speech and text foundation
models" (arXiv 2310.00230).
"""

__version__ = "0.1.0"
