//! The content-addressed image cache under `<state>/images`.
//!
//! ```text
//! images/
//!   sha256/<hash>              verified downloads, named by their SHA-256, never modified
//!   derived/<hash>-<key>       decompressed / extracted artifacts (key: hash of the transform)
//!   derived/<hash>-<key>.json  what an artifact was made from
//!   partial/<hash>.part        an interrupted download, resumed (HTTP Range) by the next pull
//!   refs/<key>.json            url (+ checksum url) -> hash, names, time of the last pull
//!   locks/<hash>.lock          flock: one downloader per hash, across processes
//!   gc.lock                    flock: pulls and applies shared, `gc` exclusive
//! ```
//!
//! A download goes to `partial/`, is hashed as it arrives, and only a
//! verified file is renamed into `sha256/`. A mismatch deletes the partial
//! file. Derived artifacts are built in a temp file and renamed into place,
//! so a disk overlay's backing file never changes under it; `kill -9` at any
//! point leaves either nothing or a resumable partial download.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_spec::image::{Checksum, Image};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decompress::{self, Format};
use crate::{ImageError, Result};

/// How many times one pull tries a download (resuming each time).
const ATTEMPTS: u32 = 3;
/// Largest checksum file berth reads.
const MAX_CHECKSUM_FILE: u64 = 4 << 20;

/// Progress of a pull, for a terminal bar or plain lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Fetching the checksum file of `image`.
    Checksum { image: String, url: String },
    /// Already cached: no request made.
    Cached { image: String, sha256: String },
    /// Downloading `url`; `from` > 0 when resuming.
    Download {
        image: String,
        url: String,
        total: Option<u64>,
        from: u64,
    },
    /// `done` of `total` bytes.
    Bytes { done: u64, total: Option<u64> },
    /// A download attempt failed and is retried (resuming).
    Retry { image: String, error: String },
    /// Verified and in the cache.
    Verified { image: String, sha256: String },
    /// Making a derived artifact (`what`: "decompressing xz", "extracting iso:/x").
    Derive { image: String, what: String },
    /// Waiting for another process that downloads the same file.
    Waiting { image: String },
}

/// Where progress goes.
pub type Progress<'a> = &'a mut dyn FnMut(Event);

/// What `ls` shows for one cached download.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
    /// URLs and image names it was pulled as.
    pub urls: Vec<String>,
    pub names: Vec<String>,
    /// Derived artifacts made from it.
    pub derived: Vec<Derived>,
    /// A resumable partial download (no verified file yet).
    #[serde(default)]
    pub partial: bool,
}

/// A derived artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Derived {
    pub transform: String,
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Ref {
    url: String,
    #[serde(default)]
    sha256_url: Option<String>,
    sha256: String,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DerivedMeta {
    source: String,
    transform: String,
}

/// The cache. Cheap to make; every method works on the files.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// An exclusive or shared `flock(2)` held until drop.
pub struct Lock {
    _flock: nix::fcntl::Flock<File>,
}

fn lock_file(path: &Path, exclusive: bool) -> Result<Lock> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ImageError::io("opening lock", path, e))?;
    let arg = if exclusive {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockShared
    };
    let flock = nix::fcntl::Flock::lock(f, arg)
        .map_err(|(_, e)| ImageError::io("locking", path, std::io::Error::from(e)))?;
    Ok(Lock { _flock: flock })
}

fn try_lock_file(path: &Path) -> Result<Option<Lock>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ImageError::io("opening lock", path, e))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(Some(Lock { _flock: flock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(ImageError::io("locking", path, std::io::Error::from(e))),
    }
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::io("writing", path, e));
    }
    Ok(())
}

fn temp_beside(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut name = std::ffi::OsString::from(".tmp-");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        "-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// A client for http(s): no overall limit (images are large), but a stalled
/// server is an error.
fn http_client() -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        // The blocking client applies this to the request and to each read
        // of the body separately, not to the whole download.
        .timeout(Duration::from_secs(60))
        .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ImageError::Fetch {
            url: String::new(),
            message: error_chain(&e),
        })
}

