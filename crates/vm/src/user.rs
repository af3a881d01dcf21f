//! The unprivileged system user QEMU drops to (`-runas`).

use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::User;

use crate::{Result, VmError};

/// The default user QEMU runs as.
pub const QEMU_USER: &str = "berth-qemu";

fn check_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(VmError::BadUserName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 32 {
        return bad("must be 1 to 32 characters");
    }
    if name.starts_with('-') {
        return bad("must not start with '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad("use only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn lookup(name: &str) -> Result<Option<(u32, u32)>> {
    User::from_name(name)
        .map(|u| u.map(|u| (u.uid.as_raw(), u.gid.as_raw())))
        .map_err(|source| VmError::UserLookup {
            name: name.to_string(),
            source,
        })
}

/// Makes sure system user `name` exists and returns its `(uid, gid)`. A
/// missing user is created with `useradd --system --user-group
/// --no-create-home --shell <nologin>` (on NixOS the berth module declares
/// it instead, so this only looks it up).
pub fn ensure_qemu_user(name: &str) -> Result<(u32, u32)> {
    check_name(name)?;
    if let Some(ids) = lookup(name)? {
        return Ok(ids);
    }
    let shell = ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/usr/sbin/nologin");
    let mut cmd = Command::new("useradd");
    cmd.args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        shell,
        "--comment",
        "berth QEMU (unprivileged)",
        name,
    ]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| VmError::Spawn {
            program: "useradd".into(),
            hint: " (install the `passwd`/shadow tools, or create the user by hand)",
            source,
        })?;
    // Exit 9: the user exists (created concurrently); fall through to lookup.
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(VmError::Command {
            cmd: format!("useradd --system ... {name}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    tracing::info!(user = name, "created system user for QEMU");
    lookup(name)?.ok_or_else(|| VmError::UserMissing {
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("berth-qemu").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
            assert!(ensure_qemu_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn existing_user_is_only_looked_up() {
        assert_eq!(ensure_qemu_user("root").expect("root"), (0, 0));
    }
}
