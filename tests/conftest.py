"""Shared pytest configuration for the whole suite.

Unit tests (``tests/unit``) need nothing but the package; integration tests
(``tests/integration``) get the real broker from the fixtures in their own conftest.
"""

from __future__ import annotations
