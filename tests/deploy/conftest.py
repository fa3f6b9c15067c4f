"""Fixtures of the deploy checks.

The live checks need the real broker: the session fixtures of tests/integration are
reused here (imported, so a run of both directories starts one broker for each).
"""

from __future__ import annotations

from tests.integration.conftest import admin, kafka_bootstrap

__all__ = ["admin", "kafka_bootstrap"]
