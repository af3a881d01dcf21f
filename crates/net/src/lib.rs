//! Routed guest networking for berth: one point-to-point link per guest (no
//! bridge), host routes (`/32`, `/128`) to each guest, and one nftables table
//! (`inet berth`) for anti-spoofing, forwarding policy and NAT.
//!
//! All functions are synchronous and act on the network namespace of the
//! calling *thread* (netlink sockets are created on the calling thread, so a
//! caller that has `setns`'d a thread gets that namespace). Netlink work runs on
//! a private tokio current-thread runtime created per call.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
mod firewall;
mod link;
mod nic;
mod vip;

pub use error::NetError;
pub use firewall::{
    Firewall, TABLE_FAMILY, TABLE_NAME, apply_ruleset, check_ruleset, delete_table, render_ruleset,
    table_exists,
};
pub use link::{
    CONTAINER_IFNAME, Forwarding, GuestLink, delete_link, enable_forwarding,
    enable_l4_multipath_hash, interface_exists, link_rx_packets, list_links, routes_within,
    setup_container_link, setup_host_side,
};
pub use nic::{
    attach_port, bridge_ports, create_macvtap, ensure_segment_bridge, mac_bytes, open_macvtap,
    remove_bridge_if_unused, setup_container_segment,
};
pub use vip::{
    PIN_MARK_BASE, PIN_MARK_MASK, RTPROT_BERTH, VipTarget, add_loopback_addrs,
    delete_subnet_unreachable, delete_vip_route, ensure_pin, pin_mark, remove_pins,
    set_subnet_unreachable, set_vip_route, vip_route,
};
