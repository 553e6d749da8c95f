"""The transport policy: plain transport only on the loopback interface, by class of host."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmsd import transport
from rmsd.errors import RmsdError


@pytest.mark.parametrize("host", ["127.0.0.1", "127.6.0.10", "::1", "[::1]", "localhost", "LOCALHOST.", "a.localhost",
                                  ""])
def test_loopback_hosts(host):
    assert transport.is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.1", "rms.corp.example", "localhost.corp.example",
                                  "::ffff:10.0.0.1", "0.0.0.0", "127.0.0.1.nip.io"])
def test_other_hosts(host):
    assert not transport.is_loopback(host)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.ip_addresses())
def test_any_address_is_loopback_exactly_when_ipaddress_says_so(address):
    host = f"[{address}]" if address.version == 6 else str(address)
    assert transport.is_loopback(host) == ipaddress.ip_address(address).is_loopback


def test_plain_http_off_loopback_is_refused_with_the_setting_named():
    with pytest.raises(RmsdError, match="identity_jwks_uri uses plain http to idp.example"):
        transport.refuse_clear_url("http://idp.example/jwks", "the issuer's keys", "identity_jwks_uri")
    transport.refuse_clear_url("http://127.0.0.1:8080/jwks", "the issuer's keys", "identity_jwks_uri")
    transport.refuse_clear_url("https://idp.example/jwks", "the issuer's keys", "identity_jwks_uri")
    with pytest.raises(RmsdError, match="scheme 'ftp' is not supported"):
        transport.refuse_clear_url("ftp://idp.example/jwks", "the issuer's keys", "identity_jwks_uri")
