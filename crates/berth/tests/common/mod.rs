//! Shared e2e harness: a berth daemon inside a test network namespace, with
//! its own state dir and socket, torn down (guests destroyed, daemon killed,
//! namespaces removed) when dropped, also when a test panics.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use berth_testkit::{TestNet, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

pub struct Berth {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    daemon: Option<Child>,
    // Dropped last: namespaces go after the guests are destroyed.
    pub net: TestNet,
}

impl Berth {
    pub fn new(tag: &str) -> Berth {
        let net = TestNet::new(tag).expect("test network");
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("state");
        let socket = dir.path().join("berth.sock");
        let mut b = Berth {
            dir,
            state,
            socket,
            daemon: None,
            net,
        };
        b.start_daemon();
        b
    }

    /// `berth ARGS` run inside the test host namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.net.cmd_in_host(BIN);
        c.args(args)
            .env("BERTH_STATE_DIR", &self.state)
            .env("BERTH_SOCKET", &self.socket)
            .env("BERTH_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run berth");
        eprintln!(
            "$ berth {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "berth {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = self
            .cmd(&["daemon"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.daemon = Some(child);
        let up = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
            UnixStream::connect(&self.socket).ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "daemon did not come up; log:\n{}",
            self.daemon_log()
        );
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// SIGKILL to the daemon (nsenter execs it, so the child is the daemon).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).expect("write spec");
        p
    }

    pub fn ps(&self) -> Vec<berth_api::GuestInfo> {
        let out = self.cli_ok(&["ps", "--json"]);
        serde_json::from_str(&out).expect("ps --json parses")
    }

    pub fn guest(&self, name: &str) -> berth_api::GuestInfo {
        self.ps()
            .into_iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("guest {name} not in ps"))
    }

    pub fn curl(&self, url: &str) -> Result<String, String> {
        self.net
            .curl_from_host(url, Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }

    /// Routes `net` from the test's "internet" namespace via `gateway` (the
    /// host's uplink address), e.g. to reach a group's service address.
    pub fn route_from_inet(&self, net: &str, gateway: &str) {
        let st = self
            .net
            .cmd_in_inet("ip")
            .args(["route", "add", net, "via", gateway])
            .status()
            .expect("ip route");
        assert!(
            st.success(),
            "ip route add {net} via {gateway} in the internet netns"
        );
    }

    /// A raw HTTP request to the daemon; returns (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).expect("connect daemon");
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if self.daemon.is_none() && self.state.join("berth.db").exists() {
            self.start_daemon_quiet();
        }
        if self.daemon.is_some() {
            let _ = self.cmd(&["destroy", "--all", "--yes"]).output();
        }
        self.kill_daemon();
        // Shims that outlived everything (a failed destroy): SIGTERM stops their guests.
        if let Ok(rd) = std::fs::read_dir(self.state.join("guests")) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read(e.path().join("status.json"))
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&s)
                    && let Some(pid) = v["shim_pid"].as_i64()
                {
                    let _ = Command::new("kill").arg(pid.to_string()).status();
                }
            }
        }
    }
}

impl Berth {
    fn start_daemon_quiet(&mut self) {
        if let Ok(child) = self
            .cmd(&["daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            self.daemon = Some(child);
            let _ = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                UnixStream::connect(&self.socket).ok().map(|_| ())
            });
        }
    }
}

/// Lines of `cmd` run in the host namespace.
pub fn lines_in_host(net: &TestNet, program: &str, args: &[&str]) -> String {
    let out = net.cmd_in_host(program).args(args).output().expect("run");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A spec with the given guests (TOML snippets) on a subnet of its own.
pub fn spec(uplink: &str, subnet_octet: u8, guests: &str) -> String {
    format!(
        "[host]\nuplink = \"{uplink}\"\nsubnet4 = \"10.{subnet_octet}.0.0/24\"\nsubnet6 = \"fd42:{subnet_octet:x}::/64\"\nmax_guests = 64\n\n{guests}"
    )
}

pub fn container(name: &str, index: u32, rootfs: &Path, extra: &str) -> String {
    format!(
        "[guest.{name}]\nkind = \"container\"\nindex = {index}\nrootfs = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec httpd -f -p 80 -h /www\"]\nephemeral = true\n{extra}\n",
        rootfs.display()
    )
}

/// Everything `r` yields, in pieces, on a channel: a reader thread keeps a
/// test from hanging on a stream that never ends.
pub fn read_in_background(
    mut r: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// md5 of `data` in hex, by the host's md5sum (to compare with a guest's).
pub fn md5_hex(data: &[u8]) -> String {
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    md5.stdin
        .as_mut()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    let out = md5.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A `berth console` client driven through pipes.
pub struct ConsoleClient {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    pub seen: String,
}

impl ConsoleClient {
    pub fn attach(b: &Berth, args: &[&str]) -> ConsoleClient {
        let mut child = b
            .cmd(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("berth console");
        let rx = read_in_background(child.stdout.take().expect("stdout"));
        ConsoleClient {
            child,
            rx,
            seen: String::new(),
        }
    }

    pub fn type_(&mut self, s: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        std::io::Write::write_all(stdin, s).expect("type");
        std::io::Write::flush(stdin).expect("flush");
    }

    /// Waits up to 15 s for `needle` in the output.
    pub fn wait_for(&mut self, needle: &str) -> bool {
        self.wait_for_within(needle, Duration::from_secs(15))
    }

    pub fn wait_for_within(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(s) => self.seen.push_str(&s),
                Err(_) => return false,
            }
        }
        true
    }

    pub fn detach(mut self) -> std::process::ExitStatus {
        self.type_(&[0x1d]);
        self.child.wait().expect("console exit")
    }
}
