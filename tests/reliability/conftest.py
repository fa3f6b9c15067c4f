"""The reliability and security suite (issue 9): every test here is marked ``reliability``.

CI runs a scaled-down default; ``pytest --soak`` (registered in tests/conftest.py so that
it works from the top of the tree) scales record counts, kills and examples up. The broker
fixtures come from tests/conftest.py; scenarios that restart a broker start their own.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.support import Scale

_HERE = os.path.dirname(__file__)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/reliability as ``reliability``."""
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    """CI-sized counts, or the soak counts with ``--soak``."""
    return Scale(soak=bool(request.config.getoption("--soak")))
