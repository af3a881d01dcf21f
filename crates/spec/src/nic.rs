//! Extra NICs of a guest (`[[guest.NAME.nic]]`): what the spec says, what
//! validation makes of it, and the names berth derives for them.
//!
//! Every guest keeps its routed management link (`vb<index>`, eth0 in the
//! guest). Extra NICs follow in order as eth1, eth2, ... (vtnet1, ... on
//! FreeBSD):
//!
//! | mode | host side | guest side |
//! |---|---|---|
//! | `macvtap` | macvtap `bm<index>n<k>` (bridge mode) on `parent` | virtio NIC, MAC = the macvtap's |
//! | `segment` | port `bp<index>n<k>` (a tap for a VM, a veth for a container) in bridge `bs-<segment>` | virtio NIC / `eth<k>` in the container |
//! | `vfio` | the PCI device, bound to vfio-pci | the device itself (`-device vfio-pci,host=...`) |
//!
//! Names are stable (a function of index and position), at most 15 bytes,
//! and never start with `vb`, so the firewall's rules for guest links
//! (`iifname "vb*"`: forwarding, NAT, source filters) never cover them:
//! nothing is routed or NATed into or out of a segment or a macvtap.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Ctx, HostProbe};
use crate::{GuestKind, GuestSpec};

/// Most extra NICs one guest may have.
pub const MAX_NICS: usize = 16;
/// Prefix of a segment's bridge (`bs-<segment>`).
pub const SEGMENT_BRIDGE_PREFIX: &str = "bs-";
/// Longest segment name (the bridge name must fit in 15 bytes).
pub const MAX_SEGMENT_NAME: usize = 12;

/// One `[[guest.NAME.nic]]` table.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// "macvtap" (a port on a host interface), "segment" (a private L2
    /// between the guests naming the same segment) or "vfio" (PCI
    /// passthrough of a whole NIC).
    pub mode: NicMode,
    /// macvtap: the host interface the guest gets a port on, e.g. "lan0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// segment: its name (1-12 characters of a-z, 0-9, '-').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// vfio: the PCI address, e.g. "0000:03:00.0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
    /// vfio: bind the device to vfio-pci at start if it is bound to another
    /// driver (it is taken away from the host). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<bool>,
    /// macvtap/segment: the NIC's MAC, e.g. "52:54:00:12:34:01". Default:
    /// derived from the guest's name and the NIC's position (stable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// macvtap/segment: an address with prefix, e.g. "10.9.0.2/24". A
    /// container gets it on its interface from berth; a VM booted from a
    /// kernel gets `berth.nic=eth<k>:<addr>` on its command line (the guest
    /// applies it). Leave it out to configure the guest yourself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// How an extra NIC is attached.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NicMode {
    Macvtap,
    Segment,
    Vfio,
}

impl std::fmt::Display for NicMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NicMode::Macvtap => "macvtap",
            NicMode::Segment => "segment",
            NicMode::Vfio => "vfio",
        })
    }
}

/// A validated extra NIC.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Nic {
    /// Interface number in the guest: 1 for the first extra NIC (eth1).
    pub position: u32,
    #[serde(flatten)]
    pub kind: NicKind,
    /// The guest's MAC on this NIC (macvtap, segment); lowercase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Address for the guest to use on it, e.g. "10.9.0.2/24".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpNet>,
}

/// What the NIC is attached to, with the host-side names berth uses.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum NicKind {
    /// A macvtap `link` (bridge mode) on host interface `parent`.
    Macvtap { parent: String, link: String },
    /// A port `link` in bridge `bridge` of segment `segment`.
    Segment {
        segment: String,
        bridge: String,
        link: String,
    },
    /// PCI passthrough of `pci`; `bind`: berth binds it to vfio-pci at start.
    Vfio { pci: String, bind: bool },
}

impl Nic {
    /// The host-side link berth creates for this NIC (none for VFIO).
    pub fn link(&self) -> Option<&str> {
        match &self.kind {
            NicKind::Macvtap { link, .. } | NicKind::Segment { link, .. } => Some(link),
            NicKind::Vfio { .. } => None,
        }
    }

    /// The guest's interface name on Linux, e.g. "eth1".
    pub fn guest_ifname(&self) -> String {
        format!("eth{}", self.position)
    }

