#!/bin/sh
# run-parts for several directories, installed by vagrant/provision.sh as
# /usr/local/sbin/run-parts on Debian 12 only (and first in apt's DPkg::Path): the kernel packages of
# trixie-backports run their hooks with `run-parts OPTIONS DIR1 DIR2`
# (/etc/kernel/postinst.d and /usr/share/kernel/postinst.d), and Debian 12's
# run-parts (debianutils < 5.21) takes exactly one directory.  As newer
# run-parts does, the scripts of all directories run in the order of their
# names, and a name in an earlier directory hides the same name in a later one.
opts=
dirs=
for a in "$@"; do
    case $a in
        -*) opts="$opts $a" ;;      # no option value here contains a space (kernel versions, paths)
        *) dirs="$dirs $a" ;;
    esac
done
set -- $dirs
[ $# -gt 1 ] || exec /bin/run-parts "$@" $opts
merged=$(mktemp -d)
trap 'rm -rf "$merged"' EXIT
for d in "$@"; do
    for f in "$d"/*; do
        [ -e "$f" ] && [ ! -e "$merged/${f##*/}" ] && ln -s "$f" "$merged/${f##*/}"
    done
done
/bin/run-parts $opts "$merged"
