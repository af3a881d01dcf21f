//! Extra guest NICs: macvtaps on host ports, and private L2 segments.
//!
//! ```text
//!   wire ── lan0 ─┬─ bm5n1 (macvtap, bridge mode) ── /dev/tapN ── QEMU of guest 5 (eth1)
//!                 └─ bm6n1 (macvtap, bridge mode) ── /dev/tapM ── QEMU of guest 6 (eth1)
//!
//!   bs-sync (bridge: no address, IPv6 off, no forwarding, no ARP answers)
//!     ├─ bp5n2 (tap)  ── QEMU of guest 5 (eth2)
//!     ├─ bp6n2 (tap)  ── QEMU of guest 6 (eth2)
//!     └─ bp7n1 (veth) ── eth1 in container 7
//! ```
//!
//! macvtap guests on one parent reach each other and the wire; the host
//! itself cannot reach them through that parent (macvtap's known limit:
//! bridge mode switches between macvtaps, not to the parent's own stack).
//! Management goes over the routed `vb<index>` link.
//!
//! A segment's bridge belongs to berth and is nobody's uplink: it has no
//! address, IPv6 is off on it and on every port (no link-local address,
//! no DAD or router solicitations from the host), IPv4 forwarding is off
//! for packets arriving on it, and it answers no ARP (`arp_ignore = 8`).
//! The firewall drops anything arriving on a `bs-*` bridge addressed to
//! the host itself. No name here starts with `vb`, so the firewall's
//! forwarding, NAT and source rules for guest links never apply.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage, MacVtapMode,
};
use rtnetlink::{Handle, LinkBridge, LinkMacVtap, LinkMessageBuilder, LinkUnspec, LinkVeth};

use crate::NetError;
use crate::link::{
    add_addr, block_on, check_ifname, connect_here, connect_in, delete_index, errno, link_index,
    nl_err, runtime, set_up,
};

const EEXIST: i32 = nix::libc::EEXIST;

/// Parses "52:54:00:12:34:01" into bytes.
pub fn mac_bytes(mac: &str) -> Result<Vec<u8>, NetError> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| NetError::InvalidName {
            name: mac.to_string(),
            reason: "not a MAC address",
        })?;
    if bytes.len() != 6 {
        return Err(NetError::InvalidName {
            name: mac.to_string(),
            reason: "not a MAC address",
        });
    }
    Ok(bytes)
}

/// Writes an interface's sysctl (`/proc/sys/net/{family}/conf/{ifname}/{key}`)
/// in the calling thread's network namespace. A missing file (IPv6 off in
/// the kernel) is fine.
fn if_sysctl(family: &str, ifname: &str, key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/{family}/conf/{ifname}/{key}");
    match std::fs::write(&path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::IfSysctl { path, source }),
    }
}

/// IPv6 off on a link berth makes for a guest's L2: the host then has no
/// link-local address there and sends nothing (no DAD, no RS, no MLD).
fn no_host_ipv6(ifname: &str) -> Result<(), NetError> {
    if_sysctl("ipv6", ifname, "disable_ipv6", "1")
}

/// Whether link `name` exists in the current netns.
fn exists(name: &str) -> bool {
    crate::interface_exists(name)
}

async fn bridge_up(h: &Handle, name: &str) -> Result<u32, NetError> {
    let index =
        link_index(h, name, "current netns")
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: name.to_string(),
                netns: "current netns".into(),
            })?;
    set_up(h, index, name).await?;
    Ok(index)
}

/// Makes sure segment bridge `name` exists and is up, with no address, no
/// IPv6, no IPv4 forwarding from it, no ARP answers, no STP, no multicast
/// snooping (CARP/VRRP adverts are multicast and must reach every member),
/// and no netfilter calls for bridged frames. Idempotent and safe against a
/// concurrent creator. True if this call created it.
pub fn ensure_segment_bridge(name: &str) -> Result<bool, NetError> {
    check_ifname(name)?;
    let created = block_on(|h| async move {
        if link_index(&h, name, "current netns").await?.is_some() {
            return Ok(false);
        }
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .mcast_snooping(false)
            .nf_call_iptables(false)
            .nf_call_ip6tables(false)
            .nf_call_arptables(false)
            .build();
        match h.link().add(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
            Err(e) => Err(nl_err("create bridge", name)(e)),
        }
    })?;
    no_host_ipv6(name)?;
    if_sysctl("ipv4", name, "forwarding", "0")?;
    if_sysctl("ipv4", name, "arp_ignore", "8")?;
    block_on(|h| async move { bridge_up(&h, name).await.map(drop) })?;
    if created {
        tracing::info!(bridge = name, "segment bridge created");
    }
    Ok(created)
}

