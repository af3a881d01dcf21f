//! The single-host engine end to end: real systemd-nspawn containers on a
//! routed network inside namespaces this test creates.

mod common;

use std::time::Duration;

use berth_testkit::{Cap, INTERNET_BODY, busybox_rootfs, require, unique_tag, wait_until};
use common::{Berth, ConsoleClient, container, lines_in_host, spec};

const CAPS: &[Cap] = &[Cap::Root, Cap::Netns, Cap::Nspawn, Cap::Nft, Cap::Curl];

#[test]
fn engine_apply_restart_daemon_change_destroy() {
    if !require("engine_apply_restart_daemon_change_destroy", CAPS) {
        return;
    }
    let tag = unique_tag("en");
    let mut b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    // Guest names are global on the host (cgroups, machine names): make them unique.
    let (ga, gb) = (format!("{tag}-a"), format!("{tag}-b"));
    let guests = format!(
        "{}{}",
        container(&ga, 2, &rootfs, "memory = \"128M\""),
        container(&gb, 3, &rootfs, "memory = \"128M\"")
    );
    let file = b.write("spec.toml", &spec(b.net.uplink(), 61, &guests));
    let file = file.to_str().expect("utf8 path");

    b.cli_ok(&["validate", file]);
    let plan = b.cli_ok(&["plan", file]);
    assert!(plan.contains(&ga) && plan.contains("create"), "{plan}");
    let out = b.cli_ok(&["apply", "--yes", file]);
    assert!(out.contains("applied"), "{out}");

    // Each answers HTTP from the host, on IPv4 and IPv6.
    for url in [
        "http://10.61.0.2/",
        "http://10.61.0.3/",
        "http://[fd42:3d::2]/",
        "http://[fd42:3d::3]/",
    ] {
        let body = b.curl(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(body.contains("berth-fixture"), "{url}: {body}");
    }

    let before = b.ps();
    assert_eq!(before.len(), 2);
    for g in &before {
        assert_eq!(g.state, "running", "{g:?}");
        assert_eq!(g.kind, "container");
        assert!(g.pid.is_some());
    }
    let pid_a = b.guest(&ga).pid.expect("pid a");
    let pid_b = b.guest(&gb).pid.expect("pid b");
    assert_eq!(b.guest(&ga).addresses, vec!["10.61.0.2", "fd42:3d::2"]);

    // A container reaches the "internet" through NAT: run curl in its netns.
    let netns = format!("--net=/proc/{pid_a}/ns/net");
    let inet = b.net.internet_url();
    let out = std::process::Command::new("nsenter")
        .args([
            netns.as_str(),
            "curl",
            "-sS",
            "--max-time",
            "5",
            inet.as_str(),
        ])
        .output()
        .expect("curl in guest netns");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(INTERNET_BODY),
        "guest could not reach the internet: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A forged source address (inside the guest's subnet, so NAT would carry
    // it if the filter let it through) is dropped.
    let add = std::process::Command::new("nsenter")
        .args([
            netns.as_str(),
            "ip",
            "addr",
            "add",
            "10.61.0.99/32",
            "dev",
            "host0",
        ])
        .status()
        .expect("ip addr add");
    assert!(add.success());
    let spoof = std::process::Command::new("nsenter")
        .args([
            netns.as_str(),
            "curl",
            "-sS",
            "--max-time",
            "3",
            "--interface",
            "10.61.0.99",
            inet.as_str(),
        ])
        .output()
        .expect("spoofed curl");
    assert!(
        !spoof.status.success(),
        "a forged source address got through: {}",
        String::from_utf8_lossy(&spoof.stdout)
    );

    // kill -9 the daemon: the guests keep answering.
    b.kill_daemon();
    assert!(
        b.curl("http://10.61.0.2/").is_ok(),
        "guest died with the daemon"
    );
    assert!(
        b.curl("http://[fd42:3d::3]/").is_ok(),
        "guest died with the daemon"
    );
    // A restarted daemon re-adopts them: same PIDs, still running.
    b.start_daemon();
    let after = b.ps();
    assert_eq!(b.guest(&ga).pid, Some(pid_a), "{after:?}");
    assert_eq!(b.guest(&gb).pid, Some(pid_b), "{after:?}");
    assert!(after.iter().all(|g| g.state == "running"), "{after:?}");

    // Change one guest's memory: the plan restarts that one only.
    let guests2 = format!(
        "{}{}",
        container(&ga, 2, &rootfs, "memory = \"256M\""),
        container(&gb, 3, &rootfs, "memory = \"128M\"")
    );
    let file2 = b.write("spec2.toml", &spec(b.net.uplink(), 61, &guests2));
    let file2 = file2.to_str().expect("utf8 path");
    let plan: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plan", "--json", file2])).expect("plan json");
    let actions = plan["plan"]["actions"].as_array().expect("actions");
    let guest_actions: Vec<_> = actions.iter().filter(|a| !a["guest"].is_null()).collect();
    assert_eq!(guest_actions.len(), 1, "{plan}");
    assert_eq!(guest_actions[0]["guest"], ga.as_str());
    assert_eq!(guest_actions[0]["impact"], "restart");
    assert!(
        guest_actions[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("memory"),
        "{plan}"
    );
    b.cli_ok(&["apply", "--yes", file2]);
    let a2 = b.guest(&ga);
    assert_ne!(a2.pid, Some(pid_a), "changed guest was not restarted");
    assert_eq!(a2.memory, Some(256 << 20));
    assert_eq!(
        b.guest(&gb).pid,
        Some(pid_b),
        "unchanged guest was restarted"
    );
    assert!(b.curl("http://10.61.0.2/").is_ok());
    // Nothing left to do.
    let plan = b.cli_ok(&["plan", file2]);
    assert!(plan.contains("No changes"), "{plan}");

    // destroy --all leaves no trace.
    let a_pid = a2.pid.expect("pid");
    b.cli_ok(&["destroy", "--all", "--yes"]);
    assert!(b.ps().is_empty());
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert!(
        !links.contains("vb2") && !links.contains("vb3"),
        "links left: {links}"
    );
    let routes = lines_in_host(&b.net, "ip", &["route", "show"])
        + &lines_in_host(&b.net, "ip", &["-6", "route", "show"]);
    assert!(
        !routes.contains("10.61.0.") && !routes.contains("fd42:3d::"),
        "routes left: {routes}"
    );
    let tables = lines_in_host(&b.net, "nft", &["list", "tables"]);
    assert!(!tables.contains("berth"), "nft table left: {tables}");
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (!std::path::Path::new(&format!("/proc/{a_pid}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "guest process {a_pid} still runs");
    let procs = std::process::Command::new("pgrep")
        .args(["-f", b.state.to_str().unwrap_or("")])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&procs.stdout).trim().to_string();
    let daemon = b.daemon_pid().map(|p| p.to_string()).unwrap_or_default();
    let leftover: Vec<&str> = pids.lines().filter(|p| *p != daemon).collect();
    assert!(leftover.is_empty(), "processes left: {leftover:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(b.state.to_str().unwrap_or("-")),
        "mounts left: {mounts}"
    );
    for name in [&ga, &gb] {
        for root in [
            "/sys/fs/cgroup/unified/berth",
            "/sys/fs/cgroup/berth",
            "/sys/fs/cgroup/memory/berth",
        ] {
            let p = format!("{root}/{name}");
            assert!(!std::path::Path::new(&p).exists(), "cgroup left: {p}");
        }
    }
}

#[test]
fn guest_that_exits_at_once_is_reported_and_leaves_nothing() {
    if !require(
        "guest_that_exits_at_once_is_reported_and_leaves_nothing",
        CAPS,
    ) {
        return;
    }
    let tag = unique_tag("ex");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-x");
    let g = format!(
        "[guest.{name}]\nkind = \"container\"\nindex = 5\nrootfs = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo about to fail; exit 3\"]\nephemeral = true\n",
        rootfs.display()
    );
    let file = b.write("bad.toml", &spec(b.net.uplink(), 62, &g));
    let out = b.cli(&["apply", "--yes", file.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&name) && err.contains("exited with status 3"),
        "{err}"
    );
    assert!(
        err.contains("about to fail"),
        "the guest's last output should be in the error: {err}"
    );
    assert!(b.ps().is_empty(), "a failed create must not stay recorded");
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert!(!links.contains("vb5"), "{links}");
}

#[test]
fn daemon_killed_mid_apply_converges_without_leaks() {
    if !require("daemon_killed_mid_apply_converges_without_leaks", CAPS) {
        return;
    }
    let tag = unique_tag("cr");
    let mut b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let names: Vec<String> = (0..4).map(|i| format!("{tag}-{i}")).collect();
    let guests: String = names
        .iter()
        .enumerate()
        .map(|(i, n)| container(n, 10 + i as u32, &rootfs, ""))
        .collect();
    let file = b.write("spec.toml", &spec(b.net.uplink(), 63, &guests));
    let file = file.to_str().expect("utf8");

    // Start an apply and kill -9 the daemon while guests are being created.
    let mut apply = b.cmd(&["apply", "--yes", file]).spawn().expect("apply");
    let started = wait_until(Duration::from_secs(20), Duration::from_millis(5), || {
        std::fs::read_dir(b.state.join("guests"))
            .ok()
            .and_then(|mut rd| rd.next())
            .map(|_| ())
    });
    assert!(started.is_some(), "apply never started creating guests");
    b.kill_daemon();
    let _ = apply.wait();

    // The next apply converges: every guest runs, exactly one link each.
    // The new daemon first resumes the interrupted apply and refuses
    // another one meanwhile (409): wait for it to finish.
    b.start_daemon();
    let applied = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let out = b.cli(&["apply", "--yes", file]);
        if out.status.success() {
            return Some(Ok(()));
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (!err.contains("another apply or destroy is running")).then_some(Err(err))
    });
    match applied {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("apply after the daemon restart failed: {e}"),
        None => panic!("the resumed apply did not finish within 60 s"),
    }
    let ps = b.ps();
    assert_eq!(ps.len(), 4, "{ps:?}");
    assert!(ps.iter().all(|g| g.state == "running"), "{ps:?}");
    for i in 0..4 {
        assert!(b.curl(&format!("http://10.63.0.{}/", 10 + i)).is_ok());
    }
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert_eq!(links.matches(": vb").count(), 4, "{links}");
    let plan = b.cli_ok(&["plan", file]);
    assert!(plan.contains("No changes"), "{plan}");

    b.cli_ok(&["destroy", "--all", "--yes"]);
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert_eq!(links.matches(": vb").count(), 0, "{links}");
    let procs = std::process::Command::new("pgrep")
        .args(["-f", b.state.to_str().unwrap_or("")])
        .output()
        .expect("pgrep");
    let daemon = b.daemon_pid().map(|p| p.to_string()).unwrap_or_default();
    let left: Vec<String> = String::from_utf8_lossy(&procs.stdout)
        .lines()
        .filter(|p| *p != daemon)
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn supervisor_killed_then_apply_brings_the_guest_back_cleanly() {
    if !require(
        "supervisor_killed_then_apply_brings_the_guest_back_cleanly",
        CAPS,
    ) {
        return;
    }
    let tag = unique_tag("sk");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-s");
    let file = b.write(
        "spec.toml",
        &spec(b.net.uplink(), 64, &container(&name, 7, &rootfs, "")),
    );
    let file = file.to_str().expect("utf8");
    b.cli_ok(&["apply", "--yes", file]);
    let before = b.guest(&name);
    let (shim, leader) = (
        before.shim_pid.expect("shim pid"),
        before.pid.expect("leader"),
    );

    // kill -9 the supervisor: its container goes with it (parent-death
    // signal), and ps says the guest is missing.
    let _ = std::process::Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status();
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (!std::path::Path::new(&format!("/proc/{leader}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "container outlived its supervisor");
    assert_eq!(b.guest(&name).state, "missing");

    // The next apply starts it again: one link, answering, nothing leaked.
    let plan = b.cli_ok(&["plan", file]);
    assert!(plan.contains("start"), "{plan}");
    b.cli_ok(&["apply", "--yes", file]);
    let after = b.guest(&name);
    assert_eq!(after.state, "running");
    assert_ne!(after.pid, Some(leader));
    assert!(b.curl("http://10.64.0.7/").is_ok());
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert_eq!(links.matches(": vb7").count(), 1, "{links}");
}

#[test]
fn logs_show_console_and_supervisor_and_follow() {
    if !require("logs_show_console_and_supervisor_and_follow", CAPS) {
        return;
    }
    let tag = unique_tag("lg");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-l");
    let g = format!(
        "[guest.{name}]\nkind = \"container\"\nindex = 8\nrootfs = \"{}\"\nephemeral = true\ncommand = [\"/bin/sh\", \"-c\", \"echo hello-from-guest; echo to-stderr >&2; i=0; while true; i=$((i+1)); do echo tick $i; sleep 0.2; done\"]\n",
        rootfs.display()
    );
    let file = b.write("spec.toml", &spec(b.net.uplink(), 65, &g));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);
    let console = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = b.cli_ok(&["logs", &name]);
        out.contains("tick 2").then_some(out)
    })
    .expect("console output");
    assert!(
        console.contains("hello-from-guest") && console.contains("to-stderr"),
        "{console}"
    );
    let sup = b.cli_ok(&["logs", "--supervisor", &name]);
    assert!(sup.contains("guest running"), "{sup}");
    let last = b.cli_ok(&["logs", "-n", "1", &name]);
    assert_eq!(last.lines().count(), 1, "{last}");
    // --since: the first lines are more than 2 s old once tick 25 is out
    // (5 s of ticks: margin for whole-second timestamps on a loaded host).
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        b.cli_ok(&["logs", &name]).contains("tick 25").then_some(())
    })
    .expect("ticks");
    let recent = b.cli_ok(&["logs", "--since", "2s", &name]);
    assert!(
        !recent.contains("hello-from-guest") && recent.contains("tick"),
        "{recent}"
    );
    let recent_sup = b.cli_ok(&["logs", "--supervisor", "--since", "1h", &name]);
    assert!(recent_sup.contains("guest running"), "{recent_sup}");

    // -f keeps printing what the guest writes.
    let mut child = b
        .cmd(&["logs", "-f", "-n", "0", &name])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    // Read on a thread so a broken follow fails the test instead of hanging it.
    let rx = common::read_in_background(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    while !seen.contains("tick") {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(s) => seen.push_str(&s),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("tick"),
        "follow printed nothing new: {seen:?}"
    );

    let out = b.cli(&["logs", "nosuchguest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn exec_in_a_container_is_exact() {
    if !require("exec_in_a_container_is_exact", CAPS) {
        return;
    }
    let tag = unique_tag("xc");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-x");
    let file = b.write(
        "spec.toml",
        &spec(
            b.net.uplink(),
            66,
            &container(&name, 9, &rootfs, "env = { GREETING = \"hej\" }"),
        ),
    );
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // stdout, stderr and exit code, exactly; the container's env and root.
    let out = b.cli(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo out $GREETING; echo err >&2; cat /www/index.html; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out hej\nberth-fixture\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .last(),
        Some("err")
    );
    let ok = b.cli(&["exec", &name, "--", "/bin/true"]);
    assert_eq!(ok.status.code(), Some(0));
    // As another user: by uid:gid, and by name from the guest's passwd.
    let id = b.cli(&[
        "exec",
        "--user",
        "1000:100",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "id -u; id -g",
    ]);
    assert_eq!(String::from_utf8_lossy(&id.stdout), "1000\n100\n");
    let root = b.cli(&[
        "exec", "--user", "root", &name, "--", "/bin/sh", "-c", "id -u",
    ]);
    assert_eq!(String::from_utf8_lossy(&root.stdout), "0\n");
    let nobody = b.cli(&["exec", "--user", "nosuchuser", &name, "--", "/bin/true"]);
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("not in the guest's /etc/passwd"));

    // 1 MiB of random bytes, intact: the guest prints its md5 on stderr.
    let big = b.cli(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "head -c 1048576 /dev/urandom > /tmp/r; md5sum /tmp/r >&2; cat /tmp/r",
    ]);
    assert!(big.status.success());
    assert_eq!(big.stdout.len(), 1 << 20);
    let host_sum = common::md5_hex(&big.stdout);
    let guest_sum = String::from_utf8_lossy(&big.stderr)
        .split_whitespace()
        .find(|w| w.len() == 32)
        .unwrap_or("")
        .to_string();
    assert_eq!(host_sum, guest_sum, "1 MiB output changed on the way");

    // stdin is forwarded when it is not a terminal.
    let mut child = b
        .cmd(&["exec", &name, "--", "/bin/sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("exec");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"piped in\n").expect("write");
    drop(child.stdin.take());
    let piped = child.wait_with_output().expect("exec output");
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "PIPED IN\n");

    // On a terminal, exec runs the command on a pty (util-linux `script`
    // plays the terminal) and passes its exit code on.
    let shell_cmd = format!(
        "{} exec {name} -- /bin/sh -c '[ -t 0 ] && [ -t 1 ] && echo on-a-tty; stty size; exit 4'",
        common::BIN
    );
    let tty = b
        .net
        .cmd_in_host("script")
        .args(["-qec", &shell_cmd, "/dev/null"])
        .env("BERTH_STATE_DIR", &b.state)
        .env("BERTH_SOCKET", &b.socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(text.contains("on-a-tty"), "{text}");
    assert_eq!(tty.status.code(), Some(4), "{text}");

    // Bad input: a missing binary, a stopped guest, an unknown guest.
    let missing = b.cli(&["exec", &name, "--", "/no/such/binary"]);
    assert_eq!(
        missing.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    b.cli_ok(&["stop", &name]);
    let stopped = b.cli(&["exec", &name, "--", "/bin/true"]);
    assert!(!stopped.status.success());
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("not running"));
    let unknown = b.cli(&["exec", "nosuchguest", "--", "/bin/true"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("does not exist"));
}

#[test]
fn console_shows_output_takes_input_and_survives_the_daemon() {
    if !require(
        "console_shows_output_takes_input_and_survives_the_daemon",
        CAPS,
    ) {
        return;
    }
    let tag = unique_tag("co");
    let mut b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-c");
    let g = format!(
        "[guest.{name}]\nkind = \"container\"\nindex = 11\nrootfs = \"{}\"\nephemeral = true\ncommand = [\"/bin/sh\", \"-c\", \"echo console-hello; exec /bin/sh -i\"]\n",
        rootfs.display()
    );
    let file = b.write("spec.toml", &spec(b.net.uplink(), 67, &g));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // History on attach, and typed commands run in the guest.
    let mut w = ConsoleClient::attach(&b, &["console", &name]);
    assert!(w.wait_for("console-hello"), "no history: {:?}", w.seen);
    // A watcher at the same time; a second writer is refused.
    let mut r = ConsoleClient::attach(&b, &["console", "--read-only", &name]);
    let busy = b.cli(&["console", &name]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("taken for writing"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    w.type_(b"echo typed-$((40+2))\n");
    assert!(w.wait_for("typed-42"), "writer saw: {:?}", w.seen);
    assert!(r.wait_for("typed-42"), "reader saw: {:?}", r.seen);
    // exec works while the console is attached.
    let out = b.cli(&["exec", &name, "--", "/bin/echo", "exec-ok"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-ok\n");
    assert!(w.detach().success());
    assert!(r.detach().success());

    // kill -9 the daemon: console and exec work again through a new one.
    b.kill_daemon();
    b.start_daemon();
    let mut w = ConsoleClient::attach(&b, &["console", &name]);
    w.type_(b"echo after-$((1+1))\n");
    assert!(w.wait_for("after-2"), "{:?}", w.seen);
    assert!(w.detach().success());
    let out = b.cli(&["exec", &name, "--", "/bin/echo", "still"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still\n");
}

#[test]
fn backup_is_encrypted_and_restore_feeds_back_the_same_bytes() {
    if !require(
        "backup_is_encrypted_and_restore_feeds_back_the_same_bytes",
        CAPS,
    ) {
        return;
    }
    use age::secrecy::ExposeSecret;
    let tag = unique_tag("bk");
    let b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let name = format!("{tag}-b");
    let id = age::x25519::Identity::generate();
    let idfile = b.write("id.txt", &format!("{}\n", id.to_string().expose_secret()));
    let extra = format!(
        "backup = {{ command = [\"cat\", \"/etc/app.conf\"], restore_command = [\"/bin/sh\", \"-c\", \"cat > /tmp/restored\"], recipients = [\"{}\"] }}",
        id.to_public()
    );
    let file = b.write(
        "spec.toml",
        &spec(b.net.uplink(), 68, &container(&name, 12, &rootfs, &extra)),
    );
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);
    b.cli_ok(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "printf 'secret-config\\001\\377\\n' > /etc/app.conf",
    ]);
    let original = b.cli(&["exec", &name, "--", "cat", "/etc/app.conf"]).stdout;
    assert_eq!(original, b"secret-config\x01\xff\n");

    let out = b.cli_ok(&["backup", "--json", &name]);
    let info: serde_json::Value = serde_json::from_str(&out).expect("json");
    let path = info["file"].as_str().expect("file").to_string();
    let sealed = std::fs::read(&path).expect("backup file");
    assert!(
        !sealed.windows(13).any(|w| w == b"secret-config"),
        "plain text on disk"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let plain = age::decrypt(&id, &sealed).expect("decrypts with the identity");
    assert_eq!(plain, original);
    assert!(b.cli_ok(&["backup", "list", &name]).contains(&path));

    b.cli_ok(&[
        "restore",
        &name,
        &path,
        "--identity",
        idfile.to_str().expect("utf8"),
    ]);
    let restored = b.cli(&["exec", &name, "--", "cat", "/tmp/restored"]).stdout;
    assert_eq!(restored, original, "restore fed back different bytes");

    // A guest without a backup declared says so.
    let none = b.cli(&["backup", "nosuchguest"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("does not exist"));
}
