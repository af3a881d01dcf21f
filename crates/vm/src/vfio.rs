//! VFIO PCI passthrough: is a device ready to be handed to QEMU
//! (`-device vfio-pci,host=ADDR`), and binding it to vfio-pci.
//!
//! Everything reads (and, to bind, writes) sysfs below a root given by the
//! caller (`/sys` on a host, a fake tree in tests):
//!
//! ```text
//! bus/pci/devices/ADDR/driver        -> .../drivers/NAME  (absent: no driver)
//! bus/pci/devices/ADDR/iommu_group   -> .../kernel/iommu_groups/N  (absent: IOMMU off)
//! kernel/iommu_groups/N/devices/*    every device of the group
//! bus/pci/devices/ADDR/class         0x060400 for a PCI bridge
//! bus/pci/drivers/vfio-pci           present once the vfio-pci module is loaded
//! ```
//!
//! A device can be passed through when it is bound to vfio-pci and every
//! other device in its IOMMU group is bound to vfio-pci too, or has no
//! driver, or is a PCI bridge (pcieport) or held by pci-stub: the kernel
//! refuses to open a group any of whose devices a host driver still owns.
//! A real host needs the IOMMU on (`intel_iommu=on` or `amd_iommu=on` on
//! the kernel command line; many distributions enable it by default on AMD)
//! and the modules vfio, vfio_iommu_type1 and vfio-pci.

use std::path::{Path, PathBuf};

/// The driver a passed-through device must be bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

fn dev_dir(sysfs: &Path, pci: &str) -> PathBuf {
    sysfs.join("bus/pci/devices").join(pci)
}

