"""dice-influence: data influence cascades in decentralized learning (DICE, ICLR 2025).

Sign convention everywhere: influence = loss with the data - loss without it;
positive = harmful, negative = helpful.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "from_torch"]


def __getattr__(name: str):  # lazy: `import dice_influence` stays light (the CLI starts fast)
    if name == "from_torch":
        from .api import from_torch

        return from_torch
    raise AttributeError(f"module 'dice_influence' has no attribute {name!r}")
