"""The object store (S3/MinIO in production, a local folder for the embedded default)."""
