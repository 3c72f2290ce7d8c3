# punix builder `copy`: copies the source tree (or the paths named in the
# recipe's args, relative to it) into $out, keeping symlinks and modes.
set -eu
umask 022
mkdir -p "$out"
if [ "$#" -eq 0 ]; then
    cp -PR "$src"/. "$out"/
else
    for p in "$@"; do
        case "$p" in
            /* | ../* | */../* | .. | */..) echo "copy: refusing path outside src: $p" >&2; exit 1 ;;
        esac
        mkdir -p "$out/$(dirname "$p")"
        cp -PR "$src/$p" "$out/$p"
    done
fi
