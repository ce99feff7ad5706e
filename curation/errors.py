"""Error classes of failed downloads, so failures can be counted, queried and retried by kind.

img2dataset keeps only the message of a failed download (``str(exception)``), so every error this
project raises puts its class first (``"blocked_address: ..."``); the standard library's messages
are recognised by pattern. The full list is documented in docs/manifests.md.
"""

from __future__ import annotations

import re

ERROR_CLASSES = (
    "http_<status>",  # http_404, http_500, ... one class per HTTP status code
    "redirect_loop",
    "connection_refused",
    "connection_error",
    "dns_failure",
    "timeout",
    "ssl_error",
    "blocked_address",
    "unsupported_scheme",
    "robots_disallowed",
    "too_large",
    "empty_body",
    "not_an_image",
    "unsupported_format",
    "undecodable_image",
    "truncated_image",
    "too_many_pixels",
    "hash_mismatch",
    "other",
)

_OWN_CLASS = re.compile(
    r"\b(blocked_address|dns_failure|unsupported_scheme|too_large|empty_body|not_an_image|"
    r"unsupported_format|undecodable_image|truncated_image|too_many_pixels): ?(.*)",
    re.DOTALL,
)
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
# urllib reports these redirect failures as HTTP errors carrying the 30x status: check them first.
_REDIRECT_FAILURES = (
    (re.compile(r"infinite loop", re.I), "redirect_loop"),
    (re.compile(r"Redirection to url .* is not allowed", re.I), "unsupported_scheme"),
)
_PATTERNS = (
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename nor servname", re.I), "dns_failure"),
    (re.compile(r"SSL|CERTIFICATE", re.I), "ssl_error"),
    (re.compile(r"X-Robots-Tag", re.I), "robots_disallowed"),
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
    (re.compile(r"unknown url type", re.I), "unsupported_scheme"),
    (
        re.compile(r"Connection reset|Remote end closed|IncompleteRead|BadStatusLine|Broken pipe", re.I),
        "connection_error",
    ),
)

class DecodeError(ValueError):
    """A downloaded body that cannot become a stored image."""

    def __init__(self, error_class: str, detail: str):
        super().__init__(f"{error_class}: {detail}")
        self.error_class = error_class


def classify(message: str) -> tuple[str, str]:
    """Map a failure message to ``(error_class, clean_message)``."""
    for pattern, error_class in _REDIRECT_FAILURES:
        if pattern.search(message):
            return error_class, message.splitlines()[0]
    own = _OWN_CLASS.search(message)
    if own:
        return own.group(1), own.group(2).rstrip(">").strip()
    status = _HTTP_STATUS.search(message)
    if status:
        return f"http_{status.group(1)}", message
    for pattern, error_class in _PATTERNS:
        if pattern.search(message):
            return error_class, message
    return "other", message
