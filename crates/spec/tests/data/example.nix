# The same spec as example.toml, as a Nix expression (any Nix that evaluates
# to this attribute set works: let-bindings, imports, functions of a list...).
let
  busybox = "/var/lib/berth/rootfs/busybox";
in
{
  host = {
    uplink = "eth0";
    subnet4 = "10.0.0.0/24";
    subnet6 = "fd42:b:e:1::/64";
    max_guests = 64;
  };
  guest.db1 = {
    kind = "container";
    index = 2;
    rootfs = busybox;
    command = [ "/bin/sh" "-c" "httpd -f -p 80 -h /www" ];
    memory = "128M";
    cpus = 1.5;
    autostart = true;
    restart = "on-failure";
    env = { FOO = "bar"; };
    stop_timeout = "10s";
  };
  guest.web = {
    kind = "container";
    index = 26;
    rootfs = "/var/lib/berth/rootfs/web";
  };
}
