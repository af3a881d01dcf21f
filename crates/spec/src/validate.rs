//! Validation: [`Spec`] -> [`Desired`], reporting every problem at once.
//!
//! Addressing: the host uses the network address of `subnet4` (and of
//! `subnet6`) as a /32 (/128) on every guest link; guest `i` gets network + i.
//! Indexes run from 1 to `max_guests - 1`, so a subnet with `h` host bits can
//! serve `max_guests <= 2^h - 1` (this also keeps the IPv4 broadcast address
//! unused).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{ByteSize, GuestKind, GuestSpec, HostSpec, RestartPolicy, Spec, SpecError};

/// Command run when a guest does not set one.
pub const DEFAULT_COMMAND: &str = "/sbin/init";
/// Stop timeout when a guest does not set one.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// Smallest memory limit accepted (4 MiB).
pub const MIN_MEMORY: u64 = 4 << 20;
const MAX_STOP_TIMEOUT_MS: u64 = 3_600_000;
const MAX_MAX_GUESTS: u32 = 4096;
const MAX_CPUS: f64 = 1024.0;

/// Facts about the host that validation needs; the daemon/CLI pass a real
/// one, tests a fake.
pub trait HostProbe {
    /// `p` exists and is a directory (following symlinks).
    fn is_dir(&self, p: &Path) -> bool;
    /// `p` exists (a dangling symlink counts: a rootfs may link into itself).
    fn exists(&self, p: &Path) -> bool;
    /// Whether a network interface of that name exists; `None` = cannot tell.
    fn interface_exists(&self, name: &str) -> Option<bool>;
    /// The host's online CPUs; `None` = cannot tell.
    fn host_cpus(&self) -> Option<Vec<usize>> {
        None
    }
    /// Whether KVM works here (`Err(reason)` if not); `None` = cannot tell.
    fn kvm(&self) -> Option<Result<(), String>> {
        None
    }
    /// Why PCI device `pci` cannot be passed through to a VM (missing, not
    /// bound to vfio-pci while `bind` is false, no IOMMU, an incomplete
    /// IOMMU group); `None` = it can, or cannot tell.
    fn vfio_problem(&self, _pci: &str, _bind: bool) -> Option<String> {
        None
    }
}

/// A probe that knows nothing: every path exists, interfaces are unknown.
/// Use it for pure validation (e.g. checking a spec on another machine).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProbe;

impl HostProbe for NoProbe {
    fn is_dir(&self, _: &Path) -> bool {
        true
    }
    fn exists(&self, _: &Path) -> bool {
        true
    }
    fn interface_exists(&self, _: &str) -> Option<bool> {
        None
    }
}

/// The validated, typed spec: what the planner wants the host to look like.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Desired {
    pub host: Host,
    pub guests: BTreeMap<String, Guest>,
    /// Redundancy groups; their members are in `guests`.
    #[serde(default)]
    pub groups: BTreeMap<String, crate::Group>,
    /// Every valid `[image.NAME]`, used by a guest or not (`berth image pull`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, crate::image::Image>,
}

/// Validated host settings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Host {
    pub uplink: String,
    pub subnet4: Ipv4Net,
    pub subnet6: Option<Ipv6Net>,
    pub max_guests: u32,
}

/// One validated guest with everything derived (link name, addresses) and
/// every default filled in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Guest {
    pub name: String,
    pub kind: GuestKind,
    pub index: u32,
    /// Host-side link name, `vb{index}`.
    pub link: String,
    /// Guest address: subnet4 network + index.
    pub addr4: Ipv4Addr,
    /// Host address on the link: the subnet4 network address.
    pub host4: Ipv4Addr,
    pub addr6: Option<Ipv6Addr>,
    pub host6: Option<Ipv6Addr>,
    pub rootfs: PathBuf,
    pub command: Vec<String>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub autostart: bool,
    pub restart: RestartPolicy,
    pub env: BTreeMap<String, String>,
    pub stop_timeout_ms: u64,
    /// Writes go to a throw-away overlay; the rootfs stays untouched.
    #[serde(default)]
    pub ephemeral: bool,
    /// The rootfs is mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Host paths mounted into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<crate::Bind>,
    /// The VM part (`kind = "vm"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vm::Vm>,
    /// Configuration backup (`berth backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::Backup>,
    /// Health check run by the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::Health>,
    /// The group this guest is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The member this companion belongs to (started and stopped with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion_of: Option<String>,
    /// The daemon serves the host's Nix store to this guest as a binary
    /// cache ([`crate::nix_cache_url`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nix_cache: bool,
    /// Service addresses the guest accepts as local (its group's VIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Ipv6Addr>,
    /// Extra NICs (eth1, eth2, ... in the guest), see [`crate::nic`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::nic::Nic>,
}

