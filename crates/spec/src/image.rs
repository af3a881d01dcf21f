//! Images (`[image.NAME]`) and seeds (`seed = { kind = ... }`): what the spec
//! says and what validation makes of it. Pure: fetching, verifying and
//! building volumes is `berth-image`'s job.
//!
//! ```toml
//! [image.debian]
//! url = "https://example.org/debian.qcow2"
//! sha256 = "4f3c...e1"               # or sha256_url = "https://example.org/SHA256SUMS"
//! decompress = "auto"                # auto | gz | bz2 | xz | zstd | none
//!
//! [image.vmlinuz]
//! url = "https://example.org/installer.iso"
//! sha256 = "..."
//! extract = "iso:/install/vmlinuz"   # one file out of an ISO 9660 image
//!
//! [guest.r1]
//! kernel = "image:vmlinuz"           # `image:NAME` wherever a path is taken
//! disks = [{ image = "debian", size = "8G" }]
//! seed = { kind = "nocloud", user_data = "#cloud-config\n..." }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a download is decompressed before use.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decompress {
    /// By the file's magic bytes (gzip, bzip2, xz, zstd); anything else is
    /// used as it is.
    #[default]
    Auto,
    Gz,
    Bz2,
    Xz,
    Zstd,
    /// Use the download as it is.
    None,
}

impl Decompress {
    pub fn as_str(self) -> &'static str {
        match self {
            Decompress::Auto => "auto",
            Decompress::Gz => "gz",
            Decompress::Bz2 => "bz2",
            Decompress::Xz => "xz",
            Decompress::Zstd => "zstd",
            Decompress::None => "none",
        }
    }
}

/// One `[image.NAME]` table.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Where to get it: `https://`, `http://` or `file:///absolute/path`.
    pub url: String,
    /// SHA-256 (64 hex digits) of the file at `url`, as downloaded (before
    /// decompression). Required unless `sha256_url` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A checksum file (`sha256sum` or BSD `SHA256 (name) = hash` format)
    /// that lists the file named by the last part of `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_url: Option<String>,
    /// "auto" (default: by magic bytes), "gz", "bz2", "xz", "zstd" or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompress: Option<Decompress>,
    /// Take one file out of the (decompressed) image: "iso:/path/inside".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<String>,
}

/// Where the expected hash comes from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    /// Given in the spec (lowercase hex).
    Sha256(String),
    /// Read from a checksum file at pull time.
    Url(String),
}

/// A validated image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    pub name: String,
    pub url: String,
    pub checksum: Checksum,
    pub decompress: Decompress,
    /// Path inside an ISO 9660 image (absolute, `/`-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract_iso: Option<String>,
}

impl Image {
    /// What the artifact is made of: same identity, same bytes. The name is
    /// not part of it (renaming an image changes nothing).
    pub fn identity(&self) -> String {
        let src = match &self.checksum {
            Checksum::Sha256(h) => format!("sha256:{h}"),
            Checksum::Url(u) => format!("{} (sha256 from {u})", self.url),
        };
        let mut s = format!("{src} decompress={}", self.decompress.as_str());
        if let Some(p) = &self.extract_iso {
            s.push_str(&format!(" extract=iso:{p}"));
        }
        s
    }

    /// The last part of the URL's path, e.g. "debian.iso" (what checksum
    /// files list).
    pub fn file_name(&self) -> &str {
        let path = self.url.split(['?', '#']).next().unwrap_or("");
        path.rsplit('/').next().unwrap_or("")
    }
}

/// The prefix that makes a path field refer to an image: `image:NAME`.
pub const IMAGE_PREFIX: &str = "image:";

/// `Some(NAME)` if `p` is written `image:NAME`.
pub fn image_ref(p: &Path) -> Option<&str> {
    p.to_str()?.strip_prefix(IMAGE_PREFIX)
}

/// `seed = { kind = "nocloud" | "files", ... }`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SeedSpec {
    /// A cloud-init NoCloud volume (VFAT, label `CIDATA`) with `user-data`,
    /// `meta-data` and, if given, `network-config`. Each value is the text
    /// itself, or the absolute path of a file holding it.
    Nocloud {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_data: Option<String>,
        /// Default: `instance-id: <guest>` and `local-hostname: <guest>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta_data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network_config: Option<String>,
    },
    /// A small VFAT disk holding `files` (name → text, or the absolute path
    /// of a file to copy), e.g. `{ "config.xml" = "/etc/pfsense/r1.xml" }`
    /// under `label = "CONFIG"`: what pfSense's config loader reads from a
    /// USB disk. On q35 it is attached as a USB disk.
    Files {
        /// Volume label, at most 11 characters (default "BERTHSEED").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        files: BTreeMap<String, String>,
    },
}

/// One file of a seed volume: its text, or a host file to copy.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SeedContent {
    Inline(String),
    Path(PathBuf),
}

impl SeedContent {
    /// A value that is an absolute path on one line is a file; anything
    /// else is the content itself.
    pub fn of(v: &str) -> SeedContent {
        if v.starts_with('/') && !v.contains('\n') && !v.contains(' ') {
            SeedContent::Path(PathBuf::from(v))
        } else {
            SeedContent::Inline(v.to_string())
        }
    }

