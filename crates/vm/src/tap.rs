//! Creating the guest's tap device and handing its fd to QEMU.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{Result, VmError};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short)
/// at the start of the 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(VmError::BadTapName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a valid interface name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b.is_ascii_whitespace() || b == 0)
    {
        return bad("contains '/', ':', '%', whitespace or NUL");
    }
    Ok(())
}

/// Creates tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) in the calling
/// thread's network namespace and returns its open fd. The tap is not
/// persistent: it disappears when the last copy of the fd closes (for
/// example when QEMU, which inherited it, exits). The fd is close-on-exec;
/// hand it to QEMU with [`crate::inherit_fd`]. The link is created down;
/// bringing it up and routing to it is the network driver's job.
pub fn open_tap(name: &str) -> Result<OwnedFd> {
    check_name(name)?;
    let err = |op, source: std::io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) => {
                " (no /dev/net/tun: load the `tun` kernel module)"
            }
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (needs root or CAP_NET_ADMIN; an unprivileged QEMU cannot do this, \
                 which is why berth opens the tap itself and passes the fd)"
            }
            Some(libc::EBUSY) => {
                " (an interface with this name exists and is in use: \
                 a leftover from an earlier run? `berth destroy` removes it)"
            }
            Some(libc::EINVAL) => " (is there a non-tap interface with this name?)",
            _ => "",
        };
        VmError::Tap {
            name: name.to_string(),
            op,
            hint,
            source,
        }
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) one `struct ifreq`; `req`
    // is a properly sized, NUL-terminated (name < IFNAMSIZ) repr(C) ifreq
    // that lives across the call, and `tun` is an open /dev/net/tun fd.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
    }
    tracing::debug!(tap = name, "tap created");
    Ok(OwnedFd::from(tun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(
            std::mem::size_of::<IfReq>(),
            std::mem::size_of::<libc::ifreq>()
        );
    }

    #[test]
    fn names() {
        assert!(check_name("bt-web0").is_ok());
        assert!(check_name("123456789012345").is_ok());
        for bad in ["", "1234567890123456", "a/b", "a b", "a:1", ".."] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.to_string().contains("invalid tap name"), "{e}");
        }
        assert!(open_tap("x/y").is_err());
    }
}
