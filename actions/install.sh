#!/usr/bin/env bash
# Installs swiftci from the checkout this action came from, so `uses: .../actions/<stage>@v1` pins the code and the
# action together. Called by every action in this folder; reads its settings from the environment:
#   SWIFTCI_EXTRAS        extras to install, e.g. "train,eval" (may be empty)
#   SWIFTCI_CONSTRAINTS   a pip constraints file, relative to the working directory (may be empty)
#   SWIFTCI_SETUP_PYTHON  "true" when actions/setup-python provided the interpreter; otherwise a virtual environment
#                         that sees the runner's site-packages (e.g. a CUDA torch baked into a GPU image) is created.
set -euo pipefail
echo "::group::Install swiftci"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${SWIFTCI_SETUP_PYTHON:-true}" != "true" ]; then
  venv="${RUNNER_TEMP:-/tmp}/swiftci-venv"
  [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
  echo "$venv/bin" >> "$GITHUB_PATH"
  export PATH="$venv/bin:$PATH"
fi
spec="$root"
if [ -n "${SWIFTCI_EXTRAS:-}" ]; then
  if ! [[ "$SWIFTCI_EXTRAS" =~ ^[a-z,]+$ ]]; then
    echo "::error::extras: '$SWIFTCI_EXTRAS' is not a comma-separated list of extras such as train,eval"
    exit 2
  fi
  spec="$root[$SWIFTCI_EXTRAS]"
fi
# an earlier action of this job that installed this very source with these extras into this interpreter leaves a
# stamp: a job that calls several actions installs once
source_hash="$(cd "$root" && find pyproject.toml swiftci -type f -name '*.py' -o -type f -name pyproject.toml \
  | sort | xargs sha256sum | sha256sum | cut -c1-16)"
stamp="$(python -c 'import sys; print(sys.prefix)')/.swiftci-installed-$source_hash-${SWIFTCI_EXTRAS:-core}-$(printf '%s' "${SWIFTCI_CONSTRAINTS:-}" | sha256sum | cut -c1-8)"
if [ -f "$stamp" ] && command -v swiftci >/dev/null; then
  echo "swiftci from this checkout is already installed here"
else
  args=(--disable-pip-version-check --quiet)
  if [ -n "${SWIFTCI_CONSTRAINTS:-}" ]; then
    args+=(-c "$SWIFTCI_CONSTRAINTS")
  fi
  python -m pip install "${args[@]}" "$spec"
  touch "$stamp"
fi
swiftci --version
echo "::endgroup::"
