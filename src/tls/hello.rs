//! The TLS ClientHello, read for routing: the server name (SNI) and the protocols (ALPN) a client
//! asks for, parsed from the bytes the client sent first, without answering anything.
//!
//! [`parse`] is pure and incremental: given every byte received so far it says whether they hold a
//! whole ClientHello (and what it asks for), need more, are not TLS at all, or are malformed. The
//! hello may be split across TCP segments and across TLS records (each record holds a piece of the
//! handshake message); every record of it must be a handshake record. Nothing is consumed: the
//! session forwards the same bytes to the backend it picks (or to its own TLS acceptor).
//!
//! Limits: at most [`MAX_HELLO`] bytes in all, records included, so a client cannot make the balancer
//! buffer more; a name at most 255 bytes of printable ASCII (a DNS name as TLS carries it; case is
//! folded by the router, not here).

use std::fmt;

/// The most bytes read from a client for its hello (records and their headers included).
pub const MAX_HELLO: usize = 16 * 1024;

/// TLS record header: content type, legacy version, length.
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// RFC 8446 5.1: a record's plaintext is at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;

/// What a client's first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a TLS handshake (another protocol): routed as if it had no name.
    NotTls,
    /// A prefix of a ClientHello: read more (at most [`MAX_HELLO`] bytes in all).
    Incomplete,
    /// A whole ClientHello, ending `len` bytes into the input.
    Hello { hello: ClientHello, len: usize },
}

/// What a ClientHello asks for, as far as routing cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of its server_name extension, as sent.
    pub sni: Option<String>,
    /// The protocols of its ALPN extension, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// Why bytes that began as a TLS handshake are not a ClientHello we can route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// The hello (with its records) would be larger than [`MAX_HELLO`].
    TooLarge,
    /// A field or length that cannot be: what was wrong.
    Malformed(&'static str),
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::TooLarge => write!(f, "ClientHello larger than {MAX_HELLO} bytes"),
            HelloError::Malformed(why) => write!(f, "malformed ClientHello: {why}"),
        }
    }
}

impl std::error::Error for HelloError {}

/// Parses the first bytes a client sent. Pure: the same input always gives the same answer, and a
/// longer prefix of the same stream never turns a `Hello` or an error into something else.
pub fn parse(input: &[u8]) -> Result<Parsed, HelloError> {
    let Some(&first) = input.first() else {
        return Ok(Parsed::Incomplete);
    };
    if first != CONTENT_HANDSHAKE {
        return Ok(Parsed::NotTls);
    }
    // The record version's major byte is 3 for every TLS and SSLv3; anything else is not TLS (a
    // protocol whose first byte happens to be 22).
    if input.len() >= 2 && input[1] != 3 {
        return Ok(Parsed::NotTls);
    }
    let (message, used) = match handshake_message(input)? {
        Some(m) => m,
        None if input.len() >= MAX_HELLO => return Err(HelloError::TooLarge),
        None => return Ok(Parsed::Incomplete),
    };
    let hello = client_hello(&message)?;
    Ok(Parsed::Hello { hello, len: used })
}

/// Gathers the first handshake message from the records at the start of `input`: its body (without
/// the 4-byte handshake header) and how many input bytes its records took, or `None` when the input
/// ends before it does.
fn handshake_message(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HelloError> {
    let mut message = Vec::new();
    let mut at = 0;
    // The handshake header's length, once known: the message's body length.
    let mut body_len: Option<usize> = None;
    loop {
        if input.len() < at + RECORD_HEADER {
            return Ok(None);
        }
        let header = &input[at..at + RECORD_HEADER];
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::Malformed(
                "a record that is not a handshake record inside the hello",
            ));
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not TLS"));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        if at + RECORD_HEADER + len > MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        let start = at + RECORD_HEADER;
        let available = input.len().saturating_sub(start).min(len);
        message.extend_from_slice(&input[start..start + available]);
        if body_len.is_none() {
            if let Some(header) = message.first_chunk::<4>() {
                body_len = Some(hello_body_len(*header)?);
            }
        }
        // Bytes past the message in a record of it would be a second handshake message (a client
        // sends nothing after its hello before the server answers).
        let past = body_len.is_some_and(|n| message.len() > 4 + n);
        if past {
            return Err(HelloError::Malformed(
                "data after the ClientHello in its record",
            ));
        }
        if available < len {
            // Decided only once the record is whole, so a longer prefix never changes the answer.
            return Ok(None);
        }
        at = start + len;
        if body_len.is_some_and(|n| message.len() == 4 + n) {
            return Ok(Some((message.split_off(4), at)));
        }
    }
}

