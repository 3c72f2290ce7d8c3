#!/usr/bin/env bash
# Benchmark: `punix store export` and `punix store import` of a closure of
# about 1 GiB, against `tar -cf - | zstd` and `zstd -d | tar -x` of the
# same store entries.
#
# Builds punix in release mode, makes 16 packages whose sources hold files
# of mixed sizes (half the bytes in 4 big files, 3/8 in 1 MiB files, 1/8 in
# thousands of 4-64 KiB files; half of each kind random bytes, half the
# bytes of this machine's /usr/lib and /usr/share files, which compress
# like real programs and data), plus one package `All` that depends on
# them, and builds them into a temp store. Then, in interleaved rounds:
#   export: punix store export --to CACHE ALL_ENTRY  (a fresh CACHE each time)
#           tar -cf - -C STORE ENTRIES | zstd [-T0] > OUT.tar.zst
#   import: punix store import CACHE              (a fresh store each time)
#           zstd -dc OUT.tar.zst | tar -xf - -C DEST [&& sync -f DEST]
# Everything is read from the page cache (warmed before); punix import
# syncs what it wrote before renaming it into the store (syncfs), which
# plain `tar -x` does not, hence the `&& sync` row. Reports medians, the
# throughput over the closure's file bytes, the ratio to tar+zstd, and the
# peak RSS of punix (`/usr/bin/time -f %M`).
#
# Usage: bash ci/bench/cache.sh
# Environment:
#   CACHE_BENCH_MIB      size of the closure in MiB (default 1024; 128 for a quick run)
#   CACHE_BENCH_ROUNDS   timed rounds (default 3) after one untimed warm-up round
#   BENCH_PUNIX          the punix binary to measure (default: build it here)
#   BENCH_MD             append the Markdown section to this file; otherwise
#                        replace (or add) the section in docs/benchmarks.md
#   BENCH_TMP            where the temp dirs go (default $TMPDIR or /tmp)
#   CACHE_BENCH_KEEP     keep the temp dir (store, cache) for a closer look
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."

MIB=${CACHE_BENCH_MIB:-1024}
ROUNDS=${CACHE_BENCH_ROUNDS:-3}
if ! [[ $MIB =~ ^[0-9]+$ ]] || [ "$MIB" -lt 32 ]; then
    echo "cache.sh: CACHE_BENCH_MIB must be a whole number >= 32, not \`$MIB\`" >&2
    exit 2
fi

BENCH_NAME=cache.sh
. ci/bench/lib.sh

# --- tools -----------------------------------------------------------------
need=()
[ -x /usr/bin/time ] || need+=(time)
command -v zstd >/dev/null || need+=(zstd)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing the Debian packages ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -n "${BENCH_PUNIX:-}" ]; then
    PUNIX=$BENCH_PUNIX
else
    log "cargo build --release"
    cargo build --release --quiet
    PUNIX=$PWD/target/release/punix
fi

WORK=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/punix-bench-cache.XXXXXX")
# Store entries are read-only: give write permission back before removing.
if [ -n "${CACHE_BENCH_KEEP:-}" ]; then
    trap 'log "kept $WORK"' EXIT
else
    trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
fi
RECIPES=$WORK/recipes
STORE=$WORK/store
export PUNIX_CONFIG=$WORK/config.toml PUNIX_STORE_DIR=$STORE HOME=$WORK/home
mkdir -p "$HOME"

# --- the packages ----------------------------------------------------------
TREE=$WORK/tree
mkdir -p "$TREE"
unit_kib=$((MIB * 1024 / 32))
log "making ${MIB} MiB of package sources in $TREE"
# Real files, as one stream: the bytes of /usr/lib and /usr/share, sorted
# by path, repeated if they are not enough.
real() { # KiB
    local files=$WORK/real-files
    [ -s "$files" ] || find /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/share \
        -type f -size +0 -readable 2>/dev/null | sort >"$files"
    # xargs exits 125 once cat is killed by SIGPIPE (head has enough).
    { while :; do
        rc=0
        xargs -d '\n' cat <"$files" 2>/dev/null || rc=$?
        [ "$rc" -ne 125 ] || break
    done; } | head -c "$1K"
}
random() { head -c "$1K" /dev/urandom; }
source_of() { # index -> random or real
    if [ $(($1 % 2)) -eq 0 ]; then echo random; else echo real; fi
}
# Big files: 2+3+4+7 = 16 units = half the bytes.
i=0
for units in 2 3 4 7; do
    "$(source_of $i)" $((units * unit_kib)) >"$TREE/big$i.bin"
    i=$((i + 1))
