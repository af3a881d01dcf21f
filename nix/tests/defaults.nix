# What the module passes when only kind, index and the boot inputs are set:
# every other option at its default (null, {} or []). The spec keeps only
# what was set, so berth's own defaults apply (and show in `berth plan`).
{ root ? "/nonexistent" }:
let
  unset = {
    config = null;
    rootfs = null; command = null; memory = null; cpus = null;
    autoStart = null; restart = null; env = { }; stopTimeout = null;
    ephemeral = null; readOnly = null;
    machine = null; accel = null; kernel = null; initrd = null;
    cmdline = null; ipCmdline = null; disks = [ ]; cdrom = null;
    firmware = null; cpuPinning = null; emulatorCpus = null;
    exclusive = null; hugepages = null; nixCache = null;
  };
in
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; subnet6 = null; maxGuests = null; };
  guests = {
    c1 = unset // { kind = "container"; index = 1; rootfs = "${root}/rootfs"; };
    v1 = unset // { kind = "vm"; index = 2; kernel = "${root}/vmlinuz"; };
  };
  groups = { };
}
