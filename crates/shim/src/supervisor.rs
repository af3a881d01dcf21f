//! The shim proper: one process per guest, outside the daemon's process tree.
//!
//! It is deliberately synchronous and small (std threads, no async runtime
//! kept alive) so that it stays cheap and has little that can break across
//! daemon upgrades. Threads:
//! - main: start the guest, wait for it, apply the restart policy;
//! - control: accept connections on `shim.sock`, answer status, take stop;
//! - signals: SIGTERM/SIGINT/SIGHUP to the shim mean "stop the guest".

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_container::{
    Cgroup, NspawnConfig, init, nspawn_argv, nspawn_env, process, systemd_available,
};
use berth_spec::{Guest, GuestKind, RestartPolicy};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

use crate::paths::{GuestPaths, lib_dir};
use crate::proto::{ExitInfo, Request, ShimState, ShimStatus};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("reading guest config {path}: {source}")]
    Config {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest config {path} is not valid: {source}")]
    ConfigParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("another shim already supervises guest `{0}`")]
    AlreadyRunning(String),
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
}

/// A guest that ran this long resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

struct Shared {
    status: Mutex<ShimStatus>,
    changed: Condvar,
    stop: AtomicBool,
    /// Connections waiting for the final state (stop requests).
    waiters: Mutex<Vec<UnixStream>>,
    paths: GuestPaths,
    /// The guest config in force (reloaded for live changes).
    cfg: Mutex<Guest>,
    /// A VM's QMP connection while QEMU runs.
    qmp: Mutex<Option<berth_vm::Qmp>>,
    /// The pty the guest runs on, its history and its clients.
    console: Arc<crate::console::Console>,
    /// A VM's fast exec channel (virtio-serial port), while QEMU runs.
    exec_chan: Mutex<Option<UnixStream>>,
    /// A VM's QEMU guest agent channel, while QEMU runs.
    qga: Mutex<Option<crate::qga::Qga>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ShimStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From the config in force, so a live change applies to the next stop.
    fn stop_timeout(&self) -> Duration {
        Duration::from_millis(
            self.cfg
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stop_timeout_ms,
        )
    }

