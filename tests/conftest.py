"""Shared pytest configuration and fixtures for the whole suite.

Unit tests (``tests/unit``) need nothing but the package. Tests that need Kafka
(tests/integration, tests/deploy, tests/reliability) share ONE real broker per session,
defined here: started with ``LocalKafka`` (watching this pytest process, so a killed run
leaves no broker behind), or taken from ``CDRANON_TEST_BOOTSTRAP``. If it cannot be
reached the tests fail with the reason: an integration test never skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka.admin import AdminClient

from service.devkafka import LocalKafka
from service.errors import CdranonError
from tests.integration.kafka_helpers import create_topics, unique_name


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak``: run tests/reliability at soak scale (here so it works from the top)."""
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="reliability suite at soak scale: more records, kills and examples (slow)",
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker for the whole session."""
    external = os.environ.get("CDRANON_TEST_BOOTSTRAP", "").strip()
    if external:
        admin = AdminClient({"bootstrap.servers": external})
        try:
            admin.list_topics(timeout=15)
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable
            pytest.fail(
                f"CDRANON_TEST_BOOTSTRAP={external} does not answer metadata requests: {exc}",
                pytrace=False,
            )
        yield external
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), watch_pid=os.getpid())
    try:
        bootstrap = broker.start()
    except CdranonError as exc:
        pytest.fail(f"could not start the local Kafka broker: {exc}", pytrace=False)
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def admin(kafka_bootstrap: str) -> AdminClient:
    """An AdminClient on the session broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def unique_id() -> str:
    """A short token unique to this test, for topic prefixes and transactional ids."""
    return unique_name("u")


@pytest.fixture
def group_id() -> str:
    """A consumer group id used by no other test."""
    return unique_name("group")


NewTopicFactory = Callable[..., str]


@pytest.fixture
def new_topic(admin: AdminClient) -> NewTopicFactory:
    """Factory: ``new_topic(partitions=1, config=None, prefix="topic")`` -> a fresh topic.

    The topic exists (all partitions led) when the call returns.
    """

    def make(
        partitions: int = 1, config: dict[str, str] | None = None, prefix: str = "topic"
    ) -> str:
        name = unique_name(prefix)
        create_topics(admin, [name], partitions=partitions, config=config)
        return name

    return make
