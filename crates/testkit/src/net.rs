//! [`TestNet`]: a "host" network namespace with an uplink to an "internet"
//! namespace that serves HTTP, built and torn down per test.
//!
//! ```text
//!   bt-<tag>-h ("host")                     bt-<tag>-i ("internet")
//!   up0 198.51.100.1/24      <-- veth -->   wan0 198.51.100.2/24
//!       2001:db8:ffff::1/64                      2001:db8:ffff::2/64
//!   default via .2 / ::2                    busybox httpd :8080
//! ```

use std::ffi::OsStr;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Result, TestkitError, run, show, wait_until};

/// What the internet namespace's HTTP server returns for `/`.
pub const INTERNET_BODY: &str = "berth-testnet internet\n";

const HOST_ADDR: &str = "198.51.100.1";
const INET_ADDR: &str = "198.51.100.2";
const HOST_ADDR6: &str = "2001:db8:ffff::1";
const INET_ADDR6: &str = "2001:db8:ffff::2";
const HTTP_PORT: u16 = 8080;

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// Runs `f` on a fresh thread that has joined network namespace `ns` (by
/// name, under /run/netns). Only that thread moves; the test process stays
/// where it is. Sockets opened in `f` stay in `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(ns);
    let file = File::open(&path).map_err(|source| TestkitError::Io {
        what: format!("opening {path}"),
        source,
    })?;
    let joined = std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `file` is an open descriptor of a network namespace
            // file that lives until the end of this closure; setns only
            // changes the calling thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(TestkitError::Io {
                    what: format!("setns({path})"),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// PIDs of the processes in network namespace `ns` (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Result<Vec<i32>> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect())
}

/// SIGKILLs every process in `ns` (never this process), a few rounds in case
/// something forks meanwhile, and waits up to 2 s for them to be gone.
fn kill_all_in(ns: &str) -> Result<()> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let gone = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
        let pids = match netns_pids(ns) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let pids: Vec<i32> = pids.into_iter().filter(|p| *p != me).collect();
        if pids.is_empty() {
            return Some(Ok(()));
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read just now from /proc; at worst
            // the process is already gone (ESRCH), which we ignore.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        None
    });
    match gone {
        Some(r) => r,
        None => Err(TestkitError::Timeout(format!(
            "processes in netns {ns} survive SIGKILL"
        ))),
    }
}

