"""``mailgate`` command line: serve, check-config, passwd, version."""

from __future__ import annotations

import argparse
import sys

from mailgate import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="mailgate: a strict, fast ESMTP server descended from Plan 9's upas smtpd",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server in the foreground (logs to stderr)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", action="append", default=[],
        help="listen here instead of the configured listeners (repeatable)",
    )
    serve.add_argument("--hostname", help="this server's name (greeting, Received)")
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", metavar="FILE")
    passwd = sub.add_parser("passwd", help="add a user or change a password in the users file")
    passwd.add_argument("user", metavar="USER")
    passwd.add_argument("--config", metavar="FILE", help="take auth.users_file from this config")
    passwd.add_argument("--users-file", metavar="FILE", help="the users file to change")
    passwd.add_argument("--cram", action="store_true",
                        help="also store the password-equivalent CRAM-MD5 secret")
    passwd.add_argument("--stdin", action="store_true",
                        help="read the password from one line of standard input")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"mailgate {__version__}")
        return 0
    if args.command == "check-config":
        from mailgate.app import check_parts
        from mailgate.config.loader import check_config_command

        return check_config_command(args.file, check_parts)
    if args.command == "passwd":
        return _passwd(args)
    if args.command == "serve":
        return _serve(args)
    _parser().print_help()
    return 2


def _load(path: str | None, absent_ok: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    from mailgate.config.errors import ConfigError
    from mailgate.config.loader import load_config

    try:
        return load_config(path, absent_ok)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from mailgate.app import Overrides, apply_overrides, run
    from mailgate.config.errors import ConfigError
    from mailgate.config.loader import naming_file
    from mailgate.config.names import domain_problem
    from mailgate.delivery.factory import DeliveryConfigError

    problem = domain_problem(args.hostname) if args.hostname is not None else None
    if problem:
        print(f"mailgate: --hostname: {problem}", file=sys.stderr)
        return 2
    config = _load(args.config)
    if config is None:
        return 2
    overrides = Overrides(listen=args.listen, hostname=args.hostname)
    try:
        apply_overrides(config, overrides)
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    _start_clean()
    try:
        return run(config, args.config, overrides)
    except (ConfigError, DeliveryConfigError, ValueError) as exc:
        return _fatal(config.logging.format, naming_file(args.config, str(exc)), 2)
    except OSError as exc:
        return _fatal(config.logging.format, f"cannot start: {exc}", 1)
    except KeyboardInterrupt:
        return 0


def _start_clean() -> None:
    """What a daemon sets before it opens anything: files it makes without a mode of
    their own (the greylist database, parent directories) readable by its group at
    most, and no descriptor it inherited (an open /etc/shadow of whoever started it)
    passed on to the mailers it runs (uvloop's subprocesses keep inherited ones)."""
    import contextlib
    import os

    os.umask(0o027)
    try:
        inherited = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing to go by
        return
    for fd in inherited:
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own, closed meanwhile)
                os.set_inheritable(fd, False)


def _fatal(log_format: str, message: str, status: int) -> int:
    """Why the server cannot run, on stderr: a JSON line where the log is JSON (a
    reader of it must be able to parse every line), else the plain sentence."""
    if log_format == "json":
        from mailgate.ops.logging import flush_logs, log_event

        log_event("start_failed", level="error", error=message)
        flush_logs()
    else:
        print(f"mailgate: {message}", file=sys.stderr)
    return status


def _passwd(args: argparse.Namespace) -> int:
    from mailgate.app import run_as
    from mailgate.auth.passwd import passwd_command
    from mailgate.config.errors import ConfigError

    users_file = args.users_file
    server_gid = None
    if args.config:
        config = _load(args.config, ("auth.users_file",))  # (which this may create)
        if config is None:
            return 2
        users_file = users_file or config.auth.users_file
        try:
            ids = run_as(config)
        except ConfigError as exc:
            print(f"mailgate passwd: {exc}", file=sys.stderr)
            return 2
        server_gid = ids[1] if ids else None
    if not users_file:
        print("mailgate passwd: give --users-file FILE or --config FILE with auth.users_file",
              file=sys.stderr)
        return 2
    return passwd_command(users_file, args.user, cram=args.cram, stdin_password=args.stdin,
                          server_gid=server_gid)


if __name__ == "__main__":
    sys.exit(main())
