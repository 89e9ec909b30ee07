#!/usr/bin/env bash
# Production install of the cloud bridge, offline from the wheelhouse of `make dist`: the
# `cloud-bridge` system user, /opt/autoglm-edge/.venv with only what the bridge runs (add
# --postgres for a PostgreSQL registry), /etc/cloud-bridge (config from systemd/cloud-bridge.toml,
# tls/, keys/, the API token), /var/lib/cloud-bridge, the systemd unit (enabled when systemd runs),
# then `cloud-bridge check-config` as the service user would run it. Run it again to upgrade: what
# is in place (config, certificates, token) is kept unless given again.
# Exit status: 0 installed and the config check passed; 1 install error; 2 installed, the config
# check failed (it says which file or key).
set -euo pipefail
SERVICE=cloud-bridge PROGRAM=cloud-bridge EXTRA=bridge
# shellcheck source=deploy/install-common.sh
. "$(dirname "$0")/install-common.sh"

usage() {
  cat <<USAGE
usage: sudo deploy/install-bridge.sh [options]
$COMMON_USAGE
  --config FILE       install this config instead of the template
  --broker HOST       mqtt.host in the config made from the template
  --ca FILE           the fleet CA -> /etc/cloud-bridge/tls/fleet-ca.crt
  --cert FILE         the bridge's certificate (CN cloud-bridge) -> /etc/cloud-bridge/tls/cloud-bridge.crt
  --key FILE          its key -> /etc/cloud-bridge/tls/cloud-bridge.key (0600 root: LoadCredential=mqtt-tls-key)
  --signing-key FILE  the fleet's Ed25519 signing key -> /etc/cloud-bridge/keys/fleet-signing.pem (0600 root)
  --postgres          also install the PostgreSQL driver ([store] url)
The API token /etc/cloud-bridge/api-token (0600 root: LoadCredential=api-token) is made when missing;
clients read it with: sudo head -1 /etc/cloud-bridge/api-token
USAGE
}

CONFIG="" BROKER="" CA="" CERT="" KEY="" SIGNING=""
while [ $# -gt 0 ]; do
  used=0; parse_common_option "$@" || used=$?
  if [ "$used" -gt 0 ]; then shift "$used"; continue; fi
  if [ "$1" = --postgres ]; then EXTRA=bridge,postgres; shift; continue; fi
  case "$1" in -h|--help) usage; exit 0 ;; esac
  [ $# -ge 2 ] || { echo "error: unknown or incomplete option $1" >&2; usage; exit 1; }
  case "$1" in
    --config) CONFIG=$2 ;; --broker) BROKER=$2 ;; --ca) CA=$2 ;; --cert) CERT=$2 ;; --key) KEY=$2 ;;
    --signing-key) SIGNING=$2 ;;
    *) echo "error: unknown option $1" >&2; usage; exit 1 ;;
  esac
  shift 2
done

prepare
ensure_user
install_venv
install_dirs
install -d -o root -g "$SERVICE_USER" -m 0750 "$ETC/tls"
install -d -o root -g root -m 0700 "$ETC/keys"
[ -z "$CA" ] || install_file "$CA" "$ETC/tls/fleet-ca.crt" 0644
[ -z "$CERT" ] || install_file "$CERT" "$ETC/tls/cloud-bridge.crt" 0644
[ -z "$KEY" ] || install_file "$KEY" "$ETC/tls/cloud-bridge.key" 0600
[ -z "$SIGNING" ] || install_file "$SIGNING" "$ETC/keys/fleet-signing.pem" 0600
if [ ! -e "$ETC/api-token" ]; then
  (umask 077 && "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$ETC/api-token")
  say "API token made: $ETC/api-token (0600 root; clients read it with sudo head -1 $ETC/api-token)"
fi
fresh=$([ -z "$CONFIG" ] && [ ! -e "$ETC/$SERVICE.toml" ] && echo yes || true)
install_config "$HERE/systemd/cloud-bridge.toml" "$CONFIG"
if [ "$fresh" = yes ] && [ -n "$BROKER" ]; then
  sed -i "s#^host = \"broker.*#host = \"$BROKER\"   \# must match a name in the broker's certificate#" "$ETC/$SERVICE.toml"
fi
install_unit
check_as_service || exit 2
