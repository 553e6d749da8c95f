#!/usr/bin/env bash
# ansible-test sanity for the collection. ansible-test needs the collection at
# .../ansible_collections/rmsops/rms, so the collection's files are copied to
# build/sanity/ first. Runs without containers: each test gets a virtualenv
# (--venv) whose requirements come from the package index.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${VENV_BIN:-$repo/.venv/bin}
python_version=${SANITY_PYTHON:-3.11}
dest=$repo/build/sanity/ansible_collections/rmsops/rms

# Not collection content: rmsd/ is node software with its own ruff and pytest;
# tests/ (except tests/sanity/, ansible-test's own), scripts/ and benchmarks/ are this
# repository's pytest suite and tooling.
exclude='^(rmsd/|tests/(?!sanity/)|scripts/|benchmarks/|\.ci/|Makefile$|constraints\.txt$)'

rm -rf "$dest"
mkdir -p "$dest"
cd "$repo"
# Tracked and new (not ignored) files, so uncommitted work is checked too.
git ls-files -z --cached --others --exclude-standard \
    | { grep -zvP "$exclude" || true; } \
    | tar -c --null -T - --ignore-failed-read -f - 2>/dev/null \
    | tar -x -C "$dest"
# A repository of its own, so ansible-test lists these files rather than asking
# the enclosing repository (which ignores build/).
git -C "$dest" init --quiet

# ansible-test bootstraps pip in each new virtualenv with a script it downloads
# from outside the package index; supply a stand-in under the cached name.
pip_version=$("$bin/python" -c '
import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="'"$python_version"'"))["pip"])')
get_pip=$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py
if [ ! -e "$get_pip" ]; then
    install -D -m 0644 "$repo/scripts/ansible-test-get-pip.py" "$get_pip"
fi

cd "$dest"
exec "$bin/ansible-test" sanity --venv --python "$python_version" --color no "$@"
