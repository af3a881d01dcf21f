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

fn base_message(vip: IpAddr) -> RouteMessage {
    let mut msg = match vip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
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
/// kernel hashes flows over them), replacing whatever route `vip` had.
/// With no targets the route is removed.
pub fn set_vip_route(vip: IpAddr, targets: &[VipTarget]) -> Result<(), NetError> {
    if targets.is_empty() {
        return delete_vip_route(vip).map(|_| ());
    }
    if let Some(t) = targets
        .iter()
        .find(|t| t.gateway.is_ipv4() != vip.is_ipv4())
    {
        return Err(NetError::InvalidName {
            name: t.gateway.to_string(),
            reason: "VIP next hop of the other address family",
        });
    }
    block_on(|h| async move {
        let mut msg = base_message(vip);
        if let [t] = targets {
            let index = ifindex(&h, &t.link).await?;
            msg.attributes.push(gateway_attr(t.gateway));
            msg.attributes.push(RouteAttribute::Oif(index));
            msg.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
        } else {
            let mut hops = Vec::with_capacity(targets.len());
            for t in targets {
                let mut hop = RouteNextHop::default();
                hop.flags = RouteNextHopFlags::Onlink;
                hop.interface_index = ifindex(&h, &t.link).await?;
                hop.attributes = vec![gateway_attr(t.gateway)];
                hops.push(hop);
            }
            msg.attributes.push(RouteAttribute::MultiPath(hops));
        }
        let what = format!(
            "route {vip}/{} to {}",
            host_len(vip),
            targets
                .iter()
                .map(|t| t.link.as_str())
                .collect::<Vec<_>>()
                .join("+")
        );
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(what, "host netns"))
    })
}

/// Removes the route of `vip`; `Ok(false)` if there was none.
pub fn delete_vip_route(vip: IpAddr) -> Result<bool, NetError> {
    block_on(|h| async move {
        match h.route().del(base_message(vip)).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(nix::libc::ESRCH) => Ok(false),
            Err(e) => Err(nl_err(
                format!("delete route {vip}/{}", host_len(vip)),
                "host netns",
            )(e)),
        }
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
