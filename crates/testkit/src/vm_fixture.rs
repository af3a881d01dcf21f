//! The cached VM fixture: Debian's kernel, a busybox initramfs and a small
//! ext4 disk image, built by `scripts/mk-vm-fixture.sh` (see that script for
//! what the guest's `/init` understands on the kernel command line).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{Result, TestkitError, fixture_dir, run, workspace_root};

/// A built VM fixture. Shared by every test: treat the files as read-only.
/// A guest that writes to its disk needs its own copy ([`VmFixture::copy_disk`])
/// or QEMU's `snapshot=on` (two QEMUs cannot open one image for writing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmFixture {
    /// The cache directory holding everything below.
    pub dir: PathBuf,
    /// `vmlinuz`: Debian's `linux-image-*-amd64` kernel.
    pub kernel: PathBuf,
    /// `initrd.img`: busybox, `/init` and the virtio/ext4 modules.
    pub initrd: PathBuf,
    /// `disk.img`: 32 MiB raw ext4 with the same root, for `berth.root=/dev/vda`.
    pub disk: PathBuf,
    /// The kernel's release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The guest runs qemu-ga on its `org.qemu.guest_agent.0` port (the
    /// host had Debian's qemu-guest-agent when the fixture was built).
    pub agent: bool,
}

impl VmFixture {
    /// Copies the disk image to `dest` (a guest of its own may write to it).
    pub fn copy_disk(&self, dest: &Path) -> Result<()> {
        std::fs::copy(&self.disk, dest)
            .map(drop)
            .map_err(|source| TestkitError::Io {
                what: format!("copying {} to {}", self.disk.display(), dest.display()),
                source,
            })
    }
}

/// Builds (once, cached under `$BERTH_FIXTURE_DIR/vm` or
/// `<workspace>/target/berth-fixtures/vm`) and returns the VM fixture. Runs
/// `scripts/mk-vm-fixture.sh` if the cache is missing or its `VERSION` does
/// not match the script's hash (or `$BERTH_FIXTURE_KERNEL_DEB`, when set).
/// Building needs `apt-get` with the Debian archive reachable (or that
/// variable), `dpkg`, `cpio`, `mke2fs` and a static `/bin/busybox`.
pub fn vm_fixture() -> Result<VmFixture> {
    static BUILT: OnceLock<Result<VmFixture, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build(&fixture_dir().join("vm")).map_err(|e| e.to_string()))
        .clone()
        .map_err(TestkitError::Fixture)
}

/// Host TSC frequency in kHz from /proc/cpuinfo (the first "cpu MHz" × 1000),
/// for the guest kernel's `tsc_early_khz=`: without it about half of all TCG
/// boots hang in TSC calibration.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz_khz(&cpuinfo)
}

/// The first `cpu MHz : 2445.428` line as kHz (2445428), decimal-exact.
fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let value = cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "cpu MHz").then(|| value.trim())
    })?;
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    let int: u64 = int.parse().ok()?;
    let mut khz = int.checked_mul(1000)?;
    let mut scale = 100;
    for c in frac.chars().take(3) {
        khz += u64::from(c.to_digit(10)?) * scale;
        scale /= 10;
    }
    (khz > 0).then_some(khz)
}

/// Whether the fixture script would put a guest agent in (see its
/// `QEMU_GA`): `$QEMU_GA`, else qemu-ga in PATH or /usr/sbin.
fn host_has_qemu_ga() -> bool {
    match std::env::var_os("QEMU_GA").filter(|v| !v.is_empty()) {
        Some(v) => v != "none",
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .chain([PathBuf::from("/usr/sbin")])
            .any(|d| d.join("qemu-ga").is_file()),
    }
}

fn script() -> PathBuf {
    workspace_root().join("scripts/mk-vm-fixture.sh")
}

/// SHA-256 of the build script, as the script writes it into `VERSION`.
fn script_hash(script: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(script))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| TestkitError::Fixture(format!("sha256sum printed {text:?}")))
}

/// Reads `dir/VERSION`: `Some(fixture)` if it was built by a script with
/// `hash` (and from the override .deb, when set) and all files are there.
fn cached(dir: &Path, hash: &str) -> Option<VmFixture> {
    let version = std::fs::read_to_string(dir.join("VERSION")).ok()?;
    let field = |key: &str| {
        version.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::to_owned)
        })
    };
    if field("script")? != hash {
        return None;
    }
    // Built before the host had qemu-ga: build again to include it.
    let agent = field("qga")? == "yes";
    if !agent && host_has_qemu_ga() {
        return None;
    }
    if let Some(deb) = std::env::var_os("BERTH_FIXTURE_KERNEL_DEB").filter(|d| !d.is_empty()) {
        let name = Path::new(&deb).file_name()?.to_string_lossy().into_owned();
        if field("deb")? != name {
            return None;
        }
    }
    let f = VmFixture {
        dir: dir.to_path_buf(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.img"),
        kernel_version: field("kernel")?,
        agent,
    };
    [&f.kernel, &f.initrd, &f.disk]
        .iter()
        .all(|p| p.is_file())
        .then_some(f)
}

/// The script builds next to `dir` and renames into place, so racing test
/// binaries each get a complete fixture.
fn build(dir: &Path) -> Result<VmFixture> {
    let script = script();
    let hash = script_hash(&script)?;
    if let Some(f) = cached(dir, &hash) {
        return Ok(f);
    }
    run(Command::new("sh").arg(&script).arg(dir))?;
    cached(dir, &hash).ok_or_else(|| {
        TestkitError::Fixture(format!(
            "{} ran but {} holds no fixture matching it",
            script.display(),
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_mhz_to_khz() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2445.428\ncache size\t: 512 KB\n\
                    processor\t: 1\ncpu MHz\t\t: 1000.000\n";
        assert_eq!(parse_cpu_mhz_khz(info), Some(2_445_428));
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : 2600.000\n"), Some(2_600_000));
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : 2600\n"), Some(2_600_000));
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : 2600.5\n"), Some(2_600_500));
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : 2600.12345\n"), Some(2_600_123));
        assert_eq!(parse_cpu_mhz_khz("model name : x\n"), None);
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : n/a\n"), None);
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : 0.000\n"), None);
    }

    #[test]
    fn host_tsc_is_plausible_when_known() {
        if let Some(khz) = host_tsc_khz() {
            assert!((100_000..100_000_000).contains(&khz), "{khz}");
        }
    }

    #[test]
    fn cache_check_follows_version_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["vmlinuz", "initrd.img", "disk.img"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::write(
            d.join("VERSION"),
            "kernel 6.1.0-9-amd64\ndeb linux-image-6.1.0-9-amd64_1_amd64.deb\nscript abc\nqga yes\n",
        )
        .unwrap();
        if std::env::var_os("BERTH_FIXTURE_KERNEL_DEB").is_none() {
            let f = cached(d, "abc").unwrap();
            assert_eq!(f.kernel_version, "6.1.0-9-amd64");
            assert_eq!(f.kernel, d.join("vmlinuz"));
            assert!(f.agent);
        }
        assert!(cached(d, "abd").is_none());
        std::fs::remove_file(d.join("disk.img")).unwrap();
        assert!(cached(d, "abc").is_none());
    }

    #[test]
    fn script_hash_is_sha256() {
        let h = script_hash(&script()).unwrap();
        assert_eq!(h.len(), 64);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
