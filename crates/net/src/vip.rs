//! Service addresses (VIPs): a host route for each VIP that points at one
//! or several guests. Moving a VIP is one `RTM_NEWROUTE` with
//! `NLM_F_REPLACE`, so the kernel switches atomically: a packet is routed
//! either to the old member or to the new one, never nowhere.
//!
//! The route is `VIP/32 via <member address> dev vb<i> onlink proto berth`
//! (`/128` for IPv6), or a multipath route with one next hop per member for
//! ECMP. Members accept the VIP as a local address (containers: berth puts
//! it on their loopback; VMs do it themselves from `berth.vip4=`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::PathBuf;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteNextHopFlags,
    RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::NetError;
use crate::link::{
    LOOPBACK_IFINDEX, add_addr, all_links, block_on, connect_in, errno, nl_err, route_addr,
    route_table, runtime,
};

/// Routing protocol number berth marks its VIP routes with (`ip route`
/// shows `proto 190`), so they are told apart from anyone else's.
pub const RTPROT_BERTH: u8 = 190;

/// High byte of the marks that pin connections to members.
pub const PIN_MARK_BASE: u32 = 0xbe00_0000;
/// Mask of that byte.
pub const PIN_MARK_MASK: u32 = 0xff00_0000;
/// Priority of the policy rules that route pinned connections.
const PIN_RULE_PRIORITY: u32 = 1190;

/// Conntrack/packet mark (and routing table id) pinning connections to the
/// guest at `index`.
pub fn pin_mark(index: u32) -> u32 {
    PIN_MARK_BASE | (index & !PIN_MARK_MASK)
}

/// Makes connections pinned to guest `index` (see the firewall's
/// `vip_pin_*` chains) go to it: a policy rule `fwmark M lookup M` and in
/// table M a default route via the guest (IPv4, and IPv6 when given).
/// Idempotent.
pub fn ensure_pin(
    index: u32,
    link: &str,
    addr4: Ipv4Addr,
    addr6: Option<Ipv6Addr>,
) -> Result<(), NetError> {
    let mark = pin_mark(index);
    block_on(|h| async move {
        let ifindex = ifindex(&h, link).await?;
        for v6 in [false, true] {
            if v6 && addr6.is_none() {
                continue;
            }
            let version = if v6 {
                rtnetlink::IpVersion::V6
            } else {
                rtnetlink::IpVersion::V4
            };
            let have = fwmark_rules(&h, version)
                .await?
                .iter()
                .any(|(m, _)| *m == mark);
            if !have {
                let req = h
                    .rule()
                    .add()
                    .fw_mark(mark)
                    .table_id(mark)
                    .priority(PIN_RULE_PRIORITY)
                    .action(netlink_packet_route::rule::RuleAction::ToTable);
                let res = if v6 {
                    req.v6().execute().await
                } else {
                    req.v4().execute().await
                };
                res.map_err(nl_err(format!("add rule fwmark {mark:#x}"), "host netns"))?;
            }
            let mut msg = match (v6, addr6) {
                (true, Some(a6)) => {
                    let mut m = RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .table_id(mark)
                        .build();
                    m.attributes
                        .push(RouteAttribute::Gateway(RouteAddress::Inet6(a6)));
                    m
                }
                _ => RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .table_id(mark)
                    .gateway(addr4)
                    .build(),
            };
            msg.attributes.push(RouteAttribute::Oif(ifindex));
            msg.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
            msg.header.protocol = RouteProtocol::Other(RTPROT_BERTH);
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl_err(format!("add route table {mark:#x}"), link))?;
        }
        Ok(())
    })
}

/// The policy rules of one family that match a fwmark, with the mark.
async fn fwmark_rules(
    h: &Handle,
    version: rtnetlink::IpVersion,
) -> Result<Vec<(u32, netlink_packet_route::rule::RuleMessage)>, NetError> {
    let rules: Vec<netlink_packet_route::rule::RuleMessage> = h
        .rule()
        .get(version)
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("list rules", "host netns"))?;
    Ok(rules
        .into_iter()
        .filter_map(|r| {
            let mark = r.attributes.iter().find_map(|a| match a {
                netlink_packet_route::rule::RuleAttribute::FwMark(m) => Some(*m),
                _ => None,
            })?;
            Some((mark, r))
        })
        .collect())
}

/// Removes every pinning rule berth made (their tables empty themselves
/// when the guest links go). Returns how many.
pub fn remove_pins() -> Result<usize, NetError> {
    block_on(|h| async move {
        let mut n = 0;
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            for (m, r) in fwmark_rules(&h, version).await? {
                if m & PIN_MARK_MASK == PIN_MARK_BASE {
                    h.rule()
                        .del(r)
                        .execute()
                        .await
                        .map_err(nl_err("delete rule", "host netns"))?;
                    n += 1;
                }
            }
        }
        Ok(n)
    })
}

