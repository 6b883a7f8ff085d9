"""flexkd: Flex-KD feature distillation for LLMs of any hidden size.

The public surface is small; heavy modules (torch, transformers) load only when their names are used, so
that reading and checking a config stays fast. The loop is ``flexkd.train.train`` (``flexkd.train`` is the
module: a facade attribute of the same name would be shadowed by it once it is imported).
"""

from flexkd.config import Config, ConfigError, load_config

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "FEATURE_LOSSES",
    "KD_LOSSES",
    "SCORERS",
    "SELECTORS",
]
__version__ = "0.1.0"

_LAZY = {
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
