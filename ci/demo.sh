#!/usr/bin/env bash
# The demo: build punix, then build the example packages under examples/
# into a store in a temporary directory and show where they landed.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/deps.sh
cargo build --release --quiet
punix=./target/release/punix

demo=$(mktemp -d -t punix-demo.XXXXXX)
export PUNIX_STORE_DIR="$demo/store"

echo "== punix build --file examples/   (store: $PUNIX_STORE_DIR)"
"$punix" build --file examples/
echo
echo "== again: nothing to build"
"$punix" build --file examples/
echo
echo "== punix store ls --long"
"$punix" store ls --long
echo
echo "== run the built program"
"$("$punix" store path --file examples/ Hello)/bin/hello" demo
echo
echo "== punix store verify"
"$punix" store verify
echo
echo "The store is in $PUNIX_STORE_DIR (remove it with: rm -rf $demo)"
