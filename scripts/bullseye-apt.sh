# Sourced by the install scripts that fetch a package from Debian's bullseye suite into
# .tools/ (Consul, Prometheus). We never touch the machine's own apt sources: a private
# sources file, lists directory and cache live under .tools/apt.
#   bullseye_apt_update       writes the private sources file and brings the lists up to date
#   bullseye_apt ARGS...      apt-get on them, e.g. bullseye_apt -qq download consul
# Needs $tools (the .tools folder).
apt_dir="$tools/apt"
bullseye_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::Etc::Preferences=$apt_dir/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::Status=$apt_dir/etc/status"
  -o "Dir::Cache=$apt_dir/cache"
  -o "APT::Get::List-Cleanup=0"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"  # the cache is root's; apt's _apt user may not write there
)

bullseye_apt() {
  apt-get "${bullseye_opts[@]}" "$@"
}

bullseye_apt_update() {
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/preferences.d"
  cat > "$apt_dir/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-bullseye-stable.gpg] http://deb.debian.org/debian bullseye main
SRC
  [ -e "$apt_dir/etc/status" ] || : > "$apt_dir/etc/status"
  bullseye_apt -qq update
}
