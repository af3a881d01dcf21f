//! The typed VM configuration and the pure argv builder.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The QEMU binary berth runs (looked up in PATH).
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// QEMU machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// `-M microvm`: no PCI, no firmware boot; direct kernel boot with
    /// virtio-mmio devices. Fast and small.
    Microvm,
    /// `-M q35`: a PC with PCIe, for guests that boot from a disk or an ISO
    /// (BIOS or UEFI), such as pfSense.
    Q35,
}

/// Accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation; CPU model `host`.
    Kvm,
    /// Software emulation; CPU model `max`. Linux guests booted directly
    /// need `tsc_early_khz=` on their command line (see [`crate::host_tsc_khz`]).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Firmware for `q35` (ignored for `microvm`, which always uses its own
/// minimal firmware and boots a kernel directly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF, from [`VmConfig::ovmf_code`] (and [`VmConfig::ovmf_vars`]).
    Uefi,
}

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One virtio block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    /// q35: attach as a USB mass-storage disk (on a `qemu-xhci` controller)
    /// instead of virtio, e.g. a config volume pfSense looks for on USB.
    /// Ignored on microvm (no USB).
    #[serde(default)]
    pub usb: bool,
}

/// Everything [`qemu_argv`] needs, resolved: paths exist (or will), accel is
/// decided, the command line is final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest name; shows up as QEMU's `-name` (in QMP and in thread names).
    pub name: String,
    pub machine: Machine,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The final kernel command line; the caller has already appended
    /// `ip=...`, `tsc_early_khz=...` and the like.
    pub cmdline: Option<String>,
    pub disks: Vec<Disk>,
    /// An ISO. On q35 an IDE CD-ROM that boots before the disks; on microvm
    /// (no IDE) a read-only virtio block device after the disks.
    pub cdrom: Option<PathBuf>,
    pub firmware: Firmware,
    /// OVMF code image (read-only pflash unit 0), required when
    /// `firmware == Uefi` on q35.
    pub ovmf_code: Option<PathBuf>,
    /// The guest's own writable copy of the OVMF variable store (pflash unit
    /// 1, e.g. copied once from `OVMF_VARS_4M.fd`), so UEFI settings survive
    /// a restart. Without it OVMF (checked: Debian's 2022.11) still boots but
    /// keeps its variables in RAM; boot order then comes from `bootindex`.
    #[serde(default)]
    pub ovmf_vars: Option<PathBuf>,
    /// Back guest RAM with 2 MiB hugepages from /dev/hugepages
    /// (check first with [`crate::check_hugepages`]).
    pub hugepages: bool,
    /// The NIC's MAC, stable per guest: see [`mac_for_index`].
    pub mac: String,
    /// An already open tap fd that QEMU inherits under this number
    /// (`-netdev tap,fd=N`). Negative: the guest gets no NIC.
    pub tap_fd: i32,
    /// Extra NICs after the management NIC, in order (eth1, eth2, ... in
    /// the guest).
    #[serde(default)]
    pub nics: Vec<NicArg>,
    /// berth's QMP socket: the only monitor QEMU has.
    pub qmp_socket: PathBuf,
    /// Serial console as a listening unix socket (`server=on,wait=off`), or
    /// QEMU's stdio when `None`.
    pub serial_socket: Option<PathBuf>,
    /// A virtio-serial port named `berth.exec` on a listening unix socket: a
    /// fast channel for `exec`, much faster than the emulated UART.
    #[serde(default)]
    pub exec_socket: Option<PathBuf>,
    /// A virtio-serial port named `org.qemu.guest_agent.0` (where qemu-ga
    /// looks by default) on a listening unix socket: the QEMU guest agent's
    /// channel, for guests that run one.
    #[serde(default)]
    pub qga_socket: Option<PathBuf>,
    /// `-runas USER`: QEMU opens its files as root, then drops to USER.
    pub runas: Option<String>,
    /// `-sandbox on,obsolete=deny,spawn=deny` (seccomp). Deliberately not
    /// `elevateprivileges=deny`: with `-runas` that kills QEMU with SIGSYS at
    /// start.
    pub sandbox: bool,
}

/// An extra NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicArg {
    /// A virtio NIC on an open tap fd QEMU inherits under `fd` (a macvtap's
    /// `/dev/tapN`, or a tap in a segment's bridge).
    Tap { fd: i32, mac: String },
    /// PCI passthrough (`-device vfio-pci,host=ADDR`); q35 only.
    Vfio { host: String },
}

