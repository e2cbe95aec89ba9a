//! What a probe says and expects once connected: the `send`/`expect` steps of `kind: tcp` (their
//! matching shared with `kind: udp`'s datagrams, `datagram.rs`), and an HTTP `GET` whose status and
//! body must be what the service expects. Every read is bounded by the probe's `read_cap`; the
//! caller bounds the whole by the probe's timeout. The matching is pure and tested here.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ProbeError;
use crate::config::{HealthConfig, ProbeStep, StatusRange};

/// The most of an answer quoted in a probe's error (the history is for people to read).
const QUOTE: usize = 80;

/// `bytes` as text for an error: printable ASCII as is, the rest escaped, at most [`QUOTE`] bytes.
pub(super) fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTE)];
    let mut s: String = cut.escape_ascii().to_string();
    if bytes.len() > QUOTE {
        s.push('…');
    }
    s
}

/// Whether `got` (what was read since the last send) satisfies an expect step. `None` for a send.
pub(super) fn satisfied(step: &ProbeStep, got: &[u8]) -> Option<bool> {
    let contains =
        |needle: &[u8]| needle.is_empty() || got.windows(needle.len()).any(|w| w == needle);
    if let Some(t) = &step.expect {
        return Some(contains(t.as_bytes()));
    }
    if let Some(h) = &step.expect_hex {
        return Some(contains(&h.0));
    }
    step.expect_regex.as_ref().map(|r| r.0.is_match(got))
}

/// What a step expects, for an error.
pub(super) fn expected(step: &ProbeStep) -> String {
    match (&step.expect, &step.expect_hex, &step.expect_regex) {
        (Some(t), _, _) => format!("{:?}", t),
        (_, Some(h), _) => format!("hex {}", quote(&h.0)),
        (_, _, Some(r)) => format!("/{}/", r.0.as_str()),
        _ => String::new(),
    }
}

/// What a send step sends; `None` for an expect.
pub(super) fn to_send(step: &ProbeStep) -> Option<&[u8]> {
    step.send
        .as_ref()
        .map(|t| t.as_bytes())
        .or(step.send_hex.as_ref().map(|h| h.0.as_slice()))
}

/// Runs the steps on `s`: a send is written whole; an expect reads (after what was read since the
/// previous send) until it is satisfied, `cap` bytes were read without, or the backend closes.
pub(super) async fn steps<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    steps: &[ProbeStep],
    cap: usize,
) -> Result<(), ProbeError> {
    let mut got: Vec<u8> = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        if let Some(bytes) = to_send(step) {
            s.write_all(bytes).await.map_err(ProbeError::Write)?;
            s.flush().await.map_err(ProbeError::Write)?;
            got.clear();
            continue;
        }
        let mut buf = vec![0u8; 2048];
        while satisfied(step, &got) == Some(false) {
            if got.len() >= cap {
                return Err(ProbeError::Expect(format!(
                    "step {k}: {} not in the first {cap} bytes: {}",
                    expected(step),
                    quote(&got)
                )));
            }
            let room = buf.len().min(cap - got.len());
            match s.read(&mut buf[..room]).await.map_err(ProbeError::Read)? {
                0 => {
                    return Err(ProbeError::Expect(format!(
                        "step {k}: closed before {}: {}",
                        expected(step),
                        quote(&got)
                    )))
                }
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    }
    Ok(())
}

/// The answer of an HTTP probe: its status and, when asked for, its body (de-chunked, capped).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
}

/// `GET path` over `s` with `Connection: close`; the response's status and (when the check looks at
/// it) its body, at most `cap` bytes of head and as much of body.
pub(super) async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    h: &HealthConfig,
    host: &str,
) -> Result<(), ProbeError> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluicegate-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        h.path
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Write)?;
    let wants_body = h.expect_body.is_some() || h.expect_body_regex.is_some();
    let mut raw = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    let response = loop {
        match parse_response(&raw, wants_body, h.read_cap) {
            Parsed::Done(r) => break r,
            Parsed::Failed(e) => return Err(e),
            Parsed::More => {}
        }
        let n = s.read(&mut buf).await.map_err(ProbeError::Read)?;
        if n == 0 {
            match parse_response(&raw, wants_body, h.read_cap) {
                Parsed::Done(r) => break r,
                Parsed::Failed(e) => return Err(e),
                // Closed: what was read is the whole response (a body without a length ends so).
                Parsed::More => match finish_at_close(&raw, wants_body) {
                    Some(r) => break r,
                    None => return Err(ProbeError::Closed),
                },
            }
        }
        raw.extend_from_slice(&buf[..n]);
    };
    check(&response, h)
    // Dropping the stream closes the probe connection whatever the backend still sends.
}

