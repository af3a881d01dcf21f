//! A guest's console: the pty its command (container) or serial port (VM)
//! runs on, owned by the shim for the shim's whole life.
//!
//! ```text
//!  guest ⇄ pty slave ── pty master ─┬─▶ console.log (history, rotated at 16 MiB)
//!                                    ├─▶ every attached client (readers and the writer)
//!                                    ◀── the one writer (console.sock, "write")
//! ```
//!
//! Clients connect to `guests/NAME/console.sock`, send `read\n` or `write\n`,
//! get `ok\n` (or `busy\n` when a writer is attached already), then the
//! recent history, then live output; a writer's bytes go to the guest.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// History rotation threshold for console.log.
const LOG_MAX: u64 = 16 << 20;
/// History a client gets when it attaches.
const ATTACH_HISTORY: u64 = 8 << 10;

pub struct Console {
    slave: OwnedFd,
    master: Mutex<File>,
    log_path: PathBuf,
    clients: Mutex<Vec<UnixStream>>,
    writer: AtomicBool,
    last_output: Mutex<Instant>,
    /// Where guest output also goes while an exec runs over the console.
    capture: Mutex<Option<std::sync::mpsc::Sender<Vec<u8>>>>,
}

impl Console {
    /// Opens the pty, starts the hub and the client listener.
    pub fn open(log_path: PathBuf, socket: &Path) -> std::io::Result<Arc<Console>> {
        let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        let master = File::from(pty.master);
        let reader = master.try_clone()?;
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let c = Arc::new(Console {
            slave: pty.slave,
            master: Mutex::new(master),
            log_path,
            clients: Mutex::new(Vec::new()),
            writer: AtomicBool::new(false),
            last_output: Mutex::new(Instant::now()),
            capture: Mutex::new(None),
        });
        let hub = Arc::clone(&c);
        std::thread::spawn(move || hub.pump(reader));
        let acc = Arc::clone(&c);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let c = Arc::clone(&acc);
                std::thread::spawn(move || c.serve(conn));
            }
        });
        Ok(c)
    }

    /// The guest's stdin, stdout and stderr: copies of the pty slave.
    pub fn stdio(&self) -> std::io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
        let fd = self.slave.as_fd();
        Ok((
            fd.try_clone_to_owned()?,
            fd.try_clone_to_owned()?,
            fd.try_clone_to_owned()?,
        ))
    }

    /// Waits until the guest's last output has reached the log (no output
    /// for 30 ms, at most 500 ms), e.g. before reporting why it exited.
    pub fn drain(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(500) {
            let quiet = self
                .last_output
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if quiet > Duration::from_millis(30) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `console.idx`, restarted whenever console.log is rotated.
    fn open_index(&self) -> Option<File> {
        let path = self.log_path.with_extension("idx");
        let log_len = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if log_len == 0 {
            let _ = std::fs::remove_file(&path);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    }

    fn open_log(&self) -> Option<File> {
        if std::fs::metadata(&self.log_path)
            .map(|m| m.len() > LOG_MAX)
            .unwrap_or(false)
        {
            let _ = std::fs::rename(&self.log_path, self.log_path.with_extension("log.1"));
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .ok()
    }

    /// Guest output → history and clients.
    fn pump(&self, mut master: File) {
        let mut log = self.open_log();
        let mut idx = self.open_index();
        let mut written: u64 = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut indexed_sec = 0;
        let mut buf = [0u8; 8192];
        loop {
            let n = match master.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // No guest on the slave right now (EIO): wait for one.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Ok(n) => n,
            };
            if let Ok(mut t) = self.last_output.lock() {
                *t = Instant::now();
            }
            let data = &buf[..n];
            if written > LOG_MAX {
                log = self.open_log();
                idx = self.open_index();
                written = 0;
            }
            // One index entry per second with output: where that second's
            // output starts in console.log (for `berth logs --since`).
            let sec = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if sec != indexed_sec
                && let Some(i) = idx.as_mut()
            {
                let _ = writeln!(i, "{sec} {written}");
                indexed_sec = sec;
            }
            if let Some(f) = log.as_mut() {
                let _ = f.write_all(data);
                written += n as u64;
            }
            if let Ok(mut clients) = self.clients.lock() {
                clients.retain_mut(|c| c.write_all(data).is_ok());
            }
            if let Ok(cap) = self.capture.lock()
                && let Some(tx) = cap.as_ref()
            {
                let _ = tx.send(data.to_vec());
            }
        }
    }

    /// One client: handshake, history, then live output (and input, for the writer).
    fn serve(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(read_half) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut out = conn;
        let write = match line.trim() {
            "read" => false,
            "write" => true,
            _ => {
                let _ = out.write_all(b"error: send `read` or `write`\n");
                return;
            }
        };
        if write && self.writer.swap(true, Ordering::SeqCst) {
            let _ = out.write_all(b"busy\n");
            return;
        }
        let _ = out.write_all(b"ok\n");
        let _ = out.write_all(&history(&self.log_path, ATTACH_HISTORY));
        if let (Ok(mut clients), Ok(c)) = (self.clients.lock(), out.try_clone()) {
            clients.push(c);
        }
        if !write {
            return;
        }
        // The writer: its bytes go to the guest until it disconnects.
        let _ = reader.get_ref().set_read_timeout(None);
        let mut buf = [0u8; 4096];
        let pending = reader.buffer().to_vec();
        if !pending.is_empty()
            && let Ok(mut m) = self.master.lock()
        {
            let _ = m.write_all(&pending);
        }
        let mut inner = reader.into_inner();
        while let Ok(n) = inner.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut m) = self.master.lock() {
                let _ = m.write_all(&buf[..n]);
            }
        }
        self.writer.store(false, Ordering::SeqCst);
    }
}

