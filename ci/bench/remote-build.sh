#!/usr/bin/env bash
# Benchmark: the overhead of a remote build, `punix build --builders-only`
# of a trivial package on a registered builder, against a bare `ssh host
# true` to the same host.
#
# Starts its own testbed host (tests/testbed/hosts-up.sh h1) and stops it on
# exit. Registers h1 as an x86_64-linux builder (`punix builders add`, in a
# registry file of its own), writes one trivial package (a script that
# writes one file to $out, no sources, no inputs), and then, in
# REMOTE_BENCH_RUNS rounds (after one warm-up round) whose order alternates:
#   - `ssh host true` (a new connection, the same key and pinned known_hosts);
#   - `punix build --file DIR --system x86_64-linux --builders FILE
#     --builders-only --explain`, the output deleted from the local store
#     (`punix store gc`, untimed) before every build, and checked to be
#     back (built on h1, says --explain) after it;
# per command: wall-clock seconds, the 1-minute load average when it
# started, the new SSH connections ("Accepted publickey" lines in h1's sshd
# log) and sessions ("Starting session:" lines), and for punix its CPU time
# and peak RSS (`/usr/bin/time`: punix and its children / punix or its
# largest child).
# Then three more builds, not timed: one under `strace -f -e
# trace=execve,connect` (which processes punix starts, and every connection
# to its control socket: rsync's `ssh -S`, the master's stop request), one
# with `--json` (punix's own count of round trips to the builder), and one
# with h1's sshd log stamped every 2 ms (when each session starts and
# closes).
# The store root is /tmp/punix-rbuild-XXXXXX/store on both sides (the host's
# /tmp is its own).
#
# Usage: bash ci/bench/remote-build.sh      (as root: the testbed needs it)
# Environment:
#   REMOTE_BENCH_RUNS  timed rounds (default 5)
#   BENCH_PUNIX        the punix binary to measure (default: build it here)
#   BENCH_PUNIX_COMMIT "COMMIT [CHANGED-FILE...]" the binary was built from, for
#                      the report (default: the working tree's commit and changed
#                      files now)
#   BENCH_MD           append the Markdown section to this file (else stdout)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."
REPO=$PWD

RUNS=${REMOTE_BENCH_RUNS:-5}

BENCH_NAME=remote-build.sh
. ci/bench/lib.sh
[[ $RUNS =~ ^[0-9]+$ ]] && [ "$RUNS" -ge 1 ] || die "REMOTE_BENCH_RUNS must be a whole number >= 1, not \`$RUNS\`"
[ "$(id -u)" -eq 0 ] || die "run as root (the testbed makes network namespaces and mounts)"

