"""load_config: every class of error, with the exact message an operator sees."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.config.errors import ConfigError
from mailgate.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_REPORTED_ERRORS,
    Findings,
    check_config_command,
    config_fields,
    field_types,
    from_data,
    load_config,
    split_host_port,
)
from mailgate.config.schema import Config


def write(tmp_path: Path, text: str | bytes, name: str = "mailgate.toml") -> str:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def errors_of(tmp_path: Path, text: str | bytes) -> list[str]:
    """The error lines for a file, with the tmp directory cut off the file name."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [line.replace(str(tmp_path) + os.sep, "") for line in info.value.errors]


def test_no_file_gives_the_embedded_defaults() -> None:
    assert load_config(None) == Config()


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_values_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [server]
            max_recipients = 250
            tarpit_delay = 2          # an integer is a fine float
            proxy_from = ["10.0.0.0/8", "2001:db8::/32"]
            [[listener]]
            address = "0.0.0.0:25"
            [[listener]]
            address = "[::]:587"
            role = "submission"
            [logging]
            format = "json"
            """,
        )
    )
    assert config.server.max_recipients == 250
    assert config.server.tarpit_delay == 2.0 and isinstance(config.server.tarpit_delay, float)
    assert [listener.address for listener in config.listener] == ["0.0.0.0:25", "[::]:587"]
    assert config.listener[1].role == "submission"
    assert config.logging.format == "json"
    assert config.policy == Config().policy  # sections not named keep their defaults


def test_the_message_names_file_key_and_problem(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[server]\nmax_recipients = "ten"\n') == [
        'mailgate.toml: server.max_recipients: expected an integer, got "ten"'
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nmax_recipients = 1.5", "server.max_recipients: expected an integer, got 1.5"),
        ("[server]\nmax_recipients = true", "server.max_recipients: expected an integer, got true"),
        ('[server]\ntarpit_delay = "1"', 'server.tarpit_delay: expected a number, got "1"'),
        ("[server]\ntarpit_delay = false", "server.tarpit_delay: expected a number, got false"),
        ("[server]\nvrfy = 1", "server.vrfy: expected true or false, got 1"),
        ('[server]\nvrfy = "yes"', 'server.vrfy: expected true or false, got "yes"'),
        ("[server]\nhostname = 42", "server.hostname: expected a string, got 42"),
        ("[server]\nhostname = 1979-05-27", "server.hostname: expected a string, got a date/time"),
        (
            '[server]\nproxy_from = "10.0.0.1"',
            'server.proxy_from: expected an array, got "10.0.0.1"',
        ),
        ("[server]\nproxy_from = [1]", "server.proxy_from[1]: expected a string, got 1"),
        ("server = 3", "server: expected a table, got 3"),
        ("[[server]]", "server: expected a table, got an array"),
        ('listener = {address = "0.0.0.0:25"}', "listener: expected an array, got a table"),
        ("listener = [1]", "listener[1]: expected a table, got 1"),
        (
            '[[listener]]\nrole = "relay"',
            'listener[1].role: expected one of "public", "submission", "smtps", got "relay"',
        ),
        (
            "[logging]\nlevel = 3",
            'logging.level: expected one of "debug", "info", "warning", "error", got 3',
        ),
        (
            '[metrics]\nlatency_buckets = [1, 2, "x"]',
            'metrics.latency_buckets[3]: expected a number, got "x"',
        ),
    ],
)
def test_wrong_types(tmp_path: Path, toml: str, message: str) -> None:
    assert errors_of(tmp_path, toml) == [f"mailgate.toml: {message}"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # each named by its own key (one message named both, and "mbox" twice)
        ("[delivery.destinations.o.mbox]\nstale_lock_age = -1",
         "delivery.destinations.o.mbox.stale_lock_age: must be a positive number of seconds, "
         "not -1.0"),
        ("[delivery.destinations.o.mbox]\nlock_timeout = 0",
         "delivery.destinations.o.mbox.lock_timeout: must be more than 0 seconds, got 0.0"),
        ('[delivery.destinations.o.mbox]\npath = "/var/mail/{usr}"',
         "delivery.destinations.o.mbox.path: only {user} and {domain} may appear, not {usr}"),
        # checked as delivery.local_domains is: a typo would never match a sender
        ('[auth]\nsender_domains = ["example.org.", "EXAMPLE..org"]',
         'auth.sender_domains[2]: "EXAMPLE..org" is not a domain name'),
        # an entry of a list by its number, a value that is empty quoted
        ('[policy]\ndns_servers = ["192.0.2.1", "x"]',
         "policy.dns_servers[2]: not an ip or ip:port: 'x'"),
        ('[policy]\ntrusted_networks = ["10.0.0.0/8", "10.1.2.3/8"]',
         'policy.trusted_networks[2]: "10.1.2.3/8": 10.1.2.3/8 has host bits set'),
        ('[auth]\nmechanisms = ["PLAIN", ""]', 'auth.mechanisms: unknown ""; known: SCRAM'),
        ('[delivery.catch_all]\n"example.org" = ""',
         'delivery.catch_all."example.org": \'\' is not a user name or an address'),
    ],
)
def test_values_are_named_by_their_own_key(tmp_path: Path, toml: str, message: str) -> None:
    [error] = errors_of(tmp_path, toml)
    assert error.startswith(f"mailgate.toml: {message}"), error


@pytest.mark.parametrize("workers", [-1, 65])
def test_workers_out_of_range(tmp_path: Path, workers: int) -> None:
    assert errors_of(tmp_path, f"[server]\nworkers = {workers}\n") == [
        f"mailgate.toml: server.workers: from 0 (one per CPU) to 64, not {workers}"
    ]


def test_workers_in_range(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[server]\nworkers = 0\n")).server.workers == 0
    assert load_config(write(tmp_path, "[server]\nworkers = 64\n")).server.workers == 64


@pytest.mark.parametrize("pause", ["-1", "31"])
def test_greet_pause_out_of_range(tmp_path: Path, pause: str) -> None:
    assert errors_of(tmp_path, f"[server]\ngreet_pause = {pause}\n") == [
        f"mailgate.toml: server.greet_pause: from 0 (off) to 30 seconds, not {float(pause)}"
    ]


@pytest.mark.parametrize(
    ("limit", "message"), [("0", "must be at least 1"), ("-5", "must not be negative, got -5")]
)
def test_hop_limit_below_one(tmp_path: Path, limit: str, message: str) -> None:
    assert errors_of(tmp_path, f"[policy]\nmax_received_headers = {limit}\n") == [
        f"mailgate.toml: policy.max_received_headers: {message}"
    ]


def test_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "[policy]\ntrusted_netwrks = []\n[polcy]\n[server]\nzzz = 1\n") == [
        "mailgate.toml: policy.trusted_netwrks: unknown key (did you mean trusted_networks?)",
        "mailgate.toml: polcy: unknown key (did you mean policy?)",
        "mailgate.toml: server.zzz: unknown key",
    ]


def test_odd_key_names_are_quoted(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[server]\n"a b" = 1\n') == [
        'mailgate.toml: server."a b": unknown key'
    ]


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        '[server]\nmax_errors = "x"\nmax_recipients = "y"\n[[listener]]\naddress = "nowhere"\n',
    )
    assert errors == [
        'mailgate.toml: server.max_errors: expected an integer, got "x"',
        'mailgate.toml: server.max_recipients: expected an integer, got "y"',
        'mailgate.toml: listener[1].address: expected HOST:PORT, got "nowhere"',
    ]


def test_a_flood_of_errors_is_cut_short(tmp_path: Path) -> None:
    text = "[server]\n" + "".join(f"unknown{i} = 1\n" for i in range(MAX_REPORTED_ERRORS + 50))
    errors = errors_of(tmp_path, text)
    assert len(errors) == MAX_REPORTED_ERRORS + 1
    assert errors[-1] == "mailgate.toml: ... and 50 more errors"


# --- the file itself -----------------------------------------------------------------


def test_toml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "[server]\nmax_recipients = \n") == [
        "mailgate.toml: line 2, column 18: invalid value"
    ]
    assert errors_of(tmp_path, "[server]\nproxy_from = [") == [
        "mailgate.toml: end of file: invalid value"
    ]


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.toml"))
    assert str(info.value) == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: not a regular file"


def test_an_unreadable_file() -> None:
    """As an unprivileged user (root reads any file), in a forked child: no exec needed."""
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "mailgate.toml")
        Path(path).write_text("")
        os.chmod(path, 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody, load, report the error text
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                load_config(path)
                os.write(write_end, b"loaded")
            except ConfigError as exc:
                os.write(write_end, str(exc).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(folder)
    assert message == f"{path}: cannot read: Permission denied"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    assert errors_of(tmp_path, b'[server]\nhostname = "caf\xe9"\n') == [
        "mailgate.toml: line 2: not UTF-8 text"
    ]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, b"\xef\xbb\xbf[server]\nvrfy = true\n")).server.vrfy


def test_a_deeply_nested_file(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "x = " + "[" * 100_000) == [
        "mailgate.toml: arrays or tables nested too deeply"
    ]


def test_a_huge_file(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "#" * (MAX_CONFIG_BYTES + 1)) == [
        f"mailgate.toml: file is larger than {MAX_CONFIG_BYTES} bytes"
    ]


# --- checks by field name --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("nowhere", 'expected HOST:PORT, got "nowhere"'),
        ("::1:25", 'an IPv6 address needs brackets, as in [::1]:25; got "::1:25"'),
        ("[::1]25", 'expected [IPv6]:PORT, got "[::1]25"'),
        ("[nope]:25", '"nope" is not an IPv6 address'),
        (":25", 'missing host in ":25" (0.0.0.0 or [::] listen on all addresses)'),
        ("bad_host!:25", '"bad_host!" is not a host name or address'),
        # all-digit last label: meant as IPv4, which it is not (else an unknown name later)
        ("300.1.1.1:25", '"300.1.1.1" is not an IPv4 address'),
        ("10.0.0:25", '"10.0.0" is not an IPv4 address'),
        ("127.0.0.1:65536", 'port must be a number from 0 to 65535, got "65536"'),
        ("127.0.0.1:smtp", 'port must be a number from 0 to 65535, got "smtp"'),
        ("/run/mailgate.sock", 'expected HOST:PORT, got "/run/mailgate.sock"'),
    ],
)
def test_listen_addresses_must_parse(tmp_path: Path, address: str, message: str) -> None:
    assert errors_of(tmp_path, f'[metrics]\nlisten = "{address}"') == [
        f"mailgate.toml: metrics.listen: {message}"
    ]


def test_good_addresses() -> None:
    assert split_host_port("0.0.0.0:25") == ("0.0.0.0", 25)
    assert split_host_port("[::]:587") == ("::", 587)
    assert split_host_port("[2001:db8::1]:465") == ("2001:db8::1", 465)
    assert split_host_port("mx.example.org:2525") == ("mx.example.org", 2525)
    assert split_host_port("localhost:0") == ("localhost", 0)
    assert split_host_port("192.0.2.7:25") == ("192.0.2.7", 25)
    assert split_host_port("mx1.example.org.:25") == ("mx1.example.org.", 25)


def test_a_listener_address_is_checked_too(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[[listener]]\n[[listener]]\naddress = "[::1]"') == [
        'mailgate.toml: listener[2].address: expected [IPv6]:PORT, got "[::1]"'
    ]


def test_two_listeners_on_one_address(tmp_path: Path) -> None:
    text = (
        '[[listener]]\naddress = "0.0.0.0:25"\n'
        '[[listener]]\naddress = "[::]:25"\n'
        '[[listener]]\naddress = "0.0.0.0:25"\nrole = "submission"'
    )
    assert errors_of(tmp_path, text) == [
        "mailgate.toml: listener[3].address: 0.0.0.0:25 overlaps the address of listener[1] "
        "(0.0.0.0:25): both cannot listen"
    ]


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        # the same address written two ways, and a wildcard with an address of its family
        ("[::1]:2525", "[0:0::1]:2525", "overlaps the address of listener[1]"),
        ("127.0.0.1:2525", "0.0.0.0:2525", "overlaps the address of listener[1]"),
        ("[::1]:2525", "[::]:2525", "overlaps the address of listener[1]"),
        # localhost is its loopback addresses
        ("localhost:2525", "127.0.0.1:2525", "overlaps the address of listener[1]"),
        ("[::1]:2525", "localhost:2525", "overlaps the address of listener[1]"),
        # what bind refuses with EINVAL
        ("[::ffff:127.0.0.1]:2525", None, "write the IPv4 address 127.0.0.1"),
        ("[fe80::1]:2525", None, "a link-local address needs its interface"),
    ],
)
def test_listener_addresses_serve_could_not_bind(
    tmp_path: Path, first: str, second: str | None, problem: str
) -> None:
    text = f'[[listener]]\naddress = "{first}"\n'
    if second:
        text += f'[[listener]]\naddress = "{second}"\n'
    [error] = errors_of(tmp_path, text)
    assert problem in error


def test_the_metrics_endpoint_cannot_share_a_listeners_address(tmp_path: Path) -> None:
    # check-config passed it, and serve failed to bind "for metrics: Address already
    # in use", which sent the operator looking for another process
    text = '[[listener]]\naddress = "0.0.0.0:2525"\n[metrics]\nlisten = "127.0.0.1:2525"\n'
    assert errors_of(tmp_path, text) == [
        "mailgate.toml: metrics.listen: 127.0.0.1:2525 overlaps the address of listener[1] "
        "(0.0.0.0:2525): both cannot listen"
    ]
    path = tmp_path / "mailgate.toml"
    path.write_text(
        '[[listener]]\naddress = "127.0.0.1:2525"\n[metrics]\nlisten = "127.0.0.1:9125"'
    )
    assert load_config(str(path)).metrics.listen == "127.0.0.1:9125"


def test_ipv4_and_ipv6_wildcards_share_a_port(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[[listener]]\naddress = "0.0.0.0:25"\n[[listener]]\naddress = "[::]:25"')
    assert len(load_config(str(path)).listener) == 2


def test_listeners_on_port_zero_get_a_free_port_each(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[[listener]]\naddress = "127.0.0.1:0"\n[[listener]]\naddress = "127.0.0.1:0"')
    assert len(load_config(str(path)).listener) == 2


def test_network_lists_must_be_cidr(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, '[server]\nproxy_from = ["10.0.0.0/8", "10.0.0.300/8", "x"]')
    assert errors == [
        'mailgate.toml: server.proxy_from[2]: "10.0.0.300/8" is not an IP address or network '
        "(CIDR)",
        'mailgate.toml: server.proxy_from[3]: "x" is not an IP address or network (CIDR)',
    ]


def test_named_files_must_exist(tmp_path: Path) -> None:
    present = tmp_path / "users"
    present.write_text("")
    missing = tmp_path / "key.pem"
    assert errors_of(
        tmp_path,
        f'[auth]\nusers_file = "{present}"\n[tls]\ncert = "{present}"\nkey = "{missing}"\n',
    ) == ['mailgate.toml: tls.key: cannot use "key.pem": No such file or directory']


def test_files_inside_tables_of_a_list_are_checked(tmp_path: Path) -> None:
    assert errors_of(
        tmp_path, f'[tls]\ncertificates = [{{cert = "{tmp_path}", key = "{tmp_path}"}}]\n'
    ) == [
        f'mailgate.toml: tls.certificates[1].cert: "{tmp_path}" is not a regular file',
        f'mailgate.toml: tls.certificates[1].key: "{tmp_path}" is not a regular file',
    ]


def test_numbers_must_be_finite_and_limits_not_negative(tmp_path: Path) -> None:
    assert errors_of(
        tmp_path, "[server]\ncommand_timeout = nan\ndata_timeout = inf\nmax_errors = -1\n"
    ) == [
        "mailgate.toml: server.command_timeout: expected a finite number, got nan",
        "mailgate.toml: server.data_timeout: expected a finite number, got inf",
        "mailgate.toml: server.max_errors: must not be negative, got -1",
    ]
    # integers of hundreds of digits (tomllib's are unbounded): float() overflowed into
    # a traceback, and a SIZE of 31 digits was advertised (RFC 1870: 20 at most)
    assert errors_of(
        tmp_path, f"[server]\ntarpit_delay = 1{'0' * 400}\nmax_message_size = 1{'0' * 30}\n"
    ) == [
        "mailgate.toml: server.tarpit_delay: expected a finite number, got an integer of 401"
        " digits",
        "mailgate.toml: server.max_message_size: an integer of 31 digits is out of range (at"
        " most 9223372036854775807)",
    ]


# --- __post_init__ and generic shapes, on a schema made for the test ----------------------


@dataclass
class Inner:
    path: str = "x"
    count: int = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.count > 10:
            raise ValueError("inner.count: at most 10")
        if self.count == 7:
            raise ValueError("seven is unlucky")


@dataclass
class Needs:
    command: list[str]
    timeout: float = 60


@dataclass
class Shapes:
    names: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    inners: dict[str, Inner] = field(default_factory=dict)
    maybe: Inner | None = None
    needs: Needs | None = None
    either: list[str] | str = ""
    mode: Literal["a", "b"] | Literal[""] = ""


def shape_errors(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_data(raw, "t.toml", Shapes)
    return info.value.errors


def test_generic_shapes_load() -> None:
    shapes = from_data(
        {
            "names": {"a": "b"},
            "groups": {"g": ["x", "y"]},
            "inners": {"one": {"count": 2}},
            "maybe": {},
            "needs": {"command": ["/bin/true"]},
            "either": "s",
            "mode": "",
        },
        "t.toml",
        Shapes,
    )
    assert shapes.inners["one"] == Inner(count=2)
    assert shapes.maybe == Inner()
    assert shapes.needs == Needs(command=["/bin/true"])
    assert from_data({"either": ["s"]}, "t.toml", Shapes).either == ["s"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"names": ["a"]}, "names: expected a table, got an array"),
        ({"names": {"a": 1}}, "names.a: expected a string, got 1"),
        ({"names": {"a.b": 1}}, 'names."a.b": expected a string, got 1'),
        ({"groups": {"g": "x"}}, 'groups.g: expected an array, got "x"'),
        ({"groups": {"g": ["x", 2]}}, "groups.g[2]: expected a string, got 2"),
        ({"inners": {"one": 3}}, "inners.one: expected a table, got 3"),
        ({"inners": {"one": {"cnt": 3}}}, "inners.one.cnt: unknown key (did you mean count?)"),
        ({"maybe": "x"}, 'maybe: expected a table, got "x"'),
        ({"needs": {}}, "needs.command: required key is missing"),
        ({"either": 3}, "either: expected an array or a string, got 3"),
        # an array of the wrong items: which item (it said "expected an array or a
        # string, got an array")
        ({"either": ["s", 5]}, "either[2]: expected a string, got 5"),
        ({"mode": "c"}, 'mode: expected one of "a", "b", "", got "c"'),
        # ValueError from __post_init__, in each of the forms section files use
        ({"maybe": {"path": ""}}, "maybe.path: must not be empty"),
        ({"inners": {"i": {"count": 11}}}, "inners.i.count: at most 10"),
        ({"maybe": {"count": 11}}, "maybe.count: at most 10"),
        ({"maybe": {"count": 7}}, "maybe: seven is unlucky"),
    ],
)
def test_generic_shape_errors(raw: dict[str, object], message: str) -> None:
    assert shape_errors(raw) == [f"t.toml: {message}"]


def test_post_init_errors_of_the_real_sections(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "[metrics]\nlatency_buckets = [2, 1]\n") == [
        "mailgate.toml: metrics.latency_buckets: bounds must be in increasing order"
    ]


# --- check-config ------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server]\nmax_recipients = 200\n")
    assert check_config_command(path) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{path}: OK\n", "")


def test_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[server]\nmax_recipients = "ten"\nvrfy = 2\n')
    assert check_config_command(path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f'{path}: server.max_recipients: expected an integer, got "ten"\n'
        f"{path}: server.vrfy: expected true or false, got 2\n"
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # serve would refuse it ("expected HOST:PORT"), naming no file or key
        ('[[listener]]\naddress = ""', "listener[1].address: must not be empty"),
        # redis-py would refuse it only when connecting, at start
        ('[greylist]\nredis_url = "redis://127.0.0.1:99999/0"',
         "greylist.redis_url: 'redis://127.0.0.1:99999/0': Port out of range 0-65535"),
        ('[greylist]\nredis_url = "redis://"',
         "greylist.redis_url: 'redis://': no host (or socket path)"),
        # redis-py's own parser refused these only at start; /abc was quietly db 0
        ('[greylist]\nredis_url = "redis://127.0.0.1:6379/0?db=x"',
         "greylist.redis_url: 'redis://127.0.0.1:6379/0?db=x': Invalid value for 'db' in "
         "connection URL."),
        ('[greylist]\nredis_url = "redis://127.0.0.1/abc"',
         "greylist.redis_url: 'redis://127.0.0.1/abc': the database must be a number, as in "
         "redis://127.0.0.1:6379/0"),
        # urllib's own refusal came out without the key ("greylist: Invalid IPv6 URL")
        ('[greylist]\nredis_url = "redis://:Sup3rSecret@[::1/0"',
         "greylist.redis_url: Invalid IPv6 URL"),
        # errors end up in logs: never the password
        ('[greylist]\nredis_url = "redis://:Sup3rSecret@127.0.0.1:700000/0"',
         "greylist.redis_url: 'redis://:***@127.0.0.1:700000/0': Port out of range 0-65535"),
        # a name a HELO is compared with, which a typo would never match
        ('[policy]\nlocal_names = ["[IPv6:zz]"]',
         'policy.local_names[1]: "[IPv6:zz]": not an address literal such as [192.0.2.1] or '
         "[IPv6:2001:db8::1]"),
        # taken as the whole /8 before: a whole network could send PROXY headers
        ('[server]\nproxy_from = ["10.1.2.3/8"]',
         'server.proxy_from[1]: "10.1.2.3/8": 10.1.2.3/8 has host bits set'),
        # a typo for one host would whitelist a whole network
        ('[greylist]\nwhitelist = ["127.0.0.8/8"]',
         'greylist.whitelist[1]: "127.0.0.8/8": 127.0.0.8/8 has host bits set'),
        # a zone DNS cannot hold never says "listed": a blocklist silently doing nothing
        ('[policy]\ndnsbl_zones = ["bl..example"]',
         'policy.dnsbl_zones[1]: "bl..example" is not a domain name (dot-separated labels of '
         'letters, digits and inner hyphens, no trailing dot)'),
        ('[policy]\ndnsbl_zones = ["http://bl.example/"]',
         'policy.dnsbl_zones[1]: "http://bl.example/" is not a domain name (dot-separated labels '
         'of letters, digits and inner hyphens, no trailing dot)'),
    ],
)
def test_what_would_fail_only_later_is_refused_now(
    tmp_path: Path, toml: str, message: str
) -> None:
    assert errors_of(tmp_path, toml) == [f"mailgate.toml: {message}"]


def test_check_config_names_the_file_on_every_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "")

    def found(config: object) -> Findings:
        return Findings(["greylist.sqlite_path: no directory /x", "/etc/users:3: bad"], [])

    assert check_config_command(path, found) == 1
    assert capsys.readouterr().err == (
        f"{path}: greylist.sqlite_path: no directory /x\n/etc/users:3: bad\n"
    )


def test_a_hostile_dotted_key_is_refused_before_tomllib_sees_it(tmp_path: Path) -> None:
    # tomllib spent seconds and GBs on one 40 KB key of 20,000 parts (quadratic)
    deep = "[server]\n" + "x" + ".a" * 20_000 + " = 1\n"
    assert errors_of(tmp_path, deep) == [
        "mailgate.toml: line 2: a key of more than 32 dotted parts"
    ]
    inline = "[server]\nx = {" + "a." * 20_000 + "b = 1}\n"
    assert errors_of(tmp_path, inline) == [
        "mailgate.toml: line 2: a key of more than 32 dotted parts"
    ]
    many = "[server]\n" + "".join(f"k{i}" + ".a" * 30 + " = 1\n" for i in range(400))
    assert errors_of(tmp_path, many) == [
        "mailgate.toml: line 335: more than 10000 dotted key parts in the file"
    ]


def test_dotted_keys_of_a_real_config_pass(tmp_path: Path) -> None:
    text = (
        '[delivery]\ndestinations.box.lmtp.address = "unix:/run/dovecot/lmtp"\n'
        '"quoted.part".x = 1\n'
    )
    assert "dotted" not in " ".join(errors_of(tmp_path, text))


def test_dots_in_values_and_comments_are_no_dotted_keys(tmp_path: Path) -> None:
    # 6,000 aliases of addresses (and networks) were refused as "more than 10000
    # dotted key parts": every example.org in a string counted
    aliases = "".join(f'"list{i}@example.org" = ["u{i}@example.org"]  # a.b.c\n'
                      for i in range(6000))
    networks = ", ".join(['"127.0.0.0/8"'] * 3000)
    text = (f"[policy]\ntrusted_networks = [{networks}]\n"
            f'[delivery]\nlocal_domains = ["example.org"]\n[delivery.aliases]\n{aliases}')
    config = load_config(write(tmp_path, text))
    assert len(config.delivery.aliases) == 6000
    # still counted where a key can be, in a string's company
    hidden = "[server]\n" + "".join(f'k{i}' + ".a" * 30 + ' = "x.y"\n' for i in range(400))
    assert errors_of(tmp_path, hidden) == [
        "mailgate.toml: line 335: more than 10000 dotted key parts in the file"
    ]
    # an escaped quote inside a multi-line string does not end it early (which hid
    # every key up to the next such string)
    keys = hidden.removeprefix("[server]\n")
    escaped = '[server]\nx = """a \\""" b"""\n' + keys + 'y = """z"""\n'
    assert errors_of(tmp_path, escaped) == [
        "mailgate.toml: line 336: more than 10000 dotted key parts in the file"
    ]


