"""Observability: counters, Prometheus metrics, the admin API, systemd readiness, logs."""
