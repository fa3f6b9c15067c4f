"""Fixtures of the deploy checks: the live checks use the session broker of
tests/conftest.py (one broker for the whole run)."""
