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
echo "== cargo test" >&2
cargo test --all-targets
