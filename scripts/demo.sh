#!/usr/bin/env bash
# The stargz-mount demo: serve a small eStargz image from an in-process
# registry on loopback, mount it lazily, look inside, run a program in it,
# unmount. Needs root (overlayfs) and fusermount3.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (sudo make demo): mounting overlayfs needs it" >&2
	exit 1
fi

work=$(mktemp -d /tmp/stargz-demo.XXXXXX)
registry_pid=
cleanup() {
	if grep -q " $work/mnt " /proc/mounts; then bin/stargz-mount umount "$work/mnt" || true; fi
	[ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

go build -o bin/stargz-mount .
go build -o "$work/demo-registry" ./internal/demo
mkdir -p "$work/top/bin" "$work/mnt"
CGO_ENABLED=0 go build -o "$work/top/bin/hello" ./testdata/demo/hello

"$work/demo-registry" -top "$work/top" >"$work/ref" &
registry_pid=$!
for _ in $(seq 100); do [ -s "$work/ref" ] && break; sleep 0.1; done
ref=$(cat "$work/ref")
echo "demo registry serves $ref (two eStargz layers)"

step bin/stargz-mount inspect "$ref"
bin/stargz-mount inspect "$ref"
step bin/stargz-mount --cache-dir "$work/cache" --daemon "$ref" "$work/mnt"
bin/stargz-mount --cache-dir "$work/cache" --daemon "$ref" "$work/mnt"
step ls -l "$work/mnt" "$work/mnt/bin"
ls -l "$work/mnt" "$work/mnt/bin"
step cat "$work/mnt/usr/share/doc/README"
cat "$work/mnt/usr/share/doc/README"
step chroot "$work/mnt" /bin/hello
chroot "$work/mnt" /bin/hello
step bin/stargz-mount umount "$work/mnt"
bin/stargz-mount umount "$work/mnt"
if grep -q "stargz" /proc/mounts; then echo "demo: mounts left behind" >&2; exit 1; fi
echo "unmounted; nothing left mounted."
