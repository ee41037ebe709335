"""Watching a fleet: Prometheus metrics and the dashboard."""
