#!/usr/bin/env bash
# Project virtual environment for the tests: $PROJECT/.venv
#
#   bash launchers/testbed/venv.sh        # create/update it; prints its path on stdout
#   . launchers/testbed/venv.sh           # same, then activates it in the current shell
#
# Debian's own python3 refuses a bare `pip install` (PEP 668), hence the venv.
# Installs the project in editable mode with its `test` extra (pytest, mypy, ruff,
# import-linter) plus mpi4py and the PyPI `mpich` wheel (an MPICH that runs under
# `srun --mpi=pmi2` across the test-bed's virtual nodes; OpenMPI does not).
# Re-installs only when pyproject.toml is newer than the stamp file
# ($PROJECT/.venv/.scalebox-testbed-stamp) or SCALEBOX_TESTBED_REINSTALL=1.
# Env: PYTHON (interpreter used to create the venv): default Debian's /usr/bin/python3 when
# present, else python3 on PATH. Stage jobs run the venv's python as other users (the test-bed's
# unprivileged user), so an interpreter under a private home (pyenv in /root) would not do;
# a venv made from another interpreter than the chosen one is recreated.

_scalebox_venv() (
  set -euo pipefail
  local here project venv stamp py
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  project=${PROJECT:-$(cd "$here/../.." && pwd)}
  venv=$project/.venv
  stamp=$venv/.scalebox-testbed-stamp
  py=${PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=python3; fi
  fi
  log() { echo "[testbed] $*" >&2; }

  local want_home have_home
  want_home=$(dirname "$(command -v "$py")")
  have_home=$(sed -n 's/^home *= *//p' "$venv/pyvenv.cfg" 2>/dev/null || true)
  if [ -e "$venv" ] && [ -n "$have_home" ] && [ "$have_home" != "$want_home" ]; then
    log "venv: $venv was made from $have_home, not $want_home: recreating"
    rm -rf "$venv"
  fi

  if [ -e "$venv" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "venv: $venv is broken (interpreter gone?), recreating"
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    log "venv: creating $venv"
    if ! "$py" -m venv "$venv" >/tmp/scalebox-testbed-venv.log 2>&1; then
      rm -rf "$venv"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # Debian splits venv/ensurepip out of python3 (python3.X-venv)
        local pkgs
        pkgs="python3-venv python3-pip $("$py" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])')"
        log "venv: '$py -m venv' failed; apt-get install $pkgs"
        # shellcheck disable=SC1091
        . "$here/lib.sh"
        # shellcheck disable=SC2086
        tb_apt_install $pkgs
        "$py" -m venv "$venv" || { cat /tmp/scalebox-testbed-venv.log >&2; exit 1; }
      else
        cat /tmp/scalebox-testbed-venv.log >&2; exit 1
      fi
    fi
  fi
  if [ "${SCALEBOX_TESTBED_REINSTALL:-0}" = 1 ] || [ ! -f "$stamp" ] || [ "$project/pyproject.toml" -nt "$stamp" ]; then
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
    log "venv: pip install -e '${project}[test]' mpi4py mpich"
    "${pip[@]}" install -q --upgrade pip </dev/null >&2
    "${pip[@]}" install -q -e "${project}[test]" mpi4py mpich </dev/null >&2
    touch "$stamp"
  fi
  echo "$venv"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # sourced: build, then activate in the caller's shell (without changing its shell options)
  if _scalebox_venv_path=$(_scalebox_venv); then
    VIRTUAL_ENV=$_scalebox_venv_path
    export VIRTUAL_ENV
    case ":$PATH:" in *":$VIRTUAL_ENV/bin:"*) ;; *) PATH=$VIRTUAL_ENV/bin:$PATH; export PATH ;; esac
    echo "$VIRTUAL_ENV"
    unset _scalebox_venv_path
  else
    echo "[testbed] venv setup failed" >&2
    unset _scalebox_venv_path
    return 1
  fi
else
  _scalebox_venv
fi
