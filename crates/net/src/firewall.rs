//! nftables: berth owns exactly one table, `inet berth`, and nothing else.
//!
//! The ruleset is rendered as nft JSON (`nft -j`) and applied in one
//! transaction that adds, deletes and re-adds the table, so applying is
//! idempotent and atomic: either the whole new table is in place or the old
//! one is untouched.
//!
//! # What the table does
//!
//! * `prerouting_filter` (filter, hook prerouting, priority raw = -300, policy
//!   accept): on guest links (`vb*`), drop IPv4 whose `(link, source)` pair
//!   is not in set `guest4`, drop IPv6 whose source is neither link-local
//!   (`fe80::/10`, needed for NDP) nor a `(link, source)` pair in set
//!   `guest6`, and drop DHCP/DHCPv6 server replies (`udp sport 67` /
//!   `udp sport 547`) sent by a guest. A set lookup costs the same for 2 or
//!   4000 guests; a link that is not in the sets (no guest, or no IPv6) may
//!   send nothing but link-local. Running before conntrack (-200) means
//!   spoofed packets never create conntrack entries. The daemon fills the sets
//!   with every index the host allows (1..max_guests), so creating or
//!   removing a guest never has to touch the table.
//!   A packet arriving on a segment bridge (`bs-*`) for one of the host's
//!   own addresses is dropped: segments are L2 between their guests only.
//! * `forward` (filter, hook forward, priority 0, policy accept): accept
//!   established/related; accept anything arriving from a guest link
//!   (`iifname "vb*"`); drop connections from the uplink to the guest subnets
//!   that are not established/related (guests are not reachable from outside
//!   until something opens them explicitly). The policy stays `accept` so other
//!   forwarded traffic of the host is unaffected by this table.
//! * `postrouting` (nat, hook postrouting, priority srcnat = 100): masquerade
//!   the guest subnet leaving through the uplink; for IPv6 only when the
//!   subnet is a ULA (`fd00::/8`), since global IPv6 should be routed as is.
//!
//! # ARP
//!
//! There are no ARP rules: the `inet` family never sees ARP, and none are
//! needed. Each guest has its own point-to-point link and no bridge joins
//! them, so a forged ARP (or NDP) message reaches only the host's end of that
//! one link; the host routes to each guest with a `/32`/`/128` route bound to
//! the guest's own link, so a guest cannot redirect another guest's traffic.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

use crate::{GuestLink, NetError};

/// Family of the one table berth owns.
pub const TABLE_FAMILY: &str = "inet";
/// Name of the one table berth owns.
pub const TABLE_NAME: &str = "berth";

/// Wildcard matching every guest link name (see `GuestLink::name`).
const GUEST_LINK_GLOB: &str = "vb*";
/// Wildcard matching every segment bridge (`bs-<segment>`).
const SEGMENT_BRIDGE_GLOB: &str = "bs-*";
/// Sets of `(link, address)` pairs a guest may send from.
const GUEST4_SET: &str = "guest4";
const GUEST6_SET: &str = "guest6";

/// The firewall/NAT configuration of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// Interface towards the outside world (masquerade goes out here).
    pub uplink: String,
    pub subnet4: Ipv4Net,
    pub subnet6: Option<Ipv6Net>,
    pub guests: Vec<GuestLink>,
    /// Extra `(link, address)` pairs a guest may send from: the service
    /// addresses (VIPs) of the groups it may be a member of, since a member
    /// answers requests for the VIP from the VIP.
    pub vips: Vec<(String, std::net::IpAddr)>,
}

fn table() -> Value {
    json!({"family": TABLE_FAMILY, "name": TABLE_NAME})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({"add": {"chain": {
        "family": TABLE_FAMILY, "table": TABLE_NAME, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept",
    }}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {
        "family": TABLE_FAMILY, "table": TABLE_NAME, "chain": chain, "expr": expr,
    }}})
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn prefix(addr: impl ToString, len: u8) -> Value {
    json!({"prefix": {"addr": addr.to_string(), "len": len}})
}

fn counter() -> Value {
    json!({"counter": null})
}

fn verdict(v: &str) -> Value {
    json!({ v: null })
}

fn is_ula(net: &Ipv6Net) -> bool {
    // fd00::/8: the locally assigned half of fc00::/7.
    net.addr().octets()[0] == 0xfd && net.prefix_len() >= 8
}

