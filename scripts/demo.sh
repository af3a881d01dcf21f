#!/bin/sh
# berth demo: installs what berth needs, builds it, and applies examples/demo.toml
# (two containers and a QEMU microVM serving HTTP on a routed network; the VM
# boots Debian's kernel with a busybox initramfs) inside a throw-away network
# namespace, so your machine's own interfaces, routes and firewall stay as they
# are.
#
#   sudo scripts/demo.sh          # set up and run the demo (safe to run again)
#   sudo scripts/demo.sh --clean  # destroy the guests, stop the daemon, remove the namespaces
#
# Environment: BERTH_DEMO_DIR (default /tmp/berth-demo), SKIP_INSTALL=1 to skip
# the package installation.
set -eu

cd "$(dirname "$0")/.."
repo=$(pwd)
dir=${BERTH_DEMO_DIR:-/tmp/berth-demo}
host_ns=berth-demo
out_ns=berth-demo-out
say() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo $0): berth creates network namespaces, links and containers"

berth="$repo/target/release/berth"
in_host() { nsenter --net=/run/netns/$host_ns "$@"; }
export BERTH_STATE_DIR="$dir/state" BERTH_SOCKET="$dir/berth.sock"

clean() {
    if [ -x "$berth" ] && [ -S "$BERTH_SOCKET" ]; then
        in_host "$berth" destroy --all --yes || true
    fi
    if [ -f "$dir/daemon.pid" ]; then
        kill "$(cat "$dir/daemon.pid")" 2>/dev/null || true
        rm -f "$dir/daemon.pid"
    fi
    for ns in $host_ns $out_ns; do
        if ip netns list | grep -qw "$ns"; then
            for p in $(ip netns pids "$ns"); do kill -9 "$p" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
}

if [ "${1:-}" = "--clean" ]; then
    clean
    rm -rf "$dir"
    echo "demo removed"
    exit 0
fi

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    say "installing host packages"
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            systemd-container nftables iproute2 busybox-static curl ca-certificates gcc libc6-dev \
            qemu-system-x86 qemu-utils cpio e2fsprogs file gzip >/dev/null
    elif [ -e /etc/NIXOS ]; then
        for t in systemd-nspawn nft ip curl busybox qemu-system-x86_64; do
            command -v $t >/dev/null 2>&1 || die "$t missing: run inside \`nix-shell -p nftables iproute2 busybox curl\` (systemd-nspawn comes with systemd)"
        done
    else
        die "unsupported system: install systemd-nspawn, nft, ip, busybox (static), curl by hand and rerun with SKIP_INSTALL=1"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and rerun"
fi

say "building berth (release)"
cargo build --release --quiet -p berth

say "building a busybox rootfs for the containers"
mkdir -p "$dir"
sh scripts/mk-busybox-rootfs.sh "$dir/rootfs-busybox" >/dev/null

say "building the demo VM image (Debian kernel + busybox initramfs)"
sh scripts/mk-vm-fixture.sh "$dir/vm" >/dev/null

say "creating network namespaces: $host_ns (plays the host) and $out_ns (plays the internet)"
clean
mkdir -p "$dir"
ip netns add $host_ns
ip netns add $out_ns
ip link add up0 netns $host_ns type veth peer name wan0 netns $out_ns
ip -n $host_ns addr add 198.51.100.1/24 dev up0
ip -n $out_ns addr add 198.51.100.2/24 dev wan0
for ns in $host_ns $out_ns; do ip -n $ns link set lo up; done
ip -n $host_ns link set up0 up
ip -n $out_ns link set wan0 up
ip -n $host_ns route add default via 198.51.100.2

sed -e "s|^uplink = \"eth0\"|uplink = \"up0\"|" \
    -e "s|/var/lib/berth/rootfs/busybox|$dir/rootfs-busybox|" \
    -e "s|/var/lib/berth/images/|$dir/vm/|" \
    examples/demo.toml > "$dir/demo.toml"

