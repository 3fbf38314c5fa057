#!/usr/bin/env bash
# Flux LoRA Studio launcher (Linux, macOS).
#
#   ./launch.sh [app flags]      start the app (flags go to app.py: --port, --listen, --share, --auth, --allow)
#   ./launch.sh --test [args]    run the tests (extra args go to pytest)
#
# First run: creates .venv beside this script and installs requirements.txt (+ requirements-test.txt).
# .venv/.requirements.sha256 records what was installed; while it matches, later runs start at once.
# Edit a requirements file and the next run installs again. The marker is written only after a
# successful install, so an interrupted or failed one is retried next time.
#
# Double-click: flux-lora-studio.desktop beside this script runs it in a terminal window (see the README).
#
# Environment: PYTHON=/path/to/python3   use this interpreter to create .venv (3.10 or newer).
#              FLUX_STUDIO_PAUSE=1        after an error, wait for Enter before exiting (the .desktop file sets it:
#                                         its terminal window closes when this script ends, message and all).
set -euo pipefail

pause_if_asked() {
    if [[ -n ${FLUX_STUDIO_PAUSE:-} && -t 0 ]]; then
        read -r -p "Press Enter to close this window. " _ || true
    fi
}

die() {
    printf 'launch.sh: error: %s\n' "$*" >&2
    pause_if_asked
    exit 1
}

cd -- "$(dirname -- "${BASH_SOURCE[0]}")" || die "cannot enter the folder of launch.sh"

readonly VENV=.venv
readonly VENV_PY=$VENV/bin/python
readonly MARKER=$VENV/.requirements.sha256
readonly MIN_PYTHON=3.10

[[ -f requirements.txt ]] || die "requirements.txt not found in $PWD"

requirement_files=(requirements.txt)
[[ -f requirements-test.txt ]] && requirement_files+=(requirements-test.txt)

# sha256 of the requirement files, concatenated in the order above.
requirements_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        cat "${requirement_files[@]}" | sha256sum | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        cat "${requirement_files[@]}" | shasum -a 256 | cut -d' ' -f1
    else
        cat "${requirement_files[@]}" | "$1" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
    fi
}

# The first interpreter that runs and is new enough: $PYTHON if set, else python3, python3.N, python.
find_python() {
    local candidates=() candidate
    if [[ -n ${PYTHON:-} ]]; then
        candidates=("$PYTHON")
    else
        candidates=(python3 python3.14 python3.13 python3.12 python3.11 python3.10 python)
    fi
    for candidate in "${candidates[@]}"; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# "Python 3.x.y", or why there is none, on one line.
python_version_of() {
    local version
    version=$("$1" --version 2>/dev/null | head -n 1) || true
    echo "${version:-$1 not found or not runnable}"
}

python_missing_message() {
    if [[ -n ${PYTHON:-} ]]; then
        echo "PYTHON=$PYTHON is not Python $MIN_PYTHON or newer ($(python_version_of "$PYTHON"))"
    else
        echo "Python $MIN_PYTHON or newer is needed ($(python_version_of python3)); install it, or set PYTHON=/path/to/python3"
    fi
}

# Make .venv (or repair it) and install the requirement files into it; write the marker last.
install_requirements() {
    local want_hash=$1 python f
    local pip_flags=(--disable-pip-version-check) req_args=()
    [[ -n ${CI:-} || ! -t 1 ]] && pip_flags+=(--progress-bar off)
    for f in "${requirement_files[@]}"; do req_args+=(-r "$f"); done

    if [[ ! -e $VENV ]]; then
        python=$(find_python) || die "$(python_missing_message)"
        echo "launch.sh: creating $VENV with $("$python" --version 2>&1) ($python)"
        if ! "$python" -m venv "$VENV"; then
            rm -rf -- "$VENV"
            die "could not create $VENV with $python (on Debian/Ubuntu: apt install python3-venv)"
        fi
    elif ! "$VENV_PY" -c '' >/dev/null 2>&1; then
        python=$(find_python) || die "$(python_missing_message)"
        echo "launch.sh: $VENV has no working python; creating it again with $python" >&2
        "$python" -m venv --clear "$VENV" ||
            die "could not create $VENV with $python (on Debian/Ubuntu: apt install python3-venv)"
    else
        echo "launch.sh: requirements changed or not fully installed; installing into $VENV"
    fi
    "$VENV_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$VENV has $("$VENV_PY" --version 2>&1), Python $MIN_PYTHON or newer is needed: delete $VENV and run again"

    rm -f -- "$MARKER"
    echo "launch.sh: pip install ${req_args[*]} (the first time takes a few minutes)"
    "$VENV_PY" -m pip install "${pip_flags[@]}" "${req_args[@]}" ||
        die "pip could not install ${requirement_files[*]} (see pip's messages above); run launch.sh again to retry"
    { printf '%s\n' "$want_hash" >"$MARKER.tmp" && mv -f -- "$MARKER.tmp" "$MARKER"; } ||
        die "could not write $MARKER"
    echo "launch.sh: requirements installed"
}

if [[ -x $VENV_PY ]]; then
    hash_python=$VENV_PY
else
    hash_python=$(find_python) || hash_python=python3
fi
want_hash=$(requirements_hash "$hash_python") || die "could not compute the sha256 of ${requirement_files[*]}"
have_hash=""
[[ -f $MARKER ]] && have_hash=$(<"$MARKER")
if [[ ! -x $VENV_PY || $have_hash != "$want_hash" ]]; then
    install_requirements "$want_hash"
fi

if [[ ${1:-} == --test ]]; then
    "$VENV_PY" -c 'import pytest' >/dev/null 2>&1 ||
        die "pytest is not installed in $VENV (is requirements-test.txt missing?)"
    exec "$VENV_PY" -m pytest -q tests "${@:2}"
fi
[[ -f app.py ]] || die "app.py not found in $PWD"
if [[ -n ${FLUX_STUDIO_PAUSE:-} ]]; then
    status=0
    "$VENV_PY" app.py "$@" || status=$?
    # 130: Ctrl+C, the usual way to stop the app; anything else non-zero is an error worth reading.
    if ((status != 0 && status != 130)); then
        printf 'launch.sh: app.py stopped with exit code %s; see the messages above\n' "$status" >&2
        pause_if_asked
    fi
    exit "$status"
fi
exec "$VENV_PY" app.py "$@"
