#!/usr/bin/env bash
# Benchmark: a fleet deploy, `punix service deploy STACK --target ... --target
# ...`, of one stack to 1, 3 and 6 hosts at once, against the same deploy to
# one host and against `ssh host true`.
#
# Starts its own testbed (tests/testbed/hosts-up.sh h1 ... h6: real sshds,
# each in its own network namespace) and stops it on exit. Generates one
# stack `Fleet`: FLEET_BENCH_PACKAGES (default 20) small packages (each a
# `copy` of a source dir with a 2 KiB and a 4 KiB random file and a README)
# in its `store-modules`, and one config file. Each fleet size K gets its
# own store root (/tmp/punix-fleet-XXXXXX/kK/store, the same path on the
# hosts, whose /tmp is their own) and its own deployments and unit dirs
# (/srv/deploy/punix-fleet-XXXXXX-kK), so the sizes never see each other's
# paths; the closure is built once per size beforehand. Then, in rounds
# whose order rotates (a load spike from another user of the machine hits
# all sizes alike):
#   - first deploys: every host's store and deploy dirs wiped before each
#     round, then a deploy to h1, to h1..h3, to h1..h6 (FLEET_BENCH_RUNS
#     rounds);
#   - unchanged redeploys: one warm-up round, then FLEET_BENCH_RUNS rounds;
#   - `ssh h1 true` in every round;
#   - and, for scale, the same deploys to all hosts with `--parallel 1`
#     (one host after the other).
# Per command: wall-clock seconds, the 1-minute load average when it
# started, the new SSH connections on each host ("Accepted publickey"
# lines in its sshd log) and sessions ("Starting session:" lines), the
# per-target `counters` of punix's `--json` report, and punix's peak RSS
# (`/usr/bin/time -f %M`: punix or its largest child).
#
# Usage: bash ci/bench/fleet.sh            (as root: the testbed needs it)
# Environment:
#   FLEET_BENCH_SIZES     fleet sizes (default "1 3 6"; at most 9 hosts)
#   FLEET_BENCH_PACKAGES  packages in the stack (default 20)
#   FLEET_BENCH_RUNS      timed rounds of each case (default 3)
#   FLEET_BENCH_SEQUENTIAL  1 (default) adds the `--parallel 1` rows, 0 drops them
#   BENCH_PUNIX           the punix binary to measure (default: build it here)
#   BENCH_PUNIX_COMMIT    "COMMIT [CHANGED-FILE...]" the binary was built from, for
#                         the report (default: the working tree's commit and changed
#                         files now)
#   BENCH_MD              append the Markdown section to this file (else stdout)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/../.."
REPO=$PWD

SIZES=${FLEET_BENCH_SIZES:-1 3 6}
NPKG=${FLEET_BENCH_PACKAGES:-20}
RUNS=${FLEET_BENCH_RUNS:-3}
SEQ=${FLEET_BENCH_SEQUENTIAL:-1}

