#!/usr/bin/env bash
# Regenerate constraints.txt: install the direct dependencies below into a
# throwaway virtualenv and freeze everything that came with them. Then derive
# from it the hash lock of what the server role's wheelhouse may hold.
#   --lock-only: keep constraints.txt, regenerate the lock alone (after a change
#   to rmsd's dependencies or its [build-system] pin).
set -euo pipefail

cd "$(dirname "$0")/.."
direct=(
    ansible-core==2.19.14 molecule==26.10.0 ansible-lint==26.10.1
    fastapi==0.165.0 uvicorn==0.54.0 sqlalchemy==2.1.9 alembic==1.20.1
    psycopg==3.3.9 psycopg-binary==3.3.9 joserfc==1.8.0 jwcrypto==1.6.1
    cryptography==50.0.2 asn1crypto==1.5.1 tomli-w==1.2.0 httpx==0.28.1
    supervisor==4.3.0 pytest==9.2.0 schemathesis==4.32.5 pytest-xdist==3.8.0 aiosmtpd==1.4.6 jinja2==3.1.6
    python-pkcs11==0.10.1 zxcvbn==4.5.0 mypy==2.4.1 ansible-builder==3.2.0 antsibull-changelog==0.36.0 antsibull-docs==2.28.0 sphinx==9.0.4 py-spy==0.4.3
    uv==0.13.8
    ruff
)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
if [ "${1:-}" = --lock-only ]; then
    "$venv/bin/pip" install --quiet -c constraints.txt uv
else
    "$venv/bin/pip" install --quiet "${direct[@]}"
    {
        sed -n '/^#/p' constraints.txt
        "$venv/bin/pip" freeze --all | grep -v -i -E '^(pip|setuptools|rmsd)==|^-e |^#' | sort -f
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
fi

# requirements/rmsd-wheelhouse.lock: rmsd's dependencies, the supervisor extra and the build backend its
# [build-system] pins, at the versions constraints.txt pins, with the sha256 of every file of each release
# (every host python and machine). The server role downloads with --require-hashes against it and checks
# its wheelhouse cache against it. tests/test_wheelhouse.py fails when it and constraints.txt disagree.
backend=$("$venv/bin/python" -c 'import tomllib; print(*tomllib.load(open("rmsd/pyproject.toml", "rb"))["build-system"]["requires"])')
printf 'supervisor\n%s\n' "$backend" \
    | "$venv/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
        --custom-compile-command scripts/update-constraints.sh \
        -c constraints.txt -o requirements/rmsd-wheelhouse.lock rmsd/pyproject.toml -
