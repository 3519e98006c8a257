"""The [auth] and [tls] sections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AuthConfig:
    users_file: str = ""  # empty: AUTH is not offered


@dataclass
class TLSConfig:
    cert: str = ""  # empty: STARTTLS is not offered
    key: str = ""
