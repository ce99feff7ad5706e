"""The crawler's fetch policy: internal addresses, schemes, redirects and body size."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from curation.errors import classify
from curation.fetch import FetchPolicy, FetchRefused, build_opener, check_address

ALLOW_LOOPBACK = FetchPolicy(allowed_networks=("127.0.0.1/32",))


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "224.0.0.1",
     "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1"],
)  # fmt: skip
def test_internal_addresses_are_blocked_by_default(address):
    with pytest.raises(FetchRefused) as err:
        check_address(address, FetchPolicy())
    assert err.value.error_class == "blocked_address"


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111"])
def test_public_addresses_pass(address):
    check_address(address, FetchPolicy())  # checking an address literal sends no traffic


def test_allow_list_opens_only_the_named_network():
    check_address("127.0.0.1", ALLOW_LOOPBACK)
    with pytest.raises(FetchRefused):
        check_address("127.0.0.2", ALLOW_LOOPBACK)


def test_bad_allow_list_entry_says_what_is_expected():
    with pytest.raises(ValueError, match="CIDR"):
        FetchPolicy(allowed_networks=("not-a-network",))


def _fetch(url: str, policy: FetchPolicy) -> bytes:
    with build_opener(policy).open(url, timeout=5) as response:
        return response.read()


def _error_class(url: str, policy: FetchPolicy) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 - the class is what matters
        _fetch(url, policy)
    return classify(str(err.value))[0]


def test_loopback_server_is_refused_without_the_allow_flag(demo_server):
    assert _error_class(f"{demo_server.base_url}/img/00000.jpg", FetchPolicy()) == "blocked_address"


def test_allowed_server_is_fetched(demo_server):
    assert _fetch(f"{demo_server.base_url}/img/00000.jpg", ALLOW_LOOPBACK)[:2] == b"\xff\xd8"


def test_redirect_to_an_internal_address_is_refused(demo_server):
    url = f"{demo_server.base_url}/redirect?to=http://127.0.0.2:{demo_server.port}/img/00000.jpg"
    assert _error_class(url, ALLOW_LOOPBACK) == "blocked_address"


def test_redirect_to_another_scheme_is_refused(demo_server):
    url = f"{demo_server.base_url}/redirect?to=file:///etc/hostname"
    assert _error_class(url, ALLOW_LOOPBACK) == "unsupported_scheme"


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/x.jpg", "data:text/plain,hello"])
def test_only_http_and_https_are_fetched(url):
    assert _error_class(url, ALLOW_LOOPBACK) == "unsupported_scheme"


@pytest.mark.parametrize("kind", ["declared", "streamed"])
def test_body_over_the_limit_is_refused(demo_server, kind):
    policy = FetchPolicy(max_bytes=1_000_000, allowed_networks=("127.0.0.1/32",))
    assert _error_class(f"{demo_server.base_url}/large/{kind}/0.jpg", policy) == "too_large"


def test_redirect_loop_is_classified(demo_server):
    assert _error_class(f"{demo_server.base_url}/loop/a/0", ALLOW_LOOPBACK) == "redirect_loop"


def test_install_routes_urlopen_through_the_policy(demo_server):
    from curation import fetch

    fetch.install(FetchPolicy())
    try:
        with pytest.raises(urllib.error.URLError, match="blocked_address"):
            urllib.request.urlopen(f"{demo_server.base_url}/img/00000.jpg", timeout=5)
    finally:
        urllib.request.install_opener(None)
