#!/usr/bin/env bash
# Apptainer for the test-bed on Debian 12 (bookworm), root, no systemd.
#
#   bash launchers/testbed/apptainer.sh install   # idempotent; prints APPTAINER=/usr/bin/apptainer
#   bash launchers/testbed/apptainer.sh status
#
# bookworm has no apptainer package; Debian sid has apptainer 1.4.5, built against
# glibc 2.38. Its three ELF files use exactly one glibc-2.38 symbol family
# (__isoc23_strtol/__isoc23_strtoul, C23 strtol). The install:
#   1. uses a previously repacked .deb when one is available, in this order:
#      $APPTAINER_DEB, $PROJECT/../shared/env/cache/apptainer-1.4.5-bookworm-repacked.deb,
#      /var/cache/scalebox-testbed/apptainer-bookworm.deb (saved by an earlier build);
#   2. otherwise downloads the sid .deb with a private apt state (the system's apt sources
#      are untouched), clears the 2.38 version tag of those symbols (patchelf), links in a
#      tiny shim library forwarding them to strtol/strtoul, retargets the GLIBC_2.38 verneed
#      entry to GLIBC_2.2.5 (elf_weaken_verneed.py, next to this script), lowers the libc6
#      dependency and installs the repacked .deb with apt (other deps come from bookworm).
#      About 25 s; the result is saved to /var/cache/scalebox-testbed/ for re-installs.
# Then configures this kind of sandbox (every run, idempotent):
#   * root default capabilities = file  (the bounding set lacks CAP_SYS_RESOURCE; with the
#     stock "full" every `apptainer exec` as root fails "Requesting capability set ...")
#   * root:1000000:65536 in /etc/subuid, /etc/subgid  (`apptainer build --fakeroot` as root)
#   * chmod 666 /dev/fuse  (non-root users mount SIFs with squashfuse in a user namespace)
# and makes sure a *static* busybox exists for the tests' tiny images (Debian busybox-static;
# if a dynamic busybox package is installed, the static binary is extracted to
# /usr/local/lib/scalebox-testbed/busybox instead of replacing it).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CACHE_DIR=/var/cache/scalebox-testbed
SAVED_DEB=$CACHE_DIR/apptainer-bookworm.deb
SHARED_DEB=$PROJECT/../shared/env/cache/apptainer-1.4.5-bookworm-repacked.deb
STATIC_BB=/usr/local/lib/scalebox-testbed/busybox
RUNTIME_DEPS=(squashfs-tools squashfuse fuse2fs fuse3 uidmap containernetworking-plugins
              libseccomp2 libsqlite3-0 e2fsprogs ca-certificates)

is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }

configure() {
  sed -i 's/^root default capabilities = full$/root default capabilities = file/' /etc/apptainer/apptainer.conf
  grep -q '^root:' /etc/subuid 2>/dev/null || echo 'root:1000000:65536' >> /etc/subuid
  grep -q '^root:' /etc/subgid 2>/dev/null || echo 'root:1000000:65536' >> /etc/subgid
  chmod 666 /dev/fuse 2>/dev/null || true
}

ensure_busybox() {
  local bb
  bb=$(command -v busybox || true)
  if [ -n "$bb" ] && is_static "$bb"; then return 0; fi
  if is_static "$STATIC_BB"; then return 0; fi
  if [ -z "$bb" ]; then
    tb_apt_install busybox-static
    return 0
  fi
  # a dynamic busybox package is installed: busybox-static conflicts with it, so only extract
  local w; w=$(mktemp -d /tmp/testbed-bb.XXXXXX)
  tb_apt_update || true
  (cd "$w" && tb_apt download busybox-static >/dev/null) || tb_die "cannot download busybox-static"
  dpkg-deb -x "$w"/busybox-static_*.deb "$w/x"
  mkdir -p "$(dirname "$STATIC_BB")"
  install -m 755 "$w/x/bin/busybox" "$STATIC_BB"
  rm -rf "$w"
}

install_deb() {   # install_deb FILE [--deps-present]
  tb_log "apptainer: installing $1"
  [ "${2:-}" = --deps-present ] || tb_apt_install "${RUNTIME_DEPS[@]}"
  tb_apt install -y -qq --reinstall --allow-downgrades --no-install-recommends "$(readlink -f "$1")" \
    >/tmp/scalebox-testbed-apt.log 2>&1 || { tail -20 /tmp/scalebox-testbed-apt.log >&2; tb_die "installing $1 failed"; }
}