def test_check_config_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_command("/nonexistent/mailgate.toml") == 1
    assert capsys.readouterr().err == (
        "/nonexistent/mailgate.toml: cannot read: No such file or directory\n"
    )


# --- fuzzing -----------------------------------------------------------------------------

SECTION_KEYS = {
    name: [f.name for f in config_fields(field_types(Config)[name])]
    for name in ("server", "tls", "auth", "policy", "greylist", "delivery", "logging", "metrics")
}
TOML_VALUES = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.datetimes(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def config_data(draw: st.DrawFn) -> dict[str, object]:
    raw: dict[str, object] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=3)):
        keys = st.sampled_from(SECTION_KEYS[section]) | st.text(max_size=8)
        raw[section] = draw(st.dictionaries(keys, TOML_VALUES, max_size=4))
    if draw(st.booleans()):
        raw["listener"] = draw(st.lists(st.dictionaries(st.sampled_from(
            ["address", "role", "require_tls", "proxy_protocol"]), TOML_VALUES, max_size=3),
            max_size=2))  # fmt: skip
    return raw


@given(config_data())
def test_any_data_gives_a_config_or_a_config_error(raw: dict[str, object]) -> None:
    try:
        config = from_data(raw, "f.toml")
    except ConfigError as exc:
        assert exc.errors and all(line.startswith("f.toml: ") for line in exc.errors)
        assert all("\n" not in line for line in exc.errors)
    else:
        assert isinstance(config, Config)


