"""dice-influence: data influence cascades in decentralized learning (DICE, ICLR 2025).

Sign convention everywhere: influence = loss with the data - loss without it;
positive = harmful, negative = helpful.
"""

__version__ = "0.1.0"
