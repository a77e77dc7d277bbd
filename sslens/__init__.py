"""sslens: train tiny Llama models on SimpleStories-style data and take them apart."""

from .config import ModelConfig, load_config, preset_names
from .errors import ConfigError, SSLensError
from .hf import load_model
from .model import HookedLlama

__all__ = ["HookedLlama", "ModelConfig", "load_config", "load_model", "preset_names", "ConfigError", "SSLensError"]