/// The sets of (guest link, address) pairs allowed as packet sources.
fn guest_sets(guests: &[GuestLink], vips: &[(String, std::net::IpAddr)]) -> Vec<Value> {
    let vip = |v6: bool| {
        vips.iter()
            .filter(move |(_, a)| a.is_ipv6() == v6)
            .map(|(l, a)| json!({"concat": [l, a.to_string()]}))
    };
    let elems4: Vec<Value> = guests
        .iter()
        .map(|g| json!({"concat": [g.name, g.guest4.to_string()]}))
        .chain(vip(false))
        .collect();
    let elems6: Vec<Value> = guests
        .iter()
        .filter_map(|g| g.guest6.map(|a| json!({"concat": [g.name, a.to_string()]})))
        .chain(vip(true))
        .collect();
    let set = |name: &str, addr: &str, elems: Vec<Value>| {
        let mut s = json!({
            "family": TABLE_FAMILY, "table": TABLE_NAME, "name": name,
            "type": ["ifname", addr],
        });
        if !elems.is_empty() {
            s["elem"] = json!(elems);
        }
        json!({"add": {"set": s}})
    };
    vec![
        set(GUEST4_SET, "ipv4_addr", elems4),
        set(GUEST6_SET, "ipv6_addr", elems6),
    ]
}

/// Connection pinning for service addresses: the first packet of a
/// connection to a VIP is routed by the main table (to the member the VIP
/// points at then) and its conntrack entry remembers that member's link as
/// a mark ([`crate::pin_mark`]); later packets of the established
/// connection carry the mark, and a policy rule per member ([`crate::ensure_pin`]) routes them
/// to the same member. So moving a VIP moves new connections only, and a
/// request in flight is never cut in half.
fn vip_pinning(vips: &[(String, std::net::IpAddr)]) -> Vec<Value> {
    if vips.is_empty() {
        return Vec::new();
    }
    let mut cmds = vec![
        chain("vip_pin_forward", "filter", "forward", -150),
        chain("vip_pin_prerouting", "filter", "prerouting", -150),
    ];
    let mut links: Vec<(&str, u32)> = vips
        .iter()
        .filter_map(|(l, _)| {
            l.strip_prefix("vb")
                .and_then(|i| i.parse::<u32>().ok())
                .map(|i| (l.as_str(), crate::pin_mark(i)))
        })
        .collect();
    links.sort_unstable();
    links.dedup();
    let map: Vec<Value> = links.iter().map(|(l, m)| json!([l, m])).collect();
    for (set, proto, v6) in [("vip4_addrs", "ip", false), ("vip6_addrs", "ip6", true)] {
        let mut addrs: Vec<String> = vips
            .iter()
            .filter(|(_, a)| a.is_ipv6() == v6)
            .map(|(_, a)| a.to_string())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            continue;
        }
        cmds.push(json!({"add": {"set": {
            "family": TABLE_FAMILY, "table": TABLE_NAME, "name": set,
            "type": if v6 { "ipv6_addr" } else { "ipv4_addr" },
            "elem": addrs,
        }}}));
        let pin = || {
            json!({"mangle": {
                "key": {"ct": {"key": "mark"}},
                "value": {"map": {"key": meta("oifname"), "data": {"set": map.clone()}}},
            }})
        };
        let to_vip = || matches("==", payload(proto, "daddr"), json!(format!("@{set}")));
        cmds.push(rule(
            "vip_pin_forward",
            vec![
                matches("in", json!({"ct": {"key": "state"}}), json!(["new"])),
                to_vip(),
                pin(),
            ],
        ));
        // A SYN that reuses a conntrack entry (same addresses and ports as
        // a connection that ended in a reset) is not "new" to conntrack,
        // but it starts a connection: pin it to where it is routed now.
        cmds.push(rule("vip_pin_forward", vec![to_vip(), syn_only(), pin()]));
    }
    // A SYN is always routed afresh, never by an old connection's mark.
    cmds.push(rule(
        "vip_pin_prerouting",
        vec![syn_only(), verdict("accept")],
    ));
    cmds.push(rule(
        "vip_pin_prerouting",
        vec![
            // Established only: a SYN (or its retransmission) is routed
            // afresh, so a connection whose SYN went to a member that died
            // is not pinned to it.
            matches(
                "in",
                json!({"ct": {"key": "state"}}),
                json!(["established"]),
            ),
            matches("==", json!({"ct": {"key": "direction"}}), json!("original")),
            matches(
                "==",
                json!({"&": [{"ct": {"key": "mark"}}, crate::PIN_MARK_MASK]}),
                json!(crate::PIN_MARK_BASE),
            ),
            json!({"mangle": {"key": meta("mark"), "value": {"ct": {"key": "mark"}}}}),
        ],
    ));
    cmds
}

