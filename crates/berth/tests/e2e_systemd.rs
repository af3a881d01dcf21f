//! berth on a systemd host, end to end: a container that boots the host's
//! own systemd as PID 1 (`systemd-nspawn -b` over a throw-away overlay of
//! `/`, in a private network namespace) runs berth's daemon under
//! `contrib/systemd/berth.service`: `Type=notify` readiness, each guest in
//! a scope of its own (`machine.slice/berth-<guest>.scope`), a container and
//! a microVM registered with systemd-machined (`machinectl list`), and
//! guests that outlive `systemctl restart` and a kill -9 of the daemon,
//! still registered.
//!
//! The build machine has no systemd as PID 1; this is how the systemd
//! integration gets tested on it anyway. On a systemd host it runs the same.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;

use berth_testkit::{Cap, busybox_rootfs, require, unique_tag, vm_fixture, wait_until};

const CAPS: &[Cap] = &[
    Cap::Root,
    Cap::Nspawn,
    Cap::SystemdBoot,
    Cap::Qemu,
    Cap::Busybox,
];
const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// A booted systemd container; killed and unmounted on drop, even when the
/// test fails.
struct SystemdBox {
    nspawn: Child,
    /// systemd, the container's PID 1, as the host sees it.
    leader: i32,
    /// The bind mount of `/` the container's overlay sits on.
    root: PathBuf,
    log: PathBuf,
}

impl SystemdBox {
    fn boot(tag: &str, binds: &[String]) -> SystemdBox {
        let root = std::env::temp_dir().join(format!("berth-sysroot-{tag}"));
        std::fs::create_dir_all(&root).expect("mkdir sysroot");
        // nspawn refuses `/` itself as the directory; a bind mount of it is
        // fine, and --volatile=overlay keeps every write in a tmpfs.
        let st = Command::new("mount")
            .args(["--bind", "/"])
            .arg(&root)
            .status()
            .expect("mount");
        assert!(st.success(), "mount --bind / {}", root.display());
        let log = std::env::temp_dir().join(format!("berth-sysroot-{tag}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg(format!("--directory={}", root.display()))
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
                "--quiet",
            ])
            .arg(format!("--machine=bsys-{tag}"))
            .args(binds)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        let nspawn = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = Command::new("umount").arg("-l").arg(&root).status();
                panic!("systemd-nspawn: {e}");
            }
        };
        let mut b = SystemdBox {
            nspawn,
            leader: 0,
            root,
            log,
        };
        let parent = b.nspawn.id().to_string();
        let leader = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let out = Command::new("pgrep").args(["-P", &parent]).output().ok()?;
            let pid: i32 = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        b.leader = leader.unwrap_or_else(|| panic!("systemd did not start:\n{}", b.boot_log()));
        // Boot has finished when systemd says running, or degraded when
        // some unit of the host's failed in the container. Early on its
        // bus socket does not exist yet and systemctl fails: ask again.
        let mut last = String::new();
        let booted = wait_until(Duration::from_secs(90), Duration::from_millis(250), || {
            let out = b.sh("systemctl is-system-running");
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (last == "running" || last == "degraded").then_some(())
        });
        assert!(
            booted.is_some(),
            "systemd in the container did not finish booting: {last}\n{}",
            b.boot_log()
        );
        b
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `script` with sh inside the container (all its namespaces).
    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .env("BERTH_SOCKET", "/run/berth/berth.sock")
            .output()
            .expect("nsenter")
    }

    /// [`Self::sh`] that must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed: {}{}\nberth.service:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self) -> String {
        let out = self.sh("journalctl -u berth.service --no-pager | tail -40");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `machinectl list` lines: (machine, class).
    fn machines(&self) -> Vec<(String, String)> {
        let out = self.sh("machinectl list --no-legend");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    }

    /// Waits up to `secs` until machinectl lists exactly `want` (sorted).
    fn wait_machines(&self, want: &[(&str, &str)], secs: u64, why: &str) {
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(m, c)| (m.to_string(), c.to_string()))
            .collect();
        let got = wait_until(
            Duration::from_secs(secs),
            Duration::from_millis(250),
            || {
                let mut m = self.machines();
                m.sort();
                (m == want).then_some(())
            },
        );
        assert!(
            got.is_some(),
            "{why}: machinectl lists {:?}, want {want:?}\nberth.service:\n{}",
            self.machines(),
            self.journal()
        );
    }

    /// The guests' PIDs from `berth ps --json`.
    fn pids(&self) -> Vec<(String, i64)> {
        let out = self.ok("berth ps --json");
        let v: serde_json::Value = serde_json::from_str(&out).expect("ps --json");
        let mut pids: Vec<(String, i64)> = v
            .as_array()
            .expect("array")
            .iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap_or_default().to_string(),
                    g["pid"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        pids.sort();
        pids
    }

    /// Shuts the container down cleanly (the guests inside go with it).
    fn poweroff(&mut self) {
        let _ = self.sh("systemctl poweroff --no-block");
        let done = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            self.nspawn.try_wait().ok().flatten()
        });
        assert!(done.is_some(), "the systemd container did not power off");
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_none() {
            // PID 1 of the container's PID namespace: killing it ends
            // everything inside (daemon, supervisors, QEMU, containers).
            if self.leader > 0 {
                let _ = Command::new("kill")
                    .args(["-9", &self.leader.to_string()])
                    .status();
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.root).status();
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd/berth.service")
}