BENCH_NAME=fleet.sh
. ci/bench/lib.sh
[ -n "${SIZES// /}" ] || die "FLEET_BENCH_SIZES is empty"
for k in $SIZES; do
    [[ $k =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] && [ "$k" -le 9 ] || die "FLEET_BENCH_SIZES must list whole numbers 1..9, not \`$SIZES\`"
done
for v in NPKG RUNS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || die "$v must be a whole number >= 1, not \`${!v}\`"
done
[[ $SEQ =~ ^[01]$ ]] || die "FLEET_BENCH_SEQUENTIAL must be 0 or 1, not \`$SEQ\`"
[ "$(id -u)" -eq 0 ] || die "run as root (the testbed makes network namespaces and mounts)"
KMAX=$(printf '%s\n' $SIZES | sort -n | tail -n1)
KMIN=$(printf '%s\n' $SIZES | sort -n | head -n1)

# --- tools -----------------------------------------------------------------
pkgs=()
[ -x /usr/bin/time ] || pkgs+=(time)
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
# /tmp on purpose: the store root is the same path on the hosts.
WORK=$(mktemp -d /tmp/punix-fleet-XXXXXX)
ID=$(basename "$WORK")
TB_DIR=""
cleanup() {
    local rc=$?
    if [ -n "${STAMP_PID:-}" ]; then kill "$STAMP_PID" 2>/dev/null || true; fi
    if [ -n "$TB_DIR" ]; then bash "$REPO/tests/testbed/hosts-down.sh" "$TB_DIR" >/dev/null 2>&1 || true; fi
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HOSTS=()
for ((i = 1; i <= KMAX; i++)); do HOSTS+=("h$i"); done
log "starting the testbed hosts ${HOSTS[*]}"
TB_DIR=$(bash tests/testbed/hosts-up.sh "${HOSTS[@]}" 2>"$WORK/hosts-up.log") || {
    cat "$WORK/hosts-up.log" >&2
    die "hosts-up.sh failed"
}
# shellcheck disable=SC1091
. "$TB_DIR/env"
export HOME=$WORK/home PUNIX_CONFIG=$WORK/config.toml XDG_CACHE_HOME=$WORK/cache
mkdir -p "$HOME"
url_of() { local a="TB_HOST_$1_ADDR"; echo "ssh://tbdeploy@[${!a}]"; }
SSH_OPTS=(-i "$TB_KEY" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$TB_KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes)
H1_ADDR=$TB_HOST_h1_ADDR
as_root() { ssh -F "$TB_SSH_CONFIG" -l root "$1" "$2"; }
sshd_log() { echo "$TB_DIR/hosts/$1/sshd.log"; }
count_in() { grep -c "$2" "$(sshd_log "$1")" || true; }

# --- the stack, one copy per fleet size ------------------------------------
# A "case" is a fleet size K, or "sK" for all K hosts with --parallel 1.
CASES=()
for k in $SIZES; do CASES+=("$k"); done
[ "$SEQ" = 0 ] || CASES+=("s$KMAX")
hosts_of() { local c=$1; echo "${HOSTS[@]:0:${c#s}}"; }

log "generating the stack ($NPKG packages + 1 config file)"
mkdir -p "$WORK/src"
for ((i = 0; i < NPKG; i++)); do
    mkdir -p "$WORK/src/m$i/share"
    head -c 2048 /dev/urandom >"$WORK/src/m$i/share/a.bin"
    head -c 4096 /dev/urandom >"$WORK/src/m$i/share/b.bin"
    echo "module $i" >"$WORK/src/m$i/README"
done
declare -A BUILD_S
for c in "${CASES[@]}"; do
    d=$WORK/k$c
    mkdir -p "$d/recipes"
    cp -r "$WORK/src" "$d/recipes/src"
    {
        for ((i = 0; i < NPKG; i++)); do
            printf '[package.M%d]\npname = "m%d"\nversion = "1"\nbuilder = "copy"\nsrc = "src/m%d"\n\n' "$i" "$i" "$i"
        done
    } >"$d/recipes/packages.toml"
    {
        printf '[stack.Fleet]\nstore-modules = ['
        for ((i = 0; i < NPKG; i++)); do printf '%s"M%d"' "$([ "$i" -eq 0 ] || echo ', ')" "$i"; done
        printf ']\n\n[[stack.Fleet.config-files]]\npath = "/srv/deploy/%s-k%s/etc/app.conf"\ncontent = "workers = 4\\nlisten = \\"[::]:8080\\"\\n"\nmode = "0644"\n' "$ID" "$c"
    } >"$d/recipes/stack.toml"
    t0=$EPOCHREALTIME
    PUNIX_STORE_DIR=$d/store "$PUNIX" build -f "$d/recipes" >/dev/null 2>"$d/build.log" || {
        tail -n 30 "$d/build.log" >&2
        die "k$c: punix build failed"
    }
    BUILD_S[$c]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.2f", b - a}')
done
ENTRIES=("$WORK/k${CASES[0]}/store"/[0-9a-f]*-m*-1)
[ "${#ENTRIES[@]}" -eq "$NPKG" ] || die "${#ENTRIES[@]} store entries, not $NPKG"
FILES=$(find "${ENTRIES[@]}" -type f | wc -l)
BYTES=$(find "${ENTRIES[@]}" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')

# Wipe every host's copy of every case (as root, in parallel).
wipe_all() {
    local h pids=()
    for h in "${HOSTS[@]}"; do
        as_root "$h" "chmod -R u+w /tmp/$ID /srv/deploy/$ID-* 2>/dev/null; rm -rf /tmp/$ID /srv/deploy/$ID-*" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || die "wiping the hosts failed"; done
}

# --- the commands ----------------------------------------------------------
deploy_cmd() { # CASE -> the argv of the deploy, in CMD
    local c=$1 h
    CMD=("$PUNIX" service deploy Fleet -f "$WORK/k$c/recipes")
    for h in $(hosts_of "$c"); do CMD+=(--target "$(url_of "$h")"); done
    [[ $c != s* ]] || CMD+=(--parallel 1)
    CMD+=(--key "$TB_KEY" --known-hosts "$TB_KNOWN_HOSTS"
        --deployments-root "/srv/deploy/$ID-k$c/deployments" --unit-dir "/srv/deploy/$ID-k$c/units" --json)
}

# Checks punix's --json report ($1) for case size $2 and expectation $3
# (first|unchanged); prints per target "connections round_trips seconds".
cat >"$WORK/check.py" <<'EOF_PY'
import json, sys
path, k, expect, npkg = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
doc = json.load(open(path))
if "targets" in doc:
    if not doc["ok"]:
        sys.exit("not ok: " + json.dumps(doc))
    reports = [t["report"] for t in doc["targets"]]
else:
    reports = [doc]
if len(reports) != k:
    sys.exit(f"{len(reports)} targets, not {k}")
for r in reports:
    if expect == "first" and not (r["pushed"] == npkg and r["cached"] == 0 and r["new_generation"]):
        sys.exit(f"{r['target']}: not a first deploy of {npkg} paths: {json.dumps(r)}")
    if expect == "unchanged" and not (r["unchanged"] and r["pushed"] == 0):
        sys.exit(f"{r['target']}: not an unchanged redeploy: {json.dumps(r)}")
    c = r["counters"]
    print(r["target"], c["connections"], c["round_trips"], r["seconds"])
EOF_PY

load1() { cut -d' ' -f1 /proc/loadavg; }
# Busy and total jiffies of all CPUs, for the machine's CPU use during a run.
cpu_stat() { awk '/^cpu / {b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6}' /proc/stat; }
busy_pct() { # "B0 T0" "B1 T1" -> percent of the machine's CPU time busy
    awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); if (y[2] > x[2]) printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]); else print 0}'
}

