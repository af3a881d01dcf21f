#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{Cap, INTERNET_BODY, TestNet, netns_pids, require, unique_tag, wait_until};

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn testnet_reaches_internet_and_cleans_up() {
    if !require(
        "testnet_reaches_internet_and_cleans_up",
        &[Cap::Root, Cap::Netns, Cap::Curl, Cap::Busybox],
    ) {
        return;
    }
    let tag = unique_tag("tk");
    let net = TestNet::new(&tag).unwrap();
    let (host, inet) = (net.host_ns().to_owned(), net.inet_ns().to_owned());
    assert_eq!(host, format!("bt-{tag}-h"));
    assert!(host.len() <= 15 && inet.len() <= 15);
    assert!(ns_exists(&host) && ns_exists(&inet));
    assert!(listed(&host) && listed(&inet));
    assert_eq!(net.uplink(), "up0");
    assert_eq!(net.internet_addr(), "198.51.100.2");

    let body = net
        .curl_from_host("http://198.51.100.2:8080/", Duration::from_secs(5))
        .unwrap();
    assert_eq!(body, INTERNET_BODY);
    let body6 = net
        .curl_from_host("http://[2001:db8:ffff::2]:8080/", Duration::from_secs(5))
        .unwrap();
    assert_eq!(body6, INTERNET_BODY);

    // The uplink and default routes live only in the host namespace.
    let routes = net.cmd_in_host("ip").args(["route"]).output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("default via 198.51.100.2 dev up0"),
        "{routes}"
    );
    let out = Command::new("ip")
        .args(["link", "show", "up0"])
        .output()
        .unwrap();
    if !out.status.success() {
        // Expected: no up0 in the machine's own namespace. (If some other
        // up0 exists there, it is not ours; nothing to assert.)
        assert!(!out.status.success());
    }

    // The httpd runs in the internet namespace; a stray process in the host
    // namespace must be killed by Drop.
    assert!(!net.pids_in(&inet).is_empty());
    let mut stray = net
        .cmd_in_host("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stray_pid = i32::try_from(stray.id()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            net.pids_in(&host).contains(&stray_pid).then_some(())
        })
        .is_some(),
        "stray sleep never showed up in {host}"
    );

    drop(net);
    assert!(!ns_exists(&host) && !ns_exists(&inet));
    assert!(!listed(&host) && !listed(&inet));
    let status = stray.wait().unwrap();
    assert!(!status.success(), "stray was killed: {status:?}");
}

#[test]
fn testnet_is_removed_on_panic() {
    if !require(
        "testnet_is_removed_on_panic",
        &[Cap::Root, Cap::Netns, Cap::Busybox],
    ) {
        return;
    }
    let tag = unique_tag("tp");
    let names = (format!("bt-{tag}-h"), format!("bt-{tag}-i"));
    let r = std::panic::catch_unwind(|| {
        let _net = TestNet::new(&tag).unwrap();
        assert!(ns_exists(&names.0));
        panic!("test body failed");
    });
    assert!(r.is_err());
    assert!(!ns_exists(&names.0) && !ns_exists(&names.1));
}

#[test]
fn cleanup_stale_removes_leftovers() {
    if !require(
        "cleanup_stale_removes_leftovers",
        &[Cap::Root, Cap::Netns, Cap::Busybox],
    ) {
        return;
    }
    let tag = unique_tag("ts");
    let host = format!("bt-{tag}-h");
    // What a crashed run leaves: a namespace with a process in it.
    assert!(
        Command::new("ip")
            .args(["netns", "add", &host])
            .status()
            .unwrap()
            .success()
    );
    let mut orphan = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{host}"))
        .args(["--", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // nsenter joins the namespace after spawn returns: wait until it has.
    let pid = i32::try_from(orphan.id()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            netns_pids(&host).unwrap().contains(&pid).then_some(())
        })
        .is_some()
    );
    TestNet::cleanup_stale(&tag).unwrap();
    assert!(!ns_exists(&host));
    assert!(!orphan.wait().unwrap().success());
    // Nothing stale: still fine. And a new TestNet with the tag works.
    TestNet::cleanup_stale(&tag).unwrap();
    let net = TestNet::new(&tag).unwrap();
    drop(net);
    assert!(!ns_exists(&host));
}

#[test]
fn bad_tags_are_refused() {
    for tag in ["", "UPPER", "much-too-long", "a/b"] {
        assert!(TestNet::new(tag).is_err(), "{tag:?}");
    }
}
