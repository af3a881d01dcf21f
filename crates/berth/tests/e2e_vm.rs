//! VMs end to end under TCG: real QEMU microVMs (and a q35 disk boot) on the
//! routed network, next to a container, inside namespaces this test creates.

mod common;

use std::time::Duration;

use berth_testkit::{
    Cap, INTERNET_BODY, busybox_rootfs, require, unique_tag, vm_fixture, wait_until,
};
use common::{Berth, ConsoleClient, container, lines_in_host, spec};

const CAPS: &[Cap] = &[
    Cap::Root,
    Cap::Netns,
    Cap::Nspawn,
    Cap::Nft,
    Cap::Curl,
    Cap::Qemu,
];

fn vm(name: &str, index: u32, fx: &berth_testkit::VmFixture, extra: &str) -> String {
    format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = {index}\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1 berth.fetch={{inet}}\"\nmemory = \"256M\"\nstop_timeout = \"2s\"\n{extra}\n",
        fx.kernel.display(),
        fx.initrd.display()
    )
}

/// Waits (up to 3 minutes: TCG boots on a busy machine) until `url` answers.
fn wait_http(b: &Berth, url: &str) -> String {
    wait_until(Duration::from_secs(180), Duration::from_millis(500), || {
        b.curl(url)
            .ok()
            .filter(|body| !body.contains("404 Not Found"))
    })
    .unwrap_or_else(|| panic!("{url} did not answer; daemon log:\n{}", b.daemon_log()))
}

