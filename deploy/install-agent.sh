#!/usr/bin/env bash
# Production install of the edge agent on a gateway, offline from the wheelhouse of `make dist`:
# the `edge-agent` system user, /opt/autoglm-edge/.venv with only what the agent runs, /etc/edge-agent
# (config from systemd/edge-agent.toml, tls/, keys/), /var/lib/edge-agent (models/), the systemd
# unit (enabled when systemd runs), then `edge-agent check-config` as the service user would run it.
# Run it again to upgrade: what is in place (config, certificates) is kept unless given again.
# Exit status: 0 installed and the config check passed; 1 install error; 2 installed, the config
# check failed (it says which file or key).
set -euo pipefail
SERVICE=edge-agent PROGRAM=edge-agent EXTRA=agent
# shellcheck source=deploy/install-common.sh
. "$(dirname "$0")/install-common.sh"

usage() {
  cat <<USAGE
usage: sudo deploy/install-agent.sh [options]
$COMMON_USAGE
  --config FILE      install this config instead of the template (then the options below only copy files)
  --device-id ID     device_id in the config made from the template
  --broker HOST      mqtt.host in the config made from the template
  --ca FILE          the fleet CA -> /etc/edge-agent/tls/fleet-ca.crt
  --cert FILE        this gateway's certificate -> /etc/edge-agent/tls/gateway.crt
  --key FILE         its key -> /etc/edge-agent/tls/gateway.key (0600 root: LoadCredential=mqtt-tls-key)
  --trusted-key FILE the fleet's public signing key -> /etc/edge-agent/keys/ (keep its name: fleet-2026.pub.pem)
  --model FILE       a GGUF -> /var/lib/edge-agent/models/; model.path of the config made from the template
USAGE
}

CONFIG="" DEVICE_ID="" BROKER="" CA="" CERT="" KEY="" TRUSTED="" MODEL=""
while [ $# -gt 0 ]; do
  used=0; parse_common_option "$@" || used=$?
  if [ "$used" -gt 0 ]; then shift "$used"; continue; fi
  case "$1" in -h|--help) usage; exit 0 ;; esac
  [ $# -ge 2 ] || { echo "error: unknown or incomplete option $1" >&2; usage; exit 1; }
  case "$1" in
    --config) CONFIG=$2 ;; --device-id) DEVICE_ID=$2 ;; --broker) BROKER=$2 ;; --ca) CA=$2 ;;
    --cert) CERT=$2 ;; --key) KEY=$2 ;; --trusted-key) TRUSTED=$2 ;; --model) MODEL=$2 ;;
    *) echo "error: unknown option $1" >&2; usage; exit 1 ;;
  esac
  shift 2
done

prepare
ensure_user
install_venv
install_dirs
install -d -o root -g "$SERVICE_USER" -m 0750 "$ETC/tls" "$ETC/keys"
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE/models"
[ -z "$CA" ] || install_file "$CA" "$ETC/tls/fleet-ca.crt" 0644
[ -z "$CERT" ] || install_file "$CERT" "$ETC/tls/gateway.crt" 0644
[ -z "$KEY" ] || install_file "$KEY" "$ETC/tls/gateway.key" 0600
[ -z "$TRUSTED" ] || install_file "$TRUSTED" "$ETC/keys/$(basename "$TRUSTED")" 0644
if [ -n "$MODEL" ]; then
  install -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0640 "$MODEL" "$STATE/models/$(basename "$MODEL")"
  say "model $STATE/models/$(basename "$MODEL")"
fi
fresh=$([ -z "$CONFIG" ] && [ ! -e "$ETC/$SERVICE.toml" ] && echo yes || true)
install_config "$HERE/systemd/edge-agent.toml" "$CONFIG"
if [ "$fresh" = yes ]; then
  [ -z "$DEVICE_ID" ] || sed -i "s#^device_id = .*#device_id = \"$DEVICE_ID\"#" "$ETC/$SERVICE.toml"
  [ -z "$BROKER" ] || sed -i "s#^host = .*#host = \"$BROKER\"   \# must match a name in the broker's certificate#" "$ETC/$SERVICE.toml"
  [ -z "$MODEL" ] || sed -i "s#^path = \".*\.gguf\"#path = \"$STATE/models/$(basename "$MODEL")\"#" "$ETC/$SERVICE.toml"
fi
install_unit
check_as_service || exit 2
