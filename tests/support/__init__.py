"""Test helpers that are not tests: real servers (S3) and other fixtures' machinery."""
