//! `cargo bench -p berth --bench vm` (as root, TCG): berth next to raw QEMU.
//!
//! 1. apply → microVM answers HTTP, vs the same `qemu-system-x86_64` command
//!    line (built by the same `berth_vm::qemu_argv`, same kernel command
//!    line, same tap set up the same way) started directly by the benchmark.
//! 2. 4 VMs in one apply vs one.
//! 3. RSS of a VM's shim and of its QEMU.
//!
//! Prints a table; nothing is asserted. BENCH_RUNS (default 3).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::process::Stdio;
use std::time::Duration;

use berth_testkit::{Cap, in_netns, require, unique_tag, vm_fixture};
use common::{Berth, spec};
use support::{anon_kib, median, ms, pss_kib, rss_kib, timed};

fn vm_spec(name: &str, index: u32, fx: &berth_testkit::VmFixture) -> String {
    format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = {index}\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1\"\nmemory = \"256M\"\nstop_timeout = \"1s\"\n",
        fx.kernel.display(),
        fx.initrd.display()
    )
}

/// Raw QEMU with the argv berth would use, on a tap set up like berth's.
fn raw_qemu(b: &Berth, fx: &berth_testkit::VmFixture, index: u32) -> std::process::Child {
    let link = berth_net::GuestLink {
        name: format!("vb{index}"),
        guest4: format!("10.74.0.{index}").parse().expect("ip"),
        host4: "10.74.0.0".parse().expect("ip"),
        guest6: None,
        host6: None,
    };
    let tap = in_netns(b.net.host_ns(), || {
        let tap = berth_vm::open_tap(&link.name).expect("tap");
        berth_net::setup_host_side(&link).expect("host side");
        tap
    })
    .expect("netns");
    let qmp = b.dir.path().join(format!("raw-{index}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let cmdline = format!(
        "console=ttyS0 panic=-1 ip={}::{}:255.255.255.255:raw:eth0:off tsc_early_khz={}",
        link.guest4,
        link.host4,
        berth_vm::host_tsc_khz().unwrap_or(0)
    );
    let argv = berth_vm::qemu_argv(&berth_vm::VmConfig {
        name: format!("raw{index}"),
        machine: berth_vm::Machine::Microvm,
        accel: berth_vm::Accel::Tcg,
        cpus: 1,
        memory_mib: 256,
        kernel: Some(fx.kernel.clone()),
        initrd: Some(fx.initrd.clone()),
        cmdline: Some(cmdline),
        disks: vec![],
        cdrom: None,
        firmware: berth_vm::Firmware::Bios,
        ovmf_code: None,
        ovmf_vars: None,
        hugepages: false,
        mac: berth_vm::mac_for_index(index),
        tap_fd: 3,
        nics: vec![],
        qmp_socket: qmp,
        serial_socket: None,
        exec_socket: None,
        qga_socket: None,
        runas: Some(berth_vm::QEMU_USER.into()),
        sandbox: true,
    });
    let mut cmd = b.net.cmd_in_host(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    berth_vm::inherit_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&tap), 3);
    let child = cmd.spawn().expect("qemu");
    drop(tap);
    child
}

fn main() {
    if !require("bench vm", &[Cap::Root, Cap::Netns, Cap::Nft, Cap::Qemu]) {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("bv");
    let b = Berth::new(&tag);
    let uplink = b.net.uplink().to_string();
    let ns = b.net.host_ns().to_string();
    let one = b.write(
        "one.toml",
        &spec(&uplink, 74, &vm_spec(&format!("{tag}-one"), 2, &fx)),
    );
    let four: String = (0..4)
        .map(|i| vm_spec(&format!("{tag}-{i}"), 10 + i, &fx))
        .collect();
    let four = b.write("four.toml", &spec(&uplink, 74, &four));
    let empty = b.write("empty.toml", &spec(&uplink, 74, ""));
    let apply = |f: &std::path::Path| {
        b.cmd(&["apply", "--yes", f.to_str().expect("utf8")])
            .env("BERTH_ACCEL", "tcg")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("apply")
    };

    let (mut berth_one, mut raw_one, mut berth_four) = (vec![], vec![], vec![]);
    for i in 0..runs {
        berth_one.push(timed(&ns, &["10.74.0.2".into()], || apply(&one)).0);
        apply(&empty);
        let (t, mut child) = timed(&ns, &["10.74.0.40".into()], || raw_qemu(&b, &fx, 40));
        raw_one.push(t);
        let _ = child.kill();
        let _ = child.wait();
        if i < runs.div_ceil(2) {
            let addrs: Vec<String> = (10..14).map(|i| format!("10.74.0.{i}")).collect();
            berth_four.push(timed(&ns, &addrs, || apply(&four)).0);
            if i + 1 < runs.div_ceil(2) {
                apply(&empty);
            }
        }
    }
    // Run the four again and read the memory of their shims and QEMUs.
    apply(&four);
    std::thread::sleep(Duration::from_secs(10));
    let ps = b.ps();
    let mut shim_rss = vec![];
    let mut shim_pss = vec![];
    let mut qemu_rss = vec![];
    for g in &ps {
        if let Some(p) = g.shim_pid {
            shim_rss.push(rss_kib(p as u32));
            shim_pss.push(pss_kib(p as u32));
        }
        if let Some(p) = g.pid {
            qemu_rss.push(rss_kib(p as u32));
        }
    }
    let mid = |mut v: Vec<u64>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1024.0
    };
    let anon = ps
        .iter()
        .filter_map(|g| g.shim_pid)
        .map(|p| anon_kib(p as u32))
        .collect::<Vec<_>>();
    let (b1, r1, b4) = (
        median(berth_one.clone()),
        median(raw_one.clone()),
        median(berth_four.clone()),
    );
    println!("\nberth VM benchmark ({runs} runs, medians; TCG; microvm, 256 MiB, 1 vCPU)\n");
    println!("| measurement | berth | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| `apply` → VM answers HTTP | {} | {} raw qemu-system-x86_64, same argv + tap setup | {:+.1} % | ≤ +5 % |",
        ms(b1),
        ms(r1),
        (b1.as_secs_f64() / r1.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "| 4 VMs in one `apply` → all answer | {} | {} one VM via berth | {:.2}× | — |",
        ms(b4),
        ms(b1),
        b4.as_secs_f64() / b1.as_secs_f64()
    );
    println!(
        "| shim RSS (median of {}) | {:.1} MiB (anon {:.1}, PSS {:.1}) | — | — | — |",
        shim_rss.len(),
        mid(shim_rss),
        mid(anon),
        mid(shim_pss)
    );
    println!(
        "| QEMU RSS (median) | {:.1} MiB | — | — | — |",
        mid(qemu_rss)
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
        "               berth 4   {:?}",
        berth_four.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
}