done
# 1 MiB files: 12 units = 3/8 of the bytes.
mid_kib=$((12 * unit_kib / 2 / 1024 * 1024))
random "$mid_kib" | (cd "$TREE" && split -b 1M -a 4 -d - mr)
real "$mid_kib" | (cd "$TREE" && split -b 1M -a 4 -d - mz)
# Small files: 4 units = 1/8 of the bytes, over 4..64 KiB sizes.
small_kib=$((4 * unit_kib / 10))
for size in 4 8 16 32 64; do
    random "$small_kib" | (cd "$TREE" && split -b "${size}K" -a 5 -d - "sr$size-")
    real "$small_kib" | (cd "$TREE" && split -b "${size}K" -a 5 -d - "sz$size-")
done

# Deal the files out to 16 packages, in directories of at most 500 files.
NPKG=16
mkdir -p "$RECIPES/src"
n=0
while IFS= read -r f; do
    p=$((n % NPKG))
    d=$RECIPES/src/p$p/d$((n / NPKG / 500))
    [ -d "$d" ] || mkdir -p "$d"
    mv "$TREE/$f" "$d/"
    n=$((n + 1))
done < <(ls "$TREE")
rmdir "$TREE"
deps=""
for ((p = 0; p < NPKG; p++)); do
    cat >>"$RECIPES/packages.toml" <<EOF
[package.P$p]
pname = "p$p"
version = "1.0"
src = "src/p$p"
script = 'mkdir -p "\$out" && cp -R . "\$out/"'

EOF
    deps+="\"P$p\", "
done
cat >>"$RECIPES/packages.toml" <<EOF
[package.All]
pname = "all"
version = "1.0"
deps = [${deps%, }]
script = 'mkdir -p "\$out" && echo all > "\$out/README"'
EOF

