# Host options: IPv6 subnet and max_guests; one minimal container.
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = {
    uplink = "lo";
    subnet4 = "10.88.0.0/22";
    subnet6 = "fd42:b:e:1::/64";
    maxGuests = 1000;
  };
  guests.db1 = { kind = "container"; index = 999; rootfs = "${root}/rootfs"; };
}
