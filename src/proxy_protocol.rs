//! The PROXY protocol (HAProxy's spec, versions 1 and 2, TCP over IPv4 and IPv6): the header a
//! balancer sends before a connection's first byte to say whose connection it is.
//!
//! [`parse`] and [`encode`] are pure (and fuzzed: `tests/it/fuzz.rs`); [`read`] takes a header off an
//! accepted socket without consuming a byte past it, so what follows reaches the backend untouched.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;

/// The twelve bytes every version 2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most 107 bytes, CRLF included (the spec's worst case, TCP6 with full
/// addresses and ports).
const V1_MAX: usize = 107;
/// The smallest header of either version: `PROXY UNKNOWN\r\n`. Reading this many bytes first can
/// never take a byte past a header.
const MIN_HEADER: usize = 15;
/// Bytes of TLVs and addresses accepted after a version 2 header's first 16. The spec allows 64 KiB;
/// what real senders put there (addresses, a few TLVs) is far below this, and the bound keeps a
/// header from holding 64 KiB per connection.
pub(crate) const V2_MAX_PAYLOAD: usize = 4096;
/// The longest header [`parse`] accepts (version 2 with the most payload; a version 1 line is
/// shorter): it decides on every input by this many bytes.
pub(crate) const MAX_HEADER: usize = 16 + V2_MAX_PAYLOAD;

/// What a header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A connection relayed for `client`, who reached `dst`.
    Proxy { client: SocketAddr, dst: SocketAddr },
    /// The sender's own connection (a health check) or an unknown protocol: use the real endpoints.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Neither `PROXY ` nor the version 2 signature.
    NotAHeader,
    /// Version 1: no CRLF within 107 bytes.
    TooLong,
    /// Version 1: a field is wrong (which, and why).
    V1(&'static str),
    /// Version 2: a field is wrong.
    V2(&'static str),
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::NotAHeader => f.write_str("no PROXY protocol header"),
            Malformed::TooLong => f.write_str("version 1 header without CRLF within 107 bytes"),
            Malformed::V1(why) => write!(f, "malformed version 1 header: {why}"),
            Malformed::V2(why) => write!(f, "malformed version 2 header: {why}"),
        }
    }
}

/// The result of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, `len` bytes long.
    Done(Header, usize),
    /// A valid beginning; at least `more` further bytes belong to the header.
    Incomplete {
        more: usize,
    },
    Malformed(Malformed),
}

/// Parses a header at the start of `buf`. Never reads past the header, never panics, allocates
/// nothing.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < MIN_HEADER {
        let n = buf.len();
        let v1 = b"PROXY ".starts_with(&buf[..n.min(6)]);
        let v2 = V2_SIGNATURE.starts_with(&buf[..n.min(12)]);
        return if v1 || v2 {
            Parsed::Incomplete {
                more: MIN_HEADER - n,
            }
        } else {
            Parsed::Malformed(Malformed::NotAHeader)
        };
    }
    if buf.starts_with(b"PROXY ") {
        parse_v1(buf)
    } else if buf.starts_with(&V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        Parsed::Malformed(Malformed::NotAHeader)
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Parsed::Malformed(Malformed::TooLong)
        } else {
            // The line goes on; at least one more byte (the LF) is the header's.
            Parsed::Incomplete { more: 1 }
        };
    };
    let bad = |why| Parsed::Malformed(Malformed::V1(why));
    if lf == 0 || window[lf - 1] != b'\r' {
        return bad("the line must end with CRLF");
    }
    let raw = &window[6..lf - 1];
    // The spec's line is US-ASCII; anything else cannot be an address or port.
    let (true, Ok(line)) = (raw.is_ascii(), std::str::from_utf8(raw)) else {
        return bad("not ASCII");
    };
    let len = lf + 1;
    let mut fields = line.split(' ');
    match fields.next() {
        // Whatever follows UNKNOWN is ignored (the spec's own words).
        Some("UNKNOWN") => Parsed::Done(Header::Local, len),
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v6 = proto == "TCP6";
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return bad(
                    "expected: PROXY TCP4|TCP6 source destination source-port destination-port",
                );
            };
            let ip = |s: &str| -> Option<IpAddr> {
                if v6 {
                    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                } else {
                    s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                }
            };
            let (Some(src), Some(dst)) = (ip(src), ip(dst)) else {
                return bad("an address is not of the family the line names");
            };
            let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
                return bad("a port is not a number from 0 to 65535 without leading zeros");
            };
            Parsed::Done(
                Header::Proxy {
                    client: SocketAddr::new(src, sport),
                    dst: SocketAddr::new(dst, dport),
                },
                len,
            )
        }
        _ => bad("the protocol must be TCP4, TCP6 or UNKNOWN"),
    }
}

