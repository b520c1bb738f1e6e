#!/usr/bin/env bash
# Puts a Consul binary at .tools/consul/usr/bin/consul unless one is on PATH.
# Consul comes from Debian's archive: the bullseye suite carries consul 1.8.7 with
# its web UI (bookworm has none), fetched with a private apt setup (scripts/bullseye-apt.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
dest="$tools/consul"
if command -v consul >/dev/null 2>&1; then exit 0; fi
if [ -x "$dest/usr/bin/consul" ]; then exit 0; fi

source "$root/scripts/bullseye-apt.sh"
mkdir -p "$dest"
echo "meshvisor: fetching consul from Debian bullseye into $dest" >&2
bullseye_apt_update
cd "$apt_dir/cache"
bullseye_apt -qq download consul
deb=$(ls -t "$apt_dir"/cache/consul_*.deb | head -n1)
dpkg -x "$deb" "$dest"
"$dest/usr/bin/consul" version | head -n1 >&2
