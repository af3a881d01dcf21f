# A container with every container option set (as the module passes them
# after building a guest `config`: rootfs and command are plain strings).
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; subnet6 = null; maxGuests = null; };
  guests.web = {
    kind = "container";
    index = 2;
    rootfs = "${root}/rootfs";
    command = [ "/bin/sh" "-c" "httpd -f -p 80 -h /www" ];
    memory = "128M";
    cpus = 0.5;
    autoStart = false;
    restart = "always";
    env = { GREETING = "hello world"; };
    stopTimeout = "5s";
    ephemeral = true;
    readOnly = false;
    nixCache = true;
    binds = [
      { source = "${root}/rootfs"; target = "/srv/data"; readOnly = null; }
      { source = "/tmp"; target = null; readOnly = false; }
    ];
  };
}