impl Guest {
    /// The container writes into its rootfs directory itself, so
    /// systemd-nspawn holds an exclusive lock on it.
    pub fn writes_rootfs(&self) -> bool {
        !self.ephemeral && !self.read_only
    }
}

impl Guest {
    /// The guest's addresses, IPv4 first: `["10.0.0.2", "fd42:b:e:1::2"]`.
    pub fn addresses(&self) -> Vec<String> {
        let mut v = vec![self.addr4.to_string()];
        if let Some(a) = self.addr6 {
            v.push(a.to_string());
        }
        v
    }
}

impl Host {
    /// Guest and host IPv4 addresses for an index.
    pub fn addr4(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet4.network()).wrapping_add(index))
    }

    /// Guest IPv6 address for an index, if IPv6 is configured.
    pub fn addr6(&self, index: u32) -> Option<Ipv6Addr> {
        self.subnet6
            .map(|n| Ipv6Addr::from(u128::from(n.network()).wrapping_add(u128::from(index))))
    }
}

/// Parses a duration such as "500ms", "10s", "2m" or "1h" into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid duration \"{s}\": use a whole number with a unit ms, s, m or h, e.g. \"500ms\", \"10s\", \"2m\""
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a Path,
    pub(crate) errors: Vec<SpecError>,
    /// Valid images, and the names of all declared ones (an invalid image
    /// is reported once, not again at every use).
    pub(crate) images: BTreeMap<String, crate::image::Image>,
    pub(crate) image_names: Vec<String>,
}

impl Ctx<'_> {
    pub(crate) fn host(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(SpecError::Invalid {
            file: self.file.to_path_buf(),
            guest: None,
            field: field.to_string(),
            reason: reason.into(),
        });
    }

    pub(crate) fn guest(&mut self, guest: &str, field: &str, reason: impl Into<String>) {
        self.errors.push(SpecError::Invalid {
            file: self.file.to_path_buf(),
            guest: Some(guest.to_string()),
            field: field.to_string(),
            reason: reason.into(),
        });
    }
}

