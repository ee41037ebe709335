"""Transports move tasks and results between the coordinator and clients."""
