# punix builder `make`: configure-less make, then `make install` into $out.
# "$@" = the recipe's args, passed to both make runs (e.g. CFLAGS=-O2).
set -eu
umask 022
mkdir -p "$out"
make -j"$PUNIX_BUILD_CORES" PREFIX="$out" "$@"
make install PREFIX="$out" DESTDIR= "$@"
