"""Outbound HTTP: one SSRF-guarded client for source-image fetches and webhook deliveries."""
