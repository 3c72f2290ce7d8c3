#!/usr/bin/env bash
# Install the Debian packages punix's demo and tests need, once.
# Usage: bash ci/deps.sh            (as root, or with sudo available)
set -euo pipefail

PACKAGES=(build-essential make rsync openssh-client openssh-server time)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "ci/deps.sh: installing ${missing[*]}" >&2
    # Never start a system sshd from the package's postinst.
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        made_policy=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    [ -z "$made_policy" ] || $SUDO rm -f "$policy"
fi

for tool in cc make sh rsync ssh sshd cargo; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "ci/deps.sh: \`$tool\` is missing after installing packages" >&2
        [ "$tool" = cargo ] && echo "  hint: install a Rust toolchain (rustup) first" >&2
        exit 1
    fi
done