/// Puts existing link `port` into bridge `bridge` and brings it up, with
/// IPv6 off on it first.
pub fn attach_port(port: &str, bridge: &str) -> Result<(), NetError> {
    check_ifname(port)?;
    check_ifname(bridge)?;
    no_host_ipv6(port)?;
    block_on(|h| async move {
        let br = link_index(&h, bridge, "current netns")
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: bridge.to_string(),
                netns: "current netns".into(),
            })?;
        let idx = link_index(&h, port, "current netns")
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: port.to_string(),
                netns: "current netns".into(),
            })?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("add to bridge {bridge}"), port))
    })
}

/// Names of the links enslaved to `bridge`, sorted; empty if it does not
/// exist.
pub fn bridge_ports(bridge: &str) -> Result<Vec<String>, NetError> {
    check_ifname(bridge)?;
    block_on(|h| async move {
        let Some(br) = link_index(&h, bridge, "current netns").await? else {
            return Ok(Vec::new());
        };
        let msgs: Vec<LinkMessage> = futures::TryStreamExt::try_collect(h.link().get().execute())
            .await
            .map_err(nl_err("list links", "current netns"))?;
        let mut out: Vec<String> = msgs
            .iter()
            .filter(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == br))
            })
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .collect();
        out.sort();
        Ok(out)
    })
}

/// Creates macvtap `name` in bridge mode on host interface `parent`, with
/// the guest's `mac` (the guest's NIC must use the same one), IPv6 off on
/// the host side, and up. A stale link of that name is replaced.
pub fn create_macvtap(name: &str, parent: &str, mac: &str) -> Result<(), NetError> {
    check_ifname(name)?;
    check_ifname(parent)?;
    let mac = mac_bytes(mac)?;
    block_on(|h| async move {
        if let Some(old) = link_index(&h, name, "current netns").await? {
            delete_index(&h, old, name).await?;
        }
        let parent_idx = link_index(&h, parent, "current netns")
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: parent.to_string(),
                netns: "the host (macvtap parent)".into(),
            })?;
        let msg = LinkMacVtap::new(name, parent_idx, MacVtapMode::Bridge)
            .address(mac)
            .build();
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("create macvtap on {parent}"), name))
    })?;
    no_host_ipv6(name)?;
    block_on(|h| async move { bridge_up(&h, name).await.map(drop) })?;
    tracing::info!(link = name, parent, "macvtap created");
    Ok(())
}

/// Opens the character device of macvtap `name` (the tap QEMU reads and
/// writes) and returns it, close-on-exec.
///
/// `/dev/tapN` is named after the macvtap's ifindex, which is per network
/// namespace, so in a namespace other than the one /dev and /sys were made
/// for it may be another namespace's device (or missing). The device
/// number is read instead from a sysfs mounted for this namespace, in a
/// private mount namespace of a helper thread, where a private device node
/// is made and opened; the thread's mounts vanish with it.
pub fn open_macvtap(name: &str) -> Result<OwnedFd, NetError> {
    check_ifname(name)?;
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "berth-macvtap-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let io = |what: String| move |source: std::io::Error| NetError::Macvtap { what, source };
    std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let res = std::thread::scope(|s| {
        s.spawn(|| open_in_private_mounts(name, &dir))
            .join()
            .unwrap_or_else(|_| {
                Err(NetError::Runtime(std::io::Error::other(
                    "macvtap helper thread panicked",
                )))
            })
    });
    let _ = std::fs::remove_dir(&dir);
    res
}

fn open_in_private_mounts(name: &str, dir: &Path) -> Result<OwnedFd, NetError> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let errno_io = |what: String| {
        move |e: nix::Error| NetError::Macvtap {
            what,
            source: std::io::Error::from(e),
        }
    };
    // Only this thread moves; its mounts are its own from here on.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(errno_io("unshare(CLONE_NEWNS)".into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(errno_io("making mounts private".into()))?;
    mount(
        Some("sysfs"),
        dir,
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(errno_io(format!("mounting sysfs on {}", dir.display())))?;
    let dev = read_tap_dev(&dir.join("class/net").join(name));
    let _ = umount2(dir, MntFlags::MNT_DETACH);
    let (major, minor) = dev?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(errno_io(format!("mounting tmpfs on {}", dir.display())))?;
    let node = dir.join("tap");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(errno_io(format!(
        "mknod {} c {major} {minor}",
        node.display()
    )))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .map_err(|source| NetError::Macvtap {
            what: format!("opening the tap of macvtap {name} (char {major}:{minor})"),
            source,
        });
    let _ = umount2(dir, MntFlags::MNT_DETACH);
    Ok(OwnedFd::from(file?))
}