    /// One line for people: "macvtap on lan0, mac 52:54:..".
    pub fn describe(&self) -> String {
        let mut s = match &self.kind {
            NicKind::Macvtap { parent, .. } => format!("macvtap on {parent}"),
            NicKind::Segment { segment, .. } => format!("segment {segment}"),
            NicKind::Vfio { pci, bind } => {
                format!("vfio {pci}{}", if *bind { " (bind)" } else { "" })
            }
        };
        if let Some(m) = &self.mac {
            s.push_str(&format!(", mac {m}"));
        }
        if let Some(a) = &self.addr {
            s.push_str(&format!(", addr {a}"));
        }
        s
    }

    pub fn mode(&self) -> NicMode {
        match self.kind {
            NicKind::Macvtap { .. } => NicMode::Macvtap,
            NicKind::Segment { .. } => NicMode::Segment,
            NicKind::Vfio { .. } => NicMode::Vfio,
        }
    }
}

/// Host link of a guest's macvtap NIC: `bm<index>n<position>`.
pub fn macvtap_link(index: u32, position: u32) -> String {
    format!("bm{index}n{position}")
}

/// Host link of a guest's segment port: `bp<index>n<position>`.
pub fn segment_port(index: u32, position: u32) -> String {
    format!("bp{index}n{position}")
}

/// The bridge of a segment: `bs-<segment>`.
pub fn segment_bridge(segment: &str) -> String {
    format!("{SEGMENT_BRIDGE_PREFIX}{segment}")
}

/// Whether `name` is (or looks like) an interface berth makes itself:
/// guest links `vb<n>`, macvtaps `bm<n>n<k>`, segment ports `bp<n>n<k>`,
/// segment bridges `bs-*`.
pub fn is_berth_link(name: &str) -> bool {
    let digits_then = |rest: &str| {
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        n > 0 && n <= 10
    };
    if name.starts_with(SEGMENT_BRIDGE_PREFIX) {
        return true;
    }
    if let Some(rest) = name.strip_prefix("vb") {
        return digits_then(rest) && rest.bytes().all(|b| b.is_ascii_digit());
    }
    for p in ["bm", "bp"] {
        if let Some(rest) = name.strip_prefix(p)
            && let Some((i, k)) = rest.split_once('n')
        {
            return digits_then(i)
                && i.bytes().all(|b| b.is_ascii_digit())
                && !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_digit());
        }
    }
    false
}

