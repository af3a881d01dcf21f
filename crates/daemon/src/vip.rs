//! The service-address controller: keeps each group's VIP route pointed at
//! healthy members. It runs on its own thread, wakes on every health
//! transition, drain change or apply (and every 250 ms regardless), and
//! changes a route only when the members it points at should change, with
//! one atomic route replace.
//!
//! Rules per VIP, over the group's members that are not drained:
//! * `active`: keep the current member while it is healthy (or not yet
//!   probed since the daemon started); otherwise the healthy member with the
//!   lowest index. No healthy member: leave the route as it is.
//! * `ecmp`: every healthy member (plus current ones not yet probed).
//! * host drained (`berth drain`): no route at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_spec::{Group, Guest, VipMode};

use crate::engine::Engine;
use crate::health::Status;

/// Store key prefix of the VIPs berth routes (value: the group).
const VIP_KEY: &str = "vip/";

/// Runs the controller forever (call on a dedicated thread).
pub fn controller(engine: Arc<Engine>) {
    let mut seen = engine.health.changes();
    loop {
        if let Err(e) = reconcile(&engine) {
            tracing::warn!("service addresses: {e}");
        }
        seen = engine.health.wait_change(seen, Duration::from_millis(250));
    }
}

/// One pass over every group. Serialised by the engine's VIP lock, so the
/// executor may call it too.
pub fn reconcile(engine: &Engine) -> Result<(), String> {
    let mut current = engine.vip_routes.lock().unwrap_or_else(|p| p.into_inner());
    let groups = engine.applied_groups().map_err(|e| e.to_string())?;
    let guests = engine.applied_guests().map_err(|e| e.to_string())?;
    let drained = engine.drained().map_err(|e| e.to_string())?;
    let host_drained = engine.host_drained().map_err(|e| e.to_string())?;
    let mut wanted: BTreeSet<IpAddr> = BTreeSet::new();

    for (gname, group) in &groups {
        let mut members: Vec<&Guest> = guests
            .iter()
            .filter(|g| g.group.as_deref() == Some(gname.as_str()))
            .collect();
        members.sort_by_key(|g| g.index);
        if group.has_vip() {
            pin_members(engine, &members);
        }
        for vip in group
            .vip4
            .map(IpAddr::V4)
            .into_iter()
            .chain(group.vip6.map(IpAddr::V6))
        {
            wanted.insert(vip);
            let key = format!("{VIP_KEY}{vip}");
            if engine.store.kv(&key).ok().flatten().as_deref() != Some(gname.as_str()) {
                let _ = engine.store.set_kv(&key, gname);
            }
            let now: Vec<String> = match current.get(&vip) {
                Some(v) => v.clone(),
                None => {
                    // First look since the daemon started: the kernel knows.
                    let links = berth_net::vip_route(vip).map_err(|e| e.to_string())?;
                    let names: Vec<String> = links
                        .iter()
                        .filter_map(|l| members.iter().find(|m| &m.link == l))
                        .map(|m| m.name.clone())
                        .collect();
                    current.insert(vip, names.clone());
                    names
                }
            };
            let targets = if host_drained {
                Vec::new()
            } else {
                choose(engine, group, &members, &drained, &now)
            };
            // Active mode: the next healthy member stands by in a second
            // route the kernel falls back to the moment the serving
            // member's link goes away.
            let backup: Option<String> = (group.mode == VipMode::Active && !targets.is_empty())
                .then(|| {
                    members
                        .iter()
                        .filter(|m| !targets.contains(&m.name) && !drained.contains(&m.name))
                        .find(|m| engine.health.status(&m.name) == Status::Healthy)
                        .map(|m| m.name.clone())
                })
                .flatten();
            let mut backups = engine.vip_backups.lock().unwrap_or_else(|p| p.into_inner());
            if targets == now && backups.get(&vip) == backup.as_ref() {
                continue;
            }
            let hop = |n: &String| -> Option<berth_net::VipTarget> {
                let m = members.iter().find(|m| &m.name == n)?;
                let gateway = match vip {
                    IpAddr::V4(_) => Some(IpAddr::V4(m.addr4)),
                    IpAddr::V6(_) => m.addr6.map(IpAddr::V6),
                }?;
                Some(berth_net::VipTarget {
                    link: m.link.clone(),
                    gateway,
                })
            };
            let hops: Vec<berth_net::VipTarget> = targets.iter().filter_map(hop).collect();
            let standby = backup.as_ref().and_then(hop);
            match berth_net::set_vip_route(vip, &hops, standby.as_ref()) {
                Ok(()) => {
                    let to = if targets.is_empty() {
                        "nowhere (withdrawn)".to_string()
                    } else {
                        targets.join(" + ")
                    };
                    match &backup {
                        Some(b) => backups.insert(vip, b.clone()),
                        None => backups.remove(&vip),
                    };
                    if targets != now {
                        tracing::info!(group = %gname, %vip, standby = ?backup, "service address now routed to {to}");
                        for m in now.iter().chain(targets.iter()) {
                            crate::health::event(
                                engine,
                                m,
                                &format!("service address {vip} of group {gname} -> {to}"),
                            );
                        }
                    }
                    current.insert(vip, targets);
                }
                Err(e) => {
                    // Forget what we believed: the next pass reads the kernel.
                    current.remove(&vip);
                    backups.remove(&vip);
                    tracing::warn!(group = %gname, %vip, "moving the service address: {e}");
                }
            }
        }
    }

    // VIPs of groups that are gone.
    for (key, gname) in engine.store.kv_prefix(VIP_KEY).unwrap_or_default() {
        let Ok(vip) = key[VIP_KEY.len()..].parse::<IpAddr>() else {
            let _ = engine.store.delete_kv(&key);
            continue;
        };
        if wanted.contains(&vip) {
            continue;
        }
        match berth_net::delete_vip_route(vip) {
            Ok(_) => {
                tracing::info!(group = %gname, %vip, "service address withdrawn (group removed)");
                current.remove(&vip);
                let _ = engine.store.delete_kv(&key);
            }
            Err(e) => tracing::warn!(%vip, "withdrawing the service address: {e}"),
        }
    }
    Ok(())
}