/// Name of the driver `pci` is bound to, if any.
pub fn pci_driver(sysfs: &Path, pci: &str) -> Option<String> {
    std::fs::read_link(dev_dir(sysfs, pci).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The IOMMU group of `pci`, if the IOMMU is on.
pub fn iommu_group(sysfs: &Path, pci: &str) -> Option<String> {
    std::fs::read_link(dev_dir(sysfs, pci).join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn is_bridge(sysfs: &Path, pci: &str) -> bool {
    std::fs::read_to_string(dev_dir(sysfs, pci).join("class"))
        .is_ok_and(|c| c.trim().to_ascii_lowercase().starts_with("0x0604"))
}

/// Devices of IOMMU group `group`, sorted.
fn group_devices(sysfs: &Path, group: &str) -> Vec<String> {
    let dir = sysfs
        .join("kernel/iommu_groups")
        .join(group)
        .join("devices");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Why `pci` cannot be passed through now, or `None` if it can. With
/// `bind`, a device still bound to a host driver is fine (berth binds it at
/// start) as long as vfio-pci is available; the rest of its IOMMU group
/// must be ready regardless (berth binds only the device it was given).
pub fn vfio_problem(sysfs: &Path, pci: &str, bind: bool) -> Option<String> {
    if !dev_dir(sysfs, pci).exists() {
        return Some(format!(
            "PCI device {pci} does not exist on this host (no {}; list devices with `lspci -D`)",
            dev_dir(sysfs, pci).display()
        ));
    }
    let Some(group) = iommu_group(sysfs, pci) else {
        return Some(format!(
            "PCI device {pci} has no IOMMU group: the IOMMU is off. Boot the host with intel_iommu=on (Intel) or amd_iommu=on (AMD), with VT-d/AMD-Vi enabled in the firmware, and load the vfio-pci module"
        ));
    };
    let blocking: Vec<String> = group_devices(sysfs, &group)
        .into_iter()
        .filter(|d| d != pci)
        .filter_map(|d| {
            let drv = pci_driver(sysfs, &d);
            let ok = match drv.as_deref() {
                None | Some(VFIO_DRIVER) | Some("pci-stub") => true,
                Some("pcieport") => true,
                Some(_) => is_bridge(sysfs, &d),
            };
            (!ok).then(|| format!("{d} (bound to {})", drv.unwrap_or_default()))
        })
        .collect();
    if !blocking.is_empty() {
        return Some(format!(
            "IOMMU group {group} of {pci} is not complete: it also holds {}, which the host still drives; every device of a group must be bound to vfio-pci (or have no driver) before one is passed through. Pass those through too (another `vfio` nic), or bind them to vfio-pci",
            blocking.join(", ")
        ));
    }
    match pci_driver(sysfs, pci) {
        Some(d) if d == VFIO_DRIVER => None,
        other if bind => {
            if sysfs.join("bus/pci/drivers").join(VFIO_DRIVER).exists() {
                None
            } else {
                Some(format!(
                    "PCI device {pci} is bound to {}, and `bind = true` needs the vfio-pci driver, which is not loaded (modprobe vfio-pci)",
                    other.as_deref().unwrap_or("no driver")
                ))
            }
        }
        Some(d) => Some(format!(
            "PCI device {pci} is bound to `{d}`, not vfio-pci: bind it to vfio-pci (e.g. `driverctl set-override {pci} vfio-pci`, or vfio-pci.ids= on the kernel command line), or set `bind = true` and berth takes it from the host at start"
        )),
        None => Some(format!(
            "PCI device {pci} has no driver: bind it to vfio-pci (`driverctl set-override {pci} vfio-pci`), or set `bind = true`"
        )),
    }
}

/// Binds `pci` to vfio-pci (driver_override, unbind from its current
/// driver, drivers_probe). No-op if it already is. Errors name the sysfs
/// file that refused.
pub fn bind_vfio(sysfs: &Path, pci: &str) -> Result<(), String> {
    if pci_driver(sysfs, pci).as_deref() == Some(VFIO_DRIVER) {
        return Ok(());
    }
    let write = |p: PathBuf, v: &str| {
        std::fs::write(&p, v).map_err(|e| {
            format!(
                "binding {pci} to vfio-pci: writing {v:?} to {}: {e}",
                p.display()
            )
        })
    };
    let dir = dev_dir(sysfs, pci);
    write(dir.join("driver_override"), VFIO_DRIVER)?;
    if dir.join("driver").exists() {
        write(dir.join("driver/unbind"), pci)?;
    }
    write(sysfs.join("bus/pci/drivers_probe"), pci)?;
    tracing::info!(pci, "bound to vfio-pci");
    Ok(())
}

/// The group's device node QEMU opens (`/dev/vfio/<group>`).
pub fn vfio_group_node(sysfs: &Path, pci: &str) -> Option<PathBuf> {
    iommu_group(sysfs, pci).map(|g| Path::new("/dev/vfio").join(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: devices with drivers, IOMMU groups and classes.
    struct Sys(tempfile::TempDir);

    impl Sys {
        fn new() -> Sys {
            let t = tempfile::tempdir().expect("tempdir");
            for d in [
                "bus/pci/devices",
                "bus/pci/drivers/igb",
                "kernel/iommu_groups",
            ] {
                std::fs::create_dir_all(t.path().join(d)).expect("mkdir");
            }
            std::fs::write(t.path().join("bus/pci/drivers_probe"), "").expect("write");
            Sys(t)
        }
        fn root(&self) -> &Path {
            self.0.path()
        }
        fn driver(&self, name: &str) {
            std::fs::create_dir_all(self.root().join("bus/pci/drivers").join(name)).expect("mkdir");
        }
        fn device(&self, pci: &str, driver: Option<&str>, group: Option<&str>, class: &str) {
            let d = self.root().join("bus/pci/devices").join(pci);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("class"), class).expect("class");
            std::fs::write(d.join("driver_override"), "(null)").expect("override");
            if let Some(drv) = driver {
                self.driver(drv);
                let target = self.root().join("bus/pci/drivers").join(drv);
                symlink(&target, d.join("driver")).expect("driver link");
                std::fs::write(target.join("unbind"), "").expect("unbind");
            }
            if let Some(g) = group {
                let gd = self
                    .root()
                    .join("kernel/iommu_groups")
                    .join(g)
                    .join("devices");
                std::fs::create_dir_all(&gd).expect("group");
                symlink(&d, gd.join(pci)).expect("member");
                symlink(
                    self.root().join("kernel/iommu_groups").join(g),
                    d.join("iommu_group"),
                )
                .expect("group link");
            }
        }
    }

    const NIC: &str = "0x020000";

    #[test]
    fn missing_device() {
        let s = Sys::new();
        let e = vfio_problem(s.root(), "0000:03:00.0", false).expect("problem");
        assert!(e.contains("0000:03:00.0 does not exist"), "{e}");
    }

    #[test]
    fn no_iommu() {
        let s = Sys::new();
        s.device("0000:03:00.0", Some("igb"), None, NIC);
        let e = vfio_problem(s.root(), "0000:03:00.0", true).expect("problem");
        assert!(
            e.contains("no IOMMU group") && e.contains("intel_iommu=on"),
            "{e}"
        );
    }

    #[test]
    fn not_bound_to_vfio() {
        let s = Sys::new();
        s.device("0000:03:00.0", Some("igb"), Some("7"), NIC);
        let e = vfio_problem(s.root(), "0000:03:00.0", false).expect("problem");
        assert!(
            e.contains("bound to `igb`, not vfio-pci") && e.contains("bind = true"),
            "{e}"
        );
        // bind = true needs the driver loaded.
        let e = vfio_problem(s.root(), "0000:03:00.0", true).expect("problem");
        assert!(e.contains("modprobe vfio-pci"), "{e}");
        s.driver(VFIO_DRIVER);
        assert_eq!(vfio_problem(s.root(), "0000:03:00.0", true), None);
    }

    #[test]
    fn incomplete_group() {
        let s = Sys::new();
        s.device("0000:03:00.0", Some(VFIO_DRIVER), Some("7"), NIC);
        s.device("0000:03:00.1", Some("igb"), Some("7"), NIC);
        s.device("0000:00:01.0", Some("pcieport"), Some("7"), "0x060400");
        let e = vfio_problem(s.root(), "0000:03:00.0", false).expect("problem");
        assert!(
            e.contains("IOMMU group 7") && e.contains("0000:03:00.1 (bound to igb)"),
            "{e}"
        );
        assert!(!e.contains("0000:00:01.0"), "a bridge is fine: {e}");
        // Even with bind = true: berth binds only the device it was given.
        assert!(vfio_problem(s.root(), "0000:03:00.0", true).is_some());
    }

    #[test]
    fn ready_device_and_group() {
        let s = Sys::new();
        s.device("0000:03:00.0", Some(VFIO_DRIVER), Some("7"), NIC);
        s.device("0000:03:00.1", None, Some("7"), NIC);
        assert_eq!(vfio_problem(s.root(), "0000:03:00.0", false), None);
        assert_eq!(
            vfio_group_node(s.root(), "0000:03:00.0"),
            Some(PathBuf::from("/dev/vfio/7"))
        );
    }

    #[test]
    fn bind_writes_override_unbind_and_probe() {
        let s = Sys::new();
        s.device("0000:03:00.0", Some("igb"), Some("7"), NIC);
        bind_vfio(s.root(), "0000:03:00.0").expect("bind");
        let read = |p: &str| std::fs::read_to_string(s.root().join(p)).expect("read");
        assert_eq!(
            read("bus/pci/devices/0000:03:00.0/driver_override"),
            "vfio-pci"
        );
        assert_eq!(read("bus/pci/drivers/igb/unbind"), "0000:03:00.0");
        assert_eq!(read("bus/pci/drivers_probe"), "0000:03:00.0");
    }
}
