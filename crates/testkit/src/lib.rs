//! Helpers for berth's end-to-end tests: capability probes that skip out
//! loud, a throwaway two-namespace network ([`TestNet`]), a cached busybox
//! rootfs fixture, and polling.
//!
//! Network rule: everything here happens inside network namespaces the test
//! creates and always deletes; nothing touches the machine's own interfaces,
//! routes, sysctls or firewall.

mod fixture;
mod load;
mod net;
mod vm_fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use fixture::{busybox_rootfs, copy_busybox_rootfs, fixture_dir, try_busybox_rootfs};
pub use load::{Load, LoadReport, Sample, get};
pub use net::{INTERNET_BODY, TestNet, in_netns, netns_pids};
pub use vm_fixture::{VmFixture, host_tsc_khz, vm_fixture};

/// Errors from testkit helpers.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("bad TestNet tag `{0}`: use 1-10 chars of [a-z0-9-] (netns and veth names stay <= 15)")]
    BadTag(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Fixture(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Something an e2e test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cap {
    /// Effective uid 0.
    Root,
    /// `ip` is present and can create and delete a network namespace.
    Netns,
    /// `systemd-nspawn --version` works.
    Nspawn,
    /// `nft --version` works.
    Nft,
    /// `qemu-system-x86_64 --version` works.
    Qemu,
    /// `curl --version` works.
    Curl,
    /// A static busybox at /bin/busybox (busybox-static), needed by
    /// [`TestNet`] and [`busybox_rootfs`].
    Busybox,
    /// `nix-store --version` works (Debian: nix-bin).
    Nix,
    /// systemd, D-Bus and machined are installed, so a container can boot
    /// systemd as its PID 1 (packages systemd, dbus, systemd-container).
    SystemdBoot,
}

impl Cap {
    const ALL: [Cap; 9] = [
        Cap::Root,
        Cap::Netns,
        Cap::Nspawn,
        Cap::Nft,
        Cap::Qemu,
        Cap::Curl,
        Cap::Busybox,
        Cap::Nix,
        Cap::SystemdBoot,
    ];

    fn slot(self) -> usize {
        Cap::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// `Ok(())` if present, else why not. Probed once per process.
    pub fn check(self) -> Result<(), String> {
        static CACHE: [OnceLock<Result<(), String>>; 9] = [const { OnceLock::new() }; 9];
        CACHE[self.slot()].get_or_init(|| self.probe()).clone()
    }

    fn probe(self) -> Result<(), String> {
        match self {
            Cap::Root => {
                let euid = euid();
                if euid == 0 {
                    Ok(())
                } else {
                    Err(format!("not root (euid {euid})"))
                }
            }
            Cap::Netns => probe_netns(),
            Cap::Nspawn => probe_version("systemd-nspawn"),
            Cap::Nft => probe_version("nft"),
            Cap::Qemu => probe_version("qemu-system-x86_64"),
            Cap::Curl => probe_version("curl"),
            Cap::Nix => probe_version("nix-store"),
            Cap::SystemdBoot => probe_systemd_boot(),
            Cap::Busybox => {
                if Path::new("/bin/busybox").is_file() {
                    Ok(())
                } else {
                    Err("no /bin/busybox (install busybox-static)".into())
                }
            }
        }
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn probe_systemd_boot() -> Result<(), String> {
    let any = |paths: &[&str]| paths.iter().any(|p| Path::new(p).exists());
    let missing: Vec<&str> = [
        (
            "systemd",
            any(&["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]),
        ),
        (
            "systemd-machined",
            any(&[
                "/usr/lib/systemd/systemd-machined",
                "/lib/systemd/systemd-machined",
            ]),
        ),
        (
            "dbus-daemon",
            any(&["/usr/bin/dbus-daemon", "/bin/dbus-daemon"]),
        ),
        ("busctl", any(&["/usr/bin/busctl", "/bin/busctl"])),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(what, _)| what)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "cannot boot systemd in a container: no {} (install systemd dbus systemd-container)",
            missing.join(", ")
        ))
    }
}

fn probe_version(program: &str) -> Result<(), String> {
    probe_flag(program, "--version")
}

fn probe_flag(program: &str, flag: &str) -> Result<(), String> {
    match Command::new(program)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{program} {flag}` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("no {program} in PATH")),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

fn probe_netns() -> Result<(), String> {
    Cap::Root.check()?;
    probe_flag("ip", "-V").map_err(|e| format!("{e} (iproute2)"))?;
    let name = format!("bt-probe-{:x}", std::process::id());
    let added = run(Command::new("ip").args(["netns", "add", &name]));
    let deleted = run(Command::new("ip").args(["netns", "del", &name]));
    added.map_err(|e| format!("cannot create a network namespace: {e}"))?;
    deleted.map_err(|e| format!("cannot delete a network namespace: {e}"))?;
    Ok(())
}

/// Checks `caps` for `test`. If one is missing, prints `skip <test>: <reason>`
/// to stderr and returns false, so the test can return early; with
/// `BERTH_E2E_REQUIRED=1` it panics with that reason instead.
///
/// ```no_run
/// # use berth_testkit::{require, Cap};
/// if !require("nspawn_boots", &[Cap::Root, Cap::Nspawn]) {
///     return;
/// }
/// ```
pub fn require(test: &str, caps: &[Cap]) -> bool {
    for cap in caps {
        if let Err(reason) = cap.check() {
            if std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1") {
                panic!(
                    "{test}: required capability {cap:?} missing: {reason} (BERTH_E2E_REQUIRED=1)"
                );
            }
            eprintln!("skip {test}: {reason}");
            return false;
        }
    }
    true
}

/// Calls `f` every `every` until it returns `Some` or `timeout` has passed
/// (then `None`). `f` runs at least once, and once more at the deadline.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline - now));
    }
}

/// A short tag unique among parallel tests: `prefix` plus 4 hex digits from
/// the pid and the clock (once per process) plus a per-process counter
/// (distinct within a process).
pub fn unique_tag(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    static SEED: OnceLock<u32> = OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0);
        let s = std::process::id().wrapping_mul(0x9e37_79b9) ^ nanos.rotate_left(7);
        s ^ (s >> 16)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Fixed seed per process + an odd multiple of the counter: distinct
    // within a process for 65536 calls.
    let v = seed.wrapping_add(n.wrapping_mul(0x9e37)) & 0xffff;
    format!("{prefix}{v:04x}")
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// Renders a command for messages: program and arguments.
pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` (stdin null), returns its output if it exited 0.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestkitError::Spawn {
            cmd: show(cmd),
            source,
        })?;
    if !out.status.success() {
        return Err(TestkitError::Command {
            cmd: show(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_tags_differ() {
        let tags: std::collections::HashSet<_> = (0..1000).map(|_| unique_tag("t")).collect();
        assert_eq!(tags.len(), 1000);
        assert_eq!(unique_tag("ab").len(), 6);
    }

    #[test]
    fn wait_until_polls_and_times_out() {
        let mut n = 0;
        let got = wait_until(Duration::from_secs(2), Duration::from_millis(1), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, Some(3));
        let start = Instant::now();
        let got: Option<()> =
            wait_until(Duration::from_millis(50), Duration::from_millis(10), || {
                None
            });
        assert!(got.is_none());
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn workspace_root_has_scripts() {
        let root = workspace_root();
        assert!(root.join("Cargo.toml").is_file(), "{}", root.display());
        assert!(root.join("scripts/mk-busybox-rootfs.sh").is_file());
    }

    #[test]
    fn root_probe_matches_euid() {
        assert_eq!(Cap::Root.check().is_ok(), euid() == 0);
    }
}
