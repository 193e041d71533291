"""dice-influence: data influence cascades in decentralized learning (DICE, ICLR 2025).

Sign convention everywhere: influence = loss with the data - loss without it;
positive = harmful, negative = helpful.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "from_torch"]


def __getattr__(name: str):  # PEP 562 lazy export: `import dice_influence` stays light (the CLI
    # starts fast) and the package itself imports none of its modules
    if name == "from_torch":
        import importlib

        return importlib.import_module(f"{__name__}.api").from_torch
    raise AttributeError(f"module 'dice_influence' has no attribute {name!r}")
