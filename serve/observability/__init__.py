"""Prometheus metrics and the log redaction that keeps secrets out of library logs."""
