//! Redundancy groups and health probes: `[group.NAME]` expands into member
//! guests (`NAME-0` ..) and their companions before the usual per-guest
//! validation, and its service address settings become a typed [`Group`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::validate::{Ctx, Host, parse_duration_ms, valid_guest_name};
use crate::{GroupSpec, GuestKind, GuestSpec, HealthSpec, Spec, VipMode};

const DEFAULT_MIN_HEALTHY_MS: u64 = 1_000;
const DEFAULT_HEALTHY_DEADLINE_MS: u64 = 60_000;
const DEFAULT_DRAIN_MS: u64 = 500;
const DEFAULT_INTERVAL_MS: u64 = 1_000;
const DEFAULT_TIMEOUT_MS: u64 = 1_000;
const MAX_REPLICAS: u32 = 256;

/// A validated group.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub replicas: u32,
    pub index_base: u32,
    pub vip4: Option<Ipv4Addr>,
    pub vip6: Option<Ipv6Addr>,
    pub mode: VipMode,
    pub max_parallel: u32,
    pub min_available: u32,
    pub min_healthy_time_ms: u64,
    pub healthy_deadline_ms: u64,
    pub auto_revert: bool,
    pub drain_ms: u64,
    /// `NAME-0` .. in index order.
    pub members: Vec<String>,
}

impl Group {
    /// Member `i`'s name.
    pub fn member(name: &str, i: u32) -> String {
        format!("{name}-{i}")
    }

    /// Whether the group has a service address.
    pub fn has_vip(&self) -> bool {
        self.vip4.is_some() || self.vip6.is_some()
    }

    /// "10.0.1.10, fd42::10" or "no service address".
    pub fn vips(&self) -> String {
        let v: Vec<String> = self
            .vip4
            .map(|a| a.to_string())
            .into_iter()
            .chain(self.vip6.map(|a| a.to_string()))
            .collect();
        if v.is_empty() {
            "no service address".into()
        } else {
            v.join(", ")
        }
    }
}

/// A validated health check.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

/// What a health check does.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// TCP connect to the guest's IPv4 address.
    Tcp { port: u16 },
    /// HTTP/1.1 GET of `path` on the guest's IPv4 address; `url` is the
    /// template as written.
    Http {
        url: String,
        port: u16,
        path: String,
        expect: u16,
    },
    /// A command run in the guest; exit 0 passes.
    Exec { command: Vec<String> },
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp { port } => write!(f, "tcp {port}"),
            Probe::Http { url, expect, .. } => write!(f, "http {url} = {expect}"),
            Probe::Exec { command } => write!(f, "exec {}", command.join(" ")),
        }
    }
}

/// One guest a spec asks for, after groups are expanded.
pub(crate) struct Expanded {
    pub name: String,
    pub spec: GuestSpec,
    pub group: Option<String>,
    pub companion_of: Option<String>,
    pub vip4: Option<Ipv4Addr>,
    pub vip6: Option<Ipv6Addr>,
}

