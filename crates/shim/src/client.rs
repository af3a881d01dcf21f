//! The daemon's side: spawn a detached shim, ask it things.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::paths::GuestPaths;
use crate::proto::{Request, ShimStatus};

/// Sends one request and reads one reply (a status for most requests).
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> std::io::Result<ShimStatus> {
    call(socket, req, timeout)
}

/// One request, one JSON reply of type `T`.
fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> std::io::Result<T> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "shim closed the connection",
        ));
    }
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

/// Types a script into the guest's console through its shim.
pub fn console_script(
    paths: &GuestPaths,
    script: &str,
    end: &str,
    timeout: Duration,
) -> std::io::Result<crate::proto::ConsoleOutput> {
    let req = Request::ConsoleScript {
        script: script.into(),
        end: end.into(),
        timeout_ms: timeout.as_millis() as u64,
    };
    call(&paths.socket(), &req, timeout + Duration::from_secs(5))
}

/// Runs `argv` in a VM through its QEMU guest agent, via its shim.
pub fn agent_exec(
    paths: &GuestPaths,
    argv: &[String],
    stdin: &[u8],
    timeout: Duration,
) -> std::io::Result<crate::proto::AgentExecReply> {
    use base64::Engine as _;
    let req = Request::AgentExec {
        argv: argv.to_vec(),
        stdin: base64::engine::general_purpose::STANDARD.encode(stdin),
        timeout_ms: timeout.as_millis() as u64,
    };
    // The shim enforces `timeout`; the margin covers the agent probe, a
    // last status answer carrying big output, and kill-on-timeout.
    call(&paths.socket(), &req, timeout + Duration::from_secs(60))
}

/// The live status, or None when no shim answers on the socket.
pub fn status(paths: &GuestPaths) -> Option<ShimStatus> {
    request(&paths.socket(), &Request::Status, Duration::from_secs(2)).ok()
}

/// The last status the shim wrote to disk (it may have exited since).
pub fn last_status(paths: &GuestPaths) -> Option<ShimStatus> {
    let s = std::fs::read(paths.status()).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Starts `exe shim --state-dir D --guest NAME` in a session of its own, so it
/// outlives the caller (the daemon), with stdout/stderr appended to the
/// guest's `shim.log`. A thread reaps it if it exits while we still run.
pub fn spawn(exe: &Path, state_dir: &Path, guest: &str) -> std::io::Result<u32> {
    let paths = GuestPaths::new(state_dir, guest);
    std::fs::create_dir_all(&paths.dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.shim_log())?;
    // On systemd hosts the supervisor and its guest get a scope of their
    // own (berth_container::cgroup); when it already exists (the guest
    // outlived an earlier supervisor) the supervisor joins it itself.
    let scope = berth_container::cgroup::scope_to_create(guest, Duration::from_secs(3));
    let mut cmd = match &scope {
        Some(argv) => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("shim")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--guest")
        .arg(guest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the
    // parent; it only detaches the child from our session/process group.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}
