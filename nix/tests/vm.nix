# Two VMs: a pinned microvm with disks (direct kernel boot) and a q35 one
# that boots from a CD-ROM with SeaBIOS.
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; };
  guests = {
    router1 = {
      kind = "vm";
      index = 5;
      machine = "microvm";
      accel = "tcg";
      kernel = "${root}/vmlinuz";
      initrd = "${root}/initrd.img";
      cmdline = "console=ttyS0 berth.root=/dev/vda";
      ipCmdline = false;
      memory = "512M";
      cpus = 2;
      # CPU 0 exists on every host the test runs on.
      cpuPinning = [ 0 ];
      emulatorCpus = [ 0 ];
      exclusive = true;
      hugepages = false;
      restart = "on-failure";
      stopTimeout = "30s";
      nic = [{ mode = "segment"; segment = "sync"; mac = "52:54:00:12:34:01"; parent = null; }];
      disks = [
        { path = "${root}/disks/router1.qcow2"; size = "8G"; format = "qcow2"; readOnly = null; }
        { path = "${root}/seed.img"; size = null; format = "raw"; readOnly = true; }
      ];
    };
    legacy = {
      kind = "vm";
      index = 6;
      machine = "q35";
      firmware = "bios";
      cdrom = "${root}/installer.iso";
      memory = 1073741824;
      disks = [ { path = "${root}/disks/legacy.img"; size = "2G"; } ];
    };
  };
}
