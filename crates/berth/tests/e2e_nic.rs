//! Router guests end to end under TCG: two fixture VMs with a macvtap on a
//! "physical" LAN port and a private segment between them, a container on
//! that segment, and a LAN client in a namespace of its own.
//!
//! ```text
//!   bt-<tag>-l ("LAN")               bt-<tag>-h ("host", berth runs here)
//!   cl0 192.168.81.100/24 <-veth->   lan0 ──┬─ bm20n1 ── VM a eth1 192.168.81.20
//!                                           └─ bm21n1 ── VM b eth1 192.168.81.21
//!                                    bs-sync ─┬─ bp20n2 ── VM a eth2 172.30.81.20
//!                                             ├─ bp21n2 ── VM b eth2 172.30.81.21
//!                                             └─ bp22n1 ── container c eth1 172.30.81.22
//!                                    vb23 ── container d (routed only, not on the segment)
//! ```

mod common;

use std::process::Command;
use std::time::Duration;

use berth_testkit::{Cap, busybox_rootfs, require, unique_tag, vm_fixture, wait_until};
use common::{Berth, container, lines_in_host, spec};

const CAPS: &[Cap] = &[
    Cap::Root,
    Cap::Netns,
    Cap::Nspawn,
    Cap::Nft,
    Cap::Curl,
    Cap::Qemu,
];

/// A "LAN" namespace joined to the test host namespace by a veth whose host
/// end (`lan0`) plays the physical port. Removed on drop, also on panic.
struct Lan {
    ns: String,
}

impl Lan {
    fn new(tag: &str, host_ns: &str) -> Lan {
        let ns = format!("bt-{tag}-l");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns]);
        let lan = Lan { ns };
        // Distinct ifindexes on the two ends (see TestNet: equal ones delay
        // the veth's qdisc by up to a second).
        ip(&[
            "-n", host_ns, "link", "add", "lan0", "index", "31", "type", "veth", "peer", "name",
            "cl0", "index", "32", "netns", &lan.ns,
        ]);
        ip(&["-n", host_ns, "link", "set", "lan0", "up"]);
        ip(&["-n", &lan.ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &lan.ns,
            "addr",
            "add",
            "192.168.81.100/24",
            "dev",
            "cl0",
        ]);
        ip(&["-n", &lan.ns, "link", "set", "cl0", "up"]);
        lan
    }

    fn curl(&self, url: &str) -> Result<String, String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["--", "curl", "-sS", "--max-time", "3", url])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn vm(name: &str, index: u32, fx: &berth_testkit::VmFixture, nics: &str) -> String {
    format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = {index}\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1 berth.noqga\"\nmemory = \"256M\"\nstop_timeout = \"2s\"\n{nics}\n",
        fx.kernel.display(),
        fx.initrd.display()
    )
}

fn router_nics(i: u32) -> String {
    format!(
        "[[guest.NAME.nic]]\nmode = \"macvtap\"\nparent = \"lan0\"\naddr = \"192.168.81.{i}/24\"\n\n[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"sync\"\naddr = \"172.30.81.{i}/24\"\n"
    )
}

fn wait_for(what: &str, b: &Berth, mut f: impl FnMut() -> Option<String>) -> String {
    wait_until(Duration::from_secs(180), Duration::from_millis(500), &mut f)
        .unwrap_or_else(|| panic!("{what} did not happen; daemon log:\n{}", b.daemon_log()))
}

