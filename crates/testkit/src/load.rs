//! A small HTTP load generator for service-address tests and benchmarks:
//! one request at a time (a new TCP connection each, as a health-checking
//! client or a browser would open), from inside a network namespace the
//! test created, bounded by a request count and a time limit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::in_netns;

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
    /// The first line of the body (the member's name in berth's tests), or
    /// the error.
    pub body: Result<String, String>,
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub samples: Vec<Sample>,
}

impl LoadReport {
    pub fn sent(&self) -> usize {
        self.samples.len()
    }

    pub fn failed(&self) -> usize {
        self.samples.iter().filter(|s| s.body.is_err()).count()
    }

    /// The first few errors, for assertion messages.
    pub fn errors(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| s.body.as_ref().err().cloned())
            .take(5)
            .collect()
    }

    /// Answers per first body line.
    pub fn by_body(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.samples {
            if let Ok(b) = &s.body {
                *m.entry(b.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Time from `t` to the first successful answer whose first line
    /// contains `needle`, sent after `t`.
    pub fn first_after(&self, t: Instant, needle: &str) -> Option<Duration> {
        self.samples
            .iter()
            .filter(|s| s.at >= t)
            .find(|s| s.body.as_ref().is_ok_and(|b| b.contains(needle)))
            .map(|s| (s.at + s.took).duration_since(t))
    }

    /// "N requests, F failed (answers: web-0 x 12, ...)".
    pub fn summary(&self) -> String {
        let answers: Vec<String> = self
            .by_body()
            .iter()
            .map(|(b, n)| format!("{b} x {n}"))
            .collect();
        format!(
            "{} requests, {} failed (answers: {}){}",
            self.sent(),
            self.failed(),
            answers.join(", "),
            if self.failed() > 0 {
                format!("; first errors: {}", self.errors().join(" | "))
            } else {
                String::new()
            }
        )
    }
}

/// A running load; [`Load::stop`] ends it and returns the report.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts sending `GET /` to `addr` from network namespace `ns`, one
    /// request at a time, until stopped, `max_requests` were sent, or
    /// `max_time` passed. A request fails if it takes over `timeout`.
    pub fn start(
        ns: &str,
        addr: SocketAddr,
        timeout: Duration,
        max_requests: usize,
        max_time: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let ns = ns.to_owned();
        let handle = std::thread::spawn(move || {
            in_netns(&ns, || {
                let mut report = LoadReport::default();
                let end = Instant::now() + max_time;
                while !flag.load(Ordering::Relaxed)
                    && report.samples.len() < max_requests
                    && Instant::now() < end
                {
                    let at = Instant::now();
                    let body = get(addr, timeout);
                    report.samples.push(Sample {
                        at,
                        took: at.elapsed(),
                        body,
                    });
                }
                report
            })
            .unwrap_or_default()
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and returns what was seen.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `GET /` over a new connection; the first line of a 200 answer's body.
pub fn get(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip()).as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {:?}", &text[..text.len().min(60)]))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status}"));
    }
    Ok(body.lines().next().unwrap_or("").trim().to_owned())
}
