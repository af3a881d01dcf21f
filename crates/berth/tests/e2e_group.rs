//! Redundancy groups end to end: container members behind a service
//! address (VIP) that a client on the uplink side uses continuously, while
//! members fail, are updated (also by a broken update and across a daemon
//! kill -9), and the group is scaled. Every request counts.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use berth_testkit::{Cap, Load, LoadReport, busybox_rootfs, require, unique_tag, wait_until};
use common::{Berth, spec};

const CAPS: &[Cap] = &[Cap::Root, Cap::Netns, Cap::Nspawn, Cap::Nft, Cap::Curl];

/// A group spec: `replicas` busybox httpd members that answer with their
/// hostname then `version`; `extra` goes into `[group.NAME]`.
fn group_spec(b: &Berth, o: u8, name: &str, replicas: u32, version: &str, extra: &str) -> String {
    let rootfs = busybox_rootfs();
    let serve = if version == "broken" {
        // Never answers HTTP: the update cannot become healthy.
        "exec sleep 100000".to_string()
    } else {
        format!(
            "mkdir -p /tmp/w && {{ hostname; echo {version}; }} > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w"
        )
    };
    spec(
        b.net.uplink(),
        o,
        &format!(
            r#"[group.{name}]
replicas = {replicas}
index_base = 10
vip4 = "10.{o}.1.10"
vip6 = "fd42:{o:x}:1::10"
{mht}
healthy_deadline = "8s"
drain_time = "1s"      # generous: the suite runs many tests at once
{extra}

[group.{name}.template]
kind = "container"
rootfs = "{}"
ephemeral = true
stop_timeout = "2s"
command = ["/bin/sh", "-c", "{serve}"]
health = {{ http = "http://{{addr}}:80/", expect = 200, interval = "100ms", timeout = "500ms", healthy_after = 2, unhealthy_after = 2 }}
"#,
            rootfs.display(),
            mht = if extra.contains("min_healthy_time") {
                ""
            } else {
                "min_healthy_time = \"300ms\""
            },
        ),
    )
}

/// Routes the VIPs' networks from the "internet" side to the host's uplink.
fn route_vip_from_inet(b: &Berth, o: u8) {
    b.route_from_inet(&format!("10.{o}.1.0/24"), b.net.uplink_addr());
    b.route_from_inet(&format!("fd42:{o:x}:1::/64"), b.net.host_addr6());
}

fn vip(o: u8) -> SocketAddr {
    SocketAddr::from(([10, o, 1, 10], 80))
}

fn load(b: &Berth, o: u8) -> Load {
    Load::start(
        b.net.inet_ns(),
        vip(o),
        Duration::from_secs(2),
        200_000,
        Duration::from_secs(240),
    )
}

/// The first line answered on the VIP from the uplink side, once it answers.
fn wait_vip(b: &Berth, o: u8, want: &str) -> String {
    wait_vip_within(b, o, want, Duration::from_secs(30))
}

fn wait_vip_within(b: &Berth, o: u8, want: &str, within: Duration) -> String {
    let got = wait_until(within, Duration::from_millis(50), || {
        berth_testkit::in_netns(b.net.inet_ns(), || {
            berth_testkit::get(vip(o), Duration::from_secs(1)).ok()
        })
        .ok()
        .flatten()
        // The hostname nspawn gives a container is `berth-<name>`.
        .map(|body| body.trim_start_matches("berth-").to_owned())
        .filter(|body| body.contains(want))
    });
    got.unwrap_or_else(|| {
        panic!(
            "VIP {} never answered with {want:?}; daemon log:\n{}",
            vip(o),
            b.daemon_log()
        )
    })
}

