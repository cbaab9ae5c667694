"""Who is calling: API keys mapped to tenants.

`--api-keys FILE` holds one `TENANT KEY` pair per line (blank lines and `#` comments skipped); a KEY
written `sha256:<64 hex digits>` is the key's SHA-256, so the file need not hold the key itself.
`--api-key KEY` is one tenant, "default". Every key is compared, each in constant time, so the time
an answer takes says nothing about which key came close.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from ..core.errors import UniLoraError

DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


def tenant_of(request) -> str:
    """The tenant of a request (set by the app's guard; "default" without keys)."""
    return request.scope.get("unilora.tenant", DEFAULT_TENANT)


class Keys:
    def __init__(self, entries: list[tuple[str, bytes, bool]]):
        self.entries = entries  # (tenant, key or its digest, hashed)

    @classmethod
    def of(cls, api_key: str | None, api_keys: str | None) -> "Keys | None":
        """The keys a server checks; None when it checks none."""
        if api_key is not None and api_keys is not None:
            raise UniLoraError("give --api-key or --api-keys, not both")
        if api_key is not None:
            return cls([(DEFAULT_TENANT, api_key.encode(), False)])
        if api_keys is not None:
            return cls(read_keys(Path(api_keys)))
        return None

    def tenant(self, authorization: bytes) -> str | None:
        """The tenant whose key an `Authorization: Bearer KEY` header carries, else None."""
        given = authorization[7:] if authorization.startswith(b"Bearer ") else b"\0"
        digest = hashlib.sha256(given).hexdigest().encode()
        found = None
        for tenant, key, hashed in self.entries:
            if hmac.compare_digest(digest if hashed else given, key) and found is None:
                found = tenant
        return found


def read_keys(path: Path) -> list[tuple[str, bytes, bool]]:
    if not path.is_file():
        raise UniLoraError(f"--api-keys '{path}' is not a file; write one 'TENANT KEY' pair per line")
    entries, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not TENANT_PATTERN.fullmatch(parts[0]):
            raise UniLoraError(f"{path}:{number}: expected 'TENANT KEY' (a tenant name of letters, digits, '.', '_' "
                               "or '-', then the key or sha256:<hex>)")
        tenant, key = parts
        hashed = HASHED.fullmatch(key)
        if key.startswith("sha256:") and not hashed:
            raise UniLoraError(f"{path}:{number}: a hashed key is sha256: followed by 64 hex digits")
        if len(key) < 8:
            raise UniLoraError(f"{path}:{number}: the key is shorter than 8 characters")
        value = hashed.group(1).lower().encode() if hashed else key.encode()
        if value in seen:
            raise UniLoraError(f"{path}:{number}: this key is given twice")
        seen.add(value)
        entries.append((tenant, value, bool(hashed)))
    if not entries:
        raise UniLoraError(f"--api-keys '{path}' holds no key")
    return entries