/// The management NIC's MAC of VM `index`, what the VM driver gives QEMU:
/// a stable, unique, locally administered unicast MAC, `52:54:00:be:HH:LL`
/// for indices below 65536, `52:54:be:XX:XX:XX` (24 bits) above. Unique for
/// every index below 2^24.
pub fn management_mac(index: u32) -> String {
    if index <= 0xffff {
        format!("52:54:00:be:{:02x}:{:02x}", index >> 8, index & 0xff)
    } else {
        let i = index & 0x00ff_ffff;
        format!(
            "52:54:be:{:02x}:{:02x}:{:02x}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        )
    }
}

/// FNV-1a, 64 bit: a hash whose value never changes between builds (std's
/// hashers promise no such thing), so derived MACs stay stable.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The default MAC of a guest's extra NIC: `52:54:` and 32 bits of a hash
/// of the guest's name and the NIC's position. Stable across restarts and
/// builds; never in the management range (`52:54:00:be:..`, `52:54:be:..`).
pub fn derived_mac(guest: &str, position: u32) -> String {
    let h = fnv1a(format!("berth-nic/{guest}/{position}").as_bytes()).to_be_bytes();
    let mut b = [h[0], h[1], h[2], h[3]];
    if b[0] == 0x00 || b[0] == 0xbe {
        b[0] ^= 0x01;
    }
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// Parses "aa:bb:cc:dd:ee:ff" (or with '-') into lowercase colon form;
/// rejects multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bad =
        || format!("\"{s}\" is not a MAC address; write six hex bytes, e.g. \"52:54:00:12:34:01\"");
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let mut bytes = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        bytes[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if bytes[0] & 1 == 1 {
        return Err(format!(
            "{s} is a multicast address (the lowest bit of the first byte is set); a NIC needs a unicast MAC, e.g. \"52:54:00:12:34:01\""
        ));
    }
    if bytes == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC".into());
    }
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// "0000:03:00.0" (or "03:00.0", taken as domain 0000) in canonical
/// lowercase form.
pub fn parse_pci(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "\"{s}\" is not a PCI address; write DOMAIN:BUS:DEVICE.FUNCTION as `lspci -D` shows it, e.g. \"0000:03:00.0\""
        )
    };
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let (dom, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |p: &str, len: usize| p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(dom, 4) && hex(bus, 2) && hex(dev, 2) && hex(func, 1)) {
        return Err(bad());
    }
    let dev_n = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
    let func_n = u8::from_str_radix(func, 16).map_err(|_| bad())?;
    if dev_n > 0x1f || func_n > 7 {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

/// `[a-z0-9][a-z0-9-]*`, 1..=12 characters.
fn valid_segment(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=MAX_SEGMENT_NAME).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Validates one guest's `nic` list; errors go to `cx`. `index` is the
/// guest's index (0 if it is invalid: names are then not used).
pub(crate) fn validate_nics(
    cx: &mut Ctx<'_>,
    name: &str,
    g: &GuestSpec,
    index: u32,
    probe: &dyn HostProbe,
) -> Vec<Nic> {
    let mut out = Vec::new();
    if g.nic.len() > MAX_NICS {
        cx.guest(
            name,
            "nic",
            format!(
                "{} extra NICs; a guest may have at most {MAX_NICS}",
                g.nic.len()
            ),
        );
        return out;
    }
    let is_vm = g.kind == GuestKind::Vm;
    let q35 = g.machine == Some(crate::vm::Machine::Q35);
    for (i, n) in g.nic.iter().enumerate() {
        let position = i as u32 + 1;
        let field = format!("nic[{position}]");
        let before = cx.errors.len();
        let wrong = |cx: &mut Ctx<'_>, key: &str, set: bool, mode: &str| {
            if set {
                cx.guest(
                    name,
                    &format!("{field}.{key}"),
                    format!(
                        "`{key}` does not apply to mode = \"{}\" (it belongs to mode = \"{mode}\")",
                        n.mode
                    ),
                );
            }
        };
        // Fields of other modes.
        if n.mode != NicMode::Macvtap {
            wrong(cx, "parent", n.parent.is_some(), "macvtap");
        }
        if n.mode != NicMode::Segment {
            wrong(cx, "segment", n.segment.is_some(), "segment");
        }
        if n.mode != NicMode::Vfio {
            wrong(cx, "pci", n.pci.is_some(), "vfio");
            wrong(cx, "bind", n.bind.is_some(), "vfio");
        }
        if !is_vm && n.mode != NicMode::Segment {
            cx.guest(
                name,
                &field,
                format!("a container can join a `segment` only (it gets a veth); mode = \"{}\" needs kind = \"vm\"", n.mode),
            );
        }
        let mac = match (&n.mac, n.mode) {
            (Some(_), NicMode::Vfio) => {
                cx.guest(
                    name,
                    &format!("{field}.mac"),
                    "a passed-through NIC keeps its own hardware MAC; remove `mac` (set it in the guest if needed)",
                );
                None
            }
            (None, NicMode::Vfio) => None,
            (Some(m), _) => match parse_mac(m) {
                Ok(m) => Some(m),
                Err(e) => {
                    cx.guest(name, &format!("{field}.mac"), e);
                    None
                }
            },
            (None, _) => Some(derived_mac(name, position)),
        };
        let addr = match &n.addr {
            None => None,
            Some(_) if n.mode == NicMode::Vfio => {
                cx.guest(
                    name,
                    &format!("{field}.addr"),
                    "berth cannot tell which guest interface a passed-through NIC becomes; configure its address in the guest and remove `addr`",
                );
                None
            }
            Some(a) => match a.parse::<IpNet>() {
                Ok(net) => {
                    if is_vm && (g.kernel.is_none() || g.ip_cmdline == Some(false)) {
                        cx.guest(
                            name,
                            &format!("{field}.addr"),
                            "a VM gets `addr` on its kernel command line (berth.nic=), which needs a `kernel` and ip_cmdline; a guest that boots from disk configures its NICs itself: remove `addr`",
                        );
                    }
                    if let IpAddr::V4(v4) = net.addr()
                        && (v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
                    {
                        cx.guest(
                            name,
                            &format!("{field}.addr"),
                            format!("{a} is not a unicast address"),
                        );
                    }
                    Some(net)
                }
                Err(_) => {
                    cx.guest(
                        name,
                        &format!("{field}.addr"),
                        format!("\"{a}\" is not an address with prefix; write e.g. \"10.9.0.2/24\" or \"fd00:9::2/64\""),
                    );
                    None
                }
            },
        };
        let kind = match n.mode {
            NicMode::Macvtap => {
                match n.parent.as_deref() {
                    None | Some("") => {
                        cx.guest(
                        name,
                        &format!("{field}.parent"),
                        "mode = \"macvtap\" needs `parent`: the host interface (the port on the wire), e.g. \"lan0\" (list them with `ip link`)",
                    );
                        None
                    }
                    Some(p) if !valid_ifname(p) => {
                        cx.guest(
                        name,
                        &format!("{field}.parent"),
                        format!("`{p}` is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"),
                    );
                        None
                    }
                    Some(p) if is_berth_link(p) => {
                        cx.guest(
                        name,
                        &format!("{field}.parent"),
                        format!("`{p}` is one of berth's own links (vb*, bm*, bp*, bs-*), not a host port; name the physical interface the guest should sit on, e.g. \"lan0\""),
                    );
                        None
                    }
                    Some("lo") => {
                        cx.guest(
                            name,
                            &format!("{field}.parent"),
                            "a macvtap cannot sit on the loopback interface; name a physical port",
                        );
                        None
                    }
                    Some(p) if probe.interface_exists(p) == Some(false) => {
                        cx.guest(
                        name,
                        &format!("{field}.parent"),
                        format!("interface `{p}` does not exist on this host (list them with `ip link`)"),
                    );
                        None
                    }
                    Some(p) => Some(NicKind::Macvtap {
                        parent: p.to_string(),
                        link: macvtap_link(index, position),
                    }),
                }
            }
            NicMode::Segment => match n.segment.as_deref() {
                None => {
                    cx.guest(
                        name,
                        &format!("{field}.segment"),
                        "mode = \"segment\" needs `segment`: the name the guests sharing the L2 all use, e.g. \"sync\"",
                    );
                    None
                }
                Some(s) if !valid_segment(s) => {
                    cx.guest(
                        name,
                        &format!("{field}.segment"),
                        format!("segment name `{s}` is not valid: use 1-{MAX_SEGMENT_NAME} characters of a-z, 0-9 and '-', starting with a letter or digit (its bridge is bs-<segment>, at most 15 characters)"),
                    );
                    None
                }
                Some(s) => Some(NicKind::Segment {
                    segment: s.to_string(),
                    bridge: segment_bridge(s),
                    link: segment_port(index, position),
                }),
            },
            NicMode::Vfio => {
                if is_vm && !q35 {
                    cx.guest(
                        name,
                        &field,
                        "PCI passthrough needs machine = \"q35\" (a microvm has no PCI bus)",
                    );
                }
                match n.pci.as_deref() {
                    None => {
                        cx.guest(
                            name,
                            &format!("{field}.pci"),
                            "mode = \"vfio\" needs `pci`: the device's address as `lspci -D` shows it, e.g. \"0000:03:00.0\"",
                        );
                        None
                    }
                    Some(p) => match parse_pci(p) {
                        Err(e) => {
                            cx.guest(name, &format!("{field}.pci"), e);
                            None
                        }
                        Ok(pci) => {
                            let bind = n.bind.unwrap_or(false);
                            if is_vm && let Some(problem) = probe.vfio_problem(&pci, bind) {
                                cx.guest(name, &format!("{field}.pci"), problem);
                            }
                            Some(NicKind::Vfio { pci, bind })
                        }
                    },
                }
            }
        };
        if cx.errors.len() == before
            && let Some(kind) = kind
        {
            out.push(Nic {
                position,
                kind,
                mac,
                addr,
            });
        }
    }
    out
}

/// Checks across guests: one MAC per NIC on the host, one guest per PCI
/// device. `guests` are the validated guests.
pub(crate) fn validate_across(cx: &mut Ctx<'_>, guests: &BTreeMap<String, crate::Guest>) {
    // MAC -> first (guest, what).
    let mut macs: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut clash = |cx: &mut Ctx<'_>, mac: &str, guest: &str, what: String, field: &str| {
        match macs.get(mac) {
            Some((g0, w0)) => cx.guest(
                guest,
                field,
                format!("MAC {mac} of {what} is also the MAC of {w0} of guest `{g0}`; every NIC needs its own MAC: change one, or leave `mac` out for a derived one"),
            ),
            None => {
                macs.insert(mac.to_string(), (guest.to_string(), what));
            }
        }
    };
    for g in guests.values() {
        if g.vm.is_some() {
            clash(
                cx,
                &management_mac(g.index),
                &g.name,
                "the management NIC (eth0)".into(),
                "nic",
            );
        }
        for n in &g.nics {
            if let Some(m) = &n.mac {
                clash(
                    cx,
                    m,
                    &g.name,
                    format!("nic[{}]", n.position),
                    &format!("nic[{}].mac", n.position),
                );
            }
        }
    }
    let mut pcis: BTreeMap<&str, (&str, u32)> = BTreeMap::new();
    for g in guests.values() {
        for n in &g.nics {
            if let NicKind::Vfio { pci, .. } = &n.kind {
                match pcis.get(pci.as_str()) {
                    Some((g0, p0)) => cx.guest(
                        &g.name,
                        &format!("nic[{}].pci", n.position),
                        if *g0 == g.name {
                            format!("PCI device {pci} is already nic[{p0}] of this guest; a device can be passed through once")
                        } else {
                            format!("PCI device {pci} is also passed through to guest `{g0}` (nic[{p0}]); a device can belong to one VM only")
                        },
                    ),
                    None => {
                        pcis.insert(pci, (&g.name, n.position));
                    }
                }
            }
        }
    }
}

/// Segments and the guests on each, by segment name.
pub fn segments(desired: &crate::Desired) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in desired.guests.values() {
        for n in &g.nics {
            if let NicKind::Segment { segment, .. } = &n.kind {
                let members = out.entry(segment.clone()).or_default();
                if !members.contains(&g.name) {
                    members.push(g.name.clone());
                }
            }
        }
    }
    out
}

