#!/usr/bin/env bash
# Fetches a QEMU the end-to-end tests run against besides the machine's own, unpacked (never installed) under
# <repo>/.cache/qemu/NAME/:
#   root/usr/bin/qemu-system-x86_64, root/usr/bin/qemu-img
#   root/usr/share/{qemu,seabios}      its firmware, passed with -L (tools/qemu/versions.ts)
#   root/usr/lib/x86_64-linux-gnu/qemu its modules (QEMU_MODULE_DIR)
#   lib/                               libraries it needs that Debian 12 lacks (LD_LIBRARY_PATH), if any
# NAME is one of:
#   10.0  QEMU 10.0 from bookworm-backports (the QEMU of Debian 13); every library it needs is in Debian 12
#   5.2   QEMU 5.2 from bullseye (Debian 11), the oldest end; its Xen, virglrenderer, liburing 1 and yajl libraries
#         come from bullseye too, into lib/ only
# The machine's apt configuration is left alone: a private sources list, state and cache under a temporary folder.
# Idempotent: does nothing when the stamp names the same packages.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${1:?usage: qemu.sh NAME (10.0 or 5.2)}"
case "$name" in
  10.0)
    suite=bookworm-backports
    version='1:10.0.2+ds-2+deb13u1~bpo12+1'
    seabios_version='1.16.3-2~bpo12+1'
    libs=()
    ;;
  5.2)
    suite=bullseye
    version='1:5.2+dfsg-11+deb11u3'
    seabios_version='1.14.0-2'
    libs=(libxenmisc4.14 libxenstore3.0 libxenforeignmemory1 libxengnttab1 libxenevtchn1 libxendevicemodel1
      libxentoolcore1 libxencall1 libxentoollog1 libxenhypfs1 libvirglrenderer1 liburing1 libyajl2)
    ;;
  *)
    echo "qemu: unknown QEMU '$name' (10.0 or 5.2)" >&2
    exit 2
    ;;
esac
packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
out="$root/.cache/qemu/$name"
stamp="suite=$suite qemu=$version seabios=$seabios_version libs=${libs[*]} script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

say() { printf 'qemu %s: %s\n' "$name" "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -x "$out/root/usr/bin/qemu-system-x86_64" ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  exit 0
fi
for tool in apt-get dpkg-deb ldd sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found (this script needs a Debian system)"
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring is missing: install debian-archive-keyring"
say "fetching QEMU $version from $suite into $out"

work="$(mktemp -d /tmp/snap-pipe-qemu.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/libdebs"
# apt-get download as root drops to the _apt user: give it folders it can write.
chmod -R 0777 "$work"
echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" >"$work/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State=$work" -o "Dir::State::Lists=$work/lists" -o Dir::State::status=/var/lib/dpkg/status
  -o "Dir::Cache=$work/cache" -q
)
apt-get "${apt_opts[@]}" update >&2 || die "apt-get update of $suite failed"
wanted=()
for p in "${packages[@]}"; do wanted+=("$p=$version"); done
wanted+=("seabios=$seabios_version")
(cd "$work/debs" && apt-get "${apt_opts[@]}" download "${wanted[@]}" >&2) \
  || die "apt-get download ${wanted[*]} failed (is $version still in $suite?)"
if [ "${#libs[@]}" -gt 0 ]; then
  lib_wanted=()
  for p in "${libs[@]}"; do lib_wanted+=("$p/$suite"); done
  (cd "$work/libdebs" && apt-get "${apt_opts[@]}" download "${lib_wanted[@]}" >&2) \
    || die "apt-get download ${lib_wanted[*]} failed"
fi

rm -rf "$out.tmp"
mkdir -p "$out.tmp/root" "$out.tmp/lib"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$out.tmp/root" || die "dpkg-deb -x $deb failed"; done
if [ "${#libs[@]}" -gt 0 ]; then
  # Only the shared libraries themselves, in a folder of their own: QEMU's LD_LIBRARY_PATH is inherited by the exec:
  # children it starts (snap-pipe), so nothing else may sit there.
  mkdir -p "$work/libroot"
  for deb in "$work"/libdebs/*.deb; do dpkg-deb -x "$deb" "$work/libroot" || die "dpkg-deb -x $deb failed"; done
  cp -a "$work"/libroot/usr/lib/x86_64-linux-gnu/*.so.* "$out.tmp/lib/"
fi
for bin in qemu-system-x86_64 qemu-img; do
  exe="$out.tmp/root/usr/bin/$bin"
  [ -x "$exe" ] || die "the packages hold no usr/bin/$bin"
  missing="$(LD_LIBRARY_PATH="$out.tmp/lib" ldd "$exe" | awk '/not found/ {print $1}' | tr '\n' ' ')"
  [ -z "$missing" ] || die "$bin needs libraries this machine lacks: $missing"
done
LD_LIBRARY_PATH="$out.tmp/lib" "$out.tmp/root/usr/bin/qemu-system-x86_64" --version >/dev/null \
  || die "the unpacked qemu-system-x86_64 does not run"
printf '%s' "$stamp" >"$out.tmp/stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
say "ready: $(LD_LIBRARY_PATH="$out/lib" "$out/root/usr/bin/qemu-system-x86_64" --version | head -n 1)"
