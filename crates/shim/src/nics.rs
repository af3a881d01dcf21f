//! A guest's extra NICs (see `berth_spec::nic`), wired when it starts and
//! removed when it stops:
//!
//! ```text
//! VM, macvtap:  create bm<i>n<k> on parent (MAC = the guest's) ─ open its tap ─▶ QEMU fd 4+
//! VM, segment:  ensure bridge bs-<seg> ─ open tap bp<i>n<k> ─ into the bridge ─▶ QEMU fd 4+
//! VM, vfio:     (bind = true: bind to vfio-pci) ─ check it is ready ─▶ -device vfio-pci,host=
//! container:    ensure bridge bs-<seg> ─ veth bp<i>n<k> in the bridge <-> eth<k> in the container
//! ```
//!
//! Every link is named from the guest's index and the NIC's position, so a
//! start replaces what an earlier run that died left behind, and stop and
//! `berth destroy` know exactly what to delete. Segment bridges outlive a
//! guest's stop (other members use them); the daemon removes a bridge once
//! no guest in its records names the segment.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use berth_spec::Guest;
use berth_spec::nic::NicKind;

/// The first fd number extra NICs get in QEMU (3 is the management tap).
pub const FIRST_NIC_FD: i32 = 4;

/// What a VM's extra NICs hold while QEMU starts.
pub struct VmNics {
    /// Open taps, in NIC order; QEMU inherits them (see [`VmNics::pass_to`]).
    fds: Vec<(OwnedFd, i32)>,
    /// QEMU's view of the NICs.
    pub args: Vec<berth_vm::NicArg>,
}

impl VmNics {
    /// Makes `cmd`'s child inherit every tap under its QEMU fd number. Call
    /// after the other `pre_exec` set-up (cgroup join): the dup2s then
    /// cannot clobber a descriptor it still needs.
    pub fn pass_to(&self, cmd: &mut Command) {
        for (fd, target) in &self.fds {
            berth_vm::inherit_fd(cmd, fd.as_raw_fd(), *target);
        }
    }
}

/// A copy of `fd` numbered 64 or above (close-on-exec): far from the small
/// numbers QEMU's fds are moved to, so no dup2 overwrites a source.
fn high(fd: OwnedFd, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new
    // descriptor (or -1); it touches no memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if n < 0 {
        return Err(format!(
            "{what}: duplicating its fd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `n` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Creates the host side of every extra NIC of VM `cfg`. On error,
/// whatever was made is removed again.
pub fn setup_vm(cfg: &Guest) -> Result<VmNics, String> {
    let mut out = VmNics {
        fds: Vec::new(),
        args: Vec::new(),
    };
    let res = (|| {
        for nic in &cfg.nics {
            let target = FIRST_NIC_FD + out.fds.len() as i32;
            let mac = nic.mac.clone().unwrap_or_default();
            let who = format!("nic[{}]", nic.position);
            match &nic.kind {
                NicKind::Macvtap { parent, link } => {
                    berth_net::create_macvtap(link, parent, &mac)
                        .map_err(|e| format!("{who}: macvtap {link} on {parent}: {e}"))?;
                    let fd = berth_net::open_macvtap(link)
                        .map_err(|e| format!("{who}: macvtap {link}: {e}"))?;
                    out.fds.push((high(fd, link)?, target));
                    out.args.push(berth_vm::NicArg::Tap { fd: target, mac });
                }
                NicKind::Segment { bridge, link, .. } => {
                    berth_net::ensure_segment_bridge(bridge)
                        .map_err(|e| format!("{who}: segment bridge {bridge}: {e}"))?;
                    let _ = berth_net::delete_link(link);
                    let fd = berth_vm::open_tap(link).map_err(|e| format!("{who}: {e}"))?;
                    berth_net::attach_port(link, bridge)
                        .map_err(|e| format!("{who}: {link} into {bridge}: {e}"))?;
                    out.fds.push((high(fd, link)?, target));
                    out.args.push(berth_vm::NicArg::Tap { fd: target, mac });
                }
                NicKind::Vfio { pci, bind } => {
                    let sys = Path::new("/sys");
                    if *bind {
                        berth_vm::vfio::bind_vfio(sys, pci).map_err(|e| format!("{who}: {e}"))?;
                    }
                    if let Some(p) = berth_vm::vfio::vfio_problem(sys, pci, false) {
                        return Err(format!("{who}: {p}"));
                    }
                    out.args.push(berth_vm::NicArg::Vfio { host: pci.clone() });
                }
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(out),
        Err(e) => {
            drop(out);
            cleanup(cfg);
            Err(e)
        }
    }
}

/// Joins container `cfg` (its leader process `pid`) to its segments.
pub fn setup_container(cfg: &Guest, pid: i32) -> Result<(), String> {
    for nic in &cfg.nics {
        if let NicKind::Segment { bridge, link, .. } = &nic.kind {
            let who = format!("nic[{}]", nic.position);
            berth_net::ensure_segment_bridge(bridge)
                .map_err(|e| format!("{who}: segment bridge {bridge}: {e}"))?;
            berth_net::setup_container_segment(
                link,
                &nic.guest_ifname(),
                pid,
                bridge,
                nic.mac.as_deref().unwrap_or_default(),
                nic.addr,
            )
            .map_err(|e| format!("{who}: {e}"))?;
        }
    }
    Ok(())
}

/// Deletes the host links of `cfg`'s NICs (macvtaps, segment ports).
/// Idempotent; bridges stay (see the module docs).
pub fn cleanup(cfg: &Guest) {
    for nic in &cfg.nics {
        if let Some(link) = nic.link()
            && let Err(e) = berth_net::delete_link(link)
        {
            eprintln!("berth-shim: cleanup: deleting {link}: {e}");
        }
    }
}

/// `berth.nic=eth1:10.9.0.2/24,eth2:...` for a VM's kernel command line
/// (NICs with an `addr`), or `None`.
pub fn cmdline_arg(cfg: &Guest) -> Option<String> {
    let parts: Vec<String> = cfg
        .nics
        .iter()
        .filter_map(|n| n.addr.map(|a| format!("{}:{a}", n.guest_ifname())))
        .collect();
    (!parts.is_empty()).then(|| format!("berth.nic={}", parts.join(",")))
}