/// `[guest.*]` as they are, then every group's members and companions.
pub(crate) fn expand(cx: &mut Ctx<'_>, spec: &Spec) -> Vec<Expanded> {
    let mut out: Vec<Expanded> = spec
        .guest
        .iter()
        .map(|(name, g)| {
            for (field, set) in [
                ("companions", !g.companions.is_empty()),
                ("name", g.name.is_some()),
                ("index_base", g.index_base.is_some()),
            ] {
                if set {
                    cx.guest(name, field, format!("`{field}` belongs in a group template (`[group.NAME.template]`) or a companion, not in `[guest.{name}]`"));
                }
            }
            if g.index.is_none() {
                cx.guest(name, "index", "every `[guest.NAME]` needs an `index` (1..max_guests-1, unique): it picks the guest's addresses and link name");
            }
            Expanded {
                name: name.clone(),
                spec: g.clone(),
                group: None,
                companion_of: None,
                vip4: None,
                vip6: None,
            }
        })
        .collect();
    for (gname, gs) in &spec.group {
        let (vip4, vip6) = parse_vips(cx, gname, gs);
        let field = |f: &str| format!("group.{gname}.{f}");
        if !valid_guest_name(gname) || gname.len() + 1 + digits(gs.replicas) > 32 {
            cx.host(&field("name"), "group names must be a-z, 0-9 and '-', starting with a letter or digit, and short enough that `NAME-<i>` stays within 32 characters");
            continue;
        }
        if gs.replicas > MAX_REPLICAS {
            cx.host(
                &field("replicas"),
                format!("{} is too many; use 0..={MAX_REPLICAS}", gs.replicas),
            );
            continue;
        }
        let t = &gs.template;
        if t.index.is_some() {
            cx.host(&field("template.index"), format!("members get their index from index_base ({} + i); remove `index` from the template", gs.index_base));
        }
        for (f, set) in [
            ("name", t.name.is_some()),
            ("index_base", t.index_base.is_some()),
        ] {
            if set {
                cx.host(
                    &field(&format!("template.{f}")),
                    format!("`{f}` is for companions; set the group's `index_base` instead"),
                );
            }
        }
        let mut companions = Vec::new();
        for (k, c) in t.companions.iter().enumerate() {
            let cf = |f: &str| field(&format!("template.companions[{k}].{f}"));
            let Some(cname) = c.name.clone() else {
                cx.host(
                    &cf("name"),
                    "each companion needs a `name` (member `web-0`'s companion `db` is `web-0-db`)",
                );
                continue;
            };
            let Some(base) = c.index_base else {
                cx.host(&cf("index_base"), "each companion needs an `index_base` (member i's companion gets index_base + i)");
                continue;
            };
            if c.kind != GuestKind::Container {
                cx.host(&cf("kind"), "companions are containers");
            }
            if c.index.is_some() || !c.companions.is_empty() {
                cx.host(&cf("index"), "a companion takes no `index` (it has `index_base`) and no companions of its own");
            }
            companions.push((cname, base, c));
        }
        for i in 0..gs.replicas {
            let member = Group::member(gname, i);
            let mut m = t.clone();
            m.index = Some(gs.index_base.saturating_add(i));
            m.companions = Vec::new();
            out.push(Expanded {
                name: member.clone(),
                spec: m,
                group: Some(gname.clone()),
                companion_of: None,
                vip4,
                vip6,
            });
            for (cname, base, c) in &companions {
                let mut cs = (*c).clone();
                cs.index = Some(base.saturating_add(i));
                cs.name = None;
                cs.index_base = None;
                out.push(Expanded {
                    name: format!("{member}-{cname}"),
                    spec: cs,
                    group: None,
                    companion_of: Some(member.clone()),
                    vip4: None,
                    vip6: None,
                });
            }
        }
    }
    out
}

fn digits(n: u32) -> usize {
    n.saturating_sub(1).max(1).to_string().len()
}

fn parse_vips(
    cx: &mut Ctx<'_>,
    gname: &str,
    gs: &GroupSpec,
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = gs.vip4.as_ref().and_then(|s| match s.parse::<Ipv4Addr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.host(&format!("group.{gname}.vip4"), format!("\"{s}\" is not an IPv4 address; give one address without a prefix, e.g. \"10.0.1.10\""));
            None
        }
    });
    let v6 = gs.vip6.as_ref().and_then(|s| match s.parse::<Ipv6Addr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.host(&format!("group.{gname}.vip6"), format!("\"{s}\" is not an IPv6 address; give one address without a prefix, e.g. \"fd42:b:e:2::10\""));
            None
        }
    });
    (v4, v6)
}

