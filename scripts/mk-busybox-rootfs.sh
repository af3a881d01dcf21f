#!/bin/sh
# Builds a minimal busybox-static root file system for berth's tests
# (systemd-nspawn guests, initramfs payloads).
#
# usage: mk-busybox-rootfs.sh DIR
#   BUSYBOX=/path/to/busybox  use another static busybox (default /bin/busybox,
#                             from Debian's busybox-static)
#
# Idempotent: running it again over a built DIR only refreshes the files.
# Layout: /usr/bin/busybox + applet symlinks, bin -> usr/bin, sbin -> usr/bin,
# /etc/os-release (ID=busybox), /etc/passwd and /etc/group with root,
# empty proc sys dev run tmp var, and /www/index.html = "berth-fixture".
set -eu

say() { printf 'mk-busybox-rootfs: %s\n' "$*"; }
die() { printf 'mk-busybox-rootfs: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dest=$1
bb=${BUSYBOX:-/bin/busybox}

[ -x "$bb" ] || die "$bb not found or not executable; install busybox-static (apt-get install busybox-static)"

# is_static FILE: true when FILE is an ELF executable without a PT_INTERP
# program header (no dynamic loader needed inside the guest).
is_static() {
    if command -v file >/dev/null 2>&1; then
        desc=$(file -bL "$1")
        case $desc in
            *ELF*statically\ linked* | *ELF*static-pie\ linked*) return 0 ;;
            *ELF*) return 1 ;;
            *) die "$1 is not an ELF file: $desc" ;;
        esac
    fi
    # No `file`: walk the ELF64 little-endian program headers with od.
    magic=$(od -An -tx1 -N4 "$1" | tr -d ' \n')
    [ "$magic" = 7f454c46 ] || die "$1 is not an ELF file"
    phoff=$(od -An -tu8 -j32 -N8 "$1" | tr -d ' \n')
    phentsize=$(od -An -tu2 -j54 -N2 "$1" | tr -d ' \n')
    phnum=$(od -An -tu2 -j56 -N2 "$1" | tr -d ' \n')
    i=0
    while [ "$i" -lt "$phnum" ]; do
        ptype=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$1" | tr -d ' \n')
        [ "$ptype" -eq 3 ] && return 1 # PT_INTERP
        i=$((i + 1))
    done
    return 0
}

is_static "$bb" || die "$bb is dynamically linked; need the static one (busybox-static)"
say "using $bb (static)"

say "creating directories in $dest"
mkdir -p "$dest"
for d in usr/bin usr/lib etc proc sys dev run tmp var www root; do
    mkdir -p "$dest/$d"
done
chmod 1777 "$dest/tmp"
chmod 0700 "$dest/root"

say "installing usr/bin/busybox"
cp "$bb" "$dest/usr/bin/busybox.tmp"
chmod 0755 "$dest/usr/bin/busybox.tmp"
mv -f "$dest/usr/bin/busybox.tmp" "$dest/usr/bin/busybox"

for l in bin sbin; do
    if [ -L "$dest/$l" ] || [ ! -e "$dest/$l" ]; then
        ln -sfn usr/bin "$dest/$l"
    else
        die "$dest/$l exists and is not a symlink"
    fi
done
say "linked bin, sbin -> usr/bin"

n=0
for applet in $("$dest/usr/bin/busybox" --list); do
    # A symlink busybox -> busybox would loop.
    [ "$applet" = busybox ] && continue
    ln -sfn busybox "$dest/usr/bin/$applet"
    n=$((n + 1))
done
say "linked $n applets in usr/bin"

cat >"$dest/etc/os-release" <<'OSR'
NAME="busybox (berth test fixture)"
ID=busybox
PRETTY_NAME="busybox (berth test fixture)"
OSR
cat >"$dest/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PW
cat >"$dest/etc/group" <<'GR'
root:x:0:
nogroup:x:65534:
GR
say "wrote etc/os-release, etc/passwd, etc/group"

printf 'berth-fixture\n' >"$dest/www/index.html"
say "wrote www/index.html"
say "done: $dest"