fn apply(b: &Berth, file: &str) -> (bool, String) {
    let out = b.cli(&["apply", "--yes", file]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `berth plan` says the update rolls with the service up; `berth apply`
/// under continuous load loses no request.
fn rolling_update_under_load(b: &Berth, o: u8, file: &str, what: &str) {
    let plan = b.cli_ok(&["plan", file]);
    assert!(
        plan.contains("rolling update") && plan.contains("stays up"),
        "{plan}"
    );
    let l = load(b, o);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = apply(b, file);
    std::thread::sleep(Duration::from_millis(300));
    let r = l.stop();
    assert!(ok, "{out}");
    no_failures(what, &r);
}

/// Waits until every guest's probe says healthy; panics with `ps` if not.
fn all_healthy(b: &Berth, within: Duration) {
    let ok = wait_until(within, Duration::from_millis(50), || {
        b.ps()
            .iter()
            .all(|x| x.health.as_deref() == Some("healthy"))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "not all healthy within {within:?}: {:?}",
        b.ps()
    );
}

fn no_failures(what: &str, r: &LoadReport) {
    eprintln!("{what}: {}", r.summary());
    assert!(r.sent() > 20, "{what}: too few requests: {}", r.summary());
    assert_eq!(r.failed(), 0, "{what}: {}", r.summary());
}

#[test]
fn group_vip_failover_rolling_update_revert_scale() {
    if !require("group_vip_failover_rolling_update_revert_scale", CAPS) {
        return;
    }
    let tag = unique_tag("gr");
    let o = 71;
    let b = Berth::new(&tag);
    route_vip_from_inet(&b, o);
    let g = tag.replace('-', "");
    let (m0, m1, m2) = (format!("{g}-0"), format!("{g}-1"), format!("{g}-2"));

    // Two members behind the VIP.
    let file = b.write("v1.toml", &group_spec(&b, o, &g, 2, "v1", ""));
    let file = file.to_str().expect("utf8");
    let plan = b.cli_ok(&["plan", file]);
    assert!(plan.contains(&m0) && plan.contains(&m1), "{plan}");
    let (ok, out) = apply(&b, file);
    assert!(ok, "{out}");
    // Active mode: the first member to turn healthy gets the VIP and keeps it.
    let first = wait_vip(&b, o, "");
    let (active, standby) = if first == m0 {
        (m0.clone(), m1.clone())
    } else {
        (m1.clone(), m0.clone())
    };
    assert_eq!(first, active);
    let ps = b.ps();
    let p0 = ps.iter().find(|x| x.name == active).expect("active member");
    assert_eq!(p0.group.as_deref(), Some(g.as_str()));
    assert!(p0.serving.contains(&format!("10.{o}.1.10")), "{p0:?}");
    all_healthy(&b, Duration::from_secs(10));

    // Unplanned failure: kill -9 the serving member's process tree leader.
    let l = load(&b, o);
    std::thread::sleep(Duration::from_millis(300));
    let pid = p0.pid.expect("pid");
    let killed = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let moved = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        berth_testkit::in_netns(b.net.inet_ns(), || {
            berth_testkit::get(vip(o), Duration::from_millis(300)).ok()
        })
        .ok()
        .flatten()
        .filter(|body| body.ends_with(&format!("-{standby}")))
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = l.stop();
    assert!(
        moved.is_some(),
        "VIP did not move to {standby}: {}\ndaemon log:\n{}",
        r.summary(),
        b.daemon_log()
    );
    eprintln!(
        "failover: first answer from {standby} {:?} after kill -9 of {active}; {}",
        r.first_after(killed, &standby),
        r.summary()
    );
    // The timeline around the kill, runs of equal outcomes folded.
    let mut last = String::new();
    for smp in r.samples.iter().filter(|x| x.at >= killed) {
        let what = match &smp.body {
            Ok(b) => b.clone(),
            Err(e) => e.clone(),
        };
        if what != last {
            eprintln!("  +{:?}: {what}", smp.at.duration_since(killed));
            last = what;
        }
    }
    for l in b
        .daemon_log()
        .lines()
        .filter(|l| l.contains("health") || l.contains("service address"))
    {
        eprintln!("daemon: {l}");
    }
    // The killed member comes back (restart policy) and turns healthy; the
    // VIP stays where it is (active mode does not flap back).
    assert!(
        wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            (b.guest(&active).health.as_deref() == Some("healthy")).then_some(())
        })
        .is_some(),
        "{:?}",
        b.guest(&active)
    );
    assert_eq!(b.guest(&standby).serving.len(), 2, "both VIPs stay on it");

    // Rolling update under load: zero failed requests.
    let v2 = b.write("v2.toml", &group_spec(&b, o, &g, 2, "v2", ""));
    rolling_update_under_load(&b, o, v2.to_str().expect("utf8"), "rolling update");
    wait_vip(&b, o, "");
    for m in [&m0, &m1] {
        let pid = b.guest(m).pid.expect("pid");
        let out = std::process::Command::new("nsenter")
            .args([
                &format!("--net=/proc/{pid}/ns/net"),
                "curl",
                "-sS",
                "http://127.0.0.1/",
            ])
            .output()
            .expect("curl");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("v2"),
            "{m}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // A broken update: the first member never becomes healthy; berth
    // reverts it and the service never goes down.
    let bad = b.write("bad.toml", &group_spec(&b, o, &g, 2, "broken", ""));
    let bad = bad.to_str().expect("utf8");
    let l = load(&b, o);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = apply(&b, bad);
    std::thread::sleep(Duration::from_millis(300));
    let r = l.stop();
    assert!(!ok, "a broken update must fail: {out}");
    assert!(out.contains("reverted"), "{out}");
    if r.failed() > 0 {
        eprintln!("{out}");
        for l in b.daemon_log().lines().filter(|l| {
            l.contains("health") || l.contains("service address") || l.contains("resum")
        }) {
            eprintln!("daemon: {l}");
        }
        let t0 = r.samples.first().map(|x| x.at);
        for x in r.samples.iter().filter(|x| x.body.is_err()) {
            eprintln!(
                "failed at +{:?}: {:?}",
                t0.map(|t| x.at.duration_since(t)),
                x.body
            );
        }
    }
    no_failures("broken update", &r);
    // Both members back on v2 and healthy.
    all_healthy(&b, Duration::from_secs(15));

    // Scale 2 -> 3 -> 1 under load.
    let l = load(&b, o);
    std::thread::sleep(Duration::from_millis(300));
    let three = b.write("v2x3.toml", &group_spec(&b, o, &g, 3, "v2", ""));
    let three = three.to_str().expect("utf8");
    let plan = b.cli_ok(&["plan", three]);
    assert!(
        plan.contains(&m2) && plan.contains("1 to create") && !plan.contains("restart"),
        "scaling up touches only the new member: {plan}"
    );
    let (ok, out) = apply(&b, three);
    assert!(ok, "{out}");
    all_healthy(&b, Duration::from_secs(15));
    let one = b.write("v2x1.toml", &group_spec(&b, o, &g, 1, "v2", ""));
    let one = one.to_str().expect("utf8");
    let plan = b.cli_ok(&["plan", one]);
    let d1 = plan.find(&format!("- {m1}")).or_else(|| plan.find(&m1));
    let d2 = plan.find(&m2);
    assert!(
        d1.is_some() && d2.is_some() && d2 < d1,
        "highest first: {plan}"
    );
    let (ok, out) = apply(&b, one);
    std::thread::sleep(Duration::from_millis(300));
    let r = l.stop();
    assert!(ok, "{out}");
    no_failures("scale 2 -> 3 -> 1", &r);
    let names: Vec<String> = b.ps().into_iter().map(|x| x.name).collect();
    assert_eq!(names, vec![m0.clone()]);
    assert_eq!(wait_vip(&b, o, ""), m0);

    // The IPv6 service address answers too.
    let v6: SocketAddr = format!("[fd42:{o:x}:1::10]:80").parse().expect("vip6");
    let got = berth_testkit::in_netns(b.net.inet_ns(), || {
        berth_testkit::get(v6, Duration::from_secs(2))
    })
    .expect("netns");
    assert!(got.as_deref().is_ok_and(|x| x.ends_with(&m0)), "{got:?}");

    // berth drain withdraws the VIPs from this host; --undo brings them back.
    let out = b.cli_ok(&["drain"]);
    assert!(out.contains("host drained"), "{out}");
    let gone = berth_testkit::in_netns(b.net.inet_ns(), || {
        berth_testkit::get(vip(o), Duration::from_millis(500))
    })
    .expect("netns");
    assert!(gone.is_err(), "VIP still answers after drain: {gone:?}");
    assert_eq!(b.guest(&m0).drained.as_deref(), Some("host"));
    assert_eq!(b.guest(&m0).state, "running", "drain keeps guests running");
    b.cli_ok(&["drain", "--undo"]);
    assert_eq!(wait_vip(&b, o, ""), m0);
}

#[test]
fn group_ecmp_spreads_over_healthy_members() {
    if !require("group_ecmp_spreads_over_healthy_members", CAPS) {
        return;
    }
    let tag = unique_tag("ge");
    let o = 74;
    let b = Berth::new(&tag);
    route_vip_from_inet(&b, o);
    let g = tag.replace('-', "");
    let (m0, m1) = (format!("{g}-0"), format!("{g}-1"));
    let file = b.write(
        "ecmp.toml",
        &group_spec(&b, o, &g, 2, "v1", "mode = \"ecmp\""),
    );
    let (ok, out) = apply(&b, file.to_str().expect("utf8"));
    assert!(ok, "{out}");
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            (b.ps().iter().filter(|x| !x.serving.is_empty()).count() == 2).then_some(())
        })
        .is_some(),
        "both members carry the VIP: {:?}",
        b.ps()
    );
    // Flows are hashed over both (source ports differ per connection).
    let l = load(&b, o);
    std::thread::sleep(Duration::from_secs(2));
    let r = l.stop();
    no_failures("ecmp", &r);
    let by = r.by_body();
    assert!(
        by.keys().any(|k| k.ends_with(&m0)) && by.keys().any(|k| k.ends_with(&m1)),
        "{}",
        r.summary()
    );
    // A member stopped by hand leaves the multipath route first: no
    // request fails.
    let l = load(&b, o);
    std::thread::sleep(Duration::from_millis(300));
    b.cli_ok(&["stop", &m0]);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            (b.guest(&m1).serving.len() == 2 && b.guest(&m0).serving.is_empty()).then_some(())
        })
        .is_some(),
        "{:?}",
        b.ps()
    );
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let r = l.stop();
    no_failures("ecmp while a member is stopped", &r);
    assert!(
        r.samples
            .iter()
            .filter(|x| x.at > t)
            .all(|x| x.body.as_ref().is_ok_and(|k| k.ends_with(&m1))),
        "{}",
        r.summary()
    );
}