/// Checks a parsed spec against the rules and the host, returning the typed
/// desired state or every error found (never just the first).
pub fn validate(
    spec: &Spec,
    file: &Path,
    probe: &dyn HostProbe,
) -> Result<Desired, Vec<SpecError>> {
    let mut cx = Ctx {
        file,
        errors: Vec::new(),
        images: BTreeMap::new(),
        image_names: spec.image.keys().cloned().collect(),
    };
    let (images, image_errors) = crate::image::validate_images(&spec.image);
    for (name, reason) in image_errors {
        cx.host(&format!("image.{name}"), reason);
    }
    cx.images = images;
    let host = validate_host(&mut cx, &spec.host, probe);
    let max_guests = (1..=MAX_MAX_GUESTS)
        .contains(&spec.host.max_guests)
        .then_some(spec.host.max_guests);

    let expanded = crate::group::expand(&mut cx, spec);
    let groups = crate::group::validate_groups(&mut cx, spec, host.as_ref());
    let mut guests = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &expanded {
        *seen.entry(e.name.as_str()).or_default() += 1;
    }
    for (name, n) in &seen {
        if *n > 1 {
            cx.guest(name, "name", format!("`{name}` is declared more than once (a `[guest.{name}]` and a group member or companion of the same name?); rename one"));
        }
    }
    // A mistake in a template is reported once, not once per member.
    let mut template_errors: std::collections::BTreeSet<(String, String, String)> =
        Default::default();
    for e in &expanded {
        if e.spec.index.is_none() {
            continue; // reported by expand()
        }
        let before = cx.errors.len();
        let validated = validate_guest(&mut cx, &e.name, &e.spec, max_guests, host.as_ref(), probe);
        if let Some(owner) = e.group.clone().or_else(|| e.companion_of.clone()) {
            let new: Vec<SpecError> = cx.errors.drain(before..).collect();
            for err in new {
                match err {
                    SpecError::Invalid {
                        file,
                        guest: Some(g),
                        field,
                        reason,
                    } => {
                        if template_errors.insert((owner.clone(), field.clone(), reason.clone())) {
                            let whose = if e.group.is_some() {
                                format!("the template of group `{owner}`")
                            } else {
                                format!("a companion of `{owner}`")
                            };
                            cx.errors.push(SpecError::Invalid {
                                file,
                                guest: Some(g),
                                field,
                                reason: format!("{reason} (from {whose})"),
                            });
                        }
                    }
                    other => cx.errors.push(other),
                }
            }
        }
        if let Some(mut guest) = validated {
            guest.group = e.group.clone();
            guest.companion_of = e.companion_of.clone();
            guest.vip4 = e.vip4;
            guest.vip6 = e.vip6;
            guests.insert(e.name.clone(), guest);
        }
    }

    // Index clashes: one error per extra guest on an index, naming the first.
    let mut by_index: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for e in &expanded {
        if let Some(i) = e.spec.index {
            by_index.entry(i).or_default().push(&e.name);
        }
    }
    for (index, mut names) in by_index {
        names.sort_unstable();
        if let Some((first, rest)) = names.split_first() {
            for other in rest {
                cx.errors.push(SpecError::IndexClash {
                    file: file.to_path_buf(),
                    a: (*first).to_string(),
                    b: (*other).to_string(),
                    index,
                });
            }
        }
    }

    // Exclusive pinning: no two pinned VMs share a CPU if either asks for it.
    let pinned: Vec<(&String, &crate::vm::Vm)> = guests
        .iter()
        .filter_map(|(n, g)| g.vm.as_ref().map(|v| (n, v)))
        .filter(|(_, v)| !v.cpu_pinning.is_empty())
        .collect();
    for (i, (a, va)) in pinned.iter().enumerate() {
        for (b, vb) in &pinned[i + 1..] {
            if !(va.exclusive || vb.exclusive) {
                continue;
            }
            let shared: Vec<String> = va
                .cpu_pinning
                .iter()
                .filter(|c| vb.cpu_pinning.contains(c))
                .map(|c| c.to_string())
                .collect();
            if !shared.is_empty() {
                cx.errors.push(SpecError::Invalid {
                    file: file.to_path_buf(),
                    guest: Some((*a).clone()),
                    field: "cpu_pinning".into(),
                    reason: format!(
                        "CPU {} is pinned by both `{a}` and `{b}`, and {} asks for exclusive CPUs; pin them to different CPUs or drop `exclusive`",
                        shared.join(", "),
                        if va.exclusive { a.as_str() } else { b.as_str() }
                    ),
                });
            }
        }
    }

    // One MAC per NIC, one VM per passed-through PCI device.
    crate::nic::validate_across(&mut cx, &guests);

    // A writable rootfs is locked by systemd-nspawn for one container.
    let mut by_rootfs: BTreeMap<&Path, Vec<&Guest>> = BTreeMap::new();
    for g in guests.values().filter(|g| g.kind == GuestKind::Container) {
        by_rootfs.entry(g.rootfs.as_path()).or_default().push(g);
    }
    for (rootfs, users) in by_rootfs {
        if users.len() > 1
            && let Some(w) = users.iter().find(|g| g.writes_rootfs())
        {
            let other = users
                .iter()
                .find(|g| g.name != w.name)
                .map(|g| g.name.as_str())
                .unwrap_or("");
            cx.errors.push(SpecError::Invalid {
                    file: file.to_path_buf(),
                    guest: Some(w.name.clone()),
                    field: "rootfs".into(),
                    reason: format!(
                        "rootfs {} is also used by guest `{other}`, and `{}` would write into it (systemd-nspawn locks a writable rootfs for one container); set `ephemeral = true` or `read_only = true` on the guests sharing it, or give each its own copy",
                        rootfs.display(),
                        w.name
                    ),
                });
        }
    }

    match host {
        Some(host) if cx.errors.is_empty() => Ok(Desired {
            host,
            guests,
            groups,
            images: cx.images,
        }),
        _ => Err(cx.errors),
    }
}

