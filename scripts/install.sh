#!/usr/bin/env bash
# Creates .venv and installs the project once (again only when pyproject.toml changes), and the
# system packages the tests and the demo need (openssh-server for the emulated instances).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing system packages: ${need_apt[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
  else
    echo "missing system packages: ${need_apt[*]}; run: sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "==> installing Python packages into .venv (first time: a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  # The CPU build of torch; a looser spec could pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
echo "==> environment ready (.venv)"