log "building the packages"
"$PUNIX" build -f "$RECIPES" >/dev/null 2>"$WORK/build.log" || {
    tail -n 30 "$WORK/build.log" >&2
    exit 1
}
ALL=$("$PUNIX" store path -f "$RECIPES" All | xargs basename)
rm -rf "$RECIPES/src"
mapfile -t ENTRIES < <("$PUNIX" store ls | xargs -n1 basename)
FILES=$(cd "$STORE" && find "${ENTRIES[@]}" -type f | wc -l)
BYTES=$(cd "$STORE" && find "${ENTRIES[@]}" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')
log "${#ENTRIES[@]} entries, $FILES files, $BYTES bytes"
log "warming the page cache"
(cd "$STORE" && find "${ENTRIES[@]}" -type f -print0 | xargs -0 cat >/dev/null)

# --- the commands ----------------------------------------------------------
CACHE=$WORK/cache
OUT=$WORK/out
DEST=$WORK/dest
declare -A LABEL CMD PREP
NAMES=()
add() { # key label doc-command prepare-function
    NAMES+=("$1")
    LABEL[$1]=$2
    CMD[$1]=$3
    PREP[$1]=$4
}
fresh_cache() { rm -rf "$CACHE"; }
fresh_out() { rm -rf "$OUT"; mkdir -p "$OUT"; }
fresh_store() {
    # The cache exists (made by an export run); empty the store.
    [ -s "$CACHE/punix-index.txt" ] || run_export
    chmod -R u+w "$STORE"
    rm -rf "$STORE"
}
fresh_dest() {
    [ -s "$OUT/all.tar.zst" ] || run_tarzstd
    chmod -R u+w "$DEST" 2>/dev/null || true
    rm -rf "$DEST"
    mkdir -p "$DEST"
}
sync_now() { sync -f "$WORK"; }

add export "punix store export" "punix store export --to CACHE ALL_ENTRY" fresh_cache
run_export() { "$PUNIX" store export --to "$CACHE" "$ALL" 2>/dev/null; }
add tarzstd "tar \| zstd" "tar -cf - -C STORE ENTRIES... | zstd -q > OUT/all.tar.zst" fresh_out
run_tarzstd() { tar -cf - -C "$STORE" "${ENTRIES[@]}" | zstd -q >"$OUT/all.tar.zst"; }
add tarzstdT0 "tar \| zstd -T0" "tar -cf - -C STORE ENTRIES... | zstd -q -T0 > OUT/all.tar.zst" fresh_out
run_tarzstdT0() { tar -cf - -C "$STORE" "${ENTRIES[@]}" | zstd -q -T0 >"$OUT/all.tar.zst"; }
add import "punix store import" "punix store import CACHE" fresh_store
run_import() { "$PUNIX" store import "$CACHE" >/dev/null 2>&1; }
add untar "zstd -d \| tar -x" "zstd -dc OUT/all.tar.zst | tar -xf - -C DEST" fresh_dest
run_untar() { zstd -dc "$OUT/all.tar.zst" | tar -xf - -C "$DEST"; }
add untarsync "zstd -d \| tar -x && sync" "zstd -dc OUT/all.tar.zst | tar -xf - -C DEST && sync -f DEST" fresh_dest
run_untarsync() { zstd -dc "$OUT/all.tar.zst" | tar -xf - -C "$DEST" && sync -f "$DEST"; }

# One timed run: wall time from bash; CPU and peak RSS of the punix runs
# from /usr/bin/time (pipelines are timed as a whole).
declare -A T RSS CPU
measure() { # key
    local k=$1 t0 t1 out
    "${PREP[$k]}"
    sync_now
    if [[ $k == export || $k == import ]]; then
        local sub=(store export --to "$CACHE" "$ALL")
        [ "$k" = import ] && sub=(store import "$CACHE")
        t0=$EPOCHREALTIME
        out=$(/usr/bin/time -f '%U %S %M' "$PUNIX" "${sub[@]}" 2>&1 >/dev/null | tail -n1)
        t1=$EPOCHREALTIME
        local usr sys rss
        read -r usr sys rss <<<"$out"
        RSS[$k]+=" $rss"
        CPU[$k]+=" $(awk -v u="$usr" -v s="$sys" 'BEGIN {printf "%.2f", u + s}')"
    else
        t0=$EPOCHREALTIME
        "run_$k"
        t1=$EPOCHREALTIME
    fi
    T[$k]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
}


started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
log "warm-up round"
for k in "${NAMES[@]}"; do
    measure "$k"
done
for k in "${NAMES[@]}"; do T[$k]=""; RSS[$k]=""; CPU[$k]=""; done
for ((r = 0; r < ROUNDS; r++)); do
    log "round $((r + 1))/$ROUNDS"
    # Rotate the order so that load from other users hits all alike.
    n=${#NAMES[@]}
    for ((j = 0; j < n; j++)); do
        measure "${NAMES[$(((j + r) % n))]}"
    done
done

# The correctness of the last import: every entry verified again.
"$PUNIX" store verify >/dev/null 2>&1 || {
    echo "cache.sh: punix store verify failed after the import" >&2
    exit 1
}
CACHE_BYTES=$(du -sb "$CACHE" | cut -f1)
TAR_BYTES=$(stat -c %s "$OUT/all.tar.zst")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the report --------------------------------------------------------------
gbps() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.2f", b / s / 1e9}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b / a}'; }
row() { # key baseline-key
    local k=$1 med
    med=$(echo "${T[$k]}" | median)
    local vs="" rss="" cpu=""
    if [ -n "${2:-}" ]; then
        vs="$(ratio "$med" "$(echo "${T[$2]}" | median)")×"
    fi
    if [ -n "${RSS[$k]}" ]; then
        local kb
        kb=$(echo "${RSS[$k]}" | tr ' ' '\n' | grep . | sort -n | tail -n1)
        rss="$kb KB ($(awk -v k="$kb" 'BEGIN {printf "%.1f", k / 1024}') MiB)"
        cpu=$(echo "${CPU[$k]}" | median)
    fi
    echo "| ${LABEL[$k]} | $med | $(echo "${T[$k]}" | minmax) | $(gbps "$med") | $vs | $cpu | $rss |"
}
med_of() { echo "${T[$1]}" | median; }
exp_ratio=$(ratio "$(med_of export)" "$(med_of tarzstd)")
imp_ratio=$(ratio "$(med_of import)" "$(med_of untar)")
imp_ratio_sync=$(ratio "$(med_of import)" "$(med_of untarsync)")
max_rss() { echo "${RSS[$1]}" | tr ' ' '\n' | grep . | sort -n | tail -n1; }
ok() { awk -v r="$1" 'BEGIN {print (r >= 0.8 ? "met" : "MISSED")}'; }
mem_ok() { awk -v k="$1" 'BEGIN {print (k * 1024 < 100e6 ? "met" : "MISSED")}'; }

report() {
    cat <<EOF
## Binary cache: \`punix store export\` and \`punix store import\`

The closure: ${#ENTRIES[@]} store entries (16 packages and one that
depends on them all), $FILES files, $BYTES bytes: half the bytes in 4 big
files, 3/8 in 1 MiB files, 1/8 in 4–64 KiB files; half of each kind random,
half the bytes of this machine's \`/usr/lib\` and \`/usr/share\` files. The
cache punix wrote: $CACHE_BYTES bytes (one archive and one metadata file
per entry); \`tar | zstd\`: $TAR_BYTES bytes. Median wall-clock seconds of
$ROUNDS interleaved rounds (after one warm-up round; every input in the
page cache, every output fresh), the range, throughput over the closure's
file bytes in GB/s (10^9 bytes/s), the speed relative to \`tar | zstd\`
(export) and to \`zstd -d | tar -x\` (import), and for punix its median
CPU time and peak RSS (the largest of all runs). zstd is $(zstd --version | grep -o 'v[0-9.]*'),
level 3 for both; punix compresses with $(nproc) zstd worker thread(s).
Run $started at punix commit \`$commit\` on $(nproc) cores ($(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')),
load average $load_before before and $load_after after.

| command | median s | range s | GB/s | vs tar/zstd | CPU s | peak RSS |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
$(row tarzstd)
$(row tarzstdT0)
$(row export tarzstd)
$(row untar)
$(row untarsync)
$(row import untar)

- Export: $exp_ratio× the throughput of \`tar | zstd\` (target ≥ 0.8×: **$(ok "$exp_ratio")**),
  peak RSS $(max_rss export) KB (target < 100 MB: **$(mem_ok "$(max_rss export)")**).
- Import: $imp_ratio× the throughput of \`zstd -d | tar -x\` (target ≥ 0.8×:
  **$(ok "$imp_ratio")**), $imp_ratio_sync× that of \`zstd -d | tar -x && sync\`;
  peak RSS $(max_rss import) KB (target < 100 MB: **$(mem_ok "$(max_rss import)")**).
  Besides unpacking, an import checks each archive's sha256, hashes every
  unpacked tree again (the content hash), checks each derivation, and syncs
  the tree before the rename; \`punix store verify\` passed after the last run.

The commands:

\`\`\`sh
$(for k in "${NAMES[@]}"; do echo "${CMD[$k]}"; done)
\`\`\`

EOF
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
else
    # Replace this section of docs/benchmarks.md (or add it at the end),
    # keeping every other section; read the file only now, as others may
    # have changed it meanwhile.
    SECTION=$WORK/section.md
    report >"$SECTION"
    DOC=docs/benchmarks.md
    python3 - "$DOC" "$SECTION" <<'PY'
import sys
doc, section = sys.argv[1], open(sys.argv[2]).read()
try:
    text = open(doc).read()
except FileNotFoundError:
    text = "# Benchmarks\n\n"
head = "## Binary cache: `punix store export` and `punix store import`"
lines = text.splitlines(keepends=True)
start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == head), None)
if start is None:
    if not text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n\n"
    text += section
else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    text = "".join(lines[:start]) + section + "".join(lines[end:])
open(doc + ".tmp", "w").write(text)
import os
os.replace(doc + ".tmp", doc)
PY
    log "wrote the section into $DOC"
fi
log "done: export ${exp_ratio}x, import ${imp_ratio}x (${imp_ratio_sync}x with sync)"
