//! `nix/guest-network.sh`, the unit a NixOS VM guest built from `config`
//! runs to take its addresses from berth's kernel command line (see
//! nix/module.nix), run with bash and the real `ip` in a network namespace
//! this test creates and always removes: the addresses, routes and service
//! addresses it sets, and that a second run changes nothing.

use std::path::Path;
use std::process::Command;

use berth_testkit::{Cap, require, unique_tag};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ns_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guest_network_script_configures_the_link_from_the_cmdline() {
    if !require(
        "guest_network_script_configures_the_link_from_the_cmdline",
        &[Cap::Root, Cap::Netns],
    ) {
        return;
    }
    let ns = Netns(format!("bt-gn-{}", unique_tag("g")));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .expect("ip");
    assert!(st.success());
    // The guest's NIC: one end of a veth pair, named as the guest sees it.
    ns_out(
        &ns.0,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nix/guest-network.sh");
    // What berth's supervisor appends for guest index 5 of 10.0.0.0/24 and
    // fd42::/64, plus a group member's service addresses.
    let cmdline = "console=ttyS0 init=/nix/store/x/init \
        ip=10.0.0.5::10.0.0.0:255.255.255.255:r1:eth0:off \
        berth.ip6=fd42::5 berth.gw6=fd42:: \
        berth.vip4=10.9.0.1,10.9.0.2 berth.vip6=fd99::1 tsc_early_khz=2600000";
    let run = || {
        let script = script.to_str().expect("utf8 path");
        ns_out(
            &ns.0,
            &["env", &format!("BERTH_CMDLINE={cmdline}"), "bash", script],
        )
    };
    run();
    let state = || {
        [
            ns_out(&ns.0, &["ip", "-4", "addr", "show"]),
            ns_out(&ns.0, &["ip", "-6", "addr", "show"]),
            ns_out(&ns.0, &["ip", "-4", "route", "show"]),
            ns_out(&ns.0, &["ip", "-6", "route", "show"]),
        ]
    };
    let first = state();
    let [a4, a6, r4, r6] = &first;
    assert!(
        a4.contains("inet 10.0.0.5/32") && a4.contains("eth0"),
        "{a4}"
    );
    assert!(a6.contains("inet6 fd42::5/128"), "{a6}");
    assert!(r4.contains("default via 10.0.0.0 dev eth0 onlink"), "{r4}");
    assert!(r4.contains("10.0.0.0 dev eth0"), "{r4}");
    assert!(r6.contains("default via fd42:: dev eth0"), "{r6}");
    for vip in ["inet 10.9.0.1/32", "inet 10.9.0.2/32"] {
        assert!(a4.contains(vip), "{vip} not on lo: {a4}");
    }
    assert!(a6.contains("inet6 fd99::1/128"), "{a6}");
    let link = ns_out(&ns.0, &["ip", "link", "show", "eth0"]);
    assert!(link.contains("UP"), "{link}");

    // The unit may run again (restart): same state, no error.
    run();
    assert_eq!(state(), first);

    // Without berth.ip6/vips (ip_cmdline on, no IPv6 subnet): IPv4 only.
    let plain = Netns(format!("bt-gn-{}", unique_tag("p")));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &plain.0])
            .status()
            .expect("ip")
            .success()
    );
    ns_out(
        &plain.0,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    );
    let script = script.to_str().expect("utf8 path");
    ns_out(
        &plain.0,
        &[
            "env",
            "BERTH_CMDLINE=ip=10.1.0.7::10.1.0.0:255.255.255.255:x:eth0:off",
            "bash",
            script,
        ],
    );
    let a4 = ns_out(&plain.0, &["ip", "-4", "addr", "show", "eth0"]);
    assert!(a4.contains("inet 10.1.0.7/32"), "{a4}");
    let r6 = ns_out(&plain.0, &["ip", "-6", "route", "show", "default"]);
    assert!(r6.trim().is_empty(), "{r6}");
}
