#!/bin/sh
# Build the images of containers/ by hand (launchers build them on first use anyway).
#   sh containers/build.sh apptainer NAME [OUT.sif]   -> OUT.sif (default ./NAME.sif)
#   sh containers/build.sh podman NAME                -> localhost/scalebox/NAME:latest
# Offline: the context's rootfs/ comes from rootfs.sh (see the "# scalebox-rootfs:" line).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || { echo "usage: build.sh apptainer|podman|docker NAME [OUT.sif]" >&2; exit 2; }
engine=$1 name=$2
ctx=$(mktemp -d /tmp/scalebox-build.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
case $engine in
  apptainer) def=$here/$name.def ;;
  podman | docker) def=$here/$name.Dockerfile ;;
  *) echo "build.sh: unknown engine $engine" >&2; exit 2 ;;
esac
[ -f "$def" ] || { echo "build.sh: no $def" >&2; exit 1; }
cp "$def" "$ctx/"
if grep -q '^# scalebox-rootfs:' "$def"; then
  set -f  # the directive's words are split but never globbed ('ssh?' is a word, not a pattern)
  # shellcheck disable=SC2046
  sh "$here/rootfs.sh" "$ctx/rootfs" $(sed -n 's/^# scalebox-rootfs://p' "$def")
  set +f
fi
case $engine in
  apptainer)
    out=$(realpath -m "${3:-$name.sif}")
    (cd "$ctx" && apptainer -s build --force "$out" "$(basename "$def")")
    echo "$out" ;;
  *)
    (cd "$ctx" && "$engine" build -q --network none -t "localhost/scalebox/$name:latest" -f "$(basename "$def")" .)
    echo "localhost/scalebox/$name:latest" ;;
esac
