#!/usr/bin/env bash
# Make a fresh Debian 12 machine (only python3 installed) able to build the venv and run the tests.
# Installs, when missing: the venv module (python3-venv), a C compiler and the interpreter's headers (gcc,
# python3-dev: a normal install compiles the cores with mypyc, see setup.py; with --test or --bench), SIPp (sip-tester), Kamailio (kamailio), iproute2,
# iputils-arping, iputils-ping and procps (pgrep), and for the deployment tests (tests/deploy) nftables, the ssh client and server, and systemd-analyze.
# Runs apt only when something is missing; uses sudo when not root.
set -euo pipefail
want=()
python3 -c 'import ensurepip, venv' 2>/dev/null || want+=(python3-venv)
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--bench" ]; then
    # The interpreter that builds the compiled venv (make test-compiled, make bench: PYTHON or BENCH_PYTHON).
    py="${PYTHON_FOR_BUILD:-python3}"
    command -v gcc >/dev/null 2>&1 || want+=(gcc)
    "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || want+=(python3-dev)
fi
if [ "${1:-}" = "--test" ]; then
    command -v sipp >/dev/null 2>&1 || want+=(sip-tester)
    command -v ip >/dev/null 2>&1 || want+=(iproute2)
    command -v arping >/dev/null 2>&1 || want+=(iputils-arping)  # the service-address hook's gratuitous ARP
    command -v ping >/dev/null 2>&1 || want+=(iputils-ping)  # lab reachability checks
    command -v pgrep >/dev/null 2>&1 || want+=(procps)  # the hook's down stops this host's announcements
    command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || want+=(nftables)
    command -v ssh >/dev/null 2>&1 || want+=(openssh-client)
    [ -x /usr/sbin/sshd ] || want+=(openssh-server)
    command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)  # checks deploy/systemd's unit
    # Kamailio 5.6 (Debian 12's package: kamailio and kamcmd, with every module the peer-PBX test and the
    # benchmark configs load): tests/integration/test_trunk_kamailio.py starts it itself.
    command -v kamailio >/dev/null 2>&1 || [ -x /usr/sbin/kamailio ] || want+=(kamailio)
fi
[ ${#want[@]} -eq 0 ] && exit 0
echo "bootstrap: installing ${want[*]} from Debian packages" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null
# A freshly installed kamailio package may start its system service (the stock config, on port 5060 of every
# address), which would take the test addresses' SIP port: the tests run their own Kamailio, so stop it.
if [[ " ${want[*]} " == *" kamailio "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now kamailio.service >/dev/null 2>&1 || true
fi
