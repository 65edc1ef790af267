#!/bin/sh
# Build a minimal root file system offline (no registry, no network):
# a static busybox for /bin/sh and the usual tools, plus host programs copied with the shared
# libraries they need (the example and standard modules' run.sh scripts are bash scripts; the
# standard modules need rsync, and ssh for rsync's [user@]host:/path form).
#
#   sh containers/rootfs.sh DIR [PROGRAM...]      e.g.  DIR bash rsync ssh?
#
# PROGRAM: a program on the host's PATH, copied to the same path (bash: to /bin/bash, with
# /usr/bin/bash linked to it); a trailing '?' makes it optional (skipped when the host lacks it).
#
# Busybox: $SCALEBOX_BUSYBOX, else a static `busybox` on PATH, else the one that
# launchers/testbed/apptainer.sh extracts to /usr/local/lib/scalebox-testbed/busybox.
set -eu
[ $# -ge 1 ] || { echo "usage: rootfs.sh DIR [PROGRAM[?]...]" >&2; exit 2; }
root=$1
shift

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

# the shared libraries a host executable needs, at the same paths (ld.so included)
copy_libs() {
  ldd "$1" | awk '/=>/ { print $3 } /^[ \t]*\// { print $1 }' | while read -r lib; do
    [ -f "$lib" ] || continue
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

for want in "$@"; do
  name=${want%\?}
  if ! exe=$(command -v "$name") || [ "${exe#/}" = "$exe" ]; then
    if [ "$name" != "$want" ]; then echo "rootfs.sh: no $name on this host: left out" >&2; continue; fi
    echo "rootfs.sh: no $name on this host's PATH" >&2
    exit 1
  fi
  case $name in
    bash) dest=/bin/bash ;;
    *) dest=$exe ;;
  esac
  mkdir -p "$root$(dirname "$dest")"
  rm -f "$root$dest"  # maybe a busybox applet link
  cp -L "$exe" "$root$dest"
  if [ "$name" = bash ]; then ln -sf ../../bin/bash "$root/usr/bin/bash"; fi
  copy_libs "$exe"
done
