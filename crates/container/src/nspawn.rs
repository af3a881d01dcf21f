//! systemd-nspawn command line for one container (pure).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::init::{INIT_IN_GUEST, SYNC_IN_GUEST};

/// A host path mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything the argv depends on.
#[derive(Debug, Clone)]
pub struct NspawnConfig {
    /// Machine name, `berth-<guest>`.
    pub machine: String,
    pub rootfs: PathBuf,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Host path of the static init helper.
    pub init: PathBuf,
    /// Host directory bind-mounted read-only at `/.berth` (holds `ready`).
    pub sync_dir: PathBuf,
    /// Throw-away overlay over the rootfs (`--volatile=overlay`).
    pub ephemeral: bool,
    /// Read-only rootfs (`--read-only`).
    pub read_only: bool,
    /// Host paths mounted into the container (`--bind`/`--bind-ro`).
    pub binds: Vec<BindMount>,
}

/// The argument vector, program first.
pub fn nspawn_argv(c: &NspawnConfig) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "systemd-nspawn".into(),
        "--quiet".into(),
        format!("--machine={}", c.machine),
        format!("--directory={}", c.rootfs.display()),
        // Private user namespace with an ID range nspawn picks; the rootfs is
        // id-mapped, not chowned, so one rootfs can back many containers.
        "--private-users=pick".into(),
        // A network namespace of its own with only `lo`; berth adds the veth.
        "--private-network".into(),
        "--console=pipe".into(),
        format!("--bind-ro={}:{}", c.init.display(), INIT_IN_GUEST),
        format!("--bind-ro={}:{}", c.sync_dir.display(), SYNC_IN_GUEST),
    ];
    // An init system (systemd) is PID 1 itself and halts on SIGRTMIN+3; any
    // other command runs under berth-init, which turns SIGTERM into a clean
    // stop of the command.
    let init_system = runs_init_system(&c.command);
    v.push(format!(
        "--kill-signal={}",
        if init_system { "SIGRTMIN+3" } else { "SIGTERM" }
    ));
    if c.ephemeral {
        // The rootfs is the read-only lower layer of an overlay whose upper
        // layer is a tmpfs: shareable, and nothing survives a restart.
        v.push("--volatile=overlay".into());
    } else if c.read_only {
        v.push("--read-only".into());
    }
    // Always --keep-unit: the container stays in the cgroup the shim put it
    // in (berth/<guest>: limits, kill), instead of a transient scope of its
    // own. Always --register=no: on systemd hosts the shim registers the
    // container with machined itself (berth_shim::machined), as it does
    // VMs: a registration made by nspawn with --keep-unit was dropped by
    // machined when berth.service restarted, although the container ran on.
    v.push("--keep-unit".into());
    v.push("--register=no".into());
    for b in &c.binds {
        v.push(format!(
            "--bind{}={}:{}",
            if b.read_only { "-ro" } else { "" },
            b.source.display(),
            b.target.display()
        ));
    }
    for (k, val) in &c.env {
        v.push(format!("--setenv={k}={val}"));
    }
    v.push("--".into());
    v.push(INIT_IN_GUEST.into());
    v.push(if init_system { "--exec" } else { "--supervise" }.into());
    v.extend(c.command.iter().cloned());
    v
}

/// True when the command is an init system that must be PID 1 itself.
pub fn runs_init_system(command: &[String]) -> bool {
    command.first().is_some_and(|c| {
        let base = c.rsplit('/').next().unwrap_or(c);
        base == "init" || base == "systemd"
    })
}

/// Environment nspawn needs on hybrid cgroup hosts (see DESIGN.md): without
/// it nspawn dies with "Failed to determine whether the unified cgroups
/// hierarchy is used".
pub fn nspawn_env() -> Vec<(&'static str, &'static str)> {
    vec![("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")]
}

/// True when systemd is PID 1 and the system bus is reachable, so guests
/// can be registered with machined (`machinectl` then lists them).
pub fn systemd_available() -> bool {
    systemd_available_at(Path::new("/"))
}

