#!/usr/bin/env bash
# The demo: build punix, then deploy the example stack of examples/ to a
# target directory with --transport-root (no remote host needed), and show
# where everything landed: the closure in the store, the generations and
# `current`, the config file and the generated units.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/deps.sh
cargo build --release --quiet
punix=$PWD/target/release/punix

demo=$(mktemp -d -t punix-demo.XXXXXX)
export PUNIX_STORE_DIR="$demo/store"
export DEMO_API_TOKEN="demo-token-$$"      # the stack's secret (from-env)
target="$demo/target"

run() { echo "\$ $*" | sed "s|$demo|\$DEMO|g"; "$@" 2>&1 | sed "s|$demo|\$DEMO|g"; echo; }

run "$punix" service deploy Demo --file examples/ --transport-root "$target" --deployments-root /srv/deploy
run "$punix" service deploy Demo --file examples/ --transport-root "$target" --deployments-root /srv/deploy
run "$punix" service status Demo --transport-root "$target" --deployments-root /srv/deploy

echo "== what landed under the target root \$DEMO/target"
(cd "$target" && find . \( -path "./${PUNIX_STORE_DIR#/}/*/*" -prune \) -o -print | sed 's|^\./|/|' | sort | sed "s|$demo|\$DEMO|g")
echo
echo "== /srv/deploy/Demo/current -> $(readlink "$target/srv/deploy/Demo/current")"
echo "== /etc/systemd/system/hello.service:"
cat "$target/etc/systemd/system/hello.service" | sed "s|$demo|\$DEMO|g"
echo "== /etc/demo/app.conf:"
cat "$target/etc/demo/app.conf"
echo "== the deployed program, run from the target's store:"
"$target$("$punix" store path --file examples/ Hello)/bin/hello" demo
echo
echo "Everything is under $demo (remove it with: rm -rf $demo)"
