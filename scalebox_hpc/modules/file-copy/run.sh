#!/usr/bin/env bash
# file-copy (scalebox standard module): copy SOURCE_URL/BODY to TARGET_URL/BODY with rsync, creating
# the parent directories; on success forward BODY with send-message (when the module has a sink) and
# record the bytes moved in task-exec.json (inputBytes = file size, outputBytes = bytes rsync actually
# transferred, 0 when the target was already up to date; outputFiles = [the target]).
#   run.sh BODY HEADERS_JSON     BODY = the file's path relative to SOURCE_URL and TARGET_URL
# Settings (environment):
#   SOURCE_URL, TARGET_URL   required: a local directory, rsync://host[:port]/module[/path] (rsync
#                            daemon) or [user@]host:/path (rsync over ssh); at most one of them remote
#   CHECKSUM                 optional: yes|true|1 -> rsync --checksum, then a checksum verification pass
#   RSYNC_OPTS               optional: extra rsync options (split on spaces), e.g. "--bwlimit=100M"
# Exit codes (documented for retry_rules, e.g. `retry_rules: {"12": 3}`):
#   0  success
#   10 source missing (not a regular file)
#   11 target not writable (cannot create the directory / permission denied / read-only / disk full)
#   12 network: rsync daemon or ssh host unreachable, connection dropped, protocol error
#   13 checksum mismatch after the copy (CHECKSUM=yes)
#   14 bad arguments or configuration (empty/absolute/'..' body, unset URLs, both URLs remote,
#      bad CHECKSUM, no rsync, unknown rsync daemon module)
#   1  any other failure
set -euo pipefail
# a timeout, cancel or drain sends TERM: exit through the EXIT trap, which removes the temp dir
trap 'exit 143' TERM
trap 'exit 130' INT

die() { echo "file-copy: $2" >&2; exit "$1"; }

is_remote() { [[ $1 == rsync://* || $1 =~ ^[^/:]+: ]]; }
# the ssh form's host reaches ssh as an argument: one starting with '-' would be an ssh option
ssh_host_ok() { local h=${1%%:*}; h=${h##*@}; [[ $1 == rsync://* || $h != -* ]]; }

# rsync exit code + stderr file -> our exit code
rsync_code() {
    local rc=$1 err=$2
    if grep -qE 'link_stat|\[sender\].*No such file|file has vanished' "$err"; then echo 10; return; fi
    if grep -qE '@ERROR: Unknown module' "$err"; then echo 14; return; fi
    # ssh: "Permission denied (publickey,password)"; rsync: "... Permission denied (13)"
    if grep -qE 'Permission denied \([a-z]|Host key verification failed' "$err"; then echo 12; return; fi
    grep -v '\[sender\]' "$err" >"$err.receiver" || true  # the receiver's (target's) messages
    if grep -qiE 'Permission denied|Read-only file system|read only|No space left|mkdir .* failed|Not a directory|Quota exceeded' "$err.receiver"; then
        echo 11; return
    fi
    case $rc in
        5|10|12|30|35|255) echo 12 ;;
        *) echo 1 ;;
    esac
}

body=${1-}
[ -n "$body" ] || die 14 "the body (a relative file path) is empty"
[[ $body != *$'\n'* ]] || die 14 "the body must be a single line"
[[ $body != /* ]] || die 14 "the body must be a relative path, got '$body'"
case "/$body/" in */../*|*/./*) die 14 "the body must not contain '.' or '..' components: '$body'" ;; esac
[[ $body != */ ]] || die 14 "the body must name a file, not a directory: '$body'"
[ -n "${SOURCE_URL:-}" ] || die 14 "SOURCE_URL is not set"
[ -n "${TARGET_URL:-}" ] || die 14 "TARGET_URL is not set"
case "${CHECKSUM:-no}" in
    yes|YES|true|TRUE|1) checksum=1 ;;
    no|NO|false|FALSE|0|"") checksum=0 ;;
    *) die 14 "CHECKSUM must be yes or no, got '$CHECKSUM'" ;;
esac
command -v rsync >/dev/null 2>&1 || die 14 "rsync is not installed"
if is_remote "$SOURCE_URL" && is_remote "$TARGET_URL"; then
    die 14 "SOURCE_URL and TARGET_URL cannot both be remote (rsync copies between a local and a remote side)"
fi
for url in "$SOURCE_URL" "$TARGET_URL"; do
    if is_remote "$url" && ! ssh_host_ok "$url"; then die 14 "the host of '$url' must not start with '-'"; fi
done

src=${SOURCE_URL%/}/$body
dst=${TARGET_URL%/}/$body
# a remote rsync daemon would parse a path starting with '-' as an option
if [[ $body == -* ]]; then
    if is_remote "$SOURCE_URL"; then src=${SOURCE_URL%/}/./$body; fi
    if is_remote "$TARGET_URL"; then dst=${TARGET_URL%/}/./$body; fi
