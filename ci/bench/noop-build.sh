#!/usr/bin/env bash
# Benchmark: the no-op `punix build` (every package already in the store).
#
# Builds punix in release mode, generates N small packages (each with its
# own tiny `src` directory and a one-line script writing a file to $out;
# about half depend on one to three earlier ones) in a recipe directory of
# 50 packages per file, builds them all once into a temp store, then times
# `punix build -f DIR` again (nothing to do) over repeated runs and
# measures its peak RSS with `/usr/bin/time -f %M`.
#
# Usage: bash ci/bench/noop-build.sh
# Environment:
#   NOOP_BENCH_PACKAGES  how many packages (default 1000; 100 for a quick run)
#   NOOP_BENCH_RUNS      timed runs (default 21) after 2 untimed warm-up runs
#   BENCH_PUNIX          the punix binary to measure (default: build it here)
#   BENCH_MD             append the Markdown section to this file (else stdout)
#   BENCH_TMP            where the temp dirs go (default $TMPDIR or /tmp)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."

N=${NOOP_BENCH_PACKAGES:-1000}
RUNS=${NOOP_BENCH_RUNS:-21}
if ! [[ $N =~ ^[0-9]+$ ]] || [ "$N" -lt 1 ]; then
    echo "noop-build.sh: NOOP_BENCH_PACKAGES must be a whole number >= 1, not \`$N\`" >&2
    exit 2
fi

BENCH_NAME=noop-build.sh
. ci/bench/lib.sh

if [ ! -x /usr/bin/time ]; then
    log "installing the Debian package \`time\`"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq time >/dev/null
fi

if [ -n "${BENCH_PUNIX:-}" ]; then
    PUNIX=$BENCH_PUNIX
else
    log "cargo build --release"
    cargo build --release --quiet
    PUNIX=$PWD/target/release/punix
fi

WORK=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/punix-bench-noop.XXXXXX")
# Store entries are read-only: give write permission back before removing.
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
RECIPES=$WORK/recipes
export PUNIX_CONFIG=$WORK/config.toml PUNIX_STORE_DIR=$WORK/store

# --- the recipes -----------------------------------------------------------
log "generating $N packages in $RECIPES"
mkdir -p "$RECIPES/src"
deps_of() { # the deps of package $1 (0-based), all earlier ones
    local i=$1 d=()
    if [ "$i" -gt 0 ] && [ $((i % 2)) -eq 1 ]; then d+=("P$((i - 1))"); fi
    if [ "$i" -gt 10 ] && [ $((i % 3)) -eq 0 ]; then d+=("P$((i / 2))"); fi
    if [ "$i" -gt 100 ] && [ $((i % 7)) -eq 0 ]; then d+=("P$((i - 100))"); fi
    local out="" x
    for x in "${d[@]}"; do out+="\"$x\", "; done
    echo "[${out%, }]"
}
for ((i = 0; i < N; i++)); do
    mkdir -p "$RECIPES/src/p$i"
    echo "package $i" >"$RECIPES/src/p$i/input.txt"
    file=$RECIPES/pkgs$(printf '%03d' $((i / 50))).toml
    cat >>"$file" <<EOF
[package.P$i]
pname = "p$i"
version = "1.0"
src = "src/p$i"
deps = $(deps_of "$i")
script = 'mkdir -p "\$out" && cp input.txt "\$out/p$i.txt"'

EOF
done
EDGES=$(cat "$RECIPES"/*.toml | grep '^deps' | grep -o '"P[0-9]*"' | wc -l)
WITH_DEPS=$(cat "$RECIPES"/*.toml | grep -c '^deps = \["')
FILES=$(ls "$RECIPES"/*.toml | wc -l)

log "first build (fills the store)"
t0=$EPOCHREALTIME
"$PUNIX" build -f "$RECIPES" >/dev/null 2>"$WORK/first.log" || {
    tail -n 30 "$WORK/first.log" >&2
    exit 1
}
FIRST=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
ENTRIES=$("$PUNIX" store ls | wc -l)
log "first build: ${FIRST}s, $ENTRIES entries"
# The no-op must say so.
"$PUNIX" build -f "$RECIPES" 2>&1 >/dev/null | grep -q "nothing to build" || {
    echo "noop-build.sh: the second build was not a no-op" >&2
    exit 1
}

# --- the measurement -------------------------------------------------------
CMD="punix build -f RECIPES_DIR > /dev/null"
run_noop() { "$PUNIX" build -f "$RECIPES" >/dev/null 2>&1; }

run_noop
run_noop
T=""
U=""
R=""
for ((r = 0; r < RUNS; r++)); do
    # %e is too coarse (10 ms): wall time from bash, CPU and RSS from time.
    t0=$EPOCHREALTIME
    out=$(/usr/bin/time -f '%U %S %M' "$PUNIX" build -f "$RECIPES" 2>&1 >/dev/null | tail -n1)
    t1=$EPOCHREALTIME
    T+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')"
    read -r usr sys rss <<<"$out"
    U+=" $(awk -v u="$usr" -v s="$sys" 'BEGIN {printf "%.2f", u + s}')"
    R+=" $rss"
done
MED=$(echo "$T" | median)
CPU=$(echo "$U" | median)
RSS_KB=$(echo "$R" | median)
RSS_MAX=$(echo "$R" | tr ' ' '\n' | grep . | sort -n | tail -n1)
rss_mib=$(awk -v k="$RSS_KB" 'BEGIN {printf "%.1f", k / 1024}')
t_ok=$(awk -v s="$MED" 'BEGIN {print (s < 0.5 ? "met" : "MISSED")}')
m_ok=$(awk -v k="$RSS_MAX" 'BEGIN {print (k * 1024 < 50e6 ? "met" : "MISSED")}')

EX=$((N > 7 ? 7 : N - 1))
report() {
    cat <<EOF
## No-op build: \`punix build\` with everything in the store

Recipes: $N packages in $FILES files, each with its own one-file \`src\`
directory and a one-line script; $WITH_DEPS of them have dependencies ($EDGES
edges in all). The first build filled the store in ${FIRST}s ($ENTRIES
entries); then $RUNS timed runs of the no-op (after 2 warm-up runs).

| command | median s | range s | CPU s (user+sys) | peak RSS | target |
| --- | ---: | ---: | ---: | ---: | --- |
| \`$CMD\` | $MED | $(echo "$T" | minmax) | $CPU | $RSS_KB KB ($rss_mib MiB) | < 0.5 s: **$t_ok**; < 50 MB: **$m_ok** (max $RSS_MAX KB) |

One of the packages in RECIPES_DIR:

\`\`\`toml
$(sed -n "/^\\[package.P$EX\\]/,/^\$/p" "$RECIPES"/*.toml)
\`\`\`

EOF
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
else
    report
fi
log "done: no-op ${MED}s median, peak RSS ${RSS_KB} KB"
