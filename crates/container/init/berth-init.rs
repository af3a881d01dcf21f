//! berth-init: the first process of every berth container.
//!
//! systemd-nspawn starts it as the container's PID 1 (statically linked, so it
//! runs in any rootfs). It waits until the supervisor has configured the
//! container's network from the host side, which the supervisor signals by
//! creating `/.berth/ready`, then `exec`s the guest's command, so the command
//! never starts before its addresses and routes exist.
//!
//! Built by `build.rs` with `-C target-feature=+crt-static`; std only.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

const READY: &str = "/.berth/ready";
const TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(program) = args.first() else {
        eprintln!("berth-init: no command given");
        std::process::exit(125);
    };
    let started = Instant::now();
    let mut pause = Duration::from_micros(200);
    while !Path::new(READY).exists() {
        if started.elapsed() > TIMEOUT {
            eprintln!("berth-init: the host did not configure the network within {TIMEOUT:?}");
            std::process::exit(125);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
    let err = std::process::Command::new(program).args(&args[1..]).exec();
    eprintln!("berth-init: cannot run {program}: {err}");
    std::process::exit(if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
}
