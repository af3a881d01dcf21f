#!/bin/sh
# Builds the VM fixture for berth's tests: Debian's kernel, a busybox
# initramfs that loads the virtio modules and configures the network from the
# kernel command line, and a small ext4 disk image carrying the same root.
#
# usage: mk-vm-fixture.sh DIR
#   BERTH_FIXTURE_KERNEL_DEB=/path/to/linux-image-*.deb
#                     use this kernel package instead of downloading the one
#                     behind Debian's linux-image-amd64 with apt-get
#   BUSYBOX=/path     another static busybox (default /bin/busybox, from
#                     Debian's busybox-static)
#   QEMU_GA=/path     the QEMU guest agent to put in the guest (default: the
#                     host's qemu-ga, from Debian's qemu-guest-agent, if any;
#                     QEMU_GA=none leaves it out)
#
# Produces in DIR:
#   vmlinuz      the kernel (boot/vmlinuz-<ver> from the package)
#   initrd.img   gzip'd newc cpio: busybox, /init, the virtio (+ ext4) modules,
#                and qemu-ga with its shared libraries when the host has it
#   disk.img     32 MiB raw ext4 image with the same root and /berth-disk-root
#   VERSION      "kernel <ver>", "deb <file name>", "script <sha256 of this file>",
#                "qga yes|no"
#
# Idempotent: a DIR whose VERSION matches this script (and the override .deb,
# if set, and whether the host has qemu-ga) is left alone. It builds in a temp dir next to DIR and renames it into
# place, so DIR is either complete or absent and concurrent callers are safe.
#
# The guest's /init understands, on the kernel command line:
#   ip=<client>::<gw>:<netmask>:<hostname>:<device>:off   (device default eth0)
#   berth.ip6=<addr>  berth.gw6=<addr>   IPv6 /128 + default route via gw6
#   berth.vip4=<addr>[,<addr>...]        extra /32 addresses on lo
#   berth.nic=<dev>:<addr/len>[,...]    addresses on extra NICs, e.g.
#                                        eth1:10.9.0.2/24,eth2:fd00:9::2/64
#   berth.fetch=<url>                    (tests) fetch url via NAT -> /fetched.html,
#                                        then with a forged source -> /spoof.html
#   berth.root=/dev/vda [berth.rootfstype=ext4] [ro]
#                                        switch to that disk (which carries
#                                        the same init) before the rest
#   berth.noqga                          do not start qemu-ga (which otherwise
#                                        runs on the virtio-serial port
#                                        org.qemu.guest_agent.0, if present)
#   berth.noexecport                     no shell on the berth.exec port
#   berth.showseed=LABEL:FILE            (tests) mount the disk labelled LABEL
#                                        (vfat or iso9660) read-only and print
#                                        FILE between "berth-fixture: seed
#                                        LABEL/FILE begin" and "... end"
# It prints "berth-fixture: booted", then "berth-fixture: disk root" when it
# runs from the disk, and "berth-fixture: ready" once httpd serves
# /www/index.html ("berth-vm-fixture <hostname>") on port 80; then it keeps a
# shell on the console.
set -eu

say() { printf 'mk-vm-fixture: %s\n' "$*"; }
die() {
    printf 'mk-vm-fixture: error: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=${1%/}
[ -n "$dir" ] || die "DIR must not be / or empty"
bb=${BUSYBOX:-/bin/busybox}
deb_override=${BERTH_FIXTURE_KERNEL_DEB:-}

need() {
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found in PATH ($(hint "$t"))"
    done
}
hint() {
    case $1 in
        cpio) echo "apt-get install cpio" ;;
        mke2fs) echo "apt-get install e2fsprogs" ;;
        dpkg | dpkg-deb) echo "part of dpkg" ;;
        apt-get | apt-cache) echo "needs a Debian apt, or set BERTH_FIXTURE_KERNEL_DEB" ;;
        xz) echo "apt-get install xz-utils" ;;
        zstd) echo "apt-get install zstd" ;;
        *) echo "install it" ;;
    esac
}

need sha256sum cut sed sort find gzip
script_hash=$(sha256sum <"$0" | cut -c1-64)

# The guest agent to include, if any.
qga=${QEMU_GA:-}
if [ -z "$qga" ]; then
    qga=$(command -v qemu-ga 2>/dev/null || true)
    [ -n "$qga" ] || [ ! -x /usr/sbin/qemu-ga ] || qga=/usr/sbin/qemu-ga