@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8", errors="replace") as f:
        f.write(text)
        f.flush()
        try:
            load_config(f.name)
        except ConfigError as exc:
            assert exc.errors


@pytest.mark.parametrize(
    "name",
    ["mx example.org", "mx.example.org.", "mx.example.org\\r\\n250 x", "-mx.example.org",
     "mx_1.example.org", "a" * 64 + ".example.org", "mx..example.org", "mx.exämple.org"],
)
def test_the_server_name_must_be_a_domain(tmp_path: Path, name: str) -> None:
    # it is the greeting's and EHLO's first word and Received:'s "by"
    [line] = errors_of(tmp_path, f'[server]\nhostname = "{name}"')
    assert line.startswith("mailgate.toml: server.hostname: ")
    assert line.endswith("is not a domain name (dot-separated labels of letters, digits "
                         "and inner hyphens, no trailing dot)")


def test_good_server_names(tmp_path: Path) -> None:
    for name in ("mx", "mx1.example.org", "MX-2.Example.ORG", "a" * 63 + ".example.org"):
        path = tmp_path / "mailgate.toml"
        path.write_text(f'[server]\nhostname = "{name}"')
        assert load_config(str(path)).server.hostname == name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_message_size = 0",
         "at least 65536 octets (RFC 5321 4.5.3.1.7: 64K must be accepted), not 0"),
        ("max_recipients = 99", "at least 100 (RFC 5321 4.5.3.1.8: 100 must be accepted), not 99"),
        ("max_errors = 0", "at least 1, not 0"),
        ("max_connections = 0", "at least 1, not 0"),
        ("max_connections_per_ip = 0", "at least 1, not 0"),
        ("command_timeout = 0", "must be more than 0 seconds, got 0.0"),
        ("data_timeout = -1.5", "must be more than 0 seconds, got -1.5"),
    ],
)
def test_limits_that_would_stop_all_mail(tmp_path: Path, setting: str, message: str) -> None:
    # SIZE 0 would even announce "no limit" while refusing every message
    key = setting.split(" = ")[0]
    assert errors_of(tmp_path, f"[server]\n{setting}") == [
        f"mailgate.toml: server.{key}: {message}"
    ]


