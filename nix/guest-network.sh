# The addresses of a NixOS VM guest built from `config` (nix/module.nix's
# VM profile runs this as berth-network.service, with bash and iproute2):
# berth appends them to the kernel command line, nothing in the guest asks
# a DHCP server.
#
#   ip=<addr>::<gw>:255.255.255.255:<hostname>:<dev>:off
#   berth.ip6=<addr6> berth.gw6=<gw6>
#   berth.vip4=<addr>[,<addr>...] berth.vip6=<addr>[,<addr>...]   (group members)
#
# Idempotent (replace, never add): a restart of the unit changes nothing.
# BERTH_CMDLINE stands in for /proc/cmdline (crates/berth/tests/guest_network.rs).
set -eu
cmdline=${BERTH_CMDLINE:-$(cat /proc/cmdline)}
dev=eth0
addr='' gw='' addr6='' gw6='' vip4='' vip6=''
for arg in $cmdline; do
  case "$arg" in
    ip=*) IFS=: read -r addr _ gw _ _ d _ <<< "${arg#ip=}"; dev=${d:-eth0} ;;
    berth.ip6=*) addr6=${arg#berth.ip6=} ;;
    berth.gw6=*) gw6=${arg#berth.gw6=} ;;
    berth.vip4=*) vip4=${arg#berth.vip4=} ;;
    berth.vip6=*) vip6=${arg#berth.vip6=} ;;
  esac
done
ip link set lo up
ip link set "$dev" up
if [ -n "$addr" ]; then
  ip addr replace "$addr/32" dev "$dev"
  ip route replace "$gw/32" dev "$dev"
  ip route replace default via "$gw" dev "$dev" onlink
fi
if [ -n "$addr6" ]; then
  ip -6 addr replace "$addr6/128" dev "$dev" nodad
  ip -6 route replace "$gw6/128" dev "$dev"
  ip -6 route replace default via "$gw6" dev "$dev" onlink
fi
# A group member accepts its group's service addresses as its own.
for v in ${vip4//,/ }; do ip addr replace "$v/32" dev lo; done
for v in ${vip6//,/ }; do ip -6 addr replace "$v/128" dev lo; done
