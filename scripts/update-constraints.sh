#!/usr/bin/env bash
# Regenerate constraints.txt: install the direct dependencies below into a
# throwaway virtualenv and freeze everything that came with them.
set -euo pipefail

cd "$(dirname "$0")/.."
direct=(
    ansible-core==2.19.14 molecule==26.10.0 ansible-lint==26.10.1
    fastapi==0.165.0 uvicorn==0.54.0 sqlalchemy==2.1.9 alembic==1.20.1
    psycopg==3.3.9 psycopg-binary==3.3.9 joserfc==1.8.0 jwcrypto==1.6.1
    cryptography==50.0.2 asn1crypto==1.5.1 tomli-w==1.2.0 httpx==0.28.1
    supervisor==4.3.0 pytest==9.2.0 schemathesis==4.32.5 pytest-xdist==3.8.0 aiosmtpd==1.4.6 jinja2==3.1.6
    python-pkcs11==0.10.1 zxcvbn==4.5.0 mypy==2.4.1 ansible-builder==3.2.0 antsibull-changelog==0.36.0 antsibull-docs==2.28.0 sphinx==9.0.4 py-spy==0.4.3
    ruff
)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install --quiet "${direct[@]}"
{
    sed -n '/^#/p' constraints.txt
    "$venv/bin/pip" freeze --all | grep -v -i -E '^(pip|setuptools|rmsd)==|^-e |^#' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
