#!/usr/bin/env bash
# Benchmark: `punix store hash DIR` against sha256sum over the same files.
#
# Builds punix in release mode, makes a tree of random files of mixed sizes
# (half the bytes in 4 big files, 3/8 in 1 MiB files, 1/8 in thousands of
# 4-64 KiB files), reads it once into the page cache, then times punix,
# sha256sum and `xargs -P2 sha256sum` on the tree, and punix, openssl and
# sha256sum on its largest file alone (one thread each: is SHA-NI used?),
# in interleaved rounds (one run of each per round, the order rotating, so
# a load spike from another user of the machine hits all of them alike).
# Reports the median of each, its throughput and the ratio to sha256sum,
# and the peak RSS of punix (`/usr/bin/time -f %M`).
#
# Usage: bash ci/bench/hash.sh
# Environment:
#   HASH_BENCH_MIB       size of the tree in MiB (default 1024; 64 for a quick run)
#   HASH_BENCH_ROUNDS    timed rounds (default 9) after one untimed warm-up round
#   HASH_BENCH_BASELINE  another punix binary to time too (e.g. an older build),
#                        labelled HASH_BENCH_BASELINE_LABEL in the table
#   BENCH_PUNIX          the punix binary to measure (default: build it here)
#   BENCH_MD             append the Markdown section to this file (else stdout)
#   BENCH_TMP            where the temp tree goes (default $TMPDIR or /tmp)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."

MIB=${HASH_BENCH_MIB:-1024}
ROUNDS=${HASH_BENCH_ROUNDS:-9}
if ! [[ $MIB =~ ^[0-9]+$ ]] || [ "$MIB" -lt 32 ]; then
    echo "hash.sh: HASH_BENCH_MIB must be a whole number >= 32, not \`$MIB\`" >&2
    exit 2
fi

BENCH_NAME=hash.sh
. ci/bench/lib.sh

# --- tools -----------------------------------------------------------------
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

# --- the tree --------------------------------------------------------------
WORK=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/punix-bench-hash.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
TREE=$WORK/tree
# punix reads a config file and a store root; keep both away from the user's.
export PUNIX_CONFIG=$WORK/config.toml PUNIX_STORE_DIR=$WORK/store
mkdir -p "$TREE/big" "$TREE/mid"

unit_kib=$((MIB * 1024 / 32))
log "making a ${MIB} MiB tree in $TREE"
# Big files: 2+3+4+7 = 16 units = half the bytes (64/96/128/224 MiB at 1 GiB).
i=0
for units in 2 3 4 7; do
    head -c "$((units * unit_kib))K" /dev/urandom >"$TREE/big/file$i.bin"
    i=$((i + 1))
done
# 1 MiB files: 12 units = 3/8 of the bytes (384 files at 1 GiB).
mid_files=$((12 * unit_kib / 1024))
head -c "${mid_files}M" /dev/urandom | (cd "$TREE/mid" && split -b 1M -a 4 -d - m)
# Small files: 4 units = 1/8 of the bytes, spread evenly over 4..64 KiB sizes,
# in directories of at most 1000 files.
small_kib=$((4 * unit_kib))
for size in 4 8 16 32 64; do
    d=$TREE/small/k$size
    mkdir -p "$d"
    head -c "$((small_kib / 5))K" /dev/urandom | (cd "$d" && split -b "${size}K" -a 5 -d - s)
    # s00000, s00001, ...: files s<GG>nnn go to directory <GG>.
    (cd "$d" && for g in $(ls | cut -c2-3 | sort -u); do
        mkdir "$g"
        mv s"$g"* "$g/"
    done)
done

FILES=$(find "$TREE" -type f | wc -l)
BYTES=$(find "$TREE" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')
log "$FILES files, $BYTES bytes"

log "warming the page cache"
find "$TREE" -type f -print0 | xargs -0 cat >/dev/null

# --- the commands ----------------------------------------------------------
# Each is a function run in this shell, so only the tool itself is forked.
BIG=$TREE/big/file3.bin
BIG_BYTES=$(stat -c %s "$BIG")
declare -A LABEL CMD BYTES_OF
NAMES=()
add() { # key label bytes command-for-the-doc
    NAMES+=("$1")
    LABEL[$1]=$2
    BYTES_OF[$1]=$3
    CMD[$1]=$4
}
add punix "punix" "$BYTES" "punix store hash DIR"
run_punix() { "$PUNIX" store hash "$TREE" >/dev/null; }
if [ -n "${HASH_BENCH_BASELINE:-}" ]; then
    add base "${HASH_BENCH_BASELINE_LABEL:-punix, baseline build}" "$BYTES" "\$HASH_BENCH_BASELINE store hash DIR"
    run_base() { "$HASH_BENCH_BASELINE" store hash "$TREE" >/dev/null; }
fi
add sha "sha256sum" "$BYTES" "find DIR -type f -print0 | xargs -0 sha256sum > /dev/null"
run_sha() { find "$TREE" -type f -print0 | xargs -0 sha256sum >/dev/null; }
add sha2 "sha256sum, 2 processes" "$BYTES" "find DIR -type f -print0 | xargs -0 -P2 -n16 sha256sum > /dev/null"
run_sha2() { find "$TREE" -type f -print0 | xargs -0 -P2 -n16 sha256sum >/dev/null; }
# One big file, so one thread each: shows whether SHA-NI is used (OpenSSL's
# sha256 uses it when the CPU has it).
add punix1 "punix, BIG only" "$BIG_BYTES" "punix store hash BIG"
run_punix1() { "$PUNIX" store hash "$BIG" >/dev/null; }
if command -v openssl >/dev/null; then
    add ossl1 "openssl, BIG only" "$BIG_BYTES" "openssl dgst -sha256 BIG > /dev/null"
    run_ossl1() { openssl dgst -sha256 "$BIG" >/dev/null; }
fi
add sha1 "sha256sum, BIG only" "$BIG_BYTES" "sha256sum BIG > /dev/null"
run_sha1() { sha256sum "$BIG" >/dev/null; }

# "WALL:CPU" of one call of a function: wall-clock seconds (to the
# microsecond) and the user+sys seconds of every process it ran. Called in
# a $(...) subshell, whose children's CPU times start from zero; `times`
# writes to a file, as a pipe would run it in yet another subshell.
time_one() {
    local t0 t1
    t0=$EPOCHREALTIME
    "$1"
    t1=$EPOCHREALTIME
    times >"$WORK/times"
    tail -n1 "$WORK/times" | awk -v a="$t0" -v b="$t1" '{
        split($1, u, /[ms]/); split($2, s, /[ms]/)
        printf "%.4f:%.2f", b - a, u[1] * 60 + u[2] + s[1] * 60 + s[2]
    }'
}