fn systemd_available_at(root: &Path) -> bool {
    root.join("run/systemd/system").is_dir() && root.join("run/dbus/system_bus_socket").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NspawnConfig {
        NspawnConfig {
            machine: "berth-db1".into(),
            rootfs: "/var/lib/berth/rootfs/busybox".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "httpd -f -p 80".into()],
            env: BTreeMap::from([("A".into(), "b c".into())]),
            init: "/var/lib/berth/lib/berth-init".into(),
            sync_dir: "/var/lib/berth/guests/db1/sync".into(),
            ephemeral: false,
            read_only: false,
            binds: Vec::new(),
        }
    }

    #[test]
    fn argv_runs_command_through_init_in_private_namespaces() {
        let v = nspawn_argv(&cfg());
        assert_eq!(v[0], "systemd-nspawn");
        for want in [
            "--machine=berth-db1",
            "--directory=/var/lib/berth/rootfs/busybox",
            "--private-users=pick",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--setenv=A=b c",
            "--bind-ro=/var/lib/berth/lib/berth-init:/.berth-init",
            "--bind-ro=/var/lib/berth/guests/db1/sync:/.berth",
        ] {
            assert!(v.iter().any(|a| a == want), "missing {want} in {v:?}");
        }
        let dd = v.iter().position(|a| a == "--").expect("--");
        assert_eq!(
            &v[dd + 1..],
            [
                "/.berth-init",
                "--supervise",
                "/bin/sh",
                "-c",
                "httpd -f -p 80"
            ]
        );
        assert!(v.iter().any(|a| a == "--kill-signal=SIGTERM"));
    }

    #[test]
    fn argv_rootfs_modes() {
        let mut c = cfg();
        assert!(
            !nspawn_argv(&c)
                .iter()
                .any(|a| a.starts_with("--volatile") || a == "--read-only")
        );
        c.ephemeral = true;
        assert!(nspawn_argv(&c).iter().any(|a| a == "--volatile=overlay"));
        c.ephemeral = false;
        c.read_only = true;
        assert!(nspawn_argv(&c).iter().any(|a| a == "--read-only"));
    }

    #[test]
    fn init_systems_are_execed_and_halted_with_rtmin3() {
        let mut c = cfg();
        c.command = vec!["/sbin/init".into()];
        let v = nspawn_argv(&c);
        assert!(v.iter().any(|a| a == "--kill-signal=SIGRTMIN+3"));
        assert!(v.ends_with(&["/.berth-init".into(), "--exec".into(), "/sbin/init".into()]));
        assert!(runs_init_system(&[
            "/nix/store/x-systemd/lib/systemd/systemd".into()
        ]));
        assert!(!runs_init_system(&["/bin/sh".into()]));
    }

    #[test]
    fn binds_become_nspawn_bind_options() {
        let mut c = cfg();
        c.binds = vec![
            BindMount {
                source: "/nix/store".into(),
                target: "/nix/store".into(),
                read_only: true,
            },
            BindMount {
                source: "/srv/data".into(),
                target: "/data".into(),
                read_only: false,
            },
        ];
        let v = nspawn_argv(&c);
        let dd = v.iter().position(|a| a == "--").expect("--");
        assert!(v[..dd].contains(&"--bind-ro=/nix/store:/nix/store".to_string()));
        assert!(v[..dd].contains(&"--bind=/srv/data:/data".to_string()));
    }

    #[test]
    fn argv_never_registers_nor_makes_a_scope() {
        let v = nspawn_argv(&cfg());
        assert!(v.iter().any(|a| a == "--register=no"), "the shim registers");
        assert!(
            v.iter().any(|a| a == "--keep-unit"),
            "never a scope of its own"
        );
    }

    #[test]
    fn systemd_detection_needs_both_markers() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(!systemd_available_at(d.path()));
        std::fs::create_dir_all(d.path().join("run/systemd/system")).expect("mkdir");
        assert!(!systemd_available_at(d.path()));
        std::fs::create_dir_all(d.path().join("run/dbus")).expect("mkdir");
        std::fs::write(d.path().join("run/dbus/system_bus_socket"), "").expect("touch");
        assert!(systemd_available_at(d.path()));
    }
}
