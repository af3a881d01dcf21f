//! Health checks: the daemon probes every running guest that declares
//! `health` (and every group member; without a probe, running counts as
//! healthy) and keeps the result in a [`HealthBoard`]. Transitions are
//! logged as events in the guest's supervisor log (`berth logs --source
//! shim`) and wake the service-address controller.
//!
//! State is in memory: after a daemon restart every guest starts at
//! `unknown`, and the controller leaves routes alone until probes say
//! otherwise, so a restart never moves a service address by itself.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_shim::{ShimState, client};
use berth_spec::{Guest, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine::Engine;

/// What the probes say about a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not probed enough since it started (or since the daemon started).
    Unknown,
    Healthy,
    Unhealthy,
    /// Not running.
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy => "unhealthy",
            Status::Down => "down",
        }
    }
}

#[derive(Debug, Clone)]
pub struct State {
    pub status: Status,
    pub ok_streak: u32,
    pub fail_streak: u32,
    /// When `status` last changed.
    pub since: Instant,
    pub last_error: Option<String>,
    /// Bumped by [`HealthBoard::reset`]; results of older probes are dropped.
    epoch: u64,
    /// `None`: due now.
    next_probe: Option<Instant>,
    /// (supervisor pid, restarts) of the run last probed: a change means the
    /// guest restarted in between, which counts as down at once.
    instance: Option<(i32, u32)>,
    in_flight: bool,
}

impl State {
    fn new(epoch: u64) -> State {
        State {
            status: Status::Unknown,
            ok_streak: 0,
            fail_streak: 0,
            since: Instant::now(),
            last_error: None,
            epoch,
            next_probe: None,
            instance: None,
            in_flight: false,
        }
    }

    /// Healthy without a break for at least `d`.
    pub fn healthy_for(&self, d: Duration) -> bool {
        self.status == Status::Healthy && self.since.elapsed() >= d
    }
}

/// Health of every probed guest, shared by the monitor, the controller, the
/// executor and the API.
#[derive(Default)]
pub struct HealthBoard {
    states: Mutex<BTreeMap<String, State>>,
    /// Bumped on every transition; [`HealthBoard::wait_change`] waits on it.
    changes: Mutex<u64>,
    cond: Condvar,
}

impl HealthBoard {
    pub fn get(&self, name: &str) -> Option<State> {
        self.lock().get(name).cloned()
    }

