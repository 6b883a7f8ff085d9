"""flexkd: Flex-KD feature distillation for LLMs of any hidden size.

The public surface is small; heavy modules (torch, transformers) load only when their names are used, so
that reading and checking a config stays fast.
"""

from flexkd.config import Config, ConfigError, load_config

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "train",
    "FEATURE_LOSSES",
    "KD_LOSSES",
    "SCORERS",
    "SELECTORS",
]
__version__ = "0.1.0"

_LAZY = {
    "train": "flexkd.train",
    "FEATURE_LOSSES": "flexkd.losses",
    "KD_LOSSES": "flexkd.losses",
    "SCORERS": "flexkd.scoring",
    "SELECTORS": "flexkd.selection",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexkd' has no attribute {name!r}")