/// The body length a handshake message's 4-byte header announces (type, then a 24-bit length),
/// for a ClientHello that fits in [`MAX_HELLO`].
fn hello_body_len(header: [u8; 4]) -> Result<usize, HelloError> {
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    let n = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
    if 4 + n > MAX_HELLO {
        return Err(HelloError::TooLarge);
    }
    Ok(n)
}

/// Parses a ClientHello handshake message with no TLS records around it, as QUIC carries it in
/// its CRYPTO frames (RFC 9001 4.1.3): the 4-byte handshake header, then the body. `Ok(None)`
/// while `message` is shorter than its header says; bytes past the message are not looked at
/// (QUIC's caller hands over the contiguous start of the CRYPTO stream, which a client ends with
/// its hello). Pure, and a longer prefix never turns an answer or an error into another.
pub fn parse_message(message: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    let Some(header) = message.first_chunk::<4>() else {
        return Ok(None);
    };
    let n = hello_body_len(*header)?;
    match message.get(4..4 + n) {
        Some(body) => client_hello(body).map(Some),
        None => Ok(None),
    }
}

/// A cursor over a ClientHello's body that fails, naming the field, instead of reading past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The fields of a ClientHello body (RFC 8446 4.1.2; TLS 1.0 to 1.3 share the layout).
fn client_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { buf: body };
    let version = r.take(2, "truncated before its version")?;
    if version[0] != 3 {
        return Err(HelloError::Malformed("client version is not TLS"));
    }
    r.take(32, "truncated in its random")?;
    let session_id = r.vec8("truncated in its session id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated in its cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suite list empty or odd"));
    }
    let compression = r.vec8("truncated in its compression methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        // TLS 1.2 and before may end here: no extensions, so no name and no protocols.
        return Ok(hello);
    }
    let mut extensions = Reader {
        buf: r.vec16("truncated in its extensions")?,
    };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after its extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("truncated in an extension's type")?;
        let data = extensions.vec16("truncated in an extension")?;
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("an extension sent twice"));
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.sni = server_name(data)?,
            EXT_ALPN => hello.alpn = alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

/// The server_name extension (RFC 6066 3): the first `host_name` entry, if any.
fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16("truncated server name list")?,
    };
    if !outer.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    let mut name = None;
    while !list.is_empty() {
        let kind = list.u8("truncated server name type")?;
        let value = list.vec16("truncated server name")?;
        if kind != 0 || name.is_some() {
            // Other name types are undefined; a second host_name is forbidden: ignore both rather
            // than guess, as servers do.
            continue;
        }
        if value.is_empty() || value.len() > 255 {
            return Err(HelloError::Malformed(
                "server name empty or longer than 255 bytes",
            ));
        }
        if !value.iter().all(|b| b.is_ascii_graphic()) {
            return Err(HelloError::Malformed("server name is not printable ASCII"));
        }
        // Checked ASCII just above, so this cannot fail.
        name = std::str::from_utf8(value).ok().map(str::to_string);
    }
    Ok(name)
}

/// The ALPN extension (RFC 7301 3.1): the protocol names, in order.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16("truncated ALPN list")?,
    };
    if !outer.is_empty() {
        return Err(HelloError::Malformed("bytes after the ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let p = list.vec8("truncated ALPN protocol")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol name"));
        }
        protocols.push(p.to_vec());
    }
    if protocols.is_empty() {
        return Err(HelloError::Malformed("empty ALPN list"));
    }
    Ok(protocols)
}