@pytest.mark.parametrize(
    ("section", "key"),
    [("policy", "dns_timeout"), ("greylist", "redis_timeout"), ("mbox", "lock_timeout")],
)
def test_every_timeout_is_more_than_zero(tmp_path: Path, section: str, key: str) -> None:
    # 0 would not mean "no timeout": every lookup or call would fail at once
    table = "delivery.destinations.box.mbox" if section == "mbox" else section
    [line] = errors_of(tmp_path, f"[{table}]\n{key} = 0")
    assert line == f"mailgate.toml: {table}.{key}: must be more than 0 seconds, got 0.0"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[delivery]\nlocal_domains = ["example.org", "exa mple.org"]',
         'delivery.local_domains[2]: "exa mple.org" is not a domain name'),
        ('[delivery.domains]\n"lists_example.org" = "local"',
         'delivery.domains."lists_example.org": "lists_example.org" is not a domain name'),
        ('[delivery]\nlocal_domains = ["bü cher.example"]',
         'delivery.local_domains[1]: "bü cher.example" is not a domain name'),
    ],
)
def test_local_domains_must_be_domains(tmp_path: Path, text: str, line: str) -> None:
    # a typo would never match a recipient, and the domain's mail would be refused
    [error] = errors_of(tmp_path, text)
    assert error.startswith(f"mailgate.toml: {line} (")


