#!/usr/bin/env bash
# Checks the systemd units in this directory with `systemd-analyze verify` and fails on any
# error or warning; also checks that every key of the example config files is a flag of its
# subcommand. Run as root on Debian (it installs systemd when systemd-analyze is missing);
# systemd need not be running as PID 1.
#
#   cluster/systemd/verify.sh
#
# `verify` insists that ExecStart='s program exists and is executable. The units start
# /usr/local/bin/colony, which a build machine need not have, so each unit is copied into a
# temporary directory with that path rewritten to the built binary,
# ${CARGO_TARGET_DIR:-$HOME/.cache/colony/target}/release/colony (or $COLONY_BIN), and the copy
# is verified; nothing outside the temporary directory is touched. (systemd-analyze
# --root=DIR would resolve the program inside DIR, but then also every unit the ones here
# depend on, so DIR would need a copy of the whole unit tree.) Without a built binary a stand-in
# executable takes its place and the config-key check is skipped, saying so.
#
# verify sometimes prints a warning and still exits 0 (an unknown key is "ignoring"), so any
# output at all counts as a failure, as does a non-zero exit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
units=(colony-server.service colony-executor.service colony-learner.service)
# The program every unit's ExecStart= names, and the subcommand each runs.
installed=/usr/local/bin/colony
declare -A role=(
    [colony-server.service]=server
    [colony-executor.service]=executor
    [colony-learner.service]=learner
)

fail() {
    echo "verify.sh: $*" >&2
    exit 1
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] ||
        fail "systemd-analyze is missing; run as root to install it (apt-get install systemd)"
    command -v apt-get >/dev/null 2>&1 ||
        fail "systemd-analyze is missing and there is no apt-get to install it"
    echo "systemd-analyze is missing: installing systemd" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq systemd >&2
    command -v systemd-analyze >/dev/null 2>&1 || fail "installed systemd but still no systemd-analyze"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bin=${COLONY_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/colony/target}/release/colony}
have_binary=true
if [ ! -x "$bin" ]; then
    echo "note: no built binary at $bin; checking the units against a stand-in" >&2
    have_binary=false
    bin=$work/colony-stand-in
    printf '#!/bin/sh\nexit 0\n' >"$bin"
    chmod 0755 "$bin"
fi
case $bin in
    *[[:space:]]*) fail "the binary's path has whitespace, which ExecStart= would split: $bin" ;;
esac

failed=0
for unit in "${units[@]}"; do
    source_unit=$here/$unit
    [ -f "$source_unit" ] || fail "missing unit $source_unit"
    # Only a unit whose ExecStart= starts the installed program is checked against the binary;
    # anything else is an edit this script does not know about.
    grep -q "^ExecStart=$installed " "$source_unit" ||
        fail "$unit: ExecStart= does not start $installed; update verify.sh with the unit"
    # One directory per unit: verify also loads every unit file beside the one it is given, and
    # a broken sibling would be reported under this unit's name.
    mkdir "$work/${unit%.service}"
    copy=$work/${unit%.service}/$unit
    sed "s|^ExecStart=$installed |ExecStart=$bin |" "$source_unit" >"$copy"
    set +e
    output=$(cd "$work" && systemd-analyze verify "$copy" 2>&1)
    status=$?
    set -e
    if [ "$status" -ne 0 ] || [ -n "$output" ]; then
        echo "FAIL $unit (systemd-analyze verify exited $status; $copy is a copy of $source_unit)"
        printf '%s\n' "$output" | sed 's/^/    /'
        failed=1
    else
        echo "ok   $unit"
    fi
done

# Each key of an example config file must be a long flag of its subcommand (the config file
# refuses unknown keys at start-up; this finds them before a host does).
if [ "$have_binary" = true ] && command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import tomllib' 2>/dev/null; then
    for unit in "${units[@]}"; do
        sub=${role[$unit]}
        file=$here/$sub.toml
        [ -f "$file" ] || fail "missing example config $file"
        if ! problems=$("$bin" "$sub" --help | python3 -c '
import re, sys, tomllib
flags = set(re.findall(r"^\s+(?:-\w, )?--([a-z0-9-]+)", sys.stdin.read(), re.M))
with open(sys.argv[1], "rb") as f:
    keys = tomllib.load(f)
for key in keys:
    if key.replace("_", "-") not in flags:
        print(f"`{key}` is not a flag of colony {sys.argv[2]}")
' "$file" "$sub" 2>&1); then
            echo "FAIL $sub.toml: $problems"
            failed=1
        elif [ -n "$problems" ]; then
            echo "FAIL $sub.toml:"
            printf '%s\n' "$problems" | sed 's/^/    /'
            failed=1
        else
            echo "ok   $sub.toml"
        fi
    done
else
    echo "note: config keys not checked (needs the built binary and Python 3.11's tomllib)" >&2
fi

[ "$failed" -eq 0 ] || fail "some checks failed (above)"
echo "all units verify cleanly"
