#!/bin/sh
# Install everything the test suite needs on a fresh Debian machine, then run it.
# Debian packages: real peers the tests start on loopback (Redis, Dovecot LMTP) and
# the swaks client; PyPI: mailgate with its test extras, in ./.venv.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# (through env: sudo's env_reset would drop an exported DEBIAN_FRONTEND)
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-venv swaks libnet-ssleay-perl gsasl redis-server dovecot-lmtpd openssl >/dev/null
# (swaks only recommends Net::SSLeay, which its --tls needs: named here, as
# --no-install-recommends would leave it out.)
# The Debian packages start their daemons; the tests run their own on free ports.
$SUDO service redis-server stop >/dev/null 2>&1 || true
$SUDO service dovecot stop >/dev/null 2>&1 || true
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
