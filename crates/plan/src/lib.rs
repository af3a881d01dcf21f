//! The planner: `plan(desired, observed) -> Plan`.
//!
//! A pure function: it takes values and returns values, with no clock and no
//! IO, so every decision is unit-tested here. Each [`Action`] says what will
//! happen to one guest (or the host), how much it interrupts ([`Impact`]),
//! why, and which fields change.
//!
//! Rules, per guest:
//!
//! | desired | observed | action |
//! |---|---|---|
//! | present | absent | `Create` (impact none; starts if `autostart`) |
//! | absent | present | `Destroy` (impact replace) |
//! | present | `Partial` | `Replace` ("an earlier apply was interrupted") |
//! | `kind`, `index` or addresses differ | any | `Replace` |
//! | `rootfs`, `command`, `memory`, `cpus`, `env` differ | running | `Restart` |
//! | an extra NIC added, removed, or its mode, parent, segment, MAC, address or PCI device changed (`nic[k]`, `nic[k].mac`, ...) | running | `Restart` |
//! | only `autostart`, `restart`, `stop_timeout` differ | running | `Update` (live) |
//! | same | running | unchanged |
//! | same | stopped/failed/missing | `Start` if `autostart`, else unchanged |
//! | changed | stopped/failed/missing | same kind as above, impact none (nothing running is interrupted); starts if `autostart` |
//!
//! Host: any difference in `uplink`, `subnet4`, `subnet6` or `max_guests`
//! (or no host recorded yet) gives one `HostUpdate` action. Guests whose
//! addresses move with a subnet change are replaced.
//!
//! Order: destroys first (they free indexes), then the host update, then
//! replace/restart/update, then create/start; by guest name within each.

use std::collections::BTreeMap;
use std::fmt;

use berth_spec::{ByteSize, Desired, Group, Guest, Host};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the daemon found for a guest it has a record of.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum GuestStatus {
    Running,
    Stopped,
    Failed,
    /// Recorded but no process/supervisor found.
    Missing,
    /// An earlier apply died half-way through this guest.
    Partial,
}

impl GuestStatus {
    pub fn is_running(self) -> bool {
        self == GuestStatus::Running
    }
}

impl fmt::Display for GuestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestStatus::Running => "running",
            GuestStatus::Stopped => "stopped",
            GuestStatus::Failed => "failed",
            GuestStatus::Missing => "missing",
            GuestStatus::Partial => "partial",
        })
    }
}

/// A guest as last applied, and how it is doing now.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ObservedGuest {
    pub applied: Guest,
    pub status: GuestStatus,
}

/// What is on the host now (from the store plus live probes).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Host settings last applied; `None` before the first apply.
    pub host: Option<Host>,
    pub guests: BTreeMap<String, ObservedGuest>,
    /// Groups as last applied.
    #[serde(default)]
    pub groups: BTreeMap<String, Group>,
}

impl Observed {
    /// The observation after `desired` was applied completely, every guest
    /// in `status`. With `GuestStatus::Running`, `plan(d, &from_desired(d, Running))`
    /// is empty.
    pub fn from_desired(desired: &Desired, status: GuestStatus) -> Observed {
        Observed {
            host: Some(desired.host.clone()),
            guests: desired
                .guests
                .iter()
                .map(|(name, g)| {
                    (
                        name.clone(),
                        ObservedGuest {
                            applied: g.clone(),
                            status,
                        },
                    )
                })
                .collect(),
            groups: desired.groups.clone(),
        }
    }
}

/// How much an action interrupts a guest. Ordered: the impact of an action
/// is the largest impact of its changes.
#[derive(
    Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    /// Nothing running is touched.
    None,
    /// Applied to the running guest without interrupting it.
    Live,
    /// The guest is stopped and started again.
    Restart,
    /// The guest is deleted and created again (new link/addresses).
    Replace,
}

impl fmt::Display for Impact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impact::None => "none",
            Impact::Live => "live",
            Impact::Restart => "restart",
            Impact::Replace => "replace",
        })
    }
}

/// What an action does.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Create,
    Start,
    Update,
    Restart,
    Replace,
    Destroy,
    HostUpdate,
}

impl ActionKind {
    /// The column marker in [`Plan`]'s Display, terraform-like.
    pub fn symbol(self) -> &'static str {
        match self {
            ActionKind::Create => "+",
            ActionKind::Start => ">",
            ActionKind::Update | ActionKind::Restart | ActionKind::HostUpdate => "~",
            ActionKind::Replace => "-/+",
            ActionKind::Destroy => "-",
        }
    }

    /// Order class: destroy, host, change, create/start.
    fn class(self) -> u8 {
        match self {
            ActionKind::Destroy => 0,
            ActionKind::HostUpdate => 1,
            ActionKind::Replace | ActionKind::Restart | ActionKind::Update => 2,
            ActionKind::Create | ActionKind::Start => 3,
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActionKind::Create => "create",
            ActionKind::Start => "start",
            ActionKind::Update => "update",
            ActionKind::Restart => "restart",
            ActionKind::Replace => "replace",
            ActionKind::Destroy => "destroy",
            ActionKind::HostUpdate => "host_update",
        })
    }
}

