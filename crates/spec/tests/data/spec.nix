{ host.uplink = "eth0"; }
