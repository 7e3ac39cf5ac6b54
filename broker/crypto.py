"""Encryption at rest for stored provider keys: Fernet under ``MOLAR_LLM_ENCRYPTION_KEYS``.

The variable lists Fernet keys newest first. Every listed key decrypts and the first one
encrypts, so an operator rotates by putting a new key in front, running
``molar-llm rotate-keys``, and then dropping the old key.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from broker.errors import ConfigurationError

ENV_VAR = "MOLAR_LLM_ENCRYPTION_KEYS"


class UndecryptableCredential(ConfigurationError):
    """A stored key that none of the configured encryption keys can open."""


def parse_keys(raw: str) -> list[str]:
    """The comma-separated keys of ``raw``, checked; errors say which entry is wrong."""
    keys = [part.strip() for part in raw.split(",") if part.strip()]
    if not keys:
        raise ConfigurationError(
            f"{ENV_VAR} is empty; set it to one or more Fernet keys, newest first "
            "(make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')"
        )
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ConfigurationError(
                f"{ENV_VAR} entry {position} of {len(keys)} is not a Fernet key "
                "(32 url-safe base64-encoded bytes, 44 characters)"
            ) from None
    return keys


class CredentialCipher:
    """Encrypts under the newest key, decrypts under any listed key."""

    def __init__(self, raw_keys: str):
        self._keys = parse_keys(raw_keys)
        self._fernet = MultiFernet([Fernet(key) for key in self._keys])

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str, *, what: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise UndecryptableCredential(_undecryptable(what, self.key_count)) from None

    def rotate(self, token: str, *, what: str) -> str:
        """The same plaintext, encrypted under the newest key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise UndecryptableCredential(_undecryptable(what, self.key_count)) from None


def _undecryptable(what: str, key_count: int) -> str:
    return (
        f"the stored key of {what} cannot be decrypted with any of the {key_count} key(s) in "
        f"{ENV_VAR}; put back the key it was encrypted with (keep old keys listed until "
        "'molar-llm rotate-keys' has run)"
    )
