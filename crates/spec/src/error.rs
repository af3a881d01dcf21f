//! Errors from loading, parsing and validating a spec.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Everything that can be wrong with a spec file. Each variant names the
/// file; validation errors also name the guest and field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{}: cannot read spec: {source}", .file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML/JSON, or does not match the schema.
    #[error("{}:{line}:{column}: {message}", .file.display())]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file (or something in it) is of a kind this build cannot handle.
    #[error("{}: {reason}", .file.display())]
    Unsupported { file: PathBuf, reason: String },
    /// A value is out of range, malformed or refers to something missing.
    /// `field` is a guest field (`memory`) or, for host settings, a dotted
    /// path (`host.subnet4`).
    #[error("{}", invalid_message(.file, .guest.as_deref(), .field, .reason))]
    Invalid {
        file: PathBuf,
        guest: Option<String>,
        field: String,
        reason: String,
    },
    /// Two guests use the same index (`a` < `b`).
    #[error(
        "{}: guests `{a}` and `{b}` both use index {index}; every guest needs its own index (it picks the guest's addresses and link name)",
        .file.display()
    )]
    IndexClash {
        file: PathBuf,
        a: String,
        b: String,
        index: u32,
    },
}

fn invalid_message(file: &Path, guest: Option<&str>, field: &str, reason: &str) -> String {
    match guest {
        Some(g) => format!("{}: guest `{g}`: field `{field}`: {reason}", file.display()),
        None => format!("{}: {field}: {reason}", file.display()),
    }
}

impl SpecError {
    /// The guest this error is about, if any.
    pub fn guest(&self) -> Option<&str> {
        match self {
            SpecError::Invalid { guest, .. } => guest.as_deref(),
            _ => None,
        }
    }
}

/// All errors, one per line, in the order given.
pub fn format_errors(errors: &[SpecError]) -> String {
    let mut out = String::new();
    for e in errors {
        let _ = writeln!(out, "{e}");
    }
    out
}