/// The page a member serves, fetched from the host namespace.
fn member_page(b: &Berth, o: u8, index: u32) -> String {
    b.curl(&format!("http://10.{o}.0.{index}/"))
        .unwrap_or_default()
}

#[test]
fn group_companions_and_rollout_resumed_after_daemon_kill() {
    if !require(
        "group_companions_and_rollout_resumed_after_daemon_kill",
        CAPS,
    ) {
        return;
    }
    let tag = unique_tag("gc");
    let o = 72;
    let mut b = Berth::new(&tag);
    route_vip_from_inet(&b, o);
    let g = tag.replace('-', "");
    let (m0, m1) = (format!("{g}-0"), format!("{g}-1"));
    let (c0, c1) = (format!("{m0}-db"), format!("{m1}-db"));
    let rootfs = busybox_rootfs();
    let companion = format!(
        r#"
[[group.{g}.template.companions]]
name = "db"
index_base = 20
kind = "container"
rootfs = "{}"
ephemeral = true
stop_timeout = "1s"
command = ["/bin/sh", "-c", "exec sleep 100000"]
"#,
        rootfs.display()
    );
    // A slower health check on the update makes the rollout last long
    // enough to kill the daemon in the middle of it.
    let with = |b: &Berth, version: &str, extra: &str| {
        let mut s = group_spec(b, o, &g, 2, version, extra);
        s.push_str(&companion);
        s
    };
    let v1 = b.write("v1.toml", &with(&b, "v1", ""));
    let (ok, out) = apply(&b, v1.to_str().expect("utf8"));
    assert!(ok, "{out}");
    let names: Vec<String> = b.ps().into_iter().map(|x| x.name).collect();
    for n in [&m0, &m1, &c0, &c1] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    wait_vip(&b, o, "");

    // An ephemeral companion starts from a clean state on every restart.
    let out = b.cli_ok(&[
        "exec",
        &c0,
        "--",
        "sh",
        "-c",
        "echo x > /var/state && cat /var/state",
    ]);
    assert_eq!(out.trim(), "x");
    b.cli_ok(&["restart", &c0]);
    let out = b.cli(&["exec", &c0, "--", "cat", "/var/state"]);
    assert!(
        !out.status.success(),
        "state survived a restart of an ephemeral companion"
    );

    // The rollout restarts each member's companion with it; the daemon is
    // killed half-way and the next daemon finishes the job.
    let started = |b: &Berth, n: &str| b.guest(n).started_at;
    let before: Vec<Option<u64>> = [&m0, &m1, &c0, &c1]
        .iter()
        .map(|n| started(&b, n))
        .collect();
    std::thread::sleep(Duration::from_millis(1100)); // started_at has 1 s resolution
    let v2 = b.write("v2.toml", &with(&b, "v2", "min_healthy_time = \"2s\""));
    let l = load(&b, o);
    std::thread::sleep(Duration::from_millis(300));
    let apply_log = b.dir.path().join("apply.log");
    let log = std::fs::File::create(&apply_log).expect("apply log");
    let mut client = b
        .cmd(&["apply", "--yes", v2.to_str().expect("utf8")])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("apply");
    // Wait until the first member runs v2 (it then waits out min_healthy_time).
    let midway = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        member_page(&b, o, 10).contains("v2").then_some(())
    });
    assert!(
        midway.is_some(),
        "the rollout never reached {m0}: {}\n{}",
        std::fs::read_to_string(&apply_log).unwrap_or_default(),
        b.daemon_log()
    );
    b.kill_daemon();
    let _ = client.wait();
    // Nothing moves while no daemon runs: the VIP keeps serving.
    std::thread::sleep(Duration::from_millis(500));
    b.start_daemon();
    let done = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        (member_page(&b, o, 10).contains("v2")
            && member_page(&b, o, 11).contains("v2")
            && b.ps().iter().all(|x| x.drained.is_none()))
        .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = l.stop();
    assert!(
        done.is_some(),
        "the rollout was not resumed: {:?}\n{}",
        b.ps(),
        b.daemon_log()
    );
    assert!(
        b.daemon_log().contains("resuming the interrupted apply"),
        "{}",
        b.daemon_log()
    );
    no_failures("rollout across a daemon kill -9", &r);
    let after: Vec<Option<u64>> = [&m0, &m1, &c0, &c1]
        .iter()
        .map(|n| started(&b, n))
        .collect();
    for (i, n) in [&m0, &m1, &c0, &c1].iter().enumerate() {
        assert_ne!(before[i], after[i], "{n} was not restarted by the rollout");
    }
    // Nothing left to do.
    let plan = b.cli_ok(&["plan", v2.to_str().expect("utf8")]);
    assert!(plan.contains("No changes"), "{plan}");
}

