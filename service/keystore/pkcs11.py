"""Month KEKs in an HSM through PKCS#11 (SoftHSM2 in tests and dev, any module in production).

Per key id (``YYYY-MM/<class>``) the token holds one AES-256 key-encryption key:

- ``CKA_LABEL`` = the key id, ``CKA_ID`` = 16 random bytes naming this KEK (two replicas
  racing on a new month each make one; the record that wins names its ``CKA_ID``, the
  loser destroys its own);
- ``CKA_TOKEN`` true (persistent), ``CKA_PRIVATE`` true (needs login),
  ``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false (the key value never leaves the
  token, not even wrapped), ``CKA_COPYABLE`` and ``CKA_MODIFIABLE`` false (nobody can make
  an extractable copy or lift those flags), ``CKA_ENCRYPT``/``CKA_DECRYPT`` only.

The month secret (32 bytes from ``os.urandom``) is wrapped by ``C_Encrypt`` with
``CKM_AES_GCM`` inside the token (random 96-bit IV, 128-bit tag, associated data binding
the key id, KEK id and creation time), and the wrapped record goes to a shared store
(shared.py). ``unwrap`` is one ``C_Decrypt``: processors do it once per month key and
process and cache the derived keys (service/keyring.py); the HSM is not on the
per-record path.

Destruction: ``C_DestroyObject`` on every object labelled with the key id, then the
session is closed (which logs out), a FRESH session is opened and logged in, and the
label is searched again: if anything is still found, KeystoreError. A destroy that did not
stick is a failure, never a silent success.

Errors from the token that mean "cannot reach it now" (device or session gone, token
removed) raise KeystoreUnavailableError, so the stream processor pauses (nothing is written
unsealed) and retries; the session is re-opened on the next call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin

from service.errors import ConfigError, KeystoreError, KeystoreUnavailableError
from service.keystore.base import SECRET_BYTES, split_key_id
from service.keystore.shared import WrappedRecord, wrap_aad

DEFAULT_PIN_ENV: Final = "CDRANON_HSM_PIN"
KEK_BITS: Final = 256
KEK_ID_BYTES: Final = 16

log = logging.getLogger("cdranon.keystore")
_PROCESS_LOCK = threading.RLock()
# Bumped by every C_Finalize/C_Initialize of the module in this process (``_reload``): a
# wrapper whose session is from an older epoch opens a new one (the old handle is void).
_EPOCH = [0]

# Errors meaning the token or our session went away: pause and retry, never fail a record.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.FunctionFailed,
    p11e.UserNotLoggedIn,
)


class _Kek(pkcs11.SecretKey, EncryptMixin, DecryptMixin):
    """For typing only: an AES key object that can encrypt and decrypt."""


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the token is: module path, token label, the environment variable with the PIN."""

    module: str
    token: str
    pin_env: str = DEFAULT_PIN_ENV
    store: str | None = None  # URL of the wrapped-secret store (file:///DIR or kafka://...)


