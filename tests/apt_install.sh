# Sourced by the test scripts: apt_install PKG... installs Debian/Ubuntu
# packages on demand (as root, or through password-less sudo), quietly; it
# returns non-zero when it cannot (no apt-get, no rights, no such package).
# apt-get update runs once per script.
_pn_apt_updated=0
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n" || return 1
  fi
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ $_pn_apt_updated = 0 ]; then
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    _pn_apt_updated=1
  fi
  echo "   installing: $*"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}