/// Whether a response passes: its status in `expect_status` (any 2xx when none) and its body holding
/// `expect_body` and matching `expect_body_regex`.
pub(super) fn check(r: &Response, h: &HealthConfig) -> Result<(), ProbeError> {
    let status_ok = if h.expect_status.is_empty() {
        (200..300).contains(&r.status)
    } else {
        h.expect_status
            .iter()
            .any(|s: &StatusRange| s.contains(r.status))
    };
    if !status_ok {
        return Err(ProbeError::Status(r.status));
    }
    if let Some(t) = &h.expect_body {
        let needle = t.as_bytes();
        if !needle.is_empty() && !r.body.windows(needle.len()).any(|w| w == needle) {
            return Err(ProbeError::Expect(format!(
                "body without {t:?}: {}",
                quote(&r.body)
            )));
        }
    }
    if let Some(re) = &h.expect_body_regex {
        if !re.0.is_match(&r.body) {
            return Err(ProbeError::Expect(format!(
                "body not matching /{}/: {}",
                re.0.as_str(),
                quote(&r.body)
            )));
        }
    }
    Ok(())
}

/// [`parse_response`] for the fuzz targets (`health::wire`).
pub(super) fn parse(raw: &[u8], body: bool, cap: usize) -> Option<Result<(u16, Vec<u8>), String>> {
    match parse_response(raw, body, cap) {
        Parsed::More => None,
        Parsed::Done(r) => Some(Ok((r.status, r.body))),
        Parsed::Failed(e) => Some(Err(e.to_string())),
    }
}

/// What the bytes of a response read so far make.
#[derive(Debug)]
enum Parsed {
    Done(Response),
    More,
    Failed(ProbeError),
}

/// Parses a response read so far: the status line, the headers, and (when `body` is wanted) the body
/// by its Content-Length or chunks, within `cap` bytes each.
fn parse_response(raw: &[u8], body: bool, cap: usize) -> Parsed {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        // A head past the cap, or a first line that is not a status line, will never parse.
        let hopeless =
            raw.len() >= cap.max(4096) || (raw.contains(&b'\n') && status_line(raw).is_none());
        return if hopeless {
            Parsed::Failed(ProbeError::Malformed)
        } else {
            Parsed::More
        };
    };
    let Some(status) = status_line(raw) else {
        return Parsed::Failed(ProbeError::Malformed);
    };
    if !body {
        return Parsed::Done(Response {
            status,
            body: Vec::new(),
        });
    }
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let rest = &raw[head_end + 4..];
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        return match dechunk(rest, cap) {
            Chunks::Done(body) => Parsed::Done(Response { status, body }),
            Chunks::More => Parsed::More,
            Chunks::Bad => Parsed::Failed(ProbeError::Malformed),
        };
    }
    match header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) if rest.len() >= len.min(cap) => Parsed::Done(Response {
            status,
            body: rest[..len.min(cap)].to_vec(),
        }),
        Some(_) => Parsed::More,
        None if rest.len() >= cap => Parsed::Done(Response {
            status,
            body: rest[..cap].to_vec(),
        }),
        // No length: the body ends when the backend closes.
        None => Parsed::More,
    }
}

/// A response whose backend closed: whole when its head is and it declared no length it missed.
fn finish_at_close(raw: &[u8], body: bool) -> Option<Response> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = status_line(raw)?;
    Some(Response {
        status,
        body: if body {
            raw[head_end + 4..].to_vec()
        } else {
            Vec::new()
        },
    })
}

/// The status code of a complete `HTTP/1.x NNN ...` line.
fn status_line(raw: &[u8]) -> Option<u16> {
    let end = raw.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&raw[..end]).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    let code = parts.next()?;
    (version.starts_with("HTTP/1.") && code.len() == 3)
        .then(|| code.parse::<u16>().ok())
        .flatten()
}

enum Chunks {
    Done(Vec<u8>),
    More,
    Bad,
}

