"""sslens: train tiny Llama models on SimpleStories-style data and take them apart.

The names below are imported on first use, so that commands which need no model (data, tokenizer) start
without loading torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "HookedLlama": "model",
    "ModelConfig": "config",
    "load_config": "config",
    "preset_names": "config",
    "load_model": "checkpoint",
    "ConfigError": "errors",
    "SSLensError": "errors",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .checkpoint import load_model as load_model  # "as": re-exported (see __all__)
    from .config import ModelConfig as ModelConfig
    from .config import load_config as load_config
    from .config import preset_names as preset_names
    from .errors import ConfigError as ConfigError
    from .errors import SSLensError as SSLensError
    from .model import HookedLlama as HookedLlama


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sslens' has no attribute {name!r}")
