#!/usr/bin/env bash
# Benchmark: `punix service deploy` over SSH against `ssh host true`, one raw
# `rsync -a` of the same store directories, and `nix copy` of an equivalent
# closure (ssh-ng:// and ssh://), side by side on the same sshd.
#
# Starts its own testbed host (tests/testbed/hosts-up.sh h1: a real sshd in
# a network namespace) and stops it on exit. For each N (default 10, 100 and
# 1000) it generates N small packages (each a `copy` of a source directory
# with three files: 2 KiB and 4 KiB of random bytes and a one-line README)
# and a stack `Bench` whose `store-modules` lists them all, builds them once
# into a local store, adds the same N directories to a private local Nix
# store (`nix-store --add`) plus one path that references them all, and then
# measures, in interleaved rounds (the order rotating, so a load spike from
# another user of the machine hits all alike):
#   - first copies to fresh target dirs: punix first deploy, `rsync -a` of
#     the N store directories, `nix copy` over ssh-ng:// and ssh:// to
#     separate Nix stores behind the same sshd (DEPLOY_BENCH_FIRST_RUNS
#     rounds, the target dirs wiped before each round);
#   - unchanged: `ssh host true`, punix redeploy, the same rsync and both
#     nix copies again (DEPLOY_BENCH_RUNS rounds after one warm-up round);
#   - per command: wall-clock seconds, new SSH connections (the "Accepted
#     publickey" lines it added to the host's sshd log), and for punix the
#     round trips of its `--json` counters and its peak RSS
#     (`/usr/bin/time -f %M`: punix or its largest child);
#   - where the time of one more punix first deploy and redeploy per N goes,
#     from the moments the host's sshd logs the connection, the login, and
#     the start and close of each of punix's sessions (stamped by a poller);
#   - with DEPLOY_BENCH_DELAY_MS (default 10) added in each direction, i.e.
#     +20 ms round-trip time, through a user-space TCP relay on a loopback
#     port (ci/bench/rtt-proxy.py; tc/netem is not available here), at
#     N = 1000 (or the largest N of the run): the unchanged rounds again,
#     then one first copy of each (nix copy capped at DEPLOY_BENCH_TIMEOUT s).
# The store root is /tmp/punix-bench-XXXXXX/nN/store on both sides (the
# host's /tmp is its own), deployments and units go to
# /srv/deploy/punix-bench-XXXXXX-nN on the host; punix deploys as the
# testbed's user `tbdeploy`, nix copies as root (Nix's own docs' form).
#
# Usage: bash ci/bench/deploy.sh            (as root: the testbed needs it)
# Environment:
#   DEPLOY_BENCH_NS          closure sizes (default "10 100 1000"; "10 100" for a quick run)
#   DEPLOY_BENCH_RUNS        timed unchanged rounds (default 9)
#   DEPLOY_BENCH_FIRST_RUNS  first-copy rounds (default 9; rsync's own
#                            20 ms polls at the end of a transfer, on both
#                            ends, add 0-40 ms at random to every copy, punix's
#                            push and the raw rsync alike: medians of 5 moved
#                            the ratios by +-0.04 from run to run)
#   DEPLOY_BENCH_DELAY_MS    latency added each way by the relay (default 10)
#   DEPLOY_BENCH_TIMEOUT     cap in seconds on a nix copy through the relay (default 120)
#   DEPLOY_BENCH_TARGET_FS   tmpfs (default: the testbed's state dir, and so the
#                            host's /tmp and /srv, on /dev/shm) or disk (under /tmp).
#                            This machine's one disk is shared and slows down
#                            under repeated writes of thousands of small files
#                            (a local `rsync -a` of the N = 1000 tree took
#                            0.9 s, then 1.6, 2.5, 2.8, 2.7, 3.7 s in a row), which
#                            would swamp the tools' own costs; tmpfs removes that
#                            for every tool alike.
#   BENCH_PUNIX              the punix binary to measure (default: build it here)
#   BENCH_MD                 append the Markdown section to this file (else stdout)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."
REPO=$PWD

NS=${DEPLOY_BENCH_NS:-10 100 1000}
RUNS=${DEPLOY_BENCH_RUNS:-9}
FIRST_RUNS=${DEPLOY_BENCH_FIRST_RUNS:-9}
DELAY_MS=${DEPLOY_BENCH_DELAY_MS:-10}
CAP=${DEPLOY_BENCH_TIMEOUT:-120}
TARGET_FS=${DEPLOY_BENCH_TARGET_FS:-tmpfs}

