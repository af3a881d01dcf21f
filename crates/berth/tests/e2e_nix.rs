//! Nix closures to guests, end to end: `berth copy-closure` into a container
//! that has a working `nix-store` (the host's nix-bin binaries and libraries
//! copied into a busybox rootfs), and the host's store served to a guest as
//! a binary cache (`nix_cache = true`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_testkit::{
    Cap, busybox_rootfs, copy_busybox_rootfs, require, unique_tag, vm_fixture, wait_until,
};
use common::{Berth, container, spec};

const CAPS: &[Cap] = &[
    Cap::Root,
    Cap::Netns,
    Cap::Nspawn,
    Cap::Nft,
    Cap::Busybox,
    Cap::Nix,
];

/// Nix settings for a host (and guest) without a Nix daemon or build users.
const NIX_CONF: &str = "build-users-group =\nsandbox = false\n";

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Copies `src` (following symlinks) to the same path under `root`.
fn copy_in(root: &Path, src: &Path) {
    let dest = root.join(src.strip_prefix("/").expect("absolute"));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(src, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// A busybox rootfs plus the host's `nix` binary (as nix-store) and every
/// library it loads, an empty /nix, and a nix.conf for a daemon-less store.
fn nix_rootfs(dest: &Path) {
    copy_busybox_rootfs(dest).expect("copy busybox rootfs");
    add_nix(dest);
}

/// The host's `nix` binary (as /usr/bin/nix-store) and every library it
/// loads, at their host paths under `dest`, an empty /nix and a nix.conf
/// for a daemon-less store.
fn add_nix(dest: &Path) {
    std::fs::create_dir_all(dest.join("usr/bin")).expect("mkdir usr/bin");
    let nix_store = PathBuf::from(sh(Command::new("sh").args(["-c", "command -v nix-store"])));
    let nix = std::fs::canonicalize(&nix_store).expect("nix binary");
    let ldd = sh(Command::new("ldd").arg(&nix));
    let libs: Vec<PathBuf> = ldd
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = l
                .split_once("=> ")
                .map(|(_, r)| r)
                .unwrap_or(l)
                .split_whitespace()
                .next()?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect();
    assert!(libs.len() > 3, "ldd found too little: {ldd}");
    for lib in &libs {
        let real = std::fs::canonicalize(lib).expect("library");
        let dest_lib = dest.join(lib.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dest_lib.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&real, &dest_lib).expect("copy library");
    }
    copy_in(dest, &nix);
    let bin = dest.join("usr/bin/nix-store");
    let _ = std::fs::remove_file(&bin);
    std::os::unix::fs::symlink(&nix, &bin).expect("symlink nix-store");
    for d in ["nix/store", "nix/var/nix", "etc/nix"] {
        std::fs::create_dir_all(dest.join(d)).expect("mkdir");
    }
    // Only the substituters berth gives (no cache.nixos.org: no internet).
    std::fs::write(
        dest.join("etc/nix/nix.conf"),
        format!("{NIX_CONF}substituters =\n"),
    )
    .expect("nix.conf");
}

/// Builds a closure of three store paths on the host: `top` refers to a
/// 3 MiB random file (more than a JSON exec body may carry) and a small
/// text. Returns (top, big file path in the store, big file's sha256).
fn make_closure(dir: &Path, nonce: &str) -> (String, String, String) {
    let big = dir.join("big.bin");
    sh(Command::new("head")
        .args(["-c", "3145728", "/dev/urandom"])
        .stdout(std::fs::File::create(&big).expect("big")));
    let expr = dir.join("closure.nix");
    std::fs::write(
        &expr,
        format!(
            r#"let
  dep = builtins.toFile "berth-e2e-dep" "{nonce}";
  big = builtins.path {{ path = {}; name = "berth-e2e-big-{nonce}"; }};
in derivation {{
  name = "berth-e2e-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${{dep}} ${{big}} > $out" ];
}}
"#,
            big.display()
        ),
    )
    .expect("write expr");
    let top = sh(Command::new("nix-build")
        .arg(&expr)
        .arg("--no-out-link")
        .env("NIX_CONFIG", NIX_CONF));
    let refs = sh(Command::new("nix-store").args(["--query", "--references", &top]));
    let big_path = refs
        .lines()
        .find(|l| l.contains("berth-e2e-big"))
        .expect("big file in the closure")
        .to_string();
    let sum = sh(Command::new("sha256sum").arg(&big));
    let sum = sum.split_whitespace().next().expect("sum").to_string();
    (top, big_path, sum)
}

/// `top` and `big` are valid in `guest`'s Nix store and `big` has the
/// host's content.
fn assert_arrived(b: &Berth, guest: &str, top: &str, big: &str, big_sum: &str) {
    let check = b.cli(&["exec", guest, "--", "nix-store", "--verify-path", top, big]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let sum = b.cli_ok(&["exec", guest, "--", "sha256sum", big]);
    assert_eq!(sum.split_whitespace().next(), Some(big_sum));
}

#[test]
fn copy_closure_into_a_container_without_network() {
    if !require("copy_closure_into_a_container_without_network", CAPS) {
        return;
    }
    let tag = unique_tag("cc");
    let b = Berth::new(&tag);
    let rootfs = b.dir.path().join("rootfs-nix");
    nix_rootfs(&rootfs);
    let (top, big, big_sum) = make_closure(b.dir.path(), &tag);
    let name = format!("{tag}-n");
    let plain = format!("{tag}-p");
    let guests = container(&name, 9, &rootfs, "") + &container(&plain, 10, &busybox_rootfs(), "");
    let file = b.write("spec.toml", &spec(b.net.uplink(), 67, &guests));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // First copy: all three paths travel, through nsenter.
    let out = b.cli_ok(&["copy-closure", &name, &top, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["closure"], 3, "{v}");
    assert_eq!(v["copied"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["already_valid"], 0);
    assert_eq!(v["channel"], "nsenter");
    assert!(v["bytes"].as_u64().unwrap_or(0) > 3 << 20, "{v}");

    // They arrived intact and are registered valid in the guest's store.
    assert_arrived(&b, &name, &top, &big, &big_sum);
    let refs = b.cli_ok(&["exec", &name, "--", "nix-store", "-q", "--references", &top]);
    assert!(refs.contains(&big), "{refs}");

    // Again: nothing to send.
    let again = b.cli_ok(&["copy-closure", &name, &top]);
    assert!(again.contains("nothing to copy"), "{again}");
    assert!(again.contains("all 3 path(s)"), "{again}");

    // Bad input: one clear error each, nothing copied.
    let nix_less = b.cli(&["copy-closure", &plain, &top]);
    assert!(!nix_less.status.success());
    let err = String::from_utf8_lossy(&nix_less.stderr);
    assert!(err.contains("has no nix-store"), "{err}");
    let outside = b.dir.path().join("big.bin");
    let bad = b.cli(&["copy-closure", &name, outside.to_str().expect("utf8")]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("valid path in this host's Nix store"), "{err}");
    let nobody = b.cli(&["copy-closure", "nosuchguest", &top]);
    assert!(!nobody.status.success());

    // The host's store keeps no garbage from this test (best effort).
    b.cli_ok(&["destroy", "--all", "--yes"]);
    let _ = Command::new("nix-store")
        .args(["--delete", &top, &big])
        .env("NIX_CONFIG", NIX_CONF)
        .output();
}

#[test]
fn nix_cache_serves_the_host_store_to_a_guest() {
    if !require("nix_cache_serves_the_host_store_to_a_guest", CAPS) {
        return;
    }
    let tag = unique_tag("nc");
    let b = Berth::new(&tag);
    let rootfs = b.dir.path().join("rootfs-nix");
    nix_rootfs(&rootfs);
    let (top, big, big_sum) = make_closure(b.dir.path(), &tag);
    let name = format!("{tag}-n");
    let plain = format!("{tag}-p");
    let guests = container(&name, 9, &rootfs, "nix_cache = true")
        + &container(&plain, 10, &busybox_rootfs(), "");
    let file = b.write("spec.toml", &spec(b.net.uplink(), 68, &guests));
    let plan = b.cli_ok(&["plan", file.to_str().expect("utf8")]);
    assert!(plan.contains(&name), "{plan}");
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);

    // The guest is told where the cache is; the host answers on its link.
    let env = b.cli_ok(&[
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo $BERTH_NIX_CACHE; echo $NIX_CONFIG",
    ]);
    assert!(env.contains("http://10.68.0.0:5480"), "{env}");
    assert!(
        env.contains("extra-substituters = http://10.68.0.0:5480"),
        "{env}"
    );
    let fetch = |guest: &str, url: &str| {
        b.cmd(&["exec", guest, "--", "wget", "-q", "-O", "-", url])
            .output()
            .expect("exec wget")
    };
    let info = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let o = fetch(&name, "http://10.68.0.0:5480/nix-cache-info");
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    })
    .expect("the guest reaches the cache");
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    let hash = top
        .trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .expect("hash part");
    let narinfo = fetch(&name, &format!("http://10.68.0.0:5480/{hash}.narinfo"));
    let narinfo = String::from_utf8_lossy(&narinfo.stdout);
    assert!(narinfo.contains(&format!("StorePath: {top}")), "{narinfo}");
    assert!(narinfo.contains("NarHash: sha256:"), "{narinfo}");
    assert!(narinfo.contains("berth-e2e-big"), "references: {narinfo}");
    // A guest that did not ask for the cache gets nothing.
    let denied = fetch(&plain, "http://10.68.0.0:5480/nix-cache-info");
    assert!(!denied.status.success());

    // The guest's Nix substitutes the whole closure from the host (the
    // top path is input-addressed and unsigned here, hence require-sigs).
    let real = b.cli(&[
        "exec",
        &name,
        "--",
        "nix-store",
        "--realise",
        &top,
        "--option",
        "require-sigs",
        "false",
    ]);
    assert_eq!(
        real.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&real.stderr)
    );
    let check = b.cli(&[
        "exec",
        &name,
        "--",
        "nix-store",
        "--verify-path",
        &top,
        &big,
    ]);
    assert_eq!(check.status.code(), Some(0));
    let sum = b.cli_ok(&["exec", &name, "--", "sha256sum", &big]);
    assert_eq!(sum.split_whitespace().next(), Some(big_sum.as_str()));

    b.cli_ok(&["destroy", "--all", "--yes"]);
    let _ = Command::new("nix-store")
        .args(["--delete", &top, &big])
        .env("NIX_CONFIG", NIX_CONF)
        .output();
}

