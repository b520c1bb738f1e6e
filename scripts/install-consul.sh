#!/usr/bin/env bash
# Puts a Consul binary at .tools/consul/usr/bin/consul unless one is on PATH.
# Consul comes from Debian's archive: the bullseye suite carries consul 1.8.7 with
# its web UI (bookworm has none). We never touch the machine's own apt sources:
# a private sources file, lists directory and cache live under .tools/apt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
dest="$tools/consul"
if command -v consul >/dev/null 2>&1; then exit 0; fi
if [ -x "$dest/usr/bin/consul" ]; then exit 0; fi

apt_dir="$tools/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/preferences.d" "$dest"
cat > "$apt_dir/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-bullseye-stable.gpg] http://deb.debian.org/debian bullseye main
SRC
: > "$apt_dir/etc/status"
opts=(
  -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::Etc::Preferences=$apt_dir/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::Status=$apt_dir/etc/status"
  -o "Dir::Cache=$apt_dir/cache"
  -o "APT::Get::List-Cleanup=0"
  -o "Debug::NoLocking=1"
)
echo "meshvisor: fetching consul from Debian bullseye into $dest" >&2
apt-get "${opts[@]}" -qq update
cd "$apt_dir/cache"
apt-get "${opts[@]}" -qq download consul
deb=$(ls -t "$apt_dir"/cache/consul_*.deb | head -n1)
dpkg -x "$deb" "$dest"
"$dest/usr/bin/consul" version | head -n1 >&2
