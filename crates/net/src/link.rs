//! Links, addresses and routes through rtnetlink.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Instant;

use futures::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::runtime::Runtime;

use crate::NetError;

/// Name of the guest side of a container's link, inside the container.
pub const CONTAINER_IFNAME: &str = "host0";

/// The loopback device is always ifindex 1 in every network namespace
/// (`LOOPBACK_IFINDEX` in the kernel).
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

const ENOENT: i32 = nix::libc::ENOENT;
const ENODEV: i32 = nix::libc::ENODEV;

/// One guest's routed point-to-point link (no bridge). The host side gets
/// `host4/32` (+ `host6/128`), plus host routes to `guest4/32` and
/// `guest6/128` via this link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLink {
    /// Host-side interface name, e.g. "vb2". Must start with "vb" for the
    /// firewall's `iifname "vb*"` forward rule to cover it (at most 15 bytes).
    pub name: String,
    pub guest4: Ipv4Addr,
    pub host4: Ipv4Addr,
    pub guest6: Option<Ipv6Addr>,
    pub host6: Option<Ipv6Addr>,
}

impl GuestLink {
    /// Both IPv6 addresses, when the link has IPv6 at all.
    fn v6(&self) -> Option<(Ipv6Addr, Ipv6Addr)> {
        match (self.guest6, self.host6) {
            (Some(g), Some(h)) => Some((g, h)),
            _ => None,
        }
    }
}

/// What [`enable_forwarding`] found before it switched forwarding on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    pub ipv4_was_on: bool,
    pub ipv6_was_on: bool,
}

pub(crate) fn runtime() -> Result<Runtime, NetError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetError::Runtime)
}

/// A netlink connection whose socket lives in the calling thread's netns.
pub(crate) fn connect_here(rt: &Runtime, netns: &str) -> Result<Handle, NetError> {
    let _guard = rt.enter();
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Socket {
        netns: netns.to_string(),
        source,
    })?;
    rt.spawn(conn);
    Ok(handle)
}

/// A netlink connection whose socket lives in the network namespace `ns`.
///
/// The socket is created on a short-lived helper thread that `setns`es into
/// `ns` (setns only affects the calling thread); a netlink socket stays bound
/// to the namespace it was created in, so it can then be used from here.
pub(crate) fn connect_in(rt: &Runtime, ns: BorrowedFd<'_>, pid: i32) -> Result<Handle, NetError> {
    let netns = format!("netns of pid {pid}");
    let (conn, handle) = std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("berth-net-setns".into())
            .spawn_scoped(s, || {
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetError::Setns { pid, source })?;
                let _guard = rt.enter();
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|source| NetError::Socket {
                        netns: netns.clone(),
                        source,
                    })?;
                Ok::<_, NetError>((conn, handle))
            })
            .map_err(NetError::Runtime)?;
        worker.join().unwrap_or_else(|_| {
            Err(NetError::Runtime(std::io::Error::other(
                "setns helper thread panicked",
            )))
        })
    })?;
    rt.spawn(conn);
    Ok(handle)
}

pub(crate) fn nl_err(
    op: impl Into<String>,
    target: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    let target = target.into();
    move |source| NetError::Netlink { op, target, source }
}

/// The errno of a netlink error, if it is one.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().raw_os_error(),
        _ => None,
    }
}

pub(crate) fn check_ifname(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved name")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        Some("contains '/', ':', whitespace or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Index of link `name`, or None if it does not exist.
pub(crate) async fn link_index(
    handle: &Handle,
    name: &str,
    netns: &str,
) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(nl_err("look up link", format!("{name} in {netns}"))(e)),
    }
}

pub(crate) async fn add_addr(
    handle: &Handle,
    index: u32,
    ifname: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetError> {
    let mut req = handle.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        // IFA_F_NODAD: usable at once, no duplicate address detection delay.
        // IFA_F_NOPREFIXROUTE: no kernel "ADDR/128 dev IF" prefix route; the
        // explicit host routes are the only routes on a berth link.
        let msg = req.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(
            AddressFlags::Nodad | AddressFlags::Noprefixroute,
        ));
    }
    req.replace()
        .execute()
        .await
        .map_err(nl_err(format!("add address {addr}/{prefix}"), ifname))
}

