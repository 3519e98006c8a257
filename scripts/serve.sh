#!/bin/sh
# Install mailgate in ./.venv on a fresh Debian machine and run it on its embedded
# default: 127.0.0.1:2525, mail for local users of this host and localhost into ./maildir.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
python3 -m venv .venv
.venv/bin/pip install -q '.[fast]'
exec .venv/bin/mailgate serve "$@"
