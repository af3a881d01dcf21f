//! The cache against a real HTTP server on loopback: verification, resume,
//! one download for concurrent pulls, clear errors that leave nothing behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_image::{Cache, Event, ImageError};
use berth_spec::image::{Checksum, Decompress, Image};
use sha2::{Digest, Sha256};

/// A tiny HTTP/1.1 server: serves `files` by path, honours `Range:
/// bytes=N-`, counts requests, can cut the first `drops` full responses
/// half-way, and can go slowly.
#[derive(Clone)]
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    drops: Arc<AtomicUsize>,
}

struct Conf {
    files: Vec<(String, Vec<u8>)>,
    delay_per_chunk: Duration,
}

impl Server {
    fn start(files: Vec<(&str, Vec<u8>)>, drops: usize, delay: Duration) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let s = Server {
            port,
            requests: Arc::default(),
            drops: Arc::new(AtomicUsize::new(drops)),
        };
        let conf = Arc::new(Conf {
            files: files.into_iter().map(|(p, b)| (p.to_string(), b)).collect(),
            delay_per_chunk: delay,
        });
        let s2 = s.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (s3, conf) = (s2.clone(), conf.clone());
                std::thread::spawn(move || s3.serve(c, &conf));
            }
        });
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn count(&self, prefix: &str) -> usize {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    fn serve(&self, mut c: TcpStream, conf: &Conf) {
        let mut r = BufReader::new(c.try_clone().expect("clone"));
        let mut first = String::new();
        if r.read_line(&mut first).is_err() {
            return;
        }
        let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                range = v.trim().trim_end_matches('-').parse::<usize>().ok();
            }
        }
        self.requests.lock().expect("lock").push(format!(
            "{path} {}",
            range.map_or("full".into(), |r| format!("from={r}"))
        ));
        let Some((_, body)) = conf.files.iter().find(|(p, _)| *p == path) else {
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        };
        let from = range.unwrap_or(0).min(body.len());
        let part = &body[from..];
        let head = if range.is_some() {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                part.len(),
                body.len().saturating_sub(1),
                body.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                part.len()
            )
        };
        let _ = c.write_all(head.as_bytes());
        let drop_now = self
            .drops
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        let cut = if drop_now { part.len() / 2 } else { part.len() };
        for chunk in part[..cut].chunks(64 << 10) {
            if c.write_all(chunk).is_err() {
                return;
            }
            if !conf.delay_per_chunk.is_zero() {
                std::thread::sleep(conf.delay_per_chunk);
            }
        }
        let _ = c.flush();
        if drop_now {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn image(name: &str, url: String, checksum: Checksum) -> Image {
    Image {
        name: name.into(),
        url,
        checksum,
        decompress: Decompress::Auto,
        extract_iso: None,
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn quiet() -> impl FnMut(Event) {
    |_| {}
}

#[test]
fn pull_verifies_caches_and_second_pull_makes_no_request() {
    let body = payload(3 << 20);
    let srv = Server::start(vec![("/disk.img", body.clone())], 0, Duration::ZERO);
    let state = tempfile::tempdir().expect("tmp");
    let cache = Cache::new(state.path());
    let img = image("disk", srv.url("/disk.img"), Checksum::Sha256(sha(&body)));
    let p = cache.pull(&img, false, &mut quiet()).expect("pull");
    assert_eq!(p, cache.blob(&sha(&body)));
    assert_eq!(std::fs::read(&p).expect("read"), body);
    assert_eq!(srv.count("/disk.img"), 1);
    let p2 = cache.pull(&img, false, &mut quiet()).expect("pull again");
    assert_eq!(p, p2);
    assert_eq!(srv.count("/disk.img"), 1, "second pull made a request");
    assert_eq!(cache.resolve(&img).expect("resolve"), p);
    let ls = cache.list().expect("ls");
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0].names, ["disk"]);
    assert_eq!(ls[0].urls, [srv.url("/disk.img")]);
}

#[test]
fn wrong_hash_names_both_and_leaves_nothing() {
    let body = payload(100_000);
    let srv = Server::start(vec![("/x.img", body.clone())], 0, Duration::ZERO);
    let state = tempfile::tempdir().expect("tmp");
    let cache = Cache::new(state.path());
    let wrong = "0".repeat(64);
    let e = cache
        .pull(
            &image("x", srv.url("/x.img"), Checksum::Sha256(wrong.clone())),
            false,
            &mut quiet(),
        )
        .expect_err("must fail");
    let msg = e.to_string();
    assert!(matches!(e, ImageError::Mismatch { .. }), "{msg}");
    assert!(msg.contains(&wrong) && msg.contains(&sha(&body)), "{msg}");
    assert!(files_in(&cache.root().join("sha256")).is_empty());
    assert!(files_in(&cache.root().join("partial")).is_empty());
}

#[test]
fn dropped_connection_resumes_with_range_and_verifies() {
    let body = payload(2 << 20);
    // Every attempt of the first pull is cut: the partial file stays, and
    // the next pull resumes it.
    let srv = Server::start(vec![("/big.img", body.clone())], 4, Duration::ZERO);
    let state = tempfile::tempdir().expect("tmp");
    let cache = Cache::new(state.path());
    let img = image("big", srv.url("/big.img"), Checksum::Sha256(sha(&body)));
    let mut retries = 0;
    let e = cache
        .pull(&img, false, &mut |ev| {
            if matches!(ev, Event::Retry { .. }) {
                retries += 1
            }
        })
        .expect_err("all three attempts are cut");
    assert!(e.to_string().contains("connection"), "{e}");
    assert_eq!(retries, 2);
    assert_eq!(files_in(&cache.root().join("partial")).len(), 1);
    assert!(srv.count("/big.img from=") >= 2, "{:?}", srv.requests);
    let p = cache.pull(&img, false, &mut quiet()).expect("resumed pull");
    assert_eq!(std::fs::read(p).expect("read"), body);
    assert!(files_in(&cache.root().join("partial")).is_empty());
}

#[test]
fn concurrent_pulls_download_once() {
    let body = payload(1 << 20);
    let srv = Server::start(vec![("/c.img", body.clone())], 0, Duration::from_millis(30));
    let state = tempfile::tempdir().expect("tmp");
    let img = image("c", srv.url("/c.img"), Checksum::Sha256(sha(&body)));
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (img, root) = (img.clone(), state.path().to_path_buf());
            std::thread::spawn(move || Cache::new(&root).pull(&img, false, &mut |_| {}))
        })
        .collect();
    for h in handles {
        h.join().expect("join").expect("pull");
    }
    assert_eq!(srv.count("/c.img"), 1, "{:?}", srv.requests);
}

