"""tfrobust: adversarial training in weight space (AWP, S2O, RAT with AT, TRADES, MART) for Keras."""

__version__ = "0.1.0"