/// A decimal port as the spec writes it: digits only, no leading zero (except "0" itself).
fn port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete {
            more: 16 - buf.len(),
        };
    }
    let bad = |why| Parsed::Malformed(Malformed::V2(why));
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return bad("version must be 2");
    }
    let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if payload > V2_MAX_PAYLOAD {
        return bad("longer than 4096 bytes after the first 16");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return bad("command must be LOCAL or PROXY"),
    };
    if buf.len() < 16 + payload {
        return Parsed::Incomplete {
            more: 16 + payload - buf.len(),
        };
    }
    let len = 16 + payload;
    if local {
        // A LOCAL header's address block is ignored, whatever family it names.
        return Parsed::Done(Header::Local, len);
    }
    let block = &buf[16..len];
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return bad("unknown address family or transport");
    }
    let header = match (family, transport) {
        // UNSPEC, UNIX or datagrams: nothing sluicegate can use; the real endpoints stand.
        (0, _) | (3, _) | (_, 0) | (_, 2) => Header::Local,
        (1, 1) => {
            if block.len() < 12 {
                return bad("an IPv4 address block is 12 bytes");
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[o],
                    block[o + 1],
                    block[o + 2],
                    block[o + 3],
                ))
            };
            let p = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Header::Proxy {
                client: SocketAddr::new(ip(0), p(8)),
                dst: SocketAddr::new(ip(4), p(10)),
            }
        }
        (2, 1) => {
            if block.len() < 36 {
                return bad("an IPv6 address block is 36 bytes");
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&block[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let p = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Header::Proxy {
                client: SocketAddr::new(ip(0), p(32)),
                dst: SocketAddr::new(ip(16), p(34)),
            }
        }
        _ => Header::Local,
    };
    Parsed::Done(header, len)
}

/// An IPv4 address carried in IPv6 (`::ffff:a.b.c.d`, how a dual-stack socket sees an IPv4 client)
/// becomes plain IPv4, so both ends of a header can share a family.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Both ends in one family: IPv4 when both can be, else IPv6 (an IPv4 end mapped into it).
fn same_family(client: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (c, d) = (unmap(client), unmap(dst));
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if c.is_ipv4() && d.is_ipv4() {
        (c, d)
    } else {
        (v6(c), v6(d))
    }
}

/// The header announcing that `client` reached `dst`.
pub fn encode(version: ProxyVersion, client: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    encode_with(version, client, dst, &Tls::default())
}

/// What a version 2 header says about the client's TLS, as HAProxy's `send-proxy-v2-ssl-cn` says
/// it (proxy-protocol.txt 2.2.5 and 2.2.6): an SSL TLV when the balancer terminated TLS, with the
/// version and the client certificate's common name, and the server name and protocol the client
/// asked for (AUTHORITY, ALPN), which a balancer passing TLS through knows too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// The balancer terminated the client's TLS with this version (`TLSv1.3`).
    pub version: Option<&'static str>,
    /// The client presented a certificate (verified: the handshake succeeded).
    pub client_cert: bool,
    /// Its subject's common name.
    pub client_cn: Option<String>,
    /// The server name (SNI) it asked for.
    pub authority: Option<String>,
    /// The protocol agreed (or, passed through, the first one offered).
    pub alpn: Option<Vec<u8>>,
}

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// A TLV: type, 2-byte length, value (values longer than 64 KiB - 1 are cut; none here come close).
fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let v = &value[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

/// The TLVs of `tls`, in the order HAProxy writes them.
fn tls_tlvs(tls: &Tls) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(p) = &tls.alpn {
        tlv(&mut out, PP2_TYPE_ALPN, p);
    }
    if let Some(a) = &tls.authority {
        tlv(&mut out, PP2_TYPE_AUTHORITY, a.as_bytes());
    }
    if let Some(version) = tls.version {
        let mut ssl = vec![PP2_CLIENT_SSL];
        if tls.client_cert {
            ssl[0] |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
        }
        // verify: 0, the certificate (if any) was verified.
        ssl.extend_from_slice(&0u32.to_be_bytes());
        tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version.as_bytes());
        if let Some(cn) = &tls.client_cn {
            tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
        }
        tlv(&mut out, PP2_TYPE_SSL, &ssl);
    }
    out
}

