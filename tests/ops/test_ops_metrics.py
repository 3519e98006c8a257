"""Metrics: updated by the server's calls, scraped over HTTP on loopback like Prometheus."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgate.config.ops import MetricsConfig
from mailgate.ops.metrics import FLUSH_DELAY, Metrics, NullMetrics, bind_metrics


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics(latency_buckets=[0.1, 1.0, 10.0])
    m.start(bind_metrics("127.0.0.1:0"))
    yield m
    m.stop()


def scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) → value."""
    assert m.bound_address is not None
    host, port = m.bound_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_connections(metrics: Metrics) -> None:
    metrics.connection_opened("0.0.0.0:25")
    metrics.connection_opened("0.0.0.0:25")
    metrics.connection_opened("[::]:587")
    metrics.connection_closed("0.0.0.0:25")
    samples = scrape(metrics)
    assert samples["mailgate_connections_open", (("listener", "0.0.0.0:25"),)] == 1
    assert samples["mailgate_connections_open", (("listener", "[::]:587"),)] == 1
    assert samples["mailgate_connections_total", (("listener", "0.0.0.0:25"),)] == 2


def test_messages_bytes_and_replies(metrics: Metrics) -> None:
    metrics.message("accepted", 250, "2.0.0", 1000)
    metrics.message("accepted", 250, "2.0.0", 500)
    metrics.message("refused", 554, "5.7.1", 200)
    metrics.message("tempfail", 451, None, 0)
    metrics.replies((2, 0, 0, 1))
    samples = scrape(metrics)
    key = "mailgate_messages_total"
    assert samples[key, (("code", "250"), ("enhanced", "2.0.0"), ("outcome", "accepted"))] == 2
    assert samples[key, (("code", "554"), ("enhanced", "5.7.1"), ("outcome", "refused"))] == 1
    assert samples[key, (("code", "451"), ("enhanced", ""), ("outcome", "tempfail"))] == 1
    assert samples["mailgate_received_bytes_total", ()] == 1700
    assert samples["mailgate_replies_total", (("class", "2xx"),)] == 2
    assert samples["mailgate_replies_total", (("class", "5xx"),)] == 1


def test_latency_tls_auth_and_rejections(metrics: Metrics) -> None:
    metrics.delivery_latency(0.05)
    metrics.delivery_latency(5.0)
    metrics.tls("ok", "TLSv1.3")
    metrics.tls("failed", None)
    metrics.auth("plain", "ok")
    metrics.auth("SCRAM-SHA-256", "failed")
    metrics.rejection("dnsbl")
    metrics.rejection("dnsbl")
    metrics.greylist("new")
    metrics.greylist("error")
    metrics.greylist("made-up")
    samples = scrape(metrics)
    assert samples["mailgate_greylist_total", (("outcome", "new"),)] == 1
    assert samples["mailgate_greylist_total", (("outcome", "error"),)] == 1
    assert samples["mailgate_greylist_total", (("outcome", "other"),)] == 1
    bucket = "mailgate_delivery_latency_seconds_bucket"
    assert samples[bucket, (("le", "0.1"),)] == 1
    assert samples[bucket, (("le", "10.0"),)] == 2
    assert samples["mailgate_delivery_latency_seconds_count", ()] == 2
    tls = "mailgate_tls_handshakes_total"
    assert samples[tls, (("outcome", "ok"), ("version", "TLSv1.3"))] == 1
    assert samples[tls, (("outcome", "failed"), ("version", "other"))] == 1
    assert samples["mailgate_auth_total", (("mechanism", "PLAIN"), ("outcome", "ok"))] == 1
    assert (
        samples["mailgate_auth_total", (("mechanism", "SCRAM-SHA-256"), ("outcome", "failed"))] == 1
    )
    assert samples["mailgate_rejections_total", (("reason", "dnsbl"),)] == 2


def test_client_chosen_values_cannot_grow_the_series(metrics: Metrics) -> None:
    for i in range(50):
        metrics.auth(f"X-MECH-{i}", "failed")
        metrics.message("accepted", 250, f"junk{i}", 1)
    samples = scrape(metrics)
    assert samples["mailgate_auth_total", (("mechanism", "other"), ("outcome", "failed"))] == 50
    auth_series = [k for k in samples if k[0] == "mailgate_auth_total"]
    assert len(auth_series) == 1
    key = ("code", "250"), ("enhanced", ""), ("outcome", "accepted")
    assert samples["mailgate_messages_total", key] == 50


def test_updates_in_the_event_loop_are_applied_together(metrics: Metrics) -> None:
    key = ("code", "250"), ("enhanced", "2.0.0"), ("outcome", "accepted")

    async def main() -> None:
        for _ in range(100):
            metrics.message("accepted", 250, "2.0.0", 10)
        metrics.connection_opened("l")
        metrics.connection_closed("l")
        metrics.connection_opened("l")
        metrics.delivery_latency(0.05)
        assert ("mailgate_messages_total", key) not in scrape(metrics)  # not yet
        await asyncio.sleep(FLUSH_DELAY + 0.3)

    asyncio.run(main())
    samples = scrape(metrics)
    assert samples["mailgate_messages_total", key] == 100
    assert samples["mailgate_received_bytes_total", ()] == 1000
    assert samples["mailgate_connections_open", (("listener", "l"),)] == 1
    assert samples["mailgate_connections_total", (("listener", "l"),)] == 2
    assert samples["mailgate_delivery_latency_seconds_count", ()] == 1


