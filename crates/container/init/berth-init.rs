//! berth-init: the first process of every berth container.
//!
//! systemd-nspawn starts it as the container's PID 1 (statically linked, so it
//! runs in any rootfs). It waits until the supervisor has configured the
//! container's network from the host side, which the supervisor signals by
//! creating `/.berth/ready`, so the guest's command never starts before its
//! addresses and routes exist. Then, by its first argument:
//!
//! - `--exec`: replaces itself with the command (for an init system such as
//!   systemd, which must be PID 1 itself);
//! - `--supervise`: stays PID 1, starts the command as its child, forwards
//!   SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it (SIGRTMIN+3, the
//!   container "halt" signal, becomes SIGTERM), reaps orphans, and exits with
//!   the command's status (128+N when killed by signal N). A shell or httpd as
//!   PID 1 would ignore SIGTERM; this makes a stop quick and clean.
//!
//! Built by `build.rs` with `-C target-feature=+crt-static`; std only, plus
//! four libc functions declared below.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const READY: &str = "/.berth/ready";
const TIMEOUT: Duration = Duration::from_secs(60);

unsafe extern "C" {
    fn signal(sig: i32, handler: usize) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn __libc_current_sigrtmin() -> i32;
}

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIGUSR1: i32 = 10;
const SIGUSR2: i32 = 12;
const SIGTERM: i32 = 15;

static CHILD: AtomicI32 = AtomicI32::new(0);
static HALT: AtomicI32 = AtomicI32::new(-1);

/// A stop signal that arrived before the command was started.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: i32) {
    let child = CHILD.load(Ordering::SeqCst);
    let sig = if sig == HALT.load(Ordering::SeqCst) { SIGTERM } else { sig };
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes plain integers.
        unsafe { kill(child, sig) };
    } else {
        STOP.store(sig, Ordering::SeqCst);
    }
}

fn install_handlers() {
    // SAFETY: plain libc calls; `forward` only calls async-signal-safe kill(2)
    // and stores to an atomic.
    unsafe {
        HALT.store(__libc_current_sigrtmin() + 3, Ordering::SeqCst);
        for sig in [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, HALT.load(Ordering::SeqCst)] {
            signal(sig, forward as extern "C" fn(i32) as usize);
        }
    }
}

fn die(code: i32, msg: &str) -> ! {
    eprintln!("berth-init: {msg}");
    std::process::exit(code);
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let exec = match args.first().map(String::as_str) {
        Some("--exec") => true,
        Some("--supervise") => false,
        _ => die(125, "usage: berth-init --exec|--supervise COMMAND [ARG...]"),
    };
    args.remove(0);
    let Some(program) = args.first().cloned() else { die(125, "no command given") };

    // As PID 1 we ignore signals we have no handler for: without these, a
    // stop that comes while we wait for the network would hang until SIGKILL.
    install_handlers();
    let started = Instant::now();
    let mut pause = Duration::from_micros(200);
    while !Path::new(READY).exists() {
        let sig = STOP.load(Ordering::SeqCst);
        if sig != 0 {
            std::process::exit(128 + sig);
        }
        if started.elapsed() > TIMEOUT {
            die(125, &format!("the host did not configure the network within {TIMEOUT:?}"));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }

    let mut cmd = std::process::Command::new(&program);
    cmd.args(&args[1..]);
    if exec {
        // The init system installs its own handlers; hand it default ones.
        // SAFETY: resetting dispositions to SIG_DFL (0) is always sound.
        unsafe {
            for sig in [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, HALT.load(Ordering::SeqCst)] {
                signal(sig, 0);
            }
        }
        let err = cmd.exec();
        die(if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 }, &format!("cannot run {program}: {err}"));
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => die(
            if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 },
            &format!("cannot run {program}: {err}"),
        ),
    };
    let pid = child.id() as i32;
    CHILD.store(pid, Ordering::SeqCst);
    // A stop that raced the spawn: pass it on now.
    let sig = STOP.swap(0, Ordering::SeqCst);
    if sig != 0 {
        // SAFETY: kill(2) with plain integers.
        unsafe { kill(pid, sig) };
    }
    // Reap everything (orphans get reparented to PID 1) until the command ends.
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let r = unsafe { waitpid(-1, &mut status, 0) };
        if r == pid {
            let code = if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
            std::process::exit(code);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(4) {
            // ECHILD and friends: nothing left to wait for.
            std::process::exit(0);
        }
    }
}