/// An error with its causes, "a: b: c" (reqwest hides the TLS reason in
/// its sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Cache {
    /// The cache under `state_dir/images`.
    pub fn new(state_dir: &Path) -> Cache {
        Cache {
            root: state_dir.join("images"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, sub: &str) -> Result<PathBuf> {
        let d = self.root.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| ImageError::io("creating", &d, e))?;
        Ok(d)
    }

    /// The verified download with this hash.
    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    fn partial(&self, sha256: &str) -> PathBuf {
        self.root.join("partial").join(format!("{sha256}.part"))
    }

    fn ref_key(img: &Image) -> Option<String> {
        match &img.checksum {
            Checksum::Url(u) => Some(sha_hex(&format!("{}\n{u}", img.url))[..32].to_string()),
            Checksum::Sha256(h) => Some(sha_hex(&format!("{}\n{h}", img.url))[..32].to_string()),
        }
    }

    fn ref_path(&self, img: &Image) -> Option<PathBuf> {
        Self::ref_key(img).map(|k| self.root.join("refs").join(format!("{k}.json")))
    }

    fn read_ref(&self, img: &Image) -> Option<Ref> {
        let p = self.ref_path(img)?;
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    fn write_ref(&self, img: &Image, sha256: &str) -> Result<()> {
        let Some(p) = self.ref_path(img) else {
            return Ok(());
        };
        self.dir("refs")?;
        let mut r = self.read_ref(img).unwrap_or_default();
        if r.sha256 != sha256 {
            r.names.clear();
        }
        r.url = img.url.clone();
        r.sha256_url = match &img.checksum {
            Checksum::Url(u) => Some(u.clone()),
            Checksum::Sha256(_) => None,
        };
        r.sha256 = sha256.to_string();
        if !r.names.contains(&img.name) {
            r.names.push(img.name.clone());
        }
        let bytes = serde_json::to_vec_pretty(&r).unwrap_or_default();
        write_atomic(&p, &bytes)
    }

    /// The expected hash without network: from the spec, or from the last
    /// pull of a `sha256_url` image.
    fn known_hash(&self, img: &Image) -> Option<String> {
        match &img.checksum {
            Checksum::Sha256(h) => Some(h.clone()),
            Checksum::Url(_) => self.read_ref(img).map(|r| r.sha256),
        }
    }

    /// The file a guest uses for `img`, if everything is cached (no network,
    /// no writes). The shim calls this at every start.
    pub fn resolve(&self, img: &Image) -> Result<PathBuf> {
        let not_cached = || ImageError::NotCached {
            image: img.name.clone(),
            url: img.url.clone(),
        };
        let sha = self.known_hash(img).ok_or_else(not_cached)?;
        let blob = self.blob(&sha);
        if !blob.is_file() {
            return Err(not_cached());
        }
        let fmt = self.format_of(img, &blob)?;
        let path = self.artifact_path(&sha, fmt, img.extract_iso.as_deref());
        if path.is_file() {
            Ok(path)
        } else {
            Err(not_cached())
        }
    }

    fn format_of(&self, img: &Image, blob: &Path) -> Result<Option<Format>> {
        let mut head = [0u8; 8];
        let mut f = File::open(blob).map_err(|e| ImageError::io("opening", blob, e))?;
        let n = f
            .read(&mut head)
            .map_err(|e| ImageError::io("reading", blob, e))?;
        Ok(decompress::resolve(img.decompress, &head[..n]))
    }

    fn transform(fmt: Option<Format>, extract: Option<&str>) -> String {
        let mut t = Vec::new();
        if let Some(f) = fmt {
            t.push(format!("decompress={}", f.as_str()));
        }
        if let Some(x) = extract {
            t.push(format!("extract=iso:{x}"));
        }
        t.join(" ")
    }

    fn artifact_path(&self, sha: &str, fmt: Option<Format>, extract: Option<&str>) -> PathBuf {
        let t = Self::transform(fmt, extract);
        if t.is_empty() {
            self.blob(sha)
        } else {
            self.root
                .join("derived")
                .join(format!("{sha}-{}", &sha_hex(&t)[..16]))
        }
    }

    /// A shared hold on the cache against `gc` (held by pulls and applies
    /// until the guests that use the images are recorded).
    pub fn hold(&self) -> Result<Lock> {
        self.dir("")?;
        lock_file(&self.root.join("gc.lock"), false)
    }

    /// Makes `img` available and returns the file guests use: fetches the
    /// checksum file (if `sha256_url`; with `refresh = false` a hash found
    /// by an earlier pull is reused, so an apply needs no network), downloads
    /// and verifies (skipped if cached: no request), then decompresses and
    /// extracts (cached too).
    pub fn pull(&self, img: &Image, refresh: bool, progress: Progress<'_>) -> Result<PathBuf> {
        let _hold = self.hold()?;
        let sha = match (&img.checksum, refresh) {
            (Checksum::Sha256(h), _) => h.clone(),
            (Checksum::Url(_), false)
                if self
                    .known_hash(img)
                    .is_some_and(|h| self.blob(&h).is_file()) =>
            {
                self.known_hash(img).unwrap_or_default()
            }
            (Checksum::Url(u), _) => {
                progress(Event::Checksum {
                    image: img.name.clone(),
                    url: u.clone(),
                });
                self.fetch_checksum(img, u)?
            }
        };
        let blob = self.blob(&sha);
        if blob.is_file() {
            progress(Event::Cached {
                image: img.name.clone(),
                sha256: sha.clone(),
            });
        } else {
            self.download(img, &sha, progress)?;
        }
        self.write_ref(img, &sha)?;
        self.derive(img, &sha, progress)
    }

    fn fetch_checksum(&self, img: &Image, url: &str) -> Result<String> {
        let mut text = Vec::new();
        fetch(url, 0, &mut |ev| {
            if let Chunk::Data(chunk) = ev {
                if text.len() as u64 + chunk.len() as u64 > MAX_CHECKSUM_FILE {
                    return Err(std::io::Error::other("checksum file larger than 4 MiB"));
                }
                text.extend_from_slice(chunk);
            }
            Ok(())
        })?;
        let text = String::from_utf8_lossy(&text);
        crate::checksum::find(&text, img.file_name()).map_err(|found| {
            ImageError::ChecksumNotListed {
                url: url.to_string(),
                file: img.file_name().to_string(),
                found,
            }
        })
    }

    /// Downloads into `partial/<sha>.part` (resuming what is there), verifies,
    /// renames into `sha256/<sha>`. One downloader per hash at a time.
    fn download(&self, img: &Image, sha: &str, progress: Progress<'_>) -> Result<()> {
        self.dir("sha256")?;
        let partial_dir = self.dir("partial")?;
        let locks = self.dir("locks")?;
        let lock_path = locks.join(format!("{sha}.lock"));
        let _lock = match try_lock_file(&lock_path)? {
            Some(l) => l,
            None => {
                progress(Event::Waiting {
                    image: img.name.clone(),
                });
                lock_file(&lock_path, true)?
            }
        };
        let blob = self.blob(sha);
        if blob.is_file() {
            // Another process finished it while we waited.
            progress(Event::Cached {
                image: img.name.clone(),
                sha256: sha.to_string(),
            });
            return Ok(());
        }
        let part = self.partial(sha);
        let mut last_err = None;
        for attempt in 0..ATTEMPTS {
            match self.download_once(img, &part, progress) {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                // Not worth retrying: the server said no, or the disk is full.
                Err(e @ (ImageError::HttpStatus { .. } | ImageError::Io { .. })) => return Err(e),
                Err(e) => {
                    if attempt + 1 < ATTEMPTS {
                        progress(Event::Retry {
                            image: img.name.clone(),
                            error: e.to_string(),
                        });
                        std::thread::sleep(Duration::from_millis(500 * u64::from(attempt + 1)));
                    }
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        // Verify what is on disk, whole.
        let actual = hash_file(&part)?;
        if actual != sha {
            let _ = std::fs::remove_file(&part);
            return Err(ImageError::Mismatch {
                url: img.url.clone(),
                expected: sha.to_string(),
                actual,
            });
        }
        std::fs::set_permissions(&part, std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .map_err(|e| ImageError::io("making read-only", &part, e))?;
        std::fs::rename(&part, &blob)
            .map_err(|e| ImageError::io("moving into the cache", &blob, e))?;
        fsync_dir(&partial_dir);
        fsync_dir(blob.parent().unwrap_or(Path::new("/")));
        progress(Event::Verified {
            image: img.name.clone(),
            sha256: sha.to_string(),
        });
        tracing::info!(image = %img.name, sha256 = %sha, "image verified and cached");
        Ok(())
    }

    fn download_once(&self, img: &Image, part: &Path, progress: Progress<'_>) -> Result<()> {
        // O_APPEND: after a truncation (server ignored the range) writes
        // start over at 0 instead of leaving a hole.
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(part)
            .map_err(|e| ImageError::io("opening", part, e))?;
        let have = f
            .metadata()
            .map_err(|e| ImageError::io("reading", part, e))?
            .len();
        let mut done = 0u64;
        let mut total = None;
        fetch(&img.url, have, &mut |ev| match ev {
            Chunk::Start { from, total: t } => {
                if from != have {
                    f.set_len(from)?;
                }
                done = from;
                total = t;
                progress(Event::Download {
                    image: img.name.clone(),
                    url: img.url.clone(),
                    total: t,
                    from,
                });
                Ok(())
            }
            Chunk::Data(d) => {
                (&f).write_all(d)?;
                done += d.len() as u64;
                progress(Event::Bytes { done, total });
                Ok(())
            }
        })?;
        f.sync_all().map_err(|e| ImageError::io("writing", part, e))
    }

    /// Decompresses and extracts as the image says; returns the artifact.
    fn derive(&self, img: &Image, sha: &str, progress: Progress<'_>) -> Result<PathBuf> {
        let blob = self.blob(sha);
        let fmt = self.format_of(img, &blob)?;
        let target = self.artifact_path(sha, fmt, img.extract_iso.as_deref());
        if target.is_file() {
            return Ok(target);
        }
        self.dir("derived")?;
        let lock = self.dir("locks")?.join(format!("{sha}.lock"));
        let _lock = lock_file(&lock, true)?;
        if target.is_file() {
            return Ok(target);
        }
        // Step 1: decompressed (cached on its own: the same ISO may give
        // several extracted files).
        let plain = match fmt {
            None => blob.clone(),
            Some(f) => {
                let p = self.artifact_path(sha, Some(f), None);
                if !p.is_file() {
                    progress(Event::Derive {
                        image: img.name.clone(),
                        what: format!("decompressing {}", f.as_str()),
                    });
                    self.make(&p, sha, &Self::transform(Some(f), None), |out| {
                        let input =
                            File::open(&blob).map_err(|e| ImageError::io("opening", &blob, e))?;
                        decompress::decompress(f, input, out).map_err(|e| {
                            if e.raw_os_error() == Some(libc::ENOSPC) {
                                ImageError::io("writing", &p, e)
                            } else {
                                ImageError::Decompress {
                                    image: img.name.clone(),
                                    format: f.as_str(),
                                    message: e.to_string(),
                                }
                            }
                        })
                    })?;
                }
                p
            }
        };
        if let Some(inner) = &img.extract_iso {
            progress(Event::Derive {
                image: img.name.clone(),
                what: format!("extracting iso:{inner}"),
            });
            self.make(&target, sha, &Self::transform(fmt, Some(inner)), |out| {
                crate::iso::extract(&img.name, &plain, inner, out)
            })?;
        }
        Ok(target)
    }

    /// Builds `dest` through a temp file; nothing is left on failure.
    fn make(
        &self,
        dest: &Path,
        sha: &str,
        transform: &str,
        fill: impl FnOnce(&mut std::io::BufWriter<&File>) -> Result<u64>,
    ) -> Result<()> {
        let tmp = temp_beside(dest);
        let res = (|| {
            let f = File::create(&tmp).map_err(|e| ImageError::io("creating", &tmp, e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
            fill(&mut w)?;
            w.flush().map_err(|e| ImageError::io("writing", &tmp, e))?;
            drop(w);
            f.sync_all()
                .map_err(|e| ImageError::io("writing", &tmp, e))?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .map_err(|e| ImageError::io("making read-only", &tmp, e))?;
            let meta = serde_json::to_vec_pretty(&DerivedMeta {
                source: sha.to_string(),
                transform: transform.to_string(),
            })
            .unwrap_or_default();
            write_atomic(&dest.with_extension("json"), &meta)?;
            std::fs::rename(&tmp, dest)
                .map_err(|e| ImageError::io("moving into the cache", dest, e))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        if let Some(d) = dest.parent() {
            fsync_dir(d);
        }
        res
    }

    /// Everything in the cache.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        let entry = |sha: &str, path: PathBuf, size: u64, partial: bool| Entry {
            sha256: sha.to_string(),
            size,
            path,
            urls: Vec::new(),
            names: Vec::new(),
            derived: Vec::new(),
            partial,
        };
        for (p, name) in read_dir(&self.root.join("sha256")) {
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            out.insert(name.clone(), entry(&name, p, size, false));
        }
        for (p, name) in read_dir(&self.root.join("partial")) {
            if let Some(sha) = name.strip_suffix(".part") {
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                out.entry(sha.to_string())
                    .or_insert_with(|| entry(sha, p, size, true));
            }
        }
        for (p, _) in read_dir(&self.root.join("refs")) {
            let Ok(r) = std::fs::read(&p).map(|b| serde_json::from_slice::<Ref>(&b)) else {
                continue;
            };
            let Ok(r) = r else { continue };
            if let Some(e) = out.get_mut(&r.sha256) {
                if !e.urls.contains(&r.url) {
                    e.urls.push(r.url);
                }
                for n in r.names {
                    if !e.names.contains(&n) {
                        e.names.push(n);
                    }
                }
            }
        }
        for (p, name) in read_dir(&self.root.join("derived")) {
            let Some(meta) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(Ok(m)) = std::fs::read(&p).map(|b| serde_json::from_slice::<DerivedMeta>(&b))
            else {
                continue;
            };
            let art = p.with_file_name(meta);
            let Ok(md) = std::fs::metadata(&art) else {
                continue;
            };
            if let Some(e) = out.get_mut(&m.source) {
                e.derived.push(Derived {
                    transform: m.transform,
                    size: md.len(),
                    path: art,
                });
            }
        }
        Ok(out.into_values().collect())
    }

    /// Removes every download (and what was derived from it, and partial
    /// downloads) whose hash is not in `keep`. Waits for pulls and applies
    /// in progress. Returns what was removed.
    pub fn gc(&self, keep: &std::collections::BTreeSet<String>) -> Result<Vec<PathBuf>> {
        self.dir("")?;
        let _excl = lock_file(&self.root.join("gc.lock"), true)?;
        let mut removed = Vec::new();
        let mut rm = |p: PathBuf| {
            if std::fs::remove_file(&p).is_ok() {
                removed.push(p);
            }
        };
        for (p, name) in read_dir(&self.root.join("sha256")) {
            if !keep.contains(&name) {
                rm(p);
            }
        }
        for (p, name) in read_dir(&self.root.join("partial")) {
            let sha = name.strip_suffix(".part").unwrap_or(&name);
            if !keep.contains(sha) {
                rm(p);
            }
        }
        for (p, name) in read_dir(&self.root.join("derived")) {
            let sha = name.split('-').next().unwrap_or("");
            // Temp files of a build killed half-way, and orphans.
            if name.starts_with(".tmp-") || !keep.contains(sha) {
                rm(p);
            }
        }
        for (p, name) in read_dir(&self.root.join("locks")) {
            let sha = name.strip_suffix(".lock").unwrap_or(&name);
            if !keep.contains(sha) {
                rm(p);
            }
        }
        for (p, _) in read_dir(&self.root.join("refs")) {
            let keep_ref = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Ref>(&b).ok())
                .is_some_and(|r| keep.contains(&r.sha256));
            if !keep_ref {
                rm(p);
            }
        }
        Ok(removed)
    }

    /// The hashes `img` needs kept (for `gc`): its download, if known.
    pub fn hash_of(&self, img: &Image) -> Option<String> {
        self.known_hash(img)
    }

    /// The download hash behind a cached file (a blob or a derived artifact),
    /// for `gc` to keep the backing file of an existing disk.
    pub fn source_of(&self, file: &Path) -> Option<String> {
        let file = file.strip_prefix(&self.root).ok()?;
        let mut parts = file.components();
        let dir = parts.next()?.as_os_str().to_str()?;
        let name = parts.next()?.as_os_str().to_str()?;
        match dir {
            "sha256" => Some(name.to_string()),
            "derived" => name.split('-').next().map(str::to_owned),
            _ => None,
        }
    }
}

fn read_dir(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.path(), e.file_name().into_string().ok()?)))
        .collect();
    v.sort();
    v
}

/// SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| ImageError::io("opening", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ImageError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// What [`fetch`] hands its sink.
enum Chunk<'a> {
    /// The real start offset (0 if the server ignored the range) and the
    /// total size, if known.
    Start {
        from: u64,
        total: Option<u64>,
    },
    Data(&'a [u8]),
}

/// Fetches `url` from byte `from` (http(s) with a Range header, or file://).
fn fetch(
    url: &str,
    from: u64,
    sink: &mut dyn FnMut(Chunk<'_>) -> std::io::Result<()>,
) -> Result<()> {
    let fetch_err = |message: String| ImageError::Fetch {
        url: url.to_string(),
        message,
    };
    // A sink error with an OS code is the local disk (ENOSPC...); others
    // are limits the sink set.
    let sink_err = |e: std::io::Error| {
        if e.raw_os_error().is_some() {
            ImageError::io("writing the download of", PathBuf::from(url), e)
        } else {
            fetch_err(e.to_string())
        }
    };
    if let Some(path) = url.strip_prefix("file://") {
        let path = Path::new(path);
        let mut f = File::open(path).map_err(|e| ImageError::io("opening", path, e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = if from <= len { from } else { 0 };
        f.seek(SeekFrom::Start(start))
            .map_err(|e| ImageError::io("reading", path, e))?;
        sink(Chunk::Start {
            from: start,
            total: Some(len),
        })
        .map_err(sink_err)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| ImageError::io("reading", path, e))?;
            if n == 0 {
                return Ok(());
            }
            sink(Chunk::Data(&buf[..n])).map_err(sink_err)?;
        }
    }
    let client = http_client()?;
    let mut req = client.get(url);
    if from > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
    }
    let mut resp = req.send().map_err(|e| fetch_err(error_chain(&e)))?;
    let status = resp.status();
    let start = match status.as_u16() {
        206 => from,
        200 => 0,
        // Asked for bytes past the end: what we have is all there is (the
        // hash check decides).
        416 if from > 0 => {
            return sink(Chunk::Start {
                from,
                total: Some(from),
            })
            .map_err(sink_err);
        }
        _ => {
            return Err(ImageError::HttpStatus {
                url: url.to_string(),
                status: status.to_string(),
            });
        }
    };
    let total = resp.content_length().map(|l| l + start);
    sink(Chunk::Start { from: start, total }).map_err(sink_err)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(fetch_err(format!(
                    "connection lost after {} bytes: {}",
                    start + got,
                    error_chain(&e)
                )));
            }
        };
        sink(Chunk::Data(&buf[..n])).map_err(sink_err)?;
        got += n as u64;
    }
    if let Some(t) = total
        && start + got < t
    {
        return Err(fetch_err(format!(
            "connection closed after {} of {t} bytes",
            start + got
        )));
    }
    Ok(())
}
