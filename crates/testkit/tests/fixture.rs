#![allow(clippy::unwrap_used)]

use std::fs;
use std::process::Command;

use berth_testkit::{Cap, busybox_rootfs, copy_busybox_rootfs, require};

#[test]
fn busybox_rootfs_layout() {
    if !require("busybox_rootfs_layout", &[Cap::Busybox]) {
        return;
    }
    // Two threads asking at once get the same, complete tree.
    let t = std::thread::spawn(busybox_rootfs);
    let root = busybox_rootfs();
    assert_eq!(t.join().unwrap(), root);

    let bb = root.join("usr/bin/busybox");
    assert!(fs::symlink_metadata(&bb).unwrap().file_type().is_file());
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap().to_str(),
        Some("usr/bin")
    );
    assert_eq!(
        fs::read_link(root.join("sbin")).unwrap().to_str(),
        Some("usr/bin")
    );
    assert_eq!(
        fs::read_link(root.join("usr/bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    assert!(root.join("bin/httpd").exists());
    let os = fs::read_to_string(root.join("etc/os-release")).unwrap();
    assert!(os.lines().any(|l| l == "ID=busybox"), "{os}");
    assert!(
        fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:")
    );
    assert!(
        fs::read_to_string(root.join("etc/group"))
            .unwrap()
            .starts_with("root:x:0:")
    );
    for d in ["proc", "sys", "dev", "run", "tmp", "var", "www"] {
        assert!(root.join(d).is_dir(), "{d}");
    }
    assert_eq!(
        fs::read_to_string(root.join("www/index.html")).unwrap(),
        "berth-fixture\n"
    );

    // Runs through the rootfs's own sh.
    let out = Command::new(root.join("bin/sh"))
        .args(["-c", "echo ok"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn busybox_rootfs_boots_under_nspawn() {
    if !require(
        "busybox_rootfs_boots_under_nspawn",
        &[Cap::Root, Cap::Busybox, Cap::Nspawn],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    copy_busybox_rootfs(&root).unwrap();
    let out = Command::new("systemd-nspawn")
        .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .args([
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--private-network",
            "-D",
        ])
        .arg(&root)
        .args(["/bin/cat", "/www/index.html"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nspawn: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "berth-fixture\n");
}
