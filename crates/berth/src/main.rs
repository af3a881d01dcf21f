//! `berth`: declarative VMs and containers. The CLI is a thin client of the
//! daemon's API; `berth daemon` and `berth shim` are the same binary.

mod cli;
mod client;
mod copy_closure;
mod image_cmd;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            // The whole cause chain once, one line per cause.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
