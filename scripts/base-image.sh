#!/usr/bin/env bash
# Build the local base image that stands for the Ubuntu AMI on the local cloud: a Debian system
# booting systemd, with python3, numpy, boto3, the docker client library and s3fs.
# No registry is reachable, so it is bootstrapped from Debian packages; an existing image is reused.
set -euo pipefail
image=${CICC_BASE_IMAGE:-cicc-base:bookworm}
suite=${CICC_BASE_SUITE:-bookworm}
mirror=${CICC_BASE_MIRROR:-http://deb.debian.org/debian}
packages=systemd,systemd-sysv,dbus,ca-certificates,python3,python3-numpy,python3-boto3,python3-docker,s3fs,procps,iproute2

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "==> Base image $image present"
  exit 0
fi
echo "==> Building base image $image from Debian $suite packages (about two minutes)"
rootfs=$(mktemp -d /var/tmp/cicc-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  echo "debootstrap failed; the end of $rootfs.log says:" >&2; tail -n 20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# A container has no consoles or hardware to wait for; these units only slow the boot or fail.
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-timesyncd.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
tar -C "$rootfs" -c . | docker import -c 'CMD ["/sbin/init"]' -c 'ENV container=docker' - "$image" >/dev/null
echo "==> Base image $image built"
