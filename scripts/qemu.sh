#!/usr/bin/env bash
# Fetches the second QEMU the end-to-end tests run against, unpacked (never installed) under <repo>/.cache/qemu/:
#   .cache/qemu/10.0/root/usr/bin/qemu-system-x86_64   QEMU 10.0 from bookworm-backports (the QEMU of Debian 13)
#   .cache/qemu/10.0/root/usr/bin/qemu-img
#   .cache/qemu/10.0/root/usr/share/{qemu,seabios}     its firmware, passed with -L (src/qemu/versions.ts)
# The machine's apt configuration is left alone: a private sources list, state and cache under a temporary folder.
# Every library QEMU 10.0 links against is in Debian 12; the script checks that with ldd.
# Idempotent: does nothing when the stamp names the same packages.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
suite=bookworm-backports
name=10.0
# The version of each package to unpack. qemu-system-data holds the QEMU firmware, seabios the PC BIOS.
version='1:10.0.2+ds-2+deb13u1~bpo12+1'
packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
seabios_version='1.16.3-2~bpo12+1'
out="$root/.cache/qemu/$name"
stamp="suite=$suite qemu=$version seabios=$seabios_version script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

say() { printf 'qemu: %s\n' "$*" >&2; }
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
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
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

rm -rf "$out.tmp"
mkdir -p "$out.tmp/root"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$out.tmp/root" || die "dpkg-deb -x $deb failed"; done
for bin in qemu-system-x86_64 qemu-img; do
  exe="$out.tmp/root/usr/bin/$bin"
  [ -x "$exe" ] || die "the packages hold no usr/bin/$bin"
  missing="$(ldd "$exe" | awk '/not found/ {print $1}' | tr '\n' ' ')"
  [ -z "$missing" ] || die "$bin needs libraries this machine lacks: $missing"
done
"$out.tmp/root/usr/bin/qemu-system-x86_64" --version >/dev/null || die "the unpacked qemu-system-x86_64 does not run"
printf '%s' "$stamp" >"$out.tmp/stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
say "QEMU $name ready: $("$out/root/usr/bin/qemu-system-x86_64" --version | head -n 1)"
