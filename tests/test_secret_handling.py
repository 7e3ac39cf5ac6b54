"""The pieces behind the canary test, each on its own: the cipher, the redaction registry,
the logging filter the command line installs, and metric-label redaction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from broker.crypto import CredentialCipher, UndecryptableCredential
from broker.errors import ConfigurationError
from broker.redaction import REDACTED, SecretRegistry, redact

SECRET = "canary-logging-0123456789abcdef"


def test_the_newest_key_encrypts_and_every_listed_key_decrypts():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token_old = CredentialCipher(old).encrypt(SECRET)
    both = CredentialCipher(f"{new}, {old}")
    token_new = both.encrypt(SECRET)

    assert SECRET not in token_new
    assert both.decrypt(token_old, what="x") == SECRET
    assert Fernet(new).decrypt(token_new.encode()).decode() == SECRET
    rotated = both.rotate(token_old, what="x")
    assert CredentialCipher(new).decrypt(rotated, what="x") == SECRET
    with pytest.raises(UndecryptableCredential, match="integration 'byok-a'"):
        CredentialCipher(new).decrypt(token_old, what="integration 'byok-a'")


@pytest.mark.parametrize("raw", ["", " , ", "not-a-key", f"{Fernet.generate_key().decode()},x"])
def test_malformed_encryption_keys_are_refused_naming_the_variable(raw):
    with pytest.raises(ConfigurationError, match="MOLAR_LLM_ENCRYPTION_KEYS"):
        CredentialCipher(raw)


def test_redaction_replaces_the_longest_secret_whole_and_ignores_short_strings():
    text = f"key={SECRET} prefix={SECRET[:12]} short=abc"
    assert redact(text, [SECRET, SECRET[:12], "abc"]) == (
        f"key={REDACTED} prefix={REDACTED} short=abc")
    registry = SecretRegistry()
    registry.add(SECRET, "short")
    assert registry.snapshot() == frozenset({SECRET})
    assert registry.redact(f"x {SECRET} y") == f"x {REDACTED} y"


LOGGING_SCRIPT = """
import logging, sys
from broker.logs import configure_logging
from broker.redaction import LIVE_SECRETS, redact_label
configure_logging("DEBUG", sys.argv[2])
LIVE_SECRETS.add(sys.argv[1])
log = logging.getLogger("broker.anything")
log.debug("args %s and %r", sys.argv[1], {"k": sys.argv[1]})
log.info("inline " + sys.argv[1], extra={"detail": "extra " + sys.argv[1]})
try:
    raise RuntimeError("boom " + sys.argv[1])
except RuntimeError:
    log.exception("failed")
logging.getLogger("celery.worker").warning("third-party %s", sys.argv[1])
print(redact_label("label-" + sys.argv[1]))
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_cli_logging_setup_redacts_messages_arguments_extras_and_tracebacks(fmt):
    done = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, SECRET, fmt],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert SECRET not in output
    # Both: two arguments, the inline message, the third-party line and the label. Text
    # shows the traceback; JSON shows the extra field instead.
    assert output.count(REDACTED) == 6, output
    if fmt == "text":
        assert f"RuntimeError: boom {REDACTED}" in done.stderr
    else:
        assert f'"detail":"extra {REDACTED}"' in done.stderr
    assert done.stdout.strip() == f"label-{REDACTED}"
