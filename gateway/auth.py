"""API tokens: a file of ``TOKEN TENANT`` lines, re-read when it changes (no restart).

Lines are whitespace-separated pairs; ``#`` starts a comment. Only SHA-256 digests of the
tokens are kept, and a presented token is looked up by its digest, so the lookup does not
compare secret bytes one by one. The file's modification time is looked at most once per
`check_every` seconds; a file that cannot be read or parsed keeps the previous tokens (and
logs why), so a half-written file never locks everybody out.
"""
from __future__ import annotations

import hashlib
import os
import re
import time

import structlog

log = structlog.get_logger("ringserve.gateway")

MAX_TOKENS = 10_000
TENANT = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


class TokenError(ValueError):
    """A tokens file that cannot be used."""


def parse_tokens(text: str) -> dict[bytes, str]:
    """{sha256(token): tenant}; raises TokenError naming the bad line."""
    out: dict[bytes, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) < 16 or not TENANT.match(parts[1]):
            raise TokenError(f"line {n}: expected 'TOKEN TENANT' (a token of 16+ characters, a tenant name "
                             "of letters, digits and _.:@-)")
        out[hashlib.sha256(parts[0].encode()).digest()] = parts[1]
        if len(out) > MAX_TOKENS:
            raise TokenError(f"more than {MAX_TOKENS} tokens")
    return out


class Tokens:
    def __init__(self, path: str, check_every: float = 1.0):
        self.path, self.check_every = path, check_every
        self._mtime: float | None = None
        self._next_check = 0.0
        self.by_digest: dict[bytes, str] = {}
        self.reload(first=True)

    @property
    def tenants(self) -> set[str]:
        return set(self.by_digest.values())

    def reload(self, first: bool = False) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return
            with open(self.path, encoding="utf-8") as f:
                tokens = parse_tokens(f.read())
        except (OSError, UnicodeDecodeError, TokenError) as exc:
            if first:
                raise TokenError(f"--tokens {self.path}: {exc}") from None
            log.warning("tokens_reload_failed", path=self.path, error=str(exc))
            return
        self._mtime, self.by_digest = mtime, tokens
        log.info("tokens_loaded", path=self.path, tokens=len(tokens), tenants=len(set(tokens.values())))

    def tenant(self, authorization: bytes | None) -> str | None:
        """The tenant for an ``Authorization: Bearer TOKEN`` header value, or None."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_every
            self.reload()
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        return self.by_digest.get(hashlib.sha256(authorization[7:].strip()).digest())