/// One changed field, values rendered for people ("128M", "10s", "unset").
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Spec field name (`memory`, `env.FOO`, `host.uplink`, `addresses`).
    pub field: String,
    pub from: String,
    pub to: String,
}

/// What will happen to one guest (or, with `guest: None`, the host).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// `None` = the host.
    pub guest: Option<String>,
    pub kind: ActionKind,
    pub impact: Impact,
    pub reason: String,
    pub changes: Vec<Change>,
    /// The guest should be running after this action.
    pub start: bool,
}

/// Everything `apply` would do, in order.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Guests that need nothing.
    pub unchanged: Vec<String>,
    /// Groups whose running members are restarted or replaced: done member
    /// by member, make-before-break (see [`Rollout`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<Rollout>,
}

/// A rolling update of one group's running members.
///
/// Each step takes up to `batch` members out of the service address (the
/// route moves to a healthy member first), waits `drain_time`, restarts or
/// replaces them (their companions with them), waits until they are healthy
/// for `min_healthy_time` (at most `healthy_deadline`), and puts them back.
/// A member that does not become healthy in time stops the rollout and,
/// with `auto_revert`, every member already updated goes back to its
/// previous config.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub group: String,
    /// Members in update order (by index), each with its companions.
    pub members: Vec<String>,
    /// Members updated at once (max_parallel, lowered to keep min_available).
    pub batch: u32,
    /// Whether the service address keeps a healthy member throughout.
    pub service_stays_up: bool,
    /// Why (or why not), for people.
    pub service: String,
    /// One line per step, for people.
    pub steps: Vec<String>,
    /// The rollout cannot run as specified (e.g. min_available leaves no
    /// member that may be taken out); apply refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

impl Plan {
    /// No actions.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Actions that stop a running guest (impact restart or replace).
    pub fn interrupted(&self) -> Vec<&Action> {
        self.actions
            .iter()
            .filter(|a| a.impact >= Impact::Restart)
            .collect()
    }

    /// The action for a guest, if any.
    pub fn action(&self, guest: &str) -> Option<&Action> {
        self.actions
            .iter()
            .find(|a| a.guest.as_deref() == Some(guest))
    }

    /// The host action, if any.
    pub fn host_action(&self) -> Option<&Action> {
        self.actions.iter().find(|a| a.guest.is_none())
    }

    /// "2 to create, 1 to restart, 0 to destroy; interrupts: db1". Counts of
    /// start, update, restart and replace appear only when non-zero.
    pub fn summary(&self) -> String {
        let count = |k: ActionKind| self.actions.iter().filter(|a| a.kind == k).count();
        let mut parts = vec![format!("{} to create", count(ActionKind::Create))];
        for (kind, label) in [
            (ActionKind::Start, "to start"),
            (ActionKind::Update, "to update live"),
            (ActionKind::Restart, "to restart"),
            (ActionKind::Replace, "to replace"),
        ] {
            let n = count(kind);
            if n > 0 {
                parts.push(format!("{n} {label}"));
            }
        }
        parts.push(format!("{} to destroy", count(ActionKind::Destroy)));
        if count(ActionKind::HostUpdate) > 0 {
            parts.push("host to update".to_string());
        }
        let interrupted: Vec<&str> = self
            .interrupted()
            .iter()
            .filter_map(|a| a.guest.as_deref())
            .collect();
        let rolled: Vec<&str> = self
            .rollouts
            .iter()
            .flat_map(|r| r.members.iter().map(String::as_str))
            .collect();
        let direct: Vec<&str> = interrupted
            .iter()
            .copied()
            .filter(|n| !rolled.contains(n))
            .collect();
        let mut tail = if direct.is_empty() {
            "no interruptions".to_string()
        } else {
            format!("interrupts: {}", direct.join(", "))
        };
        for r in &self.rollouts {
            tail.push_str(&format!(
                "; rolling update of {} ({} member(s), service {})",
                r.group,
                r.members.len(),
                if r.service_stays_up {
                    "stays up"
                } else {
                    "interrupted"
                }
            ));
        }
        format!("{}; {tail}", parts.join(", "))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("No changes.");
        }
        let name_w = self
            .actions
            .iter()
            .map(|a| a.guest.as_deref().map_or(4, str::len))
            .max()
            .unwrap_or(4);
        for a in &self.actions {
            let name = a.guest.as_deref().unwrap_or("host");
            let impact = format!("({})", a.impact);
            writeln!(
                f,
                "{:>3} {name:<name_w$}  {:<11}  {impact:<9}  {}",
                a.kind.symbol(),
                a.kind.to_string(),
                a.reason
            )?;
            for c in &a.changes {
                writeln!(f, "{:>6}{}: {} → {}", "", c.field, c.from, c.to)?;
            }
        }
        for r in &self.rollouts {
            writeln!(f, "\nrolling update of group {}:", r.group)?;
            for (i, step) in r.steps.iter().enumerate() {
                writeln!(f, "  {}. {step}", i + 1)?;
            }
            match &r.blocked {
                Some(why) => writeln!(f, "  refused: {why}")?,
                None => writeln!(f, "  service address: {}", r.service)?,
            }
        }
        if !self.unchanged.is_empty() {
            writeln!(f, "\nunchanged: {}", self.unchanged.join(", "))?;
        }
        write!(f, "\n{}", self.summary())
    }
}