BENCH_NAME=deploy.sh
. ci/bench/lib.sh
for n in $NS; do
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || die "DEPLOY_BENCH_NS must list whole numbers >= 1, not \`$NS\`"
done
[ -n "${NS// /}" ] || die "DEPLOY_BENCH_NS is empty"
for v in RUNS FIRST_RUNS CAP; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || die "DEPLOY_BENCH_$v must be a whole number >= 1, not \`${!v}\`"
done
[[ $TARGET_FS == tmpfs || $TARGET_FS == disk ]] || die "DEPLOY_BENCH_TARGET_FS must be tmpfs or disk, not \`$TARGET_FS\`"
[[ $DELAY_MS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DEPLOY_BENCH_DELAY_MS must be a number, not \`$DELAY_MS\`"
[ "$(id -u)" -eq 0 ] || die "run as root (the testbed makes network namespaces and mounts)"
# The N of the relay runs and of the memory target: 1000 if
# measured, else the largest.
NREF=$(printf '%s\n' $NS | sort -n | tail -n1)
for n in $NS; do if [ "$n" -eq 1000 ]; then NREF=1000; fi; done

# --- tools -----------------------------------------------------------------
# Installed before the testbed starts: the host's root is an overlay of this
# machine's, so it sees the same nix and rsync.
pkgs=()
[ -x /usr/bin/time ] || pkgs+=(time)
command -v nix-store >/dev/null || pkgs+=(nix-bin)
command -v python3 >/dev/null || pkgs+=(python3)
if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    bash tests/testbed/install-deps.sh --minimal
fi
PYTHON=$(command -v /usr/bin/python3 || command -v python3)

if [ -n "${BENCH_PUNIX:-}" ]; then
    PUNIX=$BENCH_PUNIX
else
    log "cargo build --release"
    cargo build --release --quiet
    PUNIX=$REPO/target/release/punix
fi

# --- work dir, testbed, cleanup --------------------------------------------
# /tmp on purpose (not $TMPDIR): the store root must be a path the target
# user can create on the host too, and the host's /tmp is its own.
WORK=$(mktemp -d /tmp/punix-bench-XXXXXX)
ID=$(basename "$WORK")
TB_DIR=""
PROXY_PID=""
cleanup() {
    local rc=$?
    if [ -n "$PROXY_PID" ]; then kill "$PROXY_PID" 2>/dev/null || true; fi
    if [ -n "${STAMP_PID:-}" ]; then kill "$STAMP_PID" 2>/dev/null || true; fi
    if [ -n "$TB_DIR" ]; then bash "$REPO/tests/testbed/hosts-down.sh" "$TB_DIR" >/dev/null 2>&1 || true; fi
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting the testbed host h1 (target on $TARGET_FS)"
tb_parent=${TMPDIR:-/tmp}
[ "$TARGET_FS" = disk ] || tb_parent=/dev/shm
TB_DIR=$(TB_DIR=$(mktemp -d "$tb_parent/punix-bench-testbed.XXXXXX") bash tests/testbed/hosts-up.sh h1 2>"$WORK/hosts-up.log") || {
    cat "$WORK/hosts-up.log" >&2
    die "hosts-up.sh failed"
}
# shellcheck disable=SC1091
. "$TB_DIR/env"
ADDR=$TB_HOST_h1_ADDR
SSHD_LOG=$TB_DIR/hosts/h1/sshd.log
# Everything runs with a private HOME: no user ssh config, same for all tools.
export HOME=$WORK/home PUNIX_CONFIG=$WORK/config.toml XDG_CACHE_HOME=$WORK/cache
mkdir -p "$HOME"
# A private Nix configuration (nothing global changes).
export NIX_CONF_DIR=$WORK/nixconf
mkdir -p "$NIX_CONF_DIR"
printf '%s\n' 'experimental-features = nix-command' 'build-users-group =' 'sandbox = false' 'substituters =' >"$NIX_CONF_DIR/nix.conf"

logins() { grep -c 'Accepted publickey' "$SSHD_LOG" || true; }
as_root() { ssh -F "$TB_SSH_CONFIG" -l root h1 "$1"; }

# The route to the host: direct, or through the delay relay.
route_direct() {
    R_HOST=$ADDR R_PORT=22 R_KH=$TB_KNOWN_HOSTS
    R_URL="ssh://tbdeploy@[$ADDR]" R_RSYNC_HOST="[$ADDR]"
    R_SSH="-p 22 -i $TB_KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=$R_KH -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes"
    R_CAP=""
}
route_proxy() {
    R_HOST=127.0.0.1 R_PORT=$PPORT R_KH=$WORK/known_hosts.relay
    R_URL="ssh://tbdeploy@127.0.0.1:$PPORT" R_RSYNC_HOST=127.0.0.1
    R_SSH="-p $PPORT -i $TB_KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=$R_KH -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes"
    R_CAP="timeout $CAP"
}

# --- per-N setup ---------------------------------------------------------------
# Sets the paths of closure size $1 (local and remote).
use_n() {
    N=$1
    D=$WORK/n$N
    RECIPES=$D/recipes
    export PUNIX_STORE_DIR=$D/store
    NLS="local?root=$D/nix"
    R_DEP=/srv/deploy/$ID-n$N
    R_RSYNC=/tmp/$ID-n$N-rsync
    R_NIXNG=/tmp/$ID-n$N-nix-ng
    R_NIXSSH=/tmp/$ID-n$N-nix-ssh
}

prepare_n() {
    use_n "$1"
    log "N=$N: generating, building, adding to the Nix store"
    mkdir -p "$RECIPES"
    "$PYTHON" - "$RECIPES" "$N" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
with open(os.path.join(root, "packages.toml"), "w") as f:
    for i in range(n):
        src = os.path.join(root, "src", f"m{i}")
        os.makedirs(os.path.join(src, "share"))
        for name, size in (("a.bin", 2048), ("b.bin", 4096)):
            with open(os.path.join(src, "share", name), "wb") as g:
                g.write(os.urandom(size))
        with open(os.path.join(src, "README"), "w") as g:
            g.write(f"module {i}\n")
        f.write(f'[package.M{i}]\npname = "m{i}"\nversion = "1"\nbuilder = "copy"\nsrc = "src/m{i}"\n\n')
with open(os.path.join(root, "stack.toml"), "w") as f:
    f.write("[stack.Bench]\nstore-modules = [" + ", ".join(f'"M{i}"' for i in range(n)) + "]\n")
EOF
    local t0=$EPOCHREALTIME
    "$PUNIX" build -f "$RECIPES" >/dev/null 2>"$D/build.log" || {
        tail -n 30 "$D/build.log" >&2
        die "N=$N: punix build failed"
    }
    BUILD_S[$N]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
    ENTRIES=("$PUNIX_STORE_DIR"/[0-9a-f]*-m*-1)
    [ "${#ENTRIES[@]}" -eq "$N" ] || die "N=$N: ${#ENTRIES[@]} store entries, not $N"
    FILES[$N]=$(find "${ENTRIES[@]}" -type f | wc -l)
    BYTES[$N]=$(find "${ENTRIES[@]}" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')
    # The same directories (same bytes, same names) in a private Nix store,
    # plus one path that references them all: a closure of N + 1 paths.
    nix-store --store "$NLS" --add "${ENTRIES[@]}" >"$D/nix-paths"
    local expr
    expr="builtins.toFile \"bench-closure-$N\" (builtins.concatStringsSep \"\\n\" (map builtins.storePath (builtins.filter (s: builtins.isString s && s != \"\") (builtins.split \"\\n\" (builtins.readFile $D/nix-paths)))))"
    nix-instantiate --store "$NLS" --eval --read-write-mode -E "$expr" | tr -d '"' >"$D/nix-top"
    NIX_CLOSURE[$N]=$(nix-store --store "$NLS" -qR "$(cat "$D/nix-top")" | wc -l)
    [ "${NIX_CLOSURE[$N]}" -eq $((N + 1)) ] || die "N=$N: the Nix closure has ${NIX_CLOSURE[$N]} paths, not $((N + 1))"
    # The local half of a deploy, alone: loading the recipes and hashing
    # every package's sources and inputs (a no-op build), median of 5.
    local ts="" r
    for r in 1 2 3 4 5; do
        t0=$EPOCHREALTIME
        "$PUNIX" build -f "$RECIPES" >/dev/null 2>&1
        ts+=" $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f", b - a}')"
    done
    NOOP_S[$N]=$(echo "$ts" | median)
}

wipe_n() { # fresh target dirs for every tool of closure size $N
    as_root "chmod -R u+w /tmp/$ID/n$N $R_DEP $R_RSYNC $R_NIXNG $R_NIXSSH 2>/dev/null; rm -rf /tmp/$ID/n$N $R_DEP $R_RSYNC $R_NIXNG $R_NIXSSH"
}

# --- the commands ----------------------------------------------------------
# Each is a function run in this shell, so only the tool itself is forked.
run_ssh() { ssh $R_SSH "tbdeploy@$R_HOST" true; }
run_punix() {
    /usr/bin/time -f %M -o "$WORK/punix.rss" "$PUNIX" service deploy Bench -f "$RECIPES" \
        --target "$R_URL" --key "$TB_KEY" --known-hosts "$R_KH" \
        --deployments-root "$R_DEP/deployments" --unit-dir "$R_DEP/units" --json \
        >"$WORK/punix.json" 2>"$WORK/punix.err"
}
run_rsync() { rsync -a -e "ssh $R_SSH" "${ENTRIES[@]}" "tbdeploy@$R_RSYNC_HOST:$R_RSYNC/"; }
run_nixng() {
    NIX_SSHOPTS="$R_SSH" $R_CAP nix copy --from "$NLS" \
        --to "ssh-ng://root@$R_HOST?remote-store=local?root=$R_NIXNG" "$(cat "$D/nix-top")" 2>"$WORK/nix.err"
}
run_nixssh() {
    NIX_SSHOPTS="$R_SSH" $R_CAP nix copy --from "$NLS" \
        --to "ssh://root@$R_HOST?remote-store=local?root=$R_NIXSSH" "$(cat "$D/nix-top")" 2>"$WORK/nix.err"
}

json_num() { grep -o "\"$1\":[0-9.]*" "$WORK/punix.json" | head -n1 | cut -d: -f2; }

# Run one command, record its seconds and new SSH connections under key
# K="<N>:<case>:<tool>"; for punix also round trips, RSS and what it did.
declare -A T C RT RSS SEC PUSHED BSENT
measure() { # KEY FUNCTION EXPECT(first|unchanged|-)
    local key=$1 fn=$2 expect=$3 before t0 t1 rc=0 closed=0
    before=$(logins)
    [ -z "$R_CAP" ] || closed=$(relay_closed)
    t0=$EPOCHREALTIME
    "$fn" || rc=$?
    t1=$EPOCHREALTIME
    if [ -n "$R_CAP" ]; then relay_turns "$key" "$closed" "$(($(logins) - before))"; fi
    if [ "$rc" -eq 124 ] && [ -n "$R_CAP" ] && [[ $fn == run_nix* ]]; then
        T[$key]+=" >$CAP"
        C[$key]+=" $(($(logins) - before))"
        log "  $key: did not finish in ${CAP}s"
        return 0
    fi
    if [ "$rc" -ne 0 ]; then
        [ -s "$WORK/punix.err" ] && [ "$fn" = run_punix ] && cat "$WORK/punix.err" >&2
        [ -s "$WORK/nix.err" ] && [[ $fn == run_nix* ]] && tail -n 20 "$WORK/nix.err" >&2
        die "$key: \`$fn\` failed (exit $rc)"
    fi
    T[$key]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')"
    C[$key]+=" $(($(logins) - before))"
    if [ "$fn" = run_punix ]; then
        RT[$key]+=" $(json_num round_trips)"
        RSS[$key]+=" $(tail -n1 "$WORK/punix.rss")"
        SEC[$key]+=" $(json_num seconds)"
        PUSHED[$key]=$(json_num pushed)
        BSENT[$key]=$(json_num bytes_sent)
        local unchanged
        unchanged=$(grep -o '"unchanged":[a-z]*' "$WORK/punix.json" | cut -d: -f2)
        case $expect in
        first) [ "$(json_num pushed)" = "$N" ] && [ "$(json_num cached)" = 0 ] ||
            die "$key: expected a first deploy of $N paths: $(cat "$WORK/punix.json")" ;;
        unchanged) [ "$unchanged" = true ] && [ "$(json_num pushed)" = 0 ] ||
            die "$key: expected an unchanged redeploy: $(cat "$WORK/punix.json")" ;;
        esac
    fi
}

# Through the relay: the direction changes of the command's connections
# (a request and its answer are two), from the relay's log line per closed
# connection. Waits (untimed) up to 5 s for the connections to close.
declare -A TURNS
relay_closed() { grep -c 'connection closed' "$WORK/relay.log" || true; }
relay_turns() { # KEY CLOSED_BEFORE NEW_CONNECTIONS
    local i
    for ((i = 0; i < 50; i++)); do
        [ "$(relay_closed)" -lt $(($2 + $3)) ] || break
        sleep 0.1
    done
    TURNS[$1]+=" $(grep 'connection closed' "$WORK/relay.log" | awk -v s="$2" 'NR > s {t += $(NF - 1)} END {print t + 0}')"
}

# One round: every tool of TOOLS once, starting at offset $2.
declare -A FN=([ssh]=run_ssh [punix]=run_punix [rsync]=run_rsync [nixng]=run_nixng [nixssh]=run_nixssh)
round() { # CASE OFFSET TOOLS...
    local case=$1 off=$2 k n
    shift 2
    local tools=("$@")
    for ((k = 0; k < ${#tools[@]}; k++)); do
        n=${tools[$(((off + k) % ${#tools[@]}))]}
        local expect=-
        [ "$n" = punix ] && expect=$case
        measure "$N:$case:$n" "${FN[$n]}" "$expect"
    done
}

# Where the time of one punix run goes, without slowing it down: a poller
# stamps every line sshd appends to its log (every 2 ms), and the phases
# are cut at the connection, the authentication, and the start and close
# of each session punix opens on its one connection: the agent (the
# master's first session: probe, lock and state query, commit), then for a
# first deploy the rsync push. (strace -f slows punix's thread pool
# several-fold, so it is not used for this.)
cat >"$WORK/stamp.py" <<'EOF_PY'
import sys, time
path, out = sys.argv[1], sys.argv[2]
f = open(path, "rb")
f.seek(0, 2)
o = open(out, "w", buffering=1)
buf = b""
while True:
    data = f.read()
    if not data:
        time.sleep(0.002)
        continue
    now = time.time()
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        o.write("%.6f %s\n" % (now, line.decode(errors="replace")))
EOF_PY
STAMP_PID=""
timeline() { # OUT -> runs punix once with the sshd log stamped; OUT gets "T0 T1" then the lines
    local out=$1 t0 t1
    "$PYTHON" "$WORK/stamp.py" "$SSHD_LOG" "$out.log" &
    STAMP_PID=$!
    sleep 0.3
    t0=$EPOCHREALTIME
    run_punix || die "timeline run failed: $(cat "$WORK/punix.err")"
    t1=$EPOCHREALTIME
    sleep 0.3
    kill "$STAMP_PID" 2>/dev/null || true
    wait "$STAMP_PID" 2>/dev/null || true
    STAMP_PID=""
    { echo "$t0 $t1"; cat "$out.log"; } >"$out"
}
phases() { # TIMELINE_FILE -> "tcp auth before-push push agent-rest teardown total" ("-" where absent)
    awk '
        NR == 1 { t0 = $1; t1 = $2; next }
        { t = $1 - t0 }
        / Connection from / && !conn { conn = t }
        / Accepted publickey / && !auth { auth = t }
        / Starting session: / { k++; open[$NF] = k; st[k] = t }
        / Close session: / { en[open[$NF]] = t }
        / Disconnected from user / && !disc { disc = t }
        END {
            total = t1 - t0
            # The agent session ends with the connection; when sshd logged
            # no close of it, the disconnect stands for it.
            if (!en[1]) en[1] = disc
            # 1 the agent (from the login to the end), 2 the rsync push
            if (k != 1 && k != 2) { printf "- - - - - - %.3f\n", total; exit }
            printf "%.3f %.3f ", conn, auth - conn
            if (k == 2) printf "%.3f %.3f %.3f ", st[2] - auth, en[2] - st[2], en[1] - en[2]
            else printf "- - %.3f ", en[1] - auth
            printf "%.3f %.3f\n", total - en[1], total
        }' "$1"
}

# --- the measurement -----------------------------------------------------------
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain -- src builders Cargo.toml Cargo.lock 2>/dev/null | awk '{print $2}' | paste -sd' ' -)
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
# CPU and I/O pressure: the share of the last 60 s in which some task
# waited for a CPU / for I/O.
pressure() { awk '/^some/ {sub("avg60=", "", $3); print $3 "%"}' "/proc/pressure/$1" 2>/dev/null || echo "?"; }
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
PRESSURE_BEFORE="$(pressure cpu) / $(pressure io)"
declare -A BUILD_S FILES BYTES NIX_CLOSURE NOOP_S PH_FIRST PH_UNCH
PH_RELAY=""
route_direct
for n in $NS; do prepare_n "$n"; done

ALL=(punix rsync nixng nixssh)
for n in $NS; do
    use_n "$n"
    ENTRIES=("$PUNIX_STORE_DIR"/[0-9a-f]*-m*-1)
    for ((r = 0; r < FIRST_RUNS; r++)); do
        wipe_n
        round first "$r" "${ALL[@]}"
        log "N=$N first round $((r + 1))/$FIRST_RUNS: punix ${T[$N:first:punix]##* }s rsync ${T[$N:first:rsync]##* }s ssh-ng ${T[$N:first:nixng]##* }s ssh ${T[$N:first:nixssh]##* }s"
    done
    # One warm-up round, not recorded.
    for k in ssh punix rsync nixng nixssh; do "${FN[$k]}" >/dev/null 2>&1 || die "N=$N: warm-up $k failed"; done
    for ((r = 0; r < RUNS; r++)); do
        round unchanged "$r" ssh punix rsync nixng nixssh
        log "N=$N unchanged round $((r + 1))/$RUNS: ssh ${T[$N:unchanged:ssh]##* }s punix ${T[$N:unchanged:punix]##* }s rsync ${T[$N:unchanged:rsync]##* }s ssh-ng ${T[$N:unchanged:nixng]##* }s ssh ${T[$N:unchanged:nixssh]##* }s"
    done
done

# Phases of one first deploy and one redeploy per N (after the rounds).
for n in $NS; do
    use_n "$n"
    ENTRIES=("$PUNIX_STORE_DIR"/[0-9a-f]*-m*-1)
    as_root "chmod -R u+w /tmp/$ID/n$N $R_DEP 2>/dev/null; rm -rf /tmp/$ID/n$N $R_DEP"
    timeline "$WORK/timeline-first-$N"
    PH_FIRST[$N]=$(phases "$WORK/timeline-first-$N")
    timeline "$WORK/timeline-unchanged-$N"
    PH_UNCH[$N]=$(phases "$WORK/timeline-unchanged-$N")
    log "N=$N phases, first: ${PH_FIRST[$N]}; unchanged: ${PH_UNCH[$N]}"
done

# With added round-trip time.
use_n "$NREF"
ENTRIES=("$PUNIX_STORE_DIR"/[0-9a-f]*-m*-1)
log "starting the delay relay (+${DELAY_MS} ms each way)"
"$PYTHON" "$REPO/ci/bench/rtt-proxy.py" "$ADDR" 22 "$DELAY_MS" "$WORK/relay.port" 2>"$WORK/relay.log" &
PROXY_PID=$!
for _ in $(seq 50); do [ -s "$WORK/relay.port" ] && break; sleep 0.1; done
[ -s "$WORK/relay.port" ] || die "the relay did not start: $(cat "$WORK/relay.log")"
PPORT=$(cat "$WORK/relay.port")
# The host's key under the relay's address, taken from the testbed's pins.
awk -v p="$PPORT" 'NR == 1 {print "[127.0.0.1]:" p, $2, $3}' "$TB_KNOWN_HOSTS" >"$WORK/known_hosts.relay"
route_proxy
for k in ssh punix rsync nixng; do "${FN[$k]}" >/dev/null 2>&1 || die "relay warm-up $k failed"; done
for ((r = 0; r < RUNS; r++)); do
    round dunchanged "$r" ssh punix rsync nixng nixssh
    log "+20ms unchanged round $((r + 1))/$RUNS: ssh ${T[$N:dunchanged:ssh]##* }s punix ${T[$N:dunchanged:punix]##* }s rsync ${T[$N:dunchanged:rsync]##* }s ssh-ng ${T[$N:dunchanged:nixng]##* }s ssh ${T[$N:dunchanged:nixssh]##* }s"
done
timeline "$WORK/timeline-relay-unchanged"
PH_RELAY=$(phases "$WORK/timeline-relay-unchanged")
log "+20ms phases, unchanged: $PH_RELAY"
wipe_n
round dfirst 0 "${ALL[@]}"
log "+20ms first: punix ${T[$N:dfirst:punix]}s rsync ${T[$N:dfirst:rsync]}s ssh-ng ${T[$N:dfirst:nixng]}s ssh ${T[$N:dfirst:nixssh]}s"
kill "$PROXY_PID" 2>/dev/null || true
wait "$PROXY_PID" 2>/dev/null || true
PROXY_PID=""
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
PRESSURE_AFTER="$(pressure cpu) / $(pressure io)"

# --- the report ------------------------------------------------------------
med() { # KEY -> median seconds, or ">CAP" if any run hit the cap
    case ${T[$1]:-} in
    *">"*) echo ">$CAP" ;;
    "") echo "-" ;;
    *) echo "${T[$1]}" | median ;;
    esac
}
ratio() { # A B -> A/B with 2 decimals ("-" if either is unknown)
    awk -v a="$1" -v b="$2" 'BEGIN {if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f×", a / b; else if (a ~ /^>/) printf ">%.0f×", substr(a, 2) / b; else print "-"}'
}
conns() { # KEY -> "1" or "1–2"
    local lo hi
    lo=$(echo "${C[$1]}" | tr ' ' '\n' | grep . | sort -n | head -n1)
    hi=$(echo "${C[$1]}" | maxof)
    if [ "$lo" = "$hi" ]; then echo "$lo"; else echo "$lo–$hi"; fi
}
rts() { # KEY -> round trips of punix ("" for others)
    [ -n "${RT[$1]:-}" ] || { echo "–"; return; }
    local lo hi
    lo=$(echo "${RT[$1]}" | tr ' ' '\n' | grep . | sort -n | head -n1)
    hi=$(echo "${RT[$1]}" | maxof)
    if [ "$lo" = "$hi" ]; then echo "$lo"; else echo "$lo–$hi"; fi
}
range() { case ${T[$1]} in *">"*) echo "${T[$1]# }" ;; *) echo "${T[$1]}" | minmax ;; esac; }
ROW_TURNS=""
declare -A LABEL=(
    [ssh]="\`ssh host true\`"
    [punix]="punix deploy"
    [rsync]="\`rsync -a\` of the N store dirs"
    [nixng]="\`nix copy\` ssh-ng://"
    [nixssh]="\`nix copy\` ssh://"
)
row() { # N CASE TOOL CASE-LABEL
    local k="$1:$2:$3" ref_ssh ref_rsync m
    m=$(med "$k")
    ref_ssh=$(med "$1:${2/first/unchanged}:ssh")
    ref_rsync=$(med "$1:$2:rsync")
    printf '| %s%s | %s | %s | %s | %s | %s | %s |' "${LABEL[$3]}" "${4:+, $4}" "$m" "$(range "$k")" \
        "$(ratio "$m" "$ref_ssh")" "$(ratio "$m" "$ref_rsync")" "$(conns "$k")" "$(rts "$k")"
    if [ -n "$ROW_TURNS" ]; then printf ' %s |' "$(echo "${TURNS[$k]:-}" | median | awk '{printf "%g", $1}')"; fi
    echo
}
verdict() { [ "$1" = 1 ] && echo "met" || echo "MISSED"; }
kb_mib() { awk -v k="$1" 'BEGIN {printf "%d KB (%.1f MiB)", k, k / 1024}'; }

# Targets.
t1_ok=1 t1_worst_c=0 t1_worst_rt=0
for n in $NS; do
    for c in unchanged dunchanged; do
        [ -n "${C[$n:$c:punix]:-}" ] || continue
        x=$(echo "${C[$n:$c:punix]}" | maxof)
        y=$(echo "${RT[$n:$c:punix]}" | maxof)
        [ "$x" -gt "$t1_worst_c" ] && t1_worst_c=$x
        [ "$y" -gt "$t1_worst_rt" ] && t1_worst_rt=$y
    done
done
[ "$t1_worst_c" -le 1 ] && [ "$t1_worst_rt" -le 3 ] || t1_ok=0
t2_ok=1 t2_txt="" t3_ok=1 t3_txt=""
for n in $NS; do
    a=$(med "$n:unchanged:punix") b=$(med "$n:unchanged:ssh")
    r=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')
    awk -v r="$r" 'BEGIN {exit !(r <= 1.25)}' || t2_ok=0
    t2_txt+="${t2_txt:+, }N=$n ${r}× ($a s vs $b s)"
    a=$(med "$n:first:punix") b=$(med "$n:first:rsync")
    r=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')
    awk -v r="$r" 'BEGIN {exit !(r <= 1.15)}' || t3_ok=0
    t3_txt+="${t3_txt:+, }N=$n ${r}× ($a s vs $b s)"
done
a=$(med "$NREF:dunchanged:punix") b=$(med "$NREF:dunchanged:ssh")
t4_r=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')
t4_ok=$(awk -v r="$t4_r" 'BEGIN {print (r < 1.5) ? 1 : 0}')
t4_txt="${t4_r}× ($a s vs $b s)"
RSS_FIRST=$(echo "${RSS[$NREF:first:punix]} ${RSS[$NREF:dfirst:punix]}" | maxof)
RSS_UNCH=$(echo "${RSS[$NREF:unchanged:punix]} ${RSS[$NREF:dunchanged:punix]}" | maxof)
RSS_MAX=$(echo "$RSS_FIRST $RSS_UNCH" | maxof)
t5_ok=$(awk -v k="$RSS_MAX" 'BEGIN {print (k * 1024 < 30e6) ? 1 : 0}')
t4_note="" t5_note=""
if [ "$NREF" -ne 1000 ]; then
    t4_note=" (measured at N = $NREF: 1000 is not in this run)"
    t5_note=$t4_note
fi


overrides=""
for v in DEPLOY_BENCH_NS DEPLOY_BENCH_RUNS DEPLOY_BENCH_FIRST_RUNS DEPLOY_BENCH_DELAY_MS DEPLOY_BENCH_TIMEOUT DEPLOY_BENCH_TARGET_FS; do
    if [ -n "${!v:-}" ]; then overrides+="$v=$(printf '%q' "${!v}") "; fi
done

report() {
    echo "## Deploy over SSH (issue 3)"
    echo
    echo "Written by \`${overrides}bash ci/bench/deploy.sh\` on $STARTED, punix \`$COMMIT\`${DIRTY:+ plus uncommitted changes to: $DIRTY};"
    echo "load average before / after: $LOAD_BEFORE / $LOAD_AFTER; CPU / I/O pressure"
    echo "(\`some avg60\` in /proc/pressure) before: $PRESSURE_BEFORE, after: $PRESSURE_AFTER."
    echo "The machine (2 cores, one disk) is shared with other users' builds and tests;"
    echo "the ranges show the noise."
    echo
    echo "One testbed host (\`tests/testbed/hosts-up.sh h1\`: OpenSSH's sshd in its own"
    echo "network namespace on this machine, reached over a veth bridge). Everything the"
    echo "tools write on the target goes to $TARGET_FS$([ "$TARGET_FS" = tmpfs ] && echo " (this machine's one disk is shared and slows down" || echo ".")"
    if [ "$TARGET_FS" = tmpfs ]; then echo "under repeated writes of thousands of small files; see \`DEPLOY_BENCH_TARGET_FS\`)."; fi
    echo "punix deploys as user"
    echo "\`tbdeploy\` (nix copy: root). A closure of N store paths: N packages, each a"
    echo "\`copy\` of a source dir with a 2 KiB and a 4 KiB random file and a README"
    echo "(5 files per store path with punix's \`built\` and \`derivation.json\`), and a"
    echo "stack whose \`store-modules\` lists them all, built once beforehand. \`rsync -a\`"
    echo "copies the same N store dirs to a fresh remote dir; \`nix copy\` copies the"
    echo "same N dirs (\`nix-store --add\`ed into a private local store) plus one path"
    echo "referencing them all to a separate, fresh Nix store behind the same sshd."
    echo "All use the same key and pinned \`known_hosts\`, and a new SSH connection each."
    echo
    echo "Median wall-clock seconds; first copies: $FIRST_RUNS rounds (all target dirs"
    echo "wiped before each); unchanged: $RUNS rounds after one warm-up round; the order"
    echo "rotates every round. \"× ssh true\" divides by the median of \`ssh host true\`"
    echo "of the same N; \"× rsync -a\" by the median \`rsync -a\` of the same case."
    echo "SSH connections: \"Accepted publickey\" lines the command added to the host's"
    echo "sshd log. Round trips: punix's own \`--json\` counter (one per remote step)."
    echo
    local n
    for n in $NS; do
        echo "### N = $n store paths (${FILES[$n]} files, ${BYTES[$n]} bytes; nix: $((n + 1)) paths)"
        echo
        echo "| command | median s | range s | × ssh true | × rsync -a | SSH connections | round trips |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        row "$n" unchanged ssh ""
        row "$n" first punix "first"
        row "$n" first rsync "first"
        row "$n" first nixng "first"
        row "$n" first nixssh "first"
        row "$n" unchanged punix "unchanged"
        row "$n" unchanged rsync "unchanged"
        row "$n" unchanged nixng "unchanged"
        row "$n" unchanged nixssh "unchanged"
        echo
        echo "punix: first deploy sent ${BSENT[$n:first:punix]} bytes (\`bytes_sent\`); its own"
        echo "\`seconds\` (JSON) median $(echo "${SEC[$n:first:punix]}" | median | xargs printf %.4f) s first,"
        echo "$(echo "${SEC[$n:unchanged:punix]}" | median | xargs printf %.4f) s unchanged. Peak RSS: first $(kb_mib "$(echo "${RSS[$n:first:punix]}" | maxof)"),"
        echo "unchanged $(kb_mib "$(echo "${RSS[$n:unchanged:punix]}" | maxof)") (max of the runs). Local build of the"
        echo "N packages: ${BUILD_S[$n]} s; a no-op \`punix build\` of them (recipes + hashing, the"
        echo "local half of every deploy): ${NOOP_S[$n]} s."
        echo
    done
    echo "### With +$(awk -v d="$DELAY_MS" 'BEGIN {print 2 * d}') ms round-trip time, N = $NREF"
    echo
    echo "Through \`ci/bench/rtt-proxy.py\`, a Python asyncio TCP relay on a loopback port"
    echo "that holds every chunk $DELAY_MS ms in each direction (latency only, chunks"
    echo "pipelined); every tool targets \`127.0.0.1:PORT\` with the host's key pinned"
    echo "under \`[127.0.0.1]:PORT\`. Unchanged: $RUNS rounds after a warm-up; first: one"
    echo "run each after wiping the target dirs. \`nix copy\` capped at ${CAP} s."
    echo
    echo "| command | median s | range s | × ssh true | × rsync -a | SSH connections | round trips | relay: direction changes |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    ROW_TURNS=1
    row "$NREF" dunchanged ssh ""
    row "$NREF" dfirst punix "first"
    row "$NREF" dfirst rsync "first"
    row "$NREF" dfirst nixng "first"
    row "$NREF" dfirst nixssh "first"
    row "$NREF" dunchanged punix "unchanged"
    row "$NREF" dunchanged rsync "unchanged"
    row "$NREF" dunchanged nixng "unchanged"
    row "$NREF" dunchanged nixssh "unchanged"
    ROW_TURNS=""
    echo
    echo "(\"× ssh true\" here divides by \`ssh host true\` through the relay. Direction"
    echo "changes: median count of the times the traffic of the command's connections"
    echo "changed direction at the relay; a request and its answer are two, so half of"
    echo "it is about the number of network round trips, each costing 20 ms here.)"
    echo
    echo "### Where punix's time goes"
    echo
    echo "One more first deploy (fresh target dirs) and one redeploy per N, not"
    echo "traced: a poller stamps each line the host's sshd logs (every 2 ms), and the"
    echo "phases are cut where punix's one connection is accepted and authenticated and"
    echo "where each of its sessions starts and closes. punix has one session of its own,"
    echo "the agent (a \`sh\` started with the login that runs the probe, the lock and"
    echo "state query in one round trip, and the commit), plus the rsync push on a"
    echo "first deploy. The last row goes through the relay (+20 ms round-trip time). Seconds:"
    echo
    echo "| N | run | start → TCP connect | → logged in | → push starts (probe, local work, lock + state query) | push (rsync) | → agent session closes (after the push: the commit; unchanged: everything after the login) | → punix exits | total |"
    echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    local p
    for n in $NS; do
        read -r -a p <<<"${PH_FIRST[$n]}"
        printf '| %s | first | %s | %s | %s | %s | %s | %s | %s |\n' "$n" "${p[@]}"
        read -r -a p <<<"${PH_UNCH[$n]}"
        printf '| %s | unchanged | %s | %s | %s | %s | %s | %s | %s |\n' "$n" "${p[@]}"
    done
    read -r -a p <<<"$PH_RELAY"
    printf '| %s | unchanged, +20 ms RTT | %s | %s | %s | %s | %s | %s | %s |\n' "$NREF" "${p[@]}"
    echo
    echo "For comparison, the median \`ssh host true\` and the local half of a deploy"
    echo "alone (a no-op \`punix build\` of the same recipes: loading and hashing):"
    local line=""
    for n in $NS; do
        line+="${line:+; }N = $n: $(med "$n:unchanged:ssh") s and ${NOOP_S[$n]} s"
    done
    echo "$line."
    echo
    echo "### Targets"
    echo
    echo "- Unchanged redeploy ≤ 1 SSH connection and ≤ 3 round trips whatever N:"
    echo "  **$(verdict $t1_ok)** (at most $t1_worst_c connection(s) and $t1_worst_rt round trips over all runs, N = ${NS// /, }, with and without the relay)."
    echo "- Unchanged redeploy ≤ 1.25× \`ssh host true\`: **$(verdict $t2_ok)** ($t2_txt)."
    echo "- First deploy ≤ 1.15× one raw \`rsync -a\`: **$(verdict $t3_ok)** ($t3_txt)."
    echo "- With +20 ms RTT, unchanged redeploy of 1,000 paths < 1.5× \`ssh host true\`:"
    echo "  **$(verdict "$t4_ok")** ($t4_txt)$t4_note."
    echo "- Peak memory < 30 MB (30,000,000 bytes) at N = 1,000: **$(verdict "$t5_ok")**"
    echo "  (first deploy $(kb_mib "$RSS_FIRST"), redeploy $(kb_mib "$RSS_UNCH"); max over all runs, \`/usr/bin/time -f %M\`: punix or its largest child)$t5_note."
    echo
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
    report
else
    report
fi
log "done"