def test_a_flush_applies_what_is_still_waiting(metrics: Metrics) -> None:
    async def main() -> None:
        metrics.rejection("dnsbl")
        metrics.flush()  # what a shutdown does before the process ends

    asyncio.run(main())
    assert metrics.registry.get_sample_value("mailgate_rejections_total", {"reason": "dnsbl"}) == 1


def test_updates_that_cannot_be_applied_wait_for_the_next_flush(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With workers a series' first update opens a file: out of descriptors, the batch
    # was dropped, its connections' +1s lost and their -1s applied later (an open
    # connections gauge below zero for good).
    gauge = metrics._open
    real = gauge.labels
    failures = iter([OSError(24, "Too many open files")])

    def labels(*values: str) -> object:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(*values)

    monkeypatch.setattr(gauge, "labels", labels)

    async def main() -> None:
        metrics.connection_opened("l")
        metrics.delivery_latency(0.05)
        metrics.flush()  # fails on the gauge: everything stays
        metrics.connection_closed("l")
        metrics.connection_opened("l")
        metrics.flush()

    asyncio.run(main())
    samples = scrape(metrics)
    assert samples["mailgate_connections_open", (("listener", "l"),)] == 1
    assert samples["mailgate_connections_total", (("listener", "l"),)] == 2
    assert samples["mailgate_delivery_latency_seconds_count", ()] == 1


def test_two_instances_do_not_share_counts() -> None:
    a, b = Metrics(), Metrics()
    a.rejection("x")
    assert a.registry.get_sample_value("mailgate_rejections_total", {"reason": "x"}) == 1
    assert b.registry.get_sample_value("mailgate_rejections_total", {"reason": "x"}) is None


def test_ipv6_loopback_endpoint() -> None:
    m = Metrics()
    m.start(bind_metrics("[::1]:0"))
    try:
        m.replies((1, 0, 0, 0))
        assert m.bound_address is not None and m.bound_address[0] == "::1"
        assert scrape_v6(m) > 0
    finally:
        m.stop()


def scrape_v6(m: Metrics) -> int:
    assert m.bound_address is not None
    url = f"http://[::1]:{m.bound_address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().count(b"mailgate_replies_total")


def test_stop_closes_the_endpoint(metrics: Metrics) -> None:
    assert metrics.bound_address is not None
    host, port = metrics.bound_address
    metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5)


def test_a_bad_address_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        bind_metrics("9125")


def test_disabled_metrics_do_nothing() -> None:
    off = Metrics.from_config(MetricsConfig())
    assert isinstance(off, NullMetrics)
    unused = bind_metrics("127.0.0.1:0")
    off.start(unused)
    unused.close()
    off.connection_opened("x")
    off.connection_closed("x")
    off.message("accepted", 250, "2.0.0", 10)
    off.delivery_latency(1.0)
    off.tls("ok", "TLSv1.3")
    off.auth("PLAIN", "ok")
    off.rejection("x")
    off.replies((1, 0, 0, 0))
    off.stop()
    assert off.bound_address is None
    assert list(off.registry.collect()) == []


def test_enabled_from_config() -> None:
    on = Metrics.from_config(MetricsConfig(listen="127.0.0.1:9125", latency_buckets=[1.0, 2.0]))
    assert type(on) is Metrics
    on.delivery_latency(1.5)
    assert (
        on.registry.get_sample_value("mailgate_delivery_latency_seconds_bucket", {"le": "2.0"}) == 1
    )


def test_only_the_metrics_path_is_served(metrics: Metrics) -> None:
    # a scraper pointed at a wrong path must see an error, not the metrics
    assert metrics.bound_address is not None
    host, port = metrics.bound_address
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics/extra", timeout=5)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200


def test_an_address_in_use_is_named_as_the_metrics_address() -> None:
    import socket

    from mailgate.ops.metrics import bind_metrics

    with socket.create_server(("127.0.0.1", 0)) as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"^.*cannot listen on {listen} for metrics: "
                                          "Address already in use$"):
            bind_metrics(listen)


def test_a_scraper_that_resets_its_connection_leaves_no_traceback(
    metrics: Metrics, capfd: pytest.CaptureFixture[str]
) -> None:
    # socketserver's default handle_error printed a 25-line traceback to stderr
    assert metrics.bound_address is not None
    with socket.create_connection(metrics.bound_address[:2], timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.3)
    scrape(metrics)  # still serving
    assert "Traceback" not in capfd.readouterr().err


def test_a_connection_that_sends_nothing_is_let_go(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # each connection holds a thread: idle ones held theirs for ever
    from mailgate.ops import metrics as module

    assert module._QuietHandler.timeout is not None  # (socketserver's default: none)
    monkeypatch.setattr(module._QuietHandler, "timeout", 0.3)  # shortened for the test
    assert metrics.bound_address is not None
    with socket.create_connection(metrics.bound_address[:2], timeout=5) as sock:
        assert sock.recv(1024) == b""  # closed by the server, not by us
    scrape(metrics)  # still serving
    assert "Traceback" not in capfd.readouterr().err