    fn show(&self) -> String {
        match self {
            SeedContent::Inline(s) => format!("{} bytes inline", s.len()),
            SeedContent::Path(p) => p.display().to_string(),
        }
    }
}

/// A validated seed volume: a VFAT image with these files under this label,
/// attached read-only.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// "nocloud" or "files".
    pub kind: String,
    pub label: String,
    /// File name in the volume → content. Ordered, so the volume is the
    /// same for the same spec.
    pub files: BTreeMap<String, SeedContent>,
    /// Attach as a USB disk (q35 `files` seeds), else as a virtio disk.
    #[serde(default)]
    pub usb: bool,
}

impl Seed {
    /// One line for `berth plan`.
    pub fn describe(&self) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(k, v)| format!("{k}={}", v.show()))
            .collect();
        format!("{} {} [{}]", self.kind, self.label, files.join(", "))
    }
}

/// Default label of a `files` seed.
pub const DEFAULT_FILES_LABEL: &str = "BERTHSEED";
/// Label cloud-init looks for.
pub const NOCLOUD_LABEL: &str = "CIDATA";

/// `[A-Za-z0-9._-]`, 1..=64 characters, not starting with '.' or '-'.
pub fn valid_image_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A URL berth can fetch: http(s) with a host, or file:// with an absolute path.
fn check_url(u: &str) -> Result<(), String> {
    if u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "\"{u}\" contains spaces or control characters; percent-encode them"
        ));
    }
    if let Some(rest) = u.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(format!(
                "\"{u}\": a file URL needs an absolute path, e.g. file:///srv/images/disk.img"
            ));
        }
        return Ok(());
    }
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("\"{u}\" is not a URL berth can fetch; use https://, http:// or file:///")
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("\"{u}\" has no host"));
    }
    Ok(())
}

/// Validates the `[image]` tables: `(image name, reason)` for each problem.
pub fn validate_images(
    specs: &BTreeMap<String, ImageSpec>,
) -> (BTreeMap<String, Image>, Vec<(String, String)>) {
    let mut out = BTreeMap::new();
    let mut errs = Vec::new();
    for (name, s) in specs {
        let before = errs.len();
        let mut err = |r: String| errs.push((name.clone(), r));
        if !valid_image_name(name) {
            err("image names are 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit".into());
        }
        if let Err(e) = check_url(&s.url) {
            err(format!("url: {e}"));
        }
        let checksum = match (&s.sha256, &s.sha256_url) {
            (Some(h), None) if valid_sha256(h) => Some(Checksum::Sha256(h.to_ascii_lowercase())),
            (Some(h), None) => {
                err(format!(
                    "sha256 \"{h}\" is not a SHA-256: 64 hex digits, as `sha256sum FILE` prints"
                ));
                None
            }
            (None, Some(u)) => {
                if let Err(e) = check_url(u) {
                    err(format!("sha256_url: {e}"));
                }
                Some(Checksum::Url(u.clone()))
            }
            (None, None) => {
                err("give `sha256` (64 hex digits, from `sha256sum FILE`) or `sha256_url` (a checksum file listing the image); berth never uses an unverified download".into());
                None
            }
            (Some(_), Some(_)) => {
                err("give either `sha256` or `sha256_url`, not both".into());
                None
            }
        };
        let extract_iso = match &s.extract {
            None => None,
            Some(x) => match x.strip_prefix("iso:") {
                Some(p)
                    if !p.trim_matches('/').is_empty()
                        && !p.split('/').any(|c| c == "..")
                        && !p.contains('\0') =>
                {
                    Some(format!("/{}", p.trim_start_matches('/')))
                }
                Some(_) => {
                    err(format!(
                        "extract \"{x}\": give the path of a file inside the ISO, e.g. \"iso:/boot/vmlinuz\" (no `..`)"
                    ));
                    None
                }
                None => {
                    err(format!(
                        "extract \"{x}\" is not understood; berth can take one file out of an ISO 9660 image: \"iso:/path/inside\""
                    ));
                    None
                }
            },
        };
        if errs.len() == before
            && let Some(checksum) = checksum
        {
            out.insert(
                name.clone(),
                Image {
                    name: name.clone(),
                    url: s.url.clone(),
                    checksum,
                    decompress: s.decompress.unwrap_or_default(),
                    extract_iso,
                },
            );
        }
    }
    (out, errs)
}