def test_a_very_long_name_is_shown_cut(tmp_path: Path) -> None:
    # a 4 MB local domain made a 4 MB error line
    [error] = errors_of(tmp_path, f'[delivery]\nlocal_domains = ["{"x y" * 100_000}"]')
    assert len(error) < 300 and '"x yx y' in error and '..." is not a domain name' in error


def test_an_empty_maildir_root_or_spool_dir_is_refused(tmp_path: Path) -> None:
    # it stored mail in whatever directory the server was started in
    [error] = errors_of(tmp_path, '[delivery]\nmaildir_root = ""')
    assert error == "mailgate.toml: delivery.maildir_root: must not be empty"
    # check-config passed it, and serve could not start ("spool_dir : No such file")
    [error] = errors_of(tmp_path, '[server]\nspool_dir = ""')
    assert error == "mailgate.toml: server.spool_dir: must not be empty"


def test_an_internationalized_local_domain_is_a_domain(tmp_path: Path) -> None:
    # SMTPUTF8 mail (RFC 6531) may name a domain in U-labels
    path = tmp_path / "mailgate.toml"
    path.write_text('[delivery]\nlocal_domains = ["bücher.example", "example.org"]')
    assert load_config(str(path)).delivery.local_domains == ["bücher.example", "example.org"]