/// Validates the group settings (the members are validated as guests).
pub(crate) fn validate_groups(
    cx: &mut Ctx<'_>,
    spec: &Spec,
    host: Option<&Host>,
) -> BTreeMap<String, Group> {
    let mut groups = BTreeMap::new();
    let mut vip_owner: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (gname, gs) in &spec.group {
        let before = cx.errors.len();
        let field = |f: &str| format!("group.{gname}.{f}");
        // Parse errors were reported by expand(); here only valid ones count.
        let vip4 = gs.vip4.as_ref().and_then(|s| s.parse::<Ipv4Addr>().ok());
        let vip6 = gs.vip6.as_ref().and_then(|s| s.parse::<Ipv6Addr>().ok());
        for vip in vip4.map(IpAddr::V4).into_iter().chain(vip6.map(IpAddr::V6)) {
            if let Some(other) = vip_owner.insert(vip, gname) {
                cx.host(&field(if vip.is_ipv4() { "vip4" } else { "vip6" }), format!("{vip} is also the service address of group `{other}`; every group needs its own"));
            }
            if vip.is_unspecified() || vip.is_loopback() || vip.is_multicast() {
                cx.host(
                    &field(if vip.is_ipv4() { "vip4" } else { "vip6" }),
                    format!(
                        "{vip} cannot be a service address (unspecified, loopback or multicast)"
                    ),
                );
            }
        }
        if let (Some(h), Some(v)) = (host, vip4)
            && h.subnet4.contains(&v)
        {
            cx.host(&field("vip4"), format!("{v} lies inside host.subnet4 {}, where guest addresses live (it could be guest {}'s address); pick an address outside it, e.g. from another /24", h.subnet4, u32::from(v) - u32::from(h.subnet4.network())));
        }
        if let (Some(h), Some(v)) = (host, vip6)
            && h.subnet6.is_some_and(|n| n.contains(&v))
        {
            cx.host(&field("vip6"), format!("{v} lies inside host.subnet6, where guest addresses live; pick an address outside it"));
        }
        if vip6.is_some() && host.is_some_and(|h| h.subnet6.is_none()) {
            cx.host(
                &field("vip6"),
                "an IPv6 service address needs host.subnet6 (members are reached over IPv6)",
            );
        }
        let max_parallel = gs.max_parallel.unwrap_or(1);
        if max_parallel == 0 {
            cx.host(
                &field("max_parallel"),
                "must be at least 1 (members updated at once)",
            );
        }
        let min_available = gs
            .min_available
            .unwrap_or(gs.replicas.saturating_sub(max_parallel));
        if min_available > gs.replicas {
            cx.host(&field("min_available"), format!("{min_available} is more than replicas ({}): a group cannot keep more members available than it has; lower min_available or raise replicas", gs.replicas));
        }
        let dur = |cx: &mut Ctx<'_>, f: &str, v: &Option<String>, default: u64| match v {
            None => default,
            Some(s) => parse_duration_ms(s).unwrap_or_else(|e| {
                cx.host(&field(f), e);
                default
            }),
        };
        let min_healthy_time_ms = dur(
            cx,
            "min_healthy_time",
            &gs.min_healthy_time,
            DEFAULT_MIN_HEALTHY_MS,
        );
        let healthy_deadline_ms = dur(
            cx,
            "healthy_deadline",
            &gs.healthy_deadline,
            DEFAULT_HEALTHY_DEADLINE_MS,
        );
        let drain_ms = dur(cx, "drain_time", &gs.drain_time, DEFAULT_DRAIN_MS);
        if healthy_deadline_ms == 0 {
            cx.host(&field("healthy_deadline"), "must be longer than 0");
        }
        if cx.errors.len() != before {
            continue;
        }
        groups.insert(
            gname.clone(),
            Group {
                name: gname.clone(),
                replicas: gs.replicas,
                index_base: gs.index_base,
                vip4,
                vip6,
                mode: gs.mode.unwrap_or_default(),
                max_parallel,
                min_available,
                min_healthy_time_ms,
                healthy_deadline_ms,
                auto_revert: gs.auto_revert.unwrap_or(true),
                drain_ms,
                members: (0..gs.replicas).map(|i| Group::member(gname, i)).collect(),
            },
        );
    }
    groups
}

