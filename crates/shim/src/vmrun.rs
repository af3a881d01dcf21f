//! The shim's VM path: QEMU on a routed tap, controlled over QMP.
//!
//! ```text
//! shim ── open tap vb<i> (fd 3) ──▶ qemu-system-x86_64 -netdev tap,fd=3 -qmp unix:qmp.sock
//!   │        host side: addresses + /32,/128 routes     (guest configures itself from ip=)
//!   ├─ QMP: status, vCPU thread ids → pinning; system_powerdown / quit to stop
//!   └─ virtio-serial ports, each a unix socket the shim holds, for exec:
//!        org.qemu.guest_agent.0 (qga.sock: qemu-ga, `guest-exec`, see qga.rs)
//!        berth.exec             (exec.sock: a shell, if the guest runs one there)
//! ```
//!
//! A guest reboot is handled inside QEMU (no `-no-reboot`): the process and
//! its pinned threads survive it. QEMU exiting is a crash or a power-off, and
//! the restart policy decides.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_container::Cgroup;
use berth_spec::Guest;
use berth_spec::vm::{AccelChoice, Firmware, Machine, Vm};

use crate::paths::GuestPaths;

use berth_vm::QEMU_USER;
/// Memory a QEMU process needs beyond the guest's RAM, for its cgroup limit.
const QEMU_OVERHEAD: u64 = 192 << 20;

pub struct Started {
    pub child: Child,
    pub qmp: berth_vm::Qmp,
    pub accel: berth_vm::Accel,
    pub warnings: Vec<String>,
    /// Connection to the guest's `berth.exec` virtio-serial port.
    pub exec: Option<std::os::unix::net::UnixStream>,
    /// Connection to the guest's `org.qemu.guest_agent.0` port.
    pub qga: Option<std::os::unix::net::UnixStream>,
}

/// QEMU's id for the guest agent port's chardev (see `berth_vm::qemu_argv`).
pub const QGA_CHARDEV: &str = "qga0";

/// Whether the guest has the virtio-serial port behind chardev `label` open
/// (QMP `query-chardev`, `frontend-open`); `None` if QMP cannot say.
pub fn chardev_open(qmp: &mut berth_vm::Qmp, label: &str) -> Option<bool> {
    let list = qmp.execute("query-chardev", None).ok()?;
    list.as_array()?
        .iter()
        .find(|c| c.get("label").and_then(|l| l.as_str()) == Some(label))?
        .get("frontend-open")?
        .as_bool()
}

/// Runs a marker-delimited script over the virtio-serial port (see
/// `Console::run_script` for the serial-console fallback); `None` if the
/// guest gave no sign of life on the channel within `probe`.
pub fn run_on_channel(
    chan: &mut std::os::unix::net::UnixStream,
    script: &str,
    end: &str,
    probe: Duration,
    timeout: Duration,
) -> Option<Result<Vec<u8>, String>> {
    use std::io::{Read, Write};
    // A plain byte stream (no terminal): the script goes as it is.
    if chan.write_all(script.as_bytes()).is_err() {
        return None;
    }
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if got.windows(end.len()).any(|w| w == end.as_bytes()) {
            return Some(Ok(got));
        }
        let limit = if got.is_empty() { probe } else { timeout };
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return if got.is_empty() {
                None
            } else {
                Some(Err(format!("no end marker within {timeout:?}")))
            };
        }
        let _ = chan.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match chan.read(&mut buf) {
            Ok(0) => {
                return if got.is_empty() {
                    None
                } else {
                    Some(Err("the exec channel closed".into()))
                };
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return if got.is_empty() {
                    None
                } else {
                    Some(Err(e.to_string()))
                };
            }
        }
    }
}

