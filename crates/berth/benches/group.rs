//! `cargo bench -p berth --bench group` (as root): a group behind a service
//! address under continuous HTTP load from the uplink side.
//!
//! 1. Rolling update of a 2-member group (containers, then TCG microVMs):
//!    failed requests out of all sent (goal: 0 of >= 10 000).
//! 2. Unplanned failover: kill -9 of the serving member; time from the kill
//!    to the first answer from the other member (goal <= 300 ms). Measured
//!    in the same run with keepalived (VRRP between two hosts on a bridge,
//!    default and tuned timers) as the baseline.
//! 3. Scale 1 -> 4 -> 1 under load: failed requests (goal 0).
//!
//! Load: BENCH_CLIENTS (default 4) clients, one request at a time each, a
//! new TCP connection per request, 200 ms timeout. Runs: BENCH_RUNS
//! (default 5) failovers per setup. Prints a table; asserts nothing. The
//! VM part is skipped with BENCH_NO_VM=1.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{Cap, Load, LoadReport, busybox_rootfs, require, unique_tag, wait_until};
use common::{Berth, spec};
use support::{median, ms};

const TIMEOUT: Duration = Duration::from_millis(200);

fn clients() -> usize {
    std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Several sequential clients at once; stopped together.
struct Loads(Vec<Load>);

impl Loads {
    fn start(ns: &str, addr: SocketAddr) -> Loads {
        Loads(
            (0..clients())
                .map(|_| Load::start(ns, addr, TIMEOUT, 10_000_000, Duration::from_secs(600)))
                .collect(),
        )
    }

    fn stop(self) -> LoadReport {
        let mut all = LoadReport::default();
        for l in self.0 {
            all.samples.extend(l.stop().samples);
        }
        all.samples.sort_by_key(|s| s.at);
        all
    }
}

fn template(kind: &str, rev: u32) -> String {
    match kind {
        "container" => format!(
            "kind = \"container\"\nrootfs = \"{}\"\nephemeral = true\nstop_timeout = \"2s\"\ncommand = [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/w && {{ hostname; echo rev{rev}; }} > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w\"]\n",
            busybox_rootfs().display()
        ),
        _ => {
            let fx = berth_testkit::vm_fixture().expect("VM fixture");
            format!(
                "kind = \"vm\"\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1 berth.rev={rev}\"\nmemory = \"256M\"\nstop_timeout = \"2s\"\n",
                fx.kernel.display(),
                fx.initrd.display()
            )
        }
    }
}

fn group(b: &Berth, o: u8, name: &str, kind: &str, replicas: u32, rev: u32) -> String {
    spec(
        b.net.uplink(),
        o,
        &format!(
            "[group.{name}]\nreplicas = {replicas}\nindex_base = 10\nvip4 = \"10.{o}.1.10\"\nmin_healthy_time = \"500ms\"\nhealthy_deadline = \"240s\"\ndrain_time = \"300ms\"\n\n[group.{name}.template]\n{}health = {{ http = \"http://{{addr}}:80/\", interval = \"200ms\", timeout = \"500ms\", healthy_after = 2, unhealthy_after = 2 }}\n",
            template(kind, rev)
        ),
    )
}

fn apply(b: &Berth, name: &str, text: &str) {
    let f = b.write(name, text);
    b.cli_ok(&["apply", "--yes", f.to_str().expect("utf8")]);
}

fn all_healthy(b: &Berth, n: usize) {
    let ok = wait_until(Duration::from_secs(300), Duration::from_millis(100), || {
        let ps = b.ps();
        (ps.iter()
            .filter(|g| g.health.as_deref() == Some("healthy"))
            .count()
            == n)
            .then_some(())
    });
    assert!(ok.is_some(), "members not healthy: {:?}", b.ps());
}

struct Row {
    what: String,
    value: String,
    baseline: String,
}

/// Rolling update + failovers + (containers) scaling for one member kind.
fn berth_runs(kind: &str, o: u8, rows: &mut Vec<Row>) {
    let tag = unique_tag(if kind == "vm" { "bv" } else { "bc" });
    let b = Berth::new(&tag);
    b.route_from_inet(&format!("10.{o}.1.0/24"), b.net.uplink_addr());
    let g = tag.replace('-', "");
    let vip = SocketAddr::from(([10, o, 1, 10], 80));
    apply(&b, "v1.toml", &group(&b, o, &g, kind, 2, 1));
    all_healthy(&b, 2);

    // 1. Rolling update under load, repeated until >= 10 000 requests.
    let (mut sent, mut failed, mut took) = (0usize, 0usize, Vec::new());
    let mut rev = 1;
    while sent < 10_000 {
        rev += 1;
        let l = Loads::start(b.net.inet_ns(), vip);
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        apply(&b, &format!("v{rev}.toml"), &group(&b, o, &g, kind, 2, rev));
        took.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        let r = l.stop();
        eprintln!("{kind} rolling update to rev{rev}: {}", r.summary());
        sent += r.sent();
        failed += r.failed();
        all_healthy(&b, 2);
    }
    rows.push(Row {
        what: format!(
            "rolling update, 2 {kind} members ({} updates, median {})",
            took.len(),
            ms(median(took))
        ),
        value: format!("{failed} failed of {sent}"),
        baseline: "-".into(),
    });

    // 2. Unplanned failover.
    let mut times = Vec::new();
    for _ in 0..runs() {
        all_healthy(&b, 2);
        let ps = b.ps();
        let serving = ps
            .iter()
            .find(|x| !x.serving.is_empty())
            .expect("a member serves");
        let other = ps
            .iter()
            .find(|x| x.name != serving.name)
            .expect("the other member")
            .name
            .clone();
        let l = Loads::start(b.net.inet_ns(), vip);
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        let _ = Command::new("kill")
            .args(["-9", &serving.pid.expect("pid").to_string()])
            .status();
        let _ = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            b.guest(&other).serving.first().cloned()
        });
        std::thread::sleep(Duration::from_millis(1000));
        let r = l.stop();
        match r.first_after(killed, &other) {
            Some(d) => times.push(d),
            None => eprintln!("{kind} failover: no answer from {other}: {}", r.summary()),
        }
        eprintln!(
            "{kind} failover {} -> {other}: {:?}; {}",
            serving.name,
            r.first_after(killed, &other),
            r.summary()
        );
        // Let the killed member come back before the next run.
        std::thread::sleep(Duration::from_secs(if kind == "vm" { 10 } else { 1 }));
    }
    let spread = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        match (v.first(), v.last()) {
            (Some(a), Some(z)) => format!(" (min {}, max {})", ms(*a), ms(*z)),
            _ => String::new(),
        }
    };
    rows.push(Row {
        what: format!(
            "failover after kill -9, {kind} ({} runs, median)",
            times.len()
        ),
        value: if times.is_empty() {
            "no answer".into()
        } else {
            format!("{}{}", ms(median(times.clone())), spread(&times))
        },
        baseline: "see keepalived rows".into(),
    });

    // 3. Scale 1 -> 4 -> 1 under load (containers only: VMs take minutes).
    if kind == "container" {
        apply(&b, "one.toml", &group(&b, o, &g, kind, 1, rev));
        all_healthy(&b, 1);
        let l = Loads::start(b.net.inet_ns(), vip);
        std::thread::sleep(Duration::from_millis(300));
        apply(&b, "four.toml", &group(&b, o, &g, kind, 4, rev));
        all_healthy(&b, 4);
        std::thread::sleep(Duration::from_millis(500));
        apply(&b, "one-again.toml", &group(&b, o, &g, kind, 1, rev));
        std::thread::sleep(Duration::from_millis(300));
        let r = l.stop();
        eprintln!("scale 1 -> 4 -> 1: {}", r.summary());
        rows.push(Row {
            what: "scale 1 -> 4 -> 1, containers".into(),
            value: format!("{} failed of {}", r.failed(), r.sent()),
            baseline: "-".into(),
        });
    }
}