# Nested KVM is often unreliable (a guest kernel can hang under it): when
# this machine is itself a VM, the demo runs its VM under TCG.
if grep -qw hypervisor /proc/cpuinfo && [ -z "${BERTH_ACCEL:-}" ]; then
    export BERTH_ACCEL=tcg
    echo "this machine is a VM: the demo VM runs under TCG (set BERTH_ACCEL=kvm to override)"
fi

say "starting the daemon (log: $dir/daemon.log)"
# nsenter execs berth, so $! is the daemon's PID.
nsenter --net=/run/netns/$host_ns "$berth" daemon >"$dir/daemon.log" 2>&1 </dev/null &
echo $! > "$dir/daemon.pid"
i=0
until [ -S "$BERTH_SOCKET" ]; do
    i=$((i + 1)); [ $i -lt 100 ] || die "daemon did not start; see $dir/daemon.log"
    sleep 0.1
done

say "serving vm2's root disk image on 127.0.0.1:8099 inside $host_ns (no internet needed)"
mkdir -p "$dir/www"
gzip -1 -c "$dir/vm/disk.img" >"$dir/www/root.img.gz"
(cd "$dir/www" && sha256sum root.img.gz >SHA256SUMS)
cat "$dir/www/SHA256SUMS"
in_host busybox httpd -p 127.0.0.1:8099 -h "$dir/www"

say "berth validate"; in_host "$berth" validate "$dir/demo.toml"
say "berth plan";     in_host "$berth" plan "$dir/demo.toml"
say "berth apply (pulls and verifies vm2's image first)"
in_host "$berth" apply --yes "$dir/demo.toml"
say "berth ps";       in_host "$berth" ps
say "berth image ls"; in_host "$berth" image ls

say "asking the guests over HTTP, from the host"
in_host curl -sS --max-time 5 http://10.0.0.2/
in_host curl -sS --max-time 5 "http://[fd42:b:e:1::3]/index.json"; echo
echo "waiting for the group's service address 10.0.1.10 (a healthy member answers)…"
i=0
until in_host curl -sS --max-time 2 http://10.0.1.10/ 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 60 ] || die "the group's VIP did not answer; see $dir/daemon.log"
    sleep 0.5
done
echo "waiting for the VM to boot…"
i=0
until in_host curl -sS --max-time 2 http://10.0.0.4/ 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 120 ] || die "the VM did not answer; see $BERTH_STATE_DIR/guests/vm1/console.log"
    sleep 1
done

echo "waiting for vm2 (booted from a qcow2 overlay of the pulled image) to print its seed…"
i=0
until grep -q "hello from vm2" "$BERTH_STATE_DIR/guests/vm2/console.log" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 120 ] || die "vm2 did not boot; see $BERTH_STATE_DIR/guests/vm2/console.log"
    sleep 1
done
grep -E "berth-fixture: (disk root|seed)|hello from vm2" "$BERTH_STATE_DIR/guests/vm2/console.log"

cat <<EOF2

The demo is running. Explore it from the demo's host namespace:

  export BERTH_STATE_DIR=$BERTH_STATE_DIR BERTH_SOCKET=$BERTH_SOCKET
  sudo -E nsenter --net=/run/netns/$host_ns $berth ps
  sudo -E nsenter --net=/run/netns/$host_ns curl http://10.0.0.2/
  sudo -E nsenter --net=/run/netns/$host_ns curl http://10.0.1.10/   # the group "site": one member answers
  # kill -9 the member marked * in "berth ps" (its PID) and curl again: the other answers
  # change memory of "web" in $dir/demo.toml, then:
  sudo -E nsenter --net=/run/netns/$host_ns $berth plan $dir/demo.toml
  sudo -E nsenter --net=/run/netns/$host_ns $berth image ls     # the verified image cache
  sudo -E nsenter --net=/run/netns/$host_ns $berth logs vm2     # vm2's console: disk root, seed

Remove everything with: sudo $0 --clean
EOF2