#[test]
fn sha256_url_gnu_file_and_404() {
    let body = payload(5000);
    let sums = format!("{}  other.img\n{} *s.img\n", "1".repeat(64), sha(&body));
    let srv = Server::start(
        vec![("/s.img", body.clone()), ("/SHA256SUMS", sums.into_bytes())],
        0,
        Duration::ZERO,
    );
    let state = tempfile::tempdir().expect("tmp");
    let cache = Cache::new(state.path());
    let img = image(
        "s",
        srv.url("/s.img"),
        Checksum::Url(srv.url("/SHA256SUMS")),
    );
    cache.pull(&img, true, &mut quiet()).expect("pull");
    // An apply reuses the hash found: no request at all.
    let before = srv.requests.lock().expect("lock").len();
    cache.pull(&img, false, &mut quiet()).expect("pull");
    assert_eq!(srv.requests.lock().expect("lock").len(), before);
    assert!(cache.resolve(&img).is_ok());

    let e = cache
        .pull(
            &image("n", srv.url("/nope.img"), Checksum::Sha256("2".repeat(64))),
            false,
            &mut quiet(),
        )
        .expect_err("404");
    assert!(e.to_string().contains("404"), "{e}");
    let e = cache
        .pull(
            &image(
                "m",
                srv.url("/missing.img"),
                Checksum::Url(srv.url("/SHA256SUMS")),
            ),
            true,
            &mut quiet(),
        )
        .expect_err("not listed");
    assert!(e.to_string().contains("other.img, s.img"), "{e}");
}

#[test]
fn unreachable_server_and_tls_errors_are_clear() {
    let state = tempfile::tempdir().expect("tmp");
    let cache = Cache::new(state.path());
    // A plain-HTTP server spoken to with TLS: a TLS error, not a hang.
    let srv = Server::start(vec![("/t.img", vec![1, 2, 3])], 0, Duration::ZERO);
    let e = cache
        .pull(
            &image(
                "t",
                format!("https://127.0.0.1:{}/t.img", srv.port),
                Checksum::Sha256("a".repeat(64)),
            ),
            false,
            &mut quiet(),
        )
        .expect_err("tls");
    assert!(e.to_string().to_lowercase().contains("127.0.0.1"), "{e}");
    assert!(files_in(&cache.root().join("sha256")).is_empty());
}