/// Kills everything in `ns` and deletes it; Ok if it did not exist.
fn remove_netns(ns: &str) -> Result<()> {
    if !Path::new(&netns_path(ns)).exists() {
        return Ok(());
    }
    let killed = kill_all_in(ns);
    let mut last = Ok(());
    for _ in 0..5 {
        last = run(Command::new("ip").args(["netns", "del", ns])).map(drop);
        if !Path::new(&netns_path(ns)).exists() {
            return killed;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last.and(Err(TestkitError::Timeout(format!(
        "netns {ns} still present after `ip netns del`"
    ))))
}

/// A two-namespace test network; see the module docs for the layout.
/// Dropping it (also while unwinding from a panic) kills every process in
/// both namespaces and deletes them.
#[derive(Debug)]
pub struct TestNet {
    host: String,
    inet: String,
    httpd: Option<Child>,
    www: tempfile::TempDir,
}

impl TestNet {
    /// Builds the network for `tag` (1-10 chars of `[a-z0-9-]`, e.g. from
    /// [`crate::unique_tag`]). Leftovers of a crashed run with the same tag
    /// are removed first. Needs root, iproute2 and /bin/busybox.
    pub fn new(tag: &str) -> Result<TestNet> {
        let valid = (1..=10).contains(&tag.len())
            && tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(TestkitError::BadTag(tag.to_owned()));
        }
        Self::cleanup_stale(tag)?;
        let www = tempfile::Builder::new()
            .prefix("berth-testnet-www-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                what: "creating web root".into(),
                source,
            })?;
        let index = www.path().join("index.html");
        std::fs::write(&index, INTERNET_BODY).map_err(|source| TestkitError::Io {
            what: format!("writing {}", index.display()),
            source,
        })?;
        let (host, inet) = Self::names(tag);
        run(Command::new("ip").args(["netns", "add", &host]))?;
        // From here on, Drop cleans up whatever the rest leaves behind.
        let mut net = TestNet {
            host,
            inet,
            httpd: None,
            www,
        };
        if let Err(e) = run(Command::new("ip").args(["netns", "add", &net.inet])) {
            // The inet name was not created by us; do not let Drop remove
            // someone else's namespace of that name.
            net.inet.clear();
            return Err(e);
        }
        net.setup()?;
        Ok(net)
    }

    fn names(tag: &str) -> (String, String) {
        (format!("bt-{tag}-h"), format!("bt-{tag}-i"))
    }

    fn setup(&mut self) -> Result<()> {
        let (h, i) = (self.host.as_str(), self.inet.as_str());
        let ip = |ns: &str, args: &[&str]| run(Command::new("ip").arg("-n").arg(ns).args(args));
        ip(h, &["link", "set", "lo", "up"])?;
        ip(i, &["link", "set", "lo", "up"])?;
        // Distinct ifindexes on the two ends: a veth whose own ifindex
        // equals its peer's (2 and 2 in two fresh namespaces) is not an
        // "urgent" linkwatch event, so the kernel activates its qdisc up to
        // 1 s late and drops what is sent meanwhile.
        ip(
            h,
            &[
                "link", "add", "up0", "index", "11", "type", "veth", "peer", "name", "wan0",
                "index", "12", "netns", i,
            ],
        )?;
        ip(
            h,
            &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", "up0"],
        )?;
        ip(
            h,
            &[
                "addr",
                "add",
                &format!("{HOST_ADDR6}/64"),
                "dev",
                "up0",
                "nodad",
            ],
        )?;
        ip(
            i,
            &["addr", "add", &format!("{INET_ADDR}/24"), "dev", "wan0"],
        )?;
        ip(
            i,
            &[
                "addr",
                "add",
                &format!("{INET_ADDR6}/64"),
                "dev",
                "wan0",
                "nodad",
            ],
        )?;
        ip(h, &["link", "set", "up0", "up"])?;
        ip(i, &["link", "set", "wan0", "up"])?;
        ip(h, &["route", "add", "default", "via", INET_ADDR])?;
        ip(h, &["-6", "route", "add", "default", "via", INET_ADDR6])?;
        self.start_httpd()
    }

    fn start_httpd(&mut self) -> Result<()> {
        let mut cmd = self.cmd_in_inet("busybox");
        cmd.args(["httpd", "-f", "-p", &HTTP_PORT.to_string(), "-h"])
            .arg(self.www.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| TestkitError::Spawn {
            cmd: show(&cmd),
            source,
        })?;
        let httpd = self.httpd.insert(child);
        let addr = SocketAddr::from(([198, 51, 100, 2], HTTP_PORT));
        let addr6 = SocketAddr::from(([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2], HTTP_PORT));
        let ready = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            if let Ok(Some(status)) = httpd.try_wait() {
                return Some(Err(TestkitError::Command {
                    cmd: show(&cmd),
                    status,
                    stderr: "httpd exited at start".into(),
                }));
            }
            let up = in_netns(&self.host, || {
                [addr, addr6]
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            });
            match up {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            }
        });
        ready.unwrap_or_else(|| {
            Err(TestkitError::Timeout(format!(
                "httpd in {} not answering on {addr} and {addr6} after 5 s",
                self.inet
            )))
        })
    }

    /// Removes the namespaces (and their processes) a crashed earlier run
    /// with this `tag` left behind. Ok if there were none.
    pub fn cleanup_stale(tag: &str) -> Result<()> {
        let (host, inet) = Self::names(tag);
        let a = remove_netns(&host);
        let b = remove_netns(&inet);
        a.and(b)
    }

    /// Name of the "host" namespace (`bt-<tag>-h`).
    pub fn host_ns(&self) -> &str {
        &self.host
    }

    /// Name of the "internet" namespace (`bt-<tag>-i`).
    pub fn inet_ns(&self) -> &str {
        &self.inet
    }

    /// The host namespace's uplink interface.
    pub fn uplink(&self) -> &'static str {
        "up0"
    }

    /// The uplink's own IPv4 address in the host namespace.
    pub fn uplink_addr(&self) -> &'static str {
        HOST_ADDR
    }

    /// The uplink's own IPv6 address in the host namespace.
    pub fn host_addr6(&self) -> &'static str {
        HOST_ADDR6
    }

    /// The internet side's IPv4 address (HTTP on port 8080).
    pub fn internet_addr(&self) -> &'static str {
        INET_ADDR
    }

    /// The internet side's IPv6 address (HTTP on port 8080).
    pub fn internet_addr6(&self) -> &'static str {
        INET_ADDR6
    }

    /// `http://198.51.100.2:8080/`, which returns [`INTERNET_BODY`].
    pub fn internet_url(&self) -> String {
        format!("http://{INET_ADDR}:{HTTP_PORT}/")
    }

    /// `nsenter --net=/run/netns/<host> -- program`; add arguments to it.
    pub fn cmd_in_host(&self, program: impl AsRef<OsStr>) -> Command {
        cmd_in(&self.host, program)
    }

    /// `nsenter --net=/run/netns/<inet> -- program`; add arguments to it.
    pub fn cmd_in_inet(&self, program: impl AsRef<OsStr>) -> Command {
        cmd_in(&self.inet, program)
    }

    /// `curl -sS -g --max-time <timeout>` from the host namespace; the body
    /// on success.
    pub fn curl_from_host(&self, url: &str, timeout: Duration) -> Result<String> {
        let mut cmd = self.cmd_in_host("curl");
        cmd.args(["-sS", "-g", "--max-time"])
            .arg(format!("{:.3}", timeout.as_secs_f64()))
            .arg(url);
        let out = run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// PIDs in namespace `ns` (either of ours, or any other); empty if it
    /// cannot be read.
    pub fn pids_in(&self, ns: &str) -> Vec<i32> {
        netns_pids(ns).unwrap_or_default()
    }
}

fn cmd_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns)))
        .arg("--")
        .arg(program);
    c
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut httpd) = self.httpd.take() {
            let _ = httpd.kill();
            let _ = httpd.wait();
        }
        for ns in [&self.inet, &self.host] {
            if ns.is_empty() {
                continue;
            }
            if let Err(e) = remove_netns(ns) {
                eprintln!("testkit: cleaning up netns {ns}: {e}");
            }
        }
    }
}
