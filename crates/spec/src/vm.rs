//! VM fields of a guest (`kind = "vm"`): what the spec says and what
//! validation makes of it.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ByteSize;
use crate::validate::HostProbe;

/// QEMU machine type.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Direct kernel boot, virtio-mmio devices, no firmware (fast).
    #[default]
    Microvm,
    /// A PC with PCI and firmware (SeaBIOS, or OVMF with `firmware = "uefi"`),
    /// booting from `disks`/`cdrom` (or a `kernel`), for guests like pfSense.
    Q35,
}

/// Accelerator choice in the spec (`BERTH_ACCEL` overrides it).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when a probe proves it works, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// One disk of a VM: `{ path, size, format, readonly }`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Absolute path of the image. With `image` it may be left out: berth
    /// keeps the disk under its state dir (`disks/GUEST/diskN.FMT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Make the disk from `[image.NAME]`: a qcow2 overlay backed by the
    /// cached image (or, with format = "raw", a copy), grown to `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Create the image (sparse) with this size when it does not exist. An
    /// existing image is never overwritten or resized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// "raw" or "qcow2"; default from the file extension (.qcow2), else raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
}

/// A validated disk.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Disk {
    /// Absolute, or relative to `disks/GUEST/` under the state dir (a disk
    /// berth made from an image and manages; see [`Disk::managed`]).
    pub path: PathBuf,
    /// The image the disk is made from, if any (a key of [`Vm::images`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub size: Option<u64>,
    pub format: DiskFormat,
    pub readonly: bool,
}

/// The validated VM part of a guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Vm {
    pub machine: Machine,
    pub accel: AccelChoice,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line as written in the spec (berth appends `ip=` etc.
    /// at start, see `ip_cmdline`).
    pub cmdline: String,
    /// Append `ip=<guest>::<host>:255.255.255.255:<name>:eth0:off` (and
    /// `berth.ip6=`/`berth.gw6=`) to a direct-kernel boot's command line.
    pub ip_cmdline: bool,
    pub disks: Vec<Disk>,
    pub cdrom: Option<PathBuf>,
    pub firmware: Firmware,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Host CPUs for the vCPU threads (vCPU i on `cpu_pinning[i % len]`).
    pub cpu_pinning: Vec<usize>,
    /// Host CPUs for QEMU's other threads; empty = the CPUs not in `cpu_pinning`.
    pub emulator_cpus: Vec<usize>,
    /// No other pinned VM may use this VM's `cpu_pinning` CPUs.
    pub exclusive: bool,
    pub hugepages: bool,
    /// The images this VM uses (by name), as validated: `image:NAME` paths
    /// and disk images resolve through these.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<String, crate::image::Image>,
    /// A seed volume attached read-only after the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<crate::image::Seed>,
}

impl Disk {
    /// A disk berth keeps under `disks/GUEST/` (no path in the spec): made
    /// from its image at the first start, deleted with the guest.
    pub fn managed(&self) -> bool {
        self.path.is_relative()
    }
}

/// Directory of a guest's managed disks under the state dir.
pub fn managed_disk_dir(state_dir: &Path, guest: &str) -> PathBuf {
    state_dir.join("disks").join(guest)
}

/// Where Debian/NixOS ship OVMF's code image.
pub const OVMF_PATHS: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE.fd",
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/qemu/OVMF.fd",
    "/run/libvirt/nix-ovmf/OVMF_CODE.fd",
];

/// The OVMF image found by `probe`, if any.
pub fn find_ovmf(probe: &dyn HostProbe) -> Option<PathBuf> {
    OVMF_PATHS
        .iter()
        .map(Path::new)
        .find(|p| probe.exists(p))
        .map(Path::to_path_buf)
}

/// Default format from the file name.
pub fn format_of(path: &Path) -> DiskFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    }
}
