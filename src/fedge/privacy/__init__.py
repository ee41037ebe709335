"""Differential privacy: accounting of the privacy a run spends (the DP wrapper itself is a
strategy wrapper, `fedge.strategy.dp`)."""