/// The body of a chunked response, or as much as `cap` allows.
fn dechunk(mut rest: &[u8], cap: usize) -> Chunks {
    let mut body = Vec::new();
    loop {
        if body.len() >= cap {
            body.truncate(cap);
            return Chunks::Done(body);
        }
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return if rest.len() > 64 {
                Chunks::Bad
            } else {
                Chunks::More
            };
        };
        let size_text = std::str::from_utf8(&rest[..eol]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Chunks::Bad;
        };
        if size == 0 {
            return Chunks::Done(body);
        }
        let data = &rest[eol + 2..];
        if data.len() < size.min(cap - body.len()) {
            return Chunks::More;
        }
        if data.len() < size + 2 {
            body.extend_from_slice(&data[..data.len().min(size)]);
            return if body.len() >= cap {
                body.truncate(cap);
                Chunks::Done(body)
            } else {
                Chunks::More
            };
        }
        body.extend_from_slice(&data[..size]);
        rest = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Hex, Pattern};

    fn step(yaml: &str) -> ProbeStep {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn health(yaml: &str) -> HealthConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn expect_steps_match_text_bytes_and_patterns() {
        assert_eq!(
            satisfied(&step("{expect: \"+PONG\"}"), b"+PONG\r\n"),
            Some(true)
        );
        assert_eq!(
            satisfied(&step("{expect: \"+PONG\"}"), b"+PON"),
            Some(false)
        );
        assert_eq!(satisfied(&step("{expect_hex: \"4e\"}"), b"N"), Some(true));
        assert_eq!(
            satisfied(
                &step("{expect_regex: \"role:(master|primary)\"}"),
                b"# Replication\r\nrole:master\r\n"
            ),
            Some(true)
        );
        assert_eq!(satisfied(&step("{send: x}"), b""), None);
        assert!(matches!(
            serde_yaml::from_str::<ProbeStep>("{expect_regex: \"(\"}"),
            Err(e) if e.to_string().contains("not a regular expression")
        ));
        let h: Hex = serde_yaml::from_str("\"00 00 00 08 04 d2 16 2f\"").unwrap();
        assert_eq!(h.0, [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]);
        assert!(serde_yaml::from_str::<Hex>("\"0g\"").is_err());
        assert!(serde_yaml::from_str::<Hex>("\"abc\"").is_err());
        let _: Pattern = serde_yaml::from_str("\"^ok$\"").unwrap();
    }

    #[tokio::test]
    async fn steps_send_and_expect_within_the_cap() {
        let run = |answer: &'static [u8], steps: &'static str, cap: usize| async move {
            let (mut client, mut server) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                let _ = server.read(&mut b).await;
                let _ = server.write_all(answer).await;
            });
            let steps: Vec<ProbeStep> = serde_yaml::from_str(steps).unwrap();
            super::steps(&mut client, &steps, cap).await
        };
        assert!(run(
            b"+PONG\r\n",
            "[{send: \"PING\\r\\n\"}, {expect: \"+PONG\"}]",
            64
        )
        .await
        .is_ok());
        let err = run(b"-ERR\r\n", "[{send: x}, {expect: \"+PONG\"}]", 64)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("closed before"), "{err}");
        let long: &'static [u8] = Box::leak(vec![b'a'; 1000].into_boxed_slice());
        let err = run(long, "[{send: x}, {expect: \"+PONG\"}]", 100)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("first 100 bytes"), "{err}");
    }

    #[test]
    fn responses_are_parsed_by_length_chunks_or_close() {
        let h = |raw: &[u8], body: bool| parse_response(raw, body, 4096);
        assert!(matches!(h(b"HTTP/1.1 200 OK\r\n", false), Parsed::More));
        assert!(matches!(
            h(b"HTTP/1.1 200 OK\r\n\r\n", false),
            Parsed::Done(Response { status: 200, .. })
        ));
        assert!(matches!(
            h(b"SSH-2.0-OpenSSH\r\n", false),
            Parsed::Failed(ProbeError::Malformed)
        ));
        let with_len = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert!(
            matches!(h(with_len, true), Parsed::Done(Response { body, .. }) if body == b"hello")
        );
        assert!(matches!(
            h(&with_len[..with_len.len() - 1], true),
            Parsed::More
        ));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert!(
            matches!(h(chunked, true), Parsed::Done(Response { body, .. }) if body == b"hello")
        );
        assert!(matches!(h(&chunked[..60], true), Parsed::More));
        let no_len = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert!(matches!(h(no_len, true), Parsed::More));
        assert_eq!(finish_at_close(no_len, true).unwrap().body, b"until close");
    }

    #[test]
    fn statuses_and_bodies_are_checked() {
        let r = |status, body: &[u8]| Response {
            status,
            body: body.to_vec(),
        };
        let default = health("{kind: http}");
        assert!(check(&r(204, b""), &default).is_ok());
        assert!(matches!(
            check(&r(301, b""), &default),
            Err(ProbeError::Status(301))
        ));
        let listed = health("{kind: http, expect_status: [301, \"200-204\"]}");
        assert!(check(&r(301, b""), &listed).is_ok() && check(&r(203, b""), &listed).is_ok());
        assert!(check(&r(205, b""), &listed).is_err());
        let body =
            health("{kind: http, expect_body: ready, expect_body_regex: \"version: [0-9]+\"}");
        assert!(check(&r(200, b"ready; version: 12"), &body).is_ok());
        assert!(check(&r(200, b"starting; version: 12"), &body).is_err());
        assert!(check(&r(200, b"ready; version: x"), &body).is_err());
        assert!(serde_yaml::from_str::<HealthConfig>("{expect_status: [\"300-200\"]}").is_err());
        assert!(serde_yaml::from_str::<HealthConfig>("{expect_status: [99]}").is_err());
    }
}