/// One next hop of a VIP route: a guest link and the guest's address on it
/// (same family as the VIP).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipTarget {
    pub link: String,
    pub gateway: IpAddr,
}

fn host_len(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

fn gateway_attr(gw: IpAddr) -> RouteAttribute {
    match gw {
        IpAddr::V4(a) => RouteAttribute::Gateway(RouteAddress::Inet(a)),
        IpAddr::V6(a) => RouteAttribute::Gateway(RouteAddress::Inet6(a)),
    }
}

/// Metric of the route that carries a VIP.
pub const VIP_METRIC: u32 = 100;
/// Metric of the standby route: used by the kernel at once when the
/// primary's link disappears (its guest died), before berth has noticed.
pub const VIP_BACKUP_METRIC: u32 = 200;
/// Metric of the last resort: no member at all answers "unreachable" at
/// once instead of sending the VIP's packets out of the default route.
pub const VIP_UNREACHABLE_METRIC: u32 = 300;

fn base_message(vip: IpAddr, metric: u32) -> RouteMessage {
    let mut msg = match vip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .priority(metric)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .priority(metric)
            .build(),
    };
    msg.header.protocol = RouteProtocol::Other(RTPROT_BERTH);
    msg
}

async fn ifindex(h: &Handle, name: &str) -> Result<u32, NetError> {
    let links = all_links(h).await?;
    links
        .iter()
        .find(|(_, n)| n == name)
        .map(|(i, _)| *i)
        .ok_or_else(|| NetError::LinkNotFound {
            name: name.to_string(),
            netns: "host netns".into(),
        })
}

/// Points `vip` at `targets` (one: a plain route; several: multipath, the
/// kernel hashes flows over them), replacing whatever route `vip` had, with
/// `backup` as the standby route and an `unreachable` last resort. With no
/// targets every route of the VIP is removed.
pub fn set_vip_route(
    vip: IpAddr,
    targets: &[VipTarget],
    backup: Option<&VipTarget>,
) -> Result<(), NetError> {
    if targets.is_empty() {
        return delete_vip_route(vip).map(|_| ());
    }
    if let Some(t) = targets
        .iter()
        .chain(backup)
        .find(|t| t.gateway.is_ipv4() != vip.is_ipv4())
    {
        return Err(NetError::InvalidName {
            name: t.gateway.to_string(),
            reason: "VIP next hop of the other address family",
        });
    }
    block_on(|h| async move {
        let what = |m: u32| format!("route {vip}/{} metric {m}", host_len(vip));
        // Last resort first, standby next, the route that serves last: at
        // every moment some route carries the VIP.
        let mut unreachable = base_message(vip, VIP_UNREACHABLE_METRIC);
        unreachable.header.kind = RouteType::Unreachable;
        h.route()
            .add(unreachable)
            .replace()
            .execute()
            .await
            .map_err(nl_err(what(VIP_UNREACHABLE_METRIC), "host netns"))?;
        match backup {
            Some(b) => {
                let msg = via(&h, vip, VIP_BACKUP_METRIC, std::slice::from_ref(b)).await?;
                h.route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl_err(what(VIP_BACKUP_METRIC), "host netns"))?;
            }
            None => del_route(&h, base_message(vip, VIP_BACKUP_METRIC)).await?,
        }
        let msg = via(&h, vip, VIP_METRIC, targets).await?;
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(what(VIP_METRIC), "host netns"))
    })
}

/// The route message for `vip` via `targets` at `metric`.
async fn via(
    h: &Handle,
    vip: IpAddr,
    metric: u32,
    targets: &[VipTarget],
) -> Result<RouteMessage, NetError> {
    let mut msg = base_message(vip, metric);
    if let [t] = targets {
        let index = ifindex(h, &t.link).await?;
        msg.attributes.push(gateway_attr(t.gateway));
        msg.attributes.push(RouteAttribute::Oif(index));
        msg.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
    } else {
        let mut hops = Vec::with_capacity(targets.len());
        for t in targets {
            let mut hop = RouteNextHop::default();
            hop.flags = RouteNextHopFlags::Onlink;
            hop.interface_index = ifindex(h, &t.link).await?;
            hop.attributes = vec![gateway_attr(t.gateway)];
            hops.push(hop);
        }
        msg.attributes.push(RouteAttribute::MultiPath(hops));
    }
    Ok(msg)
}

async fn del_route(h: &Handle, msg: RouteMessage) -> Result<(), NetError> {
    match h.route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(nix::libc::ESRCH) => Ok(()),
        Err(e) => Err(nl_err("delete route", "host netns")(e)),
    }
}