#[test]
fn file_url_gz_decompressed_and_gc() {
    use std::io::Write as _;
    let plain = payload(300_000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).expect("gz");
    let gz = gz.finish().expect("gz");
    let d = tempfile::tempdir().expect("tmp");
    let src = d.path().join("disk.img.gz");
    std::fs::write(&src, &gz).expect("write");
    let cache = Cache::new(&d.path().join("state"));
    let img = image(
        "d",
        format!("file://{}", src.display()),
        Checksum::Sha256(sha(&gz)),
    );
    let art = cache.pull(&img, false, &mut quiet()).expect("pull");
    assert_ne!(art, cache.blob(&sha(&gz)));
    assert_eq!(std::fs::read(&art).expect("read"), plain);
    assert_eq!(cache.resolve(&img).expect("resolve"), art);
    let ls = cache.list().expect("ls");
    assert_eq!(ls[0].derived.len(), 1);
    assert_eq!(ls[0].derived[0].transform, "decompress=gz");
    // Named for the wrong format: a clear error, nothing cached.
    let bad = Image {
        decompress: Decompress::Xz,
        ..img.clone()
    };
    let e = cache.pull(&bad, false, &mut quiet()).expect_err("not xz");
    assert!(e.to_string().contains("cannot decompress as xz"), "{e}");
    assert_eq!(cache.list().expect("ls")[0].derived.len(), 1);
    // gc keeps what is named, removes the rest.
    let keep = [sha(&gz)].into_iter().collect();
    assert!(cache.gc(&keep).expect("gc").is_empty());
    let removed = cache.gc(&Default::default()).expect("gc");
    assert!(removed.len() >= 3, "{removed:?}");
    assert!(cache.list().expect("ls").is_empty());
}

#[test]
fn iso_extraction_from_an_iso_the_test_makes() {
    let d = tempfile::tempdir().expect("tmp");
    let tree = d.path().join("tree");
    std::fs::create_dir_all(tree.join("boot/grub")).expect("mkdir");
    let kernel = payload(700_000);
    std::fs::write(tree.join("boot/vmlinuz"), &kernel).expect("write");
    std::fs::write(tree.join("boot/grub/A-Long-Mixed-Case.name.cfg"), b"menu").expect("write");
    let iso = d.path().join("inst.iso");
    let made = std::process::Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-J",
            "-V",
            "BERTHTEST",
            "-o",
        ])
        .arg(&iso)
        .arg(&tree)
        .status();
    match made {
        Ok(s) if s.success() => {}
        other => {
            if std::env::var("BERTH_E2E_REQUIRED").is_ok_and(|v| v == "1") {
                panic!(
                    "xorriso is needed to make the test ISO: {other:?} (apt-get install xorriso)"
                );
            }
            eprintln!("skip iso_extraction: no xorriso ({other:?})");
            return;
        }
    }
    let mut out = Vec::new();
    let n = berth_image::iso::extract("inst", &iso, "/boot/vmlinuz", &mut out).expect("extract");
    assert_eq!(n as usize, kernel.len());
    assert_eq!(out, kernel);
    let mut out = Vec::new();
    berth_image::iso::extract(
        "inst",
        &iso,
        "/boot/grub/A-Long-Mixed-Case.name.cfg",
        &mut out,
    )
    .expect("rock ridge name");
    assert_eq!(out, b"menu");
    let e = berth_image::iso::extract("inst", &iso, "/boot/initrd.gz", &mut Vec::new())
        .expect_err("absent");
    let msg = e.to_string();
    assert!(
        msg.contains("/boot/initrd.gz is not in the ISO") && msg.contains("vmlinuz"),
        "{msg}"
    );
    let e = berth_image::iso::extract("inst", &tree.join("boot/vmlinuz"), "/x", &mut Vec::new())
        .expect_err("not an iso");
    assert!(e.to_string().contains("not an ISO 9660 image"), "{e}");

    // Through the cache: file:// + extract, cached once.
    let cache = Cache::new(&d.path().join("state"));
    let img = Image {
        extract_iso: Some("/boot/vmlinuz".into()),
        ..image(
            "vmlinuz",
            format!("file://{}", iso.display()),
            Checksum::Sha256(berth_image::cache::hash_file(&iso).expect("hash")),
        )
    };
    let art = cache.pull(&img, false, &mut quiet()).expect("pull");
    assert_eq!(std::fs::read(&art).expect("read"), kernel);
    let missing = Image {
        extract_iso: Some("/nope".into()),
        ..img
    };
    assert!(cache.pull(&missing, false, &mut quiet()).is_err());
    assert!(
        files_in(&cache.root().join("derived"))
            .iter()
            .all(|f| !f.starts_with(".tmp")),
        "temp files left behind"
    );
}