/// A stable, unique, locally administered unicast MAC for guest `index`
/// (the spec's derivation, so validation can check extra NICs against it).
pub use berth_spec::nic::management_mac as mac_for_index;

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is
/// written as two).
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn esc_path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// The full argv, program first. Pure: same config, same argv.
///
/// Choices worth knowing:
/// - `-nodefaults -no-user-config -display none`, and no `-nographic`
///   (which would put a monitor on stdio if defaults were on): the QMP
///   socket is the only monitor.
/// - no `-no-reboot`: a guest reboot resets the VM inside the same QEMU
///   process (tap, QMP and pinned threads survive it).
/// - `-name NAME,debug-threads=on`: vCPU threads are called `CPU n/TCG` or
///   `CPU n/KVM` in `ps -T`.
/// - q35 boot order is set with `bootindex` on the devices, from 1 (0 is the
///   direct-kernel boot ROM's when `-kernel` is given): CD-ROM first,
///   then the disks in order, which SeaBIOS and OVMF both honour, rather
///   than `-boot order=`, which OVMF ignores and which must not be mixed
///   with `bootindex`.
/// - Disks use QEMU's default cache mode (`cache=none` needs O_DIRECT, which
///   tmpfs lacks) and `discard=unmap` when writable, so guest TRIM keeps
///   sparse images sparse.
pub fn qemu_argv(c: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[QEMU_PROGRAM]);
    let name = format!("{},debug-threads=on", esc(&c.name));
    push(&["-name", &name]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);

    let mem_backend = if c.hugepages {
        ",memory-backend=mem"
    } else {
        ""
    };
    let machine = match c.machine {
        Machine::Microvm => {
            format!("microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=off{mem_backend}")
        }
        Machine::Q35 => format!("q35{mem_backend}"),
    };
    push(&["-M", &machine]);
    push(&["-accel", c.accel.as_str()]);
    push(&[
        "-cpu",
        match c.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        },
    ]);
    let smp = c.cpus.max(1).to_string();
    push(&["-smp", &smp]);
    let mem = c.memory_mib.to_string();
    push(&["-m", &mem]);
    if c.hugepages {
        let obj = format!(
            "memory-backend-file,id=mem,size={}M,mem-path=/dev/hugepages,prealloc=on,share=on",
            c.memory_mib
        );
        push(&["-object", &obj]);
    }

    if c.machine == Machine::Q35
        && c.firmware == Firmware::Uefi
        && let Some(code) = &c.ovmf_code
    {
        let d = format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            esc_path(code)
        );
        push(&["-drive", &d]);
        if let Some(vars) = &c.ovmf_vars {
            let d = format!("if=pflash,format=raw,unit=1,file={}", esc_path(vars));
            push(&["-drive", &d]);
        }
    }

    if let Some(k) = &c.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
    }
    if let Some(i) = &c.initrd {
        push(&["-initrd", &i.to_string_lossy()]);
    }
    if let Some(cl) = &c.cmdline {
        push(&["-append", cl]);
    }

    let qmp = format!(
        "socket,id=qmp,path={},server=on,wait=off",
        esc_path(&c.qmp_socket)
    );
    push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
    match &c.serial_socket {
        Some(p) => {
            let ser = format!("socket,id=ser0,path={},server=on,wait=off", esc_path(p));
            push(&["-chardev", &ser, "-serial", "chardev:ser0"]);
        }
        None => push(&["-serial", "stdio"]),
    }

    let (net_dev, blk_dev) = match c.machine {
        Machine::Microvm => ("virtio-net-device", "virtio-blk-device"),
        Machine::Q35 => ("virtio-net-pci", "virtio-blk-pci"),
    };
    if c.exec_socket.is_some() || c.qga_socket.is_some() {
        let vser = match c.machine {
            Machine::Microvm => "virtio-serial-device,id=vser0",
            Machine::Q35 => "virtio-serial-pci,id=vser0",
        };
        push(&["-device", vser]);
    }
    // Plain ports, not virtconsoles: QEMU drops console data on EAGAIN
    // (hw/char/virtio-console.c) but throttles ports properly.
    for (sock, id, name) in [
        (&c.exec_socket, "exec0", "berth.exec"),
        (&c.qga_socket, "qga0", "org.qemu.guest_agent.0"),
    ] {
        if let Some(p) = sock {
            let chr = format!("socket,id={id},path={},server=on,wait=off", esc_path(p));
            let port = format!("virtserialport,chardev={id},name={name}");
            push(&["-chardev", &chr, "-device", &port]);
        }
    }
    if c.tap_fd >= 0 {
        let nd = format!("tap,id=n0,fd={}", c.tap_fd);
        let dev = format!("{net_dev},netdev=n0,mac={}", esc(&c.mac));
        push(&["-netdev", &nd, "-device", &dev]);
    }
    // Extra NICs, in order after the management NIC: QEMU creates the
    // devices in argv order (virtio-mmio transports on microvm, PCI slots
    // on q35), so the guest numbers them eth1, eth2, ... in this order.
    for (k, nic) in c.nics.iter().enumerate() {
        let k = k + 1;
        match nic {
            NicArg::Tap { fd, mac } => {
                let nd = format!("tap,id=n{k},fd={fd}");
                let dev = format!("{net_dev},netdev=n{k},mac={}", esc(mac));
                push(&["-netdev", &nd, "-device", &dev]);
            }
            NicArg::Vfio { host } => {
                let dev = format!("vfio-pci,host={},id=hostnic{k}", esc(host));
                push(&["-device", &dev]);
            }
        }
    }

    let q35_cd = c.machine == Machine::Q35 && c.cdrom.is_some();
    if let (Machine::Q35, Some(iso)) = (c.machine, &c.cdrom) {
        let d = format!(
            "file={},if=none,id=cd0,format=raw,media=cdrom,readonly=on",
            esc_path(iso)
        );
        push(&[
            "-drive",
            &d,
            "-device",
            "ide-cd,drive=cd0,bus=ide.0,bootindex=1",
        ]);
    }
    let on_usb = |d: &Disk| d.usb && c.machine == Machine::Q35;
    if c.disks.iter().any(on_usb) {
        push(&["-device", "qemu-xhci,id=xhci"]);
    }
    for (k, disk) in c.disks.iter().enumerate() {
        if on_usb(disk) {
            let d = format!(
                "file={},if=none,id=u{k},format={},readonly={}",
                esc_path(&disk.path),
                disk.format.as_str(),
                if disk.readonly { "on" } else { "off" },
            );
            let dev = format!("usb-storage,bus=xhci.0,drive=u{k},removable=on");
            push(&["-drive", &d, "-device", &dev]);
            continue;
        }
        let d = format!(
            "file={},if=none,id=d{k},format={},readonly={}{}",
            esc_path(&disk.path),
            disk.format.as_str(),
            if disk.readonly { "on" } else { "off" },
            if disk.readonly { "" } else { ",discard=unmap" },
        );
        let dev = match c.machine {
            Machine::Microvm => format!("{blk_dev},drive=d{k}"),
            // bootindex 0 is the direct-kernel boot ROM's when `-kernel` is given.
            Machine::Q35 => format!(
                "{blk_dev},drive=d{k},bootindex={}",
                1 + k + usize::from(q35_cd)
            ),
        };
        push(&["-drive", &d, "-device", &dev]);
    }
    if let (Machine::Microvm, Some(iso)) = (c.machine, &c.cdrom) {
        let d = format!(
            "file={},if=none,id=cd0,format=raw,readonly=on",
            esc_path(iso)
        );
        push(&["-drive", &d, "-device", "virtio-blk-device,drive=cd0"]);
    }

    if c.sandbox {
        push(&["-sandbox", "on,obsolete=deny,spawn=deny"]);
    }
    if let Some(user) = &c.runas {
        push(&["-runas", user]);
    }
    a
}

