//! Accelerator choice: KVM probe, `auto|kvm|tcg` resolution, host TSC.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{Accel, Result, VmError};

/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

/// `Ok(())` when KVM can create a VM here: /dev/kvm opens read-write, reports
/// API version 12, and `KVM_CREATE_VM` succeeds (the VM is closed at once).
/// `Err` says why not. Never panics.
///
/// This cannot tell that a *nested* KVM will hang a guest (as on berth's CI
/// machine); there, set `BERTH_ACCEL=tcg`.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // `kvm` is an open /dev/kvm descriptor for the duration of the call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        return Err(format!(
            "KVM_GET_API_VERSION on /dev/kvm failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if version != KVM_API_VERSION {
        return Err(format!(
            "/dev/kvm reports API version {version}, expected {KVM_API_VERSION}"
        ));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0 = default) by value
    // and returns a new descriptor or -1; no memory is passed.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0 as libc::c_ulong) };
    if vm < 0 {
        return Err(format!(
            "KVM_CREATE_VM failed: {} (is virtualisation enabled in firmware, \
             or is another hypervisor holding VT-x/AMD-V?)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `vm` is a descriptor KVM_CREATE_VM just returned to us and
    // nothing else owns; dropping the OwnedFd closes it (destroying the VM).
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// Resolves the accelerator: the spec's `auto|kvm|tcg`, overridden by
/// `env` (the value of `BERTH_ACCEL`, if set and not empty). `auto` picks
/// KVM when [`kvm_usable`], else TCG; an explicit `kvm` that is not usable is
/// an error carrying the probe's reason.
pub fn resolve_accel(spec: &str, env: Option<&str>) -> Result<Accel> {
    resolve_accel_with(spec, env, kvm_usable)
}

pub(crate) fn resolve_accel_with(
    spec: &str,
    env: Option<&str>,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<Accel> {
    let (value, origin) = match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => (v, "BERTH_ACCEL"),
        None => (spec.trim(), "the spec's accel"),
    };
    match value.to_ascii_lowercase().as_str() {
        "tcg" => Ok(Accel::Tcg),
        "kvm" => probe()
            .map(|()| Accel::Kvm)
            .map_err(|reason| VmError::KvmUnusable { origin, reason }),
        "auto" | "" => match probe() {
            Ok(()) => Ok(Accel::Kvm),
            Err(reason) => {
                tracing::info!(%reason, "KVM not usable, falling back to TCG");
                Ok(Accel::Tcg)
            }
        },
        _ => Err(VmError::BadAccel {
            value: value.to_string(),
            origin,
        }),
    }
}

/// The host's TSC frequency in kHz, from the first "cpu MHz" line of
/// /proc/cpuinfo (e.g. `2445.428` -> 2445428), for the guest kernel's
/// `tsc_early_khz=` under TCG. `None` if it cannot be read.
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpuinfo_khz(&text)
}

pub(crate) fn parse_cpuinfo_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let value = line.split_once(':')?.1.trim();
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    let int: u64 = int.parse().ok()?;
    // Exactly three fractional digits, without going through floats.
    let mut milli = 0u64;
    let mut digits = frac.chars();
    for _ in 0..3 {
        let d = match digits.next() {
            Some(ch) => u64::from(ch.to_digit(10)?),
            None => 0,
        };
        milli = milli * 10 + d;
    }
    let khz = int.checked_mul(1000)?.checked_add(milli)?;
    (khz > 0).then_some(khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<(), String> {
        Ok(())
    }
    fn no() -> Result<(), String> {
        Err("cannot open /dev/kvm: No such file or directory".into())
    }

    #[test]
    fn accel_table() {
        use Accel::*;
        let cases: &[(&str, Option<&str>, bool, Option<Accel>)] = &[
            ("auto", None, true, Some(Kvm)),
            ("auto", None, false, Some(Tcg)),
            ("tcg", None, true, Some(Tcg)),
            ("kvm", None, true, Some(Kvm)),
            ("kvm", None, false, None),
            // The environment wins over the spec.
            ("kvm", Some("tcg"), false, Some(Tcg)),
            ("tcg", Some("kvm"), true, Some(Kvm)),
            ("tcg", Some("kvm"), false, None),
            ("tcg", Some("auto"), true, Some(Kvm)),
            ("kvm", Some("auto"), false, Some(Tcg)),
            // Empty env counts as unset.
            ("tcg", Some(""), true, Some(Tcg)),
            ("TCG", None, true, Some(Tcg)),
            ("xen", None, true, None),
            ("tcg", Some("hvf"), true, None),
        ];
        for &(spec, env, usable, want) in cases {
            let got = resolve_accel_with(spec, env, if usable { ok } else { no });
            match (want, got) {
                (Some(w), Ok(g)) => assert_eq!(w, g, "{spec} {env:?} {usable}"),
                (None, Err(_)) => {}
                (w, g) => panic!("{spec} {env:?} {usable}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn accel_errors_say_where_and_why() {
        let e = resolve_accel_with("kvm", None, no).expect_err("unusable");
        let msg = e.to_string();
        assert!(msg.contains("spec"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        assert!(msg.contains("tcg"), "{msg}");
        let e = resolve_accel_with("auto", Some("hvf"), ok).expect_err("bad");
        let msg = e.to_string();
        assert!(
            msg.contains("`hvf`") && msg.contains("BERTH_ACCEL"),
            "{msg}"
        );
    }

    #[test]
    fn cpuinfo_khz() {
        let text = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2445.428\ncache size\t: 1\n";
        assert_eq!(parse_cpuinfo_khz(text), Some(2_445_428));
        assert_eq!(parse_cpuinfo_khz("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(parse_cpuinfo_khz("cpu MHz : 1999.9\n"), Some(1_999_900));
        assert_eq!(parse_cpuinfo_khz("cpu MHz : 1999.99999\n"), Some(1_999_999));
        assert_eq!(parse_cpuinfo_khz("model name : X\n"), None);
        assert_eq!(parse_cpuinfo_khz("cpu MHz : fast\n"), None);
    }

    #[test]
    fn probes_do_not_panic() {
        let _ = kvm_usable();
        if std::path::Path::new("/proc/cpuinfo").exists() {
            // Some virtual CPUs (and non-x86 hosts) have no "cpu MHz" line.
            let _ = host_tsc_khz();
        }
    }
}
