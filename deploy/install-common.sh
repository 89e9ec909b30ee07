# Shared by deploy/install-agent.sh and deploy/install-bridge.sh (sourced; they set SERVICE, PROGRAM,
# EXTRA and parse their own options with parse_common_option). Offline: everything comes from the
# wheelhouse `make dist` built.

unset PYTHONPATH PYTHONHOME  # the venv must see only what it installed
umask 022  # the venv and the folders are readable by the service user whatever the caller's umask
WHEELHOUSE="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/dist/wheelhouse"
ROOT=/
PREFIX=/opt/autoglm-edge
SERVICE_USER=""
PYTHON=""
HERE="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # the checkout (through a symlinked deploy/ too)

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

COMMON_USAGE="  --wheelhouse DIR   wheels made by \`make dist\` (default: dist/wheelhouse of this checkout)
  --prefix DIR       where the venv goes (default /opt/autoglm-edge; the unit's ExecStart follows)
  --root DIR         a scratch root (tests, trials): every path (the config's and the unit's
                     included) lives under DIR; the service user is still created on this host
  --user NAME        the service user and group (default: the service's name)
  --python PY        the Python for the venv, the version the wheelhouse was built with (default: the
                     system's /usr/bin/python3.11, else /usr/bin/python3; never one under a home
                     folder such as pyenv's: the service user cannot run it)"

# parse_common_option "$@": consumes one common option; returns the count of words used (0: not one).
parse_common_option() {
  case "$1" in
    --wheelhouse) WHEELHOUSE=$2; return 2 ;;
    --prefix) PREFIX=$2; return 2 ;;
    --root) ROOT=$2; return 2 ;;
    --user) SERVICE_USER=$2; return 2 ;;
    --python) PYTHON=$2; return 2 ;;
  esac
  return 0
}

# Paths as the installed service sees them (ROOT prepended for a scratch root).
at() { if [ "$ROOT" = / ]; then printf '%s' "$1"; else printf '%s%s' "${ROOT%/}" "$1"; fi; }

prepare() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it creates the $SERVICE user and writes /etc, /opt, /var/lib)"
  [ -n "$SERVICE_USER" ] || SERVICE_USER=$SERVICE
  ls "$WHEELHOUSE"/autoglm_edge-*.whl >/dev/null 2>&1 ||
    die "no autoglm-edge wheel in $WHEELHOUSE: run \`make dist\` (on a machine with the same Python and CPU architecture) and copy dist/wheelhouse here"
  if [ -z "$PYTHON" ]; then
    for PYTHON in /usr/bin/python3.11 /usr/bin/python3 ""; do [ -x "$PYTHON" ] && break; done
    [ -n "$PYTHON" ] || die "no system Python 3 (apt-get install python3 python3-venv), or give --python"
  fi
  VENV=$(at "$PREFIX")/.venv
  ETC=$(at "/etc/$SERVICE")
  STATE=$(at "/var/lib/$SERVICE")
  UNIT_DIR=$(at /etc/systemd/system)
}

ensure_user() {
  if getent passwd "$SERVICE_USER" >/dev/null; then
    say "user $SERVICE_USER exists"
  else
    useradd --system --user-group --home-dir "/var/lib/$SERVICE" --no-create-home --shell /usr/sbin/nologin \
      "$SERVICE_USER"
    say "created system user and group $SERVICE_USER"
  fi
}

install_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV (Debian: apt-get install python3-venv)"
  fi
  "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --upgrade "autoglm-edge[$EXTRA]"
  say "installed $("$VENV/bin/$PROGRAM" --version) into $VENV (offline, from $WHEELHOUSE)"
}

# The folders: config root:<group> 0750 (the service reads it, cannot change it), state <user> 0750.
install_dirs() {
  install -d -m 0755 "$(at "$PREFIX")"
  install -d -o root -g "$SERVICE_USER" -m 0750 "$ETC"
  install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE"
}