    pub fn status(&self, name: &str) -> Status {
        self.get(name).map_or(Status::Unknown, |s| s.status)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, State>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what is known about `name` (it was just restarted): it is
    /// `unknown` until new probes say otherwise.
    pub fn reset(&self, name: &str) {
        let mut m = self.lock();
        let epoch = m.get(name).map_or(0, |s| s.epoch + 1);
        m.insert(name.to_owned(), State::new(epoch));
        drop(m);
        self.bump();
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
        self.bump();
    }

    /// Wakes everyone waiting for a change (the service-address controller).
    pub fn poke(&self) {
        self.bump();
    }

    fn bump(&self) {
        let mut c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        *c += 1;
        self.cond.notify_all();
    }

    /// The change counter, for [`HealthBoard::wait_change`].
    pub fn changes(&self) -> u64 {
        *self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the change counter differs from `seen` or `timeout`
    /// passes; returns the counter.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        let c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let (c, _) = self
            .cond
            .wait_timeout_while(c, timeout, |c| *c == seen)
            .unwrap_or_else(|p| p.into_inner());
        *c
    }

    /// Takes the guest's probe slot if a probe is due; returns its epoch.
    fn take_due(&self, name: &str, now: Instant) -> Option<u64> {
        let mut m = self.lock();
        let s = m.entry(name.to_owned()).or_insert_with(|| State::new(0));
        if s.in_flight || s.next_probe.is_some_and(|t| t > now) {
            return None;
        }
        s.in_flight = true;
        Some(s.epoch)
    }

    /// Records a probe result; returns the transition, if any.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        name: &str,
        epoch: u64,
        instance: Option<(i32, u32)>,
        result: Result<(), (bool, String)>,
        interval: Duration,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<(Status, Status, Option<String>)> {
        let mut m = self.lock();
        let s = m.get_mut(name)?;
        if s.epoch != epoch {
            return None;
        }
        s.in_flight = false;
        s.next_probe = Some(Instant::now() + interval);
        let before = s.status;
        // Restarted since the last probe (e.g. killed and brought back by
        // its restart policy): whatever this probe says, it was down.
        let restarted = matches!((s.instance, instance), (Some(a), Some(b)) if a != b);
        if instance.is_some() {
            s.instance = instance;
        }
        let result = match result {
            Ok(()) if restarted => Err((true, "restarted since the last probe".to_string())),
            r => r,
        };
        let after = match result {
            Ok(()) => {
                s.ok_streak += 1;
                s.fail_streak = 0;
                s.last_error = None;
                if s.ok_streak >= healthy_after {
                    Status::Healthy
                } else {
                    before
                }
            }
            // Not running: down at once, no need to count.
            Err((true, e)) => {
                s.ok_streak = 0;
                s.fail_streak += 1;
                s.last_error = Some(e);
                Status::Down
            }
            Err((false, e)) => {
                s.ok_streak = 0;
                s.fail_streak += 1;
                s.last_error = Some(e);
                if s.fail_streak >= unhealthy_after {
                    Status::Unhealthy
                } else if before == Status::Down {
                    Status::Unknown
                } else {
                    before
                }
            }
        };
        if after == before {
            return None;
        }
        s.status = after;
        s.since = Instant::now();
        let err = s.last_error.clone();
        drop(m);
        self.bump();
        Some((before, after, err))
    }
}

/// How often the monitor looks for due probes.
const TICK: Duration = Duration::from_millis(20);
/// Probe interval of group members that declare no probe (running = healthy).
const NO_PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Probes guests forever. Run it on the daemon's runtime.
pub async fn monitor(engine: Arc<Engine>) {
    let mut guests: Vec<Guest> = Vec::new();
    let mut loaded: Option<Instant> = None;
    let mut seen_gen = engine.guests_changed();
    loop {
        let gen_now = engine.guests_changed();
        if loaded.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) || gen_now != seen_gen {
            seen_gen = gen_now;
            loaded = Some(Instant::now());
            let e = Arc::clone(&engine);
            if let Ok(Ok(list)) = tokio::task::spawn_blocking(move || e.applied_guests()).await {
                guests = list
                    .into_iter()
                    .filter(|g| g.health.is_some() || g.group.is_some())
                    .collect();
                let names: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();
                let gone: Vec<String> = engine
                    .health
                    .lock()
                    .keys()
                    .filter(|k| !names.contains(&k.as_str()))
                    .cloned()
                    .collect();
                for g in gone {
                    engine.health.remove(&g);
                }
            }
        }
        let now = Instant::now();
        for g in &guests {
            let Some(epoch) = engine.health.take_due(&g.name, now) else {
                continue;
            };
            let engine = Arc::clone(&engine);
            let g = g.clone();
            tokio::spawn(async move {
                let (instance, result) = probe(&engine, &g).await;
                let (interval, ha, ua) = match &g.health {
                    Some(h) => (
                        Duration::from_millis(h.interval_ms),
                        h.healthy_after,
                        h.unhealthy_after,
                    ),
                    None => (NO_PROBE_INTERVAL, 1, 1),
                };
                if let Some((from, to, err)) = engine
                    .health
                    .record(&g.name, epoch, instance, result, interval, ha, ua)
                {
                    let mut msg = format!("health {} -> {}", from.as_str(), to.as_str());
                    if let Some(e) = err.filter(|_| to != Status::Healthy) {
                        msg.push_str(&format!(" ({e})"));
                    }
                    tracing::info!(guest = %g.name, "{msg}");
                    event(&engine, &g.name, &msg);
                }
            });
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Appends an event line to the guest's supervisor log, in the shim's format.
pub fn event(engine: &Engine, guest: &str, msg: &str) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = engine.paths(guest).shim_log();
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&path) {
        let _ = writeln!(f, "{secs} berth-daemon[{}]: {msg}", std::process::id());
    }
}

/// One probe, with the run it probed (supervisor pid, restarts).
/// `Err((true, _))`: the guest is not running.
async fn probe(
    engine: &Arc<Engine>,
    g: &Guest,
) -> (Option<(i32, u32)>, Result<(), (bool, String)>) {
    let paths = engine.paths(&g.name);
    let status = tokio::task::spawn_blocking(move || client::status(&paths))
        .await
        .ok()
        .flatten();
    let instance = status.as_ref().map(|s| (s.shim_pid, s.restarts));
    (instance, check(engine, g, status.map(|s| s.state)).await)
}

async fn check(
    engine: &Arc<Engine>,
    g: &Guest,
    state: Option<ShimState>,
) -> Result<(), (bool, String)> {
    if state != Some(ShimState::Running) {
        return Err((
            true,
            format!(
                "not running ({})",
                state.map_or("no supervisor", |s| s.as_str())
            ),
        ));
    }
    let Some(h) = &g.health else {
        return Ok(());
    };
    let timeout = Duration::from_millis(h.timeout_ms);
    let addr = IpAddr::V4(g.addr4);
    let fail = |e: String| Err((false, e));
    match &h.probe {
        Probe::Tcp { port } => {
            let to = SocketAddr::new(addr, *port);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(to)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => fail(format!("tcp {to}: {e}")),
                Err(_) => fail(format!("tcp {to}: no answer within {timeout:?}")),
            }
        }
        Probe::Http {
            port, path, expect, ..
        } => {
            let to = SocketAddr::new(addr, *port);
            match tokio::time::timeout(timeout, http_status(to, path)).await {
                Ok(Ok(code)) if code == *expect => Ok(()),
                Ok(Ok(code)) => fail(format!("http {to}{path}: status {code}, want {expect}")),
                Ok(Err(e)) => fail(format!("http {to}{path}: {e}")),
                Err(_) => fail(format!("http {to}{path}: no answer within {timeout:?}")),
            }
        }
        Probe::Exec { command } => {
            let e = Arc::clone(engine);
            let (name, cmd) = (g.name.clone(), command.clone());
            let res =
                tokio::task::spawn_blocking(move || e.exec(&name, &cmd, Vec::new(), timeout)).await;
            match res {
                Ok(Ok((0, _, _))) => Ok(()),
                Ok(Ok((code, _, err))) => fail(format!(
                    "exec exited {code}: {}",
                    String::from_utf8_lossy(&err).trim()
                )),
                Ok(Err(e)) => fail(format!("exec: {e}")),
                Err(e) => fail(format!("exec: {e}")),
            }
        }
    }
}