# --- tools -----------------------------------------------------------------
pkgs=()
[ -x /usr/bin/time ] || pkgs+=(time)
command -v python3 >/dev/null || pkgs+=(python3)
command -v strace >/dev/null || pkgs+=(strace)
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
# /tmp on purpose: the store root is the same path on the builder.
WORK=$(mktemp -d /tmp/punix-rbuild-XXXXXX)
ID=$(basename "$WORK")
TB_DIR=""
STAMP_PID=""
cleanup() {
    local rc=$?
    if [ -n "$STAMP_PID" ]; then kill "$STAMP_PID" 2>/dev/null || true; fi
    if [ -n "$TB_DIR" ]; then bash "$REPO/tests/testbed/hosts-down.sh" "$TB_DIR" >/dev/null 2>&1 || true; fi
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting the testbed host h1"
TB_DIR=$(bash tests/testbed/hosts-up.sh h1 2>"$WORK/hosts-up.log") || {
    cat "$WORK/hosts-up.log" >&2
    die "hosts-up.sh failed"
}
# shellcheck disable=SC1091
. "$TB_DIR/env"
ADDR=$TB_HOST_h1_ADDR
SSHD_LOG=$TB_DIR/hosts/h1/sshd.log
export HOME=$WORK/home PUNIX_CONFIG=$WORK/config.toml XDG_CACHE_HOME=$WORK/cache
export PUNIX_STORE_DIR=$WORK/store
mkdir -p "$HOME" "$WORK/recipes"
SSH_OPTS=(-i "$TB_KEY" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$TB_KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes)
REG=$WORK/builders.toml
RECIPES=$WORK/recipes
count_in() { grep -c "$1" "$SSHD_LOG" || true; }

cat >"$RECIPES/triv.toml" <<'EOF'
[package.Triv]
pname = "triv"
version = "1"
script = 'mkdir -p "$out" && echo hello > "$out/hello.txt"'
EOF

log "registering h1 as a builder"
"$PUNIX" builders add h1 "ssh://tbdeploy@[$ADDR]" --builders "$REG" --key "$TB_KEY" \
    --known-hosts "$TB_KNOWN_HOSTS" --systems x86_64-linux >"$WORK/add.out" 2>&1 || {
    cat "$WORK/add.out" >&2
    die "punix builders add failed"
}

# --- the commands ----------------------------------------------------------
BUILD=("$PUNIX" build --file "$RECIPES" --system x86_64-linux --builders "$REG" --builders-only --explain)
entry() { find "$PUNIX_STORE_DIR" -maxdepth 1 -name '*-triv-1' | head -n1; }
delete_output() {
    "$PUNIX" store gc >/dev/null 2>&1 || die "punix store gc failed"
    [ -z "$(entry)" ] || die "the output is still in the store after gc: $(entry)"
}
check_build() { # --explain (stderr, in build.err) says Triv was built on h1
    grep -q '^Triv (triv-1, x86_64-linux): built on h1 ' "$WORK/build.err" &&
        grep -q '^built 1 package(s) (1 on builders)' "$WORK/build.err" ||
        die "unexpected build output: $(cat "$WORK/build.err")"
    [ -n "$(entry)" ] || die "no output in the store after the build"
}
load1() { cut -d' ' -f1 /proc/loadavg; }

declare -A T LOAD CONN SESS
CPU="" RSS=""
measure() { # ssh|build
    local k=$1 c0 s0 t0 t1 rc=0
    [ "$k" = ssh ] || delete_output
    c0=$(count_in 'Accepted publickey')
    s0=$(count_in 'Starting session:')
    LOAD[$k]+=" $(load1)"
    t0=$EPOCHREALTIME
    if [ "$k" = ssh ]; then
        ssh "${SSH_OPTS[@]}" "tbdeploy@$ADDR" true || rc=$?
    else
        /usr/bin/time -f '%M %U %S' -o "$WORK/time" "${BUILD[@]}" >"$WORK/build.out" 2>"$WORK/build.err" || rc=$?
    fi
    t1=$EPOCHREALTIME
    if [ "$rc" -ne 0 ]; then
        [ "$k" = ssh ] || cat "$WORK/build.err" >&2
        die "$k failed (exit $rc)"
    fi
    T[$k]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')"
    CONN[$k]+=" $(($(count_in 'Accepted publickey') - c0))"
    SESS[$k]+=" $(($(count_in 'Starting session:') - s0))"
    if [ "$k" = build ]; then
        check_build
        local rss u sy
        read -r rss u sy < <(tail -n1 "$WORK/time")
        RSS+=" $rss"
        CPU+=" $(awk -v u="$u" -v s="$sy" 'BEGIN {printf "%.2f", u + s}')"
    fi
}

# --- the measurement -----------------------------------------------------------
# What the binary was built from: BENCH_PUNIX_COMMIT when given (the tree
# may have moved on since BENCH_PUNIX was built), else the tree now.
if [ -n "${BENCH_PUNIX_COMMIT:-}" ]; then
    read -r COMMIT DIRTY <<<"$BENCH_PUNIX_COMMIT"
else
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    DIRTY=$(git status --porcelain -- src builders Cargo.toml Cargo.lock 2>/dev/null | awk '{print $2}' | paste -sd' ' -)
fi
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# Warm-up round, not recorded.
ssh "${SSH_OPTS[@]}" "tbdeploy@$ADDR" true
delete_output
"${BUILD[@]}" >"$WORK/build.out" 2>"$WORK/build.err" || {
    cat "$WORK/build.err" >&2
    die "warm-up build failed"
}
check_build
cp "$WORK/build.err" "$WORK/explain.txt"
for ((r = 0; r < RUNS; r++)); do
    if ((r % 2)); then
        measure build
        measure ssh
    else
        measure ssh
        measure build
    fi
    log "round $((r + 1))/$RUNS: ssh true ${T[ssh]##* }s, build ${T[build]##* }s (load $(load1))"
done

# Which processes punix starts and how often it connects to its control
# socket, from one build under strace (not timed: strace slows it down).
delete_output
strace -f -qq -e trace=execve,connect -e signal=none -s 300 -o "$WORK/strace.txt" "${BUILD[@]}" >"$WORK/build.out" 2>"$WORK/build.err" ||
    die "the build under strace failed"
check_build
# The control socket: the path after -S of the master's ssh.
CTL=$(grep -m1 'execve("/usr/bin/ssh", \["ssh", .*"-M"' "$WORK/strace.txt" | grep -o '"-S", "[^"]*"' | cut -d'"' -f4)
[ -n "$CTL" ] || die "no control master in the strace output"
# In order: M = a connection to the control socket, R = rsync started.
# (Only the execve that succeeded: rsync and ssh are looked up along PATH.)
SEQ=$(grep -E "connect\(.*sun_path=\"$CTL\"|execve\(\"[^\"]*/rsync\".* = 0$" "$WORK/strace.txt" |
    awk '/execve/ {printf "R"; next} {printf "M"}')
ST_CTL=$(echo -n "$SEQ" | tr -cd M | wc -c)
ST_RSYNC=$(echo -n "$SEQ" | tr -cd R | wc -c)
ST_SSH=$(grep -c 'execve("[^"]*/ssh", .* = 0$' "$WORK/strace.txt" || true)
ST_TCP=$(grep -c 'connect(.*AF_INET' "$WORK/strace.txt" || true)
log "strace: control-socket connections $ST_CTL, rsync runs $ST_RSYNC, ssh processes $ST_SSH, TCP connects $ST_TCP; order $SEQ"

# punix's own count of round trips to the builder (scripts and lock
# requests waited for, rsync runs), from one more build with --json.
delete_output
"${BUILD[@]}" --json >"$WORK/build.json" 2>"$WORK/build.err" || die "the --json build failed: $(cat "$WORK/build.err")"
RT_JSON=$("$PYTHON" -c 'import json, sys; b = json.load(open(sys.argv[1]))["builders"]; print(b[0]["round_trips"] if len(b) == 1 else "")' "$WORK/build.json")
[[ $RT_JSON =~ ^[0-9]+$ ]] || die "no round-trip count in $(cat "$WORK/build.json")"
log "punix --json: $RT_JSON round trips to h1"

# When each session starts and closes, from one more build with h1's sshd
# log stamped every 2 ms (not timed with the others).
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
delete_output
"$PYTHON" "$WORK/stamp.py" "$SSHD_LOG" "$WORK/stamped.log" &
STAMP_PID=$!
sleep 0.3
t0=$EPOCHREALTIME
"${BUILD[@]}" >"$WORK/build.out" 2>"$WORK/build.err" || die "the stamped build failed"
t1=$EPOCHREALTIME
sleep 0.3
kill "$STAMP_PID" 2>/dev/null || true
wait "$STAMP_PID" 2>/dev/null || true
STAMP_PID=""
check_build
# "start close" per session in the order they started, then the total.
awk -v t0="$t0" -v t1="$t1" '
    { t = $1 - t0 }
    / Connection from / && conn == "" { conn = t }
    / Accepted publickey / && auth == "" { auth = t }
    / Starting session: / { k++; open[$NF] = k; st[k] = t }
    / Close session: / { en[open[$NF]] = t }
    / Disconnected from / { disc = t }
    END {
        printf "conn %.3f\nauth %.3f\n", conn, auth
        for (i = 1; i <= k; i++) printf "session %.3f %.3f\n", st[i], en[i]
        printf "disc %.3f\ntotal %.3f\n", disc, t1 - t0
    }' "$WORK/stamped.log" >"$WORK/phases"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the report ------------------------------------------------------------
med() { echo "${T[$1]}" | median; }
mm() { echo "$1" | minmax; }
kb_mib() { awk -v k="$1" 'BEGIN {printf "%d KB (%.1f MiB)", k, k / 1024}'; }
verdict() { [ "$1" = 1 ] && echo "met" || echo "MISSED"; }
B=$(med build) S=$(med ssh)
OVER=$(awk -v a="$B" -v b="$S" 'BEGIN {printf "%.3f s (%.2f×)", a - b, a / b}')
SESS_MAX=$(echo "${SESS[build]}" | maxof)
SESS_MIN=$(echo "${SESS[build]}" | tr ' ' '\n' | grep . | sort -n | head -n1)
# Round trips beyond the transfers: punix's count less the rsync runs.
BEYOND=$((RT_JSON - ST_RSYNC))
t_ok=$([ "$BEYOND" -le 6 ] && echo 1 || echo 0)
# Names of the sessions, when the build took the expected shape: the agent
# (the master's first session, which runs every script), then one session
# per rsync run.
NAMES=()
if [ "$SESS_MAX" -eq $((1 + ST_RSYNC)) ] && [ "$SESS_MIN" -eq "$SESS_MAX" ]; then
    NAMES=("the agent (the master's first session: every script)")
    for ((i = 0; i < ST_RSYNC; i++)); do NAMES+=("rsync (a transfer)"); done
fi

report() {
    echo "### Remote build of a trivial package"
    echo
    echo "Written by \`${REMOTE_BENCH_RUNS:+REMOTE_BENCH_RUNS=$RUNS }bash ci/bench/remote-build.sh\` on $STARTED, punix \`$COMMIT\`${DIRTY:+ plus uncommitted changes to: $DIRTY};"
    echo "load average before / after: $LOAD_BEFORE / $LOAD_AFTER (2 cores, shared with"
    echo "other users' builds and tests; the builder's sshd and shells run on them too)."
    echo
    echo "One testbed host, \`h1\` (\`tests/testbed/hosts-up.sh h1\`), registered as an"
    echo "x86_64-linux builder with \`punix builders add h1 'ssh://tbdeploy@[ADDR]' --builders"
    echo "FILE --key \$TB_KEY --known-hosts \$TB_KNOWN_HOSTS --systems x86_64-linux\`. The package:"
    echo
    echo '```toml'
    cat "$RECIPES/triv.toml"
    echo '```'
    echo
    echo "$RUNS rounds after a warm-up round, the order alternating; before every build"
    echo "the output is deleted from the local store (\`punix store gc\`, not timed), so"
    echo "each run builds it on h1 again (checked: \`--explain\` says \"built on h1\", and the"
    echo "entry is back in the store). Connections and sessions: the \"Accepted"
    echo "publickey\" and \"Starting session:\" lines the command added to h1's sshd log."
    echo
    echo '```sh'
    echo "punix build --file DIR --system x86_64-linux --builders FILE --builders-only --explain"
    echo "ssh -i \$TB_KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=\$TB_KNOWN_HOSTS \\"
    echo "  -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes tbdeploy@ADDR true"
    echo '```'
    echo
    echo "| command | median s | range s | × ssh true | SSH connections | sessions | load (1 min) at start |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '| `ssh host true` | %s | %s | 1.00× | %s | %s | %s |\n' "$S" "$(mm "${T[ssh]}")" "$(mm "${CONN[ssh]}")" "$(mm "${SESS[ssh]}")" "$(mm "${LOAD[ssh]}")"
    printf '| remote build, `--builders-only` | %s | %s | %s | %s | %s | %s |\n' "$B" "$(mm "${T[build]}")" \
        "$(awk -v a="$B" -v b="$S" 'BEGIN {printf "%.2f×", a / b}')" "$(mm "${CONN[build]}")" "$(mm "${SESS[build]}")" "$(mm "${LOAD[build]}")"
    echo
    echo "Overhead of the remote build over \`ssh host true\`: $OVER (medians). punix's CPU"
    echo "time (user + system, with its children: the ssh master, rsync and its ssh):"
    echo "median $(echo "$CPU" | median | xargs printf %.2f) s; peak RSS $(kb_mib "$(echo "$RSS" | maxof)") (max, punix or its largest child)."
    echo
    echo "Sessions and round trips, counted two ways:"
    echo
    echo "- h1's sshd log: $(mm "${CONN[build]}") connection(s) and $(mm "${SESS[build]}") sessions per build."
    echo "- \`strace -f -e trace=execve,connect\` of one more build: $ST_TCP TCP connection(s)"
    echo "  (by the one ssh master; $ST_SSH ssh processes: the master and rsync's), $ST_CTL connections to the master's control socket, and"
    echo "  $ST_RSYNC rsync run(s) (the transfers; rsync's \`ssh -S\` is one of those $ST_CTL"
    echo "  connections). In order (M: a control-socket connection, R: rsync starts):"
    echo "  \`$SEQ\`. (The ssh that starts the master keeps its first session, the agent, as a"
    echo "  client of it, and the last M is the master's stop request when punix exits.)"
    echo "- punix's own count (\`builders[].round_trips\` of \`--json\`, one more build): $RT_JSON"
    echo "  round trips to h1: every script the agent ran and every rsync run, each waited for."
    echo
    if ((${#NAMES[@]})); then
        echo "The sessions, from one more build with h1's sshd log stamped every 2 ms"
        echo "(seconds from punix's start; TCP connection at $(awk '$1 == "conn" {print $2}' "$WORK/phases"), logged in at"
        echo "$(awk '$1 == "auth" {print $2}' "$WORK/phases"), disconnected at $(awk '$1 == "disc" {print $2}' "$WORK/phases"), punix exited at $(awk '$1 == "total" {print $2}' "$WORK/phases")):"
        echo
        echo "| # | session | starts | closes | lasts (ms) |"
        echo "| ---: | --- | ---: | ---: | ---: |"
        awk -v names="$(printf '%s\n' "${NAMES[@]}")" '
            BEGIN { n = split(names, nm, "\n") }
            $1 == "session" { i++; printf "| %d | %s | %s | %s | %.0f |\n", i, nm[i], $2, $3, ($3 - $2) * 1000 }' "$WORK/phases"
        echo
        echo "(The agent's session lasts the whole run.)"
        echo
    fi
    echo "Target: at most 6 round trips beyond the transfers: **$(verdict "$t_ok")**."
    echo "Beyond the $ST_RSYNC transfer(s) punix waited for $BEYOND round trip(s), the builder"
    echo "probe's 2 (made once per run and builder) among them. The connection itself"
    echo "(TCP, key exchange, authentication) is the part \`ssh host true\` also pays."
    echo
    echo "What \`--explain\` printed (warm-up build):"
    echo
    echo '```text'
    sed -e "s|$WORK|/tmp/WORK|g" -e "s|$ADDR|ADDR|g" "$WORK/explain.txt"
    echo '```'
    echo
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
fi
report
log "done"