#[test]
fn daemon_under_systemd_notify_delegation_machined_restarts() {
    if !require(
        "daemon_under_systemd_notify_delegation_machined_restarts",
        CAPS,
    ) {
        return;
    }
    let rootfs = busybox_rootfs();
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("sd");
    let work = std::env::temp_dir().join(format!("berth-sd-{tag}"));
    std::fs::create_dir_all(&work).expect("work dir");
    let (c, v) = (format!("{tag}-c"), format!("{tag}-v"));
    let spec = format!(
        "[host]\nuplink = \"up0\"\nsubnet4 = \"10.77.0.0/24\"\nsubnet6 = \"fd42:77::/64\"\n\n\
         [guest.{c}]\nkind = \"container\"\nindex = 2\nrootfs = \"{}\"\n\
         command = [\"/bin/sh\", \"-c\", \"exec httpd -f -p 80 -h /www\"]\nephemeral = true\nmemory = \"128M\"\n\n\
         [guest.{v}]\nkind = \"vm\"\nindex = 3\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = \"console=ttyS0 panic=-1\"\nmemory = \"256M\"\nstop_timeout = \"2s\"\n",
        rootfs.display(),
        fx.kernel.display(),
        fx.initrd.display()
    );
    std::fs::write(work.join("spec.toml"), spec).expect("spec");
    std::fs::copy(unit_file(), work.join("berth.service")).expect("unit file");

    // The overlay shows the host's files as they were when it was mounted:
    // bind what the test built or wrote, so the container sees it as is.
    let binds = vec![
        format!("--bind-ro={BIN}:/usr/local/bin/berth"),
        format!("--bind-ro={}", rootfs.display()),
        format!("--bind-ro={}", fx.dir.display()),
        format!("--bind-ro={}:/srv/berth-test", work.display()),
    ];
    let mut sys = SystemdBox::boot(&tag, &binds);

    // The uplink: one end of a veth pair in the container's own netns.
    sys.ok("ip link add up0 type veth peer name up0p && ip addr add 192.0.2.1/24 dev up0 && ip link set up0 up && ip link set up0p up && ip link set lo up");
    sys.ok("cp /srv/berth-test/berth.service /etc/systemd/system/ && systemctl daemon-reload");

    // Type=notify: `systemctl start` returns once the daemon said READY=1.
    sys.ok("systemctl start berth.service");
    let show = sys.ok("systemctl show -p ActiveState -p SubState -p StatusText berth.service");
    assert!(
        show.contains("ActiveState=active") && show.contains("SubState=running"),
        "{show}"
    );
    assert!(show.contains("StatusText=serving on"), "{show}");

    let out = sys.ok("berth apply --yes /srv/berth-test/spec.toml");
    assert!(out.contains("applied"), "{out}");
    let (mc, mv) = (format!("berth-{c}"), format!("berth-{v}"));
    let want = [(mc.as_str(), "container"), (mv.as_str(), "vm")];
    let mut want_sorted = want.to_vec();
    want_sorted.sort();
    sys.wait_machines(&want_sorted, 15, "after apply");

    // machined knows the right processes, and each guest lives in its own
    // scope (berth.service/... would be restarted with the daemon).
    let pids = sys.pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    for (guest, pid) in &pids {
        assert!(*pid > 0, "{guest} has no pid: {pids:?}");
        let leader = sys.ok(&format!("machinectl show -p Leader --value berth-{guest}"));
        assert_eq!(
            leader.trim(),
            pid.to_string(),
            "machined's leader of {guest}"
        );
        let unit = sys.ok(&format!("machinectl show -p Unit --value berth-{guest}"));
        assert_eq!(
            unit.trim(),
            format!("berth-{guest}.scope"),
            "{guest}'s unit"
        );
        let cg = sys.ok(&format!("cat /proc/{pid}/cgroup"));
        let want = format!("/machine.slice/berth-{guest}.scope/berth/{guest}");
        assert!(
            cg.lines()
                .any(|l| l.starts_with("0::") && l.contains(&want)),
            "{guest} is not in {want}:\n{cg}"
        );
        let active = sys.ok(&format!("systemctl is-active berth-{guest}.scope"));
        assert_eq!(active.trim(), "active");
    }

    // The container answers at once; the TCG VM once it has booted.
    let body = sys.ok("curl -sS --max-time 5 http://10.77.0.2/");
    assert!(body.contains("berth-fixture"), "{body}");
    let vm_up = wait_until(Duration::from_secs(240), Duration::from_secs(1), || {
        let out = sys.sh("curl -sS --max-time 3 http://10.77.0.3/");
        (out.status.success() && !out.stdout.is_empty()).then_some(())
    });
    assert!(vm_up.is_some(), "the VM did not answer\n{}", sys.journal());

    // A restart of the daemon keeps the guests (not in its unit) and their
    // registration (their units are their scopes).
    for _ in 0..2 {
        sys.ok("systemctl restart berth.service");
        assert_eq!(sys.pids(), pids, "guests were restarted with the daemon");
        sys.wait_machines(&want_sorted, 15, "after systemctl restart berth");
    }

    // kill -9 of the daemon: systemd restarts it (Restart=always), the new
    // one re-adopts the guests.
    sys.ok("systemctl kill -s KILL --kill-whom=main berth.service");
    let back = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let s = sys.sh("systemctl show -p NRestarts -p ActiveState berth.service");
        let s = String::from_utf8_lossy(&s.stdout).into_owned();
        (s.contains("ActiveState=active") && !s.contains("NRestarts=0")).then_some(())
    });
    assert!(
        back.is_some(),
        "berth.service not back after kill -9\n{}",
        sys.journal()
    );
    assert_eq!(
        sys.pids(),
        pids,
        "guests were restarted after the daemon's kill -9"
    );
    sys.wait_machines(&want_sorted, 15, "after kill -9 of the daemon");
    let body = sys.ok("curl -sS --max-time 5 http://10.77.0.2/");
    assert!(body.contains("berth-fixture"), "{body}");

    // kill -9 of a supervisor: its container runs on in its scope; the
    // next daemon start gives it a new supervisor that joins that scope
    // (no second scope), ends the orphaned processes and starts it again.
    let ps = sys.ok("berth ps --json");
    let v: serde_json::Value = serde_json::from_str(&ps).expect("ps --json");
    let shim = v
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == c.as_str()))
        .and_then(|g| g["shim_pid"].as_i64())
        .expect("container's shim pid");
    sys.ok(&format!("kill -9 {shim}"));
    sys.ok("systemctl restart berth.service");
    let restarted = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let now = sys.pids();
        let pid = now.iter().find(|(n, _)| *n == c).map(|(_, p)| *p)?;
        (pid > 0 && Some(pid) != pids.iter().find(|(n, _)| *n == c).map(|(_, p)| *p)).then_some(pid)
    });
    let new_pid = restarted.unwrap_or_else(|| panic!("container not restarted\n{}", sys.journal()));
    let cg = sys.ok(&format!("cat /proc/{new_pid}/cgroup"));
    assert!(
        cg.contains(&format!("/machine.slice/berth-{c}.scope/berth/{c}")),
        "{cg}"
    );
    let scopes = sys.ok("systemctl list-units --no-legend --all 'berth-*.scope'");
    assert_eq!(scopes.lines().count(), 2, "{scopes}");
    sys.wait_machines(&want_sorted, 15, "after the supervisor's kill -9");
    let body = sys.ok("curl -sS --max-time 5 http://10.77.0.2/");
    assert!(body.contains("berth-fixture"), "{body}");

    // A scope systemd refuses (its slice masked here) fails that guest's
    // start at once, with systemd's reason; running guests are not touched.
    let m = format!("{tag}-m");
    let spec = std::fs::read_to_string(work.join("spec.toml")).expect("spec");
    let extra = format!(
        "{spec}\n[guest.{m}]\nkind = \"container\"\nindex = 4\nrootfs = \"{}\"\n\
         command = [\"/bin/sh\", \"-c\", \"exec httpd -f -p 80 -h /www\"]\nephemeral = true\n",
        rootfs.display()
    );
    std::fs::write(work.join("more.toml"), extra).expect("spec");
    sys.ok("systemctl mask --runtime machine.slice");
    let started = std::time::Instant::now();
    let out = sys.sh("berth apply --yes /srv/berth-test/more.toml");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "apply with a masked scope succeeded: {text}"
    );
    assert!(
        text.contains("masked") && text.contains("supervisor exited before it started"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the failure took {:?} to show (the supervisor wait is 60 s)",
        started.elapsed()
    );
    assert_eq!(sys.pids().iter().filter(|(_, p)| *p > 0).count(), 2);
    assert!(
        !sys.pids().iter().any(|(n, _)| *n == m),
        "the refused guest is listed as running"
    );
    sys.ok("systemctl unmask --runtime machine.slice");

    // Guests that stop are unregistered; nothing is left behind.
    sys.ok("berth destroy --all --yes");
    sys.wait_machines(&[], 15, "after destroy --all");
    let scopes = wait_until(Duration::from_secs(15), Duration::from_millis(250), || {
        let out = sys.sh("systemctl list-units --no-legend --all 'berth-*.scope'");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        out.trim().is_empty().then_some(())
    });
    assert!(
        scopes.is_some(),
        "guest scopes left behind: {}",
        sys.ok("systemctl list-units --no-legend --all 'berth-*.scope'")
    );

    sys.poweroff();
    drop(sys);
    let _ = std::fs::remove_dir_all(&work);
}