def parse_pkcs11_url(url: str) -> Pkcs11Config:
    """``pkcs11:///path/module.so?token=LABEL&pin-env=VAR&store=URL`` -> Pkcs11Config.

    The PIN is never part of the URL (URLs end up in logs and process listings):
    ``pin-env`` names the environment variable holding it (default CDRANON_HSM_PIN).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "pkcs11":
        raise ConfigError(f"not a pkcs11 keystore URL: {parts.scheme}://")
    if parts.netloc:
        raise ConfigError(
            "invalid pkcs11 keystore URL: the module path must be absolute, "
            "pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=LABEL (three slashes)"
        )
    module = unquote(parts.path)
    if not module.startswith("/"):
        raise ConfigError("invalid pkcs11 keystore URL: no module path after pkcs11://")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if "pin" in query:
        raise ConfigError(
            "a PIN in the keystore URL is refused: put it in an environment variable and "
            f"name that with pin-env= (default {DEFAULT_PIN_ENV})"
        )
    unknown = sorted(set(query) - {"token", "pin-env", "store"})
    if unknown:
        raise ConfigError(
            f"unknown pkcs11 keystore URL parameter(s) {', '.join(unknown)}: "
            "expected token, pin-env, store"
        )

    def one(name: str, default: str | None) -> str | None:
        vals = query.get(name)
        if not vals:
            return default
        if len(vals) > 1 or not vals[0]:
            raise ConfigError(f"pkcs11 keystore URL: {name}= must appear once, non-empty")
        return vals[0]

    token = one("token", None)
    if token is None:
        raise ConfigError("pkcs11 keystore URL: token=LABEL is required")
    return Pkcs11Config(
        module=module,
        token=token,
        pin_env=one("pin-env", DEFAULT_PIN_ENV) or DEFAULT_PIN_ENV,
        store=one("store", None),
    )


def _aad(record_backend: str, kid: str, kek_id: str, created_at: str) -> bytes:
    return wrap_aad(record_backend, kid, kek_id, created_at)


class Pkcs11Wrapper:
    """Per-month non-extractable KEKs in a PKCS#11 token (shared.Wrapper). Thread-safe.

    Opens the module, finds the token by label and logs in with the PIN from ``env``.
    ConfigError if the module, token or PIN is wrong; KeystoreUnavailableError if the
    token cannot be reached.
    """

    backend = "pkcs11"

    def __init__(self, config: Pkcs11Config, *, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        pin = environ.get(config.pin_env, "")
        if not pin:
            raise ConfigError(
                f"no PIN for HSM token {config.token!r}: set {config.pin_env} "
                "(pkcs11 keystore URL, pin-env=)"
            )
        if not os.path.isfile(config.module):
            raise ConfigError(
                f"PKCS#11 module {config.module} does not exist (for SoftHSM2: "
                "scripts/softhsm.sh install; scripts/softhsm.sh module prints its path)"
            )
        self.config = config
        self._pin = pin
        # One lock for every wrapper of the process: the module is loaded once per process,
        # and python-pkcs11 does not ask it for thread-safe operation (concurrent calls from
        # two sessions crashed SoftHSM2 in tests). The token is not on the per-record path.
        self._lock = _PROCESS_LOCK
        try:
            with self._lock:
                self._lib = pkcs11.lib(config.module)
                self._token = self._lib.get_token(token_label=config.token)
                mechanisms = self._token.slot.get_mechanisms()
        except p11e.NoSuchToken as exc:
            raise ConfigError(
                f"no token labelled {config.token!r} in {config.module} "
                "(for SoftHSM2: is SOFTHSM2_CONF set to the token's config? "
                "scripts/softhsm.sh init DIR LABEL)"
            ) from exc
        except p11e.PKCS11Error as exc:
            raise KeystoreUnavailableError(
                f"cannot open PKCS#11 module {config.module}: {exc.__class__.__name__}"
            ) from exc
        if Mechanism.AES_GCM not in mechanisms:
            raise KeystoreError(
                f"token {config.token!r} does not offer CKM_AES_GCM, which the pkcs11 "
                "keystore wraps month secrets with"
            )
        self._session: pkcs11.Session | None = None
        self._epoch = _EPOCH[0]
        with self._lock:
            self._open()

    def __repr__(self) -> str:
        return f"Pkcs11Wrapper(module={self.config.module!r}, token={self.config.token!r})"

    # -- sessions ---------------------------------------------------------------------------

    def _open(self) -> pkcs11.Session:
        if self._epoch != _EPOCH[0]:
            self._token = self._lib.get_token(token_label=self.config.token)
            self._epoch = _EPOCH[0]
        try:
            self._session = self._token.open(rw=True, user_pin=self._pin)
        except p11e.UserAlreadyLoggedIn:
            # Login state is per application: another session of ours is logged in.
            self._session = self._token.open(rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
            raise ConfigError(
                f"the PIN in {self.config.pin_env} is not accepted by token {self.config.token!r}"
            ) from exc
        except p11e.PinLocked as exc:
            raise ConfigError(f"the user PIN of token {self.config.token!r} is locked") from exc
        except _UNAVAILABLE as exc:
            raise KeystoreUnavailableError(
                f"cannot open a session on token {self.config.token!r}: {exc.__class__.__name__}"
            ) from exc
        return self._session

    def _s(self) -> pkcs11.Session:
        if self._session is not None and self._epoch == _EPOCH[0]:
            return self._session
        self._session = None  # from before a reload: the handle is void, nothing to close
        return self._open()

    def _reload(self) -> pkcs11.Session:
        """Finalise and re-initialise the module, then log in again: a view from scratch.

        SoftHSM2 caches the token's object list per process and refreshes it from a
        generation counter that two processes writing at once can both bump to the same
        value, leaving each blind to the other's new object. Real HSMs need this less;
        it is cheap and only runs when a KEK is not found, and on destroy.
        """
        self._drop_session()
        try:
            self._lib.reinitialize()
        except p11e.PKCS11Error as exc:
            raise self._unavailable("re-initialising the PKCS#11 module", exc) from exc
        _EPOCH[0] += 1
        return self._open()

    def _drop_session(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            try:
                s.close()
            except p11e.PKCS11Error:
                log.debug("closing a broken PKCS#11 session failed", exc_info=True)

    def _unavailable(self, what: str, exc: BaseException) -> KeystoreUnavailableError:
        self._drop_session()
        return KeystoreUnavailableError(
            f"HSM token {self.config.token!r} unreachable while {what}: "
            f"{exc.__class__.__name__}; processing pauses and retries"
        )

    def _keks(
        self, session: pkcs11.Session, kid: str, kek_id: bytes | None = None
    ) -> list[pkcs11.SecretKey]:
        attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: kid}
        if kek_id is not None:
            attrs[Attribute.ID] = kek_id
        return [o for o in session.get_objects(attrs) if isinstance(o, pkcs11.SecretKey)]

    # -- shared.Wrapper -----------------------------------------------------------------------

    def new_kek(self, kid: str) -> str:
        """Generate a non-extractable AES-256 KEK labelled ``kid``; its CKA_ID in hex."""
        split_key_id(kid)
        kek_id = os.urandom(KEK_ID_BYTES)
        with self._lock:
            try:
                self._s().generate_key(
                    KeyType.AES,
                    KEK_BITS,
                    id=kek_id,
                    label=kid,
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.COPYABLE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.SIGN: False,
                        Attribute.VERIFY: False,
                        Attribute.DERIVE: False,
                    },
                )
            except _UNAVAILABLE as exc:
                raise self._unavailable(f"creating the KEK of {kid}", exc) from exc
            except p11e.PKCS11Error as exc:
                raise KeystoreError(
                    f"token {self.config.token!r} refused to create the KEK of {kid}: "
                    f"{exc.__class__.__name__}"
                ) from exc
        return kek_id.hex()

    def _kek(self, kid: str, kek_id: str) -> _Kek:
        found = self._keks(self._s(), kid, bytes.fromhex(kek_id))
        if not found:
            found = self._keks(self._reload(), kid, bytes.fromhex(kek_id))
        if len(found) != 1:
            raise KeystoreError(
                f"the KEK of {kid} (id {kek_id}) is "
                f"{'missing from' if not found else 'duplicated in'} "
                f"token {self.config.token!r}: destroyed outside cdranon, another token, or "
                "a replica of the HSM that has not received it"
            )
        kek = found[0]
        if not isinstance(kek, EncryptMixin) or not isinstance(kek, DecryptMixin):
            raise KeystoreError(f"the KEK of {kid} in token {self.config.token!r} cannot encrypt")
        return cast(_Kek, kek)

    def wrap(self, kid: str, kek_id: str, secret: bytes, created_at: str) -> WrappedRecord:
        """C_Encrypt(CKM_AES_GCM) of the secret under the month's KEK, inside the token."""
        nonce = os.urandom(12)
        aad = _aad(self.backend, kid, kek_id, created_at)
        with self._lock:
            try:
                blob = self._kek(kid, kek_id).encrypt(
                    secret, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128)
                )
            except _UNAVAILABLE as exc:
                raise self._unavailable(f"wrapping the secret of {kid}", exc) from exc
            except p11e.PKCS11Error as exc:
                raise KeystoreError(
                    f"token {self.config.token!r} could not wrap the secret of {kid}: "
                    f"{exc.__class__.__name__}"
                ) from exc
        if not isinstance(blob, bytes):  # only for iterator input, which we never pass
            raise KeystoreError(f"token {self.config.token!r} returned no ciphertext for {kid}")
        return WrappedRecord(kid, self.backend, kek_id, nonce, blob, created_at)

    def unwrap(self, record: WrappedRecord) -> bytes:
        """C_Decrypt(CKM_AES_GCM) inside the token; the secret comes out, the KEK never does."""
        kid = record.key_id
        if record.backend != self.backend:
            raise KeystoreError(
                f"{kid} was wrapped by the {record.backend} backend, not by an HSM: open the "
                "keystore it was made with"
            )
        aad = _aad(record.backend, kid, record.kek_id, record.created_at)
        with self._lock:
            try:
                kek = self._kek(kid, record.kek_id)
                secret = kek.decrypt(
                    record.wrapped,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(record.nonce, aad, 128),
                )
            except _UNAVAILABLE as exc:
                raise self._unavailable(f"unwrapping {kid}", exc) from exc
            except ValueError as exc:
                raise KeystoreError(
                    f"the wrapped record of {kid} names a malformed KEK id"
                ) from exc
            except p11e.PKCS11Error as exc:
                # SoftHSM reports a GCM tag mismatch as a general error.
                raise KeystoreError(
                    f"the wrapped record of {kid} does not unwrap with its KEK in token "
                    f"{self.config.token!r} ({exc.__class__.__name__}): damaged or tampered with"
                ) from exc
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise KeystoreError(f"the wrapped secret of {kid} has the wrong length")
        return secret

    def discard(self, kid: str, kek_id: str) -> None:
        """Destroy the KEK of a candidate that lost the create race."""
        with self._lock:
            try:
                for kek in self._keks(self._s(), kid, bytes.fromhex(kek_id)):
                    kek.destroy()
            except _UNAVAILABLE as exc:
                raise self._unavailable(f"discarding a spare KEK of {kid}", exc) from exc
            except p11e.PKCS11Error as exc:
                raise KeystoreError(
                    f"could not discard a spare KEK of {kid}: {exc.__class__.__name__}"
                ) from exc

    def destroy(self, kid: str) -> bool:
        """C_DestroyObject on every KEK labelled ``kid``, verified from a fresh session.

        True if one existed. KeystoreError if, after logging in again, the label is still
        found (the destroy did not stick).
        """
        split_key_id(kid)
        with self._lock:
            try:
                # From a reloaded module: a KEK another process just made must not be missed.
                keks = self._keks(self._reload(), kid)
                refused = []
                for kek in keks:
                    # One refusal must not spare the others: destroy all we can, then check.
                    try:
                        kek.destroy()
                    except _UNAVAILABLE:
                        raise
                    except p11e.PKCS11Error as exc:
                        refused.append(exc.__class__.__name__)
                # Close our session (logging out) and look again from a new login on a
                # re-initialised module, so the check reads no cached view of the token.
                left = len(self._keks(self._reload(), kid))
            except _UNAVAILABLE as exc:
                raise self._unavailable(f"destroying the KEK of {kid}", exc) from exc
            except p11e.PKCS11Error as exc:
                raise KeystoreError(
                    f"C_DestroyObject on the KEK of {kid} failed: {exc.__class__.__name__}; "
                    "run the destroy again"
                ) from exc
        if left:
            why = f" (C_DestroyObject refused: {', '.join(refused)})" if refused else ""
            raise KeystoreError(
                f"destroying the KEK of {kid} did not stick: {left} object(s) labelled {kid} "
                f"are still in token {self.config.token!r} after logging in again{why}"
            )
        if keks:
            log.info("destroyed %d KEK(s) of %s in token %s", len(keks), kid, self.config.token)
        return bool(keks)

    def kek_labels(self) -> list[str]:
        """Labels of every secret key object in the token (for audits and tests)."""
        with self._lock:
            try:
                objs = self._s().get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
                return sorted(str(o.label) for o in objs if isinstance(o, pkcs11.SecretKey))
            except _UNAVAILABLE as exc:
                raise self._unavailable("listing KEKs", exc) from exc

    def close(self) -> None:
        """Close the session (logging out of the token)."""
        with self._lock:
            self._drop_session()


__all__ = [
    "DEFAULT_PIN_ENV",
    "Pkcs11Config",
    "Pkcs11Wrapper",
    "parse_pkcs11_url",
]
