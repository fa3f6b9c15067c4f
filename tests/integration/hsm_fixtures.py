"""SoftHSM2 tokens and keystore parameters for tests (the pkcs11 keystore on a real token).

``softhsm_token``: one SoftHSM2 token per test process, initialised by scripts/softhsm.sh
in the session's tmp directory, with ``SOFTHSM2_CONF`` and the PIN exported to the process.
One per process because a PKCS#11 module reads its configuration once per process
(``C_Initialize``); tests keep apart by using their own key ids (retention classes) or
topics.

``keystore_backend`` (parametrised ``file`` / ``pkcs11``): what a stream test needs to run
against either backend: a keystore URL and the environment to run ``cdranon`` with. To
use it from another test module::

    from tests.integration.hsm_fixtures import keystore_backend, softhsm_token  # noqa: F401

    def test_x(keystore_backend: KeystoreUnderTest, ...) -> None:
        url, env = keystore_backend.url, keystore_backend.env
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.keystore import generate_master_key
from service.keystore.shared import DEFAULT_TOPIC

REPO = Path(__file__).resolve().parents[2]
SOFTHSM_SH = REPO / "scripts" / "softhsm.sh"
TOKEN_LABEL = "cdranon-test"


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token: where its config is, its label, module and PIN."""

    conf: Path
    label: str
    module: str
    pin: str
    pin_env: str = "CDRANON_HSM_PIN"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use the token."""
        return {"SOFTHSM2_CONF": str(self.conf), self.pin_env: self.pin}

    def url(self, store: str) -> str:
        """A pkcs11 keystore URL on this token with the given wrapped-secret store."""
        return f"pkcs11://{self.module}?token={self.label}&pin-env={self.pin_env}&store={store}"


def make_softhsm_token(directory: Path, label: str = TOKEN_LABEL) -> SoftHsmToken:
    """Initialise a token in ``directory`` with scripts/softhsm.sh (installs softhsm2 if needed)."""
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    env = {**os.environ, "CDRANON_HSM_PIN": pin, "CDRANON_HSM_SO_PIN": so_pin}
    done = subprocess.run(
        [str(SOFTHSM_SH), "init", str(directory), label],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/softhsm.sh init failed: {done.stderr.strip()}", pytrace=False)
    module = subprocess.run(
        [str(SOFTHSM_SH), "module"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    return SoftHsmToken(conf=directory / "softhsm2.conf", label=label, module=module, pin=pin)


_PROCESS_TOKEN: list[SoftHsmToken] = []


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """One SoftHSM2 token per test process, its config and PIN exported to this process.

    Process-wide, not merely session-wide: the fixture may be imported into several test
    modules, and the PKCS#11 module, once initialised in this process, only ever sees the
    token configuration it started with. The environment stays set for the same reason.
    """
    if not _PROCESS_TOKEN:
        token = make_softhsm_token(tmp_path_factory.mktemp("softhsm"))
        os.environ.update(token.env)
        _PROCESS_TOKEN.append(token)
    return _PROCESS_TOKEN[0]


@dataclass(frozen=True, slots=True)
class KeystoreUnderTest:
    """A keystore URL and the environment (master key, HSM PIN) to open it with."""

    backend: str
    url: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(params=["file", "pkcs11"])
def keystore_backend(
    request: pytest.FixtureRequest, tmp_path: Path, kafka_bootstrap: str
) -> KeystoreUnderTest:
    """The keystore of one test, ``file`` or ``pkcs11`` (SoftHSM2 + a fresh cdr.keys topic).

    ``file``: ``file://<tmp>/keys`` with a random master key. ``pkcs11``: the session's
    SoftHSM2 token, wrapped secrets in a topic of this test (``cdr.keys.<random>``).
    """
    if request.param == "file":
        return KeystoreUnderTest(
            "file", f"file://{tmp_path / 'keys'}", {"CDRANON_MASTER_KEY": generate_master_key()}
        )
    token: SoftHsmToken = request.getfixturevalue("softhsm_token")
    topic = f"{DEFAULT_TOPIC}.{secrets.token_hex(4)}"
    return KeystoreUnderTest("pkcs11", token.url(f"kafka://{kafka_bootstrap}/{topic}"), token.env)


__all__ = [
    "KeystoreUnderTest",
    "SoftHsmToken",
    "keystore_backend",
    "make_softhsm_token",
    "softhsm_token",
]