/// The same without any guest network, into a TCG microVM: the fixture's
/// root plus the host's nix-store on an ext4 disk the VM boots from
/// (`berth.root=/dev/vda`), the export stream through berth's exec to a VM
/// (guest agent, else the exec port or the console).
#[test]
fn copy_closure_into_a_vm_without_network() {
    let caps = [
        Cap::Root,
        Cap::Netns,
        Cap::Nft,
        Cap::Qemu,
        Cap::Busybox,
        Cap::Nix,
    ];
    if !require("copy_closure_into_a_vm_without_network", &caps) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("cv");
    let b = Berth::new(&tag);
    // The fixture's disk root, unpacked without mounting, plus Nix.
    let root = b.dir.path().join("vm-root");
    std::fs::create_dir_all(&root).expect("mkdir");
    sh(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", root.display()))
        .arg(&fx.disk));
    assert!(
        root.join("berth-disk-root").exists(),
        "fixture root not unpacked"
    );
    add_nix(&root);
    let disk = b.dir.path().join("vm-nix.img");
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&disk)
        .arg("256M"));
    let (top, big, big_sum) = make_closure(b.dir.path(), &tag);
    let name = format!("{tag}-v");
    let guest = format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = 11\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = \"console=ttyS0 panic=-1 berth.root=/dev/vda\"\nmemory = \"512M\"\nstop_timeout = \"2s\"\n\
         disks = [{{ path = \"{}\" }}]\n",
        fx.kernel.display(),
        fx.initrd.display(),
        disk.display()
    );
    let file = b.write("spec.toml", &spec(b.net.uplink(), 83, &guest));
    b.cli_ok(&["apply", "--yes", file.to_str().expect("utf8")]);
    // Booted from the disk, with a channel for exec. Asked at once, while
    // the VM still boots: before its agent runs, exec goes over the serial
    // console, which waits for a shell at its prompt (typed earlier, the
    // start of the line was lost and an open quote hung the shell).
    let mut last = String::new();
    let up = wait_until(Duration::from_secs(60), Duration::from_secs(1), || {
        let o = b.cli(&["exec", &name, "--", "nix-store", "--version"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o.status.success().then_some(())
    });
    if up.is_none() {
        let console = b.cli(&["logs", &name]);
        let console = String::from_utf8_lossy(&console.stdout).into_owned();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        panic!(
            "VM never ran nix-store: {last}\nconsole (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    let started = std::time::Instant::now();
    let out = b.cli_ok(&["copy-closure", &name, &top, "--json"]);
    let took = started.elapsed();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["closure"], 3, "{v}");
    assert_eq!(v["copied"].as_array().map(Vec::len), Some(3), "{v}");
    let channel = v["channel"].as_str().unwrap_or_default().to_string();
    assert!(
        ["agent", "exec-port", "console"].contains(&channel.as_str()),
        "{v}"
    );
    assert_arrived(&b, &name, &top, &big, &big_sum);
    let again = b.cli_ok(&["copy-closure", &name, &top]);
    assert!(again.contains("nothing to copy"), "{again}");
    eprintln!(
        "copy-closure into a TCG VM: channel {channel}, {} bytes in {took:?}",
        v["bytes"]
    );

    b.cli_ok(&["destroy", "--all", "--yes"]);
    let _ = Command::new("nix-store")
        .args(["--delete", &top, &big])
        .env("NIX_CONFIG", NIX_CONF)
        .output();
}