fi
[ "$qga" != none ] || qga=
if [ -n "$qga" ]; then
    [ -x "$qga" ] || die "QEMU_GA=$qga: not an executable"
    qga_state=yes
else
    qga_state=no
fi

# up_to_date D: D holds a complete fixture built by this script (and from the
# override .deb, when one is set).
up_to_date() {
    [ -f "$1/VERSION" ] && [ -f "$1/vmlinuz" ] && [ -f "$1/initrd.img" ] && [ -f "$1/disk.img" ] ||
        return 1
    grep -qx "script $script_hash" "$1/VERSION" || return 1
    grep -qx "qga $qga_state" "$1/VERSION" || return 1
    if [ -n "$deb_override" ]; then
        grep -qx "deb $(basename "$deb_override")" "$1/VERSION" || return 1
    fi
    return 0
}

if up_to_date "$dir"; then
    say "up to date: $dir ($(sed -n 's/^kernel //p' "$dir/VERSION"))"
    exit 0
fi

need cpio mke2fs dpkg
if [ -n "$deb_override" ] && [ ! -f "$deb_override" ]; then
    die "BERTH_FIXTURE_KERNEL_DEB=$deb_override: no such file"
fi
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

parent=$(dirname "$dir")
mkdir -p "$parent"
tmp=$(mktemp -d "$dir.tmp.XXXXXX")
old=
cleanup() {
    [ -z "$tmp" ] || rm -rf "$tmp"
    [ -z "$old" ] || rm -rf "$old"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Readable by all: a QEMU that drops privileges (-runas) still reads it.
chmod 0755 "$tmp"
work=$tmp/.work
mkdir "$work"
say "building in $tmp"

# --- kernel package -------------------------------------------------------
if [ -n "$deb_override" ]; then
    deb=$deb_override
    say "using kernel package $deb (BERTH_FIXTURE_KERNEL_DEB)"
else
    need apt-get apt-cache
    # linux-image-amd64 is a metapackage; its dependency is the real one.
    resolve() {
        apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*\).*$/\1/p' | head -n 1
    }
    pkg=$(resolve)
    if [ -z "$pkg" ]; then
        say "apt-cache knows no linux-image-amd64; running apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
        pkg=$(resolve)
    fi
    [ -n "$pkg" ] || die "cannot resolve the package behind linux-image-amd64 (apt-cache depends found none)"
    say "linux-image-amd64 -> $pkg"
    say "apt-get download $pkg"
    if ! (cd "$work" && apt-get download -q "$pkg" >&2); then
        say "download failed; running apt-get update and retrying"
        apt-get update -q >&2 || die "cannot download $pkg: apt-get update failed (no network to the Debian archive?)"
        (cd "$work" && apt-get download -q "$pkg" >&2) ||
            die "cannot download $pkg with apt-get (no network to the Debian archive?)"
    fi
    deb=$(find "$work" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
    [ -n "$deb" ] || die "apt-get download $pkg left no ${pkg}_*.deb in $work"
fi

say "extracting $(basename "$deb")"
dpkg -x "$deb" "$work/pkg" || die "dpkg -x $deb failed"
kver=$(ls "$work/pkg/lib/modules" 2>/dev/null | head -n 1)
[ -n "$kver" ] || die "$deb has no lib/modules/<version>: not a kernel image package?"
moddir=$work/pkg/lib/modules/$kver
[ -f "$work/pkg/boot/vmlinuz-$kver" ] || die "$deb has no boot/vmlinuz-$kver"
cp "$work/pkg/boot/vmlinuz-$kver" "$tmp/vmlinuz"
chmod 0644 "$tmp/vmlinuz"
say "kernel $kver -> vmlinuz"

# --- root tree (shared by initrd and disk) --------------------------------
root=$work/root
mkdir -p "$root"
for d in bin dev proc sys run tmp www etc root newroot usr "lib/modules/$kver"; do
    mkdir -p "$root/$d"
done
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
ln -s bin "$root/sbin"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
cp "$bb" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
n=0
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -s busybox "$root/bin/$applet"
    n=$((n + 1))
done
say "root: busybox + $n applets"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'berth-vm-fixture\n' >"$root/www/index.html"

# --- QEMU guest agent (dynamically linked: it brings its libraries) ---------
if [ -n "$qga" ]; then
    need ldd
    cp "$qga" "$root/bin/qemu-ga"
    chmod 0755 "$root/bin/qemu-ga"
    libs=$(ldd "$qga" | sed -n -e 's/^.*=> *\(\/[^ ]*\) .*$/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (.*$/\1/p')
    [ -n "$libs" ] || die "ldd $qga listed no libraries"
    for l in $libs; do
        mkdir -p "$root$(dirname "$l")"
        cp -L "$l" "$root$l"
    done
    say "qemu-ga: $qga + $(echo "$libs" | wc -w) libraries"
fi

# --- modules --------------------------------------------------------------
# Loaded by /init in this order (dependencies are added in front of the
# module that needs them). Built-in or absent ones are skipped.
wanted="virtio_ring virtio virtio_mmio failover net_failover virtio_net virtio_blk
virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
crc16 mbcache jbd2 crc32c_generic ext4 evdev button virtio_console
fat vfat nls_cp437 nls_utf8 nls_ascii isofs"
order=
builtin_list=$moddir/modules.builtin

# find_mod NAME: the module file for NAME (- and _ are the same in names).
find_mod() {
    alt=$(printf '%s' "$1" | tr _ -)
    find "$moddir/kernel" \( -name "$1.ko" -o -name "$1.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) |
        head -n 1
}

# add_mod NAME: adds NAME after its dependencies. (No `local` in POSIX sh:
# nothing read after the recursive call may be a shared variable.)
add_mod() {
    case " $order " in *" $1 "*) return 0 ;; esac
    f=$(find_mod "$1")
    if [ -z "$f" ]; then
        alt=$(printf '%s' "$1" | tr _ -)
        if [ -f "$builtin_list" ] && grep -Eq "/($1|$alt)\.ko\$" "$builtin_list"; then
            say "module $1: built in"
        else
            say "module $1: not in this kernel, skipped"
        fi
        return 0
    fi
    case $f in
        *.ko) cat "$f" >"$work/mod.ko" ;;
        *.ko.xz) need xz && xz -dc "$f" >"$work/mod.ko" ;;
        *.ko.zst) need zstd && zstd -qdc "$f" >"$work/mod.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$work/mod.ko" ;;
        *) die "module $1: unknown compression: $f" ;;
    esac
    deps=$(tr '\0' '\n' <"$work/mod.ko" | sed -n 's/^depends=//p' | head -n 1 | tr , ' ')
    if [ -n "$deps" ]; then
        for d in $deps; do
            add_mod "$d"
        done
        # Dependencies clobbered mod.ko; fetch ours again.
        add_mod_file "$1"
    else
        mv "$work/mod.ko" "$root/lib/modules/$kver/$1.ko"
    fi
    order="$order $1"
    say "module $1: ${f#"$moddir/"}"
}
add_mod_file() {
    f=$(find_mod "$1")
    case $f in
        *.ko) cat "$f" ;;
        *.ko.xz) xz -dc "$f" ;;
        *.ko.zst) zstd -qdc "$f" ;;
        *.ko.gz) gzip -dc "$f" ;;
    esac >"$root/lib/modules/$kver/$1.ko"
}
for m in $wanted; do
    add_mod "$m"
