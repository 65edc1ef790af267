#!/bin/sh
# Build a minimal root file system offline (no registry, no network):
# a static busybox for /bin/sh and the usual tools, plus optionally the host's bash with the
# shared libraries it needs (the example modules' run.sh scripts are bash scripts).
#
#   sh containers/rootfs.sh DIR [bash]
#
# Busybox: $SCALEBOX_BUSYBOX, else a static `busybox` on PATH, else the one that
# launchers/testbed/apptainer.sh extracts to /usr/local/lib/scalebox-testbed/busybox.
set -eu
[ $# -ge 1 ] || { echo "usage: rootfs.sh DIR [bash]" >&2; exit 2; }
root=$1
with_bash=${2:-}

is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }
bb=""
for c in "${SCALEBOX_BUSYBOX:-}" "$(command -v busybox || true)" /usr/local/lib/scalebox-testbed/busybox; do
  if [ -n "$c" ] && is_static "$c"; then bb=$c; break; fi
done
[ -n "$bb" ] || { echo "rootfs.sh: no static busybox (apt-get install busybox-static)" >&2; exit 1; }

mkdir -p "$root/bin" "$root/usr/bin" "$root/tmp" "$root/etc" "$root/work" "$root/local" "$root/data" \
  "$root/app/bin" "$root/.scalebox/bin" "$root/.scalebox/slot" "$root/proc" "$root/sys" "$root/dev"
chmod 1777 "$root/tmp"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
  case $applet in busybox) continue ;; esac
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
[ -e "$root/usr/bin/env" ] || ln -s ../../bin/busybox "$root/usr/bin/env"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
mkdir -p "$root/root"

if [ "$with_bash" = bash ]; then
  b=$(command -v bash)
  rm -f "$root/bin/bash"
  cp "$b" "$root/bin/bash"
  ln -sf ../../bin/bash "$root/usr/bin/bash"
  # the shared libraries bash needs, at the same paths (ld.so included)
  ldd "$b" | awk '/=>/ { print $3 } /^[ \t]*\// { print $1 }' | while read -r lib; do
    [ -f "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
fi
