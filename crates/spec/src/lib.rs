//! The berth spec: serde types for the spec file (TOML or JSON, one schema),
//! loading and parsing with file:line:column errors, the JSON schema, and
//! validation into a typed [`Desired`] state.
//!
//! Nothing here touches the host except [`load`], which reads the spec file.
//! Host facts validation needs (does the rootfs exist, does the uplink
//! interface exist) come through a [`HostProbe`] the caller passes in.
//!
//! ```toml
//! [host]
//! uplink = "eth0"
//! subnet4 = "10.0.0.0/24"
//!
//! [guest.db1]
//! kind = "container"
//! index = 2
//! rootfs = "/var/lib/berth/rootfs/busybox"
//! memory = "128M"
//! ```

mod error;
mod group;
pub mod image;
pub mod nic;
mod nix_cache;
mod size;
mod validate;
pub mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use error::{SpecError, format_errors};
pub use group::{Group, Health, Probe};
pub use nix_cache::{NIX_CACHE_PORT, nix_cache_url};
pub use size::{ByteSize, ParseSizeError};
pub use validate::{
    DEFAULT_COMMAND, DEFAULT_STOP_TIMEOUT_MS, Desired, Guest, Host, HostProbe, MIN_MEMORY, NoProbe,
    parse_duration_ms, validate,
};

/// Default for `host.max_guests`.
pub const DEFAULT_MAX_GUESTS: u32 = 64;

/// A whole spec file.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Host-wide network settings.
    pub host: HostSpec,
    /// Guests by name (1-32 characters of `a-z`, `0-9`, `-`; not starting with `-`).
    #[serde(default)]
    pub guest: BTreeMap<String, GuestSpec>,
    /// Redundancy groups by name: `replicas` identical members
    /// (`NAME-0`, `NAME-1`, ...) made from `template`, optionally behind a
    /// service address (`vip4`/`vip6`) steered to healthy members.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group: BTreeMap<String, GroupSpec>,
    /// Images by name: `[image.NAME]` with `url` and `sha256` (or
    /// `sha256_url`); guests use them as `"image:NAME"` (kernel, initrd,
    /// cdrom) or `disks = [{ image = "NAME", size = "8G" }]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image: BTreeMap<String, image::ImageSpec>,
}

/// The `[host]` table.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Interface NAT goes out of, e.g. "eth0".
    pub uplink: String,
    /// IPv4 network for guest links, e.g. "10.0.0.0/24". The host uses the
    /// network address on every guest link; guest `i` gets network + i.
    pub subnet4: String,
    /// Optional IPv6 network, e.g. "fd42:b:e:1::/64"; guest `i` gets network + i.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    /// Most guests this host runs; indexes go from 1 to max_guests - 1. Default 64.
    #[serde(default = "default_max_guests")]
    pub max_guests: u32,
}

fn default_max_guests() -> u32 {
    DEFAULT_MAX_GUESTS
}

