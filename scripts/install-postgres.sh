#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries exist (/usr/lib/postgresql/<ver>/bin/postgres).
# The supervisor runs its own instance; we never want the Debian package's default
# cluster on 5432, so we tell postgresql-common not to create one before installing.
set -euo pipefail
for bin in /usr/lib/postgresql/*/bin/postgres; do
  [ -x "$bin" ] && exit 0
done
if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "meshvisor: PostgreSQL server binaries are missing; install them as root:" >&2
  echo "  apt-get install postgresql   (or point config [postgres] at an external server)" >&2
  exit 1
fi
echo "meshvisor: installing PostgreSQL server binaries with apt" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -qq update
apt-get -qq install -y postgresql-common >/dev/null
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/meshvisor.conf
apt-get -qq install -y postgresql >/dev/null