#[test]
fn group_of_vms_behind_a_vip() {
    let caps = [CAPS, &[Cap::Qemu]].concat();
    if !require("group_of_vms_behind_a_vip", &caps) {
        return;
    }
    let fx = berth_testkit::vm_fixture().expect("VM fixture (kernel + initrd)");
    let tag = unique_tag("gv");
    let o = 73;
    let b = Berth::new(&tag);
    route_vip_from_inet(&b, o);
    let g = tag.replace('-', "");
    let (m0, m1) = (format!("{g}-0"), format!("{g}-1"));
    let vm_group = |rev: u32| {
        spec(
            b.net.uplink(),
            o,
            &format!(
                r#"[group.{g}]
replicas = 2
index_base = 10
vip4 = "10.{o}.1.10"
min_healthy_time = "500ms"
healthy_deadline = "180s"
drain_time = "300ms"

[group.{g}.template]
kind = "vm"
accel = "tcg"
kernel = "{}"
initrd = "{}"
cmdline = "console=ttyS0 panic=-1 berth.rev={rev}"
memory = "256M"
stop_timeout = "2s"
health = {{ http = "http://{{addr}}:80/", interval = "200ms", timeout = "1s", healthy_after = 2, unhealthy_after = 2 }}
"#,
                fx.kernel.display(),
                fx.initrd.display()
            ),
        )
    };
    let v1 = b.write("v1.toml", &vm_group(1));
    let (ok, out) = apply(&b, v1.to_str().expect("utf8"));
    assert!(ok, "{out}");
    // The VM members add the VIP to their loopback from berth.vip4= and
    // answer for it.
    let first = wait_vip_within(&b, o, "vm-fixture", Duration::from_secs(240));
    assert!(first.contains(&g), "{first}");
    all_healthy(&b, Duration::from_secs(240));

    // Rolling update of the VMs (a kernel command line change restarts
    // them) under load: no failed request.
    let v2 = b.write("v2.toml", &vm_group(2));
    rolling_update_under_load(&b, o, v2.to_str().expect("utf8"), "rolling update of VMs");
    all_healthy(&b, Duration::from_secs(240));

    // kill -9 of the serving member's QEMU: the VIP moves to the other VM.
    let serving = b
        .ps()
        .into_iter()
        .find(|x| !x.serving.is_empty())
        .expect("a member carries the VIP");
    let other = if serving.name == m0 { &m1 } else { &m0 };
    // A request in flight to the killed VM is lost; a short client timeout
    // shows when answers resume.
    let l = Load::start(
        b.net.inet_ns(),
        vip(o),
        Duration::from_millis(500),
        100_000,
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    let pid = serving.pid.expect("qemu pid");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let moved = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        b.guest(other).serving.first().cloned()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let r = l.stop();
    assert!(
        moved.is_some(),
        "VIP did not move to {other}: {}",
        r.summary()
    );
    eprintln!(
        "VM failover: first answer from {other} {:?} after kill -9 of {}'s QEMU; {}",
        r.first_after(killed, other),
        serving.name,
        r.summary()
    );
}

#[test]
fn health_probes_on_a_plain_guest_tcp_and_exec() {
    if !require("health_probes_on_a_plain_guest_tcp_and_exec", CAPS) {
        return;
    }
    let tag = unique_tag("gh");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let (t, x) = (format!("{tag}-t"), format!("{tag}-x"));
    let guests = format!(
        r#"[guest.{t}]
kind = "container"
index = 2
rootfs = "{r}"
ephemeral = true
command = ["/bin/sh", "-c", "exec httpd -f -p 80 -h /www"]
health = {{ tcp = 80, interval = "100ms" }}

[guest.{x}]
kind = "container"
index = 3
rootfs = "{r}"
ephemeral = true
command = ["/bin/sh", "-c", "touch /tmp/ok; exec sleep 100000"]
health = {{ exec = ["test", "-f", "/tmp/ok"], interval = "200ms", timeout = "2s", unhealthy_after = 1 }}
"#,
        r = rootfs.display()
    );
    let file = b.write("h.toml", &spec(b.net.uplink(), 75, &guests));
    let (ok, out) = apply(&b, file.to_str().expect("utf8"));
    assert!(ok, "{out}");
    let health = |n: &str| b.guest(n).health;
    let until = |n: &str, want: &str| {
        wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            (health(n).as_deref() == Some(want)).then_some(())
        })
        .is_some()
    };
    assert!(until(&t, "healthy"), "{:?}", b.guest(&t));
    assert!(until(&x, "healthy"), "{:?}", b.guest(&x));
    // The exec probe fails once the file is gone; the event is logged.
    b.cli_ok(&["exec", &x, "--", "rm", "/tmp/ok"]);
    assert!(until(&x, "unhealthy"), "{:?}", b.guest(&x));
    assert!(
        b.guest(&x)
            .health_error
            .is_some_and(|e| e.contains("exec exited 1"))
    );
    let events = b.cli_ok(&["logs", "--supervisor", &x]);
    assert!(events.contains("health healthy -> unhealthy"), "{events}");
    // A stopped guest is down.
    b.cli_ok(&["stop", &t]);
    assert!(until(&t, "down"), "{:?}", b.guest(&t));
    // Changing the probe is live: nothing restarts.
    let file = b.write(
        "h2.toml",
        &spec(
            b.net.uplink(),
            75,
            &guests.replace("interval = \"100ms\"", "interval = \"300ms\""),
        ),
    );
    let plan = b.cli_ok(&["plan", file.to_str().expect("utf8")]);
    assert!(
        plan.contains("health") && plan.contains("applies live"),
        "{plan}"
    );
}