pub(crate) async fn set_up(handle: &Handle, index: u32, ifname: &str) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err("set link up", ifname))
}

async fn add_route(
    handle: &Handle,
    msg: RouteMessage,
    what: String,
    ifname: &str,
) -> Result<(), NetError> {
    handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("add route {what}"), ifname))
}

/// `dst/32 dev IF` (scope link).
fn host_route4(dst: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

/// `dst/128 dev IF`.
fn host_route6(dst: Ipv6Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(dst, 128)
        .output_interface(index)
        .build()
}

/// Configure the host side: addresses, up, routes to the guest.
async fn configure_host_side(
    handle: &Handle,
    link: &GuestLink,
    index: u32,
) -> Result<(), NetError> {
    let name = link.name.as_str();
    let v6 = link.v6();
    let a4 = add_addr(handle, index, name, IpAddr::V4(link.host4), 32);
    let a6 = async {
        match v6 {
            Some((_, h6)) => add_addr(handle, index, name, IpAddr::V6(h6), 128).await,
            None => Ok(()),
        }
    };
    let up = set_up(handle, index, name);
    futures::try_join!(a4, a6, up)?;
    let r4 = add_route(
        handle,
        host_route4(link.guest4, index),
        format!("{}/32", link.guest4),
        name,
    );
    let r6 = async {
        match v6 {
            Some((g6, _)) => {
                add_route(handle, host_route6(g6, index), format!("{g6}/128"), name).await
            }
            None => Ok(()),
        }
    };
    futures::try_join!(r4, r6)?;
    Ok(())
}

/// Configure the container side (`host0` and `lo`) through a socket in the
/// container's netns.
async fn configure_guest_side(handle: &Handle, link: &GuestLink, pid: i32) -> Result<(), NetError> {
    let netns = format!("netns of pid {pid}");
    let target = format!("{CONTAINER_IFNAME} in {netns}");
    let target = target.as_str();
    let index = link_index(handle, CONTAINER_IFNAME, &netns)
        .await?
        .ok_or_else(|| NetError::LinkNotFound {
            name: CONTAINER_IFNAME.to_string(),
            netns: netns.clone(),
        })?;
    let v6 = link.v6();
    let a4 = add_addr(handle, index, target, IpAddr::V4(link.guest4), 32);
    let a6 = async {
        match v6 {
            Some((g6, _)) => add_addr(handle, index, target, IpAddr::V6(g6), 128).await,
            None => Ok(()),
        }
    };
    futures::try_join!(a4, a6)?;
    set_up(handle, LOOPBACK_IFINDEX, "lo").await?;
    set_up(handle, index, target).await?;

    // On-link routes to the host first: the default routes' gateways need them
    // only conceptually (they are `onlink`), but keep the natural order.
    let r4 = add_route(
        handle,
        host_route4(link.host4, index),
        format!("{}/32", link.host4),
        target,
    );
    let r6 = async {
        match v6 {
            Some((_, h6)) => {
                add_route(handle, host_route6(h6, index), format!("{h6}/128"), target).await
            }
            None => Ok(()),
        }
    };
    futures::try_join!(r4, r6)?;

    let d4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(link.host4)
        .output_interface(index)
        .onlink()
        .build();
    let d4 = add_route(handle, d4, format!("0.0.0.0/0 via {}", link.host4), target);
    let d6 = async {
        match v6 {
            Some((_, h6)) => {
                let d6 = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                    .gateway(h6)
                    .output_interface(index)
                    .onlink()
                    .build();
                add_route(handle, d6, format!("::/0 via {h6}"), target).await
            }
            None => Ok(()),
        }
    };
    futures::try_join!(d4, d6)?;
    Ok(())
}

/// The veth creation message: host side `name`, peer `host0` created directly
/// inside the network namespace `ns_fd`.
fn veth_message(name: &str, ns_fd: BorrowedFd<'_>) -> LinkMessage {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(CONTAINER_IFNAME)
        .setns_by_fd(ns_fd.as_raw_fd())
        .build();
    LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build()
}

/// For a container: create a veth pair `link.name` <-> `host0` with the peer
/// inside the network namespace of process `pid`, configure both sides.
///
/// Inside the container: `guest4/32` and `guest6/128` (IFA_F_NODAD) on
/// `host0`, `lo` and `host0` up, on-link routes to `host4/32` and
/// `host6/128`, default routes via `host4` / `host6` (onlink). On the host:
/// `host4/32`, `host6/128` (nodad), link up, routes `guest4/32` and
/// `guest6/128` dev `link.name`.
///
/// Deviation from "create, move, rename": the peer is created directly in
/// the target namespace under its final name `host0` (IFLA_NET_NS_FD on the
/// peer), which is one atomic request instead of three and never puts a
/// temporary name into the host namespace. A stale host-side link of the same
/// name is deleted first (which also deletes its old peer).
///
/// IPv6 is configured only when both `guest6` and `host6` are set.
pub fn setup_container_link(link: &GuestLink, pid: i32) -> Result<(), NetError> {
    check_ifname(&link.name)?;
    let started = Instant::now();
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns = File::open(&path).map_err(|source| NetError::NetnsOpen { pid, path, source })?;

    let rt = runtime()?;
    let host = connect_here(&rt, "host netns")?;
    let guest = connect_in(&rt, ns.as_fd(), pid)?;

    rt.block_on(async {
        let name = link.name.as_str();
        if let Some(old) = link_index(&host, name, "host netns").await? {
            tracing::info!(link = name, "deleting stale link before setup");
            delete_index(&host, old, name).await?;
        }
        host.link()
            .add(veth_message(name, ns.as_fd()))
            .execute()
            .await
            .map_err(nl_err(
                format!(
                    "create veth pair {name} <-> {CONTAINER_IFNAME} (peer in netns of pid {pid})"
                ),
                name,
            ))?;
        let index = link_index(&host, name, "host netns")
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: name.to_string(),
                netns: "host netns".into(),
            })?;
        let configured = futures::try_join!(
            configure_host_side(&host, link, index),
            configure_guest_side(&guest, link, pid)
        );
        if let Err(e) = configured {
            // Leave nothing half-configured behind: deleting the host side
            // also deletes the peer inside the container.
            if let Err(cleanup) = delete_index(&host, index, name).await {
                tracing::warn!(link = name, error = %cleanup, "cannot remove link after failed setup");
            }
            return Err(e);
        }
        Ok::<_, NetError>(())
    })?;
    tracing::info!(
        link = link.name.as_str(),
        pid,
        guest4 = %link.guest4,
        elapsed_us = started.elapsed().as_micros() as u64,
        "container link set up"
    );
    Ok(())
}