/// Validates `health = {...}` of guest `name`.
pub(crate) fn validate_health(cx: &mut Ctx<'_>, name: &str, h: &HealthSpec) -> Option<Health> {
    let before = cx.errors.len();
    let set = [h.tcp.is_some(), h.http.is_some(), h.exec.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        cx.guest(name, "health", "give exactly one probe: { tcp = PORT }, { http = \"http://{addr}:80/\", expect = 200 } or { exec = [\"cmd\", ...] }");
        return None;
    }
    if h.expect.is_some() && h.http.is_none() {
        cx.guest(name, "health", "`expect` goes with an `http` probe");
    }
    let probe = if let Some(port) = h.tcp {
        if port == 0 {
            cx.guest(
                name,
                "health",
                "tcp port 0 cannot be probed; give the port the guest listens on",
            );
        }
        Probe::Tcp { port }
    } else if let Some(url) = &h.http {
        match parse_http_url(url) {
            Ok((port, path)) => {
                let expect = h.expect.unwrap_or(200);
                if !(100..=599).contains(&expect) {
                    cx.guest(
                        name,
                        "health",
                        format!("expect = {expect} is not an HTTP status (100..599)"),
                    );
                }
                Probe::Http {
                    url: url.clone(),
                    port,
                    path,
                    expect,
                }
            }
            Err(e) => {
                cx.guest(name, "health", e);
                return None;
            }
        }
    } else {
        let command = h.exec.clone().unwrap_or_default();
        if command.first().is_none_or(|c| c.is_empty()) {
            cx.guest(
                name,
                "health",
                "exec probe command is empty; give the program and its arguments",
            );
        }
        Probe::Exec { command }
    };
    let dur = |cx: &mut Ctx<'_>, what: &str, v: &Option<String>, default: u64| match v {
        None => default,
        Some(s) => match parse_duration_ms(s) {
            Ok(0) => {
                cx.guest(
                    name,
                    "health",
                    format!("health.{what} must be longer than 0"),
                );
                default
            }
            Ok(ms) => ms,
            Err(e) => {
                cx.guest(name, "health", format!("health.{what}: {e}"));
                default
            }
        },
    };
    let interval_ms = dur(cx, "interval", &h.interval, DEFAULT_INTERVAL_MS);
    let timeout_ms = dur(cx, "timeout", &h.timeout, DEFAULT_TIMEOUT_MS);
    let healthy_after = h.healthy_after.unwrap_or(2);
    let unhealthy_after = h.unhealthy_after.unwrap_or(2);
    if healthy_after == 0 || unhealthy_after == 0 {
        cx.guest(
            name,
            "health",
            "healthy_after and unhealthy_after count probes; use 1 or more",
        );
    }
    (cx.errors.len() == before).then_some(Health {
        probe,
        interval_ms,
        timeout_ms,
        healthy_after,
        unhealthy_after,
    })
}

/// "http://{addr}:8080/health" -> (8080, "/health"). The host must be
/// `{addr}` (the guest's own address): probes go to each member.
fn parse_http_url(url: &str) -> Result<(u16, String), String> {
    let bad = |why: &str| {
        format!("health.http \"{url}\": {why}; write it like \"http://{{addr}}:80/health\"")
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs can be probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number 1..65535"))?,
        ),
        _ => (authority, 80),
    };
    if host != "{addr}" {
        return Err(bad(
            "the host must be {addr} (each member is probed at its own address)",
        ));
    }
    if port == 0 {
        return Err(bad("port 0 cannot be probed"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            "the path must not contain spaces or control characters",
        ));
    }
    Ok((port, path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_http_url;

    #[test]
    fn http_urls() {
        assert_eq!(
            parse_http_url("http://{addr}:80/").unwrap(),
            (80, "/".into())
        );
        assert_eq!(parse_http_url("http://{addr}").unwrap(), (80, "/".into()));
        assert_eq!(
            parse_http_url("http://{addr}:8080/health?x=1").unwrap(),
            (8080, "/health?x=1".into())
        );
        assert!(parse_http_url("https://{addr}/").is_err());
        assert!(parse_http_url("http://10.0.0.1/").is_err());
        assert!(parse_http_url("http://{addr}:x/").is_err());
        assert!(parse_http_url("http://{addr}:0/").is_err());
        assert!(parse_http_url("http://{addr}/a b").is_err());
    }
}
