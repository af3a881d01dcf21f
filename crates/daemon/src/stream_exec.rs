//! exec with a streamed stdin: `POST /v1/guests/{name}/exec-stream`.
//!
//! `/exec` takes its stdin base64 in a JSON body, which suits a config file
//! but not a Nix closure of hundreds of megabytes (`berth copy-closure`).
//! Here the request body *is* the command's stdin, read as it arrives:
//!
//! ```text
//! client ── body bytes ──▶ axum task ── bounded channel ──▶ ChannelReader
//!                                                               │ (blocking thread)
//!   container: nsenter ... -- argv   ◀── stdin pipe ◀───────────┘
//!   VM:        spooled in chunks through exec (agent / exec port / console)
//!              to a file in the guest, then `argv < file`
//! ```
//!
//! A container's command reads the bytes while the client still sends them
//! (nothing is buffered beyond a few chunks). A VM's channels take one
//! bounded message per command, so the body is appended to a temp file in
//! the guest chunk by chunk (1 MiB per guest-agent call, 2 KiB per console
//! line) and the command then reads that file: it works without any guest
//! network, slowly over a serial console.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use berth_shim::ShimState;
use futures::StreamExt;

use crate::engine::{Engine, EngineError, ExecOutput};
use crate::http::{ApiError, App};

/// Bytes per guest-agent `guest-exec` call when spooling stdin into a VM.
pub const AGENT_CHUNK: usize = 1 << 20;
/// Bytes per console line (base64 grows them by 4/3; a line holds 4000).
pub const CONSOLE_CHUNK: usize = 2048;

/// Runs `cmd argv` (a prepared `nsenter ... --`) with `stdin` fed to it
/// while it runs, and returns its exit code and exact output. The command
/// is killed after `timeout`.
pub(crate) fn run_with_stdin(
    name: &str,
    mut cmd: Command,
    argv: &[String],
    stdin: impl Read + Send + 'static,
    timeout: Duration,
) -> Result<ExecOutput, EngineError> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EngineError::guest(name, format!("running nsenter (util-linux): {e}")))?;
    let input = child.stdin.take();
    // Not joined: it ends when the input ends, when the command closes its
    // stdin (EPIPE) or when the command is killed.
    std::thread::spawn(move || {
        let (mut stdin, Some(mut w)) = (stdin, input) else {
            return;
        };
        let _ = std::io::copy(&mut stdin, &mut w);
        let _ = w.flush();
    });
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EngineError::guest(
                    name,
                    format!("exec timed out after {timeout:?}; the command was killed"),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(EngineError::guest(name, format!("waiting for exec: {e}"))),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok((code, stdout, stderr))
}

/// Single-quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The guest command that appends its stdin to `file`.
pub fn append_argv(file: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("cat >> {}", sh_quote(file)),
    ]
}

/// The guest command that runs `argv` with `file` as stdin, removes the
/// file and exits with the command's status.
pub fn run_from_file_argv(file: &str, argv: &[String]) -> Vec<String> {
    let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    let f = sh_quote(file);
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("{} < {f}; r=$?; rm -f {f}; exit $r", cmd.join(" ")),
    ]
}

