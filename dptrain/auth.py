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


def keep_token_private() -> None:
    """This user's only: the token file Ray reads (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, 0600)
    and its folder (0700, made so if missing). Ray 2.60 writes a token it generates with the
    default umask (0644, in a folder of 0755) when it starts a local instance, and whoever reads
    it can join that instance and run code as this user. Called before Ray starts one (a token it
    writes then lands in a folder nobody else can enter) and after. Another user's files, or a
    folder that cannot be made, are left as they are."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE)
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        for target, mode in ((folder, 0o700), (path, 0o600)):
            if os.path.exists(target) and os.stat(target).st_uid == os.getuid():
                os.chmod(target, mode)
    except OSError:
        pass


def use_token_auth_for(address: str | None) -> None:
    """RAY_AUTH_MODE=token for a cluster address (given, or RAY_ADDRESS's) when a token is found,
    as Ray does for "auto". A value already set is respected (RAY_AUTH_MODE=disabled opts out)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and token_found():
        os.environ["RAY_AUTH_MODE"] = "token"
