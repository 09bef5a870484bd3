"""Secrets out of what llmpipe prints, logs and records: a URL's password and its token-like query values.

`MLFLOW_TRACKING_URI=https://user:password@host` is how MLflow users often give credentials; what
llmpipe shows of such a URI (the terminal, errors, files) reads `https://user:***@host`.
"""

from __future__ import annotations

import re

# scheme://user:password@  (the password is anything up to the @ that ends the authority)
_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^/\s@]+)(?=@)")
# ?token=...&api_key=...  (names that carry credentials by convention)
_QUERY = re.compile(r"(?P<head>[?&](?:access_token|api[_-]?key|auth|key|password|passwd|secret|sig|signature|"
                    r"token|x-amz-signature|x-amz-credential|x-goog-signature)=)(?P<secret>[^&#\s\"']+)", re.IGNORECASE)
MASK = "***"


def redact(text: str) -> str:
    """`text` with every URL password and credential-like query value replaced by `***`."""
    return _QUERY.sub(rf"\g<head>{MASK}", _PASSWORD.sub(rf"\g<head>{MASK}", text))


def has_secret(url: str) -> bool:
    return redact(url) != url
