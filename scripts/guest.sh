#!/usr/bin/env bash
# Builds the guest used by the end-to-end tests and the demo, under <repo>/.cache/guest/:
#   vmlinuz             Debian's newest linux-image-6.1.*-cloud-amd64 (serial driver, devtmpfs, tmpfs built in)
#   initramfs.cpio.gz   busybox-static + /init (below)
# The guest's /init reads `fill=MiB` (default 200) from /proc/cmdline, fills that much RAM with random data
# kept on a tmpfs, prints SNAPPIPE-READY on the console, then prints `SNAPPIPE-TICK <n>` about twice a second
# forever, rewriting a small tmpfs file each tick so background snapshots see writes. All it ever changes after
# READY is that tick file (and the kernel's own state): the fill and /init stay as written.
# It checks itself on request: a line `hash N` on its second serial port (ttyS1, when QEMU gives it one) makes it
# print `SNAPPIPE-HASH N fill=<md5 of the fill> init=<md5 of /init and busybox>` on the console, so a test can
# judge a restored running guest by its content.
# Boot with: -kernel vmlinuz -initrd initramfs.cpio.gz -append 'console=ttyS0 quiet fill=200'.
# Idempotent: rebuilds only when its inputs (kernel package, busybox version, this script) changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.cache/guest"
mkdir -p "$out"

say() { printf 'guest: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb cpio gzip sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found (this script needs a Debian system)"
done
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox not found: install busybox-static"
"$busybox" --list >/dev/null 2>&1 || die "$busybox does not run"
file_out="$(LC_ALL=C file -L "$busybox" 2>/dev/null || true)"
case "$file_out" in *dynamically*) die "$busybox is dynamically linked: install busybox-static" ;; esac

# --- kernel package: the newest linux-image-6.1.*-cloud-amd64 (signed or not; the ABI number orders them) ---
find_kernel_pkg() {
  apt-cache pkgnames linux-image-6.1. 2>/dev/null \
    | grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64$' \
    | sort -V | tail -n 1
}
kpkg="$(find_kernel_pkg || true)"
if [ -z "$kpkg" ]; then
  say "no linux-image-6.1.*-cloud-amd64 in the apt cache; running apt-get update"
  apt-get update -q >&2 || die "apt-get update failed"
  kpkg="$(find_kernel_pkg || true)"
  [ -n "$kpkg" ] || die "no linux-image-6.1.*-cloud-amd64 package available from apt"
fi
kver="$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')"
bbver="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum "$busybox" | cut -c1-16)"
script_sum="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
stamp="kernel=$kpkg $kver busybox=$bbver script=$script_sum"

if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/stamp" ] \
  && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  exit 0
fi
say "building guest ($stamp)"
rm -f "$out/stamp"

work="$(mktemp -d /tmp/snap-pipe-guest.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# apt-get download as root drops to the _apt user: give it a directory it can write.
chmod 0777 "$work"

# --- kernel ---
kernel_src="$out/kernel-$kpkg-$kver"
if [ ! -f "$kernel_src" ]; then
  say "downloading $kpkg $kver"
  (cd "$work" && apt-get download -q "$kpkg=$kver" >&2) || die "apt-get download $kpkg failed"
  deb="$(ls "$work"/*.deb 2>/dev/null | head -n 1)"
  [ -n "$deb" ] || die "apt-get download produced no .deb"
  mkdir "$work/kernel"
  dpkg-deb -x "$deb" "$work/kernel" || die "dpkg-deb -x $deb failed"
  vmlinuz="$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -n 1)"
  [ -n "$vmlinuz" ] || die "$deb has no /boot/vmlinuz-*"
  config="$(ls "$work"/kernel/boot/config-* 2>/dev/null | head -n 1)"
  if [ -n "$config" ]; then
    for opt in CONFIG_SERIAL_8250_CONSOLE CONFIG_DEVTMPFS CONFIG_TMPFS CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP; do
      grep -q "^$opt=y" "$config" || die "$kpkg lacks built-in $opt"
    done
  fi
  rm -f "$out"/kernel-*
  cp "$vmlinuz" "$kernel_src.tmp" && mv "$kernel_src.tmp" "$kernel_src"
fi
cp "$kernel_src" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"

# --- initramfs ---
ird="$work/initramfs"
mkdir -p "$ird"/{bin,sbin,dev,proc,sys,tmp,run,root}
cp "$busybox" "$ird/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ird/bin/$applet"
done
# The kernel opens /dev/console for /init before anything is mounted; mknod needs root (init copes without it).
mknod -m 600 "$ird/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ird/dev/null" c 1 3 2>/dev/null || true

cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
# snap-pipe test guest: fill RAM with random data, announce READY, then tick forever.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

fill=200
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    fill=*) fill="${arg#fill=}" ;;
  esac
done
case "$fill" in ''|*[!0-9]*) echo "SNAPPIPE-ERROR bad fill=$fill"; fill=0 ;; esac

mkdir -p /dev/shm
mount -t tmpfs -o size=$((fill + 16))m tmpfs /dev/shm
if [ "$fill" -gt 0 ]; then
  if ! dd if=/dev/urandom of=/dev/shm/fill bs=1M count="$fill" 2>/dev/null; then
    echo "SNAPPIPE-ERROR fill of ${fill} MiB failed"
  fi
fi
# The control channel: commands on ttyS1, answers on the console. Started after the fill, so a hash always covers
# the whole of it.
if [ -c /dev/ttyS1 ]; then
  stty -F /dev/ttyS1 -echo 2>/dev/null
  (
    exec </dev/ttyS1
    while read -r cmd arg; do
      case "$cmd" in
        hash)
          f=$(md5sum </dev/shm/fill 2>/dev/null | cut -d' ' -f1)
          i=$(cat /init /bin/busybox | md5sum | cut -d' ' -f1)
          echo "SNAPPIPE-HASH $arg fill=${f:-none} init=$i"
          ;;
        *) echo "SNAPPIPE-ERROR unknown command '$cmd'" ;;
      esac
    done
  ) &
fi
echo "SNAPPIPE-READY fill=${fill}MiB mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)kB"

n=0
while :; do
  n=$((n + 1))
  # Rewrite 256 KiB of tmpfs each tick: a running guest keeps dirtying memory.
  dd if=/dev/urandom of=/dev/shm/tick bs=64k count=4 conv=notrunc 2>/dev/null
  echo "SNAPPIPE-TICK $n"
  sleep 0.5
done
INIT
chmod 755 "$ird/init"

(cd "$ird" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9n >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
printf '%s' "$stamp" >"$out/stamp"
say "guest ready in $out"