/// The kernel command line berth boots a direct-kernel VM with: the spec's,
/// plus the guest's addresses (`ip=`, `berth.ip6=`, `berth.gw6=`) unless
/// `ip_cmdline = false`, plus a group member's `berth.vip4=`/`berth.vip6=`,
/// plus `tsc_early_khz=` under TCG (about half of all
/// TCG boots hang in TSC calibration without it; see DESIGN.md).
pub fn cmdline(cfg: &Guest, vm: &Vm, accel: berth_vm::Accel, tsc_khz: Option<u64>) -> String {
    let mut parts: Vec<String> = vm.cmdline.split_whitespace().map(str::to_owned).collect();
    if vm.ip_cmdline {
        parts.push(format!(
            "ip={}::{}:255.255.255.255:{}:eth0:off",
            cfg.addr4, cfg.host4, cfg.name
        ));
        if let (Some(a6), Some(h6)) = (cfg.addr6, cfg.host6) {
            parts.push(format!("berth.ip6={a6}"));
            parts.push(format!("berth.gw6={h6}"));
        }
    }
    // A group member's service addresses, which the guest adds to its
    // loopback itself (see the README: "Service addresses in VM members").
    if let Some(v) = cfg.vip4 {
        parts.push(format!("berth.vip4={v}"));
    }
    if let Some(v) = cfg.vip6 {
        parts.push(format!("berth.vip6={v}"));
    }
    // Addresses of extra NICs (`addr`), for the guest to apply.
    if vm.ip_cmdline
        && let Some(nic) = crate::nics::cmdline_arg(cfg)
    {
        parts.push(nic);
    }
    // The host's Nix store as a binary cache (`nix_cache = true`); the
    // guest's own configuration turns it into a substituter.
    if cfg.nix_cache {
        parts.push(format!(
            "berth.nix_cache={}",
            berth_spec::nix_cache_url(cfg.host4)
        ));
    }
    if accel == berth_vm::Accel::Tcg
        && !parts.iter().any(|p| p.starts_with("tsc_early_khz="))
        && let Some(khz) = tsc_khz
    {
        parts.push(format!("tsc_early_khz={khz}"));
    }
    parts.join(" ")
}

fn accel_choice(a: AccelChoice) -> &'static str {
    match a {
        AccelChoice::Auto => "auto",
        AccelChoice::Kvm => "kvm",
        AccelChoice::Tcg => "tcg",
    }
}