# Results under key "<phase>:<case>" (phase first|unchanged), "ssh:K" for
# `ssh true` to K hosts at once.
declare -A T RSS CPU BUSY LOAD CONN SESS JCONN JRT
measure_deploy() { # PHASE CASE
    local ph=$1 c=$2 key="$1:$2" h before_c=() before_s=() t0 t1 s0 i=0 rc=0
    deploy_cmd "$c"
    for h in $(hosts_of "$c"); do
        before_c+=("$(count_in "$h" 'Accepted publickey')")
        before_s+=("$(count_in "$h" 'Starting session:')")
    done
    LOAD[$key]+=" $(load1)"
    s0=$(cpu_stat)
    t0=$EPOCHREALTIME
    PUNIX_STORE_DIR=$WORK/k$c/store /usr/bin/time -f '%M %U %S' -o "$WORK/rss" "${CMD[@]}" >"$WORK/out.json" 2>"$WORK/err" || rc=$?
    t1=$EPOCHREALTIME
    BUSY[$key]+=" $(busy_pct "$s0" "$(cpu_stat)")"
    if [ "$rc" -ne 0 ]; then
        cat "$WORK/err" "$WORK/out.json" >&2
        die "$key: punix failed (exit $rc)"
    fi
    T[$key]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')"
    read -r rss u sy < <(tail -n1 "$WORK/rss")
    RSS[$key]+=" $rss"
    CPU[$key]+=" $(awk -v u="$u" -v s="$sy" 'BEGIN {printf "%.2f", u + s}')"
    for h in $(hosts_of "$c"); do
        CONN[$key]+=" $(($(count_in "$h" 'Accepted publickey') - before_c[i]))"
        SESS[$key]+=" $(($(count_in "$h" 'Starting session:') - before_s[i]))"
        i=$((i + 1))
    done
    "$PYTHON" "$WORK/check.py" "$WORK/out.json" "${c#s}" "$ph" "$NPKG" >"$WORK/targets" || die "$key: unexpected report"
    while read -r _ jc jr _; do
        JCONN[$key]+=" $jc"
        JRT[$key]+=" $jr"
    done <"$WORK/targets"
}
measure_ssh() { # K: `ssh hI true` to h1..hK at once
    local k=$1 key="ssh:$1" t0 t1 s0 h pids=() p
    LOAD[$key]+=" $(load1)"
    s0=$(cpu_stat)
    t0=$EPOCHREALTIME
    for h in "${HOSTS[@]:0:k}"; do
        local a="TB_HOST_${h}_ADDR"
        ssh "${SSH_OPTS[@]}" "tbdeploy@${!a}" true &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || die "ssh true failed"; done
    t1=$EPOCHREALTIME
    BUSY[$key]+=" $(busy_pct "$s0" "$(cpu_stat)")"
    T[$key]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')"
}
round() { # PHASE OFFSET: every case once and `ssh true` to 1..KMAX hosts, the order rotated
    local ph=$1 off=$2 items=("${CASES[@]}") n j k
    for k in $SIZES; do items+=("ssh$k"); done
    n=${#items[@]}
    for ((j = 0; j < n; j++)); do
        local it=${items[$(((off + j) % n))]}
        if [[ $it == ssh* ]]; then measure_ssh "${it#ssh}"; else measure_deploy "$ph" "$it"; fi
    done
}
last() { echo "${T[$1]##* }"; }

# Where the time of one deploy goes, without slowing it down: a poller
# stamps every line the hosts' sshds append to their logs (every 2 ms);
# from it: when the last host accepted punix's login, when the last session
# closed, and the whole run.
cat >"$WORK/stamp.py" <<'EOF_PY'
import os, sys, time
out, paths = sys.argv[1], sys.argv[2:]
logs = []
for p in paths:
    f = open(p, "rb")
    f.seek(0, 2)
    logs.append([os.path.basename(os.path.dirname(p)), f, b""])
o = open(out, "w", buffering=1)
while True:
    got = False
    for entry in logs:
        data = entry[1].read()
        if not data:
            continue
        got = True
        now = time.time()
        entry[2] += data
        *lines, entry[2] = entry[2].split(b"\n")
        for line in lines:
            o.write("%.6f %s %s\n" % (now, entry[0], line.decode(errors="replace")))
    if not got:
        time.sleep(0.002)
EOF_PY
STAMP_PID=""
declare -A PH
timeline() { # PHASE CASE -> PH[PHASE:CASE] = "first-connect all-logged-in last-close total"
    local ph=$1 c=$2 out=$WORK/timeline-$1-$2 t0 t1 h logs=()
    for h in $(hosts_of "$c"); do logs+=("$(sshd_log "$h")"); done
    "$PYTHON" "$WORK/stamp.py" "$out" "${logs[@]}" &
    STAMP_PID=$!
    sleep 0.3
    deploy_cmd "$c"
    t0=$EPOCHREALTIME
    PUNIX_STORE_DIR=$WORK/k$c/store "${CMD[@]}" >"$WORK/out.json" 2>"$WORK/err" || die "timeline $ph:$c failed: $(cat "$WORK/err")"
    t1=$EPOCHREALTIME
    sleep 0.3
    kill "$STAMP_PID" 2>/dev/null || true
    wait "$STAMP_PID" 2>/dev/null || true
    STAMP_PID=""
    "$PYTHON" "$WORK/check.py" "$WORK/out.json" "${c#s}" "$ph" "$NPKG" >/dev/null || die "timeline $ph:$c: unexpected report"
    PH[$ph:$c]=$(awk -v t0="$t0" -v t1="$t1" '
        { t = $1 - t0 }
        / Connection from / && conn == "" { conn = t }
        / Accepted publickey / { auth = t }
        / Close session: / { cl = t }
        END { printf "%.3f %.3f %.3f %.3f\n", conn, auth, cl, t1 - t0 }' "$out")
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

# One ssh true to every host first (not recorded): the hosts' first login.
for h in "${HOSTS[@]}"; do ssh -F "$TB_SSH_CONFIG" "$h" true; done
progress() { # PHASE ROUND
    local line="" c k
    for c in "${CASES[@]}"; do line+=" k$c $(last "$1:$c")s"; done
    for k in $SIZES; do line+=" ssh×$k $(last "ssh:$k")s"; done
    log "$1 round $(($2 + 1))/$RUNS:$line (load $(load1))"
}
for ((r = 0; r < RUNS; r++)); do
    wipe_all
    round first "$r"
    progress first "$r"
done
# Warm-up round, not recorded.
for c in "${CASES[@]}"; do
    deploy_cmd "$c"
    PUNIX_STORE_DIR=$WORK/k$c/store "${CMD[@]}" >/dev/null 2>&1 || die "warm-up k$c failed"
done
for ((r = 0; r < RUNS; r++)); do
    round unchanged "$r"
    progress unchanged "$r"
done
# One more unchanged deploy and, after a wipe, one more first deploy per
# size, with the sshd logs stamped (not part of the medians).
for c in $SIZES; do timeline unchanged "$c"; done
wipe_all
for c in $SIZES; do timeline first "$c"; done
for c in $SIZES; do log "timeline k$c: first ${PH[first:$c]}; unchanged ${PH[unchanged:$c]}"; done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
wipe_all

# --- the report ------------------------------------------------------------
med() { echo "${T[$1]}" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f×", a / b}'; }
kb_mib() { awk -v k="$1" 'BEGIN {printf "%d KB (%.1f MiB)", k, k / 1024}'; }
verdict() { [ "$1" = 1 ] && echo "met" || echo "MISSED"; }
mm() { echo "$1" | minmax; }
medrange() { printf '%s (%s)' "$(echo "$1" | median)" "$(mm "$1")"; }
label() { # CASE
    case $1 in
    s*) echo "${1#s} hosts, \`--parallel 1\`" ;;
    1) echo "1 host" ;;
    *) echo "$1 hosts" ;;
    esac
}
REF1=$KMIN
row() { # PHASE CASE
    local k="$1:$2" m
    m=$(med "$k")
    printf '| %s, %s | %s | %s | %s | %s | %s / %s | %s | %s | %s | %s%% | %s | %s |\n' "$1" "$(label "$2")" "$m" "$(mm "${T[$k]}")" \
        "$(ratio "$m" "$(med "$1:$REF1")")" "$(ratio "$m" "$(med "ssh:${2#s}")")" \
        "$(mm "${CONN[$k]}")" "$(mm "${JCONN[$k]}")" "$(mm "${SESS[$k]}")" "$(mm "${JRT[$k]}")" \
        "$(echo "${CPU[$k]}" | median | xargs printf %.2f)" "$(echo "${BUSY[$k]}" | median | xargs printf %.0f)" \
        "$(echo "${LOAD[$k]}" | median | xargs printf %.2f)" \
        "$(kb_mib "$(echo "${RSS[$k]}" | maxof)")"
}

t_ratio_ok=1 t_ratio_txt=""
for ph in first unchanged; do
    a=$(med "$ph:$KMAX") b=$(med "$ph:$REF1")
    r=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')
    awk -v r="$r" 'BEGIN {exit !(r <= 2)}' || t_ratio_ok=0
    t_ratio_txt+="${t_ratio_txt:+; }$ph deploy ${r}× ($a s vs $b s)"
done
SSH_RATIO=$(awk -v a="$(med "ssh:$KMAX")" -v b="$(med "ssh:$KMIN")" 'BEGIN {printf "%.2f", a / b}')
ALL_RSS="" ALL_CONN=""
for k in "${!RSS[@]}"; do ALL_RSS+=" ${RSS[$k]}"; done
for k in "${!CONN[@]}"; do ALL_CONN+=" ${CONN[$k]}"; done
RSS_MAX=$(echo "$ALL_RSS" | maxof)
t_rss_ok=$(awk -v k="$RSS_MAX" 'BEGIN {print (k * 1024 < 30e6) ? 1 : 0}')
CONN_RANGE=$(mm "$ALL_CONN")

overrides=""
for v in FLEET_BENCH_SIZES FLEET_BENCH_PACKAGES FLEET_BENCH_RUNS FLEET_BENCH_SEQUENTIAL; do
    if [ -n "${!v:-}" ]; then overrides+="$v=$(printf '%q' "${!v}") "; fi
done

report() {
    local c k p
    echo "## Fleet deploys and remote builds (issue 4)"
    echo
    echo "### Fleet deploy: one stack to ${SIZES// /, } hosts"
    echo
    echo "Written by \`${overrides}bash ci/bench/fleet.sh\` on $STARTED, punix \`$COMMIT\`${DIRTY:+ plus uncommitted changes to: $DIRTY};"
    echo "load average before / after: $LOAD_BEFORE / $LOAD_AFTER. The machine has 2 cores,"
    echo "shared with other users' builds and tests, and every testbed host's sshd, rsync"
    echo "and shell runs on these same 2 cores as punix and its ssh clients: K hosts cost"
    echo "K times the remote CPU work here, which a real fleet spreads over K machines."
    echo
    echo "Testbed: \`tests/testbed/hosts-up.sh ${HOSTS[*]}\` (OpenSSH's sshd, each host in its"
    echo "own network namespace, reached over a veth bridge), user \`tbdeploy\`. The stack"
    echo "\`Fleet\`: $NPKG packages in its \`store-modules\` (each a \`copy\` of a source dir with"
    echo "a 2 KiB and a 4 KiB random file and a README; $FILES files, $BYTES bytes in the"
    echo "store) and one config file, built once beforehand (${BUILD_S[$KMIN]} s). Each fleet size"
    echo "has its own store root and deploy dirs, so no size sees another's paths. First"
    echo "deploys: every host wiped before each round; unchanged: after one warm-up round."
    echo "$RUNS rounds of each; in every round each deploy and \`ssh true\` to 1, ..., $KMAX hosts"
    echo "at once run one after the other, the order rotating from round to round."
    echo "The commands, for 3 hosts (\`--parallel\` left at its default, 10):"
    echo
    echo '```sh'
    echo "PUNIX_STORE_DIR=/tmp/$ID/k3/store punix service deploy Fleet -f /tmp/$ID/k3/recipes \\"
    echo "  --target 'ssh://tbdeploy@[ADDR_h1]' --target 'ssh://tbdeploy@[ADDR_h2]' --target 'ssh://tbdeploy@[ADDR_h3]' \\"
    echo "  --key \$TB_KEY --known-hosts \$TB_KNOWN_HOSTS \\"
    echo "  --deployments-root /srv/deploy/$ID-k3/deployments --unit-dir /srv/deploy/$ID-k3/units --json"
    echo "for a in ADDR_h1 ADDR_h2 ADDR_h3; do"
    echo "  ssh -i \$TB_KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=\$TB_KNOWN_HOSTS \\"
    echo "    -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes tbdeploy@\$a true &"
    echo "done; wait"
    echo '```'
    echo
    echo "\`ssh true\` to K hosts at once (one new connection each), the floor of a K-host"
    echo "deploy on this machine; $((2 * RUNS)) runs each (every round of both phases):"
    echo
    echo "| \`ssh true\` | median s | range s | × 1 host | machine CPU busy | load (1 min) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    for k in $SIZES; do
        printf '| %s | %s | %s | %s | %s%% | %s |\n' "$(label "$k")$([ "$k" -eq 1 ] || echo ' at once')" "$(med "ssh:$k")" "$(mm "${T[ssh:$k]}")" \
            "$(ratio "$(med "ssh:$k")" "$(med "ssh:$KMIN")")" "$(echo "${BUSY[ssh:$k]}" | median | xargs printf %.0f)" "$(echo "${LOAD[ssh:$k]}" | median | xargs printf %.2f)"
    done
    echo
    echo "The deploys. Median wall-clock seconds of $RUNS runs and their range; \"× 1 host\""
    echo "divides by the median of the same deploy to one host, \"× ssh true\" by the"
    echo "median \`ssh true\` to as many hosts at once. Connections per host: \"Accepted"
    echo "publickey\" lines each host's sshd logged during the deploy / punix's own"
    echo "\`counters.connections\` per target (\`--json\`); sessions per host: its \"Starting"
    echo "session:\" lines (all over that one connection); round trips: \`counters.round_trips\`"
    echo "per target; ranges over all hosts and runs. CPU s: user + system time of punix"
    echo "and its children (the ssh clients, rsync), median. Machine CPU busy: the share"
    echo "of both cores' time that was busy during the run (/proc/stat: punix, the"
    echo "testbed's sshds, and other users), median. Load: the 1-minute load average when"
    echo "the run started, median. Peak RSS: the max over the runs of \`/usr/bin/time -f %M\`"
    echo "(punix or its largest child)."
    echo
    echo "| deploy | median s | range s | × 1 host | × ssh true | connections per host (sshd / punix) | sessions per host | round trips per host | CPU s | machine CPU busy | load | peak RSS |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for c in "${CASES[@]}"; do row first "$c"; done
    for c in "${CASES[@]}"; do row unchanged "$c"; done
    echo
    echo "The load averages when the runs started, all of them:"
    local line=""
    for c in "${CASES[@]}"; do
        line+="${line:+; }$(label "$c"): first $(mm "${LOAD[first:$c]}"), unchanged $(mm "${LOAD[unchanged:$c]}")"
    done
    echo "$line."
    echo
    echo "Where the time goes: one more deploy per size (first after a wipe, and"
    echo "unchanged), with a poller stamping every line the hosts' sshds log (every 2 ms)."
    echo "Seconds from punix's start:"
    echo
    echo "| deploy | first TCP connection | last host logged in | last session closed | punix exits |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    for ph in first unchanged; do
        for c in $SIZES; do
            read -r -a p <<<"${PH[$ph:$c]}"
            printf '| %s, %s | %s | %s | %s | %s |\n' "$ph" "$(label "$c")" "${p[@]}"
        done
    done
    echo
    echo "Targets:"
    echo
    echo "- $KMAX hosts ≤ 2× one host: **$(verdict $t_ratio_ok)** ($t_ratio_txt). For"
    echo "  comparison, \`ssh true\` to $KMAX hosts at once takes ${SSH_RATIO}× \`ssh true\` to one here."
    echo "- Peak memory < 30 MB (30,000,000 bytes): **$(verdict "$t_rss_ok")** (at most $(kb_mib "$RSS_MAX") over all"
    echo "  runs; for scale, the nix client peaks at 27.5 MiB copying 1,000 paths)."
    echo "- Connections per host: $CONN_RANGE in every run (sshd's logs), whatever the fleet size."
    echo
}
if [ -n "${BENCH_MD:-}" ]; then
    report >>"$BENCH_MD"
fi
report
log "done"
