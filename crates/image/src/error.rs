//! What can go wrong with images, each with the text a user acts on.

use std::path::PathBuf;

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The server answered with an error status (404 and the like).
    #[error(
        "{url}: the server answered {status}; check the URL (is the file still published there?)"
    )]
    HttpStatus { url: String, status: String },
    /// Connection, TLS or protocol failure.
    #[error("{url}: {message}")]
    Fetch { url: String, message: String },
    /// The download is not what the spec says.
    #[error(
        "{url}: SHA-256 mismatch: expected {expected}, got {actual}; the download was deleted. \
         If the image was republished, update `sha256` in the spec; otherwise the file is corrupt or tampered with"
    )]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    /// The checksum file has no entry for the image.
    #[error("{url}: no SHA-256 for `{file}` in the checksum file ({found})")]
    ChecksumNotListed {
        url: String,
        file: String,
        found: String,
    },
    /// A local file or directory operation failed.
    #[error("{what} {}: {source}{}", .path.display(), space_hint(.source))]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Decompression failed (corrupt data, or not in the format named).
    #[error(
        "image `{image}`: cannot decompress as {format}: {message}; check `decompress` (\"auto\" detects gz, bz2, xz and zstd; \"none\" uses the file as it is)"
    )]
    Decompress {
        image: String,
        format: &'static str,
        message: String,
    },
    /// `extract = "iso:PATH"` on something that is not an ISO 9660 image.
    #[error(
        "image `{image}`: not an ISO 9660 image ({message}); `extract = \"iso:...\"` needs one (after decompression)"
    )]
    NotIso { image: String, message: String },
    /// The path is not in the ISO.
    #[error("image `{image}`: {path} is not in the ISO{}", listing(.near))]
    NotInIso {
        image: String,
        path: String,
        near: Vec<String>,
    },
    /// A tool berth runs (qemu-img) failed.
    #[error("{cmd}: {message}")]
    Tool { cmd: String, message: String },
    /// The disk would be smaller than the image it is made from.
    #[error("disk {} from image `{image}`: size {size} bytes is smaller than the image ({image_size} bytes); give the disk a `size` of at least that", .path.display())]
    DiskTooSmall {
        path: PathBuf,
        image: String,
        size: u64,
        image_size: u64,
    },
    /// A disk exists but is backed by something else.
    #[error("disk {} exists but is backed by {found}, not by image `{image}` ({expected}); berth never recreates an existing disk: move it away to have berth make a new one", .path.display())]
    OtherBacking {
        path: PathBuf,
        image: String,
        expected: String,
        found: String,
    },
    /// The image is needed but was never pulled.
    #[error(
        "image `{image}` is not in the cache ({url}); `berth apply` pulls it, or run `berth image pull SPEC {image}`"
    )]
    NotCached { image: String, url: String },
    /// A seed volume could not be built.
    #[error("seed volume: {0}")]
    Seed(String),
}

fn space_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        " (free some space, e.g. `berth image gc`, and try again; nothing half-written was kept)"
    } else {
        ""
    }
}

fn listing(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!("; its directory holds: {}", near.join(", "))
    }
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