/// For a VM: configure the host side of an existing tap `link.name` (the
/// supervisor created it and handed its fd to QEMU): host addresses
/// `host4/32` (+ `host6/128`), link up, routes to `guest4/32` (+ `guest6/128`)
/// through it. The guest configures its own side (from the `ip=` kernel
/// argument, a config disk or static config).
pub fn setup_host_side(link: &GuestLink) -> Result<(), NetError> {
    check_ifname(&link.name)?;
    let started = Instant::now();
    block_on(|h| async move {
        let name = link.name.as_str();
        let index =
            link_index(&h, name, "host netns")
                .await?
                .ok_or_else(|| NetError::LinkNotFound {
                    name: name.to_string(),
                    netns: "host netns".into(),
                })?;
        configure_host_side(&h, link, index).await
    })?;
    tracing::info!(
        link = link.name.as_str(),
        guest4 = %link.guest4,
        elapsed_us = started.elapsed().as_micros() as u64,
        "tap host side set up"
    );
    Ok(())
}

/// Packets the host has received on link `name` (for a VM's tap: packets
/// the guest sent), or `None` if the link does not exist. Read through
/// netlink, so it is right in any network namespace.
pub fn link_rx_packets(name: &str) -> Result<Option<u64>, NetError> {
    check_ifname(name)?;
    block_on(|h| async move {
        let mut links = h.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Stats64(s) => Some(s.rx_packets),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
            Err(e) => Err(nl_err("read link statistics", name.to_string())(e)),
        }
    })
}

