"""Bearer-token checks in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_cost_exporter.config import MetricsAuth


def bearer_ok(header: str | None, tokens: tuple[str, ...]) -> bool:
    """True if no tokens are configured, or the Authorization header carries one of them."""
    if not tokens:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    offered = header[7:].strip().encode()
    ok = False
    # Compare with every token (no early exit) so timing does not reveal which one matched.
    for token in tokens:
        ok |= hmac.compare_digest(offered, token.encode())
    return ok


def metrics_auth_ok(header: str | None, auth: MetricsAuth) -> bool:
    """/metrics: open unless tokens or basic-auth users are configured."""
    if not auth.enabled:
        return True
    if not header:
        return False
    if header.lower().startswith("bearer "):
        return bool(auth.tokens) and bearer_ok(header, auth.tokens)
    if not header.lower().startswith("basic ") or not auth.basic_users:
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    ok = False
    for name, secret in auth.basic_users.items():
        ok |= hmac.compare_digest(user.encode(), name.encode()) & hmac.compare_digest(
            password.encode(), secret.encode())
    return ok