build_from_sid() {
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local work; work=$(mktemp -d /tmp/apptainer-build.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  tb_log "apptainer: building a bookworm .deb from Debian sid's apptainer (about 25 s)"
  # 1. build tools + runtime deps from bookworm
  tb_apt_install patchelf gcc libc6-dev binutils python3 "${RUNTIME_DEPS[@]}"
  # 2. download apptainer from sid with a private apt state (no system change)
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$work/sid.list"
  local aptopts=(-o Dir::Etc::SourceList="$work/sid.list" -o Dir::Etc::SourceParts=/dev/null
                 -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
                 -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
                 -o APT::Sandbox::User=root -o Acquire::Retries=3
                 -o Acquire::Check-Valid-Until=false)  # a mirror snapshot of sid may carry an expired Release file
  apt-get "${aptopts[@]}" -q update </dev/null >"$work/update.log" 2>&1 \
    || { cat "$work/update.log" >&2; tb_die "apt-get update for sid failed"; }
  # prefer the version this recipe was tested with; sid keeps only its newest, so fall back
  (cd "$work" && { apt-get "${aptopts[@]}" -q download apptainer=1.4.5-2 </dev/null >/dev/null 2>&1 \
    || apt-get "${aptopts[@]}" -q download apptainer </dev/null >/dev/null; }) \
    || tb_die "cannot download apptainer from sid"
  local deb; deb=$(ls "$work"/apptainer_*_amd64.deb)
  tb_log "apptainer: downloaded $(basename "$deb")"
  # 3. repack
  dpkg-deb -R "$deb" "$work/pkg"
  cat > "$work/isoc23.c" <<'EOF'
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
EOF
  local libdir=/usr/lib/x86_64-linux-gnu/apptainer
  local shim=$libdir/lib/libisoc23compat.so
  mkdir -p "$work/pkg$libdir/lib"
  gcc -O2 -shared -fPIC -Wl,-soname,libisoc23compat.so -o "$work/pkg$shim" "$work/isoc23.c"
  local f s syms
  for f in "$work/pkg/usr/bin/apptainer" "$work/pkg$libdir/bin/starter" "$work/pkg$libdir/lib/offsetpreload.so"; do
    syms=$(objdump -T "$f" | awk '/GLIBC_2\.3[89]/{print $NF}' | sort -u)
    for s in $syms; do patchelf --clear-symbol-version "$s" "$f"; done
    patchelf --add-needed "$shim" "$f"     # absolute path: no ldconfig / rpath needed
    python3 "$TESTBED_DIR/elf_weaken_verneed.py" "$f" >/dev/null   # verneed GLIBC_2.38 -> 2.2.5
    if objdump -p -T "$f" | grep -qE 'GLIBC_2\.(3[7-9]|4[0-9])'; then
      tb_die "$(basename "$f") still needs a newer glibc than bookworm's: this sid build needs a new recipe"
    fi
  done
  # lower the libc6 dependency, drop md5sums of the changed files
  sed -i -E 's/libc6 \(>= 2\.[0-9]+\)/libc6 (>= 2.36)/; s/^(Version: .*)$/\1~bookworm1/' "$work/pkg/DEBIAN/control"
  rm -f "$work/pkg/DEBIAN/md5sums"
  dpkg-deb -Zgzip -b "$work/pkg" "$work/apptainer-bookworm.deb" >/dev/null
  install_deb "$work/apptainer-bookworm.deb" --deps-present
  mkdir -p "$CACHE_DIR" && cp "$work/apptainer-bookworm.deb" "$SAVED_DEB"
  [ -n "${APPTAINER_DEB_OUT:-}" ] && cp "$work/apptainer-bookworm.deb" "$APPTAINER_DEB_OUT"
  rm -rf "$work"; trap - EXIT
}

works() { command -v apptainer >/dev/null 2>&1 && apptainer version >/dev/null 2>&1; }

install() {
  tb_need_root
  if ! works; then
    local deb=""
    for d in "${APPTAINER_DEB:-}" "$SHARED_DEB" "$SAVED_DEB"; do
      [ -n "$d" ] && [ -f "$d" ] && { deb=$d; break; }
    done
    if [ -n "$deb" ]; then install_deb "$deb"; else build_from_sid; fi
    works || tb_die "apptainer installed but \`apptainer version\` fails"
  fi
  configure
  ensure_busybox
  echo "APPTAINER=$(command -v apptainer) ($(apptainer version))"
}

status() {
  if works; then echo "APPTAINER=$(command -v apptainer) ($(apptainer version))"; else echo "apptainer not installed"; return 3; fi
}

case "${1:-}" in
  install) install ;;
  status) status ;;
  *) echo "usage: $0 install|status" >&2; exit 2 ;;
esac