/// `berth exec NAME -- sh -c SCRIPT`: (success, stdout).
fn sh(b: &Berth, name: &str, script: &str) -> (bool, String) {
    let out = b.cli(&["exec", name, "--", "/bin/sh", "-c", script]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn berth_links(b: &Berth) -> Vec<String> {
    lines_in_host(&b.net, "ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| {
            n.starts_with("bm")
                || n.starts_with("bp")
                || n.starts_with("bs-")
                || n.starts_with("vb")
        })
        .collect()
}

#[test]
fn routers_on_a_lan_port_and_a_private_segment() {
    if !require("routers_on_a_lan_port_and_a_private_segment", CAPS) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture (kernel + initrd)");
    let tag = unique_tag("nic");
    let mut b = Berth::new(&tag);
    let lan = Lan::new(&tag, b.net.host_ns());
    let rootfs = busybox_rootfs();
    let (va, vb, ct, cd) = (
        format!("{tag}-a"),
        format!("{tag}-b"),
        format!("{tag}-c"),
        format!("{tag}-d"),
    );

    // Bad input first: a missing parent is one clear error and creates nothing.
    let bad = b.write(
        "bad.toml",
        &spec(
            b.net.uplink(),
            81,
            &vm(
                &va,
                20,
                &fx,
                &"[[guest.NAME.nic]]\nmode = \"macvtap\"\nparent = \"lan9\"\n".replace("NAME", &va),
            ),
        ),
    );
    let out = b.cli(&["apply", "--yes", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nic[1].parent") && err.contains("interface `lan9` does not exist"),
        "{err}"
    );
    assert!(b.ps().is_empty());
    assert!(berth_links(&b).is_empty(), "{:?}", berth_links(&b));

    let guests = format!(
        "{}{}{}{}",
        vm(&va, 20, &fx, &router_nics(20).replace("NAME", &va)),
        vm(&vb, 21, &fx, &router_nics(21).replace("NAME", &vb)),
        container(
            &ct,
            22,
            &rootfs,
            &format!(
                "[[guest.{ct}.nic]]\nmode = \"segment\"\nsegment = \"sync\"\naddr = \"172.30.81.22/24\"\n"
            )
        ),
        container(&cd, 23, &rootfs, ""),
    );
    let text = spec(b.net.uplink(), 81, &guests);
    let file = b.write("spec.toml", &text);
    let file = file.to_str().expect("utf8");
    let out = b.cli_ok(&["apply", "--yes", file]);
    assert!(out.contains("applied"), "{out}");

    // Both VMs boot (their management link answers from the host).
    for ip in ["10.81.0.20", "10.81.0.21"] {
        wait_for(&format!("VM {ip} answering"), &b, || {
            b.curl(&format!("http://{ip}/")).ok()
        });
    }

    // A client on the LAN reaches both VMs' LAN addresses (macvtap).
    for ip in ["192.168.81.20", "192.168.81.21"] {
        let body = wait_for(&format!("LAN client reaching {ip}"), &b, || {
            lan.curl(&format!("http://{ip}/")).ok()
        });
        assert!(body.contains("berth-vm-fixture"), "{ip}: {body}");
    }

    // The VMs reach each other over the segment.
    let got = wait_for("VM a reaching VM b on the segment", &b, || {
        let (ok, out) = sh(&b, &va, "wget -q -O - http://172.30.81.21/");
        (ok && out.contains("berth-vm-fixture")).then_some(out)
    });
    assert!(got.contains(&vb), "{got}");

    // The container on the segment reaches a VM on it.
    let got = wait_for("container reaching VM a on the segment", &b, || {
        let (ok, out) = sh(&b, &ct, "wget -q -O - http://172.30.81.20/");
        (ok && out.contains("berth-vm-fixture")).then_some(out)
    });
    assert!(got.contains(&va), "{got}");
    let (_, addrs) = sh(&b, &ct, "ip addr show dev eth1");
    assert!(addrs.contains("172.30.81.22/24"), "{addrs}");

    // The host has no address on the segment, and cannot reach it even with
    // a route pointing there (replies for the host are dropped).
    let br = lines_in_host(&b.net, "ip", &["-o", "addr", "show", "dev", "bs-sync"]);
    assert!(
        !br.contains("inet"),
        "the host has an address on the segment: {br}"
    );
    let ports = lines_in_host(&b.net, "ip", &["-o", "link", "show", "master", "bs-sync"]);
    for p in ["bp20n2", "bp21n2", "bp22n1"] {
        assert!(ports.contains(p), "{p} not in bs-sync: {ports}");
    }
    assert!(
        b.curl("http://172.30.81.20/").is_err(),
        "the host reached the segment"
    );
    let ok = b
        .net
        .cmd_in_host("ip")
        .args(["route", "add", "172.30.81.0/24", "dev", "bs-sync"])
        .status()
        .expect("ip route");
    assert!(ok.success());
    assert!(
        b.curl("http://172.30.81.20/").is_err(),
        "the host reached the segment through a route of its own"
    );
    // Neither can a guest on a routed link only.
    let (ok, out) = sh(&b, &cd, "timeout 3 wget -q -O - http://172.30.81.20/");
    assert!(!ok, "a guest off the segment reached it: {out}");
    // The LAN does not see the segment either.
    assert!(lan.curl("http://172.30.81.20/").is_err());

    // Planner: a new MAC or parent restarts the VM, named in the plan.
    let moved = text.replacen(
        "parent = \"lan0\"\naddr = \"192.168.81.21/24\"",
        "parent = \"lan0\"\nmac = \"52:54:00:12:34:21\"\naddr = \"192.168.81.21/24\"",
        1,
    );
    let file2 = b.write("spec2.toml", &moved);
    let plan = b.cli_ok(&["plan", file2.to_str().expect("utf8")]);
    assert!(
        plan.contains(&vb) && plan.contains("(restart)") && plan.contains("nic[1].mac"),
        "{plan}"
    );

    // kill -9 of a VM's supervisor leaves its macvtap behind (QEMU goes
    // with it); destroy --all still removes every macvtap, port and bridge.
    let shim = std::fs::read_to_string(b.state.join("guests").join(&vb).join("status.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["shim_pid"].as_i64())
        .expect("shim pid of VM b");
    let _ = Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status();
    b.cli_ok(&["destroy", "--all", "--yes"]);
    let left = berth_links(&b);
    assert!(left.is_empty(), "left behind: {left:?}");
    let routes = lines_in_host(&b.net, "ip", &["route", "show"]);
    assert!(!routes.contains("10.81.0."), "{routes}");
    drop(lan);
    b.kill_daemon();
}