/// A field difference and how much it interrupts a running guest.
struct Diff {
    change: Change,
    impact: Impact,
}

fn diff(out: &mut Vec<Diff>, field: &str, from: String, to: String, impact: Impact) {
    if from != to {
        out.push(Diff {
            change: Change {
                field: field.to_string(),
                from,
                to,
            },
            impact,
        });
    }
}

fn opt<T>(v: Option<T>, unset: &str, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| unset.to_string(), f)
}

/// Renders milliseconds the way a spec writes them: "10s", "2m", "500ms".
pub fn format_duration_ms(ms: u64) -> String {
    if ms != 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms != 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms != 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn command_str(c: &[String]) -> String {
    let parts: Vec<String> = c
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "/-_.=:,+@%".contains(ch))
            {
                a.clone()
            } else {
                format!("{a:?}")
            }
        })
        .collect();
    parts.join(" ")
}

fn diff_guest(old: &Guest, new: &Guest) -> Vec<Diff> {
    let mut d = Vec::new();
    diff(
        &mut d,
        "kind",
        old.kind.to_string(),
        new.kind.to_string(),
        Impact::Replace,
    );
    diff(
        &mut d,
        "index",
        old.index.to_string(),
        new.index.to_string(),
        Impact::Replace,
    );
    diff(
        &mut d,
        "addresses",
        old.addresses().join(", "),
        new.addresses().join(", "),
        Impact::Replace,
    );
    // Host-side addresses and link follow from index and subnets; report
    // them only if they differ on their own (e.g. a record from an older build).
    if old.addresses() == new.addresses() && old.index == new.index {
        let host = |g: &Guest| {
            let mut v = vec![g.host4.to_string()];
            v.extend(g.host6.map(|a| a.to_string()));
            v.join(", ")
        };
        diff(
            &mut d,
            "host addresses",
            host(old),
            host(new),
            Impact::Replace,
        );
        diff(
            &mut d,
            "link",
            old.link.clone(),
            new.link.clone(),
            Impact::Replace,
        );
    }
    diff(
        &mut d,
        "rootfs",
        old.rootfs.display().to_string(),
        new.rootfs.display().to_string(),
        Impact::Restart,
    );
    let flag = |b: bool| b.to_string();
    diff(
        &mut d,
        "ephemeral",
        flag(old.ephemeral),
        flag(new.ephemeral),
        Impact::Restart,
    );
    diff(
        &mut d,
        "read_only",
        flag(old.read_only),
        flag(new.read_only),
        Impact::Restart,
    );
    let binds = |g: &Guest| {
        g.binds
            .iter()
            .map(|b| {
                format!(
                    "{}:{}{}",
                    b.source.display(),
                    b.target.display(),
                    if b.read_only { ":ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    diff(&mut d, "binds", binds(old), binds(new), Impact::Restart);
    diff(
        &mut d,
        "command",
        command_str(&old.command),
        command_str(&new.command),
        Impact::Restart,
    );
    let mem = |m: Option<u64>| opt(m, "unlimited", |b| ByteSize(b).to_string());
    diff(
        &mut d,
        "memory",
        mem(old.memory),
        mem(new.memory),
        Impact::Restart,
    );
    // Compare cpus exactly (bit pattern), render short.
    if old.cpus.map(f64::to_bits) != new.cpus.map(f64::to_bits) {
        let cpus = |c: Option<f64>| opt(c, "unlimited", |c| c.to_string());
        d.push(Diff {
            change: Change {
                field: "cpus".into(),
                from: cpus(old.cpus),
                to: cpus(new.cpus),
            },
            impact: Impact::Restart,
        });
    }
    let keys: std::collections::BTreeSet<&String> = old.env.keys().chain(new.env.keys()).collect();
    for k in keys {
        let val = |g: &Guest| opt(g.env.get(k), "unset", |v| format!("{v:?}"));
        diff(
            &mut d,
            &format!("env.{k}"),
            val(old),
            val(new),
            Impact::Restart,
        );
    }
    diff(
        &mut d,
        "autostart",
        old.autostart.to_string(),
        new.autostart.to_string(),
        Impact::Live,
    );
    diff(
        &mut d,
        "restart",
        old.restart.to_string(),
        new.restart.to_string(),
        Impact::Live,
    );
    diff(
        &mut d,
        "stop_timeout",
        format_duration_ms(old.stop_timeout_ms),
        format_duration_ms(new.stop_timeout_ms),
        Impact::Live,
    );
    if let (Some(a), Some(b)) = (&old.vm, &new.vm) {
        diff_vm(&mut d, a, b);
    }
    diff_nics(&mut d, &old.nics, &new.nics);
    // Backups are taken on demand: nothing running changes.
    let backup = |g: &Guest| {
        g.backup.as_ref().map_or("none".to_string(), |b| {
            format!("{:?} to {} recipient(s)", b.command, b.recipients.len())
        })
    };
    diff(&mut d, "backup", backup(old), backup(new), Impact::Live);
    // The guest learns the cache's URL at start (env, kernel command line).
    diff(
        &mut d,
        "nix_cache",
        flag(old.nix_cache),
        flag(new.nix_cache),
        Impact::Restart,
    );
    // The probe runs in the daemon: nothing in the guest changes.
    let health = |g: &Guest| {
        g.health.as_ref().map_or("none".to_string(), |h| {
            format!(
                "{} every {}, timeout {}, {}/{}",
                h.probe,
                format_duration_ms(h.interval_ms),
                format_duration_ms(h.timeout_ms),
                h.healthy_after,
                h.unhealthy_after
            )
        })
    };
    diff(&mut d, "health", health(old), health(new), Impact::Live);
    // Containers get the service address on their loopback at start; VMs
    // on their kernel command line.
    let vip = |g: &Guest| {
        let v: Vec<String> = g
            .vip4
            .map(|a| a.to_string())
            .into_iter()
            .chain(g.vip6.map(|a| a.to_string()))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    diff(
        &mut d,
        "service address",
        vip(old),
        vip(new),
        Impact::Restart,
    );
    let of = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".into());
    diff(
        &mut d,
        "group",
        of(&old.group),
        of(&new.group),
        Impact::Live,
    );
    diff(
        &mut d,
        "companion of",
        of(&old.companion_of),
        of(&new.companion_of),
        Impact::Live,
    );
    d
}

/// Extra NICs: each is wired when the guest starts (a macvtap or segment
/// port per NIC, the MAC in QEMU's argv), so every change restarts it,
/// named per NIC: added or removed (`nic[2]`), or one field (`nic[1].mac`,
/// `nic[1].parent`, ...).
fn diff_nics(d: &mut Vec<Diff>, old: &[berth_spec::nic::Nic], new: &[berth_spec::nic::Nic]) {
    use berth_spec::nic::NicKind;
    for k in 0..old.len().max(new.len()) {
        let field = format!("nic[{}]", k + 1);
        match (old.get(k), new.get(k)) {
            (Some(a), Some(b)) if a.mode() == b.mode() => {
                let (pa, pb) = match (&a.kind, &b.kind) {
                    (NicKind::Macvtap { parent: x, .. }, NicKind::Macvtap { parent: y, .. }) => {
                        ("parent", (x.clone(), y.clone()))
                    }
                    (NicKind::Segment { segment: x, .. }, NicKind::Segment { segment: y, .. }) => {
                        ("segment", (x.clone(), y.clone()))
                    }
                    (NicKind::Vfio { pci: x, bind: bx }, NicKind::Vfio { pci: y, bind: by }) => {
                        diff(
                            d,
                            &format!("{field}.bind"),
                            bx.to_string(),
                            by.to_string(),
                            Impact::Restart,
                        );
                        ("pci", (x.clone(), y.clone()))
                    }
                    _ => ("mode", (a.mode().to_string(), b.mode().to_string())),
                };
                diff(d, &format!("{field}.{pa}"), pb.0, pb.1, Impact::Restart);
                let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
                diff(
                    d,
                    &format!("{field}.mac"),
                    or_none(a.mac.clone()),
                    or_none(b.mac.clone()),
                    Impact::Restart,
                );
                diff(
                    d,
                    &format!("{field}.addr"),
                    or_none(a.addr.map(|x| x.to_string())),
                    or_none(b.addr.map(|x| x.to_string())),
                    Impact::Restart,
                );
            }
            (a, b) => {
                let show = |n: Option<&berth_spec::nic::Nic>| {
                    n.map_or_else(|| "none".to_string(), |n| n.describe())
                };
                diff(d, &field, show(a), show(b), Impact::Restart);
            }
        }
    }
}

/// VM fields: what QEMU was started with needs a restart; pinning is
/// applied to the running threads (live).
fn diff_vm(d: &mut Vec<Diff>, a: &berth_spec::vm::Vm, b: &berth_spec::vm::Vm) {
    let path =
        |p: &Option<std::path::PathBuf>| opt(p.as_ref(), "none", |p| p.display().to_string());
    let list = |l: &[usize]| {
        if l.is_empty() {
            "none".to_string()
        } else {
            format!("{l:?}")
        }
    };
    let dbg = |x: &dyn std::fmt::Debug| format!("{x:?}").to_lowercase();
    diff(
        d,
        "machine",
        dbg(&a.machine),
        dbg(&b.machine),
        Impact::Restart,
    );
    diff(d, "accel", dbg(&a.accel), dbg(&b.accel), Impact::Restart);
    diff(
        d,
        "kernel",
        path(&a.kernel),
        path(&b.kernel),
        Impact::Restart,
    );
    diff(
        d,
        "initrd",
        path(&a.initrd),
        path(&b.initrd),
        Impact::Restart,
    );
    diff(
        d,
        "cmdline",
        format!("{:?}", a.cmdline),
        format!("{:?}", b.cmdline),
        Impact::Restart,
    );
    diff(
        d,
        "ip_cmdline",
        a.ip_cmdline.to_string(),
        b.ip_cmdline.to_string(),
        Impact::Restart,
    );
    let disks = |v: &berth_spec::vm::Vm| {
        v.disks
            .iter()
            .map(|k| {
                format!(
                    "{}({}{})",
                    k.path.display(),
                    k.format,
                    if k.readonly { ",ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    diff(d, "disks", disks(a), disks(b), Impact::Restart);
    images_and_seed(d, a, b);
    diff(d, "cdrom", path(&a.cdrom), path(&b.cdrom), Impact::Restart);
    diff(
        d,
        "firmware",
        dbg(&a.firmware),
        dbg(&b.firmware),
        Impact::Restart,
    );
    diff(
        d,
        "hugepages",
        a.hugepages.to_string(),
        b.hugepages.to_string(),
        Impact::Restart,
    );
    diff(
        d,
        "cpu_pinning",
        list(&a.cpu_pinning),
        list(&b.cpu_pinning),
        Impact::Live,
    );
    diff(
        d,
        "emulator_cpus",
        list(&a.emulator_cpus),
        list(&b.emulator_cpus),
        Impact::Live,
    );
    diff(
        d,
        "exclusive",
        a.exclusive.to_string(),
        b.exclusive.to_string(),
        Impact::Live,
    );
}

/// Managed disks (made from an image under the state dir) that a change
/// from `a` to `b` must make anew, deleting what the guest wrote: same
/// place, but another image (or format). Pure.
pub fn recreated_disks(a: &berth_spec::vm::Vm, b: &berth_spec::vm::Vm) -> Vec<String> {
    let ident = |v: &berth_spec::vm::Vm, name: &Option<String>| {
        name.as_ref()
            .map(|n| v.images.get(n).map_or_else(|| n.clone(), |i| i.identity()))
    };
    b.disks
        .iter()
        .filter(|nd| nd.managed())
        .filter_map(|nd| {
            let od = a
                .disks
                .iter()
                .find(|od| od.managed() && od.path == nd.path)?;
            (od.format != nd.format || ident(a, &od.image) != ident(b, &nd.image))
                .then(|| nd.path.display().to_string())
        })
        .collect()
}

/// The disks berth made from images for guest `g` (deleted with it).
pub fn managed_disks(g: &Guest) -> Vec<String> {
    g.vm.iter()
        .flat_map(|v| v.disks.iter())
        .filter(|d| d.managed())
        .map(|d| d.path.display().to_string())
        .collect()
}

/// What applying `a` deletes that a guest wrote: its managed disks when it
/// is destroyed, or those a replace must make anew. `berth apply` refuses
/// such a plan without `--allow-disruption`.
pub fn deleted_disks(a: &Action, desired: &Desired, observed: &Observed) -> Vec<String> {
    let Some(name) = a.guest.as_deref() else {
        return Vec::new();
    };
    let Some(old) = observed.guests.get(name) else {
        return Vec::new();
    };
    match (a.kind, desired.guests.get(name)) {
        (ActionKind::Destroy, _) => managed_disks(&old.applied),
        (_, Some(new)) => match (&old.applied.vm, &new.vm) {
            (Some(ov), Some(nv)) => recreated_disks(ov, nv),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn short_identity(i: &berth_spec::image::Image) -> String {
    let id = i.identity();
    match id.strip_prefix("sha256:") {
        Some(rest) => format!(
            "sha256:{}…{}",
            &rest[..12.min(rest.len())],
            &rest[rest.find(' ').unwrap_or(rest.len())..]
        ),
        None => id,
    }
}

/// Images used as files (kernel, initrd, cdrom) need a restart when they
/// change; a managed disk made from another image needs a new disk
/// (replace); the seed is read at boot (restart).
fn images_and_seed(d: &mut Vec<Diff>, a: &berth_spec::vm::Vm, b: &berth_spec::vm::Vm) {
    let recreated = recreated_disks(a, b);
    for p in &recreated {
        let src = |v: &berth_spec::vm::Vm| {
            v.disks
                .iter()
                .find(|x| x.managed() && x.path.display().to_string() == *p)
                .map(|x| {
                    let img = x.image.as_ref().and_then(|n| v.images.get(n));
                    format!(
                        "{} from {}",
                        x.format,
                        img.map_or_else(
                            || "?".into(),
                            |i| format!("{} ({})", i.name, short_identity(i))
                        )
                    )
                })
                .unwrap_or_default()
        };
        diff(
            d,
            &format!("disk {p} (made anew: what the guest wrote is lost)"),
            src(a),
            src(b),
            Impact::Replace,
        );
    }
    let disk_images: Vec<&String> = b
        .disks
        .iter()
        .filter(|x| x.managed())
        .filter_map(|x| x.image.as_ref())
        .collect();
    let names: std::collections::BTreeSet<&String> =
        a.images.keys().chain(b.images.keys()).collect();
    for n in names {
        // Only in disks: covered above (a disk that exists keeps its image).
        let in_files = |v: &berth_spec::vm::Vm| {
            [&v.kernel, &v.initrd, &v.cdrom].iter().any(|p| {
                p.as_deref()
                    .and_then(berth_spec::image::image_ref)
                    .is_some_and(|r| r == n.as_str())
            })
        };
        if !(in_files(a) || in_files(b)) && disk_images.contains(&n) {
            continue;
        }
        let show = |v: &berth_spec::vm::Vm| {
            v.images
                .get(n)
                .map_or_else(|| "unused".into(), short_identity)
        };
        diff(d, &format!("image.{n}"), show(a), show(b), Impact::Restart);
    }
    let seed = |v: &berth_spec::vm::Vm| {
        v.seed
            .as_ref()
            .map_or_else(|| "none".into(), |s| s.describe())
    };
    diff(d, "seed", seed(a), seed(b), Impact::Restart);
}

fn phrase(d: &Diff) -> String {
    let c = &d.change;
    let what = match d.impact {
        Impact::Replace => "needs replace",
        Impact::Restart => "needs restart",
        Impact::Live | Impact::None => "applies live",
    };
    format!("{} {}→{} {what}", c.field, c.from, c.to)
}

fn guest_action(name: &str, new: &Guest, obs: &ObservedGuest) -> Option<Action> {
    let diffs = diff_guest(&obs.applied, new);
    let max = diffs.iter().map(|d| d.impact).max().unwrap_or(Impact::None);
    let changes: Vec<Change> = diffs.iter().map(|d| d.change.clone()).collect();
    let phrases = diffs.iter().map(phrase).collect::<Vec<_>>().join(", ");
    let running = obs.status.is_running();
    let guest = Some(name.to_string());

    if obs.status == GuestStatus::Partial {
        let mut reason = "an earlier apply was interrupted; recreating".to_string();
        if !phrases.is_empty() {
            reason = format!("{reason} ({phrases})");
        }
        return Some(Action {
            guest,
            kind: ActionKind::Replace,
            impact: Impact::Replace,
            reason,
            changes,
            start: new.autostart,
        });
    }

    if diffs.is_empty() {
        if running || !new.autostart {
            return None;
        }
        return Some(Action {
            guest,
            kind: ActionKind::Start,
            impact: Impact::None,
            reason: format!("not running ({}); will start", obs.status),
            changes,
            start: true,
        });
    }

    let kind = match max {
        Impact::Replace => ActionKind::Replace,
        Impact::Restart => ActionKind::Restart,
        Impact::Live | Impact::None => ActionKind::Update,
    };
    if running {
        return Some(Action {
            guest,
            kind,
            impact: max,
            reason: phrases,
            changes,
            start: true,
        });
    }
    // Not running: nothing is interrupted, except that a replace still
    // deletes and recreates the guest's resources.
    let impact = if max == Impact::Replace {
        Impact::Replace
    } else {
        Impact::None
    };
    let then = if new.autostart {
        "will start with the new config"
    } else {
        "stays stopped (autostart is off)"
    };
    Some(Action {
        guest,
        kind,
        impact,
        reason: format!("{phrases}; not running ({}), {then}", obs.status),
        changes,
        start: new.autostart,
    })
}

fn host_action(desired: &Host, observed: Option<&Host>) -> Option<Action> {
    let Some(old) = observed else {
        let mut reason = format!(
            "set up host networking: NAT out of {} for {}",
            desired.uplink, desired.subnet4
        );
        if let Some(s6) = desired.subnet6 {
            reason.push_str(&format!(" and {s6}"));
        }
        return Some(Action {
            guest: None,
            kind: ActionKind::HostUpdate,
            impact: Impact::None,
            reason,
            changes: Vec::new(),
            start: false,
        });
    };
    if old == desired {
        return None;
    }
    let mut d = Vec::new();
    diff(
        &mut d,
        "host.uplink",
        old.uplink.clone(),
        desired.uplink.clone(),
        Impact::Live,
    );
    diff(
        &mut d,
        "host.subnet4",
        old.subnet4.to_string(),
        desired.subnet4.to_string(),
        Impact::Live,
    );
    let s6 = |h: &Host| opt(h.subnet6, "unset", |n| n.to_string());
    diff(&mut d, "host.subnet6", s6(old), s6(desired), Impact::Live);
    diff(
        &mut d,
        "host.max_guests",
        old.max_guests.to_string(),
        desired.max_guests.to_string(),
        Impact::None,
    );
    let impact = d.iter().map(|x| x.impact).max().unwrap_or(Impact::None);
    let reason = d
        .iter()
        .map(|x| {
            let c = &x.change;
            match c.field.as_str() {
                "host.uplink" => format!("NAT moves from {} to {}", c.from, c.to),
                "host.max_guests" => format!("max_guests {}→{}", c.from, c.to),
                _ => format!("{} {}→{}: NAT and routes follow", c.field, c.from, c.to),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(Action {
        guest: None,
        kind: ActionKind::HostUpdate,
        impact,
        reason,
        changes: d.into_iter().map(|x| x.change).collect(),
        start: false,
    })
}

/// Compares what the spec wants with what is there and says what to do.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut actions = Vec::new();
    let mut unchanged = Vec::new();

    for name in observed.guests.keys() {
        if !desired.guests.contains_key(name) {
            actions.push(Action {
                guest: Some(name.clone()),
                kind: ActionKind::Destroy,
                impact: Impact::Replace,
                reason: {
                    let disks = observed
                        .guests
                        .get(name)
                        .map(|o| managed_disks(&o.applied))
                        .unwrap_or_default();
                    if disks.is_empty() {
                        "removed from the spec: will be stopped and deleted".to_string()
                    } else {
                        format!(
                            "removed from the spec: will be stopped and deleted with its disks {} (needs --allow-disruption)",
                            disks.join(", ")
                        )
                    }
                },
                changes: Vec::new(),
                start: false,
            });
        }
    }

    actions.extend(host_action(&desired.host, observed.host.as_ref()));

    for (name, new) in &desired.guests {
        match observed.guests.get(name) {
            None => {
                let mut reason = format!("new {} at {}", new.kind, new.addresses().join(", "));
                if !new.autostart {
                    reason.push_str(" (autostart is off: not started)");
                }
                actions.push(Action {
                    guest: Some(name.clone()),
                    kind: ActionKind::Create,
                    impact: Impact::None,
                    reason,
                    changes: Vec::new(),
                    start: new.autostart,
                });
            }
            Some(obs) => match guest_action(name, new, obs) {
                Some(a) => actions.push(a),
                None => unchanged.push(name.clone()),
            },
        }
    }

    companions_follow(desired, observed, &mut actions, &mut unchanged);

    // Stable sort: within a class, the loops above already go by name;
    // members of a group leave highest index first.
    let index_of = |a: &Action| {
        a.guest
            .as_deref()
            .and_then(|n| observed.guests.get(n))
            .map_or(0, |o| o.applied.index)
    };
    actions.sort_by_key(|a| {
        let down = if a.kind == ActionKind::Destroy {
            u32::MAX - index_of(a)
        } else {
            0
        };
        (a.kind.class(), down)
    });
    let rollouts = rollouts(desired, observed, &actions);
    Plan {
        actions,
        unchanged,
        rollouts,
    }
}

/// A companion restarts with its member: when the member's action stops it
/// (restart/replace) and the companion would stay as it is, it restarts too.
fn companions_follow(
    desired: &Desired,
    observed: &Observed,
    actions: &mut Vec<Action>,
    unchanged: &mut Vec<String>,
) {
    let stopping: Vec<String> = actions
        .iter()
        .filter(|a| matches!(a.kind, ActionKind::Restart | ActionKind::Replace))
        .filter_map(|a| a.guest.clone())
        .collect();
    for (name, g) in &desired.guests {
        let Some(member) = g.companion_of.as_deref() else {
            continue;
        };
        if !stopping.iter().any(|m| m == member) {
            continue;
        }
        let Some(obs) = observed.guests.get(name) else {
            continue;
        };
        let reason = format!("restarts with its member {member}");
        match actions
            .iter_mut()
            .find(|a| a.guest.as_deref() == Some(name))
        {
            Some(a) if matches!(a.kind, ActionKind::Update | ActionKind::Start) => {
                a.kind = ActionKind::Restart;
                a.impact = if obs.status.is_running() {
                    Impact::Restart
                } else {
                    Impact::None
                };
                a.reason = format!("{}; {reason}", a.reason);
                a.start = g.autostart;
            }
            Some(_) => {}
            None => {
                unchanged.retain(|u| u != name);
                actions.push(Action {
                    guest: Some(name.clone()),
                    kind: ActionKind::Restart,
                    impact: if obs.status.is_running() {
                        Impact::Restart
                    } else {
                        Impact::None
                    },
                    reason,
                    changes: Vec::new(),
                    start: g.autostart,
                });
            }
        }
    }
}

/// The rolling updates implied by `actions`: per group, its running
/// members that are restarted or replaced.
fn rollouts(desired: &Desired, observed: &Observed, actions: &[Action]) -> Vec<Rollout> {
    let mut out = Vec::new();
    for (gname, group) in &desired.groups {
        let mut members: Vec<(u32, String, ActionKind)> = actions
            .iter()
            .filter(|a| matches!(a.kind, ActionKind::Restart | ActionKind::Replace))
            .filter(|a| a.impact >= Impact::Restart)
            .filter_map(|a| {
                let name = a.guest.as_deref()?;
                let g = desired.guests.get(name)?;
                let old = observed.guests.get(name)?;
                (g.group.as_deref() == Some(gname) || old.applied.group.as_deref() == Some(gname))
                    .then(|| (g.index, name.to_string(), a.kind))
            })
            .collect();
        if members.is_empty() {
            continue;
        }
        members.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        // Members serving now that stay in the group.
        let serving = group
            .members
            .iter()
            .filter(|m| {
                observed
                    .guests
                    .get(*m)
                    .is_some_and(|o| o.status.is_running())
            })
            .count() as u32;
        let can_leave = serving.saturating_sub(group.min_available);
        let batch = group.max_parallel.min(can_leave).max(1);
        let blocked = (can_leave == 0 && group.min_available > 0).then(|| {
            format!(
                "group {gname} keeps min_available = {} of {serving} running member(s), so no member may be taken out to update it; add a replica first (replicas = {}) or lower min_available",
                group.min_available,
                group.replicas + 1
            )
        });
        let left = serving.saturating_sub(batch);
        let (stays_up, service) = if !group.has_vip() {
            (
                left > 0,
                format!(
                    "none (group {gname} has no vip4/vip6); {left} member(s) keep running during each step"
                ),
            )
        } else if left > 0 {
            (
                true,
                format!(
                    "{} stays up: it is moved to one of the {left} other healthy member(s) before a member stops",
                    group.vips()
                ),
            )
        } else {
            (
                false,
                format!(
                    "{} goes DOWN while a member restarts (no other member serves it); raise replicas to keep it up",
                    group.vips()
                ),
            )
        };
        let companions = |m: &str| -> Vec<String> {
            desired
                .guests
                .values()
                .filter(|g| g.companion_of.as_deref() == Some(m))
                .map(|g| g.name.clone())
                .collect()
        };
        let mut steps = Vec::new();
        for chunk in members.chunks(batch as usize) {
            let names: Vec<String> = chunk
                .iter()
                .map(|(_, n, k)| {
                    let mut s = format!("{n} ({k}");
                    let c = companions(n);
                    if !c.is_empty() {
                        s.push_str(&format!(" with {}", c.join(", ")));
                    }
                    s.push(')');
                    s
                })
                .collect();
            steps.push(format!(
                "take {} out of the service address, wait {}, update, wait until healthy for {} (at most {}), put back",
                names.join(", "),
                format_duration_ms(group.drain_ms),
                format_duration_ms(group.min_healthy_time_ms),
                format_duration_ms(group.healthy_deadline_ms),
            ));
        }
        if group.auto_revert {
            steps.push(
                "if a member is not healthy in time: revert the updated members to their previous config".into(),
            );
        }
        out.push(Rollout {
            group: gname.clone(),
            members: members.into_iter().map(|(_, n, _)| n).collect(),
            batch,
            service_stays_up: stays_up && blocked.is_none(),
            service,
            steps,
            blocked,
        });
    }
    out
}