/// A NixOS-container-like rootfs: a tiny tree (`/etc/os-release`, an empty
/// `/usr` to mount on, the merged-/usr symlinks) whose programs come from a
/// read-only bind of the host's `/usr`, as a container built from a NixOS
/// `config` gets the host's /nix/store.
fn tiny_root(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir etc");
    std::fs::create_dir_all(dir.join("usr")).expect("mkdir usr");
    std::fs::copy("/etc/os-release", dir.join("etc/os-release"))
        .or_else(|_| std::fs::copy("/usr/lib/os-release", dir.join("etc/os-release")))
        .expect("os-release");
    for link in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(link);
        if let Ok(to) = std::fs::read_link(&host) {
            std::os::unix::fs::symlink(to, dir.join(link)).expect("symlink");
        }
    }
}

/// A container whose command is an init system (systemd, as a NixOS guest
/// built from `config` runs `${toplevel}/init`) on a tiny ephemeral rootfs
/// with its programs bound in read-only (`binds`, as the module binds the
/// host's /nix/store): berth runs it as PID 1 with
/// `--kill-signal=SIGRTMIN+3`, systemd boots in the container (user
/// namespace, berth's routed link), the bind is read-only, and `berth stop`
/// halts it cleanly instead of killing it at the stop timeout.
#[test]
fn container_with_systemd_as_init_boots_and_halts_cleanly() {
    let caps = [
        Cap::Root,
        Cap::Netns,
        Cap::Nspawn,
        Cap::Nft,
        Cap::SystemdBoot,
    ];
    if !require(
        "container_with_systemd_as_init_boots_and_halts_cleanly",
        &caps,
    ) {
        return;
    }
    let tag = unique_tag("si");
    let b = common::Berth::new(&tag);
    let rootdir = tempfile::Builder::new()
        .prefix("berth-tinyroot-")
        .tempdir()
        .expect("tempdir");
    let root = rootdir.path().to_path_buf();
    tiny_root(&root);
    let g = format!("{tag}-s");
    let guest = format!(
        "[guest.{g}]\nkind = \"container\"\nindex = 2\nrootfs = \"{}\"\n\
         command = [\"/lib/systemd/systemd\"]\nephemeral = true\nmemory = \"512M\"\nstop_timeout = \"60s\"\n\
         binds = [{{ source = \"/usr\" }}]\n",
        root.display()
    );
    let file = b.write("spec.toml", &common::spec(b.net.uplink(), 79, &guest));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // systemd is PID 1 in the container and finishes booting.
    let mut last = String::new();
    let booted = wait_until(Duration::from_secs(120), Duration::from_millis(500), || {
        let out = b.cli(&["exec", &g, "--", "systemctl", "is-system-running"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let state = last.trim();
        (state == "running" || state == "degraded").then_some(())
    });
    assert!(
        booted.is_some(),
        "systemd did not finish booting in the container: {last}\n{}",
        b.daemon_log()
    );
    let comm = b.cli_ok(&["exec", &g, "--", "cat", "/proc/1/comm"]);
    assert_eq!(comm.trim(), "systemd");
    // berth's address is on the container's link.
    let addrs = b.cli_ok(&["exec", &g, "--", "ip", "-4", "addr"]);
    assert!(addrs.contains("10.79.0.2/32"), "{addrs}");

    // The bound /usr is read-only in the container.
    let out = b.cli(&["exec", &g, "--", "touch", "/usr/berth-was-here"]);
    assert!(!out.status.success(), "/usr is writable in the container");
    assert!(!Path::new("/usr/berth-was-here").exists());

    // SIGRTMIN+3: systemd halts and exits by itself (a kill at the 60 s
    // stop timeout would show as a signal).
    b.cli_ok(&["stop", &g]);
    let info = b.guest(&g);
    assert_eq!(info.state, "stopped", "{info:?}");
    let exit = info.last_exit.clone().unwrap_or_default();
    assert!(
        !exit.contains("SIGKILL") && !exit.contains("signal 9"),
        "systemd was killed, not halted: {exit}"
    );
    b.cli_ok(&["destroy", "--all", "--yes"]);
}
