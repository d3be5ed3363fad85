#!/usr/bin/env bash
# Make the Dockerfile's base image available to podman, so the Dockerfile builds unchanged:
#
#   1. already in local storage: use it (a stand-in only if it was made by this same recipe);
#   2. else pull it from its registry;
#   3. else, where the registry cannot be reached, build a STAND-IN from Debian packages and tag it
#      with the base image's name: Debian bookworm's own python3 (3.11.2) in a virtualenv at
#      /usr/local (python and pip in /usr/local/bin, as in the official image), not the official
#      python image. Every step says which one is in use. About 3 minutes; cached in podman's
#      storage (labelled with this script's hash, so a changed recipe is rebuilt).
#
# Usage: tools/base_image.sh IMAGE    (as root: debootstrap and chroot need it)
# Needs podman, and for the stand-in debootstrap (make image-deps installs both from Debian).
set -euo pipefail

image=${1:?usage: tools/base_image.sh IMAGE}
label=authz-service.stand-in-recipe
recipe=$(sha256sum "$0" | cut -c1-16)
say() { printf 'base image: %s\n' "$*" >&2; }

if podman image exists "$image"; then
  made_by=$(podman image inspect --format "{{index .Labels \"$label\"}}" "$image")
  if [ -z "$made_by" ] || [ "$made_by" = "<no value>" ]; then
    say "$image (from local storage)"
    exit 0
  elif [ "$made_by" = "$recipe" ]; then
    say "$image is the STAND-IN built earlier from Debian packages (Debian's Python 3.11.2, not the official image)"
    exit 0
  fi
  say "$image is a stand-in from an older recipe ($made_by); rebuilding it"
  podman rmi --force "$image" >/dev/null
fi

if [ "${STAND_IN_ONLY:-}" != 1 ] && podman pull --quiet "$image" >/dev/null 2>/tmp/base-image-pull.$$; then
  rm -f /tmp/base-image-pull.$$
  say "$image (pulled)"
  exit 0
fi
if [ -s /tmp/base-image-pull.$$ ]; then
  say "cannot pull $image: $(tail -n 1 /tmp/base-image-pull.$$)"
fi
rm -f /tmp/base-image-pull.$$

# The Debian mirror this machine uses (deb822 sources, or a one-line sources.list), else Debian's CDN.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\) .*/\2/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security

say "building a STAND-IN for $image from Debian bookworm packages ($mirror): Debian's Python 3.11.2, not the official image"
root=$(mktemp -d /var/tmp/stand-in-base.XXXXXX)
log=$root.log
trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root" "$log"' EXIT
fail() { cat "$log" >&2; say "building the stand-in failed (its log is above)"; exit 1; }

debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1 || fail
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
mount -t proc proc "$root/proc"
# Debian's python3 with venv (ensurepip), and the CA certificates the official image has; the
# virtualenv at /usr/local puts python and pip where the official image has them.
chroot "$root" /bin/sh -euc '
  export DEBIAN_FRONTEND=noninteractive
  apt="apt-get -qq -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0"
  $apt update
  $apt upgrade -y
  $apt install -y --no-install-recommends python3 python3-venv ca-certificates
  python3 -m venv /usr/local
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*
' >>"$log" 2>&1 || fail
python=$(chroot "$root" /usr/local/bin/python --version 2>&1)
umount "$root/proc"

tar -C "$root" -c . | podman import \
  --change "LABEL $label=$recipe" \
  --change 'LABEL org.opencontainers.image.description="STAND-IN for the official python image: Debian bookworm python3 in a virtualenv at /usr/local"' \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --quiet - "$image" >/dev/null
say "$image is now the STAND-IN ($python from Debian, not the official image)"
