#!/usr/bin/env bash
# The whole test suite: Debian packages, formatting, lints, every test.
# This is the command in README.md, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/deps.sh

echo "== cargo fmt --check" >&2
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --all-targets --quiet -- -D warnings
echo "== testbed: real SSH hosts (amd64, aarch64 through qemu-user, systemd)" >&2
bash tests/testbed/install-deps.sh --minimal
TB_DIR=""
trap '[ -z "$TB_DIR" ] || tests/testbed/hosts-down.sh "$TB_DIR"' EXIT
TB_DIR=$(tests/testbed/hosts-up.sh h1 h2 arm1:arm64 sd1:systemd)
export TB_DIR
echo "== testbed up in $TB_DIR" >&2

echo "== cargo test" >&2
cargo test --all-targets
