//! Disks made from cached images with qemu-img: a qcow2 overlay backed by
//! the image, or a raw copy, grown to the size the spec asks for. An
//! existing disk is never recreated or modified.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{ImageError, Result};

/// What [`ensure_disk_from_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOutcome {
    Created,
    /// It was there; `Some(warning)` if it is smaller than the spec says.
    Existed(Option<String>),
}

/// Format and virtual size of an image (`qemu-img info`, `-U`: also while a
/// running QEMU holds it).
pub fn image_info(path: &Path) -> Result<(String, u64, Option<String>)> {
    let out = qemu_img(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        "-U".as_ref(),
        path.as_os_str(),
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| ImageError::Tool {
        cmd: format!("qemu-img info {}", path.display()),
        message: format!("unexpected output ({e})"),
    })?;
    let format = v.get("format").and_then(|f| f.as_str()).map(str::to_owned);
    let size = v.get("virtual-size").and_then(|s| s.as_u64());
    let backing = v
        .get("full-backing-filename")
        .or_else(|| v.get("backing-filename"))
        .and_then(|b| b.as_str())
        .map(str::to_owned);
    match (format, size) {
        (Some(f), Some(s)) => Ok((f, s, backing)),
        _ => Err(ImageError::Tool {
            cmd: format!("qemu-img info {}", path.display()),
            message: format!("no format or size in {v}"),
        }),
    }
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let shown = || {
        let mut s = "qemu-img".to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Tool {
            cmd: shown(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "qemu-img not found (install qemu-utils)".into()
            } else {
                e.to_string()
            },
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            cmd: shown(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// Makes `dest` from the cached `artifact` of image `image` unless it
/// exists: `qcow2` = an overlay backed by the artifact (which the cache
/// never changes), `raw` = a sparse copy; either grown to `size`. Built
/// under a temporary name and linked into place, so a crash leaves no
/// half-made disk and an existing one is never overwritten.
pub fn ensure_disk_from_image(
    image: &str,
    artifact: &Path,
    dest: &Path,
    qcow2: bool,
    size: u64,
) -> Result<DiskOutcome> {
    if dest.exists() {
        return check_existing(image, artifact, dest, qcow2, size).map(DiskOutcome::Existed);
    }
    let (src_fmt, src_size, _) = image_info(artifact)?;
    if size < src_size {
        return Err(ImageError::DiskTooSmall {
            path: dest.to_path_buf(),
            image: image.to_string(),
            size,
            image_size: src_size,
        });
    }
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| ImageError::io("creating", dir, e))?;
    remove_stale_temps(dest);
    let tmp = temp_name(dest);
    let size_s = size.to_string();
    let made = if qcow2 {
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            src_fmt.as_ref(),
            "-b".as_ref(),
            artifact.as_os_str(),
            tmp.as_os_str(),
            size_s.as_ref(),
        ])
    } else {
        qemu_img(&[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            src_fmt.as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            artifact.as_os_str(),
            tmp.as_os_str(),
        ])
        .and_then(|_| {
            if size > src_size {
                qemu_img(&[
                    "resize".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "raw".as_ref(),
                    tmp.as_os_str(),
                    size_s.as_ref(),
                ])
            } else {
                Ok(Vec::new())
            }
        })
    };
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Ok(f) = std::fs::File::open(&tmp) {
        let _ = f.sync_all();
    }
    let linked = std::fs::hard_link(&tmp, dest);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(disk = %dest.display(), image, size, qcow2, "created disk from image");
            Ok(DiskOutcome::Created)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            check_existing(image, artifact, dest, qcow2, size).map(DiskOutcome::Existed)
        }
        Err(e) => Err(ImageError::io("moving the new disk into place", dest, e)),
    }
}

fn check_existing(
    image: &str,
    artifact: &Path,
    dest: &Path,
    qcow2: bool,
    size: u64,
) -> Result<Option<String>> {
    let (fmt, vsize, backing) = image_info(dest)?;
    if qcow2 {
        let want = artifact.to_string_lossy();
        let found = backing.unwrap_or_else(|| format!("nothing ({fmt} without a backing file)"));
        if found != want {
            return Err(ImageError::OtherBacking {
                path: dest.to_path_buf(),
                image: image.to_string(),
                expected: want.into_owned(),
                found,
            });
        }
    }
    Ok((vsize < size).then(|| {
        format!(
            "disk {} is {vsize} bytes, smaller than the {size} bytes in the spec; berth leaves existing disks alone (grow it with `qemu-img resize` while the guest is stopped)",
            dest.display()
        )
    }))
}

fn temp_name(dest: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(dest.file_name().unwrap_or_default());
    name.push(format!(".berth-new-{}", std::process::id()));
    dest.with_file_name(name)
}

/// Temp files of a creation killed half-way (by any process).
fn remove_stale_temps(dest: &Path) {
    let (Some(dir), Some(base)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let prefix = format!(".{}.berth-new-", base.to_string_lossy());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
