"""Bearer-token checks in constant time."""

from __future__ import annotations

import hmac


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
