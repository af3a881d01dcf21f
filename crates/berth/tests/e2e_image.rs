//! Images end to end: a loopback HTTP server inside the test's host
//! namespace serves a (gzip'd) root disk and its checksum file; berth pulls
//! and verifies it, makes a qcow2 overlay and a raw copy from it, attaches a
//! NoCloud seed and a files seed, and the fixture guests boot from the disks
//! and print the seed files on their consoles.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_testkit::{Cap, in_netns, require, unique_tag, vm_fixture, wait_until};
use common::{Berth, spec};

const CAPS: &[Cap] = &[Cap::Root, Cap::Netns, Cap::Nft, Cap::Qemu];

/// Serves `files` on 127.0.0.1 of network namespace `ns`; returns the port
/// and the log of request paths.
fn serve_in(ns: &str, files: Vec<(String, Vec<u8>)>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = in_netns(ns, || TcpListener::bind("127.0.0.1:0"))
        .expect("enter netns")
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let log2 = log.clone();
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (files, log) = (files.clone(), log2.clone());
            std::thread::spawn(move || {
                let mut c = c;
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock().expect("lock").push(path.clone());
                match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = c.write_all(body);
                    }
                    None => {
                        let _ = c.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            });
        }
    });
    (port, log)
}

fn sha256(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn console(b: &Berth, guest: &str) -> String {
    std::fs::read_to_string(b.state.join(format!("guests/{guest}/console.log"))).unwrap_or_default()
}

fn wait_console(b: &Berth, guest: &str, needle: &str) {
    let seen = wait_until(Duration::from_secs(240), Duration::from_millis(500), || {
        console(b, guest).contains(needle).then_some(())
    });
    assert!(
        seen.is_some(),
        "{guest}: no {needle:?} on the console:\n{}\ndaemon log:\n{}",
        console(b, guest),
        b.daemon_log()
    );
}

#[test]
fn vms_boot_from_pulled_images_with_seeds() {
    if !require("vms_boot_from_pulled_images_with_seeds", CAPS) {
        return;
    }
    let fx = vm_fixture().expect("VM fixture");
    let tag = unique_tag("im");
    let b = Berth::new(&tag);
    // The root disk, gzip'd, with a checksum file in sha256sum format.
    let gz = b.dir.path().join("root.img.gz");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -1 -c '{}' > '{}'",
            fx.disk.display(),
            gz.display()
        ))
        .status()
        .expect("gzip");
    assert!(out.success());
    let gz_sha = sha256(&gz);
    let sums = format!("{}  other.iso\n{gz_sha}  root.img.gz\n", "0".repeat(64));
    let (port, requests) = serve_in(
        b.net.host_ns(),
        vec![
            ("/root.img.gz".into(), std::fs::read(&gz).expect("read")),
            ("/SHA256SUMS".into(), sums.into_bytes()),
        ],
    );
    let config = b.write(
        "config.xml",
        "<pfsense><version>berth-files-seed-7</version></pfsense>",
    );
    let (va, vb) = (format!("{tag}-a"), format!("{tag}-b"));
    let images = format!(
        "[image.root]\nurl = \"http://127.0.0.1:{port}/root.img.gz\"\nsha256_url = \"http://127.0.0.1:{port}/SHA256SUMS\"\n\n\
         [image.kernel]\nurl = \"file://{}\"\nsha256 = \"{}\"\n\n",
        fx.kernel.display(),
        sha256(&fx.kernel)
    );
    let vm = |name: &str, index: u32, disk: &str, seed: &str, show: &str| {
        format!(
            "[guest.{name}]\nkind = \"vm\"\nindex = {index}\naccel = \"tcg\"\nkernel = \"image:kernel\"\ninitrd = \"{}\"\n\
             cmdline = \"console=ttyS0 panic=-1 berth.root=/dev/vda berth.showseed={show}\"\nmemory = \"256M\"\nstop_timeout = \"2s\"\n\
             disks = [{disk}]\nseed = {seed}\n\n",
            fx.initrd.display()
        )
    };
    let guests = |root_a: &str| {
        format!(
            "{images}{}{}",
            vm(
                &va,
                10,
                &format!("{{ image = \"{root_a}\", size = \"64M\" }}"),
                "{ kind = \"nocloud\", user_data = \"#cloud-config\\n# berth-nocloud-seed-42\\n\" }",
                "CIDATA:user-data"
            ),
            vm(
                &vb,
                11,
                "{ image = \"root\", size = \"40M\", format = \"raw\" }",
                &format!(
                    "{{ kind = \"files\", label = \"CONFIG\", files = {{ \"config.xml\" = \"{}\" }} }}",
                    config.display()
                ),
                "CONFIG:config.xml"
            )
        )
    };
    let file = b.write("spec.toml", &spec(b.net.uplink(), 81, &guests("root")));
    let file = file.to_str().expect("utf8");
    let out = b.cli_ok(&["apply", "--yes", file]);
    assert!(out.contains("applied"), "{out}");

    // Both boot from their disks (qcow2 overlay, raw copy) and see their seeds.
    wait_console(&b, &va, "berth-fixture: disk root");
    wait_console(&b, &va, "berth-nocloud-seed-42");
    wait_console(&b, &vb, "berth-fixture: disk root");
    wait_console(&b, &vb, "berth-files-seed-7");
    // One download for two guests, and a checksum file fetched once.
    let reqs = requests.lock().expect("lock").clone();
    assert_eq!(
        reqs.iter().filter(|r| *r == "/root.img.gz").count(),
        1,
        "{reqs:?}"
    );
    assert_eq!(
        reqs.iter().filter(|r| *r == "/SHA256SUMS").count(),
        1,
        "{reqs:?}"
    );

    let disk_a = b.state.join(format!("disks/{va}/disk0.qcow2"));
    let disk_b = b.state.join(format!("disks/{vb}/disk0.raw"));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&disk_a)
        .output()
        .expect("qemu-img");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"backing-filename\"") && info.contains("/images/derived/"),
        "{info}"
    );
    assert_eq!(
        std::fs::metadata(&disk_b).expect("raw disk").len(),
        40 << 20
    );
    let inode_a = std::fs::metadata(&disk_a).expect("disk a").ino();

    // Re-applying changes nothing and makes no request.
    let out = b.cli_ok(&["apply", "--yes", file]);
    assert!(
        out.contains("No changes") || out.contains("applied"),
        "{out}"
    );
    assert_eq!(requests.lock().expect("lock").len(), reqs.len());
    assert_eq!(std::fs::metadata(&disk_a).expect("disk a").ino(), inode_a);

    // `image ls --json` shows the download and what was made from it.
    let ls: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["image", "ls", "--json"])).expect("json");
    let entries = ls.as_array().expect("array");
    let root = entries
        .iter()
        .find(|e| e["sha256"] == gz_sha.as_str())
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(root["derived"][0]["transform"], "decompress=gz", "{ls}");
    // gc keeps everything in use.
    let gc = b.cli_ok(&["image", "gc"]);
    assert!(gc.contains("nothing to remove"), "{gc}");

    // Another image behind a's disk: planned as replace, refused without
    // --allow-disruption, nothing touched.
    let raw = format!(
        "[image.plain]\nurl = \"file://{}\"\nsha256 = \"{}\"\n\n",
        fx.disk.display(),
        sha256(&fx.disk)
    );
    let file2 = b.write(
        "spec2.toml",
        &spec(b.net.uplink(), 81, &format!("{raw}{}", guests("plain"))),
    );
    let file2 = file2.to_str().expect("utf8");
    let plan = b.cli_ok(&["plan", file2]);
    assert!(
        plan.contains("replace") && plan.contains("made anew"),
        "{plan}"
    );
    let out = b.cli(&["apply", "--yes", file2]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow-disruption") && err.contains("disk0.qcow2"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&disk_a).expect("disk a").ino(), inode_a);
    assert_eq!(b.guest(&va).state, "running");

    // A wrong hash: a clear error naming both, nothing cached, from the CLI.
    let bad = b.write(
        "bad.toml",
        &spec(
            b.net.uplink(),
            81,
            &format!(
                "[image.bad]\nurl = \"http://127.0.0.1:{port}/root.img.gz\"\nsha256 = \"{}\"\n",
                "ab".repeat(32)
            ),
        ),
    );
    let out = b.cli(&["image", "pull", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&"ab".repeat(32)) && err.contains(&gz_sha),
        "{err}"
    );
    assert!(
        std::fs::read_dir(b.state.join("images/partial"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );

    // A disk smaller than its image: refused before anything is touched.
    let small = format!(
        "{}[guest.{tag}-c]\nkind = \"vm\"\nindex = 12\naccel = \"tcg\"\nkernel = \"image:kernel\"\ndisks = [{{ image = \"root\", size = \"8M\" }}]\n",
        guests("root")
    );
    let file3 = b.write("small.toml", &spec(b.net.uplink(), 81, &small));
    let out = b.cli(&["apply", "--yes", file3.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("smaller than the image"), "{err}");
    assert!(!b.state.join(format!("disks/{tag}-c")).exists());
    assert_eq!(b.ps().len(), 2);

    // Destroy removes the guests and their disks; gc then empties the cache.
    b.cli_ok(&["destroy", "--all", "--yes"]);
    assert!(!disk_a.exists() && !disk_b.exists());
    let gc = b.cli_ok(&["image", "gc"]);
    assert!(gc.contains("removed"), "{gc}");
    let ls = b.cli_ok(&["image", "ls", "--json"]);
    assert_eq!(ls.trim(), "[]", "{ls}");
}