/// `major:minor` of a macvtap's tap, from `<sysfs>/class/net/NAME/macvtap/tapN/dev`.
fn read_tap_dev(link_dir: &Path) -> Result<(u64, u64), NetError> {
    let mt = link_dir.join("macvtap");
    let entry = std::fs::read_dir(&mt)
        .map_err(|source| NetError::Macvtap {
            what: format!("reading {} (is it a macvtap?)", mt.display()),
            source,
        })?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("tap"))
        .ok_or_else(|| NetError::Macvtap {
            what: format!("finding tapN in {}", mt.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
    let dev_file: PathBuf = entry.path().join("dev");
    let text = std::fs::read_to_string(&dev_file).map_err(|source| NetError::Macvtap {
        what: format!("reading {}", dev_file.display()),
        source,
    })?;
    parse_dev(&text).ok_or_else(|| NetError::Macvtap {
        what: format!("{} reads {text:?}, not MAJOR:MINOR", dev_file.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A container's NIC on a segment: veth `host` (in the current netns,
/// enslaved to `bridge`, IPv6 off, up) <-> `peer` (e.g. "eth1", created
/// directly in the network namespace of process `pid`, with `mac`, up, and
/// `addr` on it when given). A stale `host` link is replaced.
pub fn setup_container_segment(
    host: &str,
    peer: &str,
    pid: i32,
    bridge: &str,
    mac: &str,
    addr: Option<IpNet>,
) -> Result<(), NetError> {
    check_ifname(host)?;
    check_ifname(peer)?;
    let mac = mac_bytes(mac)?;
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns = File::open(&path).map_err(|source| NetError::NetnsOpen { pid, path, source })?;
    let rt = runtime()?;
    let here = connect_here(&rt, "host netns")?;
    let guest = connect_in(&rt, ns.as_fd(), pid)?;
    rt.block_on(async {
        if let Some(old) = link_index(&here, host, "host netns").await? {
            delete_index(&here, old, host).await?;
        }
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer)
            .address(mac)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        here.link().add(msg).execute().await.map_err(nl_err(
            format!("create veth pair {host} <-> {peer} (peer in netns of pid {pid})"),
            host,
        ))
    })?;
    let configured = (|| {
        attach_port(host, bridge)?;
        rt.block_on(async {
            let netns = format!("netns of pid {pid}");
            let idx =
                link_index(&guest, peer, &netns)
                    .await?
                    .ok_or_else(|| NetError::LinkNotFound {
                        name: peer.to_string(),
                        netns: netns.clone(),
                    })?;
            let target = format!("{peer} in {netns}");
            if let Some(a) = addr {
                add_addr(&guest, idx, &target, a.addr(), a.prefix_len()).await?;
            }
            set_up(&guest, idx, &target).await
        })
    })();
    if let Err(e) = configured {
        let _ = crate::delete_link(host);
        return Err(e);
    }
    tracing::info!(
        link = host,
        peer,
        pid,
        bridge,
        "container segment port set up"
    );
    Ok(())
}

/// Deletes segment bridge `name` if it has no ports left. True if it did.
pub fn remove_bridge_if_unused(name: &str) -> Result<bool, NetError> {
    if !exists(name) {
        return Ok(false);
    }
    if !bridge_ports(name)?.is_empty() {
        return Ok(false);
    }
    crate::delete_link(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_dev_numbers_parse() {
        assert_eq!(
            mac_bytes("52:54:00:be:00:0a").unwrap(),
            vec![0x52, 0x54, 0, 0xbe, 0, 0x0a]
        );
        assert!(mac_bytes("52:54:00").is_err());
        assert!(mac_bytes("zz:54:00:be:00:0a").is_err());
        assert_eq!(parse_dev("239:3\n"), Some((239, 3)));
        assert_eq!(parse_dev("x"), None);
    }

    #[test]
    fn tap_dev_is_read_from_the_macvtap_dir() {
        let t = std::env::temp_dir().join(format!("berth-nic-test-{}", std::process::id()));
        let d = t.join("bm5n1/macvtap/tap17");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("dev"), "240:1\n").unwrap();
        assert_eq!(read_tap_dev(&t.join("bm5n1")).unwrap(), (240, 1));
        let e = read_tap_dev(&t.join("nope")).unwrap_err().to_string();
        assert!(e.contains("is it a macvtap"), "{e}");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
