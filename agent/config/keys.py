"""Ed25519 public key files, as named by ``updates.trusted_keys``.

The config loader checks that every trusted key loads, and ``agent.updates.signing`` loads the
same files to verify update signatures: one reader for both, kept here in the lower layer so
checking a config never imports the update machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import UpdateKeyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``NAME.pub``)."""
    # Imported here: cryptography costs ~40 ms to import, every command (status, detect,
    # check-config, ...) imports agent.config, and only a config naming trusted keys needs it.
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise UpdateKeyError(f"cannot read public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UpdateKeyError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UpdateKeyError(f"{path} is not an Ed25519 public key")
    return key
