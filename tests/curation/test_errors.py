"""Failure messages map to error classes a user can count and retry by."""

from __future__ import annotations

import pytest

from curation.errors import classify


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
         "The last 30x error message was:\nFound", "redirect_loop"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("<urlopen error dns_failure: cannot resolve x.invalid: Name or service not known>", "dns_failure"),
        ("<urlopen error timed out>", "timeout"),
        ("timed out", "timeout"),
        ("<urlopen error blocked_address: 10.0.0.1 is a loopback, private, ...>", "blocked_address"),
        ("too_large: body exceeds the limit of 10 bytes", "too_large"),
        ("Use of image disallowed by X-Robots-Tag directive", "robots_disallowed"),
        ("Remote end closed connection without response", "connection_error"),
        ("something nobody planned for", "other"),
    ],
)  # fmt: skip
def test_classify(message, expected):
    assert classify(message)[0] == expected


def test_own_classes_lose_the_urllib_wrapper():
    assert classify("<urlopen error blocked_address: 10.0.0.1 is internal>") == (
        "blocked_address",
        "10.0.0.1 is internal",
    )
