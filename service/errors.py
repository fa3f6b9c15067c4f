"""The one exception hierarchy of cdranon.

Every error that reaches a user says what was wrong, with which record, field or setting,
and what to do. No message ever carries an identifier's value or key material: messages
name fields and settings, never the data in them.
"""

from __future__ import annotations


class CdranonError(Exception):
    """Base of every error cdranon raises on purpose."""


class ConfigError(CdranonError):
    """A setting, flag or config file is wrong; the message names it and what is expected."""


class PolicyError(ConfigError):
    """The field or retention policy file is invalid (which key, what was expected)."""


class KeystoreError(CdranonError):
    """The keystore could not do what was asked (which key id, which backend, why)."""


class KeystoreUnavailableError(KeystoreError):
    """The keystore cannot be reached right now; the caller pauses and retries."""


class KeyDestroyedError(KeystoreError):
    """The month key was destroyed: its sealed identifiers are gone for good, by design."""

    def __init__(self, key_id: str, destroyed_at: str | None = None) -> None:
        when = f" at {destroyed_at}" if destroyed_at else ""
        super().__init__(
            f"key {key_id} was destroyed{when}: the identifiers sealed under it "
            "cannot be recovered (cryptographic erasure)"
        )
        self.key_id = key_id
        self.destroyed_at = destroyed_at


class KeyNotFoundError(KeystoreError):
    """No key exists for this key id (and none may be created here)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key {key_id} in the keystore")
        self.key_id = key_id


class MasterKeyError(KeystoreError):
    """The master key (KEK) is missing, malformed, or does not unwrap the stored secrets."""


class SealError(CdranonError):
    """A sealed blob is malformed, or does not authenticate for this record."""


class RecordError(CdranonError):
    """One input record is invalid. Carries the field and a reason, never the value."""

    def __init__(self, reason: str, field: str | None = None, detail: str = "") -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        text = detail or reason.replace("_", " ")
        super().__init__(f"field {field!r}: {text}" if field else text)


class KafkaFatalError(CdranonError):
    """Kafka reported a fatal error (fenced producer, unrecoverable state); the run ends.

    ``restartable``: new clients can carry on (the client instance is unusable, e.g. fenced
    after a pause or by its own static-membership rejoin across a broker restart); False
    for what new clients would meet again (bad credentials, authorisation, configuration).
    """

    def __init__(self, message: str, *, restartable: bool = False) -> None:
        super().__init__(message)
        self.restartable = restartable


class AuditError(CdranonError):
    """The audit log could not be opened, read or written (which target, why)."""


class AuditUnavailableError(AuditError):
    """The audit topic cannot be read right now (broker down, timed out, no leader).

    The log itself may be fine: a long-running caller backs off and retries. A plain
    AuditError (a damaged chain, a topic with the wrong layout) is never retried.
    ``code``: the Kafka error's name (``_TIMED_OUT`` when a read did not finish in time).
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class AuditWriteError(AuditError):
    """An audit event was not durably written: the audited action must not be reported done."""
