//! Boots the VM fixture under TCG: a microVM (initramfs, network from `ip=`,
//! httpd reached through a loopback-only user-mode port forward) and a q35
//! machine that switches to the ext4 disk root.
//!
//! The user-mode netdev runs with `restrict=on`: the guest reaches nothing
//! outside QEMU; only the forward from 127.0.0.1 comes in.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{Cap, VmFixture, host_tsc_khz, require, vm_fixture, wait_until};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The fixture, or `None` (skip) when it cannot be built for lack of the
/// Debian archive; with `BERTH_E2E_REQUIRED=1` that fails instead. Any other
/// build error fails.
fn fixture(test: &str) -> Option<VmFixture> {
    if !require(test, &[Cap::Root, Cap::Qemu]) {
        return None;
    }
    match vm_fixture() {
        Ok(f) => Some(f),
        Err(e) => {
            let msg = e.to_string();
            let no_archive = ["cannot download", "cannot resolve", "not found in PATH"]
                .iter()
                .any(|s| msg.contains(s));
            let required = std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1");
            if no_archive && !required {
                eprintln!("skip {test}: cannot build the VM fixture: {msg}");
                return None;
            }
            panic!("{test}: VM fixture: {msg}");
        }
    }
}

/// A QEMU child with its serial console in a file; killed on drop (also
/// when the test panics).
struct Qemu {
    child: Child,
    serial: PathBuf,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start(machine: &[&str], f: &VmFixture, append: &str, devices: &[String]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let mut cmdline = format!("console=ttyS0 panic=-1 {append}");
        match host_tsc_khz() {
            Some(khz) => cmdline.push_str(&format!(" tsc_early_khz={khz}")),
            None => eprintln!("no cpu MHz in /proc/cpuinfo: booting without tsc_early_khz"),
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(machine)
            .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
            .args(["-no-reboot", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&f.kernel)
            .arg("-initrd")
            .arg(&f.initrd)
            .arg("-append")
            .arg(&cmdline)
            .args(devices)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        Qemu {
            child,
            serial,
            started: Instant::now(),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console shows `needle`; returns the time since QEMU
    /// started. Panics with the console (and QEMU's stderr) otherwise.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Duration {
        let mut exited = None;
        let found = wait_until(timeout, Duration::from_millis(100), || {
            if self.log().contains(needle) {
                return Some(true);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            None
        });
        if found == Some(true) {
            return self.started.elapsed();
        }
        let mut stderr = String::new();
        if exited.is_some()
            && let Some(mut e) = self.child.stderr.take()
        {
            let _ = e.read_to_string(&mut stderr);
        }
        let log = self.log();
        let tail: String = {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        panic!(
            "no `{needle}` on the console after {:?} (qemu exited: {exited:?}; stderr: {stderr})\n--- console tail ---\n{tail}",
            self.started.elapsed()
        );
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: vm\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A user-mode NIC whose guest address is 10.0.2.15 (slirp's default), with
/// guest port 80 forwarded from 127.0.0.1:`port`.
fn user_net(device: &str, port: u16) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:80"),
        "-device".into(),
        format!("{device},netdev=n0"),
    ]
}

const IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.255";

#[test]
fn microvm_boots_fixture_and_serves_http() {
    let Some(f) = fixture("microvm_boots_fixture_and_serves_http") else {
        return;
    };
    assert!(!f.kernel_version.is_empty());
    let port = free_port();
    let mut vm = Qemu::start(
        &["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on"],
        &f,
        &format!("{IP}:vm1:eth0:off berth.vip4=10.9.9.9 berth.ip6=fd00::15 berth.gw6=fe80::2"),
        &user_net("virtio-net-device", port),
    );
    let booted = vm.wait_for("berth-fixture: booted", BOOT_TIMEOUT);
    eprintln!("microvm: booted after {booted:.1?}");
    let ready = vm.wait_for("berth-fixture: ready", Duration::from_secs(30));
    eprintln!("microvm: ready after {ready:.1?}");
    let log = vm.log();
    assert!(
        log.contains("berth-fixture: net eth0 10.0.2.15 gw 10.0.2.2"),
        "{log}"
    );
    assert!(log.contains("berth-fixture: net6 eth0 fd00::15"), "{log}");
    assert!(log.contains("berth-fixture: vip4 10.9.9.9 on lo"), "{log}");
    let body = wait_until(Duration::from_secs(20), Duration::from_millis(250), || {
        http_get(port).filter(|b| b.contains("berth-vm-fixture vm1"))
    });
    assert!(
        body.is_some(),
        "no answer from the guest's httpd\n{}",
        vm.log()
    );
    eprintln!("microvm: http after {:.1?}", vm.started.elapsed());
}

#[test]
fn q35_boots_fixture_from_disk_root() {
    let Some(f) = fixture("q35_boots_fixture_from_disk_root") else {
        return;
    };
    let port = free_port();
    let mut devices = vec![
        "-drive".to_string(),
        format!(
            "file={},if=none,id=d0,format=raw,snapshot=on",
            f.disk.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d0".into(),
    ];
    devices.extend(user_net("virtio-net-pci", port));
    let mut vm = Qemu::start(
        &["-M", "q35"],
        &f,
        &format!("{IP}:vm2:eth0:off berth.root=/dev/vda"),
        &devices,
    );
    let disk = vm.wait_for("berth-fixture: disk root /dev/vda", BOOT_TIMEOUT);
    eprintln!("q35: disk root after {disk:.1?}");
    vm.wait_for("berth-fixture: ready", Duration::from_secs(30));
    let body = wait_until(Duration::from_secs(20), Duration::from_millis(250), || {
        http_get(port).filter(|b| b.contains("berth-vm-fixture vm2"))
    });
    assert!(
        body.is_some(),
        "no answer from the guest's httpd\n{}",
        vm.log()
    );
    eprintln!("q35: http after {:.1?}", vm.started.elapsed());
}
