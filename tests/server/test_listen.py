"""Listening sockets bound before the event loop starts."""

from __future__ import annotations

import socket

import pytest

from mailgate.server.listen import bind_listener


def test_binds_and_listens() -> None:
    (sock,) = bind_listener("127.0.0.1:0")
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port), timeout=5):
            pass  # the kernel completed the handshake: it listens
    finally:
        sock.close()


def test_a_taken_port_names_the_address() -> None:
    (first,) = bind_listener("127.0.0.1:0")
    port = first.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listener(f"127.0.0.1:{port}")
    finally:
        first.close()


def test_ipv6_socket_takes_only_ipv6() -> None:
    try:
        (sock,) = bind_listener("[::1]:0")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


def test_a_name_that_does_not_resolve_names_the_listener() -> None:
    # getaddrinfo's own error says only "Name or service not known": which listener?
    with pytest.raises(OSError, match=r"cannot listen on no-such-host\.invalid:2525: "):
        bind_listener("no-such-host.invalid:2525")