/// Keeps each member's connection-pinning rule and route in place (see
/// `berth_net::ensure_pin`); redone when the member's link was recreated.
fn pin_members(engine: &Engine, members: &[&Guest]) {
    let mut pins = engine.pins.lock().unwrap_or_else(|p| p.into_inner());
    for m in members {
        let Ok(ifindex) = nix::net::if_::if_nametoindex(m.link.as_str()) else {
            continue; // not running: nothing to pin to
        };
        if pins.get(&m.index) == Some(&ifindex) {
            continue;
        }
        match berth_net::ensure_pin(m.index, &m.link, m.addr4, m.addr6) {
            Ok(()) => {
                pins.insert(m.index, ifindex);
            }
            Err(e) => tracing::warn!(guest = %m.name, "connection pinning: {e}"),
        }
    }
}

/// The members a VIP should point at (see the module docs).
fn choose(
    engine: &Engine,
    group: &Group,
    members: &[&Guest],
    drained: &BTreeSet<String>,
    now: &[String],
) -> Vec<String> {
    let status = |n: &str| engine.health.status(n);
    let usable: Vec<&str> = members
        .iter()
        .map(|m| m.name.as_str())
        .filter(|n| !drained.contains(*n))
        .collect();
    let healthy: Vec<&str> = usable
        .iter()
        .copied()
        .filter(|n| status(n) == Status::Healthy)
        .collect();
    // Current members not probed yet (daemon just started) stay.
    let kept: Vec<&str> = now
        .iter()
        .map(String::as_str)
        .filter(|n| usable.contains(n) && status(n) == Status::Unknown)
        .collect();
    let out: Vec<&str> = match group.mode {
        VipMode::Active => {
            match now
                .first()
                .map(String::as_str)
                .filter(|c| healthy.contains(c) || kept.contains(c))
            {
                Some(c) => vec![c],
                None => healthy.first().copied().into_iter().collect(),
            }
        }
        VipMode::Ecmp => usable
            .iter()
            .copied()
            .filter(|n| healthy.contains(n) || kept.contains(n))
            .collect(),
    };
    if out.is_empty() {
        // Nobody better: leave it where it is (a drained member keeps
        // serving rather than nobody).
        return now.to_vec();
    }
    out.into_iter().map(str::to_owned).collect()
}

/// The members each VIP of `groups` is routed to now (for `berth ps`).
pub fn serving(engine: &Engine) -> BTreeMap<String, Vec<IpAddr>> {
    let current = engine.vip_routes.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (vip, members) in current.iter() {
        for m in members {
            out.entry(m.clone()).or_default().push(*vip);
        }
    }
    out
}