fn validate_host(cx: &mut Ctx<'_>, h: &HostSpec, probe: &dyn HostProbe) -> Option<Host> {
    let mut ok = true;
    if h.uplink.is_empty() {
        cx.host(
            "host.uplink",
            "must name the interface NAT goes out of, e.g. \"eth0\" (list them with `ip link`)",
        );
        ok = false;
    } else if h.uplink.len() > 15
        || h.uplink == "."
        || h.uplink == ".."
        || h.uplink
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        cx.host(
            "host.uplink",
            format!(
                "`{}` is not a valid interface name (at most 15 characters, no '/', ':' or spaces)",
                h.uplink
            ),
        );
        ok = false;
    } else if probe.interface_exists(&h.uplink) == Some(false) {
        cx.host(
            "host.uplink",
            format!(
                "interface `{}` does not exist on this host (list them with `ip link`)",
                h.uplink
            ),
        );
        ok = false;
    }

    let max_ok = (1..=MAX_MAX_GUESTS).contains(&h.max_guests);
    if !max_ok {
        cx.host(
            "host.max_guests",
            format!("{} is out of range; use 1..={MAX_MAX_GUESTS}", h.max_guests),
        );
        ok = false;
    }

    let subnet4 = match h.subnet4.parse::<Ipv4Net>() {
        Err(_) => {
            cx.host(
                "host.subnet4",
                format!(
                    "\"{}\" is not an IPv4 network; use CIDR form like \"10.0.0.0/24\"",
                    h.subnet4
                ),
            );
            None
        }
        Ok(net) if net.trunc() != net => {
            cx.host(
                "host.subnet4",
                format!(
                    "{net} has host bits set; use {} (the network address)",
                    net.trunc()
                ),
            );
            None
        }
        Ok(net) => {
            let host_bits = 32 - u32::from(net.prefix_len());
            let fits = check_capacity(
                cx,
                "host.subnet4",
                &net.to_string(),
                host_bits,
                32,
                h.max_guests,
                max_ok,
            );
            fits.then_some(net)
        }
    };

    let subnet6 = match &h.subnet6 {
        None => Some(None),
        Some(s) => {
            match s.parse::<Ipv6Net>() {
                Err(_) => {
                    cx.host(
                        "host.subnet6",
                        format!(
                            "\"{s}\" is not an IPv6 network; use CIDR form like \"fd42:b:e:1::/64\""
                        ),
                    );
                    None
                }
                Ok(net) if net.trunc() != net => {
                    cx.host(
                        "host.subnet6",
                        format!(
                            "{net} has host bits set; use {} (the network address)",
                            net.trunc()
                        ),
                    );
                    None
                }
                Ok(net) if net.prefix_len() > 126 => {
                    cx.host(
                    "host.subnet6",
                    format!("{net} is too small; the prefix must be /126 or shorter (a /64 is usual)"),
                );
                    None
                }
                Ok(net) => {
                    let host_bits = 128 - u32::from(net.prefix_len());
                    let fits = check_capacity(
                        cx,
                        "host.subnet6",
                        &net.to_string(),
                        host_bits,
                        128,
                        h.max_guests,
                        max_ok,
                    );
                    fits.then_some(Some(net))
                }
            }
        }
    };

    match (ok, subnet4, subnet6) {
        (true, Some(subnet4), Some(subnet6)) => Some(Host {
            uplink: h.uplink.clone(),
            subnet4,
            subnet6,
            max_guests: h.max_guests,
        }),
        _ => None,
    }
}

/// A subnet with `host_bits` host bits holds `2^host_bits - 1` guest
/// addresses (the network address is the host's); `max_guests` must fit.
fn check_capacity(
    cx: &mut Ctx<'_>,
    field: &str,
    net: &str,
    host_bits: u32,
    bits: u32,
    max_guests: u32,
    max_ok: bool,
) -> bool {
    if !max_ok || host_bits >= 32 {
        return true;
    }
    let holds = (1u64 << host_bits) - 1;
    if u64::from(max_guests) <= holds {
        return true;
    }
    // Smallest h with 2^h - 1 >= max_guests.
    let mut need = host_bits;
    while (1u64 << need) - 1 < u64::from(max_guests) {
        need += 1;
    }
    cx.host(
        field,
        format!(
            "{net} holds {holds} guest addresses but max_guests is {max_guests}; use a /{} or larger, or lower max_guests",
            bits - need
        ),
    );
    false
}

/// `[a-z0-9][a-z0-9-]*`, 1..=32 characters.
pub(crate) fn valid_guest_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=32).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

