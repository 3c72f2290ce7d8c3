# Helpers shared by the benchmark scripts (sourced after they `cd` to the
# repository root). Each script sets BENCH_NAME first.

log() { echo "$BENCH_NAME: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# Numbers on standard input (spaces or newlines) -> their median, 4
# decimals when it is the mean of the middle two.
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {m = int((NR + 1) / 2); if (NR % 2) print v[m]; else printf "%.4f\n", (v[m] + v[m + 1]) / 2}'; }
# -> "lo–hi", or one number when they are equal.
minmax() { tr ' ' '\n' | grep . | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {if (lo == hi) print lo; else printf "%s–%s", lo, hi}'; }
# -> the largest.
maxof() { tr ' ' '\n' | grep . | sort -g | tail -n1; }