pub(crate) async fn delete_index(
    handle: &Handle,
    index: u32,
    name: &str,
) -> Result<bool, NetError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(false),
        Err(e) => Err(nl_err("delete link", name)(e)),
    }
}

pub(crate) fn block_on<T, F, Fut>(f: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    let rt = runtime()?;
    let handle = connect_here(&rt, "current netns")?;
    rt.block_on(f(handle))
}

/// Delete a link by name in the current netns; `Ok(false)` if it did not exist.
pub fn delete_link(name: &str) -> Result<bool, NetError> {
    check_ifname(name)?;
    // Cheap check first: most calls are "make sure it is gone" on a start.
    if !interface_exists(name) {
        return Ok(false);
    }
    block_on(|h| async move {
        match link_index(&h, name, "current netns").await? {
            Some(index) => delete_index(&h, index, name).await,
            None => Ok(false),
        }
    })
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) async fn all_links(handle: &Handle) -> Result<Vec<(u32, String)>, NetError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("list links", "current netns"))?;
    Ok(msgs
        .iter()
        .filter_map(|m| link_name(m).map(|n| (m.header.index, n.to_string())))
        .collect())
}

/// Names of links in the current netns starting with `prefix`, sorted.
pub fn list_links(prefix: &str) -> Result<Vec<String>, NetError> {
    let mut names: Vec<String> = block_on(|h| async move { all_links(&h).await })?
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether link `name` exists in the calling thread's netns
/// (`if_nametoindex`, which asks the kernel through a socket of this netns).
pub fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn enable_sysctl(path: &'static str) -> Result<bool, NetError> {
    let err = |source| NetError::Sysctl { path, source };
    let was_on = std::fs::read_to_string(path).map_err(err)?.trim() == "1";
    if !was_on {
        std::fs::write(path, "1\n").map_err(err)?;
    }
    Ok(was_on)
}

/// Enable IPv4 and IPv6 forwarding in the current network namespace and
/// report whether each was already on.
///
/// Files under `/proc/sys/net` are looked up in the network namespace of the
/// task that opens them (`current->nsproxy->net_ns`), so this acts on the
/// calling thread's netns, unlike `/sys/class/net`, which shows the netns of
/// whoever mounted sysfs.
pub fn enable_forwarding() -> Result<Forwarding, NetError> {
    Ok(Forwarding {
        ipv4_was_on: enable_sysctl(IPV4_FORWARD)?,
        ipv6_was_on: enable_sysctl(IPV6_FORWARD)?,
    })
}

/// Multipath routes hash flows by addresses and ports (layer 4), not by
/// addresses alone: an ECMP service address then spreads the connections
/// of one client over its members. Current netns; true if it was already so.
pub fn enable_l4_multipath_hash() -> Result<bool, NetError> {
    let a = enable_sysctl("/proc/sys/net/ipv4/fib_multipath_hash_policy")?;
    // Older kernels have no IPv6 knob; IPv4 is what matters most.
    let b = enable_sysctl("/proc/sys/net/ipv6/fib_multipath_hash_policy").unwrap_or(true);
    Ok(a && b)
}

pub(crate) fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

pub(crate) fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Render a main-table unicast route whose destination lies within the
/// given networks, e.g. "10.0.0.2/32 dev vb2".
fn describe_route(
    msg: &RouteMessage,
    links: &[(u32, String)],
    net4: Ipv4Net,
    net6: Option<Ipv6Net>,
) -> Option<String> {
    if route_table(msg) != u32::from(RouteHeader::RT_TABLE_MAIN)
        || msg.header.kind != RouteType::Unicast
    {
        return None;
    }
    let len = msg.header.destination_prefix_length;
    let dst = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_addr(d),
        _ => None,
    });
    let inside = match (msg.header.address_family, dst) {
        (AddressFamily::Inet, Some(IpAddr::V4(d))) => {
            Ipv4Net::new(d, len).is_ok_and(|n| net4.contains(&n))
        }
        (AddressFamily::Inet6, Some(IpAddr::V6(d))) => {
            net6.is_some_and(|net6| Ipv6Net::new(d, len).is_ok_and(|n| net6.contains(&n)))
        }
        _ => false,
    };
    if !inside {
        return None;
    }
    let dst = dst?;
    let mut out = format!("{dst}/{len}");
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Gateway(g) => {
                if let Some(g) = route_addr(g) {
                    out.push_str(&format!(" via {g}"));
                }
            }
            RouteAttribute::Oif(i) => {
                let name = links
                    .iter()
                    .find(|(idx, _)| idx == i)
                    .map_or_else(|| format!("if{i}"), |(_, n)| n.clone());
                out.push_str(&format!(" dev {name}"));
            }
            _ => {}
        }
    }
    Some(out)
}