/// Starts QEMU for `cfg` and returns once QMP answers and pinning is done.
pub fn start(
    cfg: &Guest,
    vm: &Vm,
    paths: &GuestPaths,
    stdio: (OwnedFd, OwnedFd, OwnedFd),
) -> Result<Started, String> {
    let mut warnings = Vec::new();
    let env = std::env::var("BERTH_ACCEL").ok();
    let accel = berth_vm::resolve_accel(accel_choice(vm.accel), env.as_deref())
        .map_err(|e| e.to_string())?;
    if vm.hugepages {
        berth_vm::check_hugepages(vm.memory_mib).map_err(|e| e.to_string())?;
    }
    let runas = match berth_vm::ensure_qemu_user(QEMU_USER) {
        Ok(ids) => Some(ids),
        Err(e) => {
            warnings.push(format!(
                "QEMU runs as root: cannot use user {QEMU_USER}: {e}"
            ));
            None
        }
    };

    // Images, disks made from them and the seed volume (see images.rs).
    let state_dir = paths
        .dir
        .parent()
        .and_then(Path::parent)
        .ok_or("the guest directory is not under a state dir")?;
    let resolved = crate::images::prepare(cfg, vm, state_dir, &paths.dir, runas)?;
    warnings.extend(resolved.warnings.iter().cloned());
    for d in vm.disks.iter().filter(|d| d.image.is_none()) {
        let existed = d.path.exists();
        let fmt = match d.format {
            berth_spec::vm::DiskFormat::Raw => berth_vm::DiskFormat::Raw,
            berth_spec::vm::DiskFormat::Qcow2 => berth_vm::DiskFormat::Qcow2,
        };
        if let Some(w) = berth_vm::ensure_disk(&d.path, fmt, d.size).map_err(|e| e.to_string())? {
            warnings.push(w);
        }
        // A disk berth made belongs to the user QEMU runs as.
        if let (false, Some((uid, gid))) = (existed, runas) {
            std::os::unix::fs::chown(&d.path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to {QEMU_USER}: {e}", d.path.display()))?;
        }
    }
    let ovmf = match vm.firmware {
        Firmware::Uefi => Some(
            berth_spec::vm::OVMF_PATHS
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .map(Path::to_path_buf)
                .ok_or("firmware = \"uefi\" but OVMF is not installed (apt-get install ovmf)")?,
        ),
        Firmware::Bios => None,
    };
    // UEFI variables (boot entries an installer writes) persist per guest:
    // a copy of the VARS template that matches the CODE image.
    let ovmf_vars = match &ovmf {
        Some(code) => {
            let template = code.with_file_name(
                code.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .replace("CODE", "VARS"),
            );
            let vars = paths.dir.join("OVMF_VARS.fd");
            if !vars.exists() && template.exists() {
                // Through a temp file: a copy cut short must not pass for
                // the guest's variable store at the next start.
                let tmp = vars.with_extension("fd.tmp");
                std::fs::copy(&template, &tmp)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &vars))
                    .map_err(|e| {
                        let _ = std::fs::remove_file(&tmp);
                        format!("copying UEFI variables {}: {e}", template.display())
                    })?;
            }
            vars.exists().then_some(vars)
        }
        None => None,
    };
    // Cgroup: the whole QEMU process, guest RAM plus QEMU's own overhead.
    let cg = Cgroup::for_guest(&cfg.name);
    cg.kill_all(Duration::from_secs(5))
        .map_err(|e| format!("ending leftover processes: {e}"))?;
    cg.create().map_err(|e| e.to_string())?;
    let limit = cfg.memory.map(|m| m + QEMU_OVERHEAD);
    warnings.extend(cg.set_limits(limit, None).map_err(|e| e.to_string())?);

    // Network: the tap is ours (QEMU, as another user, could not open
    // /dev/net/tun); QEMU gets its fd.
    let _ = berth_net::delete_link(&cfg.link);
    let tap: OwnedFd = berth_vm::open_tap(&cfg.link).map_err(|e| e.to_string())?;
    berth_net::setup_host_side(&crate::supervisor::link_of(cfg))
        .map_err(|e| format!("network setup: {e}"))?;
    // Extra NICs: macvtaps, segment ports, VFIO devices.
    let nics = crate::nics::setup_vm(cfg)?;

    let qmp_path = paths.dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_file(paths.dir.join("qga.sock"));
    let tsc = berth_vm::host_tsc_khz();
    let argv = berth_vm::qemu_argv(&berth_vm::VmConfig {
        name: cfg.name.clone(),
        machine: match vm.machine {
            Machine::Microvm => berth_vm::Machine::Microvm,
            Machine::Q35 => berth_vm::Machine::Q35,
        },
        accel,
        cpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        kernel: resolved.kernel.clone(),
        initrd: resolved.initrd.clone(),
        cmdline: vm.kernel.as_ref().map(|_| cmdline(cfg, vm, accel, tsc)),
        disks: vm
            .disks
            .iter()
            .zip(&resolved.disks)
            .map(|(d, path)| berth_vm::Disk {
                path: path.clone(),
                format: match d.format {
                    berth_spec::vm::DiskFormat::Raw => berth_vm::DiskFormat::Raw,
                    berth_spec::vm::DiskFormat::Qcow2 => berth_vm::DiskFormat::Qcow2,
                },
                readonly: d.readonly,
                usb: false,
            })
            .chain(resolved.seed.clone().map(|(path, usb)| berth_vm::Disk {
                path,
                format: berth_vm::DiskFormat::Raw,
                readonly: true,
                usb,
            }))
            .collect(),
        cdrom: resolved.cdrom.clone(),
        firmware: match vm.firmware {
            Firmware::Bios => berth_vm::Firmware::Bios,
            Firmware::Uefi => berth_vm::Firmware::Uefi,
        },
        ovmf_code: ovmf,
        ovmf_vars,
        hugepages: vm.hugepages,
        mac: berth_vm::mac_for_index(cfg.index),
        tap_fd: 3,
        nics: nics.args.clone(),
        qmp_socket: qmp_path.clone(),
        serial_socket: None,
        exec_socket: Some(paths.dir.join("exec.sock")),
        qga_socket: Some(paths.dir.join("qga.sock")),
        runas: runas.map(|_| QEMU_USER.to_string()),
        sandbox: true,
    });

    let procs = cg
        .procs_files(limit.is_some(), false)
        .map_err(|e| e.to_string())?;
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let tap_raw = tap.as_raw_fd();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::from(stdio.0))
        .stdout(Stdio::from(stdio.1))
        .stderr(Stdio::from(stdio.2));
    berth_vm::inherit_fd(&mut cmd, tap_raw, 3);
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        // QEMU's sockets (QMP) are created 0600: only root talks to it.
        cmd.pre_exec(|| {
            libc::umask(0o177);
            Ok(())
        });
    }
    crate::supervisor::guest_process(&mut cmd, fds);
    nics.pass_to(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "qemu-system-x86_64 not found: install qemu-system-x86".to_string()
        } else {
            format!("starting QEMU: {e}")
        }
    })?;
    drop(procs);
    drop(tap);
    drop(nics);
    let fail = |child: &mut Child, msg: String| {
        crate::supervisor::abort_start(child, &paths.console_log(), msg)
    };
    let mut qmp = match berth_vm::Qmp::connect(&qmp_path, Duration::from_secs(30)) {
        Ok(q) => q,
        Err(e) => {
            return Err(fail(
                &mut child,
                format!("QEMU did not answer on its QMP socket: {e}"),
            ));
        }
    };
    if !vm.cpu_pinning.is_empty() {
        let threads = match qmp.vcpu_threads() {
            Ok(t) => t,
            Err(e) => return Err(fail(&mut child, format!("reading vCPU threads: {e}"))),
        };
        if let Err(e) = berth_vm::pin(
            child.id() as i32,
            &threads,
            &vm.cpu_pinning,
            &vm.emulator_cpus,
        ) {
            return Err(fail(&mut child, format!("pinning: {e}")));
        }
    }
    // The fast exec channel (virtio-serial port `berth.exec`); guests with no
    // shell on it never answer, and exec falls back to the serial console.
    let exec = std::os::unix::net::UnixStream::connect(paths.dir.join("exec.sock")).ok();
    // The QEMU guest agent's port, tried first when an agent answers on it.
    let qga = std::os::unix::net::UnixStream::connect(paths.dir.join("qga.sock")).ok();
    Ok(Started {
        child,
        qmp,
        accel,
        warnings,
        exec,
        qga,
    })
}