@pytest.mark.parametrize(
    ("listener", "line"),
    [
        ('role = "smtps"', "listener[2].role: smtps needs [tls] cert and key"),
        ('role = "submission"\nrequire_tls = true',
         "listener[2].require_tls: STARTTLS needs [tls] cert and key"),
    ],
)
def test_listeners_that_need_a_certificate(tmp_path: Path, listener: str, line: str) -> None:
    # without one they could never take mail, though serve started (require_tls) or
    # check-config passed (smtps)
    text = (
        '[[listener]]\naddress = "127.0.0.1:25"\n'
        f'[[listener]]\naddress = "127.0.0.1:587"\n{listener}'
    )
    assert errors_of(tmp_path, text) == [f"mailgate.toml: {line}"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listener = []\n", "listener: at least one [[listener]]"),
        ('[[listener]]\naddress = "unix:/run/x.sock"\n',
         "listener[1].address: HOST:PORT, not a Unix socket"),
        ('[[listener]]\naddress = "/run/x.sock"\n',
         "listener[1].address: HOST:PORT, not a Unix socket"),
        ('[[listener]]\naddress = "127.0.0.1:2526"\nproxy_protocol = true\n',
         "listener[1].proxy_protocol: needs server.proxy_from"),
        ('[[listener]]\naddress = "127.0.0.1:2526"\nrole = "submission"\n'
         '[auth]\nusers_file = "/etc/passwd"\nmechanisms = []\n',
         "listener[1].role: submission requires AUTH, and auth.mechanisms is empty"),
        ('[delivery]\nrelay = "out"\n[delivery.destinations.out.smtp]\nhost = ""\n',
         "delivery.destinations.out.smtp.host: must not be empty"),
        ('[delivery]\nrelay = "out"\n[delivery.destinations.out.smtp]\nhost = "h.example"\n'
         "port = 99999\n", "delivery.destinations.out.smtp.port: must be from 1 to 65535"),
        ('[delivery]\nrelay = "out"\n[delivery.destinations.out.smtp]\nhost = "h.example"\n'
         'username = "u"\n', "delivery.destinations.out.smtp.username: AUTH needs password_file"),
        # malformed names and targets passed, and their mail was refused for good
        ('[delivery.aliases]\nbad = ["a b c"]\n',
         "delivery.aliases.bad: 'a b c' is not a user name or an address"),
        ('[delivery.aliases]\nbad = ["@@"]\n', "delivery.aliases.bad: '@@' is not a user"),
        ('[delivery]\nlocal_domains = ["c.example"]\n[delivery.catch_all]\n'
         '"c.example" = "x@@"\n', "delivery.catch_all.\"c.example\": 'x@@' is not a user"),
        ('[delivery]\nlocal_users = ["a b"]\n', "delivery.local_users[1]: 'a b' is not a user"),
        ('[delivery.users]\n"x@not a domain" = "local"\n',
         "delivery.users.\"x@not a domain\": 'x@not a domain': "),
        # a NUL in a path: a traceback (embedded null byte), or an error naming no key
        ('[server]\nspool_dir = "sp\\u0000ool"\n', "server.spool_dir: must not contain a NUL"),
        ('[policy]\naccess_file = "/etc/a\\u0000b"\n',
         "policy.access_file: must not contain a NUL"),
    ],
)
def test_settings_that_could_take_no_mail_are_refused(
    tmp_path: Path, text: str, error: str
) -> None:
    # check-config said OK to these; serve then failed, or every message got a 451
    [line] = errors_of(tmp_path, text)
    assert line.startswith(f"mailgate.toml: {error}"), line


def test_a_fifo_or_a_blocking_proc_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(fifo))  # (no writer: opening it blocked before)
    if not os.access("/proc/kmsg", os.R_OK):
        pytest.skip("/proc/kmsg is not readable here (root only)")
    # procfs says "regular file, size 0", and a read waits for the next kernel message
    kmsg = tmp_path / "kmsg.toml"
    kmsg.symlink_to("/proc/kmsg")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(kmsg))
