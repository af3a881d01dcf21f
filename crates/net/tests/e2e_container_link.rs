//! End-to-end: a routed container link inside throwaway network namespaces.
//!
//! Needs root, `ip`, `nft`, `nsenter`, `unshare`, `busybox` and `curl`;
//! without them the test prints why and passes, unless
//! `BERTH_E2E_REQUIRED=1`, then it fails. It never touches the machine's own
//! interfaces, routes or firewall: everything happens in a netns "host" that
//! the test creates (and a second one, made by `unshare`, for the container).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_net::{
    Firewall, GuestLink, apply_ruleset, delete_link, delete_table, enable_forwarding,
    interface_exists, list_links, routes_within, setup_container_link, table_exists,
};
use ipnet::{Ipv4Net, Ipv6Net};
use nix::sched::CloneFlags;
use serde_json::Value;

const REQUIRED_TOOLS: &[&str] = &["ip", "nft", "nsenter", "unshare", "busybox", "curl"];

fn required() -> bool {
    std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    let missing: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|t| !in_path(t))
        .collect();
    if !missing.is_empty() {
        return Some(format!("missing tools: {}", missing.join(", ")));
    }
    None
}

/// Removes everything the test made, also when it panics.
struct Guard {
    netns: Vec<String>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` on a thread that has entered the network namespace at `ns_path`.
fn in_netns<T: Send>(ns_path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let ns = fs::File::open(ns_path).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Wait until `pid` has exec'd busybox (so `unshare --net` has run).
fn wait_for_busybox(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "busybox" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never became busybox (comm {comm:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until something in `netns` listens on TCP `port`.
fn wait_for_listener(ns_enter: &[&str], port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let needle = format!(":{port} ");
    loop {
        let mut args = ns_enter.to_vec();
        args.extend(["ss", "-Hltn"]);
        if in_path("ss") {
            if String::from_utf8_lossy(&run(&args).stdout).contains(&needle) {
                return;
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `curl` from inside a netns; Some(body) on success, None on failure.
fn curl(ns_enter: &[&str], extra: &[&str], url: &str) -> Option<String> {
    let mut args = ns_enter.to_vec();
    args.extend(["curl", "-sS", "-g", "--max-time", "1"]);
    args.extend(extra);
    args.push(url);
    let out = run(&args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sum of the packet counters of rules in chain `chain` of table inet berth.
fn drop_packets(ns_enter: &[&str], chain: &str) -> u64 {
    let mut args = ns_enter.to_vec();
    args.extend(["nft", "-j", "list", "table", "inet", "berth"]);
    let doc: Value = serde_json::from_str(&run_ok(&args)).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r["chain"] == chain)
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
        .sum()
}

#[test]
fn container_link_routes_firewall_and_cleanup() {
    if let Some(reason) = skip_reason() {
        assert!(!required(), "BERTH_E2E_REQUIRED=1 but: {reason}");
        eprintln!("skipping container_link_routes_firewall_and_cleanup: {reason}");
        return;
    }

    let host_ns = format!("berth-t-net-{}-host", std::process::id());
    let dir = std::env::temp_dir().join(format!("berth-t-net-{}", std::process::id()));
    let mut guard = Guard {
        netns: Vec::new(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    let guest_www = dir.join("guest");
    let host_www = dir.join("host");
    fs::create_dir_all(&guest_www).unwrap();
    fs::create_dir_all(&host_www).unwrap();
    fs::write(guest_www.join("index.html"), "hello from guest\n").unwrap();
    fs::write(host_www.join("index.html"), "hello from host\n").unwrap();

    run_ok(&["ip", "netns", "add", &host_ns]);
    guard.netns.push(host_ns.clone());
    let host_path = PathBuf::from(format!("/run/netns/{host_ns}"));
    let host_arg = format!("--net={}", host_path.display());
    let in_host: Vec<&str> = vec!["nsenter", &host_arg, "--"];
    run_ok(&["ip", "-n", &host_ns, "link", "set", "lo", "up"]);

    // The "container": busybox httpd in its own netns, nested in host_ns.
    let container = Command::new("nsenter")
        .arg(&host_arg)
        .args([
            "unshare", "--net", "--", "busybox", "httpd", "-f", "-p", "80", "-h",
        ])
        .arg(&guest_www)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = container.id();
    guard.children.push(container);
    wait_for_busybox(pid);
    let cont_arg = format!("--net=/proc/{pid}/ns/net");
    let in_cont: Vec<&str> = vec!["nsenter", &cont_arg, "--"];

    // A listener on the host side, to test what guests can send to the host.
    let listener = Command::new("nsenter")
        .arg(&host_arg)
        .args(["busybox", "httpd", "-f", "-p", "8080", "-h"])
        .arg(&host_www)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    guard.children.push(listener);

    let link = GuestLink {
        name: "vb2".into(),
        guest4: "10.99.0.2".parse().unwrap(),
        host4: "10.99.0.1".parse().unwrap(),
        guest6: Some("fd42:99::2".parse().unwrap()),
        host6: Some("fd42:99::1".parse().unwrap()),
    };
    let net4: Ipv4Net = "10.99.0.0/24".parse().unwrap();
    let net6: Ipv6Net = "fd42:99::/64".parse().unwrap();
    let fw = Firewall {
        uplink: "uplink0".into(),
        subnet4: net4,
        subnet6: Some(net6),
        guests: vec![link.clone()],
        vips: vec![],
    };

    in_netns(&host_path, || {
        let fwd = enable_forwarding().unwrap();
        eprintln!("forwarding before: {fwd:?}");
        let again = enable_forwarding().unwrap();
        assert!(again.ipv4_was_on && again.ipv6_was_on, "{again:?}");

        let t = Instant::now();
        setup_container_link(&link, pid as i32).unwrap();
        let first = t.elapsed();
        // Again: the stale link is deleted and everything is set up anew.
        let t = Instant::now();
        setup_container_link(&link, pid as i32).unwrap();
        let second = t.elapsed();
        eprintln!(
            "setup_container_link took {first:?} (fresh), {second:?} (replacing a stale link)"
        );

        // A second link into the same container clashes on "host0": the
        // error says so and nothing is left behind on the host.
        let clash = GuestLink {
            name: "vb3".into(),
            guest4: "10.99.0.3".parse().unwrap(),
            ..link.clone()
        };
        let err = setup_container_link(&clash, pid as i32)
            .unwrap_err()
            .to_string();
        eprintln!("expected error: {err}");
        assert!(err.contains("vb3") && err.contains("host0"), "{err}");
        assert!(!interface_exists("vb3"));

        assert!(interface_exists("vb2"));
        assert!(
            !interface_exists("host0"),
            "host0 must live only in the container netns"
        );
        assert_eq!(list_links("vb").unwrap(), ["vb2"]);
        assert_eq!(
            routes_within(net4, Some(net6)).unwrap(),
            ["10.99.0.2/32 dev vb2", "fd42:99::2/128 dev vb2"]
        );
    });

    // Container side as configured.
    let addrs = run_ok(&[&in_cont[..], &["ip", "-o", "addr", "show", "dev", "host0"]].concat());
    assert!(
        addrs.contains("10.99.0.2/32") && addrs.contains("fd42:99::2/128"),
        "{addrs}"
    );
    let routes = run_ok(&[&in_cont[..], &["ip", "route"]].concat());
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("default via 10.99.0.1 dev host0") && l.contains("onlink")),
        "{routes}"
    );
    assert!(routes.contains("10.99.0.1 dev host0"), "{routes}");
    let routes6 = run_ok(&[&in_cont[..], &["ip", "-6", "route"]].concat());
    assert!(
        routes6.contains("default via fd42:99::1 dev host0"),
        "{routes6}"
    );
    assert!(routes6.contains("fd42:99::1 dev host0"), "{routes6}");

    // Host -> guest over IPv4 and IPv6.
    wait_for_listener(&in_cont, 80);
    wait_for_listener(&in_host, 8080);
    assert_eq!(
        curl(&in_host, &[], "http://10.99.0.2/").as_deref(),
        Some("hello from guest\n")
    );
    assert_eq!(
        curl(&in_host, &[], "http://[fd42:99::2]/").as_deref(),
        Some("hello from guest\n")
    );

    // Spoofing: give the guest a second address and make replies to it
    // routable, so without the firewall a forged source gets through.
    run_ok(
        &[
            &in_cont[..],
            &["ip", "addr", "add", "10.99.0.99/32", "dev", "host0"],
        ]
        .concat(),
    );
    run_ok(
        &[
            &in_cont[..],
            &[
                "ip",
                "addr",
                "add",
                "fd42:99::99/128",
                "dev",
                "host0",
                "nodad",
            ],
        ]
        .concat(),
    );
    run_ok(
        &[
            &in_host[..],
            &["ip", "route", "add", "10.99.0.99/32", "dev", "vb2"],
        ]
        .concat(),
    );
    run_ok(
        &[
            &in_host[..],
            &["ip", "route", "add", "fd42:99::99/128", "dev", "vb2"],
        ]
        .concat(),
    );
    let spoof4 = ["--interface", "10.99.0.99"];
    let spoof6 = ["--interface", "fd42:99::99"];
    let host4_url = "http://10.99.0.1:8080/";
    let host6_url = "http://[fd42:99::1]:8080/";
    assert!(
        curl(&in_cont, &spoof4, host4_url).is_some(),
        "spoof4 should work without firewall"
    );
    assert!(
        curl(&in_cont, &spoof6, host6_url).is_some(),
        "spoof6 should work without firewall"
    );

    in_netns(&host_path, || {
        assert!(!table_exists().unwrap());
        apply_ruleset(&fw).unwrap();
        // Idempotent: applying again replaces the table in one transaction.
        apply_ruleset(&fw).unwrap();
        assert!(table_exists().unwrap());
    });
    let listing = run_ok(&[&in_host[..], &["nft", "list", "table", "inet", "berth"]].concat());
    eprintln!("{listing}");
    assert!(
        listing.contains("iifname . ip saddr != @guest4")
            && listing.contains("\"vb2\" . 10.99.0.2"),
        "{listing}"
    );
    assert!(listing.contains("iifname \"vb*\" accept"), "{listing}");
    assert!(
        listing.contains("oifname \"uplink0\" masquerade"),
        "{listing}"
    );

    // Real sources pass (the counters are not asserted to be zero here: the
    // tail of the unfiltered spoofed connections above, e.g. a last ACK or an
    // NDP probe from fd42:99::99, may legitimately be dropped now).
    assert_eq!(
        curl(&in_cont, &[], host4_url).as_deref(),
        Some("hello from host\n"),
        "real IPv4 source must pass"
    );
    assert_eq!(
        curl(&in_cont, &[], host6_url).as_deref(),
        Some("hello from host\n"),
        "real IPv6 source must pass"
    );
    let before = drop_packets(&in_host, "prerouting_filter");
    assert_eq!(
        curl(&in_cont, &spoof4, host4_url),
        None,
        "forged IPv4 source must be dropped"
    );
    let after4 = drop_packets(&in_host, "prerouting_filter");
    assert!(after4 > before, "the IPv4 anti-spoof rule counted nothing");
    assert_eq!(
        curl(&in_cont, &spoof6, host6_url),
        None,
        "forged IPv6 source must be dropped"
    );
    assert!(
        drop_packets(&in_host, "prerouting_filter") > after4,
        "IPv6 anti-spoof counted nothing"
    );
    // The guest still works with its real address.
    assert_eq!(
        curl(&in_host, &[], "http://10.99.0.2/").as_deref(),
        Some("hello from guest\n")
    );

    // Cleanup leaves nothing.
    in_netns(&host_path, || {
        assert!(delete_link("vb2").unwrap());
        assert!(!delete_link("vb2").unwrap());
        assert!(list_links("vb").unwrap().is_empty());
        assert!(!interface_exists("vb2"));
        assert_eq!(
            routes_within(net4, Some(net6)).unwrap(),
            Vec::<String>::new()
        );
        assert!(delete_table().unwrap());
        assert!(!delete_table().unwrap());
        assert!(!table_exists().unwrap());
    });
    let cont_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    in_netns(&cont_ns, || {
        assert!(!interface_exists("host0"), "peer must go with the link")
    });

    drop(guard);
    assert!(!Path::new(&format!("/run/netns/{host_ns}")).exists());
}
