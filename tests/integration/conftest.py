"""Integration tests: every test here is marked ``integration``.

The broker fixtures (``kafka_bootstrap``, ``admin``, ``new_topic``, ...) live in
tests/conftest.py, so one broker serves every directory that needs it.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import NewTopicFactory

_HERE = os.path.dirname(__file__)

__all__ = ["NewTopicFactory"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as ``integration``."""
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.integration)