log "warm-up round"
for n in "${NAMES[@]}"; do "run_$n"; done

declare -A T C
for n in "${NAMES[@]}"; do T[$n]="" C[$n]=""; done
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#NAMES[@]}; k++)); do
        n=${NAMES[$(((r + k) % ${#NAMES[@]}))]}
        res=$(time_one "run_$n")
        T[$n]+=" ${res%%:*}"
        C[$n]+=" ${res##*:}"
    done
    line=""
    for n in "${NAMES[@]}"; do line+=" $n ${T[$n]##* }"; done
    log "round $((r + 1))/$ROUNDS:$line"
done

RSS=""
for ((r = 0; r < 3; r++)); do
    RSS+=" $(/usr/bin/time -f %M "$PUNIX" store hash "$TREE" 2>&1 >/dev/null | tail -n1)"
done
RSS_KB=$(echo "$RSS" | median)
rss_mib=$(awk -v k="$RSS_KB" 'BEGIN {printf "%.1f", k / 1024}')
HASH=$("$PUNIX" store hash "$TREE" | cut -d' ' -f1)

# --- the report ------------------------------------------------------------
declare -A MED
for n in "${NAMES[@]}"; do MED[$n]=$(echo "${T[$n]}" | median); done
row() { # key reference-key
    local gbs ratio
    gbs=$(awk -v b="${BYTES_OF[$1]}" -v s="${MED[$1]}" 'BEGIN {printf "%.2f", b / s / 1e9}')
    ratio=$(awk -v s="${MED[$1]}" -v ref="${MED[$2]}" 'BEGIN {printf "%.2f", ref / s}')
    printf '| %s | %s | %s | %s | %s× | %s |\n' "${LABEL[$1]}" "${MED[$1]}" "$(echo "${T[$1]}" | minmax)" "$gbs" "$ratio" "$(echo "${C[$1]}" | median)"
}
ratio=$(awk -v s="${MED[punix]}" -v ref="${MED[sha]}" 'BEGIN {printf "%.2f", ref / s}')
verdict=$(awk -v r="$ratio" 'BEGIN {print (r >= 3 ? "met" : "MISSED")}')

report() {
    echo "## Content hash of a tree: \`punix store hash\` vs \`sha256sum\`"
    echo
    echo "DIR: $FILES files, $BYTES bytes ($MIB MiB of random data): 4 files of"
    echo "$((2 * unit_kib / 1024))–$((7 * unit_kib / 1024)) MiB, $mid_files files of 1 MiB and $((FILES - 4 - mid_files)) files of 4–64 KiB in"
    echo "directories of at most 1000, read once into the page cache before timing."
    echo "BIG: its largest file ($((BIG_BYTES / 1048576)) MiB). Median wall-clock seconds of $ROUNDS"
    echo "interleaved rounds (one run of each command per round, the order rotating,"
    echo "after one warm-up round), the range, throughput in GB/s (10^9 bytes/s),"
    echo "and the speed relative to single-process \`sha256sum\` on the same bytes;"
    echo "also the median CPU time of all processes of a command, which other users'"
    echo "load on the machine changes much less than the wall-clock time."
    echo
    echo "| tool | median s | range s | GB/s | vs sha256sum | CPU s (user+sys) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    for n in "${NAMES[@]}"; do
        case $n in
        *1) row "$n" sha1 ;;
        *) row "$n" sha ;;
        esac
    done
    echo
    echo "- Target: punix ≥ 3× the throughput of \`sha256sum\` on DIR: **$verdict** (${ratio}×)."
    echo "- Peak RSS of \`punix store hash DIR\`: $RSS_KB KB ($rss_mib MiB), median of 3 runs"
    echo "  of \`/usr/bin/time -f %M\`."
    echo "- DIR's content hash: \`$HASH\` (not comparable with sha256sum's"
    echo "  digests: it covers names, modes and links too)."
    echo "- The BIG-only rows run one thread each: punix (sha2 0.11, SHA-NI picked at run"
    echo "  time) is on par with OpenSSL, i.e. it uses the SHA extensions; coreutils'"
    echo "  sha256sum does not."
    echo "- \`sha256sum, 2 processes\` gains little: every batch of 16 files is a new"
    echo "  process, and \`find\` lists the 4 big files (half the bytes) together, so"
    echo "  one batch holds them all; smaller batches cost more in process starts."
    echo
    echo "The commands, in the table's order:"
    echo
    echo '```sh'
    for n in "${NAMES[@]}"; do echo "${CMD[$n]}"; done
    echo '```'
    echo
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
else
    report
fi
log "done: punix ${MED[punix]}s, sha256sum ${MED[sha]}s, ratio ${ratio}×"