/// Applies pinning to a running QEMU (a live plan change).
pub fn repin(qmp: &mut berth_vm::Qmp, qemu_pid: i32, vm: &Vm) -> Result<(), String> {
    if vm.cpu_pinning.is_empty() {
        let all = berth_vm::host_cpus();
        let threads = qmp.vcpu_threads().map_err(|e| e.to_string())?;
        return berth_vm::pin(qemu_pid, &threads, &all, &all).map_err(|e| e.to_string());
    }
    let threads = qmp.vcpu_threads().map_err(|e| e.to_string())?;
    berth_vm::pin(qemu_pid, &threads, &vm.cpu_pinning, &vm.emulator_cpus).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(ip_cmdline: bool, cmdline: &str) -> (Guest, Vm) {
        let vm = Vm {
            machine: Machine::Microvm,
            accel: AccelChoice::Tcg,
            kernel: Some("/k".into()),
            initrd: None,
            cmdline: cmdline.into(),
            ip_cmdline,
            disks: vec![],
            cdrom: None,
            firmware: Firmware::Bios,
            vcpus: 1,
            memory_mib: 256,
            cpu_pinning: vec![],
            emulator_cpus: vec![],
            exclusive: false,
            hugepages: false,
            images: Default::default(),
            seed: None,
        };
        let g = Guest {
            name: "r1".into(),
            kind: berth_spec::GuestKind::Vm,
            index: 5,
            link: "vb5".into(),
            addr4: "10.0.0.5".parse().expect("ip"),
            host4: "10.0.0.0".parse().expect("ip"),
            addr6: Some("fd42::5".parse().expect("ip")),
            host6: Some("fd42::".parse().expect("ip")),
            rootfs: Default::default(),
            command: vec![],
            memory: Some(256 << 20),
            cpus: None,
            autostart: true,
            restart: berth_spec::RestartPolicy::OnFailure,
            env: Default::default(),
            stop_timeout_ms: 1000,
            ephemeral: false,
            read_only: false,
            binds: Vec::new(),
            vm: Some(vm.clone()),
            backup: None,
            health: None,
            group: None,
            companion_of: None,
            vip4: None,
            vip6: None,
            nics: vec![],
            nix_cache: false,
        };
        (g, vm)
    }

    #[test]
    fn cmdline_gets_addresses_and_tsc_under_tcg() {
        let (g, vm) = guest(true, "console=ttyS0");
        assert_eq!(
            cmdline(&g, &vm, berth_vm::Accel::Tcg, Some(2_600_000)),
            "console=ttyS0 ip=10.0.0.5::10.0.0.0:255.255.255.255:r1:eth0:off berth.ip6=fd42::5 berth.gw6=fd42:: tsc_early_khz=2600000"
        );
        // KVM needs no TSC hint; the spec can turn ip= off; a TSC hint in the
        // spec wins.
        assert_eq!(
            cmdline(&g, &vm, berth_vm::Accel::Kvm, Some(1))
                .matches("tsc_early_khz")
                .count(),
            0
        );
        let (g, vm) = guest(false, "console=ttyS0 tsc_early_khz=5");
        assert_eq!(
            cmdline(&g, &vm, berth_vm::Accel::Tcg, Some(1)),
            "console=ttyS0 tsc_early_khz=5"
        );
    }

    #[test]
    fn cmdline_tells_the_guest_where_the_nix_cache_is() {
        let (mut g, vm) = guest(false, "console=ttyS0");
        g.nix_cache = true;
        assert_eq!(
            cmdline(&g, &vm, berth_vm::Accel::Kvm, None),
            "console=ttyS0 berth.nix_cache=http://10.0.0.0:5480"
        );
    }
}
