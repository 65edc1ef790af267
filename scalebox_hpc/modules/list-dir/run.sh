#!/usr/bin/env bash
# list-dir (scalebox standard module): list the regular files under a sub-directory of SOURCE_URL
# and emit one message per file (its path relative to SOURCE_URL) to the sink (see SEND_MESSAGE).
#   run.sh BODY HEADERS_JSON     BODY = a relative sub-directory of SOURCE_URL ("." = all of it)
# Settings (environment):
#   SOURCE_URL     required: a local directory, rsync://host[:port]/module[/path] or [user@]host:/path (ssh)
#   REGEX_FILTER   optional: bash ERE matched against each relative path; non-matching files are skipped
#   RSYNC_OPTS     optional: extra rsync options (split on spaces) for remote listings, e.g. "--port=8730"
#   SEND_MESSAGE   optional: yes = one `send-message` call per file. By default, when the module has a
#                  sink (SINK_MODULE), the messages are written to sink-tasks.txt in the work dir
#                  ("SINK,path,{}" per line), which the launcher reads after the run: one process per
#                  file would make large directories slow.
# An empty listing is a success (exit 0, no message). Files are listed recursively, sorted.
# Exit codes (for retry_rules; same table as file-copy):
#   0  success                    10  source directory missing
#   12 network / rsync daemon or ssh unreachable
#   14 bad arguments or configuration (body, settings, rsync missing, unknown rsync daemon module)
#   1  any other failure (e.g. an unreadable directory in the tree)
set -euo pipefail
# a timeout, cancel or drain sends TERM: exit through the EXIT trap, which removes the temp dir
trap 'exit 143' TERM
trap 'exit 130' INT

die() { echo "list-dir: $2" >&2; exit "$1"; }

is_remote() { [[ $1 == rsync://* || $1 =~ ^[^/:]+: ]]; }

# rsync exit code + stderr file -> our exit code
rsync_code() {
    local rc=$1 err=$2
    if grep -qE 'link_stat|change_dir|No such file or directory' "$err"; then echo 10; return; fi
    if grep -qE '@ERROR: Unknown module' "$err"; then echo 14; return; fi
    case $rc in
        5|10|12|30|35|255) echo 12 ;;
        *) echo 1 ;;
    esac
}

body=${1-}
[ -n "${SOURCE_URL:-}" ] || die 14 "SOURCE_URL is not set"
[[ $body != *$'\n'* ]] || die 14 "the body must be a single line"
[[ $body != /* ]] || die 14 "the body must be a relative path, got '$body'"
case "/$body/" in */../*) die 14 "the body must not contain '..': '$body'" ;; esac
sub=$body
while [[ $sub == */ && $sub != / ]]; do sub=${sub%/}; done
sub=${sub#./}
[ -n "$sub" ] || sub=.
filter=${REGEX_FILTER:-}
if [ -n "$filter" ]; then
    # an invalid regex makes [[ =~ ]] return 2
    set +e
    [[ "" =~ $filter ]]
    rc=$?  # 2: not a valid regex
    set -e
    [ "$rc" != 2 ] || die 14 "REGEX_FILTER is not a valid extended regex: '$filter'"
fi

count=0
batch=0
if [ -n "${SINK_MODULE:-}" ] && [ "${SEND_MESSAGE:-no}" != yes ]; then
    batch=1
    exec 3>>sink-tasks.txt
fi
# characters that would split a sink-tasks.txt line (Python's str.splitlines): such names go through send-message
odd=$'[\r\v\f\x1c\x1d\x1e]'
emit() {  # emit RELATIVE_PATH
    local rel=$1
    if [ -n "$filter" ] && ! [[ $rel =~ $filter ]]; then return 0; fi
    if [ "$batch" = 1 ] && ! [[ $rel =~ $odd || $rel == *$'\xc2\x85'* || $rel == *$'\xe2\x80\xa8'* || $rel == *$'\xe2\x80\xa9'* ]]; then
        # "module,body,{headers}": the trailing {} keeps any ",{" inside the body part of the body
        printf '%s,%s,{}\n' "$SINK_MODULE" "$rel" >&3
    else
        send-message "$rel"
    fi
    count=$((count + 1))
}

# rsync --list-only prints non-printable bytes as \#ooo (octal; a literal "\#" is itself escaped)
unescape() {  # unescape TEXT -> $REPLY
    local s=$1 pre ch
    REPLY=
    while [[ $s == *'\#'[0-7][0-7][0-7]* ]]; do
        pre=${s%%'\#'[0-7][0-7][0-7]*}
        s=${s#"$pre"}
        printf -v ch '%b' "\\0${s:2:3}"
        REPLY+=$pre$ch
        s=${s:5}
    done
    REPLY+=$s
}

root=${SOURCE_URL%/}
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
# the whole listing is taken before the first message: a failed listing emits nothing
if is_remote "$SOURCE_URL"; then
    command -v rsync >/dev/null 2>&1 || die 14 "rsync is not installed"
    extra=()
    [ -z "${RSYNC_OPTS:-}" ] || read -r -a extra <<<"$RSYNC_OPTS"
    url=$root/
    [ "$sub" = . ] || url=$root/./$sub/   # ./ : a daemon would parse a leading '-' as an option
    rc=0
    rsync --list-only -r --no-human-readable --protect-args "${extra[@]}" -- "$url" >"$tmp/list" 2>"$tmp/err" || rc=$?
    cat "$tmp/err" >&2
    [ "$rc" = 0 ] || die "$(rsync_code "$rc" "$tmp/err")" "rsync --list-only $url failed (rsync exit $rc)"
    # lines: PERMS SIZE DATE TIME NAME (NAME keeps inner spaces); regular files start with '-'
    sort -k5 "$tmp/list" >"$tmp/sorted" || cp "$tmp/list" "$tmp/sorted"
    line_re='^(-[^ ]*) +[0-9,.]+ [0-9/]+ [0-9:]+ (.+)$'
    while IFS= read -r line; do
        [[ $line =~ $line_re ]] || continue
        unescape "${BASH_REMATCH[2]}"
        name=$REPLY
        if [ "$sub" = . ]; then emit "$name"; else emit "$sub/$name"; fi
    done <"$tmp/sorted"
else
    [ -d "$root" ] || die 10 "SOURCE_URL '$root' is not a directory"
    [ -d "$root/$sub" ] || die 10 "'$sub' is not a directory under '$root'"
    start=./$sub
    [ "$sub" != . ] || start=.
    rc=0
    (cd -- "$root" && find "$start" -type f -print0) >"$tmp/list" || rc=$?
    [ "$rc" = 0 ] || die 1 "find under '$root/$sub' failed (exit $rc): an unreadable directory?"
    while IFS= read -r -d '' path; do
        emit "${path#./}"
    done < <(sort -z "$tmp/list")
fi
echo "list-dir: $count file(s) under '$sub' of $SOURCE_URL${filter:+ matching /$filter/}"