/// Removes every route of `vip` berth made; `Ok(false)` if there was none.
pub fn delete_vip_route(vip: IpAddr) -> Result<bool, NetError> {
    block_on(|h| async move {
        let mut any = false;
        for (metric, kind) in [
            (VIP_METRIC, RouteType::Unicast),
            (VIP_BACKUP_METRIC, RouteType::Unicast),
            (VIP_UNREACHABLE_METRIC, RouteType::Unreachable),
        ] {
            let mut msg = base_message(vip, metric);
            msg.header.kind = kind;
            match h.route().del(msg).execute().await {
                Ok(()) => any = true,
                Err(e) if errno(&e) == Some(nix::libc::ESRCH) => {}
                Err(e) => {
                    return Err(nl_err(
                        format!("delete route {vip}/{}", host_len(vip)),
                        "host netns",
                    )(e));
                }
            }
        }
        Ok(any)
    })
}

/// The links the route of `vip` currently points at (sorted; empty if it
/// has no route in the main table).
pub fn vip_route(vip: IpAddr) -> Result<Vec<String>, NetError> {
    block_on(|h| async move {
        let links = all_links(&h).await?;
        let msgs: Vec<RouteMessage> = match vip {
            IpAddr::V4(_) => h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("list IPv4 routes", "host netns"))?,
            IpAddr::V6(_) => h
                .route()
                .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("list IPv6 routes", "host netns"))?,
        };
        let name = |i: u32| {
            links
                .iter()
                .find(|(idx, _)| *idx == i)
                .map_or_else(|| format!("if{i}"), |(_, n)| n.clone())
        };
        let mut out = Vec::new();
        for m in &msgs {
            let family_ok = matches!(
                (m.header.address_family, vip),
                (AddressFamily::Inet, IpAddr::V4(_)) | (AddressFamily::Inet6, IpAddr::V6(_))
            );
            if !family_ok
                || route_table(m) != u32::from(RouteHeader::RT_TABLE_MAIN)
                || m.header.kind != RouteType::Unicast
                || m.header.destination_prefix_length != host_len(vip)
                || !m
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Priority(p) if *p == VIP_METRIC))
            {
                continue;
            }
            let dst = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => route_addr(d),
                _ => None,
            });
            if dst != Some(vip) {
                continue;
            }
            for a in &m.attributes {
                match a {
                    RouteAttribute::Oif(i) => out.push(name(*i)),
                    RouteAttribute::MultiPath(hops) => {
                        out.extend(hops.iter().map(|hop| name(hop.interface_index)))
                    }
                    _ => {}
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    })
}

/// Adds `addrs` as host addresses (`/32`, `/128`) to the loopback of the
/// network namespace of process `pid`, so the guest accepts packets for its
/// group's service address.
pub fn add_loopback_addrs(pid: i32, addrs: &[IpAddr]) -> Result<(), NetError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns =
        std::fs::File::open(&path).map_err(|source| NetError::NetnsOpen { pid, path, source })?;
    let rt = runtime()?;
    let h = connect_in(&rt, ns.as_fd(), pid)?;
    rt.block_on(async {
        for a in addrs {
            add_addr(&h, LOOPBACK_IFINDEX, "lo", *a, host_len(*a)).await?;
        }
        Ok(())
    })
}

fn unreachable_message(net: ipnet::IpNet) -> RouteMessage {
    let mut msg = match net {
        ipnet::IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .kind(RouteType::Unreachable)
            .build(),
        ipnet::IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .kind(RouteType::Unreachable)
            .build(),
    };
    msg.header.protocol = RouteProtocol::Other(RTPROT_BERTH);
    msg
}

/// `unreachable NET proto 190`: a guest address without a running guest
/// (no `/32` route through its link) answers "host unreachable" at once,
/// instead of leaking out of the default route. Health probes of a dead
/// guest then fail in microseconds, not after their timeout.
pub fn set_subnet_unreachable(net: ipnet::IpNet) -> Result<(), NetError> {
    block_on(|h| async move {
        h.route()
            .add(unreachable_message(net))
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("add route unreachable {net}"), "host netns"))
    })
}

/// Removes what [`set_subnet_unreachable`] added; `Ok(false)` if absent.
pub fn delete_subnet_unreachable(net: ipnet::IpNet) -> Result<bool, NetError> {
    block_on(|h| async move {
        match h.route().del(unreachable_message(net)).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(nix::libc::ESRCH) => Ok(false),
            Err(e) => Err(nl_err(
                format!("delete route unreachable {net}"),
                "host netns",
            )(e)),
        }
    })
}