/// The keepalived baseline: two "members" (network namespaces) on one
/// bridge in a "router" namespace, VRRP moving the VIP between them, a
/// busybox httpd in each, the client in the router namespace. kill -9 of
/// the master's keepalived and httpd, as a crash would.
struct Vrrp {
    names: Vec<String>,
    dir: tempfile::TempDir,
    procs: Vec<std::process::Child>,
}

impl Drop for Vrrp {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(ns: &str, args: &[&str]) {
    let st = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .status()
        .expect("ip");
    assert!(st.success(), "ip -n {ns} {args:?}");
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn keepalived_failover(advert: &str, tag: &str) -> Vec<Duration> {
    let r = format!("ka{tag}r");
    let members = [format!("ka{tag}1"), format!("ka{tag}2")];
    let mut v = Vrrp {
        names: vec![r.clone(), members[0].clone(), members[1].clone()],
        dir: tempfile::tempdir().expect("tempdir"),
        procs: Vec::new(),
    };
    for n in &v.names {
        let _ = Command::new("ip").args(["netns", "del", n]).status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .expect("ip")
                .success()
        );
        ip(n, &["link", "set", "lo", "up"]);
    }
    ip(&r, &["link", "add", "br0", "type", "bridge"]);
    ip(&r, &["addr", "add", "10.90.0.1/24", "dev", "br0"]);
    ip(&r, &["link", "set", "br0", "up"]);
    let vip: SocketAddr = "10.90.0.100:80".parse().expect("vip");
    for (i, m) in members.iter().enumerate() {
        let (host_end, peer) = (format!("p{i}"), format!("e{i}"));
        ip(
            &r,
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", &peer, "netns", m,
            ],
        );
        ip(&r, &["link", "set", &host_end, "master", "br0", "up"]);
        ip(
            m,
            &[
                "addr",
                "add",
                &format!("10.90.0.{}/24", 11 + i),
                "dev",
                &peer,
            ],
        );
        ip(m, &["link", "set", &peer, "up"]);
        let www = v.dir.path().join(format!("www{i}"));
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("index.html"), format!("{m}\n")).expect("index");
        let conf = v.dir.path().join(format!("k{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id {m}\n  vrrp_version 3\n  script_user root\n  enable_script_security\n}}\nvrrp_instance VI {{\n  state {}\n  interface {peer}\n  virtual_router_id 51\n  priority {}\n  advert_int {advert}\n  virtual_ipaddress {{\n    10.90.0.100/24\n  }}\n}}\n",
                if i == 0 { "MASTER" } else { "BACKUP" },
                150 - 50 * i
            ),
        )
        .expect("conf");
        let (ka, httpd) = spawn_member(&v, i, m);
        v.procs.push(ka);
        v.procs.push(httpd);
    }
    let serve = |who: &str| {
        wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            berth_testkit::in_netns(&r, || berth_testkit::get(vip, TIMEOUT).ok())
                .ok()
                .flatten()
                .filter(|b| b.contains(who))
        })
        .is_some()
    };
    let mut times = Vec::new();
    for run in 0..runs() {
        // Master back on k1 (it preempts when it comes back).
        if run > 0 {
            ip(&members[0], &["link", "set", "e0", "up"]);
            let (ka, httpd) = spawn_member(&v, 0, &members[0]);
            v.procs[0] = ka;
            v.procs[1] = httpd;
        }
        assert!(serve(&members[0]), "keepalived: VIP not on {}", members[0]);
        std::thread::sleep(Duration::from_millis(1500));
        let l = Loads::start(&r, vip);
        std::thread::sleep(Duration::from_millis(300));
        // A crash: every process of the master at once (keepalived's
        // parent, its VRRP child and httpd), so nothing sends a "priority
        // 0" goodbye.
        let pids = berth_testkit::netns_pids(&members[0]).unwrap_or_default();
        let killed = Instant::now();
        let _ = Command::new("kill")
            .arg("-9")
            .args(pids.iter().map(|p| p.to_string()))
            .status();
        // ...and its network goes with it, as when a VM or host dies (a
        // live kernel would go on answering ARP for the VIP it still holds).
        ip(&members[0], &["link", "set", "e0", "down"]);
        for p in v.procs.iter_mut().take(2) {
            let _ = p.wait();
        }
        let _ = serve(&members[1]);
        std::thread::sleep(Duration::from_millis(500));
        let rep = l.stop();
        match rep.first_after(killed, &members[1]) {
            Some(d) => times.push(d),
            None => eprintln!(
                "keepalived: no answer from {}: {}",
                members[1],
                rep.summary()
            ),
        }
        eprintln!(
            "keepalived advert_int {advert}: {:?}; {}",
            rep.first_after(killed, &members[1]),
            rep.summary()
        );
    }
    times
}

