#!/bin/sh
# Stand-in base images for building AIS-RL's images on a machine that reaches no container registry
# (an offline CI host, a locked-down network). A LOCAL SUBSTITUTE ONLY: never push these images,
# and never use them for a release. On a machine that can pull, build with the public bases (the
# Dockerfile's and docker-compose.yml's defaults) and skip this script.
#
#   sudo deploy/docker/local-base.sh            # makes the two images below (skips those present)
#   PYTHON_IMAGE=localhost/aisrl-standin/python:3.11-bookworm \
#   REDIS_IMAGE=localhost/aisrl-standin/redis:7-bookworm docker compose build
#
# python: a minimal Debian bookworm root filesystem (debootstrap, from the host's Debian mirror) with
#   Python 3.11, venv and the CA certificates: what Dockerfile.cpu needs from python:3.11-slim.
# redis: that image plus Debian's redis-server and redis-cli (Redis 7.0; the public default is 7.4).
# Needs root, debootstrap and a running Docker engine; about 3 minutes and 250 MB here.
set -eu

PYTHON_STANDIN="${PYTHON_STANDIN:-localhost/aisrl-standin/python:3.11-bookworm}"
REDIS_STANDIN="${REDIS_STANDIN:-localhost/aisrl-standin/redis:7-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$(id -u)" != 0 ]; then
  echo "local-base.sh: debootstrap needs root (run it with sudo)" >&2
  exit 1
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "local-base.sh: $tool is missing (apt-get install -y $tool)" >&2; exit 1; }
done

if have_image "$PYTHON_STANDIN"; then
  echo "local-base.sh: $PYTHON_STANDIN exists"
else
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$rootfs" "$DEBIAN_MIRROR"
  # The host's apt settings come along (a mirror that serves a snapshot needs its Check-Valid-Until
  # setting inside the image too); package lists and caches do not.
  cp -a /etc/apt/apt.conf.d/. "$rootfs/etc/apt/apt.conf.d/" 2>/dev/null || true
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/tmp/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "aisrl local stand-in for python:3.11-slim (debootstrap $SUITE); never push" \
    - "$PYTHON_STANDIN"
  rm -rf "$rootfs"
  trap - EXIT
fi

if have_image "$REDIS_STANDIN"; then
  echo "local-base.sh: $REDIS_STANDIN exists"
else
  docker build --tag "$REDIS_STANDIN" --label aisrl.standin=true - <<EOF
FROM $PYTHON_STANDIN
RUN apt-get update \\
    && apt-get install -y --no-install-recommends redis-server redis-tools \\
    && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
EOF
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -F aisrl-standin
