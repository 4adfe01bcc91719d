#!/usr/bin/env bash
# Install the peer gateways for side-by-side benchmarks into benchmarks/.peers/ (git-ignored).
#
#   bash benchmarks/peers/install.sh            # both peers
#   bash benchmarks/peers/install.sh litellm    # one of them (litellm | portkey)
#
# Never project dependencies: each peer gets its own environment.
#   - LiteLLM proxy: a venv of its own, benchmarks/.peers/litellm/venv (pip install 'litellm[proxy]==VERSION')
#   - Portkey gateway: npm prefix benchmarks/.peers/portkey (npm install @portkey-ai/gateway@VERSION), run with
#     node from there (no npx download at run time)
# Idempotent: a peer already installed at the pinned version is left alone. Needs python3 (with venv), node
# and npm. benchmarks/peers.py starts them (`.venv/bin/python benchmarks/peers.py --check` tests them).
set -euo pipefail

# The newest litellm whose [proxy] extra resolves from PyPI here (1.109.x and 1.110.x pin litellm-proxy-extras /
# litellm-proxy releases the package index here does not have); not 1.107.0 (reported compromised).
LITELLM_VERSION="1.108.0"
# uvicorn's C HTTP parser, as uvicorn[standard] would bring; litellm[proxy] leaves uvicorn on h11 (pure Python).
HTTPTOOLS_VERSION="0.9.0"
PORTKEY_VERSION="1.15.2"
# @portkey-ai/gateway asks for @hono/node-server ^1.3.3; from 1.14.2 on its lightweight Response hands back the
# upstream fetch's immutable Headers and every stream fails with "TypeError: immutable" in
# ResponseService.updateHeaders (Portkey-AI/gateway issue #1389). Pinned through npm "overrides".
HONO_NODE_SERVER_VERSION="1.14.1"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$(dirname "$HERE")/.peers"
PYTHON="${PYTHON:-python3}"

fail() {
  echo "peers/install.sh: $*" >&2
  exit 1
}

install_litellm() {
  local dir="$PEERS/litellm" venv="$PEERS/litellm/venv"
  if [[ -x "$venv/bin/litellm" ]] \
    && [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"), m.version("httptools"))' 2>/dev/null)" == "$LITELLM_VERSION $HTTPTOOLS_VERSION" ]]; then
    echo "litellm $LITELLM_VERSION (httptools $HTTPTOOLS_VERSION): already installed in $venv"
    return
  fi
  command -v "$PYTHON" >/dev/null || fail "$PYTHON not found (needed for LiteLLM's venv)"
  mkdir -p "$dir"
  echo "litellm $LITELLM_VERSION: creating $venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$venv" || fail "could not create the venv $venv (is python3-venv installed?)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip \
    || fail "could not upgrade pip in $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "litellm[proxy]==$LITELLM_VERSION" "httptools==$HTTPTOOLS_VERSION" \
    || fail "pip install 'litellm[proxy]==$LITELLM_VERSION' httptools==$HTTPTOOLS_VERSION failed"
  [[ -x "$venv/bin/litellm" ]] || fail "no litellm executable in $venv/bin after the install"
  "$venv/bin/python" -c 'import litellm.proxy.proxy_server' >/dev/null 2>&1 \
    || fail "litellm.proxy.proxy_server does not import in $venv (the [proxy] extra is incomplete)"
  echo "litellm $LITELLM_VERSION (httptools $HTTPTOOLS_VERSION): installed in $venv"
}

install_portkey() {
  local dir="$PEERS/portkey"
  local pkg="$dir/node_modules/@portkey-ai/gateway"
  command -v node >/dev/null || fail "node not found (needed for the Portkey gateway)"
  command -v npm >/dev/null || fail "npm not found (needed for the Portkey gateway)"
  local hono="$dir/node_modules/@hono/node-server"
  if [[ -f "$pkg/build/start-server.js" ]] \
    && [[ "$(node -p "require('$pkg/package.json').version" 2>/dev/null)" == "$PORTKEY_VERSION" ]] \
    && [[ "$(node -p "require('$hono/package.json').version" 2>/dev/null)" == "$HONO_NODE_SERVER_VERSION" ]]; then
    echo "@portkey-ai/gateway $PORTKEY_VERSION (@hono/node-server $HONO_NODE_SERVER_VERSION): already installed in $dir"
    return
  fi
  mkdir -p "$dir"
  cat > "$dir/package.json" <<JSON
{
  "name": "llmrelay-bench-portkey",
  "private": true,
  "dependencies": {"@portkey-ai/gateway": "$PORTKEY_VERSION"},
  "overrides": {"@hono/node-server": "$HONO_NODE_SERVER_VERSION"}
}
JSON
  echo "@portkey-ai/gateway $PORTKEY_VERSION: npm install into $dir (node $(node --version))"
  # --ignore-scripts: its only install script is patch-package, with no patches in the published package.
  npm install --prefix "$dir" --no-audit --no-fund --omit=dev --ignore-scripts \
    || fail "npm install @portkey-ai/gateway@$PORTKEY_VERSION (with @hono/node-server@$HONO_NODE_SERVER_VERSION) failed"
  [[ -f "$pkg/build/start-server.js" ]] || fail "no build/start-server.js in $pkg after the install"
  [[ "$(node -p "require('$hono/package.json').version" 2>/dev/null)" == "$HONO_NODE_SERVER_VERSION" ]] \
    || fail "npm did not install @hono/node-server $HONO_NODE_SERVER_VERSION in $dir (overrides ignored?)"
  echo "@portkey-ai/gateway $PORTKEY_VERSION (@hono/node-server $HONO_NODE_SERVER_VERSION): installed in $dir"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(litellm portkey)
for target in "${targets[@]}"; do
  case "$target" in
    litellm) install_litellm ;;
    portkey) install_portkey ;;
    *) fail "unknown peer '$target' (litellm | portkey)" ;;
  esac
done
