//! Making sure a guest's disk image exists, without ever touching one that
//! already does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{DiskFormat, Result, VmError};

const QEMU_IMG: &str = "qemu-img";
const QEMU_IMG_HINT: &str = " (install qemu-utils, which provides qemu-img)";

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| VmError::Spawn {
            program: program.clone(),
            hint: if source.kind() == std::io::ErrorKind::NotFound {
                QEMU_IMG_HINT
            } else {
                ""
            },
            source,
        })?;
    if !out.status.success() {
        let mut shown = program;
        for a in cmd.get_args() {
            shown.push(' ');
            shown.push_str(&a.to_string_lossy());
        }
        return Err(VmError::Command {
            cmd: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `(format, virtual size)` of an existing image, from `qemu-img info
/// --output=json -U` (`-U`: works while a running QEMU holds the lock).
fn image_info(path: &Path) -> Result<(String, u64)> {
    let out = run(Command::new(QEMU_IMG)
        .args(["info", "--output=json", "-U"])
        .arg(path))?;
    let v: Value = serde_json::from_slice(&out).map_err(|e| VmError::Parse {
        what: format!("qemu-img info of {} ({e})", path.display()),
        text: String::from_utf8_lossy(&out).into_owned(),
    })?;
    let format = v.get("format").and_then(Value::as_str);
    let size = v.get("virtual-size").and_then(Value::as_u64);
    match (format, size) {
        (Some(f), Some(s)) => Ok((f.to_string(), s)),
        _ => Err(VmError::Parse {
            what: format!("qemu-img info of {}", path.display()),
            text: v.to_string(),
        }),
    }
}

/// Makes sure the disk image at `path` exists.
///
/// - Missing and `size_bytes` given: created with `qemu-img create -f FMT`
///   (sparse for raw, thin for qcow2). It is built under a temporary name
///   and linked into place, so a concurrent creator or an existing file is
///   never overwritten.
/// - Missing and no size: [`VmError::DiskMissing`].
/// - Present: never modified. A qcow2 disk must really be qcow2. If its
///   virtual size is below `size_bytes` the result is `Some(warning)`
///   (berth does not resize disks).
pub fn ensure_disk(
    path: &Path,
    format: DiskFormat,
    size_bytes: Option<u64>,
) -> Result<Option<String>> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return check_existing(path, format, size_bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VmError::DiskIo {
                path: path.to_path_buf(),
                what: "checking whether it exists",
                source,
            });
        }
    }
    let Some(size) = size_bytes else {
        return Err(VmError::DiskMissing {
            path: path.to_path_buf(),
        });
    };
    let io = |what, source| VmError::DiskIo {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io("creating its directory", e))?;
    }
    let tmp = temp_name(path);
    let created = run(Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", format.as_str()])
        .arg(&tmp)
        .arg(size.to_string()));
    if let Err(e) = created {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // link(2) fails if `path` appeared meanwhile: never clobber.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(disk = %path.display(), format = format.as_str(), size, "created disk");
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            check_existing(path, format, size_bytes)
        }
        Err(e) => Err(io("moving the new image into place", e)),
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".berth-new-{}", std::process::id()));
    path.with_file_name(name)
}

fn check_existing(
    path: &Path,
    format: DiskFormat,
    size_bytes: Option<u64>,
) -> Result<Option<String>> {
    let (found, virtual_size) = image_info(path)?;
    // A raw image may hold anything (even a qcow2 header the guest wrote),
    // so only a qcow2 claim is checked.
    if format == DiskFormat::Qcow2 && found != "qcow2" {
        return Err(VmError::DiskFormatMismatch {
            path: path.to_path_buf(),
            expected: format.as_str().into(),
            found,
        });
    }
    let virtual_size = if format == DiskFormat::Raw {
        std::fs::metadata(path)
            .map_err(|source| VmError::DiskIo {
                path: path.to_path_buf(),
                what: "reading its size",
                source,
            })?
            .len()
    } else {
        virtual_size
    };
    match size_bytes {
        Some(want) if virtual_size < want => Ok(Some(format!(
            "disk {} is {virtual_size} bytes, smaller than the {want} bytes in the spec; \
             berth leaves existing disks alone (grow it with `qemu-img resize` while \
             the guest is stopped, then grow the guest's filesystem)",
            path.display()
        ))),
        _ => Ok(None),
    }
}
