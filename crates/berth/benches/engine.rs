//! `cargo bench -p berth --bench engine` (as root): berth next to a baseline
//! measured in the same run.
//!
//! 1. apply → container answers HTTP, vs the same rootfs started by a raw
//!    `systemd-nspawn` with the same argv, init helper and network setup
//!    (the host configures both veth ends through the leader's netns, exactly
//!    like berth's shim), so the difference is berth's own machinery: CLI,
//!    API, planner, store, supervisor.
//! 2. 16 containers applied at once vs one.
//! 3. RSS of the idle daemon and of each shim.
//!
//! Prints a table; nothing is asserted. Environment: BENCH_RUNS (default 7).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{Cap, busybox_rootfs, in_netns, require, unique_tag};
use common::{Berth, container, spec};
use support::{anon_kib, median, ms, pss_kib, rss_kib, timed};

/// Starts raw systemd-nspawn containers (indexes `indexes`), each set up the
/// way berth's shim does it (same argv, init helper, network setup), in
/// parallel; returns their nspawn processes.
fn raw_nspawn(
    b: &Berth,
    rootfs: &std::path::Path,
    work: &std::path::Path,
    tag: &str,
    indexes: &[u32],
) -> Vec<std::process::Child> {
    let init = berth_container::init::install(work).expect("install init");
    std::thread::scope(|s| {
        let hs: Vec<_> = indexes
            .iter()
            .map(|&i| {
                let init = init.clone();
                s.spawn(move || {
                    let sync = work.join(format!("sync-{i}"));
                    std::fs::create_dir_all(&sync).expect("sync dir");
                    let _ = std::fs::remove_file(sync.join("ready"));
                    let argv = berth_container::nspawn_argv(&berth_container::NspawnConfig {
                        machine: format!("{tag}-raw{i}"),
                        rootfs: rootfs.to_path_buf(),
                        command: vec![
                            "/bin/sh".into(),
                            "-c".into(),
                            "exec httpd -f -p 80 -h /www".into(),
                        ],
                        env: Default::default(),
                        init,
                        sync_dir: sync.clone(),
                        ephemeral: true,
                        read_only: false,
                        binds: Vec::new(),
                    });
                    let link = berth_net::GuestLink {
                        name: format!("vb{i}"),
                        guest4: format!("10.64.0.{i}").parse().expect("ip"),
                        host4: "10.64.0.0".parse().expect("ip"),
                        guest6: None,
                        host6: None,
                    };
                    let child = b
                        .net
                        .cmd_in_host(&argv[0])
                        .args(&argv[1..])
                        .envs(berth_container::nspawn_env())
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .process_group(0)
                        .spawn()
                        .expect("nspawn");
                    // nsenter execs nspawn, so the child's PID is nspawn's.
                    let leader = berth_container::process::find_leader(
                        child.id() as i32,
                        Duration::from_secs(30),
                    )
                    .expect("leader");
                    in_netns(b.net.host_ns(), || {
                        berth_net::setup_container_link(&link, leader).expect("link")
                    })
                    .expect("netns");
                    std::fs::write(sync.join("ready"), b"").expect("ready");
                    child
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("raw start"))
            .collect()
    })
}

fn stop_raw(b: &Berth, children: Vec<std::process::Child>, indexes: &[u32]) {
    for mut c in children {
        let _ = Command::new("kill").arg(c.id().to_string()).status();
        let _ = c.wait();
    }
    for i in indexes {
        let _ = in_netns(b.net.host_ns(), || {
            berth_net::delete_link(&format!("vb{i}"))
        });
    }
}

fn main() {
    if !require(
        "bench engine",
        &[Cap::Root, Cap::Netns, Cap::Nspawn, Cap::Nft],
    ) {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let tag = unique_tag("bn");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let uplink = b.net.uplink().to_string();
    let work = b.dir.path().join("raw");

    let one = b.write(
        "one.toml",
        &spec(
            &uplink,
            64,
            &container(&format!("{tag}-one"), 2, &rootfs, ""),
        ),
    );
    let sixteen: String = (0..16)
        .map(|i| container(&format!("{tag}-{i}"), 10 + i, &rootfs, ""))
        .collect();
    let sixteen = b.write("sixteen.toml", &spec(&uplink, 64, &sixteen));
    let empty = b.write("empty.toml", &spec(&uplink, 64, ""));

    // Interleave berth and raw runs so drift on the machine hits both alike.
    let ns = b.net.host_ns().to_string();
    let one_idx = [2u32];
    let many_idx: Vec<u32> = (10..26).collect();
    let one_addr = vec!["10.64.0.2".to_string()];
    let many_addr: Vec<String> = many_idx.iter().map(|i| format!("10.64.0.{i}")).collect();
    let apply = |f: &std::path::Path| {
        b.cmd(&["apply", "--yes", f.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("apply")
    };
    let (mut berth_one, mut raw_one, mut berth_16, mut raw_16) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        berth_one.push(timed(&ns, &one_addr, || apply(&one)).0);
        apply(&empty);
        let (t, kids) = timed(&ns, &one_addr, || {
            raw_nspawn(&b, &rootfs, &work, &tag, &one_idx)
        });
        raw_one.push(t);
        stop_raw(&b, kids, &one_idx);
        if i < runs.div_ceil(2) {
            berth_16.push(timed(&ns, &many_addr, || apply(&sixteen)).0);
            apply(&empty);
            let (t, kids) = timed(&ns, &many_addr, || {
                raw_nspawn(&b, &rootfs, &work, &tag, &many_idx)
            });
            raw_16.push(t);
            stop_raw(&b, kids, &many_idx);
        }
    }

    // Run the 16 again, let the daemon go idle, then read RSS.
    b.cmd(&["apply", "--yes", sixteen.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .status()
        .expect("apply 16");
    std::thread::sleep(Duration::from_secs(2));
    let daemon_rss = b.daemon_pid().map(rss_kib).unwrap_or(0);
    let shim_pids: Vec<u32> = std::fs::read_dir(b.state.join("guests"))
        .expect("guests dir")
        .flatten()
        .filter_map(|e| {
            let s = std::fs::read(e.path().join("status.json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&s).ok()?;
            Some(v["shim_pid"].as_u64()? as u32)
        })
        .collect();
    let mut shim_rss: Vec<u64> = shim_pids.iter().map(|&p| rss_kib(p)).collect();
    shim_rss.sort();

    let (b1, r1, b16, r16) = (
        median(berth_one.clone()),
        median(raw_one.clone()),
        median(berth_16.clone()),
        median(raw_16.clone()),
    );
    let overhead = (b1.as_secs_f64() / r1.as_secs_f64() - 1.0) * 100.0;
    let pss: Vec<u64> = shim_pids.iter().map(|&p| pss_kib(p)).collect();
    let anon: Vec<u64> = shim_pids.iter().map(|&p| anon_kib(p)).collect();
    let mid = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1024.0;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("\nberth engine benchmark ({runs} runs, medians; {cores} CPUs; release build)\n");
    println!("| measurement | berth | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| `apply` → container answers HTTP | {} | {} raw systemd-nspawn, same argv + network setup | {:+.1} % | ≤ +5 % |",
        ms(b1),
        ms(r1),
        overhead
    );
    println!(
        "| 16 containers in one `apply` → all answer | {} | {} one container via berth | {:.2}× | ≤ 2× |",
        ms(b16),
        ms(b1),
        b16.as_secs_f64() / b1.as_secs_f64()
    );
    println!(
        "| 16 raw nspawn started in parallel → all answer | {} | {} one raw | {:.2}× | (machine limit) |",
        ms(r16),
        ms(r1),
        r16.as_secs_f64() / r1.as_secs_f64()
    );
    println!(
        "| daemon RSS, idle, 16 guests | {:.1} MiB (anon {:.1}) | — | — | ≤ 15 MiB |",
        daemon_rss as f64 / 1024.0,
        b.daemon_pid().map(anon_kib).unwrap_or(0) as f64 / 1024.0
    );
    println!(
        "| shim RSS, median of {} | {:.1} MiB (anon {:.1}, PSS {:.1}) | — | — | ≤ 3 MiB |",
        shim_rss.len(),
        mid(&shim_rss),
        mid(&anon),
        mid(&pss)
    );
    println!(
        "\nall runs (ms): berth one {:?}",
        berth_one.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    println!(
        "               raw one   {:?}",
        raw_one.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    println!(
        "               berth 16  {:?}",
        berth_16.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    println!(
        "               raw 16    {:?}",
        raw_16.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
}