    fn config(&self) -> Guest {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rereads config.json for live changes (restart policy, stop timeout,
    /// VM pinning); fields that need a restart wait for one.
    fn reload(&self) -> Result<(), String> {
        let raw = std::fs::read(self.paths.config()).map_err(|e| e.to_string())?;
        let new: Guest = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
        let pid = self.lock().runner_pid;
        if let (Some(vm), Some(pid)) = (&new.vm, pid)
            && let Some(q) = self.qmp.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
        {
            crate::vmrun::repin(q, pid, vm)?;
        }
        log("config reloaded");
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut ShimStatus)) {
        let mut s = self.lock();
        f(&mut s);
        write_status(&self.paths.status(), &s);
        self.changed.notify_all();
    }

    /// Asks the guest to stop: SIGTERM to nspawn now, SIGKILL to everything
    /// of the guest after the stop timeout.
    fn request_stop(self: &Arc<Self>) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let (runner, starting) = {
            let s = self.lock();
            (s.runner_pid, s.state == ShimState::Starting)
        };
        self.update(|s| {
            if !s.state.is_final() {
                s.state = ShimState::Stopping;
            }
        });
        log(&format!(
            "stop requested; stopping guest (timeout {:?})",
            self.stop_timeout()
        ));
        let is_vm = self.config().kind == GuestKind::Vm;
        if let (Some(pid), false, true) = (runner, starting, is_vm) {
            // ACPI power button; after the timeout QMP quit, then SIGKILL.
            if let Some(q) = self.qmp.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = q.system_powerdown();
            }
            let me = Arc::clone(self);
            std::thread::spawn(move || {
                std::thread::sleep(me.stop_timeout());
                if process::alive(pid) && me.lock().runner_pid == Some(pid) {
                    log("stop timeout reached; quitting QEMU");
                    if let Some(q) = me.qmp.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        let _ = q.quit();
                    }
                    std::thread::sleep(Duration::from_secs(3));
                    if process::alive(pid) && me.lock().runner_pid == Some(pid) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            });
            return;
        }
        if let (Some(pid), true) = (runner, starting) {
            // The command was not released yet: nothing to stop gracefully,
            // and nspawn may not forward signals this early. The cgroup
            // cleanup after it exits ends whatever it started.
            log("stop during start: ending the container now");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        } else if let Some(pid) = runner {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let me = Arc::clone(self);
            std::thread::spawn(move || {
                std::thread::sleep(me.stop_timeout());
                let s = me.lock();
                if s.runner_pid == Some(pid) && process::alive(pid) {
                    drop(s);
                    log("stop timeout reached; killing the guest");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            });
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn log(msg: &str) {
    eprintln!("{} berth-shim[{}]: {msg}", now(), std::process::id());
}

fn write_status(path: &Path, s: &ShimStatus) {
    let tmp = path.with_extension("json.tmp");
    if let Ok(bytes) = serde_json::to_vec(s)
        && std::fs::write(&tmp, bytes).is_ok()
    {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Runs the supervisor for `guest` until the guest is stopped for good.
pub fn run(state_dir: &Path, guest: &str) -> Result<(), ShimError> {
    let paths = GuestPaths::new(state_dir, guest);
    let cfg_path = paths.config();
    let raw = std::fs::read(&cfg_path).map_err(|source| ShimError::Config {
        path: cfg_path.clone(),
        source,
    })?;
    let cfg: Guest = serde_json::from_slice(&raw).map_err(|source| ShimError::ConfigParse {
        path: cfg_path.clone(),
        source,
    })?;

    // Under systemd: into the leaf of the guest's scope (see
    // berth_container::cgroup), before any guest group is made.
    let scope_note = match berth_container::cgroup::enter_guest_scope(guest) {
        Ok(Some(leaf)) => Some(format!("in cgroup {}", leaf.display())),
        Ok(None) => None,
        Err(e) => Some(format!("warning: not in the guest's scope: {e}")),
    };

    // Signals are taken by a dedicated thread with sigwait; block them in
    // every thread first (threads inherit the mask).
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    let _ = sigs.thread_block();

    let listener = bind_control(&paths.socket(), guest)?;
    let console = crate::console::Console::open(paths.console_log(), &paths.console_socket())
        .map_err(|source| ShimError::Socket {
            path: paths.console_socket(),
            source,
        })?;
    let shared = Arc::new(Shared {
        status: Mutex::new(ShimStatus {
            guest: guest.to_owned(),
            shim_pid: std::process::id() as i32,
            state: ShimState::Starting,
            runner_pid: None,
            leader_pid: None,
            restarts: 0,
            last_exit: None,
            started_at: None,
            message: None,
            accel: None,
        }),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
        waiters: Mutex::new(Vec::new()),
        paths: paths.clone(),
        cfg: Mutex::new(cfg.clone()),
        qmp: Mutex::new(None),
        console,
        exec_chan: Mutex::new(None),
        qga: Mutex::new(None),
    });
    shared.update(|_| {});
    log(&format!(
        "supervising guest `{guest}` (restart={:?})",
        cfg.restart
    ));
    if let Some(note) = scope_note {
        log(&note);
    }

    {
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            if sigs.wait().is_ok() {
                sh.request_stop();
            }
        });
    }
    {
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || control_loop(listener, sh));
    }

    supervise(&cfg, state_dir, &shared);

    // Final state is recorded; answer everyone waiting for it, then go.
    let final_status = shared.lock().clone();
    let mut line = serde_json::to_string(&final_status).unwrap_or_default();
    line.push('\n');
    for mut w in shared
        .waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        let _ = w.write_all(line.as_bytes());
    }
    let _ = std::fs::remove_file(paths.socket());
    let _ = std::fs::remove_file(paths.console_socket());
    log(&format!(
        "guest `{guest}` {}; shim exits",
        final_status.state.as_str()
    ));
    Ok(())
}

fn bind_control(path: &Path, guest: &str) -> Result<UnixListener, ShimError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ShimError::AlreadyRunning(guest.to_owned()));
            }
            // A socket file left by a shim that died: take it over.
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|source| ShimError::Socket {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ShimError::Socket {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn control_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || handle(conn, &sh));
    }
}