/// `GET path HTTP/1.1` and the status code of the answer.
async fn http_status(to: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(to).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n",
        to.ip()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf).ok_or_else(|| {
        std::io::Error::other(format!(
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        ))
    })
}

/// "HTTP/1.1 200 OK" -> 200.
fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 404 Not Found\r\nX: y"),
            Some(404)
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn transitions_need_streaks_and_drop_stale_results() {
        let b = HealthBoard::default();
        let iv = Duration::ZERO;
        let now = Instant::now();
        let e = b.take_due("a", now).unwrap();
        assert_eq!(b.record("a", e, None, Ok(()), iv, 2, 2), None);
        let e = b.take_due("a", Instant::now()).unwrap();
        assert_eq!(
            b.record("a", e, None, Ok(()), iv, 2, 2).map(|t| t.1),
            Some(Status::Healthy)
        );
        let e = b.take_due("a", Instant::now()).unwrap();
        assert_eq!(
            b.record("a", e, None, Err((false, "x".into())), iv, 2, 2),
            None
        );
        // A probe still in flight when the guest is reset does not count.
        let e = b.take_due("a", Instant::now()).unwrap();
        b.reset("a");
        assert_eq!(
            b.record("a", e, None, Err((false, "x".into())), iv, 2, 2),
            None
        );
        assert_eq!(b.status("a"), Status::Unknown);
        // Not running: down at once.
        let e = b.take_due("a", Instant::now()).unwrap();
        assert_eq!(
            b.record("a", e, None, Err((true, "gone".into())), iv, 2, 2)
                .map(|t| t.1),
            Some(Status::Down)
        );
    }
}