/// A header naming `client` and the address it reached; version 2 also carries `tls`'s TLVs
/// (version 1 has no room for them).
pub fn encode_with(
    version: ProxyVersion,
    client: SocketAddr,
    dst: SocketAddr,
    tls: &Tls,
) -> Vec<u8> {
    let (c, d) = same_family(client, dst);
    match version {
        ProxyVersion::V1 => {
            let proto = if c.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                c.ip(),
                d.ip(),
                c.port(),
                d.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => encode_v2(c, d, &tls_tlvs(tls), STREAM),
    }
}

/// The transport nibble of a version 2 header's family byte.
const STREAM: u8 = 0x1;
const DGRAM: u8 = 0x2;

/// A version 2 header for one datagram of a UDP session: `client` sent it to `dst` (`DGRAM` over
/// INET or INET6, no TLVs).
pub fn encode_dgram(client: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (c, d) = same_family(client, dst);
    encode_v2(c, d, &[], DGRAM)
}

fn encode_v2(c: SocketAddr, d: SocketAddr, tlvs: &[u8], transport: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36 + tlvs.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (c.ip(), d.ip()) {
        (IpAddr::V4(ci), IpAddr::V4(di)) => {
            out.push(0x10 | transport); // AF_INET
            out.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&ci.octets());
            out.extend_from_slice(&di.octets());
        }
        (ci, di) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            out.push(0x20 | transport); // AF_INET6
            out.extend_from_slice(&((36 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&v6(ci));
            out.extend_from_slice(&v6(di));
        }
    }
    out.extend_from_slice(&c.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out.extend_from_slice(tlvs);
    out
}

/// Why no header could be read.
#[derive(Debug)]
pub enum ReadError {
    Malformed(Malformed),
    /// The client closed before a whole header arrived.
    Truncated(usize),
    TimedOut,
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Malformed(m) => m.fmt(f),
            ReadError::Truncated(n) => write!(f, "closed after {n} bytes of a PROXY header"),
            ReadError::TimedOut => f.write_str("no whole PROXY header within accept_proxy.timeout"),
            ReadError::Io(e) => write!(f, "reading the PROXY header: {e}"),
        }
    }
}

/// Reads one header from `stream` within `limit`, taking exactly its bytes.
pub(crate) async fn read(stream: &mut TcpStream, limit: Duration) -> Result<Header, ReadError> {
    match tokio::time::timeout(limit, read_exactly_the_header(stream)).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::TimedOut),
    }
}

