#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on their standard local ports: start the
# installed servers if they are down, install them with apt if they are missing.
# Does nothing when DATABASE_URL / REDIS_URL point elsewhere and answer.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_ctlcluster >/dev/null || ! command -v redis-server >/dev/null; then
  if ! pg_up || ! redis_up; then
    echo "services: installing PostgreSQL and Redis with apt"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null
  fi
fi

if ! pg_up; then
  echo "services: starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  # Local development trusts loopback connections, as the project's defaults expect.
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! as_root grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
fi
if ! redis_up; then
  echo "services: starting Redis (nothing kept on disk)"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

for _ in $(seq 1 30); do
  if pg_up && redis_up; then
    echo "services: PostgreSQL and Redis are up"
    exit 0
  fi
  sleep 1
done
echo "services: PostgreSQL or Redis did not come up" >&2
exit 1
