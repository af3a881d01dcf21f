//! Pull progress for people: a bar on a terminal (indicatif), plain lines
//! otherwise (one at the start, every 25 %, and at the end).

use std::io::IsTerminal;

use crate::Event;

/// Turns [`Event`]s into output on stderr.
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
    image: String,
    next_pct: u64,
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

impl Reporter {
    /// A bar if stderr is a terminal, else plain lines.
    pub fn new() -> Reporter {
        Reporter {
            bar: None,
            tty: std::io::stderr().is_terminal(),
            image: String::new(),
            next_pct: 25,
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    pub fn event(&mut self, ev: Event) {
        match ev {
            Event::Checksum { image, url } => {
                self.line(format!("image {image}: checksum file {url}"))
            }
            Event::Cached { image, sha256 } => {
                self.line(format!("image {image}: cached (sha256 {sha256})"))
            }
            Event::Waiting { image } => self.line(format!(
                "image {image}: another process is downloading it; waiting"
            )),
            Event::Download {
                image,
                url,
                total,
                from,
            } => {
                let size = total.map(mib).unwrap_or_else(|| "unknown size".into());
                let resume = if from > 0 {
                    format!(", resuming at {}", mib(from))
                } else {
                    String::new()
                };
                self.image = image.clone();
                self.next_pct = 25;
                if self.tty {
                    let bar = match total {
                        Some(t) => indicatif::ProgressBar::new(t),
                        None => indicatif::ProgressBar::new_spinner(),
                    };
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    ) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_message(format!("image {image}"));
                    bar.set_position(from);
                    bar.println(format!("image {image}: downloading {url} ({size}{resume})"));
                    self.bar = Some(bar);
                } else {
                    eprintln!("image {image}: downloading {url} ({size}{resume})");
                }
            }
            Event::Bytes { done, total } => {
                if let Some(b) = &self.bar {
                    b.set_position(done);
                } else if let Some(t) = total.filter(|t| *t > 0) {
                    let pct = done * 100 / t;
                    if pct >= self.next_pct && pct < 100 {
                        eprintln!("image {}: {pct}% ({} of {})", self.image, mib(done), mib(t));
                        self.next_pct = (pct / 25 + 1) * 25;
                    }
                }
            }
            Event::Retry { image, error } => {
                self.line(format!("image {image}: {error}; retrying (resumes)"))
            }
            Event::Verified { image, sha256 } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                eprintln!("image {image}: verified sha256 {sha256}");
            }
            Event::Derive { image, what } => self.line(format!("image {image}: {what}")),
        }
    }
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new()
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}