fi
# Local sides stay inside SOURCE_URL / TARGET_URL: a symlinked directory in the body (planted by
# whoever writes the trees, or unpacked from a tarball) must not take the copy out of them. Each
# directory of the body is resolved (cd -P) and must stay under the resolved root; the file
# itself must not be a symlink. rsync then gets the resolved paths.
real_dir() { CDPATH='' cd -P -- "$1" 2>/dev/null && pwd -P; }
inside() { [[ $2 == "$1" || $2 == "$1"/* ]]; }
body_name=${body##*/}
body_dir=.
if [[ $body == */* ]]; then body_dir=${body%/*}; fi
size=
rsrc=$src
rdst=$dst
if ! is_remote "$SOURCE_URL"; then
    root=$(real_dir "$SOURCE_URL") || die 10 "source directory '$SOURCE_URL' does not exist"
    dir=$(real_dir "$root/$body_dir") || die 10 "source '$src' is not a regular file (no such directory)"
    inside "$root" "$dir" || die 10 "source '$src' is outside SOURCE_URL: '$body_dir' leads to '$dir' (a symlink)"
    rsrc=$dir/$body_name
    [ ! -L "$rsrc" ] || die 10 "source '$src' is a symbolic link, not a regular file"
    [ -f "$rsrc" ] || die 10 "source '$src' is not a regular file"
    size=$(stat -c %s -- "$rsrc")
fi
if ! is_remote "$TARGET_URL"; then
    mkdir -p -- "$TARGET_URL" 2>/dev/null || die 11 "cannot create the target directory '$TARGET_URL'"
    root=$(real_dir "$TARGET_URL") || die 11 "the target directory '$TARGET_URL' is not a directory"
    parent=$root
    if [ "$body_dir" != . ]; then
        IFS=/ read -r -a parts <<<"$body_dir"
        for part in "${parts[@]}"; do
            [ -n "$part" ] || continue
            next=$parent/$part
            if [ ! -e "$next" ] && [ ! -L "$next" ]; then
                # another slot copying into the same directory may make it first: that is fine
                mkdir -- "$next" 2>/dev/null || [ -d "$next" ] || die 11 "cannot create the target directory '$next'"
            fi
            parent=$(real_dir "$next") || die 11 "cannot create the target directory '$next' (not a directory)"
            inside "$root" "$parent" \
                || die 11 "target '$dst' is outside TARGET_URL: '$next' leads to '$parent' (a symlink)"
        done
    fi
    if ! [ -w "$parent" ]; then die 11 "the target directory '$parent' is not writable"; fi
    rdst=$parent/$body_name
    if [ -L "$rdst" ]; then die 11 "target '$dst' is a symbolic link: not written through"; fi
fi

# --protect-args: file names travel inside the rsync protocol, never through the remote shell
# (rsync before 3.2.4 leaves e.g. backquotes to the remote `sh -c` of the ssh form)
opts=(-t -p --mkpath --partial --stats --no-human-readable --protect-args)
[ "$checksum" = 0 ] || opts+=(--checksum)
extra=()
[ -z "${RSYNC_OPTS:-}" ] || read -r -a extra <<<"$RSYNC_OPTS"

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
rc=0
rsync "${opts[@]}" "${extra[@]}" -- "$rsrc" "$rdst" >"$tmp/out" 2>"$tmp/err" || rc=$?
cat "$tmp/err" >&2
if [ "$rc" != 0 ]; then
    die "$(rsync_code "$rc" "$tmp/err")" "rsync '$src' -> '$dst' failed (rsync exit $rc)"
fi
stat_num() { sed -n "s/^$1: \([0-9,.]*\).*/\1/p" "$tmp/out" | tr -d ',.' | head -1; }
moved=$(stat_num 'Total transferred file size')
total=$(stat_num 'Total file size')
[ -n "$size" ] || size=${total:-0}
moved=${moved:-0}

if [ "$checksum" = 1 ]; then
    # verification: a checksum dry run must find nothing left to transfer
    rc=0
    rsync -t --checksum --dry-run --itemize-changes --protect-args "${extra[@]}" -- "$rsrc" "$rdst" >"$tmp/verify" 2>"$tmp/err" || rc=$?
    cat "$tmp/err" >&2
    [ "$rc" = 0 ] || die "$(rsync_code "$rc" "$tmp/err")" "checksum verification of '$dst' failed (rsync exit $rc)"
    if grep -q '^[<>ch.*]f' "$tmp/verify"; then
        cat "$tmp/verify" >&2
        die 13 "checksum mismatch between '$src' and '$dst' after the copy"
    fi
fi

json_str() {  # a JSON string literal (quoted replacements stay literal under patsub_replacement)
    local s=$1 i c r
    r="\\\\"; s=${s//"\\"/"$r"}  # one backslash -> two
    r='\"'; s=${s//'"'/"$r"}
    for i in {1..31}; do
        printf -v c '%b' "\\x$(printf %02x "$i")"
        if [[ $s == *"$c"* ]]; then printf -v r '\\u%04x' "$i"; s=${s//"$c"/"$r"}; fi
    done
    printf '"%s"' "$s"
}
printf '{"inputBytes": %d, "outputBytes": %d, "outputFiles": [%s]}\n' \
    "$size" "$moved" "$(json_str "$dst")" >task-exec.json
echo "file-copy: '$body' ($size bytes, $moved transferred) -> $TARGET_URL"
if [ -n "${SINK_MODULE:-}" ]; then
    send-message "$body"
fi