fn handle(conn: UnixStream, shared: &Arc<Shared>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut conn = conn;
    match serde_json::from_str::<Request>(&line) {
        Ok(Request::WaitStarted) => {
            let guard = shared.lock();
            let (guard, _) = shared
                .changed
                .wait_timeout_while(guard, Duration::from_secs(120), |s| {
                    s.state == ShimState::Starting
                })
                .unwrap_or_else(|p| p.into_inner());
            let s = guard.clone();
            drop(guard);
            let mut out = serde_json::to_string(&s).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        Ok(Request::Reload) => {
            if let Err(e) = shared.reload() {
                log(&format!("reload failed: {e}"));
                shared.update(|s| s.message = Some(format!("reload failed: {e}")));
            }
            let s = shared.lock().clone();
            let mut out = serde_json::to_string(&s).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        Ok(Request::ConsoleScript {
            script,
            end,
            timeout_ms,
        }) => {
            let _ = conn.set_read_timeout(None);
            let timeout = Duration::from_millis(timeout_ms);
            // The VM's virtio-serial port first (fast); the serial console if
            // the guest has no shell there.
            let fast = {
                let mut chan = shared.exec_chan.lock().unwrap_or_else(|p| p.into_inner());
                chan.as_mut().and_then(|c| {
                    crate::vmrun::run_on_channel(c, &script, &end, Duration::from_secs(3), timeout)
                })
            };
            let (res, channel) = match fast {
                Some(r) => (r, "exec-port"),
                None => (shared.console.run_script(&script, &end, timeout), "console"),
            };
            let reply = match res {
                Ok(out) => crate::proto::ConsoleOutput {
                    output: Some(String::from_utf8_lossy(&out).into_owned()),
                    error: None,
                    channel: Some(channel.into()),
                },
                Err(e) => crate::proto::ConsoleOutput {
                    output: None,
                    error: Some(e),
                    channel: Some(channel.into()),
                },
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        Ok(Request::AgentExec {
            argv,
            stdin,
            timeout_ms,
        }) => {
            let _ = conn.set_read_timeout(None);
            let reply = agent_exec(shared, &argv, &stdin, Duration::from_millis(timeout_ms));
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        Ok(Request::Status) => {
            let s = shared.lock().clone();
            let mut out = serde_json::to_string(&s).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        Ok(Request::Stop) => {
            shared
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            shared.request_stop();
        }
        Err(e) => {
            let _ = writeln!(
                conn,
                "{{\"error\":{}}}",
                serde_json::Value::String(e.to_string())
            );
        }
    }
}

/// exec through the QEMU guest agent: only if the guest has the agent's
/// port open (QMP `query-chardev`, instant) and an agent answers a resync
/// (a few seconds at most); otherwise the caller tries the next channel.
fn agent_exec(
    shared: &Shared,
    argv: &[String],
    stdin: &str,
    timeout: Duration,
) -> crate::proto::AgentExecReply {
    use crate::proto::AgentExecReply as R;
    use base64::Engine as _;
    let stdin = match base64::engine::general_purpose::STANDARD.decode(stdin) {
        Ok(s) => s,
        Err(e) => {
            return R::Failed {
                error: format!("stdin is not base64: {e}"),
            };
        }
    };
    if shared
        .qga
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none()
    {
        return R::NoAgent {
            reason: "the VM has no guest agent port".into(),
        };
    }
    let open = shared
        .qmp
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|q| crate::vmrun::chardev_open(q, crate::vmrun::QGA_CHARDEV));
    if open == Some(false) {
        return R::NoAgent {
            reason: "no guest agent has the port open in the guest".into(),
        };
    }
    match crate::qga::exec(&shared.qga, argv, &stdin, timeout) {
        Ok(r) => {
            let b64 = base64::engine::general_purpose::STANDARD;
            R::Done {
                exit_code: r.code,
                stdout: b64.encode(r.stdout),
                stderr: b64.encode(r.stderr),
            }
        }
        Err(crate::qga::ExecError::NoAgent(reason)) => R::NoAgent { reason },
        Err(crate::qga::ExecError::Failed(error)) => R::Failed { error },
    }
}

/// Start, wait, decide; until stopped or the policy says no.
fn supervise(cfg: &Guest, state_dir: &Path, shared: &Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            shared.update(|s| s.state = ShimState::Stopped);
            return;
        }
        shared.update(|s| s.state = ShimState::Starting);
        let began = Instant::now();
        let outcome = match start(cfg, state_dir, shared) {
            Ok(mut child) => {
                let status = child.wait();
                let info = match status {
                    Ok(st) => ExitInfo {
                        code: st.code(),
                        signal: st.signal(),
                        at: now(),
                    },
                    Err(_) => ExitInfo {
                        code: None,
                        signal: None,
                        at: now(),
                    },
                };
                // Its last words reach console.log before anyone asks why.
                shared.console.drain();
                log(&format!("guest {}", info.describe()));
                Ok(info)
            }
            Err(msg) => {
                shared.console.drain();
                log(&format!("start failed: {msg}"));
                Err(msg)
            }
        };
        *shared.qmp.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *shared.exec_chan.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *shared.qga.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = std::fs::remove_file(shared.paths.dir.join("qmp.sock"));
        let _ = std::fs::remove_file(shared.paths.dir.join("exec.sock"));
        let _ = std::fs::remove_file(shared.paths.dir.join("qga.sock"));
        cleanup(cfg);
        crate::machined::unregister(systemd_available(), &cfg.name);
        let stopping = shared.stop.load(Ordering::SeqCst);
        let failed = !matches!(&outcome, Ok(i) if i.success());
        shared.update(|s| {
            s.runner_pid = None;
            s.leader_pid = None;
            match &outcome {
                Ok(info) => s.last_exit = Some(info.clone()),
                Err(msg) => s.message = Some(msg.clone()),
            }
        });
        if stopping {
            shared.update(|s| s.state = ShimState::Stopped);
            return;
        }
        let again = match shared.config().restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if !again {
            shared.update(|s| {
                s.state = if failed {
                    ShimState::Failed
                } else {
                    ShimState::Stopped
                }
            });
            return;
        }
        if began.elapsed() > STABLE_AFTER {
            backoff = Duration::from_millis(100);
        }
        log(&format!(
            "restarting in {backoff:?} (restart={:?})",
            cfg.restart
        ));
        shared.update(|s| {
            s.state = ShimState::Restarting;
            s.restarts += 1;
        });
        // Sleep, but wake at once for a stop request.
        let guard = shared.lock();
        let _ = shared
            .changed
            .wait_timeout_while(guard, backoff, |_| !shared.stop.load(Ordering::SeqCst));
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Starts the container and returns once its network is configured and its
/// command released. The returned child is systemd-nspawn.
fn start(cfg: &Guest, state_dir: &Path, shared: &Arc<Shared>) -> Result<Child, String> {
    if let Some(vm) = &cfg.vm {
        return start_vm(cfg, vm, shared);
    }
    let paths = &shared.paths;
    let init =
        init::install(&lib_dir(state_dir)).map_err(|e| format!("installing berth-init: {e}"))?;
    let sync = paths.sync_dir();
    std::fs::create_dir_all(&sync).map_err(|e| format!("creating {}: {e}", sync.display()))?;
    let ready = sync.join("ready");
    let _ = std::fs::remove_file(&ready);

    // Leftovers of an earlier run that died hard (shim killed): end them.
    let _ = berth_net::delete_link(&cfg.link);
    let cg = Cgroup::for_guest(&cfg.name);
    cg.kill_all(Duration::from_secs(5))
        .map_err(|e| format!("ending leftover processes: {e}"))?;
    cg.create().map_err(|e| e.to_string())?;
    let warnings = cg
        .set_limits(cfg.memory, cfg.cpus)
        .map_err(|e| e.to_string())?;
    for w in &warnings {
        log(&format!("warning: {w}"));
    }

    let (stdin, stdout, stderr) = shared
        .console
        .stdio()
        .map_err(|e| format!("console: {e}"))?;
    let argv = nspawn_argv(&NspawnConfig {
        machine: format!("berth-{}", cfg.name),
        rootfs: cfg.rootfs.clone(),
        command: cfg.command.clone(),
        env: cfg.env.clone(),
        init,
        sync_dir: sync,
        ephemeral: cfg.ephemeral,
        read_only: cfg.read_only,
        binds: cfg
            .binds
            .iter()
            .map(|b| berth_container::BindMount {
                source: b.source.clone(),
                target: b.target.clone(),
                read_only: b.read_only,
            })
            .collect(),
    });
    let procs = cg
        .procs_files(cfg.memory.is_some(), cfg.cpus.is_some())
        .map_err(|e| e.to_string())?;
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(nspawn_env())
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    guest_process(&mut cmd, fds);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "systemd-nspawn not found: install systemd-container".to_string()
        } else {
            format!("starting systemd-nspawn: {e}")
        }
    })?;
    drop(procs);
    let runner = child.id() as i32;
    shared.update(|s| s.runner_pid = Some(runner));
    let stopped = |shared: &Shared| shared.stop.load(Ordering::SeqCst);

    let fail = |child: &mut Child, msg: String| abort_start(child, &paths.console_log(), msg);
    if stopped(shared) {
        return Err(fail(&mut child, "stopped while starting".into()));
    }
    let Some(leader) = process::find_leader(runner, Duration::from_secs(15)) else {
        return Err(fail(
            &mut child,
            "systemd-nspawn did not start the container".into(),
        ));
    };
    if let Err(e) = berth_net::setup_container_link(&link_of(cfg), leader) {
        return Err(fail(&mut child, format!("network setup: {e}")));
    }
    if let Err(e) = crate::nics::setup_container(cfg, leader) {
        return Err(fail(&mut child, format!("network setup: {e}")));
    }
    // A group member accepts its group's service addresses as its own.
    let vips: Vec<std::net::IpAddr> = cfg
        .vip4
        .map(std::net::IpAddr::V4)
        .into_iter()
        .chain(cfg.vip6.map(std::net::IpAddr::V6))
        .collect();
    if let Err(e) = berth_net::add_loopback_addrs(leader, &vips) {
        return Err(fail(
            &mut child,
            format!("adding the service address to lo: {e}"),
        ));
    }
    if stopped(shared) {
        return Err(fail(&mut child, "stopped while starting".into()));
    }
    if let Err(e) = std::fs::write(&ready, b"") {
        return Err(fail(&mut child, format!("releasing the guest: {e}")));
    }
    log(&format!(
        "guest running: nspawn pid {runner}, leader pid {leader}, {}",
        cfg.addresses().join(" ")
    ));
    let machine = crate::machined::Machine {
        guest: &cfg.name,
        class: "container",
        leader: leader as u32,
        root: &cfg.rootfs,
        link: &cfg.link,
    };
    if let Err(e) = crate::machined::register(systemd_available(), &machine) {
        log(&format!("warning: {e}"));
    }
    shared.update(|s| {
        if s.state == ShimState::Starting {
            s.state = ShimState::Running;
        }
        s.leader_pid = Some(leader);
        s.started_at = Some(now());
        s.message = (!warnings.is_empty()).then(|| warnings.join("; "));
    });
    Ok(child)
}

fn start_vm(cfg: &Guest, vm: &berth_spec::vm::Vm, shared: &Arc<Shared>) -> Result<Child, String> {
    let paths = &shared.paths;
    let (stdin, stdout, stderr) = shared
        .console
        .stdio()
        .map_err(|e| format!("console: {e}"))?;
    let started = crate::vmrun::start(cfg, vm, paths, (stdin, stdout, stderr))?;
    let pid = started.child.id() as i32;
    for w in &started.warnings {
        log(&format!("warning: {w}"));
    }
    let accel = match started.accel {
        berth_vm::Accel::Kvm => "kvm",
        berth_vm::Accel::Tcg => "tcg",
    };
    log(&format!(
        "VM running: qemu pid {pid}, accel {accel}, {}",
        cfg.addresses().join(" ")
    ));
    let machine = crate::machined::Machine {
        guest: &cfg.name,
        class: "vm",
        leader: pid as u32,
        root: Path::new(""),
        link: &cfg.link,
    };
    if let Err(e) = crate::machined::register(systemd_available(), &machine) {
        log(&format!("warning: {e}"));
    }
    *shared.qmp.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.qmp);
    *shared.exec_chan.lock().unwrap_or_else(|p| p.into_inner()) = started.exec;
    *shared.qga.lock().unwrap_or_else(|p| p.into_inner()) = started.qga.map(crate::qga::Qga::new);
    shared.update(|s| {
        s.runner_pid = Some(pid);
        if s.state == ShimState::Starting {
            s.state = ShimState::Booting;
        }
        s.leader_pid = Some(pid);
        s.accel = Some(accel.to_string());
        s.started_at = Some(now());
        s.message = (!started.warnings.is_empty()).then(|| started.warnings.join("; "));
    });
    // Booting until the guest sends its first packet on its link.
    let sh = Arc::clone(shared);
    let link = cfg.link.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = sh.lock();
            if s.state != ShimState::Booting || s.runner_pid != Some(pid) {
                return;
            }
            drop(s);
            if berth_net::link_rx_packets(&link)
                .ok()
                .flatten()
                .unwrap_or(0)
                > 0
            {
                log("guest is up: first packet on its link");
                sh.update(|s| {
                    if s.state == ShimState::Booting && s.runner_pid == Some(pid) {
                        s.state = ShimState::Running;
                    }
                });
                return;
            }
        }
    });
    Ok(started.child)
}