/// One `[guest.NAME]` table.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// "container" or "vm".
    pub kind: GuestKind,
    /// Picks the guest's addresses and link name (`vb{index}`); 1..max_guests-1, unique.
    /// Required for `[guest.NAME]`; group members and companions get theirs
    /// from `index_base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Root directory of a container (absolute; needs /usr and /etc/os-release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Command run in the guest; default ["/sbin/init"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Memory limit: bytes, or a string like "128M" (1024-based). At least 4M.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU quota in CPUs, e.g. 1.5 (> 0, <= 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Start the guest on apply and at daemon start. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Restart policy; default "on-failure".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Environment of the guest's command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How long a stop waits before killing, e.g. "500ms", "10s", "2m" (1ms..1h). Default "10s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<String>,
    /// Container: run on a throw-away overlay of `rootfs` (writes go to
    /// memory and are gone at the next start). The rootfs itself is never
    /// written, so several guests can share it. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// Container: mount `rootfs` read-only (shareable). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Container: host directories mounted into the container,
    /// `[{ source = "/nix/store", target = "/nix/store", read_only = true }]`
    /// (`target` defaults to `source`, `read_only` to true). A container
    /// built from a NixOS `config` gets the host's /nix/store this way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<BindSpec>,

    // ----- VM fields (kind = "vm"); `memory` defaults to 256M, `cpus` is the
    // number of vCPUs (a whole number, default 1).
    /// VM: "microvm" (default; direct kernel boot) or "q35" (firmware, disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<vm::Machine>,
    /// VM: "auto" (default), "kvm" or "tcg"; env BERTH_ACCEL overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<vm::AccelChoice>,
    /// VM: kernel image for a direct boot (required for microvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// VM: initramfs for a direct boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// VM: kernel command line, e.g. "console=ttyS0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// VM: append `ip=<guest>::<host>:255.255.255.255:<name>:eth0:off` to a
    /// direct boot's command line so the guest can configure itself. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_cmdline: Option<bool>,
    /// VM: disks, `[{ path, size, format = "raw"|"qcow2", readonly }]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<vm::DiskSpec>,
    /// VM: an ISO image attached as a CD-ROM (q35; boots first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<PathBuf>,
    /// VM (q35): "bios" (SeaBIOS, default) or "uefi" (OVMF, must be installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<vm::Firmware>,
    /// VM: host CPUs for the vCPU threads, e.g. [4, 5, 6, 7].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pinning: Option<Vec<usize>>,
    /// VM: host CPUs for QEMU's other threads (default: those not in cpu_pinning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_cpus: Option<Vec<usize>>,
    /// VM: no other pinned VM may share this VM's pinned CPUs. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,
    /// VM: back guest memory with 2 MiB hugepages (preallocated). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    /// Configuration backup: `berth backup NAME` runs `command` in the guest
    /// (through exec) and stores its output encrypted to `recipients`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Backup>,
    /// VM: a pre-seeded volume attached read-only: `{ kind = "nocloud",
    /// user_data, meta_data, network_config }` (cloud-init) or `{ kind =
    /// "files", label, files = { NAME = "text or /path" } }` (e.g. pfSense's
    /// config.xml on a USB disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<image::SeedSpec>,
    /// Serve this host's Nix store to the guest as a binary cache at
    /// `http://<host address on its link>:5480` (see [`NIX_CACHE_PORT`])
    /// and point the guest's Nix at it: containers get `NIX_CONFIG`
    /// (`extra-substituters = URL`) and `BERTH_NIX_CACHE=URL` in their
    /// environment, VMs `berth.nix_cache=URL` on their kernel command line.
    /// Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_cache: Option<bool>,
    /// Health probe, e.g. `{ tcp = 80 }`,
    /// `{ http = "http://{addr}:80/health", expect = 200 }` or
    /// `{ exec = ["pgrep", "httpd"] }`, with `interval`, `timeout`,
    /// `healthy_after`, `unhealthy_after`. Shown in `berth ps`; group
    /// members must pass it to carry the service address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// Group templates only: containers started with each member and tied
    /// to its life (each needs `name` and `index_base`), e.g. one database
    /// per router VM. With `ephemeral = true` their state is wiped on every
    /// restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<GuestSpec>,
    /// Companions only: its name; member `web-0`'s companion `db` is `web-0-db`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Companions only: member `i`'s companion gets index `index_base + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_base: Option<u32>,
    /// Extra NICs after the routed management link, in order (eth1, eth2,
    /// ... in the guest): `[[guest.NAME.nic]]` with `mode = "macvtap"`
    /// (`parent`), `"segment"` (`segment`) or `"vfio"` (`pci`, `bind`), and
    /// optional `mac`, `addr`. Containers may join segments only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nic: Vec<nic::NicSpec>,
}

/// `[group.NAME]`: identical members behind one service address.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Number of members, `NAME-0` .. `NAME-{replicas-1}`. Changing it adds
    /// or removes members (the highest first) and touches nothing else.
    pub replicas: u32,
    /// Member `i` gets index `index_base + i`.
    pub index_base: u32,
    /// IPv4 service address, routed by the host to a healthy member (must
    /// lie outside `host.subnet4`). Members accept it as a local address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip4: Option<String>,
    /// IPv6 service address (outside `host.subnet6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<String>,
    /// "active" (default): the route points at one healthy member and moves
    /// only when it fails; "ecmp": a multipath route over all healthy members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<VipMode>,
    /// Members updated at once in a rolling update. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Healthy members a rolling update never goes below. Default
    /// `replicas - max_parallel` (at least 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<u32>,
    /// How long an updated member must stay healthy before the next one is
    /// touched. Default "1s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_time: Option<String>,
    /// How long an updated member may take to become healthy before the
    /// update counts as failed. Default "60s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_deadline: Option<String>,
    /// Go back to the previous spec when an updated member does not become
    /// healthy in time. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_revert: Option<bool>,
    /// How long a member keeps serving after the service address moved off
    /// it, before it is stopped (requests in flight finish). Default "500ms".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_time: Option<String>,
    /// The guest every member is made from (a `[guest.NAME]` table without
    /// `index`).
    pub template: GuestSpec,
}

/// How a group's service address is routed.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VipMode {
    /// One healthy member at a time; moves only when it fails.
    #[default]
    Active,
    /// Spread over every healthy member (multipath route).
    Ecmp,
}

impl std::fmt::Display for VipMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VipMode::Active => "active",
            VipMode::Ecmp => "ecmp",
        })
    }
}