/// `tcp flags & (syn | ack) == syn`: the first packet of a TCP connection.
fn syn_only() -> Value {
    matches(
        "==",
        json!({"&": [payload("tcp", "flags"), ["syn", "ack"]]}),
        json!("syn"),
    )
}

/// Anti-spoofing rules for the `prerouting_filter` chain: one set lookup per
/// packet whatever the number of guests.
fn antispoof_rules() -> Vec<Value> {
    let from_guest = || matches("==", meta("iifname"), json!(GUEST_LINK_GLOB));
    let pair = |proto: &str| json!({"concat": [meta("iifname"), payload(proto, "saddr")]});
    vec![
        // DHCP / DHCPv6 server replies from a guest.
        rule(
            "prerouting_filter",
            vec![
                from_guest(),
                matches("==", payload("udp", "sport"), json!({"set": [67, 547]})),
                counter(),
                verdict("drop"),
            ],
        ),
        // IPv4 whose source is not the address of the link it came from.
        rule(
            "prerouting_filter",
            vec![
                from_guest(),
                matches("!=", pair("ip"), json!(format!("@{GUEST4_SET}"))),
                counter(),
                verdict("drop"),
            ],
        ),
        // IPv6 likewise; link-local (fe80::/10) passes for NDP.
        rule(
            "prerouting_filter",
            vec![
                from_guest(),
                matches("!=", payload("ip6", "saddr"), prefix("fe80::", 10)),
                matches("!=", pair("ip6"), json!(format!("@{GUEST6_SET}"))),
                counter(),
                verdict("drop"),
            ],
        ),
    ]
}

/// Segments are L2 between their members only: a packet arriving on a
/// segment bridge (`bs-*`) for one of the host's own addresses is dropped
/// (the bridge has no address, but Linux accepts packets for any local
/// address on any interface). Bridged frames between members never reach
/// this hook with a local destination, so segment traffic itself passes.
fn segment_rule() -> Value {
    rule(
        "prerouting_filter",
        vec![
            matches("==", meta("iifname"), json!(SEGMENT_BRIDGE_GLOB)),
            matches(
                "==",
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                json!("local"),
            ),
            counter(),
            verdict("drop"),
        ],
    )
}

/// Render the nft JSON document that atomically replaces table `inet berth`
/// with the ruleset for `fw`. Pure: no IO.
pub fn render_ruleset(fw: &Firewall) -> Value {
    let mut cmds = vec![
        // add + delete + add: the table exists (maybe empty) after the first
        // add, so the delete never fails; the second add starts from scratch.
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        chain("prerouting_filter", "filter", "prerouting", -300),
        chain("forward", "filter", "forward", 0),
        chain("postrouting", "nat", "postrouting", 100),
    ];

    cmds.extend(guest_sets(&fw.guests, &fw.vips));
    cmds.extend(antispoof_rules());
    cmds.push(segment_rule());
    cmds.extend(vip_pinning(&fw.vips));

    let uplink_in = || matches("==", meta("iifname"), json!(fw.uplink));
    cmds.push(rule(
        "forward",
        vec![
            matches(
                "in",
                json!({"ct": {"key": "state"}}),
                json!(["established", "related"]),
            ),
            verdict("accept"),
        ],
    ));
    cmds.push(rule(
        "forward",
        vec![
            matches("==", meta("iifname"), json!(GUEST_LINK_GLOB)),
            verdict("accept"),
        ],
    ));
    cmds.push(rule(
        "forward",
        vec![
            uplink_in(),
            matches(
                "==",
                payload("ip", "daddr"),
                prefix(fw.subnet4.network(), fw.subnet4.prefix_len()),
            ),
            counter(),
            verdict("drop"),
        ],
    ));
    if let Some(s6) = fw.subnet6 {
        cmds.push(rule(
            "forward",
            vec![
                uplink_in(),
                matches(
                    "==",
                    payload("ip6", "daddr"),
                    prefix(s6.network(), s6.prefix_len()),
                ),
                counter(),
                verdict("drop"),
            ],
        ));
    }

    cmds.push(rule(
        "postrouting",
        vec![
            matches(
                "==",
                payload("ip", "saddr"),
                prefix(fw.subnet4.network(), fw.subnet4.prefix_len()),
            ),
            matches("==", meta("oifname"), json!(fw.uplink)),
            verdict("masquerade"),
        ],
    ));
    if let Some(s6) = fw.subnet6.filter(is_ula) {
        cmds.push(rule(
            "postrouting",
            vec![
                matches(
                    "==",
                    payload("ip6", "saddr"),
                    prefix(s6.network(), s6.prefix_len()),
                ),
                matches("==", meta("oifname"), json!(fw.uplink)),
                verdict("masquerade"),
            ],
        ));
    }

    json!({ "nftables": cmds })
}