fn qemu_pids(tag: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("qemu-system-x86_64 .*{tag}")])
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// `berth exec --json NAME -- ARGV`: the API's answer (exit code, base64
/// output, channel).
fn exec_json(b: &Berth, name: &str, argv: &[&str]) -> serde_json::Value {
    let mut args = vec!["exec", "--json", name, "--"];
    args.extend_from_slice(argv);
    let out = b.cli(&args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("exec --json: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// 1 MiB of random bytes out of the guest, intact (md5 from the guest on
/// stderr); prints how long it took.
fn exec_one_mib(b: &Berth, name: &str, via: &str) {
    let started = std::time::Instant::now();
    let big = b
        .cmd(&[
            "exec",
            "--timeout",
            "120",
            name,
            "--",
            "/bin/sh",
            "-c",
            "head -c 1048576 /dev/urandom > /tmp/r; md5sum /tmp/r >&2; cat /tmp/r; rm /tmp/r",
        ])
        .output()
        .expect("berth exec");
    eprintln!(
        "1 MiB of exec output through the {via} in {:?}",
        started.elapsed()
    );
    assert!(
        big.status.success(),
        "{}",
        String::from_utf8_lossy(&big.stderr)
    );
    assert_eq!(big.stdout.len(), 1 << 20);
    let host_sum = common::md5_hex(&big.stdout);
    assert!(
        String::from_utf8_lossy(&big.stderr).contains(&host_sum),
        "output changed on the way"
    );
}

/// `len` bytes streamed as stdin through `exec-stream` (spooled into the VM
/// in chunks, then fed to md5sum): the guest's md5 must be the host's.
fn exec_stream_md5(b: &Berth, name: &str, len: usize, via: &str) {
    use base64::Engine as _;
    let data: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let t = std::time::Instant::now();
    let (status, body) = b.http(
        "POST",
        &format!("/v1/guests/{name}/exec-stream?argv=%5B%22md5sum%22%5D"),
        Some(&data),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["exit_code"], 0, "{v}");
    let out = base64::engine::general_purpose::STANDARD
        .decode(v["stdout"].as_str().expect("stdout"))
        .expect("base64");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(
        out.split_whitespace().next(),
        Some(common::md5_hex(data.as_bytes()).as_str()),
        "{v}"
    );
    eprintln!(
        "{len} bytes of streamed stdin through the {via} in {:?}",
        t.elapsed()
    );
}

#[test]
fn vms_and_a_container_routed_supervised_destroyed() {
    if !require("vms_and_a_container_routed_supervised_destroyed", CAPS) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture (kernel + initrd)");
    let tag = unique_tag("vm");
    let mut b = Berth::new(&tag);
    let rootfs = busybox_rootfs();
    let inet = b.net.internet_url();
    let (va, vb, ct) = (format!("{tag}-a"), format!("{tag}-b"), format!("{tag}-c"));
    let guests = |mem_a: &str| {
        format!(
            "{}{}{}",
            vm(&va, 20, &fx, "").replace("memory = \"256M\"", &format!("memory = \"{mem_a}\"")),
            vm(&vb, 21, &fx, "cpus = 1"),
            container(&ct, 22, &rootfs, "")
        )
        .replace("{inet}", &inet)
    };
    let file = b.write("spec.toml", &spec(b.net.uplink(), 71, &guests("256M")));
    let file = file.to_str().expect("utf8");
    let out = b.cli_ok(&["apply", "--yes", file]);
    assert!(out.contains("applied"), "{out}");

    // Every guest answers from the host, VMs on IPv4 and IPv6.
    for url in [
        "http://10.71.0.20/",
        "http://10.71.0.21/",
        "http://[fd42:47::14]/",
    ] {
        let body = wait_http(&b, url);
        assert!(body.contains("berth-vm-fixture"), "{url}: {body}");
    }
    assert!(
        b.curl("http://10.71.0.22/")
            .expect("container")
            .contains("berth-fixture")
    );
    let ps = b.ps();
    let a = ps.iter().find(|g| g.name == va).expect("vm a in ps");
    assert_eq!(a.kind, "vm");
    assert_eq!(a.accel.as_deref(), Some("tcg"), "{a:?}");
    assert_eq!(a.state, "running");

    // The VM reached the "internet" through NAT at boot (the fixture fetched
    // berth.fetch= and serves what it got), and its forged-source attempt
    // was dropped.
    let fetched = wait_http(&b, "http://10.71.0.20/fetched.html");
    assert!(
        fetched.contains(INTERNET_BODY),
        "VM could not reach the internet: {fetched}"
    );
    let spoof = wait_http(&b, "http://10.71.0.20/spoof.html");
    assert!(
        spoof.contains("blocked"),
        "a forged source got through: {spoof}"
    );

    // kill -9 the daemon: VMs keep answering; a new daemon re-adopts them.
    let pid_a = a.pid.expect("qemu pid a");
    let pid_b = b.guest(&vb).pid.expect("qemu pid b");
    b.kill_daemon();
    assert!(
        b.curl("http://10.71.0.21/").is_ok(),
        "VM died with the daemon"
    );
    b.start_daemon();
    assert_eq!(b.guest(&va).pid, Some(pid_a));
    assert_eq!(b.guest(&vb).pid, Some(pid_b));
    // exec into a VM still works through the new daemon.
    let out = b.cli(&[
        "exec",
        &vb,
        "--",
        "/bin/sh",
        "-c",
        "echo after-restart-$((2*21))",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "after-restart-42\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Memory of one VM: restart that one only.
    let file2 = b.write("spec2.toml", &spec(b.net.uplink(), 71, &guests("192M")));
    let file2 = file2.to_str().expect("utf8");
    let plan: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plan", "--json", file2])).expect("json");
    let acts: Vec<&serde_json::Value> = plan["plan"]["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter(|a| !a["guest"].is_null())
        .collect();
    assert_eq!(acts.len(), 1, "{plan}");
    assert_eq!(acts[0]["guest"], va.as_str());
    assert_eq!(acts[0]["impact"], "restart");
    b.cli_ok(&["apply", "--yes", file2]);
    assert_ne!(b.guest(&va).pid, Some(pid_a));
    assert_eq!(b.guest(&vb).pid, Some(pid_b), "the other VM was restarted");
    wait_http(&b, "http://10.71.0.20/");

    // destroy --all: no tap, route, nft table, QEMU or QMP socket left.
    b.cli_ok(&["destroy", "--all", "--yes"]);
    let links = lines_in_host(&b.net, "ip", &["-o", "link", "show"]);
    assert!(
        !links.contains("vb20") && !links.contains("vb21") && !links.contains("vb22"),
        "{links}"
    );
    let routes = lines_in_host(&b.net, "ip", &["route", "show"]);
    assert!(!routes.contains("10.71.0."), "{routes}");
    assert!(!lines_in_host(&b.net, "nft", &["list", "tables"]).contains("berth"));
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        qemu_pids(&tag).is_empty().then_some(())
    });
    assert!(gone.is_some(), "QEMU left: {:?}", qemu_pids(&tag));
    let socks = std::process::Command::new("find")
        .args([
            b.state.to_str().unwrap_or("/nonexistent"),
            "-name",
            "*.sock",
        ])
        .output();
    let socks = socks
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(socks.trim().is_empty(), "sockets left: {socks}");
}

#[test]
fn vm_pinning_and_q35_disk_boot() {
    if !require("vm_pinning_and_q35_disk_boot", CAPS) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture");
    let cpus = berth_vm::host_cpus();
    let tag = unique_tag("vq");
    let b = Berth::new(&tag);
    let disk = b.dir.path().join("disk.img");
    std::fs::copy(&fx.disk, &disk).expect("copy disk image");
    let (vp, vq) = (format!("{tag}-p"), format!("{tag}-q"));
    let pin_extra = if cpus.len() >= 2 {
        format!(
            "cpus = 2\ncpu_pinning = [{}, {}]\nemulator_cpus = [{}]",
            cpus[1], cpus[0], cpus[0]
        )
    } else {
        format!("cpu_pinning = [{}]", cpus[0])
    };
    // A disk berth creates (sparse qcow2), owned by the QEMU user.
    let data = b.dir.path().join("data.qcow2");
    let pin_extra = format!(
        "{pin_extra}\ndisks = [{{ path = \"{}\", size = \"64M\" }}]",
        data.display()
    );
    let guests = format!(
        "{}[guest.{vq}]\nkind = \"vm\"\nindex = 31\nmachine = \"q35\"\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1 berth.root=/dev/vda\"\ndisks = [{{ path = \"{}\" }}]\nstop_timeout = \"2s\"\n",
        // No guest agent in this one: exec takes berth's own port.
        vm(&vp, 30, &fx, &pin_extra).replace(" berth.fetch={inet}", " berth.noqga"),
        fx.kernel.display(),
        fx.initrd.display(),
        disk.display()
    );
    let file = b.write("spec.toml", &spec(b.net.uplink(), 72, &guests));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // Pinning: each vCPU thread's affinity, read back from /proc.
    let qemu = b.guest(&vp).pid.expect("qemu pid");
    let tasks = std::fs::read_dir(format!("/proc/{qemu}/task")).expect("tasks");
    let mut vcpus = Vec::new();
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm
            .trim()
            .strip_prefix("CPU ")
            .and_then(|r| r.split('/').next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            let tid: i32 = t.file_name().to_string_lossy().parse().expect("tid");
            vcpus.push((n, berth_vm::thread_affinity(tid).expect("affinity")));
        }
    }
    vcpus.sort();
    let want: Vec<usize> = if cpus.len() >= 2 {
        vec![cpus[1], cpus[0]]
    } else {
        vec![cpus[0]]
    };
    assert_eq!(vcpus.len(), want.len(), "{vcpus:?}");
    for ((n, got), cpu) in vcpus.iter().zip(&want) {
        assert_eq!(got, &vec![*cpu], "vCPU {n}");
    }

    let head = std::fs::read(&data).expect("created disk");
    assert_eq!(&head[..4], b"QFI\xfb", "not a qcow2 image");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&data).expect("stat"));
    let qemu_uid = std::process::Command::new("id")
        .args(["-u", "berth-qemu"])
        .output()
        .expect("id");
    assert_eq!(
        owner.to_string(),
        String::from_utf8_lossy(&qemu_uid.stdout).trim(),
        "disk owner"
    );

    // The serial console: boot output in its history, typed commands run.
    wait_http(&b, "http://10.72.0.30/");
    let mut con = ConsoleClient::attach(&b, &["console", &vp]);
    con.type_(b"\necho vm-$((6*7))\n");
    con.wait_for_within("vm-42", Duration::from_secs(30));
    let seen = con.seen.clone();
    assert!(con.detach().success());
    assert!(
        seen.contains("berth-fixture"),
        "no boot output in the console history: {seen:?}"
    );
    assert!(
        seen.contains("vm-42"),
        "typed command did not run: {seen:?}"
    );

    // exec over the VM's virtio-serial port (the fixture runs a shell on
    // berth.exec; no guest agent here): exact stdout, stderr, exit code;
    // stdin; 1 MiB of random bytes intact (md5 from the guest on stderr).
    assert_eq!(exec_json(&b, &vp, &["true"])["channel"], "exec-port");
    let out = b.cli(&[
        "exec",
        &vp,
        "--",
        "/bin/sh",
        "-c",
        "echo out-$((2+3)); echo err >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-5\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let mut piped = b
        .cmd(&["exec", &vp, "--", "/bin/sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("exec");
    std::io::Write::write_all(piped.stdin.as_mut().expect("stdin"), b"it's piped\n")
        .expect("write");
    drop(piped.stdin.take());
    assert_eq!(
        String::from_utf8_lossy(&piped.wait_with_output().expect("exec").stdout),
        "IT'S PIPED\n"
    );
    exec_one_mib(&b, &vp, "berth.exec port");
    exec_stream_md5(&b, &vp, 5000, "berth.exec port");

    // Only berth's QMP socket, 0600.
    let qmp = b.state.join(format!("guests/{vp}/qmp.sock"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&qmp).expect("qmp.sock").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "qmp.sock mode {mode:o}");

    // A crash (QEMU killed) is restarted by policy (on-failure).
    let _ = std::process::Command::new("kill")
        .args(["-9", &qemu.to_string()])
        .status();
    let back = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let g = b.guest(&vp);
        (g.pid.is_some() && g.pid != Some(qemu) && g.restarts >= 1).then_some(g)
    });
    assert!(
        back.is_some(),
        "VM was not restarted after QEMU died; {:?}",
        b.guest(&vp)
    );
    wait_http(&b, "http://10.72.0.30/");

    // q35 booted from its virtio-blk disk into userspace there.
    let body = wait_http(&b, "http://10.72.0.31/");
    assert!(body.contains("berth-vm-fixture"), "{body}");
    let console_log = b.state.join(format!("guests/{vq}/console.log"));
    let console = std::fs::read_to_string(&console_log).unwrap_or_default();
    assert!(
        console.contains("berth-fixture: disk root"),
        "q35 did not reach the disk root:\n{console}"
    );

    // A stop is graceful: ACPI power button, the guest powers itself off
    // (the fixture's /init), and QEMU exits 0 without waiting for the timeout.
    b.cli_ok(&["stop", &vq]);
    let console = std::fs::read_to_string(&console_log).unwrap_or_default();
    assert!(
        console.contains("power button: powering off"),
        "no ACPI power-off seen:\n{console}"
    );
    let g = b.guest(&vq);
    assert_eq!(g.state, "stopped");
    assert_eq!(
        g.last_exit.as_deref(),
        Some("exited with status 0"),
        "{g:?}"
    );
}

#[test]
fn too_few_hugepages_fails_before_anything_starts() {
    if !require(
        "too_few_hugepages_fails_before_anything_starts",
        &[Cap::Root, Cap::Netns, Cap::Nft],
    ) {
        return;
    }
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free >= 1024 {
        eprintln!(
            "skip too_few_hugepages_fails_before_anything_starts: this host has {free} free hugepages"
        );
        return;
    }
    let tag = unique_tag("hp");
    let b = Berth::new(&tag);
    // The kernel is never booted: the pre-flight refuses first.
    let g = format!(
        "[guest.{tag}-h]\nkind = \"vm\"\nindex = 5\naccel = \"tcg\"\nkernel = \"/bin/busybox\"\nmemory = \"2G\"\nhugepages = true\n"
    );
    let file = b.write("hp.toml", &spec(b.net.uplink(), 73, &g));
    let out = b.cli(&["apply", "--yes", file.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hugepages") && err.contains("1024"), "{err}");
    assert!(b.ps().is_empty());
    assert!(!lines_in_host(&b.net, "ip", &["-o", "link", "show"]).contains("vb5"));
}

#[test]
fn uefi_q35_boots_with_its_own_variable_store() {
    if !require("uefi_q35_boots_with_its_own_variable_store", CAPS) {
        return;
    }
    if !std::path::Path::new("/usr/share/OVMF/OVMF_CODE.fd").exists() {
        assert!(
            std::env::var("BERTH_E2E_REQUIRED").as_deref() != Ok("1"),
            "OVMF is not installed (apt-get install ovmf)"
        );
        eprintln!("skip uefi_q35_boots_with_its_own_variable_store: OVMF is not installed");
        return;
    }
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("ue");
    let b = Berth::new(&tag);
    let name = format!("{tag}-u");
    let g = format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = 40\nmachine = \"q35\"\nfirmware = \"uefi\"\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1\"\nstop_timeout = \"2s\"\n",
        fx.kernel.display(),
        fx.initrd.display()
    );
    let file = b.write("uefi.toml", &spec(b.net.uplink(), 75, &g));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);
    let body = wait_http(&b, "http://10.75.0.40/");
    assert!(body.contains("berth-vm-fixture"), "{body}");
    let vars = b.state.join(format!("guests/{name}/OVMF_VARS.fd"));
    assert!(
        vars.exists(),
        "no per-guest UEFI variable store at {}",
        vars.display()
    );
}

/// The guest runs qemu-ga and no shell on berth.exec (`berth.noexecport`),
/// so exec goes through the agent; then the agent is killed and exec falls
/// back to the serial console. The daemon is killed on the way: console and
/// exec of the VM still work through a new one.
#[test]
fn vm_exec_through_the_guest_agent() {
    if !require("vm_exec_through_the_guest_agent", CAPS) {
        return;
    }
    use age::secrecy::ExposeSecret;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let fx = vm_fixture().expect("VM fixture");
    if !fx.agent {
        assert!(
            std::env::var("BERTH_E2E_REQUIRED").as_deref() != Ok("1"),
            "the VM fixture has no qemu-ga: apt-get install qemu-guest-agent and rebuild it"
        );
        eprintln!(
            "skip vm_exec_through_the_guest_agent: the VM fixture has no qemu-ga (apt-get install qemu-guest-agent)"
        );
        return;
    }
    let tag = unique_tag("qa");
    let mut b = Berth::new(&tag);
    let name = format!("{tag}-g");
    let id = age::x25519::Identity::generate();
    let idfile = b.write("id.txt", &format!("{}\n", id.to_string().expose_secret()));
    let backup = format!(
        "backup = {{ command = [\"cat\", \"/tmp/app.conf\"], restore_command = [\"/bin/sh\", \"-c\", \"cat > /tmp/restored\"], recipients = [\"{}\"] }}",
        id.to_public()
    );
    let g = vm(&name, 50, &fx, &backup).replace(" berth.fetch={inet}", " berth.noexecport");
    let file = b.write("spec.toml", &spec(b.net.uplink(), 76, &g));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // Booted, agent started, and exec reaches it.
    let console_log = b.state.join(format!("guests/{name}/console.log"));
    let started = wait_until(Duration::from_secs(180), Duration::from_millis(500), || {
        std::fs::read_to_string(&console_log)
            .ok()
            .filter(|c| c.contains("berth-fixture: qemu-ga on"))
    });
    assert!(started.is_some(), "qemu-ga did not start in the guest");
    let up = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let v = exec_json(&b, &name, &["/bin/echo", "hi"]);
        (v["channel"] == "agent").then_some(v)
    })
    .expect("exec never went through the guest agent");
    assert_eq!(
        b64.decode(up["stdout"].as_str().expect("stdout")).ok(),
        Some(b"hi\n".to_vec())
    );

    // Exact stdout, stderr and exit code, non-zero and zero.
    let out = b.cli(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo out-$((2+3)); echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-5\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = b.cli(&["exec", &name, "--", "printf", "no newline"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"no newline");
    assert!(out.stderr.is_empty());

    // stdin reaches the command.
    let mut piped = b
        .cmd(&["exec", &name, "--", "/bin/sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("exec");
    std::io::Write::write_all(
        piped.stdin.as_mut().expect("stdin"),
        b"it's piped\n\x00\xff",
    )
    .expect("write");
    drop(piped.stdin.take());
    assert_eq!(
        piped.wait_with_output().expect("exec").stdout,
        b"IT'S PIPED\n\x00\xff"
    );

    exec_one_mib(&b, &name, "guest agent");
    exec_stream_md5(&b, &name, 1_500_000, "guest agent");
    let sock = b.state.join(format!("guests/{name}/qga.sock"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sock).expect("qga.sock").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "qga.sock mode {mode:o}");

    // A missing program is a clear error, not an empty success.
    let missing = b.cli(&["exec", &name, "--", "/nonexistent/prog", "x"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("/nonexistent/prog") && err.contains("No such file"),
        "{err}"
    );

    // exec while someone sits on the console, typing: neither waits for
    // the other.
    let mut con = ConsoleClient::attach(&b, &["console", &name]);
    let mut watcher = ConsoleClient::attach(&b, &["console", "--read-only", &name]);
    let during = b
        .cmd(&["exec", &name, "--", "/bin/sh", "-c", "sleep 2; echo during"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("exec");
    con.type_(b"\necho con-$((6*7))\n");
    assert!(
        con.wait_for_within("con-42", Duration::from_secs(30)),
        "console: {:?}",
        con.seen
    );
    assert!(watcher.wait_for_within("con-42", Duration::from_secs(30)));
    let during = during.wait_with_output().expect("exec");
    assert_eq!(String::from_utf8_lossy(&during.stdout), "during\n");
    assert!(con.detach().success());
    assert!(watcher.detach().success());

    // Backup and restore go through exec, hence the agent: binary-safe.
    b.cli_ok(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "printf 'secret-config\\001\\377\\n' > /tmp/app.conf",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["backup", "--json", &name])).expect("json");
    let path = info["file"].as_str().expect("file").to_string();
    let sealed = std::fs::read(&path).expect("backup file");
    let plain = age::decrypt(&id, &sealed).expect("decrypts with the identity");
    assert_eq!(plain, b"secret-config\x01\xff\n");
    b.cli_ok(&[
        "restore",
        &name,
        &path,
        "--identity",
        idfile.to_str().expect("utf8"),
    ]);
    assert_eq!(
        b.cli(&["exec", &name, "--", "cat", "/tmp/restored"]).stdout,
        plain
    );

    // kill -9 the daemon: the VM's console and exec work through a new one.
    let pid = b.guest(&name).pid;
    b.kill_daemon();
    b.start_daemon();
    assert_eq!(b.guest(&name).pid, pid, "the VM was restarted");
    let mut con = ConsoleClient::attach(&b, &["console", &name]);
    con.type_(b"\necho after-kill-$((5*5))\n");
    assert!(
        con.wait_for_within("after-kill-25", Duration::from_secs(30)),
        "console after daemon restart: {:?}",
        con.seen
    );
    let v = exec_json(&b, &name, &["/bin/sh", "-c", "echo again"]);
    assert_eq!(v["channel"], "agent");
    assert_eq!(v["stdout"], b64.encode("again\n"));

    // Without the agent (killed from the console), exec falls back to the
    // serial console, still exact.
    con.type_(b"kill $(pidof qemu-ga); echo agent-$((1+1))-gone\n");
    assert!(con.wait_for_within("agent-2-gone", Duration::from_secs(30)));
    assert!(con.detach().success());
    let v = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let v = exec_json(
            &b,
            &name,
            &["/bin/sh", "-c", "echo fell-back; echo e >&2; exit 4"],
        );
        (v["channel"] == "console").then_some(v)
    })
    .expect("exec did not fall back to the console");
    assert_eq!(v["exit_code"], 4);
    assert_eq!(v["stdout"], b64.encode("fell-back\n"));
    assert_eq!(v["stderr"], b64.encode("e\n"));
}

/// exec over the serial console asked the moment the VM is created, while
/// it still boots (no agent, no exec port): the console waits for a shell at
/// its prompt before typing the command. Typed earlier, the start of the
/// line was lost and what was left (an open quote) kept the shell waiting
/// until the exec timed out.
#[test]
fn console_exec_while_the_vm_boots() {
    if !require("console_exec_while_the_vm_boots", CAPS) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("cb");
    let b = Berth::new(&tag);
    let name = format!("{tag}-v");
    let g = vm(&name, 12, &fx, "").replace(" berth.fetch={inet}", " berth.noqga berth.noexecport");
    let file = b.write("spec.toml", &spec(b.net.uplink(), 84, &g));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);
    let started = std::time::Instant::now();
    let out = b
        .cmd(&[
            "exec",
            "--json",
            "--timeout",
            "120",
            &name,
            "--",
            "echo",
            "it's up",
        ])
        .output()
        .expect("berth exec");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "exec --json: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            b.daemon_log()
        )
    });
    assert_eq!(v["channel"], "console", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    use base64::Engine as _;
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(v["stdout"].as_str().expect("stdout"))
        .expect("base64");
    assert_eq!(String::from_utf8_lossy(&stdout), "it's up\n");
    eprintln!(
        "console exec right after create answered in {:?}",
        started.elapsed()
    );
    // The console is usable afterwards (no shell left in a continuation).
    let again = exec_json(&b, &name, &["echo", "again"]);
    assert_eq!(again["exit_code"], 0, "{again}");
    b.cli_ok(&["destroy", "--all", "--yes"]);
}
