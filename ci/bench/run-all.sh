#!/usr/bin/env bash
# Run every benchmark in one go and write docs/benchmarks.md: the machine,
# the punix commit, the exact commands, and the tables of this run.
#
# Usage: bash ci/bench/run-all.sh      (as root: deploy.sh starts a testbed host)
# Environment: BENCH_DOC (default docs/benchmarks.md), and each script's own
# (HASH_BENCH_MIB, HASH_BENCH_ROUNDS, HASH_BENCH_BASELINE[_LABEL],
# NOOP_BENCH_PACKAGES, NOOP_BENCH_RUNS, BENCH_TMP, DEPLOY_BENCH_NS,
# DEPLOY_BENCH_RUNS, DEPLOY_BENCH_FIRST_RUNS, DEPLOY_BENCH_DELAY_MS,
# DEPLOY_BENCH_TIMEOUT, DEPLOY_BENCH_TARGET_FS). A quick run:
#   HASH_BENCH_MIB=64 NOOP_BENCH_PACKAGES=100 DEPLOY_BENCH_NS="10 100" BENCH_DOC=/tmp/b.md bash ci/bench/run-all.sh
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."

DOC=${BENCH_DOC:-docs/benchmarks.md}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/punix-benchmarks.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PART=$TMP/benchmarks.md

# Build once and measure a copy, so both benchmarks time the same binary
# even if the working tree (and target/) changes meanwhile.
echo "run-all.sh: cargo build --release" >&2
cargo build --release --quiet
cp target/release/punix "$TMP/punix"
export BENCH_PUNIX=$TMP/punix

cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
shani=$(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# Uncommitted changes that end up in the binary.
dirty=$(git status --porcelain -- src builders Cargo.toml Cargo.lock 2>/dev/null | awk '{print $2}' | paste -sd' ' -)
ossl=""
if command -v openssl >/dev/null; then
    # One core, 16 KiB blocks, in k bytes/s; e.g. "1768573.79k".
    ossl_speed() { openssl speed -evp sha256 -bytes 16384 -seconds 1 2>/dev/null | awk '/^sha256/ {sub("k", "", $2); printf "%.2f", $2 * 1000 / 1e9}'; }
    ossl=$(ossl_speed)
    # The same with the SHA extensions masked off (bit 29 of CPUID.7:EBX).
    ossl_soft=$(OPENSSL_ia32cap=":~0x20000000" ossl_speed)
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# The overrides this run was given, to show how it was invoked.
overrides=""
for v in HASH_BENCH_MIB HASH_BENCH_ROUNDS HASH_BENCH_BASELINE HASH_BENCH_BASELINE_LABEL \
    NOOP_BENCH_PACKAGES NOOP_BENCH_RUNS DEPLOY_BENCH_NS DEPLOY_BENCH_RUNS DEPLOY_BENCH_FIRST_RUNS \
    DEPLOY_BENCH_DELAY_MS DEPLOY_BENCH_TIMEOUT DEPLOY_BENCH_TARGET_FS; do
    if [ -n "${!v:-}" ]; then overrides+="$v=$(printf '%q' "${!v}") "; fi
done
started=$(date -u '+%Y-%m-%d %H:%M UTC')

{
    echo "# Benchmarks"
    echo
    echo "Written by \`bash ci/bench/run-all.sh\` (which runs the benchmark scripts of"
    echo "\`ci/bench/\`, one section each); every number below comes from that one run."
    echo "Re-run it to update this file; see the scripts' headers for the size"
    echo "overrides (\`HASH_BENCH_MIB\`, \`NOOP_BENCH_PACKAGES\`, \`DEPLOY_BENCH_NS\`, ...)."
    echo
    echo "This run: \`${overrides}bash ci/bench/run-all.sh\`"
    echo
    echo "## The machine and the build"
    echo
    echo "| | |"
    echo "| --- | --- |"
    echo "| date | $started |"
    echo "| CPU | $cpu |"
    echo "| cores (\`nproc\`) | $(nproc) |"
    echo "| SHA-NI (\`sha_ni\` in /proc/cpuinfo) | $shani |"
    echo "| memory | $(free -g | awk '/^Mem:/ {print $2}') GiB |"
    echo "| kernel | $(uname -r) |"
    echo "| punix commit | \`$commit\`${dirty:+ plus uncommitted changes to: $dirty} |"
    echo "| rustc | $(rustc --version | cut -d' ' -f2) (\`cargo build --release\`) |"
    echo "| sha256sum | $(sha256sum --version | head -n1) |"
    if [ -n "$ossl" ]; then
        echo "| \`openssl speed -evp sha256\`, 16 KiB blocks, 1 core | $ossl GB/s ($(openssl version | cut -d' ' -f1-2)) |"
        echo "| the same without SHA-NI (\`OPENSSL_ia32cap=:~0x20000000\`) | $ossl_soft GB/s |"
    fi
    echo "| load average before / after | $load_before / @LOAD_AFTER@ |"
    echo
    echo "The machine is shared with other users' work (compilers, tests), so"
    echo "timings are medians of interleaved rounds; the ranges show the noise."
    echo
} >"$PART"

BENCH_MD=$PART bash ci/bench/hash.sh
BENCH_MD=$PART bash ci/bench/noop-build.sh
BENCH_MD=$PART bash ci/bench/deploy.sh >/dev/null
BENCH_MD=$PART bash ci/bench/fleet.sh >/dev/null
BENCH_MD=$PART bash ci/bench/remote-build.sh >/dev/null
BENCH_MD=$PART bash ci/bench/cache.sh

sed -i "s|@LOAD_AFTER@|$(cut -d' ' -f1-3 /proc/loadavg)|" "$PART"
mkdir -p "$(dirname "$DOC")"
cp "$PART" "$DOC"
echo "run-all.sh: wrote $DOC" >&2
