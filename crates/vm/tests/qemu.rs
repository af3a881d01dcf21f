//! Integration tests against a real QEMU (TCG) and qemu-img. They skip with
//! a printed reason when not root or the tools are missing;
//! `BERTH_E2E_REQUIRED=1` turns a skip into a failure.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{Cap, in_netns, require, unique_tag, wait_until};
use berth_vm::{
    Accel, DiskFormat, Firmware, Machine, PinRole, Qmp, VmConfig, VmError, ensure_disk, host_cpus,
    inherit_fd, mac_for_index, open_tap, pin_threads, qemu_argv, thread_affinity,
};

/// Kills and reaps QEMU when the test ends, also on panic.
struct QemuGuard(Child);

impl QemuGuard {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Waits up to `timeout` for QEMU to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_until(timeout, Duration::from_millis(20), || {
            self.0.try_wait().ok().flatten()
        })
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deletes the network namespace when the test ends, also on panic.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn user_exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).ok().flatten().is_some()
}

/// A microVM config with no kernel, no disks; QEMU is started paused (-S)
/// so it just sits there with its vCPU threads created.
fn config(dir: &Path, name: &str, tap_fd: i32) -> VmConfig {
    VmConfig {
        name: name.into(),
        machine: Machine::Microvm,
        accel: Accel::Tcg,
        cpus: 2,
        memory_mib: 64,
        kernel: None,
        initrd: None,
        cmdline: None,
        disks: vec![],
        cdrom: None,
        firmware: Firmware::Bios,
        ovmf_code: None,
        ovmf_vars: None,
        hugepages: false,
        mac: mac_for_index(7),
        tap_fd,
        nics: vec![],
        qmp_socket: dir.join("qmp.sock"),
        serial_socket: Some(dir.join("serial.sock")),
        exec_socket: None,
        qga_socket: None,
        // The privilege drop and seccomp berth uses in production.
        runas: user_exists("nobody").then(|| "nobody".to_string()),
        sandbox: true,
    }
}

fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    // Start paused: no guest code runs.
    cmd.arg("-S")
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

fn thread_name(pid: i32, tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn qemu_qmp_status_vcpus_pin_quit() {
    if !require("qemu_qmp_status_vcpus_pin_quit", &[Cap::Root, Cap::Qemu]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), "berth-t-vm-qmp", -1);
    let mut qemu = QemuGuard(command(&qemu_argv(&cfg)).spawn().expect("spawn qemu"));
    let pid = qemu.pid();

    let mut qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(20)).expect("QMP connect");
    assert_eq!(qmp.query_status().expect("status"), "prelaunch");

    let vcpus = qmp.vcpu_threads().expect("vcpu threads");
    assert_eq!(vcpus.len(), 2, "{vcpus:?}");
    assert_eq!((vcpus[0].0, vcpus[1].0), (0, 1));
    assert_ne!(vcpus[0].1, vcpus[1].1, "MTTCG: one thread per vCPU");
    for &(idx, tid) in &vcpus {
        assert_ne!(tid, pid);
        // -name ...,debug-threads=on
        assert_eq!(thread_name(pid, tid), format!("CPU {idx}/TCG"));
    }

    let host = host_cpus();
    if host.len() >= 2 {
        let want = [host[0], host[1]];
        let done = pin_threads(pid, &vcpus, &want, &[]).expect("pin");
        assert_eq!(thread_affinity(vcpus[0].1).expect("affinity"), [want[0]]);
        assert_eq!(thread_affinity(vcpus[1].1).expect("affinity"), [want[1]]);
        // The main thread is an emulator thread: the other CPUs, or all of
        // them on a 2-CPU host.
        let rest: Vec<usize> = host.iter().copied().filter(|c| !want.contains(c)).collect();
        let emu = if rest.is_empty() { host.clone() } else { rest };
        assert_eq!(thread_affinity(pid).expect("affinity"), emu);
        let main = done
            .iter()
            .find(|p| p.tid == pid)
            .expect("main thread pinned");
        assert_eq!(main.role, PinRole::Emulator);
        assert!(
            done.len() > 3,
            "QEMU has more than main + 2 vCPU threads: {done:?}"
        );
    } else {
        eprintln!("qemu_qmp_status_vcpus_pin_quit: 1 host CPU, pinning part skipped");
    }

    qmp.quit().expect("quit");
    let status = qemu
        .wait_exit(Duration::from_secs(10))
        .expect("QEMU exits after quit");
    assert!(status.success(), "{status}");
    let ev = qmp
        .next_event(Duration::from_secs(1))
        .expect("event")
        .expect("SHUTDOWN event");
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(ev["data"]["reason"], "host-qmp-quit");
    // QEMU has gone: the session says so instead of hanging.
    let err = qmp.query_status().expect_err("closed");
    assert!(matches!(err, VmError::QmpClosed { .. }), "{err}");
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn tap_fd_handed_to_unprivileged_qemu() {
    if !require(
        "tap_fd_handed_to_unprivileged_qemu",
        &[Cap::Root, Cap::Qemu, Cap::Netns],
    ) {
        return;
    }
    let ns = NetnsGuard(unique_tag("berth-t-vm-"));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .expect("ip netns add");
    assert!(st.success(), "ip netns add {} failed", ns.0);
    const TAP: &str = "bvtap0";

    let tap = in_netns(&ns.0, || open_tap(TAP))
        .expect("enter netns")
        .expect("open_tap");
    assert!(link_exists(&ns.0, TAP), "tap visible in the namespace");
    assert!(
        !Path::new("/sys/class/net").join(TAP).exists(),
        "tap must not appear in the host namespace"
    );
    // The same name again, while the first is open: a clear error.
    let again = in_netns(&ns.0, || open_tap(TAP)).expect("enter netns");
    let err = again.expect_err("duplicate tap");
    assert!(err.to_string().contains(TAP), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), "berth-t-vm-tap", 3);
    let mut cmd = command(&qemu_argv(&cfg));
    inherit_fd(&mut cmd, tap.as_raw_fd(), 3);
    let mut qemu = QemuGuard(cmd.spawn().expect("spawn qemu"));
    drop(tap);

    let mut qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(20)).expect("QMP connect");
    // QEMU took the fd: its NIC has our MAC, and the tap outlives our copy.
    let filters = qmp.execute("query-rx-filter", None).expect("rx filter");
    let macs: Vec<&str> = filters
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|f| f["main-mac"].as_str())
        .collect();
    assert_eq!(macs, [mac_for_index(7).as_str()]);
    assert!(link_exists(&ns.0, TAP), "tap alive while QEMU holds it");
    if cfg.runas.is_some() {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", qemu.pid())).expect("status");
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
        assert!(
            !uid_line.split_whitespace().any(|f| f == "0"),
            "QEMU dropped root: {uid_line}"
        );
    }

    qmp.quit().expect("quit");
    qemu.wait_exit(Duration::from_secs(10))
        .expect("QEMU exits after quit");
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (!link_exists(&ns.0, TAP)).then_some(())
    });
    assert!(gone.is_some(), "tap removed once QEMU closed the last fd");
}

