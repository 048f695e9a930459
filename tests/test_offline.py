"""`tests/conftest.py` keeps every test offline: a connection off this machine raises at once."""

import socket

import pytest


def test_the_suite_cannot_reach_the_network():
    with pytest.raises(OSError, match="the test suite runs offline"):
        socket.create_connection(("8.8.8.8", 443), timeout=2)
