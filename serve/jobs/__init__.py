"""Durable jobs: typed records in the object store, the runner, idempotency and webhook delivery."""