fn have_qemu_img(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let reason = "no qemu-img in PATH (install qemu-utils)";
        if std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1") {
            panic!("{test}: {reason} (BERTH_E2E_REQUIRED=1)");
        }
        eprintln!("skip {test}: {reason}");
    }
    ok
}

#[test]
fn ensure_disk_creates_sparse_and_never_touches_existing() {
    if !have_qemu_img("ensure_disk_creates_sparse_and_never_touches_existing") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    const MIB: u64 = 1024 * 1024;

    // Missing, no size: a clear error, nothing created.
    let raw = dir.path().join("sub/root.raw");
    let err = ensure_disk(&raw, DiskFormat::Raw, None).expect_err("missing");
    assert!(matches!(err, VmError::DiskMissing { .. }), "{err}");
    assert!(err.to_string().contains("give the disk a size"), "{err}");
    assert!(!raw.exists());

    // Created sparse (and its directory too).
    assert_eq!(
        ensure_disk(&raw, DiskFormat::Raw, Some(64 * MIB)).expect("create"),
        None
    );
    let md = std::fs::metadata(&raw).expect("stat");
    assert_eq!(md.len(), 64 * MIB);
    assert!(md.blocks() * 512 < MIB, "sparse: {} blocks", md.blocks());
    let leftovers: Vec<_> = std::fs::read_dir(raw.parent().expect("parent"))
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("root.raw")]);

    // Existing: never touched, whatever the size asked for.
    std::fs::write(&raw, b"guest data").expect("write marker");
    let before = std::fs::metadata(&raw).expect("stat");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        ensure_disk(&raw, DiskFormat::Raw, Some(4)).expect("exists"),
        None
    );
    assert_eq!(
        ensure_disk(&raw, DiskFormat::Raw, None).expect("exists"),
        None
    );
    let warn = ensure_disk(&raw, DiskFormat::Raw, Some(64 * MIB))
        .expect("exists")
        .expect("smaller than asked: a warning");
    assert!(
        warn.contains("smaller") && warn.contains("qemu-img resize"),
        "{warn}"
    );
    let after = std::fs::metadata(&raw).expect("stat");
    assert_eq!(std::fs::read(&raw).expect("read"), b"guest data");
    assert_eq!(before.mtime_nsec(), after.mtime_nsec());
    assert_eq!(before.mtime(), after.mtime());
    assert_eq!(before.ino(), after.ino());

    // qcow2: thin, and the format is checked.
    let q = dir.path().join("data.qcow2");
    let t = Instant::now();
    assert_eq!(
        ensure_disk(&q, DiskFormat::Qcow2, Some(1024 * MIB)).expect("create"),
        None
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(std::fs::metadata(&q).expect("stat").len() < MIB);
    assert_eq!(
        ensure_disk(&q, DiskFormat::Qcow2, Some(1024 * MIB)).expect("exists"),
        None
    );
    assert!(
        ensure_disk(&q, DiskFormat::Qcow2, Some(2048 * MIB))
            .expect("exists")
            .is_some()
    );
    let err = ensure_disk(&raw, DiskFormat::Qcow2, Some(MIB)).expect_err("raw is not qcow2");
    assert!(matches!(err, VmError::DiskFormatMismatch { .. }), "{err}");
    assert_eq!(std::fs::read(&raw).expect("read"), b"guest data");
}
