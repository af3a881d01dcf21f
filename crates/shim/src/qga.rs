//! A small client for the QEMU guest agent (qemu-ga), on the VM's
//! `org.qemu.guest_agent.0` virtio-serial port, which QEMU exposes to the
//! shim as a unix socket (`qga.sock`, 0600 like QMP).
//!
//! The protocol is QMP-like JSON, one request and one answer at a time, with
//! no greeting. The stream can hold stale bytes (an answer that came after
//! we gave up on it, an agent that restarted mid-request), so a conversation
//! starts with a resync:
//!
//! ```text
//! shim ── 0xFF {"execute":"guest-sync-delimited","arguments":{"id":N}} ──▶ agent
//!      ◀── ...stale lines... 0xFF {"return":N}                        ───
//! shim ── {"execute":"guest-exec","arguments":{path,arg,input-data,capture-output}} ──▶
//!      ◀── {"return":{"pid":P}}
//! shim ── {"execute":"guest-exec-status","arguments":{"pid":P}} ──▶   (polled)
//!      ◀── {"return":{"exited":true,"exitcode":C,"out-data":B64,"err-data":B64}}
//! ```
//!
//! The leading 0xFF makes the agent drop any half-read request; the agent's
//! 0xFF before its answer marks where the fresh answers begin.
//!
//! qemu-ga keeps at most [`AGENT_OUTPUT_CAP`] (16 MiB) of each of stdout and
//! stderr (`GUEST_EXEC_MAX_OUTPUT` in qemu's qga/commands.c) and drops the
//! rest. Agents before the 2025 fix ("qga: Fix truncated output handling in
//! guest-exec status reporting", in 7.2.20, 10.0.4, 10.1.1) report the cut
//! wrongly (`out-truncated` present but `false`), so a capture that reaches
//! the cap counts as truncated too, and berth reports it as an error rather
//! than return a silently shortened output.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// qemu-ga's cap on captured stdout and on captured stderr.
pub const AGENT_OUTPUT_CAP: usize = 16 << 20;

/// How long a live agent may take to answer a resync (TCG guests are slow).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent channel closed")]
    Closed,
    #[error("guest agent channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest agent sent something that is not JSON: {0}")]
    Garbled(String),
    /// The agent answered with an error (`{"error":{"class","desc"}}`).
    #[error("{0}")]
    Agent(String),
}

/// One connection to the agent's socket.
pub struct Qga {
    stream: UnixStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
    /// A request went unanswered: resync before the next one.
    dirty: bool,
}

