"""Ray's token authentication, as a client needs it: without Ray imported (Ray reads
RAY_AUTH_MODE once, when it is imported, so the CLI decides it first).

Ray 2.60's `ray start` clusters require a token (~/.ray/auth_token on the head). Ray turns
token authentication on by itself for `ray.init("auto")` when it finds a token, but not for
an explicit HOST:PORT or RAY_ADDRESS, for which it then retries the GCS for ever.
"""

from __future__ import annotations

import os

TOKEN_FILE = "~/.ray/auth_token"


def token_found() -> bool:
    """Whether Ray will find an authentication token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser(TOKEN_FILE)
    return os.path.isfile(path)


def use_token_auth_for(address: str | None) -> None:
    """RAY_AUTH_MODE=token for a cluster address (given, or RAY_ADDRESS's) when a token is found,
    as Ray does for "auto". A value already set is respected (RAY_AUTH_MODE=disabled opts out)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and token_found():
        os.environ["RAY_AUTH_MODE"] = "token"
