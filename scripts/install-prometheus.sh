#!/usr/bin/env bash
# Puts Prometheus at .tools/prometheus/usr/bin/prometheus (with its classic web UI),
# unless $MESHVISOR_PROMETHEUS names one or the config says [prometheus] mode = "off".
#
# Debian's package of the bullseye suite, Prometheus 2.24.1, fetched with a private apt
# setup (scripts/bullseye-apt.sh) and unpacked, never installed: the supervisor finds its
# scrape targets with consul_sd_configs, which Debian's builds lack since 2.33.5+ds1-4
# (bookworm's 2.42 among them: "Disable Consul SD until its Debian package is back in
# shape"). Unpacked, the package starts no system service and adds no user. Its UI is
# symlinks into the JavaScript libraries' packages, unpacked beside it: 21 MB to fetch,
# 85 MB unpacked (the binaries: 77 MB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
dest="$tools/prometheus"
if [ -n "${MESHVISOR_PROMETHEUS:-}" ] || [ -x "$dest/usr/bin/prometheus" ]; then exit 0; fi
config=${MESHVISOR_CONFIG:-$root/config/meshvisor.toml}
mode=$(python3 - "$config" 2>/dev/null <<'PY' || true
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f).get("prometheus", {}).get("mode", "embedded"))
PY
)
[ "$mode" = "off" ] && exit 0

# The UI's libraries (the package's Depends, less adduser and libc).
packages=(prometheus libjs-bootstrap4 libjs-popper.js libjs-jquery libjs-jquery-hotkeys libjs-moment
          libjs-moment-timezone libjs-eonasdan-bootstrap-datetimepicker libjs-mustache libjs-rickshaw libjs-d3
          fonts-glyphicons-halflings)
source "$root/scripts/bullseye-apt.sh"
echo "meshvisor: fetching prometheus from Debian bullseye into $dest" >&2
bullseye_apt_update
cd "$apt_dir/cache"
bullseye_apt -qq download "${packages[@]}"
partial="$dest.partial"
rm -rf "$partial"
mkdir -p "$partial"
for package in "${packages[@]}"; do
  dpkg -x "$(ls -t "$apt_dir/cache/${package}"_*.deb | head -n1)" "$partial"
done
# Not needed to serve the UI: moment-timezone's historical data (159 MB), documentation.
rm -rf "$partial/usr/share/javascript/moment-timezone/data" "$partial/usr/share/doc" "$partial/usr/share/man" \
       "$partial/usr/share/lintian" "$partial/usr/share/sass"
# A link to an absolute path means the machine's copy: point it at ours.
find "$partial" -type l -lname '/*' | while read -r link; do
  ln -sfn "$dest$(readlink "$link")" "$link"
done
rm -rf "$dest"
mv "$partial" "$dest"
"$dest/usr/bin/prometheus" --version 2>&1 | head -n1 >&2