/// Validates a guest's seed into a [`Seed`]; `Err` lists the reasons.
/// `exists` tells whether a host path exists; `q35` picks USB for files seeds.
pub fn validate_seed(
    guest: &str,
    s: &SeedSpec,
    q35: bool,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Seed, Vec<String>> {
    let mut errs = Vec::new();
    let mut files = BTreeMap::new();
    let mut add = |errs: &mut Vec<String>, name: &str, v: &str| {
        let c = SeedContent::of(v);
        if let SeedContent::Path(p) = &c
            && !exists(p)
        {
            errs.push(format!(
                "seed file {name}: {} does not exist (a value starting with '/' is a host file to copy; write the content itself otherwise)",
                p.display()
            ));
        }
        files.insert(name.to_string(), c);
    };
    let (kind, label, usb) = match s {
        SeedSpec::Nocloud {
            user_data,
            meta_data,
            network_config,
        } => {
            add(
                &mut errs,
                "user-data",
                user_data.as_deref().unwrap_or("#cloud-config\n{}\n"),
            );
            let default_meta = format!("instance-id: {guest}\nlocal-hostname: {guest}\n");
            add(
                &mut errs,
                "meta-data",
                meta_data.as_deref().unwrap_or(&default_meta),
            );
            if let Some(n) = network_config {
                add(&mut errs, "network-config", n);
            }
            ("nocloud", NOCLOUD_LABEL.to_string(), false)
        }
        SeedSpec::Files { label, files: fs } => {
            let label = label.clone().unwrap_or_else(|| DEFAULT_FILES_LABEL.into());
            if label.is_empty()
                || label.len() > 11
                || !label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
            {
                errs.push(format!(
                    "seed label \"{label}\": a VFAT label is 1-11 characters of A-Z, 0-9, '_' and '-'"
                ));
            }
            if fs.is_empty() {
                errs.push("a files seed needs at least one entry in `files`, e.g. { \"config.xml\" = \"/path/to/config.xml\" }".into());
            }
            for (name, v) in fs {
                let ok = !name.is_empty()
                    && name.len() <= 255
                    && !name.starts_with('.')
                    && name.split('/').all(|c| {
                        !c.is_empty()
                            && c != ".."
                            && !c
                                .chars()
                                .any(|ch| ch.is_control() || "\\:*?\"<>|".contains(ch))
                    });
                if !ok {
                    errs.push(format!("seed file name \"{name}\" is not valid on VFAT (no \\ : * ? \" < > |, no empty parts or `..`; '/' makes directories)"));
                }
                add(&mut errs, name, v);
            }
            ("files", label.to_ascii_uppercase(), q35)
        }
    };
    if errs.is_empty() {
        Ok(Seed {
            kind: kind.into(),
            label,
            files,
            usb,
        })
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        url: &str,
        sha: Option<&str>,
        sha_url: Option<&str>,
        extract: Option<&str>,
    ) -> ImageSpec {
        ImageSpec {
            url: url.into(),
            sha256: sha.map(Into::into),
            sha256_url: sha_url.map(Into::into),
            decompress: None,
            extract: extract.map(Into::into),
        }
    }

    #[test]
    fn images_validate_and_report() {
        let h = "A".repeat(64);
        let mut m = BTreeMap::new();
        m.insert(
            "ok".to_string(),
            spec(
                "https://x.org/a.iso",
                Some(&h),
                None,
                Some("iso:boot/vmlinuz"),
            ),
        );
        m.insert(
            "nohash".to_string(),
            spec("https://x.org/a.iso", None, None, None),
        );
        m.insert(
            "badurl".to_string(),
            spec("ftp://x.org/a", Some(&h), None, None),
        );
        m.insert(
            "badx".to_string(),
            spec("file:///a", Some(&h), None, Some("tar:/x")),
        );
        m.insert(
            "short".to_string(),
            spec("file:///a", Some("abc"), None, None),
        );
        let (ok, errs) = validate_images(&m);
        assert_eq!(ok.len(), 1);
        let img = &ok["ok"];
        assert_eq!(img.checksum, Checksum::Sha256("a".repeat(64)));
        assert_eq!(img.extract_iso.as_deref(), Some("/boot/vmlinuz"));
        assert_eq!(img.file_name(), "a.iso");
        let names: Vec<&str> = errs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["badurl", "badx", "nohash", "short"]);
    }

    #[test]
    fn seed_content_path_or_inline() {
        assert_eq!(
            SeedContent::of("/etc/x.xml"),
            SeedContent::Path("/etc/x.xml".into())
        );
        assert!(matches!(
            SeedContent::of("#cloud-config\n"),
            SeedContent::Inline(_)
        ));
        assert!(matches!(
            SeedContent::of("/not a path"),
            SeedContent::Inline(_)
        ));
    }

    #[test]
    fn seeds_validate() {
        let no = |_: &Path| false;
        let s = validate_seed(
            "r1",
            &SeedSpec::Nocloud {
                user_data: Some("#cloud-config\n".into()),
                meta_data: None,
                network_config: None,
            },
            false,
            &no,
        )
        .expect("valid");
        assert_eq!(s.label, "CIDATA");
        assert_eq!(
            s.files.keys().collect::<Vec<_>>(),
            ["meta-data", "user-data"]
        );
        let bad = validate_seed(
            "r1",
            &SeedSpec::Files {
                label: Some("much-too-long-label".into()),
                files: [("a:b".to_string(), "/missing".to_string())].into(),
            },
            true,
            &no,
        )
        .expect_err("invalid");
        assert_eq!(bad.len(), 3, "{bad:?}");
    }
}