async fn read_exactly_the_header(stream: &mut TcpStream) -> Result<Header, ReadError> {
    let mut got: Vec<u8> = Vec::with_capacity(V1_MAX);
    let mut scratch = [0u8; V1_MAX];
    loop {
        let more = match parse(&got) {
            Parsed::Done(h, _) => return Ok(h),
            Parsed::Malformed(m) => return Err(ReadError::Malformed(m)),
            Parsed::Incomplete { more } => more,
        };
        let take = if got.starts_with(b"PROXY ") {
            // A version 1 line's length shows only at its LF: look at what has arrived and take
            // up to the first LF, or all of it when none is there yet (every byte before the LF is
            // the header's). Once everything that arrived is taken, peek waits for more.
            let room = V1_MAX - got.len();
            let n = stream
                .peek(&mut scratch[..room])
                .await
                .map_err(ReadError::Io)?;
            if n == 0 {
                return Err(ReadError::Truncated(got.len()));
            }
            scratch[..n]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(n, |lf| lf + 1)
        } else {
            more
        };
        let start = got.len();
        got.resize(start + take, 0);
        match stream.read_exact(&mut got[start..]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ReadError::Truncated(start))
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_examples_from_the_spec() {
        let h = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
        assert_eq!(
            parse(h),
            Parsed::Done(
                Header::Proxy {
                    client: sa("192.168.0.1:56324"),
                    dst: sa("192.168.0.11:443")
                },
                h.len() - 5
            )
        );
        let h = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(matches!(parse(h), Parsed::Malformed(Malformed::V1(_))));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Done(Header::Local, 15));
        let h = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(h), Parsed::Done(Header::Local, h.len()));
    }

    #[test]
    fn v1_refusals_name_the_field() {
        for (line, why) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "family"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "family"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "expected"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4"),
        ] {
            match parse(line) {
                Parsed::Malformed(Malformed::V1(w)) => assert!(w.contains(why), "{line:?}: {w}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Parsed::Malformed(Malformed::TooLong));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parsed::Malformed(Malformed::NotAHeader)
        );
    }

    #[test]
    fn incomplete_never_asks_past_the_header() {
        let h = encode(
            ProxyVersion::V2,
            sa("[2001:db8::1]:5"),
            sa("[2001:db8::2]:6"),
        );
        for n in 0..h.len() {
            match parse(&h[..n]) {
                Parsed::Incomplete { more } => assert!(n + more <= h.len(), "at {n}: {more}"),
                other => panic!("at {n}: {other:?}"),
            }
        }
        let v1 = encode(ProxyVersion::V1, sa("1.2.3.4:5"), sa("5.6.7.8:6"));
        for n in 0..v1.len() {
            match parse(&v1[..n]) {
                Parsed::Incomplete { more } => assert!(n + more <= v1.len(), "at {n}: {more}"),
                other => panic!("at {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn both_versions_round_trip_for_both_families() {
        for (c, d) in [
            ("192.0.2.1:40000", "198.51.100.2:443"),
            ("[2001:db8::7]:1", "[2001:db8::8]:65535"),
            ("[::ffff:192.0.2.1]:9", "192.0.2.9:80"),
            ("192.0.2.1:9", "[2001:db8::8]:80"),
        ] {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let bytes = encode(v, sa(c), sa(d));
                let Parsed::Done(Header::Proxy { client, dst }, n) = parse(&bytes) else {
                    panic!("{v:?} {c} {d}")
                };
                assert_eq!(n, bytes.len());
                let (ec, ed) = same_family(sa(c), sa(d));
                assert_eq!((client, dst), (ec, ed), "{v:?} {c} {d}");
            }
        }
    }

    #[test]
    fn v2_local_unspec_and_tlvs() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Parsed::Done(Header::Local, 16));
        // A PROXY header with TLVs after the addresses: the TLVs are skipped.
        let mut h = encode(ProxyVersion::V2, sa("192.0.2.1:1"), sa("192.0.2.2:2"));
        h[15] += 5;
        h.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']);
        assert!(matches!(parse(&h), Parsed::Done(Header::Proxy { .. }, n) if n == h.len()));
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(
            matches!(parse(&bad), Parsed::Malformed(Malformed::V2(w)) if w.contains("12 bytes"))
        );
        let mut cmd = V2_SIGNATURE.to_vec();
        cmd.extend_from_slice(&[0x22, 0x11, 0, 0]);
        assert!(matches!(parse(&cmd), Parsed::Malformed(Malformed::V2(_))));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&big), Parsed::Malformed(Malformed::V2(_))));
    }

    #[test]
    fn v2_carries_the_tls_tlvs_as_haproxy_writes_them() {
        let tls = Tls {
            version: Some("TLSv1.3"),
            client_cert: true,
            client_cn: Some("alice".into()),
            authority: Some("a.example".into()),
            alpn: Some(b"h2".to_vec()),
        };
        let h = encode_with(
            ProxyVersion::V2,
            sa("192.0.2.1:1000"),
            sa("192.0.2.2:443"),
            &tls,
        );
        // Our own parser reads the addresses and skips the TLVs.
        assert_eq!(
            parse(&h),
            Parsed::Done(
                Header::Proxy {
                    client: sa("192.0.2.1:1000"),
                    dst: sa("192.0.2.2:443")
                },
                h.len()
            )
        );
        let tlvs = &h[16 + 12..];
        let expected: Vec<u8> = [
            &[0x01, 0, 2][..],
            b"h2",
            &[0x02, 0, 9],
            b"a.example",
            // PP2_TYPE_SSL: 5 + (3 + 7) + (3 + 5) bytes: client bits, verify 0, version, CN.
            &[0x20, 0, 23, 0x07, 0, 0, 0, 0, 0x21, 0, 7],
            b"TLSv1.3",
            &[0x22, 0, 5],
            b"alice",
        ]
        .concat();
        assert_eq!(tlvs, &expected[..]);
        // Version 1 has no room for them; without TLS facts version 2 is as before.
        assert_eq!(
            encode_with(ProxyVersion::V1, sa("192.0.2.1:1"), sa("192.0.2.2:2"), &tls),
            encode(ProxyVersion::V1, sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        );
        let plain = encode(ProxyVersion::V2, sa("192.0.2.1:1"), sa("192.0.2.2:2"));
        assert_eq!(plain.len(), 16 + 12);
    }
}
