# A redundancy group: two container members behind a service address, an
# HTTP health check, and an ephemeral companion per member; plus a plain
# guest with a backup declaration.
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; subnet6 = "fd42:b:e:1::/64"; };
  guests.db = {
    kind = "container";
    index = 2;
    rootfs = "${root}/rootfs";
    readOnly = true;
    backup = {
      command = [ "cat" "/etc/os-release" ];
      restoreCommand = null;
      recipients = [ "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p" ];
    };
  };
  groups.web = {
    replicas = 2;
    indexBase = 10;
    vip4 = "10.0.1.10";
    vip6 = null;
    mode = "active";
    maxParallel = 1;
    minAvailable = 1;
    minHealthyTime = "1s";
    healthyDeadline = "60s";
    autoRevert = true;
    drainTime = null;
    template = {
      kind = "container";
      rootfs = "${root}/rootfs";
      ephemeral = true;
      command = [ "/bin/sh" "-c" "exec httpd -f -p 80 -h /www" ];
      health = {
        http = "http://{addr}:80/";
        expect = 200;
        interval = "200ms";
        timeout = "500ms";
        healthyAfter = 2;
        unhealthyAfter = 2;
        tcp = null;
        exec = null;
      };
      companions = [{
        name = "db";
        indexBase = 20;
        kind = "container";
        rootfs = "${root}/rootfs";
        ephemeral = true;
      }];
    };
  };
}
