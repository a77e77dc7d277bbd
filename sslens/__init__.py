"""sslens: train tiny Llama models on SimpleStories-style data and take them apart.

The names below are imported on first use, so that commands which need no model (data, tokenizer) start
without loading torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "HookedLlama": "model", "ModelConfig": "config", "load_config": "config", "preset_names": "config",
    "load_model": "checkpoint", "ConfigError": "errors", "SSLensError": "errors",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .config import ModelConfig, load_config, preset_names
    from .errors import ConfigError, SSLensError
    from .checkpoint import load_model
    from .model import HookedLlama


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sslens' has no attribute {name!r}")
