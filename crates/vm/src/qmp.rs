//! A small synchronous QMP client (one JSON object per line over a unix
//! socket). Asynchronous events that arrive while waiting for a command's
//! answer are queued and handed out by [`Qmp::next_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Result, VmError};

/// How long [`Qmp::execute`] waits for an answer unless changed with
/// [`Qmp::set_command_timeout`].
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not yet complete (kept across read timeouts).
    partial: Vec<u8>,
    events: VecDeque<Value>,
    next_id: u64,
    command_timeout: Duration,
}

enum Line {
    Msg(Value),
    TimedOut,
    Eof,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until it appears and
    /// accepts (QEMU creates it during start-up) or `timeout` passes; reads
    /// the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(VmError::QmpConnect {
                        path: path.to_path_buf(),
                        timeout,
                        source,
                    });
                }
            }
        };
        let io = |what: &str, source| VmError::QmpIo {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let writer = stream
            .try_clone()
            .map_err(|e| io("cloning the socket", e))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let greeting = match qmp.read_line(left, "reading the greeting")? {
            Line::Msg(v) => v,
            Line::TimedOut => {
                return Err(VmError::QmpTimeout {
                    path: qmp.path.clone(),
                    cmd: "(greeting)".into(),
                    timeout: left,
                });
            }
            Line::Eof => return Err(qmp.closed("reading the greeting")),
        };
        if greeting.get("QMP").is_none() {
            return Err(VmError::QmpProtocol {
                path: qmp.path.clone(),
                what: "reading the greeting".into(),
                message: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// How long [`Qmp::execute`] waits for an answer (default 30 s).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    fn closed(&self, what: &str) -> VmError {
        VmError::QmpClosed {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    /// Reads one message, waiting at most `timeout`.
    fn read_line(&mut self, timeout: Duration, what: &str) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Line::TimedOut);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| VmError::QmpIo {
                    path: self.path.clone(),
                    what: what.to_string(),
                    source,
                })?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Ok(Line::Eof),
                Ok(_) if self.partial.last() != Some(&b'\n') => return Ok(Line::Eof),
                Ok(_) => {
                    let line = std::mem::take(&mut self.partial);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return serde_json::from_slice(&line).map(Line::Msg).map_err(|e| {
                        VmError::QmpProtocol {
                            path: self.path.clone(),
                            what: what.to_string(),
                            message: format!("{e}: {}", String::from_utf8_lossy(&line).trim()),
                        }
                    });
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(Line::TimedOut);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(Line::Eof),
                Err(source) => {
                    return Err(VmError::QmpIo {
                        path: self.path.clone(),
                        what: what.to_string(),
                        source,
                    });
                }
            }
        }
    }

    /// Runs `cmd` with optional `args` and returns its `"return"` value.
    /// Events that arrive meanwhile are queued for [`Qmp::next_event`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let what = format!("sending `{cmd}`");
        match self.writer.write_all(line.as_bytes()) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                return Err(self.closed(&what));
            }
            Err(source) => {
                return Err(VmError::QmpIo {
                    path: self.path.clone(),
                    what,
                    source,
                });
            }
        }
        let what = format!("waiting for the answer to `{cmd}`");
        let deadline = Instant::now() + self.command_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.read_line(left, &what)? {
                Line::Msg(v) => v,
                Line::TimedOut => {
                    return Err(VmError::QmpTimeout {
                        path: self.path.clone(),
                        cmd: cmd.to_string(),
                        timeout: self.command_timeout,
                    });
                }
                Line::Eof => return Err(self.closed(&what)),
            };
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                // An answer to someone else's command (not ours to take).
                tracing::debug!(qmp = %self.path.display(), message = %v, "ignoring stray QMP message");
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(VmError::QmpCommand {
                    cmd: cmd.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(VmError::QmpProtocol {
                path: self.path.clone(),
                what,
                message: v.to_string(),
            });
        }
    }

    /// The run state: `"running"`, `"paused"`, `"prelaunch"`, `"shutdown"`, ...
    pub fn query_status(&mut self) -> Result<String> {
        let v = self.execute("query-status", None)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| VmError::QmpProtocol {
                path: self.path.clone(),
                what: "reading query-status".into(),
                message: v.to_string(),
            })
    }

    /// `(cpu index, host thread id)` of every vCPU (`query-cpus-fast`).
    pub fn vcpu_threads(&mut self) -> Result<Vec<(u32, i32)>> {
        let v = self.execute("query-cpus-fast", None)?;
        let bad = |v: &Value| VmError::QmpProtocol {
            path: self.path.clone(),
            what: "reading query-cpus-fast".into(),
            message: v.to_string(),
        };
        let list = v.as_array().ok_or_else(|| bad(&v))?;
        list.iter()
            .map(|cpu| {
                let idx = cpu.get("cpu-index").and_then(Value::as_u64);
                let tid = cpu.get("thread-id").and_then(Value::as_i64);
                match (idx, tid) {
                    (Some(i), Some(t)) => Ok((
                        u32::try_from(i).map_err(|_| bad(cpu))?,
                        i32::try_from(t).map_err(|_| bad(cpu))?,
                    )),
                    _ => Err(bad(cpu)),
                }
            })
            .collect()
    }

    /// Presses the ACPI power button; the guest decides what to do.
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", None).map(drop)
    }

    /// Ends QEMU at once (no guest shutdown). QEMU may close the socket
    /// before answering; that counts as success.
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None) {
            Ok(_) | Err(VmError::QmpClosed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The next asynchronous event (`{"event": "SHUTDOWN", "data": {"guest":
    /// true, "reason": "guest-reset"}, "timestamp": ...}` and the like),
    /// waiting at most `timeout`; `Ok(None)` on timeout. When QEMU has gone
    /// the error is [`VmError::QmpClosed`].
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line(left, "waiting for an event")? {
                Line::Msg(v) if v.get("event").is_some() => return Ok(Some(v)),
                Line::Msg(v) => {
                    tracing::debug!(qmp = %self.path.display(), message = %v, "ignoring stray QMP message");
                }
                Line::TimedOut => return Ok(None),
                Line::Eof => return Err(self.closed("waiting for an event")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: greets, then answers each request via `reply`
    /// (several lines allowed, `{id}` substituted).
    fn fake_server(
        path: &Path,
        reply: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> std::thread::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            let mut seen = vec![];
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).expect("json");
                let id = req["id"].to_string();
                for out in reply(&req) {
                    writeln!(w, "{}", out.replace("{id}", &id)).expect("write");
                }
                let quit = req["execute"] == "quit";
                seen.push(req);
                if quit {
                    break;
                }
            }
            seen
        })
    }

    #[test]
    fn execute_queues_events_and_reports_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = fake_server(&path, |req| {
            match req["execute"].as_str() {
            Some("qmp_capabilities") => vec![r#"{"return": {}, "id": {id}}"#.into()],
            Some("query-status") => vec![
                r#"{"event": "RESET", "data": {"guest": true}, "timestamp": {}}"#.into(),
                r#"{"return": {"status": "running", "running": true}, "id": {id}}"#.into(),
            ],
            Some("query-cpus-fast") => vec![
                r#"{"return": [{"cpu-index": 0, "thread-id": 100}, {"cpu-index": 1, "thread-id": 101}], "id": {id}}"#.into(),
            ],
            Some("quit") => vec![
                r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {}}"#.into(),
                r#"{"return": {}, "id": {id}}"#.into(),
            ],
            _ => vec![
                r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": {id}}"#.into(),
            ],
        }
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        assert_eq!(q.query_status().expect("status"), "running");
        assert_eq!(q.vcpu_threads().expect("cpus"), vec![(0, 100), (1, 101)]);
        let e = q.execute("nope", Some(json!({"x": 1}))).expect_err("error");
        assert!(
            e.to_string().contains("`nope` failed: CommandNotFound"),
            "{e}"
        );
        q.quit().expect("quit");
        let ev = q.next_event(Duration::from_secs(1)).expect("event");
        assert_eq!(ev.expect("RESET queued")["event"], "RESET");
        let ev = q.next_event(Duration::from_secs(1)).expect("event");
        let ev = ev.expect("SHUTDOWN queued");
        assert_eq!(ev["data"]["reason"], "host-qmp-quit");
        let seen = server.join().expect("server");
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[3]["arguments"]["x"], 1);
        // The server is gone: next_event reports it.
        let e = q.next_event(Duration::from_secs(1)).expect_err("closed");
        assert!(matches!(e, VmError::QmpClosed { .. }), "{e}");
    }

    #[test]
    fn next_event_times_out_quietly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let _server = fake_server(&path, |_| vec![r#"{"return": {}, "id": {id}}"#.into()]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        let t = Instant::now();
        assert!(
            q.next_event(Duration::from_millis(100))
                .expect("ok")
                .is_none()
        );
        assert!(t.elapsed() >= Duration::from_millis(90));
        q.quit().expect("quit");
    }

    #[test]
    fn connect_waits_for_the_socket_then_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("late.sock");
        let p2 = path.clone();
        let starter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            fake_server(&p2, |_| vec![r#"{"return": {}, "id": {id}}"#.into()])
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("late connect");
        q.quit().expect("quit");
        drop(starter.join());

        let t = Instant::now();
        let e = Qmp::connect(&dir.path().join("never.sock"), Duration::from_millis(150))
            .err()
            .expect("no socket");
        assert!(t.elapsed() >= Duration::from_millis(140));
        assert!(e.to_string().contains("could not connect"), "{e}");
    }
}