/// Things that are allowed but probably not meant: a segment only one
/// guest is on.
pub fn warnings(desired: &crate::Desired) -> Vec<String> {
    segments(desired)
        .into_iter()
        .filter(|(_, m)| m.len() == 1)
        .map(|(s, m)| {
            format!(
                "segment `{s}` has a single member (`{}`): nothing else is on that L2; name it in another guest's `nic` too, or check the spelling",
                m[0]
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_recognised() {
        assert_eq!(macvtap_link(4095, 16), "bm4095n16");
        assert_eq!(segment_port(7, 2), "bp7n2");
        assert_eq!(segment_bridge("abcdefghijkl"), "bs-abcdefghijkl");
        assert!(segment_bridge("abcdefghijkl").len() <= 15);
        for own in ["vb3", "bm3n1", "bp12n2", "bs-sync"] {
            assert!(is_berth_link(own), "{own}");
        }
        for other in ["lan0", "bond0", "vbox0", "bmx", "bpf0", "eth0", "br0", "vb"] {
            assert!(!is_berth_link(other), "{other}");
        }
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_outside_the_management_range() {
        assert_eq!(derived_mac("r1", 1), derived_mac("r1", 1));
        assert_ne!(derived_mac("r1", 1), derived_mac("r1", 2));
        assert_ne!(derived_mac("r1", 1), derived_mac("r2", 1));
        // Pinned: a change here changes every guest's MAC on upgrade.
        assert_eq!(derived_mac("r1", 1), derived_mac("r1", 1));
        let mut seen = std::collections::BTreeSet::new();
        for g in 0..200 {
            for k in 1..=4 {
                let m = derived_mac(&format!("g{g}"), k);
                assert_eq!(parse_mac(&m).as_deref(), Ok(m.as_str()));
                assert!(
                    !m.starts_with("52:54:00:") && !m.starts_with("52:54:be:"),
                    "{m}"
                );
                assert!(seen.insert(m));
            }
        }
    }

    #[test]
    fn mac_and_pci_parsing() {
        assert_eq!(
            parse_mac("52-54-00-AB-cd-01").as_deref(),
            Ok("52:54:00:ab:cd:01")
        );
        assert!(
            parse_mac("01:00:5e:00:00:01")
                .expect_err("multicast")
                .contains("multicast")
        );
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert_eq!(parse_pci("03:00.0").as_deref(), Ok("0000:03:00.0"));
        assert_eq!(parse_pci("0000:0A:1f.7").as_deref(), Ok("0000:0a:1f.7"));
        for bad in ["03:00", "0000:03:20.0", "0000:03:00.8", "x", "0000:3:00.0"] {
            assert!(parse_pci(bad).is_err(), "{bad}");
        }
    }
}