done
printf '%s\n' $order >"$root/lib/modules/$kver/berth-order"
chmod 0644 "$root/lib/modules/$kver"/*

# --- /init ----------------------------------------------------------------
cat >"$root/init" <<'INIT'
#!/bin/sh
# berth VM fixture init (PID 1), from scripts/mk-vm-fixture.sh.
PATH=/bin
export PATH
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "berth-fixture: $*"; }
set -f
ipconf= ip6= gw6= vip4= nics= rootdev= rootfstype= rootflags=rw fetch= noqga= noexecport= showseed=
for a in $(cat /proc/cmdline); do
    case $a in
        berth.noqga) noqga=1 ;;
        berth.noexecport) noexecport=1 ;;
        ip=*) ipconf=${a#ip=} ;;
        berth.ip6=*) ip6=${a#*=} ;;
        berth.gw6=*) gw6=${a#*=} ;;
        berth.vip4=*) vip4="$vip4 $(echo "${a#*=}" | tr , ' ')" ;;
        berth.nic=*) nics="$nics $(echo "${a#*=}" | tr , ' ')" ;;
        berth.root=*) rootdev=${a#*=} ;;
        berth.fetch=*) fetch=${a#*=} ;;
        berth.showseed=*) showseed="$showseed ${a#*=}" ;;
        berth.rootfstype=*) rootfstype=${a#*=} ;;
        ro) rootflags=ro ;;
    esac
done
set +f

kver=$(uname -r)
while read -r m; do
    [ -d "/sys/module/$m" ] && continue
    insmod "/lib/modules/$kver/$m.ko" || say "insmod $m failed"
done <"/lib/modules/$kver/berth-order"

if [ -n "$rootdev" ] && [ ! -e /berth-disk-root ]; then
    i=0
    while [ ! -b "$rootdev" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if mount ${rootfstype:+-t "$rootfstype"} -o "$rootflags" "$rootdev" /newroot; then
        if [ -x /newroot/init ] && [ -e /newroot/berth-disk-root ]; then
            say "switching to disk root $rootdev"
            for m in dev proc sys; do
                mount --move "/$m" "/newroot/$m"
            done
            exec switch_root /newroot /init
        fi
        say "$rootdev has no berth fixture root; staying in the initramfs"
        umount /newroot
    else
        say "cannot mount $rootdev; staying in the initramfs"
    fi
fi

if [ -e /berth-disk-root ]; then
    say "disk root $rootdev"
    # Keep run-time writes off the disk image.
    mount -t tmpfs -o mode=0755 tmpfs /www
    mount -t tmpfs -o mode=1777 tmpfs /tmp
fi
mount -t tmpfs -o mode=0755 tmpfs /run
say booted

# berth.showseed=LABEL:FILE (tests): print FILE from the disk labelled LABEL.
for s in $showseed; do
    label=${s%%:*} file=${s#*:}
    dev= i=0
    while [ -z "$dev" ] && [ $i -lt 50 ]; do
        dev=$(findfs "LABEL=$label" 2>/dev/null)
        [ -n "$dev" ] || sleep 0.1
        i=$((i + 1))
    done
    if [ -z "$dev" ]; then
        say "seed $label: no disk with that label"
        continue
    fi
    mkdir -p "/run/seed-$label"
    if mount -o ro "$dev" "/run/seed-$label"; then
        say "seed $label/$file begin"
        cat "/run/seed-$label/$file"
        echo
        say "seed $label/$file end"
        umount "/run/seed-$label"
    else
        say "seed $label: cannot mount $dev"
    fi
done

hostname=berth-vm
ip link set lo up
if [ -n "$ipconf" ]; then
    IFS=: read -r client _server gw mask name dev _auto <<EOF
$ipconf
EOF
    [ -n "$name" ] && hostname=$name
    dev=${dev:-eth0}
    i=0
    while [ ! -e "/sys/class/net/$dev" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    ip link set "$dev" up || say "no network device $dev"
    [ -n "$client" ] && ip addr add "$client/32" dev "$dev"
    if [ -n "$gw" ]; then
        ip route add "$gw/32" dev "$dev"
        ip route add default via "$gw" dev "$dev" onlink
    fi
    say "net $dev $client gw ${gw:-none}${mask:+ mask $mask}"
fi
if [ -n "$ip6" ]; then
    dev=${dev:-eth0}
    ip link set "$dev" up
    # busybox ip has no `nodad`: switch DAD off for the device instead.
    echo 0 >"/proc/sys/net/ipv6/conf/$dev/accept_dad"
    ip -6 addr add "$ip6/128" dev "$dev"
    if [ -n "$gw6" ]; then
        ip -6 route add "$gw6/128" dev "$dev"
        ip -6 route add default via "$gw6" dev "$dev" onlink
    fi
    say "net6 $dev $ip6 gw ${gw6:-none}"
fi
for v in $vip4; do
    ip addr add "$v/32" dev lo && say "vip4 $v on lo"
done
for n in $nics; do
    ndev=${n%%:*}
    naddr=${n#*:}
    i=0
    while [ ! -e "/sys/class/net/$ndev" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    case $naddr in *:*) echo 0 >"/proc/sys/net/ipv6/conf/$ndev/accept_dad" ;; esac
    ip link set "$ndev" up && ip addr add "$naddr" dev "$ndev" && say "nic $ndev $naddr"
done
hostname "$hostname"
echo "berth-vm-fixture $hostname" >/www/index.html
httpd -p 80 -h /www && say "ready httpd :80 host $hostname"

# berth.fetch=URL (tests): fetch URL through the host's NAT and serve the
# result as /fetched.html; then try the same with a forged source address
# (an extra address plus a host route that uses it as source) and serve
# "blocked" or "got-through" as /spoof.html.
if [ -n "$fetch" ] && [ -n "$client" ]; then
    (
        i=0
        until wget -q -O /www/fetched.html "$fetch"; do
            i=$((i + 1))
            [ $i -ge 30 ] && { echo "fetch failed" >/www/fetched.html; break; }
            sleep 0.5
        done
        say "fetched $fetch"
        forged=${client%.*}.250
        target=$(echo "$fetch" | sed -e 's|^[a-z]*://||' -e 's|[:/].*||')
        ip addr add "$forged/32" dev "$dev"
        ip route add "$target/32" via "$gw" dev "$dev" onlink src "$forged"
        if timeout 5 wget -q -O /tmp/spoof "$fetch"; then
            echo got-through >/www/spoof.html
        else
            echo blocked >/www/spoof.html
        fi
        ip route del "$target/32"
        ip addr del "$forged/32" dev "$dev"
        say "spoof test: $(cat /www/spoof.html)"
    ) &
fi

# ACPI power button (QMP system_powerdown): power off at once, so a stop is
# graceful instead of waiting for the supervisor's timeout.
for e in /sys/class/input/event*; do
    if grep -q "Power Button" "$e/device/name" 2>/dev/null; then
        (
            dd if="/dev/input/${e##*/}" bs=24 count=1 >/dev/null 2>&1
            say "power button: powering off"
            sync
            poweroff -f
        ) &
        break
    fi