/// Builds ClientHello bytes: for the tests here, the fuzz targets and the integration tests (which
/// also use real TLS clients).
pub mod build {
    /// A ClientHello with this name and these protocols, in one record.
    pub fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            push_ext(&mut ext, 0, &list);
        }
        if !alpn.is_empty() {
            let mut protos = Vec::new();
            for p in alpn {
                protos.push(p.len() as u8);
                protos.extend_from_slice(p.as_bytes());
            }
            let mut list = (protos.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&protos);
            push_ext(&mut ext, 16, &list);
        }
        // supported_versions: TLS 1.3 and 1.2, as a real client sends it.
        push_ext(&mut ext, 43, &[4, 3, 4, 3, 3]);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // no session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, usize::MAX)
    }

    /// `handshake` cut into handshake records of at most `size` bytes each.
    pub fn records(handshake: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in handshake.chunks(size.clamp(1, 1 << 14)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::build::{client_hello, records};
    use super::{parse, parse_message, ClientHello, HelloError, Parsed, MAX_HELLO};

    fn hello(sni: Option<&str>, alpn: &[&str]) -> ClientHello {
        ClientHello {
            sni: sni.map(str::to_string),
            alpn: alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn a_whole_hello_gives_its_name_and_protocols() {
        let bytes = client_hello(Some("a.example.com"), &["h2", "http/1.1"]);
        assert_eq!(
            parse(&bytes),
            Ok(Parsed::Hello {
                hello: hello(Some("a.example.com"), &["h2", "http/1.1"]),
                len: bytes.len()
            })
        );
        let bare = client_hello(None, &[]);
        assert_eq!(
            parse(&bare),
            Ok(Parsed::Hello {
                hello: hello(None, &[]),
                len: bare.len()
            })
        );
    }

    #[test]
    fn every_prefix_is_incomplete_and_the_whole_is_the_same_in_any_records() {
        let one = client_hello(Some("x.b.example"), &["acme-tls/1"]);
        let handshake = one[5..].to_vec();
        for size in [1, 7, 100, 1 << 14] {
            let bytes = records(&handshake, size);
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..cut]),
                    Ok(Parsed::Incomplete),
                    "records of {size}, cut at {cut}"
                );
            }
            match parse(&bytes) {
                Ok(Parsed::Hello { hello: h, len }) => {
                    assert_eq!(h, hello(Some("x.b.example"), &["acme-tls/1"]));
                    assert_eq!(len, bytes.len());
                }
                other => panic!("records of {size}: {other:?}"),
            }
            // What follows the hello (early data, pipelined bytes) is not part of it.
            let mut more = bytes.clone();
            more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
            assert!(matches!(parse(&more), Ok(Parsed::Hello { len, .. }) if len == bytes.len()));
        }
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for first in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-x",
            b"\x16\x01",
            b"PROXY TCP4",
        ] {
            assert_eq!(parse(first), Ok(Parsed::NotTls), "{first:?}");
        }
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\x16"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn malformed_hellos_say_what_was_wrong() {
        let good = client_hello(Some("a.example"), &["h2"]);
        let mut server_hello = good.clone();
        server_hello[5] = 2;
        assert!(matches!(
            parse(&server_hello),
            Err(HelloError::Malformed(_))
        ));
        let mut alert_inside = records(&good[5..], 20);
        alert_inside[25] = 21; // the second record's type
        assert!(matches!(
            parse(&alert_inside),
            Err(HelloError::Malformed(_))
        ));
        let mut long_name = client_hello(Some(&"a".repeat(256)), &[]);
        assert!(matches!(parse(&long_name), Err(HelloError::Malformed(_))));
        long_name = client_hello(Some("bad\u{7f}name"), &[]);
        assert!(matches!(parse(&long_name), Err(HelloError::Malformed(_))));
        // A body length that runs past its record and the message's own length that disagree.
        let mut short_len = good.clone();
        short_len[8] -= 1; // the handshake length, one less than the body
        assert!(matches!(parse(&short_len), Err(HelloError::Malformed(_))));
        let mut empty_record = good.clone();
        empty_record[3] = 0;
        empty_record[4] = 0;
        assert!(matches!(
            parse(&empty_record),
            Err(HelloError::Malformed(_))
        ));
    }

    #[test]
    fn a_hello_larger_than_the_limit_is_refused_before_it_is_read_whole() {
        // A handshake that says it is 20 KiB: refused as soon as its header is in.
        let mut huge = vec![22, 3, 1, 0x40, 0x00, 1, 0, 0x50, 0x00];
        huge.resize(64, 0);
        assert_eq!(parse(&huge), Err(HelloError::TooLarge));
        // Many small records whose headers push the total past the limit.
        let hs = client_hello(Some(&"n".repeat(200)), &[])[5..].to_vec();
        let mut padded = hs.clone();
        padded.resize(MAX_HELLO - 1000, 0);
        let len = (padded.len() - 4) as u32;
        padded[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        let bytes = records(&padded, 4);
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
    }

    #[test]
    fn a_bare_handshake_message_reads_as_its_records_do() {
        let bytes = client_hello(Some("q.example"), &["h3"]);
        let message = &bytes[5..];
        for cut in 0..message.len() {
            assert_eq!(parse_message(&message[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse_message(message),
            Ok(Some(hello(Some("q.example"), &["h3"])))
        );
        // What follows the message is not read.
        let mut more = message.to_vec();
        more.extend_from_slice(&[0xff; 8]);
        assert_eq!(
            parse_message(&more),
            Ok(Some(hello(Some("q.example"), &["h3"])))
        );
        let mut server_hello = message.to_vec();
        server_hello[0] = 2;
        assert!(matches!(
            parse_message(&server_hello),
            Err(HelloError::Malformed(_))
        ));
        assert_eq!(
            parse_message(&[1, 0, 0x40, 0]),
            Err(HelloError::TooLarge),
            "16 KiB of body and its header are more than MAX_HELLO"
        );
    }
}