pub(crate) fn link_of(cfg: &Guest) -> berth_net::GuestLink {
    berth_net::GuestLink {
        name: cfg.link.clone(),
        guest4: cfg.addr4,
        host4: cfg.host4,
        guest6: cfg.addr6,
        host6: cfg.host6,
    }
}

/// Makes `cmd` a supervised guest process: between fork and exec it joins
/// the guest's cgroups (`cgroup_fds`, see `Cgroup::procs_files`), unblocks
/// the signals the shim blocks for itself, and asks for SIGTERM when the
/// shim dies (nspawn then stops its container cleanly; QEMU quits).
pub(crate) fn guest_process(cmd: &mut Command, cgroup_fds: Vec<i32>) {
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (write(2), sigprocmask(2), prctl(2)); the
    // caller keeps `cgroup_fds` open until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            berth_container::cgroup::join_from_pre_exec(&cgroup_fds)?;
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            )
            .map_err(std::io::Error::from)?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Ends a guest process that failed to start and says why, with the last
/// lines of its console.
pub(crate) fn abort_start(child: &mut Child, console_log: &Path, msg: String) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let tail = tail_lines(console_log, 5);
    if tail.is_empty() {
        msg
    } else {
        format!("{msg}; last output: {tail}")
    }
}

/// Removes what a run of the guest left on the host. Idempotent.
fn cleanup(cfg: &Guest) {
    let cg = Cgroup::for_guest(&cfg.name);
    if let Err(e) = cg.kill_all(Duration::from_secs(5)) {
        log(&format!("cleanup: {e}"));
    }
    if let Err(e) = cg.remove() {
        log(&format!("cleanup: {e}"));
    }
    if let Err(e) = berth_net::delete_link(&cfg.link) {
        log(&format!("cleanup: deleting {}: {e}", cfg.link));
    }
    crate::nics::cleanup(cfg);
}

/// The last `n` lines of a file, joined with " | ", for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(s) = std::fs::read(path) else {
        return String::new();
    };
    let s = String::from_utf8_lossy(&s[s.len().saturating_sub(8192)..]).into_owned();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