fn validate_guest(
    cx: &mut Ctx<'_>,
    name: &str,
    g: &GuestSpec,
    max_guests: Option<u32>,
    host: Option<&Host>,
    probe: &dyn HostProbe,
) -> Option<Guest> {
    let before = cx.errors.len();

    if !valid_guest_name(name) {
        cx.guest(
            name,
            "name",
            "guest names must be 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit (they are used in file and machine names)",
        );
    }

    let vm = match g.kind {
        GuestKind::Vm => validate_vm(cx, name, g, probe),
        GuestKind::Container => {
            reject_vm_fields(cx, name, g);
            None
        }
    };

    let index = g.index.unwrap_or(0);
    if index == 0 {
        let upper = max_guests.map_or_else(|| "max_guests-1".to_string(), |m| (m - 1).to_string());
        cx.guest(
            name,
            "index",
            format!("index 0 is the host's address on every guest link; use 1..{upper}"),
        );
    } else if let Some(m) = max_guests.filter(|&m| index >= m) {
        let reason = if m > 1 {
            format!(
                "index {} is out of range; use 1..{} (host.max_guests is {m}; raise it for more)",
                index,
                m - 1
            )
        } else {
            format!(
                "index {} is out of range; host.max_guests is {m}, which leaves no guest indexes; raise it",
                index
            )
        };
        cx.guest(name, "index", reason);
    }

    if g.kind == GuestKind::Vm {
        for (field, set) in [
            ("rootfs", g.rootfs.is_some()),
            ("command", g.command.is_some()),
            ("ephemeral", g.ephemeral.is_some()),
            ("read_only", g.read_only.is_some()),
            ("binds", !g.binds.is_empty()),
            ("env", !g.env.is_empty()),
        ] {
            if set {
                cx.guest(name, field, format!("`{field}` applies to containers; a VM runs its kernel or disks (see `kernel`, `disks`)"));
            }
        }
    }

    let rootfs = match (&g.rootfs, g.kind) {
        (None, GuestKind::Container) => {
            cx.guest(
                name,
                "rootfs",
                "a container needs a rootfs: the absolute path of a directory with /usr and /etc/os-release",
            );
            PathBuf::new()
        }
        (None, GuestKind::Vm) => PathBuf::new(),
        (Some(p), _) if !p.is_absolute() => {
            cx.guest(
                name,
                "rootfs",
                format!("rootfs {} must be an absolute path", p.display()),
            );
            p.clone()
        }
        (Some(p), kind) => {
            if !probe.is_dir(p) {
                cx.guest(
                    name,
                    "rootfs",
                    format!(
                        "rootfs {} does not exist or is not a directory",
                        p.display()
                    ),
                );
            } else if kind == GuestKind::Container {
                let missing: Vec<&str> = ["usr", "etc/os-release"]
                    .into_iter()
                    .filter(|sub| !probe.exists(&p.join(sub)))
                    .collect();
                if !missing.is_empty() {
                    let list = missing
                        .iter()
                        .map(|m| format!("/{m}"))
                        .collect::<Vec<_>>()
                        .join(" and ");
                    cx.guest(
                        name,
                        "rootfs",
                        format!(
                            "rootfs {} has no {list}; systemd-nspawn needs /usr and /etc/os-release in the root directory",
                            p.display()
                        ),
                    );
                }
            }
            p.clone()
        }
    };

    let binds = validate_binds(cx, name, &g.binds, probe);

    let command = match &g.command {
        None => vec![DEFAULT_COMMAND.to_string()],
        Some(c) if c.is_empty() => {
            cx.guest(
                name,
                "command",
                format!("command is empty; give the program and its arguments, or leave it out to run {DEFAULT_COMMAND}"),
            );
            Vec::new()
        }
        Some(c) => {
            if c[0].is_empty() {
                cx.guest(
                    name,
                    "command",
                    "the first element (the program to run) is empty",
                );
            }
            if c.iter().any(|a| a.contains('\0')) {
                cx.guest(name, "command", "arguments must not contain NUL characters");
            }
            c.clone()
        }
    };

    if let Some(m) = g.memory.filter(|m| m.0 < MIN_MEMORY) {
        cx.guest(
            name,
            "memory",
            format!(
                "memory {m} is too small; use at least {}",
                ByteSize(MIN_MEMORY)
            ),
        );
    }

    if let Some(c) = g
        .cpus
        .filter(|c| !(c.is_finite() && *c > 0.0 && *c <= MAX_CPUS))
    {
        cx.guest(
            name,
            "cpus",
            format!(
                "cpus {c} is out of range; use a number of CPUs above 0 and at most 1024, e.g. 1.5"
            ),
        );
    }

    let stop_timeout_ms = match &g.stop_timeout {
        None => DEFAULT_STOP_TIMEOUT_MS,
        Some(s) => match parse_duration_ms(s) {
            Err(e) => {
                cx.guest(name, "stop_timeout", e);
                DEFAULT_STOP_TIMEOUT_MS
            }
            Ok(ms) if !(1..=MAX_STOP_TIMEOUT_MS).contains(&ms) => {
                cx.guest(
                    name,
                    "stop_timeout",
                    format!("stop_timeout \"{s}\" is out of range; use 1ms..1h"),
                );
                ms
            }
            Ok(ms) => ms,
        },
    };

    for (k, v) in &g.env {
        if k.is_empty() {
            cx.guest(name, "env", "environment variable names must not be empty");
        } else if k.contains('=') || k.contains('\0') {
            cx.guest(
                name,
                "env",
                format!("environment variable name {k:?} must not contain '=' or NUL"),
            );
        }
        if v.contains('\0') {
            cx.guest(
                name,
                "env",
                format!("value of environment variable {k:?} must not contain NUL"),
            );
        }
    }

    if let Some(b) = &g.backup {
        if b.command.first().is_none_or(|c| c.is_empty()) {
            cx.guest(name, "backup", "backup.command is empty: give the program that prints the configuration, e.g. [\"cat\", \"/conf/config.xml\"]");
        }
        if b.restore_command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(|p| p.is_empty()))
        {
            cx.guest(name, "backup", "backup.restore_command is empty: leave it out, or give the program that reads a configuration on stdin");
        }
        if b.recipients.is_empty() {
            cx.guest(name, "backup", "backup needs at least one age recipient (`age1...`; make a key with `age-keygen`) so backups are never stored in plain text");
        }
        for r in &b.recipients {
            if !r.starts_with("age1") || r.len() != 62 {
                cx.guest(name, "backup", format!("`{r}` is not an age X25519 recipient (they look like age1 followed by 58 characters)"));
            }
        }
    }

    let health = g
        .health
        .as_ref()
        .and_then(|h| crate::group::validate_health(cx, name, h));

    let nics = crate::nic::validate_nics(cx, name, g, index, probe);

    if cx.errors.len() != before {
        return None;
    }
    let host = host?;
    let nix_cache = g.nix_cache.unwrap_or(false);
    let mut env = g.env.clone();
    if nix_cache && vm.is_none() {
        crate::nix_cache::guest_env(&mut env, host.subnet4.network());
    }
    Some(Guest {
        nics,
        nix_cache,
        health,
        group: None,
        companion_of: None,
        vip4: None,
        vip6: None,
        name: name.to_string(),
        kind: g.kind,
        index,
        link: format!("vb{index}"),
        addr4: host.addr4(index),
        host4: host.subnet4.network(),
        addr6: host.addr6(index),
        host6: host.subnet6.map(|n| n.network()),
        rootfs,
        command,
        cpus: g.cpus,
        autostart: g.autostart.unwrap_or(true),
        restart: g.restart.unwrap_or_default(),
        env,
        stop_timeout_ms,
        ephemeral: g.ephemeral.unwrap_or(false),
        read_only: g.read_only.unwrap_or(false),
        binds,
        backup: g.backup.clone(),
        memory: match &vm {
            Some(v) => Some(v.memory_mib << 20),
            None => g.memory.map(|m| m.0),
        },
        vm,
    })
}

