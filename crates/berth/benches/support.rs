//! Helpers shared by the benchmarks (included with `#[path]`).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use berth_testkit::in_netns;

pub fn answers(addr: &str) -> bool {
    let Ok(sa) = format!("{addr}:80").parse::<SocketAddr>() else {
        return false;
    };
    // Short timeout: a SYN sent before the guest's end of the link is up is
    // lost and would only be retried by the kernel after a second.
    let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_millis(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 12 && buf.starts_with(b"HTTP/1."))
}

/// Waits (from inside `ns`) until every address answers; returns the time.
pub fn wait_all(ns: &str, addrs: &[String], t0: Instant) -> Duration {
    in_netns(ns, || {
        let mut left: Vec<&String> = addrs.iter().collect();
        while !left.is_empty() {
            left.retain(|a| !answers(a));
            if t0.elapsed() > Duration::from_secs(300) {
                panic!("guests {left:?} did not answer within 300 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        t0.elapsed()
    })
    .expect("netns")
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "status", "VmRSS:")
}

pub fn status_kib(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

pub fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "status", "RssAnon:")
}

/// Proportional set size: shared pages (the berth binary, libc) divided
/// among the processes that map them.
pub fn pss_kib(pid: u32) -> u64 {
    status_kib(pid, "smaps_rollup", "Pss:")
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `start` while polling (from inside `ns`) until every address
/// answers; returns the time from just before `start`.
pub fn timed<T>(ns: &str, addrs: &[String], start: impl FnOnce() -> T) -> (Duration, T) {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let poll = s.spawn(|| wait_all(ns, addrs, t0));
        let out = start();
        (poll.join().expect("poller"), out)
    })
}