/// `health = { tcp = PORT }`, `{ http = URL, expect = CODE }` or
/// `{ exec = [...] }`; exactly one probe.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Connect to this TCP port of the guest's IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// GET this URL; `{addr}` is replaced by the guest's IPv4 address, e.g.
    /// "http://{addr}:80/health".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// HTTP status that counts as healthy. Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<u16>,
    /// Run this command in the guest (berth exec); exit code 0 is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// Time between probes. Default "1s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// A probe taking longer fails. Default "1s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Consecutive passes to become healthy. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_after: Option<u32>,
    /// Consecutive failures to become unhealthy. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_after: Option<u32>,
}

/// One entry of a container's `binds`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BindSpec {
    /// Absolute path of an existing host directory or file.
    pub source: PathBuf,
    /// Where it appears in the container (absolute); default: `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    /// Mount it read-only. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// A validated bind mount: host `source` at `target` in the container.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// `backup = { command = [...], restore_command = [...], recipients = ["age1..."] }`
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Prints the configuration on stdout, e.g. ["cat", "/conf/config.xml"].
    pub command: Vec<String>,
    /// Reads a configuration on stdin and installs it (`berth restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_command: Option<Vec<String>>,
    /// age recipients (`age1...`) the backups are encrypted to.
    pub recipients: Vec<String>,
}

/// What runs the guest.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// A systemd-nspawn container.
    Container,
    /// A QEMU virtual machine.
    Vm,
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestKind::Container => "container",
            GuestKind::Vm => "vm",
        })
    }
}

/// When the supervisor restarts a guest whose command exited.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After any exit.
    Always,
    /// After a non-zero exit or a signal.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

/// Spec file syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
    /// A Nix expression evaluating to the spec (see [`load`]).
    Nix,
}

impl Format {
    /// Picks the format from the file extension (`.toml`, `.json`).
    pub fn from_path(path: &Path) -> Result<Format, SpecError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "toml" => Ok(Format::Toml),
            "json" => Ok(Format::Json),
            "nix" => Ok(Format::Nix),
            "" => Err(SpecError::Unsupported {
                file: path.to_path_buf(),
                reason: "spec file has no extension; supported are .toml, .json and .nix".into(),
            }),
            other => Err(SpecError::Unsupported {
                file: path.to_path_buf(),
                reason: format!(
                    "unsupported spec file extension `.{other}`; supported are .toml, .json and .nix"
                ),
            }),
        }
    }
}

/// Parses spec text. `file` is only used in error messages.
pub fn parse(text: &str, format: Format, file: &Path) -> Result<Spec, SpecError> {
    match format {
        Format::Toml => toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            SpecError::Parse {
                file: file.to_path_buf(),
                line,
                column,
                message: e.message().trim_end().to_string(),
            }
        }),
        // `text` is what the Nix expression evaluated to (JSON); positions in
        // it mean nothing to the author, so name the problem only.
        Format::Nix => serde_json::from_str(text).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            SpecError::Unsupported {
                file: file.to_path_buf(),
                reason: format!(
                    "evaluates to something that is not a spec: {}",
                    full.strip_suffix(&suffix).unwrap_or(&full)
                ),
            }
        }),
        Format::Json => serde_json::from_str(text).map_err(|e| {
            let (line, column) = (e.line(), e.column());
            let full = e.to_string();
            let suffix = format!(" at line {line} column {column}");
            let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
            SpecError::Parse {
                file: file.to_path_buf(),
                line,
                column,
                message,
            }
        }),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Reads and parses a spec file; the format comes from its extension. A
/// `.nix` file is evaluated with `nix-instantiate --eval --strict --json`
/// (the one IO this crate does besides reading files), and must evaluate to
/// an attribute set of the same shape as the TOML/JSON spec.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let format = Format::from_path(path)?;
    if format == Format::Nix {
        let json = nix_eval(path)?;
        return parse(&json, Format::Nix, path);
    }
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&text, format, path)
}

/// Evaluates a Nix file to JSON; Nix's own message (with its file, line and
/// a pointer into the source) is the error.
fn nix_eval(path: &Path) -> Result<String, SpecError> {
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(path)
        // Quiet a warning about the build group on hosts without a Nix daemon.
        .env("NIX_CONFIG", "build-users-group =")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| SpecError::Unsupported {
            file: path.to_path_buf(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "nix-instantiate not found: .nix specs need Nix (NixOS has it; Debian: apt-get install nix-bin)".into()
            } else {
                format!("cannot run nix-instantiate: {e}")
            },
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("warning:"))
            .collect();
        return Err(SpecError::Unsupported {
            file: path.to_path_buf(),
            reason: format!("Nix evaluation failed:\n{}", message.join("\n").trim_end()),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| SpecError::Unsupported {
        file: path.to_path_buf(),
        reason: "Nix evaluation printed something that is not UTF-8".into(),
    })
}

/// JSON schema of [`Spec`] (for editors and the API docs).
pub fn json_schema() -> serde_json::Value {
    schemars::schema_for!(Spec).to_value()
}
