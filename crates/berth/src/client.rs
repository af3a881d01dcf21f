//! A small synchronous HTTP/1.1 client for the daemon's unix socket.
//!
//! The CLI makes one request per connection (`Connection: close`), so all it
//! needs is a status line, headers, and a body that is either sized, chunked
//! (the apply stream) or ends at EOF.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use berth_api::ErrorBody;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the berth daemon at {socket}: {source}\n  start it with `sudo berth daemon` (or `systemctl start berth`), or point --socket / BERTH_SOCKET at a running one"
    )]
    NoDaemon {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon answered something unexpected: {0}")]
    Protocol(String),
    #[error("{}", render_api_error(.body))]
    Api { status: u16, body: ErrorBody },
}

fn render_api_error(b: &ErrorBody) -> String {
    let mut s = b.error.clone();
    for d in &b.details {
        s.push_str("\n  ");
        s.push_str(d);
    }
    s
}

pub struct Client {
    socket: PathBuf,
}

struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(Head, BufReader<UnixStream>), ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::NoDaemon {
            socket: self.socket.clone(),
            source,
        })?;
        let payload = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(&payload)?;
        Self::read_head(s)
    }

    /// Reads the status line and headers of the answer on `s`.
    fn read_head(s: UnixStream) -> Result<(Head, BufReader<UnixStream>), ClientError> {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("bad status line {line:?}")))?;
        let mut head = Head {
            status,
            chunked: false,
            length: None,
        };
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                break;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    head.chunked = true;
                } else if k == "content-length" {
                    head.length = v.parse().ok();
                }
            }
        }
        Ok((head, r))
    }

    /// Reads the body, calling `on_data` with each piece as it arrives.
    fn read_body(
        head: &Head,
        r: &mut BufReader<UnixStream>,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        if head.chunked {
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                let size =
                    usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                        .map_err(|_| ClientError::Protocol(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    return Ok(());
                }
                let mut buf = vec![0; size];
                r.read_exact(&mut buf)?;
                on_data(&buf);
                let mut crlf = [0; 2];
                r.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = head.length {
            let mut buf = vec![0; n];
            r.read_exact(&mut buf)?;
            on_data(&buf);
            Ok(())
        } else {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf)?;
            on_data(&buf);
            Ok(())
        }
    }

    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let (head, mut r) = self.send(method, path, body)?;
        let mut all = Vec::new();
        Self::read_body(&head, &mut r, &mut |d| all.extend_from_slice(d))?;
        if !(200..300).contains(&head.status) {
            return Err(api_error(head.status, &all));
        }
        serde_json::from_slice(&all)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&all))))
    }

    /// POSTs everything `body` yields as the request body (chunked: any
    /// length, nothing buffered) and parses the JSON answer. `on_sent` gets
    /// the running byte count. If the daemon answers before the body is
    /// through (the command ended early), its answer is what counts.
    pub fn post_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &mut dyn Read,
        on_sent: &mut dyn FnMut(u64),
    ) -> Result<T, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::NoDaemon {
            socket: self.socket.clone(),
            source,
        })?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\nAccept: application/json\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        let mut buf = vec![0u8; 256 << 10];
        let mut sent = 0u64;
        let written: std::io::Result<()> = (|| {
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                write!(s, "{n:x}\r\n")?;
                s.write_all(&buf[..n])?;
                s.write_all(b"\r\n")?;
                sent += n as u64;
                on_sent(sent);
            }
            s.write_all(b"0\r\n\r\n")
        })();
        if written.is_err() {
            // The daemon sees the body break off (not end): the command gets
            // no complete input and fails instead of taking half of it.
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let answer = Self::read_head(s).and_then(|(head, mut r)| {
            let mut all = Vec::new();
            Self::read_body(&head, &mut r, &mut |d| all.extend_from_slice(d))?;
            Ok((head, all))
        });
        let (head, all) = match (answer, written) {
            (Ok(a), _) => a,
            (Err(e), Ok(())) => return Err(e),
            (Err(_), Err(e)) => return Err(ClientError::Io(e)),
        };
        if !(200..300).contains(&head.status) {
            return Err(api_error(head.status, &all));
        }
        serde_json::from_slice(&all)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&all))))
    }

    /// GETs `path` and hands each piece of the body to `on_data` as it arrives.
    pub fn get_stream(
        &self,
        path: &str,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let (head, mut r) = self.send("GET", path, None)?;
        if !(200..300).contains(&head.status) {
            let mut all = Vec::new();
            Self::read_body(&head, &mut r, &mut |d| all.extend_from_slice(d))?;
            return Err(api_error(head.status, &all));
        }
        Self::read_body(&head, &mut r, on_data)
    }

    /// `GET path` with `Upgrade: protocol`; on `101 Switching Protocols`
    /// returns the raw connection.
    pub fn upgrade(&self, path: &str, protocol: &str) -> Result<UnixStream, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::NoDaemon {
            socket: self.socket.clone(),
            source,
        })?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: berth\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        )?;
        // Read the head byte by byte: nothing after it may be swallowed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                return Err(ClientError::Protocol(
                    "the daemon closed the connection".into(),
                ));
            }
            head.push(byte[0]);
            if head.len() > 64 << 10 {
                return Err(ClientError::Protocol("response head too long".into()));
            }
        }
        let text = String::from_utf8_lossy(&head);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status == 101 {
            return Ok(s);
        }
        let length = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        s.read_exact(&mut body)?;
        Err(api_error(status, &body))
    }

    /// POSTs and calls `on_line` for each line of an NDJSON answer.
    pub fn stream_lines(
        &self,
        path: &str,
        body: &serde_json::Value,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ClientError> {
        let (head, mut r) = self.send("POST", path, Some(body))?;
        if !(200..300).contains(&head.status) {
            let mut all = Vec::new();
            Self::read_body(&head, &mut r, &mut |d| all.extend_from_slice(d))?;
            return Err(api_error(head.status, &all));
        }
        let mut pending = Vec::new();
        Self::read_body(&head, &mut r, &mut |d| {
            pending.extend_from_slice(d);
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                on_line(String::from_utf8_lossy(&line).trim_end());
            }
        })?;
        if !pending.is_empty() {
            on_line(String::from_utf8_lossy(&pending).trim_end());
        }
        Ok(())
    }
}

fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => {
            ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(body)))
        }
    }
}