/// keepalived and httpd of member `i` (namespace `m`), from the files in
/// the rig's directory.
fn spawn_member(v: &Vrrp, i: usize, m: &str) -> (std::process::Child, std::process::Child) {
    let conf = v.dir.path().join(format!("k{i}.conf"));
    let pid = |s: &str| v.dir.path().join(format!("{s}{i}.pid"));
    let _ = std::fs::remove_file(pid("ka"));
    let _ = std::fs::remove_file(pid("vrrp"));
    let ka = in_ns(m, "keepalived")
        .args(["-n", "-l", "-P", "-f"])
        .arg(&conf)
        .arg("-p")
        .arg(pid("ka"))
        .arg("-r")
        .arg(pid("vrrp"))
        .spawn()
        .expect("keepalived (apt-get install keepalived)");
    let httpd = in_ns(m, "busybox")
        .args(["httpd", "-f", "-p", "80", "-h"])
        .arg(v.dir.path().join(format!("www{i}")))
        .spawn()
        .expect("busybox httpd");
    (ka, httpd)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut caps = vec![Cap::Root, Cap::Netns, Cap::Nspawn, Cap::Nft, Cap::Curl];
    if !require("bench group", &caps) {
        return;
    }
    let mut rows = Vec::new();
    berth_runs("container", 81, &mut rows);
    caps.push(Cap::Qemu);
    if std::env::var_os("BENCH_NO_VM").is_none() && require("bench group (VMs)", &caps) {
        berth_runs("vm", 82, &mut rows);
    }
    let have_keepalived = Command::new("keepalived")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if have_keepalived {
        let tag = format!("{}", std::process::id() % 1000);
        for (advert, label) in [
            ("1", "default timers (advert_int 1)"),
            ("0.1", "tuned (advert_int 0.1)"),
        ] {
            let t = keepalived_failover(advert, &tag);
            rows.push(Row {
                what: format!(
                    "failover after kill -9, keepalived {label} ({} runs, median)",
                    t.len()
                ),
                value: "-".into(),
                baseline: if t.is_empty() {
                    "no answer".into()
                } else {
                    ms(median(t))
                },
            });
        }
    } else {
        eprintln!("keepalived not installed: no baseline (apt-get install keepalived)");
    }
    println!(
        "\n{:<72} {:>28} {:>22}",
        "group benchmark", "berth", "baseline"
    );
    for r in rows {
        println!("{:<72} {:>28} {:>22}", r.what, r.value, r.baseline);
    }
}
