#!/usr/bin/env bash
# The full test suite: dependencies, build, tests, formatting, lints.
#
#   scripts/test.sh
#
# Runs as root (CI does): the integration tests switch to the postgres user themselves where
# PostgreSQL needs it. A failing build stops at once; after that every step runs even if an
# earlier one failed, and the exit status is non-zero if any did.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$ROOT"

prepend_path() { [[ -d $1 && :$PATH: != *:"$1":* ]] && PATH="$1:$PATH"; return 0; }
prepend_path "${CARGO_HOME:-$HOME/.cargo}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/shims"
export PATH

failed=()
summary=()
# step NAME COMMAND...: runs COMMAND, records its outcome and duration.
step() {
    local name=$1 start rc=0
    shift
    printf '\n==> %s: %s\n' "$name" "$*"
    start=$SECONDS
    "$@" || rc=$?
    if ((rc == 0)); then
        summary+=("ok      $name ($((SECONDS - start)) s)")
    else
        summary+=("FAILED  $name ($((SECONDS - start)) s, exit $rc)")
        failed+=("$name")
    fi
    return "$rc"
}
print_summary() {
    printf '\n==> summary\n'
    printf '  %s\n' "${summary[@]}"
}

step "dependencies" "$SCRIPT_DIR/install-deps.sh" || { print_summary; exit 1; }
step "build" cargo build --workspace --all-targets || { print_summary; exit 1; }

if cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doctests; run them first so that nextest's summary closes the output.
    step "doctests" cargo test --workspace --doc --no-fail-fast || true
    step "tests (nextest)" cargo nextest run --workspace --no-fail-fast || true
else
    step "tests" cargo test --workspace --no-fail-fast || true
fi
step "rustfmt" cargo fmt --all --check || true
step "clippy" cargo clippy --workspace --all-targets -- -D warnings || true
# The deployment end to end (docs/deployment.md): three container hosts, the real
# ansible-playbook over SSH, failover, restarts, a rolling restart, idempotence. One
# combination (docker runtime, PostgreSQL 15) with the dev-profile binaries built above;
# about 13 minutes from an empty Docker. The other combinations run by the same command.
step "deployment e2e (docker, PostgreSQL 15)" deploy/test/e2e.sh --debug-binaries || true

print_summary
if ((${#failed[@]})); then
    printf 'scripts/test.sh: FAILED: %s\n' "${failed[*]}" >&2
    exit 1
fi
echo "scripts/test.sh: all steps passed"
