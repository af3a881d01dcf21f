//! Checksum files as `sha256sum` and BSD tools write them.
//!
//! ```text
//! 9f86d08...  debian.iso          GNU, text mode
//! 9f86d08... *debian.iso          GNU, binary mode
//! \9f86d08...  new\nline.iso      GNU, escaped name
//! SHA256 (debian.iso) = 9f86d08...    BSD (`sha256 -r` aside), also `SHA256(x)= h`
//! 9f86d08...                      a bare hash (a `.sha256` file for one image)
//! ```

/// One entry: the file name (`None` for a bare hash) and its hash (lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Option<String>,
    pub sha256: String,
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every SHA-256 entry in `text`; other lines (comments, other algorithms,
/// PGP armour) are skipped.
pub fn parse(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // BSD: "SHA256 (name) = hash" or "SHA256(name)= hash".
        if let Some(rest) = line
            .strip_prefix("SHA256")
            .or_else(|| line.strip_prefix("SHA2-256"))
        {
            let rest = rest.trim_start();
            if let Some(rest) = rest.strip_prefix('(')
                && let Some(close) = rest.rfind(')')
            {
                let name = &rest[..close];
                let after = rest[close + 1..].trim_start();
                if let Some(h) = after.strip_prefix('=').map(str::trim)
                    && is_hash(h)
                {
                    out.push(Entry {
                        name: Some(name.to_string()),
                        sha256: h.to_ascii_lowercase(),
                    });
                }
            }
            continue;
        }
        // GNU: "[\]hash  name" or "[\]hash *name".
        let (escaped, l) = match line.strip_prefix('\\') {
            Some(l) => (true, l),
            None => (false, line),
        };
        let Some(h) = l.get(..64).filter(|h| is_hash(h)) else {
            continue;
        };
        let rest = &l[64..];
        if rest.is_empty() {
            out.push(Entry {
                name: None,
                sha256: h.to_ascii_lowercase(),
            });
            continue;
        }
        let Some(rest) = rest.strip_prefix(' ') else {
            continue;
        };
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .unwrap_or(rest);
        let name = if escaped {
            unescape(name)
        } else {
            name.to_string()
        };
        out.push(Entry {
            name: Some(name),
            sha256: h.to_ascii_lowercase(),
        });
    }
    out
}

/// The hash for `file` (the last part of the image URL): an entry with that
/// name (also as `./name` or `dir/name`), or the only entry when it is a
/// bare hash. `Err` lists what the file does name.
pub fn find(text: &str, file: &str) -> Result<String, String> {
    let entries = parse(text);
    let base = |n: &str| n.rsplit('/').next().unwrap_or(n).to_string();
    if let Some(e) = entries
        .iter()
        .find(|e| e.name.as_deref() == Some(file))
        .or_else(|| {
            entries
                .iter()
                .find(|e| e.name.as_deref().map(base).as_deref() == Some(file))
        })
    {
        return Ok(e.sha256.clone());
    }
    if let [only] = entries.as_slice()
        && only.name.is_none()
    {
        return Ok(only.sha256.clone());
    }
    if entries.is_empty() {
        return Err("it holds no SHA-256 lines in sha256sum or BSD format".into());
    }
    let names: Vec<String> = entries
        .iter()
        .filter_map(|e| e.name.clone())
        .take(10)
        .collect();
    Err(format!("it lists {}", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn gnu_text_and_binary_mode() {
        let t = format!("{A}  debian.iso\n{B} *netinst.iso\n");
        assert_eq!(find(&t, "debian.iso"), Ok(A.into()));
        assert_eq!(find(&t, "netinst.iso"), Ok(B.into()));
        assert!(
            find(&t, "other.iso")
                .expect_err("absent")
                .contains("debian.iso, netinst.iso")
        );
    }

    #[test]
    fn bsd_formats() {
        let t = format!(
            "SHA256 (debian.iso) = {A}\nSHA256(net inst.iso)= {}\nMD5 (x) = abc\n",
            B.to_uppercase()
        );
        assert_eq!(find(&t, "debian.iso"), Ok(A.into()));
        assert_eq!(find(&t, "net inst.iso"), Ok(B.into()));
    }

    #[test]
    fn escaped_dir_prefixed_bare_and_crlf() {
        let t = format!("\\{A}  new\\nline.iso\r\n{B}  ./sub/disk.img\r\n");
        assert_eq!(find(&t, "new\nline.iso"), Ok(A.into()));
        assert_eq!(find(&t, "disk.img"), Ok(B.into()));
        assert_eq!(find(&format!("{A}\n"), "anything.img"), Ok(A.into()));
        assert!(find("-----BEGIN PGP SIGNED MESSAGE-----\n", "x").is_err());
        // A short or non-hex "hash" is not an entry.
        assert!(parse("abc  x.iso\n").is_empty());
    }
}