/// The outcome of a command run through `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code, or 128 + signal number.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Qga {
    pub fn new(stream: UnixStream) -> Qga {
        Qga {
            stream,
            buf: Vec::new(),
            dirty: true,
        }
    }

    /// Resynchronises the stream; `Ok` means an agent answered.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let id = random_id();
        let mut req = vec![0xffu8];
        req.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        self.dirty = true;
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.write_all(&req)?;
        let deadline = Instant::now() + timeout;
        loop {
            // Everything before the agent's sentinel is stale.
            match self.buf.iter().position(|&b| b == 0xff) {
                Some(i) => {
                    self.buf.drain(..=i);
                }
                None => {
                    self.buf.clear();
                    self.fill(deadline, timeout)?;
                    continue;
                }
            }
            let line = self.line(deadline, timeout)?;
            if let Ok(v) = serde_json::from_slice::<Value>(&line)
                && v.get("return").and_then(Value::as_u64) == Some(id)
            {
                self.dirty = false;
                return Ok(());
            }
            // An answer to an older sync: wait for ours.
        }
    }

    /// Sends one command and returns its `return` value.
    pub fn command(
        &mut self,
        execute: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        if self.dirty {
            self.sync(SYNC_TIMEOUT.min(timeout))?;
        }
        let mut req = json!({"execute": execute, "arguments": arguments}).to_string();
        req.push('\n');
        self.dirty = true;
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.write_all(req.as_bytes())?;
        let deadline = Instant::now() + timeout;
        let line = self.line(deadline, timeout)?;
        self.dirty = false;
        let v: Value = serde_json::from_slice(&line).map_err(|e| {
            self.dirty = true;
            QgaError::Garbled(format!(
                "{e}: {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ))
        })?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = v.get("error") {
            let desc = err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(QgaError::Agent(desc.to_owned()));
        }
        self.dirty = true;
        Err(QgaError::Garbled(format!("unexpected answer {v}")))
    }

    /// The next `\n`-terminated line (without the newline).
    fn line(&mut self, deadline: Instant, timeout: Duration) -> Result<Vec<u8>, QgaError> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    scanned = 0;
                    continue;
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            self.fill(deadline, timeout)?;
        }
    }

    /// Reads what is there (at least one byte) before `deadline`.
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<(), QgaError> {
        let mut chunk = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QgaError::Timeout(timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QgaError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Why an exec through the agent did not produce a result.
#[derive(Debug)]
pub enum ExecError {
    /// No agent answered: try another channel (nothing ran).
    NoAgent(String),
    /// The agent took the request; the error is final (the command may have
    /// run, so it must not be run again elsewhere).
    Failed(String),
}

/// A non-cryptographic random u32-range id (time, pid and a counter mixed):
/// enough to tell our sync answer from stale ones. Kept below 2^53 so it
/// survives JSON doubles anywhere.
fn random_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x & ((1 << 53) - 1)
}

/// One exchange with the agent behind `chan`, holding the lock only for it,
/// so concurrent execs interleave their polls instead of queueing whole.
fn call(
    chan: &Mutex<Option<Qga>>,
    execute: &str,
    args: Value,
    timeout: Duration,
) -> Result<Value, QgaError> {
    let mut guard = chan.lock().unwrap_or_else(|p| p.into_inner());
    let q = guard.as_mut().ok_or(QgaError::Closed)?;
    q.command(execute, args, timeout)
}

/// Runs `argv` through `guest-exec` with `stdin` as its input and waits for
/// it (polling `guest-exec-status`) up to `timeout`.
pub fn exec(
    chan: &Mutex<Option<Qga>>,
    argv: &[String],
    stdin: &[u8],
    timeout: Duration,
) -> Result<ExecResult, ExecError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let started = Instant::now();
    {
        let mut guard = chan.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = guard.as_mut() else {
            return Err(ExecError::NoAgent("no guest agent channel".into()));
        };
        q.sync(SYNC_TIMEOUT)
            .map_err(|e| ExecError::NoAgent(e.to_string()))?;
    }
    let Some((path, args)) = argv.split_first() else {
        return Err(ExecError::Failed("empty command".into()));
    };
    let mut req = json!({"path": path, "arg": args, "capture-output": true});
    if !stdin.is_empty() {
        req["input-data"] = Value::String(b64.encode(stdin));
    }
    // Starting a process is quick even under TCG; a big stdin takes a while
    // to cross the port.
    let start_timeout = Duration::from_secs(30) + Duration::from_millis(stdin.len() as u64 / 64);
    let pid = match call(chan, "guest-exec", req, start_timeout) {
        Ok(v) => v
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| ExecError::Failed(format!("guest-exec answered without a pid: {v}")))?,
        Err(QgaError::Agent(desc)) => {
            return Err(ExecError::Failed(format!(
                "the guest agent could not run {path:?}: {desc}"
            )));
        }
        Err(e) => return Err(ExecError::Failed(format!("guest-exec: {e}"))),
    };
    let mut pause = Duration::from_millis(5);
    let status = loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            // No kill in the agent's protocol: ask the guest's own `kill`,
            // then reap the record. Best effort.
            let _ = call(
                chan,
                "guest-exec",
                json!({"path": "kill", "arg": ["-KILL", pid.to_string()]}),
                Duration::from_secs(5),
            );
            std::thread::sleep(Duration::from_millis(200));
            let _ = call(
                chan,
                "guest-exec-status",
                json!({"pid": pid}),
                Duration::from_secs(5),
            );
            return Err(ExecError::Failed(format!(
                "exec timed out after {timeout:?}; the command (guest pid {pid}) was killed"
            )));
        }
        // A finished command's output (up to 2 x 16 MiB, base64) comes in
        // this answer: allow for it even when the deadline is near.
        match call(
            chan,
            "guest-exec-status",
            json!({"pid": pid}),
            left.clamp(Duration::from_secs(30), Duration::from_secs(120)),
        ) {
            Ok(v) if v.get("exited").and_then(Value::as_bool) == Some(true) => break v,
            Ok(_) => {}
            Err(e) => {
                return Err(ExecError::Failed(format!(
                    "guest-exec-status for guest pid {pid}: {e}"
                )));
            }
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(200));
    };
    parse_status(&status).map_err(ExecError::Failed)
}

