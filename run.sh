#!/usr/bin/env bash
# Create or update the project environment (.venv), then run a job in it.
#   bash run.sh demo [hydra overrides]   train the default ensemble on the embedded digits data, then attack it
#   bash run.sh test [pytest args]       run the test suite
#   bash run.sh docs                     check the configuration reference, build the docs site (site/)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# Reinstall only when the dependency declarations change.
stamp=.venv/.fedrobust-deps
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first, pinned, so that no later resolution pulls a CUDA build onto a CPU machine
    .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt "torch==2.13.0"
    .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[test,docs]"
    # the parity tests' second reference (tests/test_parity.py); it declares torchvision and an old requests
    # that it never imports, so it goes in without its declared dependencies
    .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt --no-deps torchattacks
    echo "$want" > "$stamp"
fi

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
cmd="${1:-demo}"
shift || true
case "$cmd" in
    demo) exec .venv/bin/fedrobust train evaluate=true "$@" ;;
    # one pytest-xdist worker per core; tests that share a module's fixture stay on one worker (xdist_group)
    test) exec .venv/bin/python -m pytest -n auto --dist loadgroup "$@" ;;
    # the reference is regenerated from the schemas and must match the committed page; --strict fails on a
    # broken link or anchor, and on a page outside the nav
    docs) .venv/bin/python docs/gen_config_reference.py --check
          NO_MKDOCS_2_WARNING=1 exec .venv/bin/mkdocs build --strict --quiet "$@" ;;
    *) echo "usage: bash run.sh {demo|test|docs} [args...]" >&2; exit 2 ;;
esac
