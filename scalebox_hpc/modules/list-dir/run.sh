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
#   MAX_MESSAGES   the module's arguments.max_messages (default 100000): the most messages one task may
#                  emit. A tree with more files than that is split instead of listed inline: the files
#                  right in BODY are emitted, and each sub-directory goes back to this module (MODULE_NAME)
#                  as a message of its own, so every task stays under the cap and every file is still
#                  listed exactly once. A directory with more direct entries than the cap is split into
#                  parts by name ranges (headers list_dir_from / list_dir_to: hex-encoded bounds).
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
# the ssh form's host reaches ssh as an argument: one starting with '-' would be an ssh option
ssh_host_ok() { local h=${1%%:*}; h=${h##*@}; [[ $1 == rsync://* || $h != -* ]]; }

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
headers=${2-}
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

cap=${MAX_MESSAGES:-100000}
[[ $cap =~ ^[1-9][0-9]{0,17}$ ]] || die 14 "MAX_MESSAGES must be a positive integer, got '$cap'"

# hex <-> bytes: the name-range bounds travel hex-encoded in the headers (any byte but NUL is safe)
unhex() {  # unhex HEX -> $REPLY
    local h=$1 esc='' i
    for ((i = 0; i < ${#h}; i += 2)); do esc+="\\x${h:i:2}"; done
    printf -v REPLY '%b' "$esc"
}
hexof() { printf '%s' "$1" | LC_ALL=C od -An -v -tx1 | tr -d ' \n'; }

# a part task (see MAX_MESSAGES) lists only the direct entries of BODY with lo <= name < hi (byte order)
part=0 lo='' hi=''
if [[ $headers =~ \"list_dir_from\":\ *\"([0-9a-f]*)\" ]]; then
    part=1
    (( ${#BASH_REMATCH[1]} % 2 == 0 )) || die 14 "bad list_dir_from header"
    unhex "${BASH_REMATCH[1]}"; lo=$REPLY
fi
if [[ $headers =~ \"list_dir_to\":\ *\"([0-9a-f]*)\" ]]; then
    part=1
    (( ${#BASH_REMATCH[1]} % 2 == 0 )) || die 14 "bad list_dir_to header"
    unhex "${BASH_REMATCH[1]}"; hi=$REPLY
fi

count=0
handed=0
batch=0
if [ -n "${SINK_MODULE:-}" ] && [ "${SEND_MESSAGE:-no}" != yes ]; then
    batch=1
    exec 3>>sink-tasks.txt
fi
# characters that would split a sink-tasks.txt line (Python's str.splitlines): such names go through send-message
odd=$'[\n\r\v\f\x1c\x1d\x1e]'
one_line() { ! [[ $1 =~ $odd || $1 == *$'\xc2\x85'* || $1 == *$'\xe2\x80\xa8'* || $1 == *$'\xe2\x80\xa9'* ]]; }
emit() {  # emit RELATIVE_PATH
    local rel=$1
    if [ -n "$filter" ] && ! [[ $rel =~ $filter ]]; then return 0; fi
    if [ "$batch" = 1 ] && one_line "$rel"; then
        # "module,body,{headers}": the trailing {} keeps any ",{" inside the body part of the body
        printf '%s,%s,{}\n' "$SINK_MODULE" "$rel" >&3
    else
        send-message "$rel"
    fi
    count=$((count + 1))
}
again() {  # again BODY HEADERS_JSON: a task for this module itself (a sub-directory, or a part)
    if [ "$batch" = 1 ] && one_line "$1"; then
        printf '%s,%s,%s\n' "$MODULE_NAME" "$1" "$2" >&3
    else
        send-job-message "$MODULE_NAME" "$1" "$2"
    fi
    handed=$((handed + 1))
}
joined() { if [ "$sub" = . ]; then REPLY=$1; else REPLY=$sub/$1; fi; }

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
remote=0
if is_remote "$SOURCE_URL"; then
    remote=1
    ssh_host_ok "$SOURCE_URL" || die 14 "the host of '$SOURCE_URL' must not start with '-'"
    command -v rsync >/dev/null 2>&1 || die 14 "rsync is not installed"
    extra=()
    [ -z "${RSYNC_OPTS:-}" ] || read -r -a extra <<<"$RSYNC_OPTS"
    url=$root/
    [ "$sub" = . ] || url=$root/./$sub/   # ./ : a daemon would parse a leading '-' as an option
else
    [ -d "$root" ] || die 10 "SOURCE_URL '$root' is not a directory"
    [ -d "$root/$sub" ] || die 10 "'$sub' is not a directory under '$root'"
fi
remote_list() {  # remote_list RSYNC_OPTION... -> $tmp/list
    local rc=0
    rsync --list-only "$@" --no-human-readable --protect-args "${extra[@]}" -- "$url" >"$tmp/list" 2>"$tmp/err" || rc=$?
    cat "$tmp/err" >&2
    [ "$rc" = 0 ] || die "$(rsync_code "$rc" "$tmp/err")" "rsync --list-only $url failed (rsync exit $rc)"
}

# the whole listing is taken before the first message: a failed listing emits nothing
if [ "$part" = 0 ]; then
    if [ "$remote" = 1 ]; then
        remote_list -r
        total=$(grep -c '^-' "$tmp/list" || :)
    else
        start=./$sub
        [ "$sub" != . ] || start=.
        rc=0
        (cd -- "$root" && find "$start" -type f -print0) >"$tmp/list" || rc=$?
        [ "$rc" = 0 ] || die 1 "find under '$root/$sub' failed (exit $rc): an unreadable directory?"
        total=$(tr -cd '\0' <"$tmp/list" | wc -c)
    fi
    if [ "$total" -le "$cap" ]; then
        if [ "$remote" = 1 ]; then
            # lines: PERMS SIZE DATE TIME NAME (NAME keeps inner spaces); regular files start with '-'
            sort -k5 "$tmp/list" >"$tmp/sorted" || cp "$tmp/list" "$tmp/sorted"
            line_re='^(-[^ ]*) +[0-9,.]+ [0-9/]+ [0-9:]+ (.+)$'
            while IFS= read -r line; do
                [[ $line =~ $line_re ]] || continue
                unescape "${BASH_REMATCH[2]}"
                joined "$REPLY"; emit "$REPLY"
            done <"$tmp/sorted"
        else
            while IFS= read -r -d '' path; do
                emit "${path#./}"
            done < <(sort -z "$tmp/list")
        fi
        echo "list-dir: $count file(s) under '$sub' of $SOURCE_URL${filter:+ matching /$filter/}"
        exit 0
    fi
    echo "list-dir: $total files under '$sub' exceed MAX_MESSAGES=$cap: splitting by directory"
fi

# -- split: the direct entries of BODY (in the part's name range) --------------------------------------
[ -n "${MODULE_NAME:-}" ] || die 14 "MODULE_NAME is not set: cannot hand sub-directories back to list-dir"
# records NAME/T (T: f file, d directory; a name never holds '/'), then the range's bounds as NAME/<
# and NAME/> markers; sorted on NAME byte-wise (ties: '<' and '>' sort before 'd' and 'f'), the
# entries between the markers are the range: no locale-dependent comparison anywhere
entries() {
    local line t
    if [ "$remote" = 1 ]; then
        remote_list -d
        local re='^([-d])[^ ]* +[0-9,.]+ [0-9/]+ [0-9:]+ (.+)$'
        while IFS= read -r line; do
            [[ $line =~ $re ]] || continue
            t=f; [ "${BASH_REMATCH[1]}" = - ] || t=d
            unescape "${BASH_REMATCH[2]}"
            [ "$REPLY" != . ] || continue
            printf '%s/%s\0' "$REPLY" "$t"
        done <"$tmp/list"
    else
        for t in f d; do
            (cd -- "$root/$sub" && find . -mindepth 1 -maxdepth 1 -type "$t" -print0) >"$tmp/$t" \
                || die 1 "find in '$root/$sub' failed: an unreadable directory?"
            while IFS= read -r -d '' line; do printf '%s/%s\0' "${line#./}" "$t"; done <"$tmp/$t"
        done
    fi
    [ "$part" = 0 ] || [ -z "$lo" ] || printf '%s/<\0' "$lo"
    [ "$part" = 0 ] || [ -z "$hi" ] || printf '%s/>\0' "$hi"
}
entries >"$tmp/records"
LC_ALL=C sort -z -t/ -k1,1 "$tmp/records" >"$tmp/sorted"
inside=1
[ -z "$lo" ] || inside=0
n=0
: >"$tmp/range"
while IFS= read -r -d '' rec; do
    case ${rec##*/} in
        '<') inside=1; continue ;;
        '>') break ;;
    esac
    [ "$inside" = 1 ] || continue
    [[ ${rec##*/} == f || $rec != *$'\n'* ]] || die 1 "cannot split at the directory '${rec%/*}': its name holds a newline"
    printf '%s\0' "$rec" >>"$tmp/range"
    n=$((n + 1))
done <"$tmp/sorted"

if [ "$n" -le "$cap" ]; then
    while IFS= read -r -d '' rec; do
        joined "${rec%/*}"
        if [ "${rec##*/}" = f ]; then emit "$REPLY"; else again "$REPLY" '{}'; fi
    done <"$tmp/range"
    note=
    [ "$part" = 0 ] || note=" (a part: names from '$lo' to '${hi:-the end}')"
    echo "list-dir: $count file(s) right under '$sub'$note of $SOURCE_URL${filter:+ matching /$filter/}," \
        "$handed sub-director(ies) handed on"
    exit 0
fi
# more entries than the cap: parts of at most `chunk` entries each, at most `cap` parts
chunk=$(( (n + cap - 1) / cap ))
[ "$chunk" -ge "$cap" ] || chunk=$cap
from=$lo i=0
while IFS= read -r -d '' rec; do
    if [ "$i" -gt 0 ] && [ $((i % chunk)) = 0 ]; then
        again "$sub" "{\"list_dir_from\":\"$(hexof "$from")\",\"list_dir_to\":\"$(hexof "${rec%/*}")\"}"
        from=${rec%/*}
    fi
    i=$((i + 1))
done <"$tmp/range"
again "$sub" "{\"list_dir_from\":\"$(hexof "$from")\",\"list_dir_to\":\"$(hexof "$hi")\"}"
echo "list-dir: $n entries right under '$sub' exceed MAX_MESSAGES=$cap: $handed part(s) of up to $chunk handed on"