/// Reads a finished `guest-exec-status` answer.
pub fn parse_status(v: &Value) -> Result<ExecResult, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let code = match (
        v.get("exitcode").and_then(Value::as_i64),
        v.get("signal").and_then(Value::as_i64),
    ) {
        (_, Some(sig)) => 128 + sig as i32,
        (Some(c), None) => c as i32,
        (None, None) => return Err(format!("guest-exec-status gave no exit code: {v}")),
    };
    let data = |key: &str, trunc: &str, what: &str| -> Result<Vec<u8>, String> {
        let bytes = match v.get(key).and_then(Value::as_str) {
            Some(s) => b64
                .decode(s)
                .map_err(|e| format!("{what} from the guest agent is not base64: {e}"))?,
            None => Vec::new(),
        };
        if v.get(trunc).and_then(Value::as_bool) == Some(true) || bytes.len() >= AGENT_OUTPUT_CAP {
            return Err(format!(
                "the command exited with {code}, but its {what} was cut at {} MiB by the guest agent \
                 (qemu-ga keeps at most 16 MiB per stream); write big output to a file in the guest \
                 and read it in pieces",
                bytes.len() >> 20
            ));
        }
        Ok(bytes)
    };
    Ok(ExecResult {
        code,
        stdout: data("out-data", "out-truncated", "stdout")?,
        stderr: data("err-data", "err-truncated", "stderr")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::BufRead;

    #[test]
    fn status_is_parsed_exactly() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = json!({"exited": true, "exitcode": 3, "out-data": b64.encode(b"\x00\xffhi\n"), "err-data": b64.encode(b"err")});
        assert_eq!(
            parse_status(&v).unwrap(),
            ExecResult {
                code: 3,
                stdout: b"\x00\xffhi\n".to_vec(),
                stderr: b"err".to_vec()
            }
        );
        let v = json!({"exited": true, "signal": 9});
        assert_eq!(parse_status(&v).unwrap().code, 137);
        // A fixed agent says it cut; an old one says "false" but the data
        // reached the cap.
        let v = json!({"exited": true, "exitcode": 0, "out-data": "aGk=", "out-truncated": true});
        assert!(parse_status(&v).unwrap_err().contains("cut"));
        let big = b64.encode(vec![0u8; AGENT_OUTPUT_CAP]);
        let v = json!({"exited": true, "exitcode": 0, "err-data": big, "err-truncated": false});
        let e = parse_status(&v).unwrap_err();
        assert!(e.contains("stderr") && e.contains("16 MiB"), "{e}");
        assert!(parse_status(&json!({"exited": true})).is_err());
    }

    #[test]
    fn ids_differ() {
        let a = random_id();
        let b = random_id();
        assert_ne!(a, b);
        assert!(a < (1 << 53));
    }

    /// A fake agent: stale bytes first, then it answers like qemu-ga.
    fn fake_agent(stream: UnixStream) {
        let mut w = stream.try_clone().unwrap();
        // Stale output from an earlier conversation.
        w.write_all(b"{\"return\": {\"pid\": 1}}\n").unwrap();
        let mut r = std::io::BufReader::new(stream);
        let mut line = Vec::new();
        let mut polls = 0;
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xff).collect();
            line.clear();
            let v: Value = serde_json::from_slice(&text).unwrap();
            let ans = match v["execute"].as_str().unwrap() {
                "guest-sync-delimited" => {
                    // An answer to an older sync first, then ours.
                    w.write_all(b"\xff{\"return\": 1}\n").unwrap();
                    let mut a = vec![0xffu8];
                    a.extend_from_slice(
                        json!({"return": v["arguments"]["id"]})
                            .to_string()
                            .as_bytes(),
                    );
                    a.push(b'\n');
                    w.write_all(&a).unwrap();
                    continue;
                }
                "guest-exec" if v["arguments"]["path"] == "/missing" => {
                    json!({"error": {"class": "GenericError", "desc": "Failed to execute child process \u{201c}/missing\u{201d} (No such file or directory)"}})
                }
                "guest-exec" => {
                    assert_eq!(v["arguments"]["input-data"], "aW4=");
                    assert_eq!(v["arguments"]["arg"], json!(["-c", "x"]));
                    json!({"return": {"pid": 42}})
                }
                "guest-exec-status" => {
                    polls += 1;
                    if polls < 3 {
                        json!({"return": {"exited": false}})
                    } else {
                        json!({"return": {"exited": true, "exitcode": 7, "out-data": "b3V0", "err-data": "ZXJy"}})
                    }
                }
                other => panic!("unexpected {other}"),
            };
            w.write_all(format!("{ans}\n").as_bytes()).unwrap();
        }
    }

    #[test]
    fn exec_through_a_fake_agent() {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || fake_agent(b));
        let chan = Mutex::new(Some(Qga::new(a)));
        let argv: Vec<String> = ["/bin/sh", "-c", "x"].map(String::from).to_vec();
        let r = exec(&chan, &argv, b"in", Duration::from_secs(10)).unwrap();
        assert_eq!(
            r,
            ExecResult {
                code: 7,
                stdout: b"out".to_vec(),
                stderr: b"err".to_vec()
            }
        );
        let missing = ["/missing".to_string()];
        match exec(&chan, &missing, b"", Duration::from_secs(10)) {
            Err(ExecError::Failed(e)) => assert!(e.contains("No such file"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_timeout_kills_the_command_in_the_guest() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = std::io::BufReader::new(b);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xff).collect();
                line.clear();
                let v: Value = serde_json::from_slice(&text).unwrap();
                let ans = match v["execute"].as_str().unwrap() {
                    "guest-sync-delimited" => {
                        let mut a = vec![0xffu8];
                        a.extend_from_slice(
                            json!({"return": v["arguments"]["id"]})
                                .to_string()
                                .as_bytes(),
                        );
                        a.push(b'\n');
                        w.write_all(&a).unwrap();
                        continue;
                    }
                    "guest-exec" => {
                        let _ = tx.send(v["arguments"].clone());
                        json!({"return": {"pid": 9}})
                    }
                    _ => json!({"return": {"exited": false}}),
                };
                w.write_all(format!("{ans}\n").as_bytes()).unwrap();
            }
        });
        let chan = Mutex::new(Some(Qga::new(a)));
        match exec(&chan, &["sleep".into()], b"", Duration::from_millis(300)) {
            Err(ExecError::Failed(e)) => assert!(e.contains("timed out"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.recv().unwrap()["path"], "sleep");
        assert_eq!(
            rx.recv().unwrap(),
            json!({"path": "kill", "arg": ["-KILL", "9"]})
        );
    }

    #[test]
    fn a_silent_channel_is_no_agent() {
        let (a, _b) = UnixStream::pair().unwrap();
        let chan = Mutex::new(Some(Qga::new(a)));
        let t = Instant::now();
        match exec(&chan, &["true".into()], b"", Duration::from_secs(10)) {
            Err(ExecError::NoAgent(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < SYNC_TIMEOUT + Duration::from_secs(1));
        match exec(
            &Mutex::new(None),
            &["true".into()],
            b"",
            Duration::from_secs(1),
        ) {
            Err(ExecError::NoAgent(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    /// The real qemu-ga, when the host has it, on a unix socket: the client
    /// against the agent it is written for (runs `printf` on this host).
    #[test]
    fn exec_through_the_real_qemu_ga() {
        let Some(ga) = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            eprintln!(
                "skip exec_through_the_real_qemu_ga: no qemu-ga (apt-get install qemu-guest-agent)"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let mut agent = std::process::Command::new(ga)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(dir.path())
            .arg("-f")
            .arg(dir.path().join("pid"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut conn = None;
        for _ in 0..100 {
            if let Ok(s) = UnixStream::connect(&sock) {
                conn = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let chan = Mutex::new(Some(Qga::new(conn.expect("qemu-ga listens"))));
        let argv: Vec<String> = [
            "/bin/sh",
            "-c",
            "cat; printf '\\000\\377' ; printf e >&2; exit 5",
        ]
        .map(String::from)
        .to_vec();
        let r = exec(&chan, &argv, b"stdin\n", Duration::from_secs(20));
        let _ = agent.kill();
        let _ = agent.wait();
        let r = r.unwrap();
        assert_eq!(r.code, 5);
        assert_eq!(r.stdout, b"stdin\n\x00\xff");
        assert_eq!(r.stderr, b"e");
    }
}
