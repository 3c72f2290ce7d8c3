# punix builder `shell`: runs the recipe's `script` with `set -eu`.
# Environment: out, src, system, PUNIX_SCRIPT (the script's file),
# PUNIX_BUILD_CORES, PATH from the inputs' bin/; "$@" = the recipe's args.
set -eu
umask 022
. "$PUNIX_SCRIPT"
