"""Readers for pretrained checkpoints (CTranslate2, GGUF, Hugging Face) into numpy state dicts.

``ctranslate2``: CTranslate2 ``model.bin`` -> HF Whisper layout. ``gguf``: GGUF -> HF Llama layout.
Submodules are imported on demand (``from slm_jax.weights.convert import gguf``) so that importing this
package stays cheap.
"""