/// Run `nft ARGS`, feeding `stdin` if given; returns stdout.
fn nft(action: &'static str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, NetError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => NetError::NftMissing,
            _ => NetError::NftSpawn { action, source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(|source| NetError::NftSpawn { action, source })?;
        // Dropping `pipe` closes nft's stdin.
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetError::NftSpawn { action, source })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(NetError::Nft {
            action,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Check the rendered ruleset with `nft -c` (nothing is changed): useful
/// to validate a plan before applying it.
pub fn check_ruleset(fw: &Firewall) -> Result<(), NetError> {
    let doc = render_ruleset(fw).to_string();
    nft(
        "check ruleset",
        &["-c", "-j", "-f", "-"],
        Some(doc.as_bytes()),
    )
    .map(|_| ())
}

/// Apply the ruleset of `fw` in the current network namespace, replacing
/// table `inet berth` atomically (`nft -j -f -`).
pub fn apply_ruleset(fw: &Firewall) -> Result<(), NetError> {
    let doc = render_ruleset(fw).to_string();
    nft("apply ruleset", &["-j", "-f", "-"], Some(doc.as_bytes()))?;
    tracing::info!(
        uplink = fw.uplink.as_str(),
        guests = fw.guests.len(),
        "nftables table inet berth applied"
    );
    Ok(())
}

/// Delete table `inet berth`; `Ok(false)` if it did not exist.
pub fn delete_table() -> Result<bool, NetError> {
    if !table_exists()? {
        return Ok(false);
    }
    match nft(
        "delete table",
        &["delete", "table", TABLE_FAMILY, TABLE_NAME],
        None,
    ) {
        Ok(_) => Ok(true),
        // Deleted concurrently between the check and the delete.
        Err(NetError::Nft { .. }) if !table_exists()? => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether table `inet berth` exists in the current network namespace.
pub fn table_exists() -> Result<bool, NetError> {
    let out = nft("list tables", &["-j", "list", "tables", TABLE_FAMILY], None)?;
    tables_contain_berth(&out)
}

fn tables_contain_berth(out: &[u8]) -> Result<bool, NetError> {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let doc: Value = serde_json::from_slice(out).map_err(|e| NetError::NftOutput {
        action: "list tables",
        detail: e.to_string(),
    })?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| NetError::NftOutput {
            action: "list tables",
            detail: "no \"nftables\" array".into(),
        })?;
    Ok(items.iter().filter_map(|i| i.get("table")).any(|t| {
        t.get("family").and_then(Value::as_str) == Some(TABLE_FAMILY)
            && t.get("name").and_then(Value::as_str) == Some(TABLE_NAME)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(subnet6: Option<&str>) -> Firewall {
        Firewall {
            uplink: "uplink0".into(),
            subnet4: "10.0.0.0/24".parse().unwrap(),
            subnet6: subnet6.map(|s| s.parse().unwrap()),
            guests: vec![
                GuestLink {
                    name: "vb2".into(),
                    guest4: "10.0.0.2".parse().unwrap(),
                    host4: "10.0.0.1".parse().unwrap(),
                    guest6: Some("fd00::2".parse().unwrap()),
                    host6: Some("fd00::1".parse().unwrap()),
                },
                GuestLink {
                    name: "vb3".into(),
                    guest4: "10.0.0.3".parse().unwrap(),
                    host4: "10.0.0.1".parse().unwrap(),
                    guest6: None,
                    host6: None,
                },
            ],
            vips: vec![("vb2".into(), "10.9.0.1".parse().unwrap())],
        }
    }

    fn cmds(doc: &Value) -> &Vec<Value> {
        doc["nftables"].as_array().unwrap()
    }

    fn rules_in<'a>(doc: &'a Value, chain: &str) -> Vec<&'a Value> {
        cmds(doc)
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .filter(|r| r["chain"] == chain)
            .collect()
    }

    #[test]
    fn table_add_delete_add_first() {
        let doc = render_ruleset(&fw(Some("fd00::/64")));
        let c = cmds(&doc);
        let t = json!({"family": "inet", "name": "berth"});
        assert_eq!(c[0], json!({"add": {"table": t}}));
        assert_eq!(c[1], json!({"delete": {"table": t}}));
        assert_eq!(c[2], json!({"add": {"table": t}}));
        // Only table inet berth is ever touched.
        for cmd in c {
            let obj = cmd.as_object().unwrap().values().next().unwrap();
            let inner = obj.as_object().unwrap().values().next().unwrap();
            assert_eq!(inner["family"], "inet", "{cmd}");
            let table = inner.get("table").unwrap_or(&inner["name"]);
            assert_eq!(table, "berth", "{cmd}");
        }
    }

    #[test]
    fn valid_json_roundtrip() {
        let doc = render_ruleset(&fw(None));
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn chains_have_hooks_and_accept_policy() {
        let doc = render_ruleset(&fw(None));
        let chains: Vec<&Value> = cmds(&doc)
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("chain")))
            .collect();
        let names: Vec<&str> = chains.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "prerouting_filter",
                "forward",
                "postrouting",
                // Only with service addresses (the fixture has one).
                "vip_pin_forward",
                "vip_pin_prerouting"
            ]
        );
        for c in &chains {
            assert_eq!(c["policy"], "accept", "{c}");
        }
        assert_eq!(chains[2]["type"], "nat");
        assert_eq!(chains[2]["prio"], 100);
    }

    #[test]
    fn vip_connections_are_pinned_by_conntrack_mark() {
        let doc = render_ruleset(&fw(None));
        let fwd = rules_in(&doc, "vip_pin_forward");
        assert_eq!(fwd.len(), 2, "new connections, and SYNs reusing an entry");
        let text = fwd[0]["expr"].to_string();
        assert!(
            text.contains("@vip4_addrs") && text.contains("\"new\""),
            "{text}"
        );
        assert!(text.contains(&crate::pin_mark(2).to_string()), "{text}");
        let syn = fwd[1]["expr"].to_string();
        assert!(
            syn.contains("\"syn\"") && syn.contains("@vip4_addrs"),
            "{syn}"
        );
        let pre = rules_in(&doc, "vip_pin_prerouting");
        assert_eq!(pre.len(), 2);
        // A SYN leaves the chain before any mark is copied to it.
        let first = pre[0]["expr"].to_string();
        assert!(
            first.contains("\"syn\"") && first.contains("accept"),
            "{first}"
        );
        let text = pre[1]["expr"].to_string();
        assert!(
            text.contains("established") && text.contains("original"),
            "{text}"
        );
        // No service addresses: no pinning chains at all.
        let mut plain = fw(None);
        plain.vips.clear();
        let doc = render_ruleset(&plain);
        assert!(rules_in(&doc, "vip_pin_forward").is_empty());
    }

    #[test]
    fn masquerade_rule_names_uplink_and_subnet() {
        let doc = render_ruleset(&fw(None));
        let nat = rules_in(&doc, "postrouting");
        assert_eq!(nat.len(), 1);
        let expr = json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.0.0.0", "len": 24}}}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "uplink0"}},
            {"masquerade": null}
        ]);
        assert_eq!(nat[0]["expr"], expr);
    }

    #[test]
    fn ipv6_masquerade_only_for_ula() {
        let ula = render_ruleset(&fw(Some("fd00:1::/64")));
        assert_eq!(rules_in(&ula, "postrouting").len(), 2);
        let global = render_ruleset(&fw(Some("2001:db8::/64")));
        assert_eq!(rules_in(&global, "postrouting").len(), 1);
        // Both still protect the v6 subnet from new inbound connections.
        assert_eq!(rules_in(&global, "forward").len(), 4);
    }

    #[test]
    fn antispoof_by_set_lookup() {
        let doc = render_ruleset(&fw(Some("fd00::/64")));
        let sets: Vec<&Value> = cmds(&doc)
            .iter()
            .filter_map(|c| c["add"].get("set"))
            .filter(|s| s["name"] != "vip4_addrs" && s["name"] != "vip6_addrs")
            .collect();
        assert_eq!(sets.len(), 2, "guest4 and guest6 (VIP sets filtered out)");
        assert_eq!(sets[0]["name"], "guest4");
        assert_eq!(sets[0]["type"], json!(["ifname", "ipv4_addr"]));
        assert_eq!(
            sets[0]["elem"],
            json!([
                {"concat": ["vb2", "10.0.0.2"]},
                {"concat": ["vb3", "10.0.0.3"]},
                // A group member may answer from its group's service address.
                {"concat": ["vb2", "10.9.0.1"]}
            ])
        );
        // vb3 has no IPv6: it is not in guest6, so only link-local passes.
        assert_eq!(sets[1]["elem"], json!([{"concat": ["vb2", "fd00::2"]}]));

        let pre = rules_in(&doc, "prerouting_filter");
        assert_eq!(pre.len(), 4, "four rules whatever the number of guests");
        // The last: nothing arriving on a segment bridge reaches the host.
        assert_eq!(pre[3]["expr"][0]["match"]["right"], "bs-*");
        assert_eq!(pre[3]["expr"][1]["match"]["right"], "local");
        let pre = &pre[..3];
        for r in pre {
            assert_eq!(r["expr"][0]["match"]["right"], "vb*", "{r}");
            assert_eq!(
                r["expr"].as_array().unwrap().last().unwrap(),
                &json!({"drop": null})
            );
        }
        assert_eq!(
            pre[0]["expr"][1]["match"]["right"],
            json!({"set": [67, 547]})
        );
        assert_eq!(pre[1]["expr"][1]["match"]["op"], "!=");
        assert_eq!(pre[1]["expr"][1]["match"]["right"], "@guest4");
        assert_eq!(
            pre[2]["expr"][1]["match"]["right"],
            json!({"prefix": {"addr": "fe80::", "len": 10}})
        );
        assert_eq!(pre[2]["expr"][2]["match"]["right"], "@guest6");
    }

    #[test]
    fn forward_accepts_from_guests_and_blocks_new_inbound() {
        let doc = render_ruleset(&fw(None));
        let fwd = rules_in(&doc, "forward");
        assert_eq!(fwd.len(), 3);
        assert_eq!(
            fwd[0]["expr"][0]["match"]["left"],
            json!({"ct": {"key": "state"}})
        );
        assert_eq!(fwd[1]["expr"][0]["match"]["right"], "vb*");
        assert_eq!(fwd[2]["expr"][0]["match"]["right"], "uplink0");
        assert_eq!(fwd[2]["expr"][3], json!({"drop": null}));
    }

    #[test]
    fn parse_list_tables() {
        let out = br#"{"nftables": [{"metainfo": {"version": "1.1.3"}}, {"table": {"family": "inet", "name": "berth", "handle": 3}}]}"#;
        assert!(tables_contain_berth(out).unwrap());
        let out =
            br#"{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "other"}}]}"#;
        assert!(!tables_contain_berth(out).unwrap());
        assert!(!tables_contain_berth(b"\n").unwrap());
        assert!(tables_contain_berth(b"garbage").is_err());
    }

    /// `nft -c` (check only, nothing is changed) accepts the rendered JSON.
    #[test]
    fn nft_check_accepts_ruleset() {
        let required = std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1");
        for f in [fw(None), fw(Some("fd00::/64")), fw(Some("2001:db8::/64"))] {
            match check_ruleset(&f) {
                Ok(()) => {}
                Err(NetError::NftMissing) if !required => {
                    eprintln!("skipping nft_check_accepts_ruleset: nft is not installed");
                    return;
                }
                // `nft -c` still talks to the kernel, which wants CAP_NET_ADMIN.
                Err(e @ NetError::Nft { .. }) if !required && !nix::unistd::geteuid().is_root() => {
                    eprintln!("skipping nft_check_accepts_ruleset: not root ({e})");
                    return;
                }
                Err(e) => panic!("nft -c rejected the ruleset: {e}\n{}", render_ruleset(&f)),
            }
        }
    }
}