/// A container's `binds`: absolute paths without `..` or `:` (nspawn's
/// separator), an existing source, a target other than `/`, each target
/// once.
fn validate_binds(
    cx: &mut Ctx<'_>,
    name: &str,
    binds: &[crate::BindSpec],
    probe: &dyn HostProbe,
) -> Vec<crate::Bind> {
    let mut out: Vec<crate::Bind> = Vec::new();
    for (i, b) in binds.iter().enumerate() {
        let field = format!("binds[{i}]");
        let target = b.target.clone().unwrap_or_else(|| b.source.clone());
        let mut ok = true;
        // A target left out is the source: one error for the one path.
        let checked = [
            Some(("source", &b.source)),
            b.target.as_ref().map(|t| ("target", t)),
        ];
        for (what, p) in checked.into_iter().flatten() {
            let text = p.to_string_lossy();
            let problem = if !p.is_absolute() {
                Some("must be an absolute path")
            } else if p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                Some("must not contain `..`")
            } else if text.contains(':') {
                Some("must not contain `:` (systemd-nspawn separates source and target with it)")
            } else {
                None
            };
            if let Some(problem) = problem {
                cx.guest(name, &field, format!("{what} {text} {problem}"));
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        if target == Path::new("/") {
            cx.guest(
                name,
                &field,
                "target / would hide the rootfs; bind below it, e.g. /srv/data",
            );
            continue;
        }
        if !probe.exists(&b.source) {
            cx.guest(
                name,
                &field,
                format!("source {} does not exist on this host", b.source.display()),
            );
            continue;
        }
        if out.iter().any(|o| o.target == target) {
            cx.guest(
                name,
                &field,
                format!(
                    "target {} is bound twice; give each bind its own target",
                    target.display()
                ),
            );
            continue;
        }
        out.push(crate::Bind {
            source: b.source.clone(),
            target,
            read_only: b.read_only.unwrap_or(true),
        });
    }
    out
}

/// VM-only fields given on a container: say so instead of ignoring them.
fn reject_vm_fields(cx: &mut Ctx<'_>, name: &str, g: &GuestSpec) {
    for (field, set) in [
        ("machine", g.machine.is_some()),
        ("accel", g.accel.is_some()),
        ("kernel", g.kernel.is_some()),
        ("initrd", g.initrd.is_some()),
        ("cmdline", g.cmdline.is_some()),
        ("ip_cmdline", g.ip_cmdline.is_some()),
        ("disks", !g.disks.is_empty()),
        ("cdrom", g.cdrom.is_some()),
        ("firmware", g.firmware.is_some()),
        ("cpu_pinning", g.cpu_pinning.is_some()),
        ("emulator_cpus", g.emulator_cpus.is_some()),
        ("exclusive", g.exclusive.is_some()),
        ("hugepages", g.hugepages.is_some()),
        ("seed", g.seed.is_some()),
    ] {
        if set {
            cx.guest(
                name,
                field,
                format!("`{field}` applies to VMs (kind = \"vm\"), not containers"),
            );
        }
    }
}

/// Default VM memory when the spec gives none.
pub const DEFAULT_VM_MEMORY_MIB: u64 = 256;
const MAX_VCPUS: f64 = 256.0;

fn validate_vm(
    cx: &mut Ctx<'_>,
    name: &str,
    g: &GuestSpec,
    probe: &dyn HostProbe,
) -> Option<crate::vm::Vm> {
    use crate::vm::{Disk, Firmware, Machine, find_ovmf, format_of};
    let before = cx.errors.len();
    let machine = g.machine.unwrap_or_default();
    let mut used = BTreeMap::new();
    let mut use_image = |cx: &mut Ctx<'_>, field: &str, image: &str| {
        if let Some(img) = cx.images.get(image) {
            used.insert(image.to_string(), img.clone());
        } else if !cx.image_names.iter().any(|n| n == image) {
            let known = if cx.image_names.is_empty() {
                "the spec declares no images".to_string()
            } else {
                format!("declared: {}", cx.image_names.join(", "))
            };
            cx.guest(
                name,
                field,
                format!("image `{image}` is not declared; add an [image.{image}] table with url and sha256 ({known})"),
            );
        }
    };
    let file_field = |cx: &mut Ctx<'_>,
                      use_image: &mut dyn FnMut(&mut Ctx<'_>, &str, &str),
                      field: &str,
                      p: &Path| {
        if let Some(image) = crate::image::image_ref(p) {
            use_image(cx, field, image);
        } else if !p.is_absolute() {
            cx.guest(
                name,
                field,
                format!("{field} {} must be an absolute path", p.display()),
            );
        } else if !probe.exists(p) {
            cx.guest(
                name,
                field,
                format!("{field} {} does not exist", p.display()),
            );
        }
    };
    if let Some(k) = &g.kernel {
        file_field(cx, &mut use_image, "kernel", k);
    }
    if let Some(i) = &g.initrd {
        file_field(cx, &mut use_image, "initrd", i);
        if g.kernel.is_none() {
            cx.guest(name, "initrd", "an initrd needs a `kernel` to go with it");
        }
    }
    if let Some(c) = &g.cdrom {
        file_field(cx, &mut use_image, "cdrom", c);
    }
    if g.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
        cx.guest(
            name,
            "cmdline",
            "the kernel command line must not contain NUL",
        );
    }
    if g.cmdline.is_some() && g.kernel.is_none() {
        cx.guest(
            name,
            "cmdline",
            "a kernel command line needs a `kernel` (disk-booted guests configure their own)",
        );
    }
    let mut disks = Vec::new();
    for (k, d) in g.disks.iter().enumerate() {
        if let Some(s) = d.size.filter(|s| s.0 < (1 << 20)) {
            cx.guest(
                name,
                "disks",
                format!("disk size {s} is too small; use at least 1M"),
            );
        }
        if let Some(image) = &d.image {
            use_image(cx, "disks", image);
            if d.size.is_none() {
                cx.guest(name, "disks", format!("disk {k} from image `{image}` needs a `size` (at least the image's size; the disk is grown to it)"));
            }
            let format = d
                .format
                .or_else(|| d.path.as_deref().map(format_of))
                .unwrap_or(crate::vm::DiskFormat::Qcow2);
            let path = match &d.path {
                None => PathBuf::from(format!("disk{k}.{format}")),
                Some(p) if !p.is_absolute() => {
                    cx.guest(
                        name,
                        "disks",
                        format!("disk {} must be an absolute path (or leave `path` out and berth keeps the disk under its state dir)", p.display()),
                    );
                    continue;
                }
                Some(p) => p.clone(),
            };
            disks.push(Disk {
                path,
                image: Some(image.clone()),
                size: d.size.map(|s| s.0),
                format,
                readonly: d.readonly.unwrap_or(false),
            });
            continue;
        }
        let Some(path) = &d.path else {
            cx.guest(
                name,
                "disks",
                format!("disk {k} needs a `path` (a disk image file) or an `image` (a declared [image.NAME] to make it from)"),
            );
            continue;
        };
        if !path.is_absolute() {
            cx.guest(
                name,
                "disks",
                format!("disk {} must be an absolute path", path.display()),
            );
            continue;
        }
        if !probe.exists(path) && d.size.is_none() {
            cx.guest(
                name,
                "disks",
                format!(
                    "disk {} does not exist; give it a `size` to have berth create it (sparse)",
                    path.display()
                ),
            );
        }
        disks.push(Disk {
            path: path.clone(),
            image: None,
            size: d.size.map(|s| s.0),
            format: d.format.unwrap_or_else(|| format_of(path)),
            readonly: d.readonly.unwrap_or(false),
        });
    }
    let seed = match &g.seed {
        None => None,
        Some(s) => {
            let exists = |p: &Path| probe.exists(p);
            match crate::image::validate_seed(name, s, machine == Machine::Q35, &exists) {
                Ok(seed) => Some(seed),
                Err(reasons) => {
                    for r in reasons {
                        cx.guest(name, "seed", r);
                    }
                    None
                }
            }
        }
    };
    match machine {
        Machine::Microvm if g.kernel.is_none() => {
            cx.guest(name, "kernel", "a microvm boots a kernel directly: give `kernel` (and usually `initrd`), or use machine = \"q35\" to boot from disks");
        }
        Machine::Microvm if g.cdrom.is_some() || g.firmware.is_some() => {
            cx.guest(
                name,
                "machine",
                "`cdrom` and `firmware` need machine = \"q35\"",
            );
        }
        Machine::Q35 if g.kernel.is_none() && g.disks.is_empty() && g.cdrom.is_none() => {
            cx.guest(
                name,
                "disks",
                "a q35 VM needs something to boot: `disks`, `cdrom` or `kernel`",
            );
        }
        _ => {}
    }
    let firmware = g.firmware.unwrap_or_default();
    if firmware == Firmware::Uefi && find_ovmf(probe).is_none() {
        cx.guest(name, "firmware", format!("firmware = \"uefi\" needs OVMF, which is not installed (looked for {}; apt-get install ovmf)", crate::vm::OVMF_PATHS.join(", ")));
    }

    let vcpus = match g.cpus {
        None => 1,
        Some(c) if c.fract() == 0.0 && (1.0..=MAX_VCPUS).contains(&c) => c as u32,
        Some(c) => {
            cx.guest(
                name,
                "cpus",
                format!("a VM has a whole number of vCPUs, 1..=256; got {c}"),
            );
            1
        }
    };
    let memory_mib = match g.memory {
        None => DEFAULT_VM_MEMORY_MIB,
        Some(m) if m.0 < (16 << 20) => {
            cx.guest(
                name,
                "memory",
                format!("memory {m} is too small for a VM; use at least 16M"),
            );
            16
        }
        Some(m) if m.0 % (1 << 20) != 0 => {
            cx.guest(
                name,
                "memory",
                format!("VM memory {m} must be a whole number of MiB"),
            );
            m.0 >> 20
        }
        Some(m) => m.0 >> 20,
    };
    let hugepages = g.hugepages.unwrap_or(false);
    if hugepages && memory_mib % 2 != 0 {
        cx.guest(
            name,
            "memory",
            "with hugepages, memory must be a multiple of 2M",
        );
    }

    let host_cpus = probe.host_cpus();
    let mut cpu_list = |field: &str, list: &Option<Vec<usize>>| -> Vec<usize> {
        let Some(list) = list else { return Vec::new() };
        if list.is_empty() {
            cx.guest(
                name,
                field,
                format!("`{field}` is empty; list host CPU numbers, e.g. [2, 3]"),
            );
        }
        if let Some(h) = &host_cpus {
            let missing: Vec<String> = list
                .iter()
                .filter(|c| !h.contains(c))
                .map(|c| c.to_string())
                .collect();
            if !missing.is_empty() {
                cx.guest(
                    name,
                    field,
                    format!(
                        "CPU {} does not exist on this host (online CPUs: {})",
                        missing.join(", "),
                        h.iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        list.clone()
    };
    let cpu_pinning = cpu_list("cpu_pinning", &g.cpu_pinning);
    let emulator_cpus = cpu_list("emulator_cpus", &g.emulator_cpus);
    if g.exclusive == Some(true) && cpu_pinning.is_empty() {
        cx.guest(name, "exclusive", "`exclusive` needs `cpu_pinning`");
    }

    let accel = g.accel.unwrap_or_default();
    // The probe answers None when BERTH_ACCEL overrides the spec.
    if accel == crate::vm::AccelChoice::Kvm
        && let Some(Err(why)) = probe.kvm()
    {
        cx.guest(
            name,
            "accel",
            format!(
                "accel = \"kvm\" but KVM is not usable here: {why}; use accel = \"auto\" or \"tcg\""
            ),
        );
    }

    (cx.errors.len() == before).then(|| crate::vm::Vm {
        machine,
        accel,
        kernel: g.kernel.clone(),
        initrd: g.initrd.clone(),
        cmdline: g.cmdline.clone().unwrap_or_default(),
        ip_cmdline: g.ip_cmdline.unwrap_or(true),
        disks,
        cdrom: g.cdrom.clone(),
        firmware,
        vcpus,
        memory_mib,
        cpu_pinning,
        emulator_cpus,
        exclusive: g.exclusive.unwrap_or(false),
        hugepages,
        images: used,
        seed,
    })
}