done

# A shell on the virtio-serial port named berth.exec: berth's fast channel
# for `berth exec` (the serial console is far slower under emulation). No
# terminal: commands in, output out, nothing echoed. A port can be opened
# once at a time, hence one read-write open for all three descriptors.
for p in /sys/class/virtio-ports/*; do
    [ -z "$noexecport" ] || break
    if [ "$(cat "$p/name" 2>/dev/null)" = berth.exec ]; then
        port=/dev/${p##*/}
        (while true; do sh 0<>"$port" 1>&0 2>&0; sleep 0.2; done) &
        break
    fi
done

# The QEMU guest agent on its usual port (no udev here to make
# /dev/virtio-ports/org.qemu.guest_agent.0, so find the port by name).
for p in /sys/class/virtio-ports/*; do
    [ -z "$noqga" ] && [ -x /bin/qemu-ga ] || break
    if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
        mkdir -p /run/qemu-ga
        qemu-ga -m virtio-serial -p "/dev/${p##*/}" -t /run/qemu-ga -f /run/qemu-ga.pid \
            -l /run/qemu-ga.log </dev/null >/dev/null 2>&1 &
        say "qemu-ga on /dev/${p##*/}"
        break
    fi
done

while true; do
    setsid cttyhack sh
    sleep 1