/// Makes `cmd`'s child inherit `fd` as descriptor `target` (dup2 between
/// fork and exec, which also clears close-on-exec on the copy). `fd` must
/// stay open until the child has been spawned.
pub fn inherit_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2/fcntl, which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 to itself keeps FD_CLOEXEC: clear it explicitly.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn microvm() -> VmConfig {
        VmConfig {
            name: "web".into(),
            machine: Machine::Microvm,
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 256,
            kernel: Some("/k/vmlinuz".into()),
            initrd: Some("/k/initrd".into()),
            cmdline: Some("console=ttyS0 ip=10.0.0.2 tsc_early_khz=2445428".into()),
            disks: vec![],
            cdrom: None,
            firmware: Firmware::Bios,
            ovmf_code: None,
            ovmf_vars: None,
            hugepages: false,
            mac: mac_for_index(3),
            tap_fd: 3,
            nics: vec![],
            qmp_socket: "/run/berth/web/qmp.sock".into(),
            serial_socket: Some("/run/berth/web/serial.sock".into()),
            exec_socket: None,
            qga_socket: None,
            runas: Some("berth-qemu".into()),
            sandbox: true,
        }
    }

    /// The value following `flag` at each of its occurrences.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn one<'a>(argv: &'a [String], flag: &str) -> &'a str {
        let v = values(argv, flag);
        assert_eq!(v.len(), 1, "{flag} should appear once in {argv:?}");
        v[0]
    }

    #[test]
    fn microvm_argv() {
        let a = qemu_argv(&microvm());
        assert_eq!(a[0], "qemu-system-x86_64");
        assert_eq!(
            one(&a, "-M"),
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=off"
        );
        assert_eq!(one(&a, "-accel"), "tcg");
        assert_eq!(one(&a, "-cpu"), "max");
        assert_eq!(one(&a, "-smp"), "2");
        assert_eq!(one(&a, "-m"), "256");
        assert_eq!(one(&a, "-kernel"), "/k/vmlinuz");
        assert_eq!(one(&a, "-initrd"), "/k/initrd");
        assert_eq!(
            one(&a, "-append"),
            "console=ttyS0 ip=10.0.0.2 tsc_early_khz=2445428"
        );
        assert_eq!(one(&a, "-netdev"), "tap,id=n0,fd=3");
        assert_eq!(
            values(&a, "-device"),
            ["virtio-net-device,netdev=n0,mac=52:54:00:be:00:03"]
        );
        // QMP is the only monitor.
        assert_eq!(one(&a, "-mon"), "chardev=qmp,mode=control");
        assert!(
            !a.iter()
                .any(|s| s == "-monitor" || s == "-qmp" || s == "-nographic")
        );
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=qmp,path=/run/berth/web/qmp.sock,server=on,wait=off",
                "socket,id=ser0,path=/run/berth/web/serial.sock,server=on,wait=off"
            ]
        );
        assert_eq!(one(&a, "-serial"), "chardev:ser0");
        assert_eq!(one(&a, "-sandbox"), "on,obsolete=deny,spawn=deny");
        assert!(!one(&a, "-sandbox").contains("elevateprivileges"));
        assert_eq!(one(&a, "-runas"), "berth-qemu");
        assert!(
            !a.iter().any(|s| s == "-no-reboot"),
            "reboots stay inside QEMU"
        );
        for f in ["-nodefaults", "-no-user-config"] {
            assert!(a.iter().any(|s| s == f), "{f} missing");
        }
        assert_eq!(one(&a, "-display"), "none");
        assert_eq!(one(&a, "-name"), "web,debug-threads=on");
        assert!(!a.iter().any(|s| s.contains("pflash") || s == "-object"));
    }

    #[test]
    fn exec_and_agent_ports_share_one_virtio_serial_bus() {
        let mut c = microvm();
        c.tap_fd = -1;
        c.exec_socket = Some("/run/berth/web/exec.sock".into());
        c.qga_socket = Some("/run/berth/web/qga.sock".into());
        let a = qemu_argv(&c);
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-serial-device,id=vser0",
                "virtserialport,chardev=exec0,name=berth.exec",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"
            ]
        );
        assert!(
            values(&a, "-chardev")
                .contains(&"socket,id=qga0,path=/run/berth/web/qga.sock,server=on,wait=off")
        );
        // The agent's port alone still gets its bus.
        c.exec_socket = None;
        let a = qemu_argv(&c);
        assert_eq!(values(&a, "-device").len(), 2);
    }

    #[test]
    fn microvm_without_net_sandbox_runas_uses_stdio_serial() {
        let mut c = microvm();
        c.tap_fd = -1;
        c.sandbox = false;
        c.runas = None;
        c.serial_socket = None;
        let a = qemu_argv(&c);
        assert!(values(&a, "-netdev").is_empty());
        assert!(values(&a, "-device").is_empty());
        assert!(values(&a, "-sandbox").is_empty());
        assert!(values(&a, "-runas").is_empty());
        assert_eq!(one(&a, "-serial"), "stdio");
        assert_eq!(values(&a, "-chardev").len(), 1);
    }

    #[test]
    fn microvm_disks_and_cdrom_are_virtio_mmio() {
        let mut c = microvm();
        c.disks = vec![Disk {
            path: "/d/root.img".into(),
            format: DiskFormat::Raw,
            readonly: true,
            usb: false,
        }];
        c.cdrom = Some("/d/seed.iso".into());
        let a = qemu_argv(&c);
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=/d/root.img,if=none,id=d0,format=raw,readonly=on",
                "file=/d/seed.iso,if=none,id=cd0,format=raw,readonly=on"
            ]
        );
        assert_eq!(
            values(&a, "-device")[1..],
            ["virtio-blk-device,drive=d0", "virtio-blk-device,drive=cd0"]
        );
    }

    #[test]
    fn q35_disk_cdrom_uefi() {
        let mut c = microvm();
        c.name = "fw,1".into();
        c.machine = Machine::Q35;
        c.kernel = None;
        c.initrd = None;
        c.cmdline = None;
        c.firmware = Firmware::Uefi;
        c.ovmf_code = Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into());
        c.ovmf_vars = Some("/var/lib/berth/fw/OVMF_VARS.fd".into());
        c.disks = vec![
            Disk {
                path: "/var/lib/berth/fw/disk,0.qcow2".into(),
                format: DiskFormat::Qcow2,
                readonly: false,
                usb: false,
            },
            Disk {
                path: "/var/lib/berth/fw/data.raw".into(),
                format: DiskFormat::Raw,
                readonly: true,
                usb: false,
            },
        ];
        c.cdrom = Some("/iso/pfsense.iso".into());
        let a = qemu_argv(&c);
        assert_eq!(one(&a, "-M"), "q35");
        assert_eq!(one(&a, "-name"), "fw,,1,debug-threads=on");
        assert!(values(&a, "-kernel").is_empty());
        assert!(values(&a, "-append").is_empty());
        assert!(values(&a, "-boot").is_empty());
        assert_eq!(
            values(&a, "-drive"),
            [
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "if=pflash,format=raw,unit=1,file=/var/lib/berth/fw/OVMF_VARS.fd",
                "file=/iso/pfsense.iso,if=none,id=cd0,format=raw,media=cdrom,readonly=on",
                "file=/var/lib/berth/fw/disk,,0.qcow2,if=none,id=d0,format=qcow2,readonly=off,discard=unmap",
                "file=/var/lib/berth/fw/data.raw,if=none,id=d1,format=raw,readonly=on",
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-net-pci,netdev=n0,mac=52:54:00:be:00:03",
                "ide-cd,drive=cd0,bus=ide.0,bootindex=1",
                "virtio-blk-pci,drive=d0,bootindex=2",
                "virtio-blk-pci,drive=d1,bootindex=3",
            ]
        );
    }

    #[test]
    fn q35_bios_without_cdrom_boots_first_disk() {
        let mut c = microvm();
        c.machine = Machine::Q35;
        c.ovmf_code = Some("/ignored/OVMF_CODE.fd".into());
        c.ovmf_vars = Some("/ignored/OVMF_VARS.fd".into());
        c.disks = vec![Disk {
            path: "/d/a.qcow2".into(),
            format: DiskFormat::Qcow2,
            readonly: false,
            usb: false,
        }];
        let a = qemu_argv(&c);
        assert!(!a.iter().any(|s| s.contains("pflash")), "BIOS: no OVMF");
        assert!(values(&a, "-device").contains(&"virtio-blk-pci,drive=d0,bootindex=1"));
    }

    #[test]
    fn q35_usb_seed_and_microvm_virtio_seed() {
        let mut c = microvm();
        c.machine = Machine::Q35;
        c.disks = vec![
            Disk {
                path: "/d/a.qcow2".into(),
                format: DiskFormat::Qcow2,
                readonly: false,
                usb: false,
            },
            Disk {
                path: "/g/seed.img".into(),
                format: DiskFormat::Raw,
                readonly: true,
                usb: true,
            },
        ];
        let a = qemu_argv(&c);
        let dev = values(&a, "-device");
        assert!(dev.contains(&"qemu-xhci,id=xhci"));
        assert!(dev.contains(&"usb-storage,bus=xhci.0,drive=u1,removable=on"));
        assert!(
            values(&a, "-drive").contains(&"file=/g/seed.img,if=none,id=u1,format=raw,readonly=on")
        );
        c.machine = Machine::Microvm;
        let a = qemu_argv(&c);
        assert!(!a.iter().any(|s| s.contains("xhci")));
        assert!(values(&a, "-device").contains(&"virtio-blk-device,drive=d1"));
    }

    #[test]
    fn hugepages_object_and_backend() {
        let mut c = microvm();
        c.hugepages = true;
        c.memory_mib = 512;
        let a = qemu_argv(&c);
        assert_eq!(
            one(&a, "-object"),
            "memory-backend-file,id=mem,size=512M,mem-path=/dev/hugepages,prealloc=on,share=on"
        );
        assert!(one(&a, "-M").ends_with(",memory-backend=mem"));
        // -m must stay and equal the backend's size (QEMU 7.2 checks).
        assert_eq!(one(&a, "-m"), "512");
        c.machine = Machine::Q35;
        assert_eq!(one(&qemu_argv(&c), "-M"), "q35,memory-backend=mem");
    }

    #[test]
    fn kvm_uses_host_cpu_tcg_uses_max() {
        let mut c = microvm();
        c.accel = Accel::Kvm;
        let a = qemu_argv(&c);
        assert_eq!(one(&a, "-accel"), "kvm");
        assert_eq!(one(&a, "-cpu"), "host");
        c.accel = Accel::Tcg;
        let a = qemu_argv(&c);
        assert_eq!(one(&a, "-accel"), "tcg");
        assert_eq!(one(&a, "-cpu"), "max");
    }

    #[test]
    fn extra_nics_follow_the_management_nic_in_order() {
        let mut c = microvm();
        c.nics = vec![
            NicArg::Tap {
                fd: 4,
                mac: "52:54:12:34:56:01".into(),
            },
            NicArg::Tap {
                fd: 5,
                mac: "52:54:12:34:56:02".into(),
            },
        ];
        let a = qemu_argv(&c);
        assert_eq!(
            values(&a, "-netdev"),
            ["tap,id=n0,fd=3", "tap,id=n1,fd=4", "tap,id=n2,fd=5"]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-net-device,netdev=n0,mac=52:54:00:be:00:03",
                "virtio-net-device,netdev=n1,mac=52:54:12:34:56:01",
                "virtio-net-device,netdev=n2,mac=52:54:12:34:56:02",
            ]
        );
        // q35: virtio-net-pci, and a passed-through NIC as vfio-pci.
        c.machine = Machine::Q35;
        c.nics.push(NicArg::Vfio {
            host: "0000:03:00.0".into(),
        });
        let a = qemu_argv(&c);
        assert_eq!(
            values(&a, "-device")[..4],
            [
                "virtio-net-pci,netdev=n0,mac=52:54:00:be:00:03",
                "virtio-net-pci,netdev=n1,mac=52:54:12:34:56:01",
                "virtio-net-pci,netdev=n2,mac=52:54:12:34:56:02",
                "vfio-pci,host=0000:03:00.0,id=hostnic3",
            ]
        );
        assert_eq!(values(&a, "-netdev").len(), 3, "vfio needs no netdev");
    }

    #[test]
    fn argv_is_deterministic() {
        assert_eq!(qemu_argv(&microvm()), qemu_argv(&microvm()));
    }

    #[test]
    fn mac_format_and_uniqueness() {
        assert_eq!(mac_for_index(0), "52:54:00:be:00:00");
        assert_eq!(mac_for_index(0x1234), "52:54:00:be:12:34");
        assert_eq!(mac_for_index(0x10000), "52:54:be:01:00:00");
        let mut seen = HashSet::new();
        for i in (0..70_000u32).chain([0xff_ffff, 0x12_3456]) {
            let m = mac_for_index(i);
            let bytes: Vec<u8> = m
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).expect("hex"))
                .collect();
            assert_eq!(bytes.len(), 6, "{m}");
            assert_eq!(bytes[0] & 1, 0, "unicast: {m}");
            assert_eq!(bytes[0] & 2, 2, "locally administered: {m}");
            assert!(seen.insert(m.clone()), "duplicate {m} for {i}");
        }
        assert_eq!(mac_for_index(7), mac_for_index(7));
    }

    #[test]
    fn config_serde_lowercase() {
        let j = serde_json::to_value(microvm()).expect("serialize");
        assert_eq!(j["machine"], "microvm");
        assert_eq!(j["accel"], "tcg");
        assert_eq!(j["firmware"], "bios");
        let back: VmConfig = serde_json::from_value(j).expect("deserialize");
        assert_eq!(back, microvm());
        assert_eq!(
            serde_json::to_value(DiskFormat::Qcow2).expect("serialize"),
            "qcow2"
        );
        assert_eq!(
            serde_json::to_value(Machine::Q35).expect("serialize"),
            "q35"
        );
    }
}