/// Routes in the current netns (main table, unicast) whose destination is
/// inside `net4` or `net6`, e.g. "10.0.0.2/32 dev vb2", sorted.
pub fn routes_within(net4: Ipv4Net, net6: Option<Ipv6Net>) -> Result<Vec<String>, NetError> {
    block_on(|h| async move {
        let links = all_links(&h).await?;
        let mut msgs: Vec<RouteMessage> = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list IPv4 routes", "current netns"))?;
        if net6.is_some() {
            let v6: Vec<RouteMessage> = h
                .route()
                .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("list IPv6 routes", "current netns"))?;
            msgs.extend(v6);
        }
        let mut out: Vec<String> = msgs
            .iter()
            .filter_map(|m| describe_route(m, &links, net4, net6))
            .collect();
        out.sort();
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(check_ifname("vb2").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("vb-0123456789abcdef").is_err());
        assert!(check_ifname("a/b").is_err());
        let e = check_ifname("a b").unwrap_err().to_string();
        assert!(e.contains("\"a b\""), "{e}");
    }

    #[test]
    fn setup_names_the_missing_process() {
        let link = GuestLink {
            name: "vb9".into(),
            guest4: "10.0.0.9".parse().unwrap(),
            host4: "10.0.0.1".parse().unwrap(),
            guest6: None,
            host6: None,
        };
        // PIDs are at most 2^22, so this one cannot exist.
        let err = setup_container_link(&link, i32::MAX).unwrap_err();
        assert!(matches!(err, NetError::NetnsOpen { .. }), "{err:?}");
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
        let bad = GuestLink {
            name: "much-too-long-name".into(),
            ..link
        };
        assert!(matches!(
            setup_container_link(&bad, 1),
            Err(NetError::InvalidName { .. })
        ));
    }

    #[test]
    fn describe_route_filters_by_net() {
        let net4: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let net6: Ipv6Net = "fd00::/64".parse().unwrap();
        let links = vec![(7, "vb2".to_string())];
        let r = host_route4("10.0.0.2".parse().unwrap(), 7);
        assert_eq!(
            describe_route(&r, &links, net4, Some(net6)).as_deref(),
            Some("10.0.0.2/32 dev vb2")
        );
        let r = host_route4("10.0.1.2".parse().unwrap(), 7);
        assert_eq!(describe_route(&r, &links, net4, Some(net6)), None);
        let r = host_route6("fd00::2".parse().unwrap(), 7);
        assert_eq!(
            describe_route(&r, &links, net4, Some(net6)).as_deref(),
            Some("fd00::2/128 dev vb2")
        );
        assert_eq!(describe_route(&r, &links, net4, None), None);
    }
}