# Rewrite the shipped paths for --prefix, --root and --user.
relocate() {
  local file=$1
  sed -i -e "s#/opt/autoglm-edge#$(at "$PREFIX")#g" \
         -e "s#/etc/$SERVICE/#$ETC/#g" -e "s#/var/lib/$SERVICE/#$STATE/#g" \
         -e "s#^User=$SERVICE\$#User=$SERVICE_USER#" -e "s#^Group=$SERVICE\$#Group=$SERVICE_USER#" "$file"
}

# install_config TEMPLATE [FILE]: FILE (--config), else the template, unless a config is in place.
install_config() {
  local template=$1 given=${2:-} dest="$ETC/$SERVICE.toml"
  if [ -n "$given" ]; then
    install -o root -g "$SERVICE_USER" -m 0640 "$given" "$dest"
    say "config $dest from $given"
  elif [ -e "$dest" ]; then
    say "config $dest exists: kept"
    return 0
  else
    install -o root -g "$SERVICE_USER" -m 0640 "$template" "$dest"
    relocate "$dest"
    say "config $dest from the template $(basename "$template"): edit it (device, broker)"
  fi
}

# install_file SRC DEST MODE: root-owned, group the service's (0644/0640) or root's (0600: a secret that
# systemd hands over with LoadCredential=).
install_file() {
  local src=$1 dest=$2 mode=$3 group=$SERVICE_USER
  [ -r "$src" ] || die "cannot read $src"
  [ "$mode" = 0600 ] && group=root
  install -D -o root -g "$group" -m "$mode" "$src" "$dest"
  say "$dest ($mode)"
}

install_unit() {
  local unit="$UNIT_DIR/$SERVICE.service"
  install -D -m 0644 "$HERE/systemd/$SERVICE.service" "$unit"
  relocate "$unit"
  if [ "$ROOT" = / ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
    systemctl daemon-reload
    systemctl enable "$SERVICE"
    say "$SERVICE.service installed and enabled; start it: systemctl start $SERVICE"
  else
    say "$SERVICE.service installed in $UNIT_DIR, NOT enabled: systemd is not PID 1 here (or --root was given); on the target: systemctl daemon-reload && systemctl enable --now $SERVICE"
  fi
}

# check_as_service: `PROGRAM check-config` as the service user with the unit's LoadCredential= files
# handed over the way systemd does (copies readable by that user only). Its exit status is ours.
check_as_service() {
  local creds status=0 line name path
  creds=$(mktemp -d)
  while IFS= read -r line; do
    name=${line#LoadCredential=}; path=${name#*:}; name=${name%%:*}
    [ -e "$path" ] || { say "warning: LoadCredential=$name: $path does not exist (the unit will not start)"; continue; }
    install -o "$SERVICE_USER" -m 0400 "$path" "$creds/$name"
  done < <(grep -E '^LoadCredential=' "$UNIT_DIR/$SERVICE.service")
  chown "$SERVICE_USER" "$creds"
  chmod 0500 "$creds"
  local config_arg=("$ETC/$SERVICE.toml")
  [ "$PROGRAM" = cloud-bridge ] && config_arg=(--config "$ETC/$SERVICE.toml")
  if runuser -u "$SERVICE_USER" -- env CREDENTIALS_DIRECTORY="$creds" "$VENV/bin/$PROGRAM" check-config \
      "${config_arg[@]}" >/dev/null 2>"$creds.log"; then
    say "config check passed as user $SERVICE_USER:"
    sed 's/^/    /' "$creds.log"
  else
    status=$?
    printf 'config check FAILED as user %s (exit %s):\n' "$SERVICE_USER" "$status" >&2
    sed 's/^/    /' "$creds.log" >&2
    printf 'fix it, then run this script again (it keeps what is in place)\n' >&2
  fi
  rm -rf "$creds" "$creds.log"
  return "$status"
}