done
INIT
chmod 0755 "$root/init"

# --- initrd.img -----------------------------------------------------------
say "initrd.img: cpio newc | gzip"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 >"$tmp/initrd.img"
chmod 0644 "$tmp/initrd.img"

# --- disk.img -------------------------------------------------------------
: >"$root/berth-disk-root"
say "disk.img: 32 MiB ext4 from the same root (+ /berth-disk-root), no mount"
mke2fs -q -F -t ext4 -L berth-root -E root_owner=0:0 -d "$root" "$tmp/disk.img" 32M >&2 ||
    die "mke2fs -d failed (needs e2fsprogs >= 1.43)"
chmod 0644 "$tmp/disk.img"

printf 'kernel %s\ndeb %s\nscript %s\nqga %s\n' "$kver" "$(basename "$deb")" "$script_hash" "$qga_state" >"$tmp/VERSION"
rm -rf "$work"

# --- into place -----------------------------------------------------------
if [ -e "$dir" ]; then
    if up_to_date "$dir"; then
        say "another builder finished $dir first; discarding this build"
        exit 0
    fi
    [ -d "$dir" ] || die "$dir exists and is not a directory"
    old=$(mktemp -d "$dir.old.XXXXXX")
    # Fails if another builder moved it already; that is fine.
    mv -T "$dir" "$old/fixture" 2>/dev/null || true
fi
if mv -T "$tmp" "$dir" 2>/dev/null; then
    tmp=
elif up_to_date "$dir"; then
    say "another builder finished $dir first; discarding this build"
    exit 0
else
    die "cannot rename $tmp to $dir"
fi
say "done: $dir (kernel $kver)"