/// Fills `buf` from `r` as far as it goes; returns the bytes read (less
/// than `buf.len()` only at the end of the input).
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Engine {
    /// Runs `argv` in guest `name` (as root) with `stdin` streamed to it;
    /// also says which channel carried it (see [`Engine::exec_via`]).
    pub fn exec_stream(
        &self,
        name: &str,
        argv: &[String],
        stdin: Box<dyn Read + Send>,
        timeout: Duration,
    ) -> Result<(ExecOutput, &'static str), EngineError> {
        let g = self.applied(&self.record(name)?)?;
        if g.vm.is_some() {
            return self.exec_spooled(name, argv, stdin, timeout);
        }
        let pid = self.running_leader(name, &[ShimState::Running])?;
        let cmd = self.enter(name, pid, None, &g)?;
        run_with_stdin(name, cmd, argv, stdin, timeout).map(|r| (r, "nsenter"))
    }

    /// VMs: appends `stdin` to a temp file in the guest, chunk by chunk
    /// through exec, then runs `argv` reading that file.
    fn exec_spooled(
        &self,
        name: &str,
        argv: &[String],
        mut stdin: Box<dyn Read + Send>,
        timeout: Duration,
    ) -> Result<(ExecOutput, &'static str), EngineError> {
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    EngineError::guest(
                        name,
                        format!("exec timed out after {timeout:?} while sending its stdin"),
                    )
                })
        };
        let mktemp = ["mktemp".to_string(), "/tmp/berth-stdin.XXXXXX".into()];
        let ((code, out, err), channel) =
            self.exec_via(name, &mktemp, Vec::new(), left()?, None)?;
        let file = String::from_utf8_lossy(&out).trim().to_string();
        if code != 0 || !file.starts_with("/tmp/berth-stdin.") {
            return Err(EngineError::guest(
                name,
                format!(
                    "cannot make a temp file for the command's stdin in the guest (mktemp exited with {code}): {}",
                    String::from_utf8_lossy(&err).trim()
                ),
            ));
        }
        let chunk = if channel == "agent" {
            AGENT_CHUNK
        } else {
            CONSOLE_CHUNK
        };
        let sent = (|| {
            let mut buf = vec![0u8; chunk];
            loop {
                let n = fill(&mut stdin, &mut buf).map_err(|e| {
                    EngineError::guest(name, format!("reading the command's stdin: {e}"))
                })?;
                if n == 0 {
                    return Ok(());
                }
                let ((code, _, err), _) =
                    self.exec_via(name, &append_argv(&file), buf[..n].to_vec(), left()?, None)?;
                if code != 0 {
                    return Err(EngineError::guest(
                        name,
                        format!(
                            "writing stdin to {file} in the guest failed ({code}): {}",
                            String::from_utf8_lossy(&err).trim()
                        ),
                    ));
                }
                if n < chunk {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = sent {
            let rm = ["rm".to_string(), "-f".into(), file.clone()];
            let _ = self.exec_via(name, &rm, Vec::new(), Duration::from_secs(30), None);
            return Err(e);
        }
        self.exec_via(
            name,
            &run_from_file_argv(&file, argv),
            Vec::new(),
            left()?,
            None,
        )
    }
}

/// A blocking reader over the body chunks an async task forwards.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "the request body broke off: {e}"
                    )));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct StreamQuery {
    /// The command, a JSON array of strings.
    argv: String,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// `POST /v1/guests/{name}/exec-stream?argv=[...]&timeout_secs=N`: the
/// body (any length, `application/octet-stream`) is the command's stdin.
pub(crate) async fn handler(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<StreamQuery>,
    body: Body,
) -> Result<Json<berth_api::ExecResponse>, ApiError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let argv: Vec<String> = serde_json::from_str(&q.argv).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("argv must be a JSON array of strings: {e}"),
        )
    })?;
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "argv is empty: give the program and its arguments",
        ));
    }
    let timeout = Duration::from_secs(q.timeout_secs.unwrap_or(3600));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let pump = tokio::spawn(async move {
        let mut s = body.into_data_stream();
        while let Some(item) = s.next().await {
            let item = item.map_err(|e| e.to_string());
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let reader = ChannelReader {
        rx,
        cur: bytes::Bytes::new(),
    };
    let e = app.engine.clone();
    let res =
        crate::http::blocking(move || e.exec_stream(&name, &argv, Box::new(reader), timeout)).await;
    pump.abort();
    let ((code, out, err), channel) = res?;
    Ok(Json(berth_api::ExecResponse {
        exit_code: code,
        stdout: b64.encode(out),
        stderr: b64.encode(err),
        channel: Some(channel.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spool_commands_quote_paths_and_arguments() {
        assert_eq!(
            append_argv("/tmp/berth-stdin.ab'c"),
            ["/bin/sh", "-c", "cat >> '/tmp/berth-stdin.ab'\\''c'"]
        );
        let v = run_from_file_argv(
            "/tmp/berth-stdin.x",
            &["nix-store".into(), "--import".into(), "a b".into()],
        );
        assert_eq!(
            v[2],
            "'nix-store' '--import' 'a b' < '/tmp/berth-stdin.x'; r=$?; rm -f '/tmp/berth-stdin.x'; exit $r"
        );
        // A console line holds the base64 of a chunk plus the framing.
        assert!(CONSOLE_CHUNK.div_ceil(3) * 4 + 600 < 4000);
    }

    #[test]
    fn channel_reader_yields_chunks_in_order_then_eof() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(Ok(bytes::Bytes::from_static(b"hello ")))
            .unwrap();
        tx.blocking_send(Ok(bytes::Bytes::from_static(b"world")))
            .unwrap();
        drop(tx);
        let mut r = ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
    }

    #[test]
    fn channel_reader_reports_a_broken_body() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(Err("reset".into())).unwrap();
        let mut r = ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        assert!(e.to_string().contains("broke off"), "{e}");
    }
}