impl Console {
    /// Types `script` into the guest's console (taking the writer's place,
    /// so it never interleaves with a person typing) and returns what the
    /// guest printed until `end` appeared. Watchers see it all.
    pub fn run_script(
        &self,
        script: &str,
        end: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        // Take turns with a person typing: wait a little for the writer's
        // place (a client that just detached may still be letting go).
        let wait_until = Instant::now() + Duration::from_secs(10);
        while self.writer.swap(true, Ordering::SeqCst) {
            if Instant::now() > wait_until {
                return Err(
                    "the console is taken for writing by a client; detach it (Ctrl-]) and retry"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut cap) = self.capture.lock() {
            *cap = Some(tx);
        }
        let res = (|| {
            let deadline = Instant::now() + timeout;
            let write = |bytes: &[u8]| -> Result<(), String> {
                let mut m = self
                    .master
                    .lock()
                    .map_err(|_| "console lock poisoned".to_string())?;
                // Ctrl-U first: drop whatever half-typed line is there.
                m.write_all(b"\x15")
                    .and_then(|()| m.write_all(bytes))
                    .map_err(|e| e.to_string())
            };
            // A shell must be at its prompt before the script is typed: while
            // the guest still boots, the start of a line is lost and what is
            // left (an open quote) would keep the shell waiting for more. So
            // first a probe without quotes, until its answer comes back.
            let (probe, answer) = ready_probe();
            let mut got = Vec::new();
            'ready: loop {
                write(probe.as_bytes())?;
                let retry = Instant::now() + Duration::from_secs(2);
                loop {
                    if got.windows(answer.len()).any(|w| w == answer.as_bytes()) {
                        break 'ready;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(format!(
                            "no shell answered on the console within {timeout:?} (is a shell at its prompt?)"
                        ));
                    }
                    if now >= retry {
                        break;
                    }
                    if let Ok(chunk) = rx.recv_timeout(retry.min(deadline) - now) {
                        got.extend_from_slice(&chunk);
                    }
                }
            }
            write(script.as_bytes())?;
            let mut got = Vec::new();
            loop {
                if got.windows(end.len()).any(|w| w == end.as_bytes()) {
                    return Ok(got);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no answer on the console within {timeout:?} (is a shell at its prompt?)"
                    ));
                }
                if let Ok(chunk) = rx.recv_timeout(left) {
                    got.extend_from_slice(&chunk);
                }
            }
        })();
        if let Ok(mut cap) = self.capture.lock() {
            *cap = None;
        }
        self.writer.store(false, Ordering::SeqCst);
        res
    }
}

/// The probe line typed before a console script and the answer it prints
/// (which the typed line's own echo does not contain): `echo
/// BERTH-RD\Y-<nonce>` prints `BERTH-RDY-<nonce>`, without quotes (a lost
/// line start cannot leave one open) or variables. The nonce is fresh, and
/// never the script's end marker: a late answer to an earlier probe must
/// not end the script's output early.
fn ready_probe() -> (String, String) {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (
        format!(" echo BERTH-RD\\Y-{nonce:x}\n"),
        format!("BERTH-RDY-{nonce:x}"),
    )
}

/// The last `max` bytes of the history.
fn history(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    #[test]
    fn ready_probe_answer_is_not_in_its_own_echo() {
        let (probe, answer) = super::ready_probe();
        assert!(!probe.contains(&answer), "{probe} / {answer}");
        assert!(
            !probe.contains('\'') && !probe.contains('"'),
            "no quotes: {probe}"
        );
        assert!(answer.starts_with("BERTH-RDY-"));
        assert!(probe.ends_with('\n'));
    }
}
