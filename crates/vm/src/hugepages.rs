//! Hugepage check for `hugepages = true` guests (2 MiB pages from the
//! hugetlbfs at /dev/hugepages, see [`crate::qemu_argv`]).

use std::path::Path;

use crate::{Result, VmError};

/// Size of the hugepages berth uses.
pub const HUGEPAGE_MIB: u64 = 2;
const SYSFS_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const MOUNT: &str = "/dev/hugepages";

/// How many 2 MiB hugepages `memory_mib` of guest RAM needs (rounded up).
pub fn hugepages_needed(memory_mib: u64) -> u64 {
    memory_mib.div_ceil(HUGEPAGE_MIB)
}

/// `Ok(())` if /dev/hugepages is a hugetlbfs and the host has enough free,
/// unreserved 2 MiB pages for `memory_mib` right now; otherwise an error
/// saying how many are needed and how to get them.
pub fn check_hugepages(memory_mib: u64) -> Result<()> {
    let read = |f: &str| -> Result<u64> {
        let path = Path::new(SYSFS_DIR).join(f);
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().map_err(|_| VmError::Parse {
                what: path.display().to_string(),
                text: s.trim().to_string(),
            }),
            // No 2 MiB hugepage support at all: treat as zero pages.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(VmError::ReadFile { path, source }),
        }
    };
    let total = read("nr_hugepages")?;
    let free = read("free_hugepages")?;
    let resv = read("resv_hugepages")?;
    check_counts(memory_mib, total, free.saturating_sub(resv))?;
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| VmError::ReadFile {
        path: "/proc/mounts".into(),
        source,
    })?;
    if !hugetlbfs_mounted(&mounts, MOUNT) {
        return Err(VmError::NoHugetlbfs { path: MOUNT });
    }
    Ok(())
}

pub(crate) fn check_counts(memory_mib: u64, total: u64, free: u64) -> Result<()> {
    let needed = hugepages_needed(memory_mib);
    if free >= needed {
        return Ok(());
    }
    Err(VmError::NotEnoughHugepages {
        memory_mib,
        needed,
        free,
        total,
        dir: SYSFS_DIR,
        suggest: total + (needed - free),
    })
}

fn hugetlbfs_mounted(mounts: &str, at: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some(at) && fstype == Some("hugetlbfs")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_needed() {
        assert_eq!(hugepages_needed(0), 0);
        assert_eq!(hugepages_needed(1), 1);
        assert_eq!(hugepages_needed(2), 1);
        assert_eq!(hugepages_needed(3), 2);
        assert_eq!(hugepages_needed(256), 128);
        assert_eq!(hugepages_needed(1025), 513);
    }

    #[test]
    fn counts() {
        assert!(check_counts(256, 128, 128).is_ok());
        assert!(check_counts(256, 512, 300).is_ok());
        let e = check_counts(256, 0, 0).expect_err("no pages");
        let msg = e.to_string();
        assert!(msg.contains("needs 128 free 2 MiB hugepages"), "{msg}");
        assert!(msg.contains("host has 0 free"), "{msg}");
        assert!(msg.contains("vm.nr_hugepages=128"), "{msg}");
        assert!(msg.contains(SYSFS_DIR), "{msg}");
        // 100 in the pool, 40 free: 88 more are needed on top of the 100.
        let msg = check_counts(256, 100, 40).expect_err("short").to_string();
        assert!(msg.contains("host has 40 free of 100"), "{msg}");
        assert!(msg.contains("vm.nr_hugepages=188"), "{msg}");
    }

    #[test]
    fn mount_detection() {
        let m = "proc /proc proc rw 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n";
        assert!(hugetlbfs_mounted(m, "/dev/hugepages"));
        assert!(!hugetlbfs_mounted(
            "tmpfs /dev/hugepages tmpfs rw 0 0\n",
            "/dev/hugepages"
        ));
        assert!(!hugetlbfs_mounted("", "/dev/hugepages"));
    }

    #[test]
    fn check_on_this_host_does_not_panic() {
        let _ = check_hugepages(128);
    }
}
