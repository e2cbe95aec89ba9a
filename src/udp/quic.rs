//! QUIC read for routing: the server name (SNI) and protocols (ALPN) of a client's ClientHello,
//! taken out of its Initial packets, as TLS passthrough reads them from a TCP stream. Pure: no
//! socket, no clock; the balancer never holds a key of the backend (the Initial keys are derived
//! from what is on the wire, RFC 9001 5.2, and anyone on the path can derive them).
//!
//! The listen loop reads a new client's Initials through [`super::pending`] to route it, and
//! connection IDs through [`super::follow`] to follow it.
//!
//! - [`parse_long_header`] reads one long-header packet (RFC 9000 17.2; the v2 packet types of
//!   RFC 9369 3.2), [`long_packets`] every packet coalesced in a datagram (RFC 9000 12.2), and
//!   [`version`], [`is_long_header`] and [`short_header_dcid`] classify a datagram without more.
//! - [`InitialReader`] follows one candidate connection: it derives the client's Initial keys
//!   (versions 1 and 2) from the Destination Connection ID of the client's first Initial, removes
//!   header protection (RFC 9001 5.4), decrypts, reads the frames an Initial may hold (PADDING,
//!   PING, ACK, CRYPTO; RFC 9000 12.4), reassembles the CRYPTO stream by offset across packets and
//!   datagrams, and hands the ClientHello to the parser the TCP routes use
//!   ([`crate::tls::hello::parse_message`]).
//!
//! Bounds, per reader: the CRYPTO stream is read to [`MAX_CRYPTO`] bytes (16 KiB, as for TCP; a
//! frame reaching past it fails the reader with [`QuicError::CryptoTooLarge`]); the bytes received
//! are kept as at most [`MAX_FRAGMENTS`] disjoint ranges (one more gap fails the reader with
//! [`QuicError::TooFragmented`]); at most [`MAX_PACKETS`] Initial packets are decrypted
//! ([`QuicError::TooManyPackets`]). A reader is at most 16 KiB and a few hundred bytes; how many
//! readers there are is the wiring step's table to bound.
//!
//! What fails a reader for good and what does not: a datagram that does not parse, is another
//! connection's, or does not decrypt is refused with its error and changes nothing (anyone can
//! send a datagram from the client's address). Once a packet has decrypted, its content is the
//! client's own: a frame an Initial may not hold, CRYPTO data that contradicts what came before, a
//! bound crossed or a malformed ClientHello fails the reader, and every later `push` returns that
//! error.

use std::fmt;

use rustls::quic::{DirectionalKeys, Keys};
use rustls::Side;

use crate::tls::hello::{self, HelloError, MAX_HELLO};
use crate::tls::ClientHello;

/// QUIC version 1 (RFC 9000).
pub(crate) const VERSION_1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369).
pub(crate) const VERSION_2: u32 = 0x6b33_43cf;
/// The longest connection ID versions 1 and 2 allow (RFC 9000 17.2).
pub(crate) const MAX_CID_LEN: usize = 20;
/// The shortest Destination Connection ID a client may choose for its first Initial (RFC 9000 7.2).
pub(crate) const MIN_INITIAL_DCID_LEN: usize = 8;
/// The most CRYPTO stream bytes read for the ClientHello: the limit the TCP hello has.
pub(crate) const MAX_CRYPTO: usize = MAX_HELLO;
/// The most disjoint ranges of the CRYPTO stream kept while it has gaps.
pub(crate) const MAX_FRAGMENTS: usize = 32;
/// The most Initial packets a reader decrypts (a 16 KiB hello takes about 14).
pub(crate) const MAX_PACKETS: u32 = 64;

const LONG_FORM: u8 = 0x80;
/// The reserved bits of a long header's first byte, zero once protection is removed.
const LONG_RESERVED: u8 = 0x0c;
/// The packet number is sampled past as if it were 4 bytes long (RFC 9001 5.4.2).
const MAX_PN_LEN: usize = 4;
const MAX_VARINT: u64 = (1 << 62) - 1;

const FRAME_PADDING: u64 = 0x00;
const FRAME_PING: u64 = 0x01;
const FRAME_ACK: u64 = 0x02;
const FRAME_ACK_ECN: u64 = 0x03;
const FRAME_CRYPTO: u64 = 0x06;
const FRAME_CONNECTION_CLOSE: u64 = 0x1c;

/// A QUIC version this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

impl Version {
    /// The version a long header carries: 0 is a Version Negotiation packet (sent by servers only).
    pub(crate) fn from_wire(v: u32) -> Result<Version, QuicError> {
        match v {
            VERSION_1 => Ok(Version::V1),
            VERSION_2 => Ok(Version::V2),
            0 => Err(QuicError::VersionNegotiation),
            v => Err(QuicError::UnsupportedVersion(v)),
        }
    }

    /// As the routing log names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Version::V1 => "1",
            Version::V2 => "2",
        }
    }

    #[cfg(test)]
    pub(crate) fn wire(self) -> u32 {
        match self {
            Version::V1 => VERSION_1,
            Version::V2 => VERSION_2,
        }
    }

    /// The type of a long-header packet from the two type bits of its first byte (RFC 9000 17.2,
    /// RFC 9369 3.2: v2 rotates them).
    fn packet_type(self, first: u8) -> PacketType {
        match (self, (first >> 4) & 0x03) {
            (Version::V1, 0) | (Version::V2, 1) => PacketType::Initial,
            (Version::V1, 1) | (Version::V2, 2) => PacketType::ZeroRtt,
            (Version::V1, 2) | (Version::V2, 3) => PacketType::Handshake,
            _ => PacketType::Retry,
        }
    }

    fn keys(self) -> rustls::quic::Version {
        match self {
            Version::V1 => rustls::quic::Version::V1,
            Version::V2 => rustls::quic::Version::V2,
        }
    }
}

/// The type of a long-header packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PacketType::Initial => "Initial",
            PacketType::ZeroRtt => "0-RTT",
            PacketType::Handshake => "Handshake",
            PacketType::Retry => "Retry",
        })
    }
}

/// Why a datagram is not a client Initial this module can read, or why a connection's Initials do
/// not give a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QuicError {
    /// An empty datagram.
    Empty,
    /// A short-header packet where a long header was needed.
    NotLongHeader,
    /// A Version Negotiation packet (version 0): servers send them, clients do not.
    VersionNegotiation,
    /// A version other than 1 and 2.
    UnsupportedVersion(u32),
    /// A connection ID longer than 20 bytes.
    CidTooLong(usize),
    /// The packet ends inside this field.
    Truncated(&'static str),
    /// The connection's first packet is not an Initial.
    NotInitial(PacketType),
    /// The Destination Connection ID of a client's first Initial (with no token) is shorter than 8
    /// bytes.
    InitialCidTooShort(usize),
    /// A datagram whose first packet has another version or Destination Connection ID than the
    /// connection being read.
    OtherConnection,
    /// Header protection or the payload does not decrypt with the Initial keys of its DCID.
    Decrypt,
    /// Reserved header bits not zero once protection is removed.
    ReservedBits,
    /// A packet with no frames.
    NoFrames,
    /// A frame type a client Initial may not carry.
    FrameNotAllowed(u64),
    /// The client closed the connection (CONNECTION_CLOSE in an Initial).
    ClientClosed,
    /// CRYPTO data past [`MAX_CRYPTO`] bytes of the stream.
    CryptoTooLarge,
    /// The CRYPTO data received has more than [`MAX_FRAGMENTS`] gaps.
    TooFragmented,
    /// CRYPTO data sent again with other bytes than the first time.
    CryptoConflict,
    /// More than [`MAX_PACKETS`] Initial packets without a whole ClientHello.
    TooManyPackets,
    /// The reassembled handshake is not a ClientHello that can be routed.
    Hello(HelloError),
    /// The crypto provider has no QUIC Initial suite (cannot happen with `ring`).
    NoInitialSuite,
}

impl fmt::Display for QuicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuicError::Empty => write!(f, "empty datagram"),
            QuicError::NotLongHeader => write!(f, "a short-header packet, not a long header"),
            QuicError::VersionNegotiation => write!(f, "a Version Negotiation packet"),
            QuicError::UnsupportedVersion(v) => write!(f, "unsupported QUIC version {v:#010x}"),
            QuicError::CidTooLong(n) => {
                write!(f, "connection ID of {n} bytes (at most {MAX_CID_LEN})")
            }
            QuicError::Truncated(what) => write!(f, "packet truncated in {what}"),
            QuicError::NotInitial(t) => write!(f, "a {t} packet where an Initial was expected"),
            QuicError::InitialCidTooShort(n) => write!(
                f,
                "Initial destination connection ID of {n} bytes (at least {MIN_INITIAL_DCID_LEN})"
            ),
            QuicError::OtherConnection => {
                write!(f, "a packet of another version or connection ID")
            }
            QuicError::Decrypt => write!(f, "does not decrypt with the Initial keys"),
            QuicError::ReservedBits => write!(f, "reserved header bits set"),
            QuicError::NoFrames => write!(f, "a packet with no frames"),
            QuicError::FrameNotAllowed(t) => {
                write!(f, "frame type {t:#x} is not allowed in an Initial")
            }
            QuicError::ClientClosed => write!(f, "the client closed the connection"),
            QuicError::CryptoTooLarge => {
                write!(f, "CRYPTO data past {MAX_CRYPTO} bytes of the stream")
            }
            QuicError::TooFragmented => {
                write!(f, "CRYPTO data in more than {MAX_FRAGMENTS} pieces")
            }
            QuicError::CryptoConflict => write!(f, "CRYPTO data sent again with other bytes"),
            QuicError::TooManyPackets => write!(
                f,
                "more than {MAX_PACKETS} Initial packets without a whole ClientHello"
            ),
            QuicError::Hello(e) => write!(f, "in the Initial CRYPTO data: {e}"),
            QuicError::NoInitialSuite => write!(f, "no QUIC Initial cipher suite"),
        }
    }
}

impl std::error::Error for QuicError {}

/// One long-header packet as its unprotected fields read (RFC 9000 17.2). Offsets count from the
/// packet's first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LongHeader<'a> {
    pub(crate) version: Version,
    pub(crate) packet_type: PacketType,
    pub(crate) dcid: &'a [u8],
    pub(crate) scid: &'a [u8],
    /// An Initial's token (empty when it has none, and for the other types).
    pub(crate) token: &'a [u8],
    /// The Length field: the packet number and the protected payload, in bytes. A Retry has no
    /// Length: the rest of the datagram.
    pub(crate) length: usize,
    /// Where the packet number starts (a Retry has none: where its token starts).
    pub(crate) pn_offset: usize,
    /// The bytes this packet takes (`pn_offset + length`): the next coalesced packet starts here.
    pub(crate) packet_len: usize,
}

/// A cursor that fails, naming the field, instead of reading past the end.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, at: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], QuicError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(QuicError::Truncated(what))?;
        let taken = &self.buf[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, QuicError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, QuicError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable-length integer (RFC 9000 16).
    fn varint(&mut self, what: &'static str) -> Result<u64, QuicError> {
        let first = self.u8(what)?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.take(len - 1, what)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    /// A length as a `usize` (one no datagram can hold becomes `usize::MAX`, which `take` refuses).
    fn varint_len(&mut self, what: &'static str) -> Result<usize, QuicError> {
        Ok(usize::try_from(self.varint(what)?).unwrap_or(usize::MAX))
    }

    fn is_empty(&self) -> bool {
        self.at >= self.buf.len()
    }
}

/// Whether a datagram starts with a long-header packet.
pub(crate) fn is_long_header(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & LONG_FORM != 0)
}

/// The version of the long-header packet a datagram starts with.
pub(crate) fn version(datagram: &[u8]) -> Result<Version, QuicError> {
    let mut c = Cursor::new(datagram);
    let first = c.u8("its first byte").map_err(|_| QuicError::Empty)?;
    if first & LONG_FORM == 0 {
        return Err(QuicError::NotLongHeader);
    }
    Version::from_wire(c.u32("its version")?)
}

/// The Destination Connection ID of a short-header packet, whose length the receiver chose and
/// the packet does not say (RFC 9000 17.3): `None` for a long header, a length over 20 or a
/// datagram too short for it.
pub(crate) fn short_header_dcid(datagram: &[u8], cid_len: usize) -> Option<&[u8]> {
    let first = *datagram.first()?;
    if first & LONG_FORM != 0 || cid_len > MAX_CID_LEN {
        return None;
    }
    datagram.get(1..1 + cid_len)
}

/// Reads the long-header packet a datagram (or what is left of it after coalesced packets)
/// starts with. The fixed bit is not checked (RFC 9287 lets it be greased).
pub(crate) fn parse_long_header(datagram: &[u8]) -> Result<LongHeader<'_>, QuicError> {
    let mut c = Cursor::new(datagram);
    let first = c.u8("its first byte").map_err(|_| QuicError::Empty)?;
    if first & LONG_FORM == 0 {
        return Err(QuicError::NotLongHeader);
    }
    let version = Version::from_wire(c.u32("its version")?)?;
    let packet_type = version.packet_type(first);
    let dcid = cid(&mut c, "its destination connection ID")?;
    let scid = cid(&mut c, "its source connection ID")?;
    if packet_type == PacketType::Retry {
        let at = c.at;
        return Ok(LongHeader {
            version,
            packet_type,
            dcid,
            scid,
            token: &[],
            length: datagram.len() - at,
            pn_offset: at,
            packet_len: datagram.len(),
        });
    }
    let token = if packet_type == PacketType::Initial {
        let n = c.varint_len("its token length")?;
        c.take(n, "its token")?
    } else {
        &[]
    };
    let length = c.varint_len("its length")?;
    let pn_offset = c.at;
    let packet_len = pn_offset
        .checked_add(length)
        .filter(|&end| end <= datagram.len())
        .ok_or(QuicError::Truncated(
            "its payload (shorter than its Length)",
        ))?;
    Ok(LongHeader {
        version,
        packet_type,
        dcid,
        scid,
        token,
        length,
        pn_offset,
        packet_len,
    })
}

fn cid<'a>(c: &mut Cursor<'a>, what: &'static str) -> Result<&'a [u8], QuicError> {
    let len = usize::from(c.u8(what)?);
    if len > MAX_CID_LEN {
        return Err(QuicError::CidTooLong(len));
    }
    c.take(len, what)
}

/// The long-header packets coalesced in a datagram, in order (RFC 9000 12.2), each with its
/// bytes. It ends at a short-header packet (always the last in a datagram; trailing zero bytes
/// read as one) and after the first packet that does not parse, which it yields as an error.
pub(crate) fn long_packets(datagram: &[u8]) -> LongPackets<'_> {
    LongPackets {
        rest: datagram,
        failed: false,
    }
}

/// See [`long_packets`].
pub(crate) struct LongPackets<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for LongPackets<'a> {
    type Item = Result<(&'a [u8], LongHeader<'a>), QuicError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || !is_long_header(self.rest) {
            return None;
        }
        match parse_long_header(self.rest) {
            Ok(header) => {
                let (packet, rest) = self.rest.split_at(header.packet_len);
                self.rest = rest;
                Some(Ok((packet, header)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The keys a server reads a client's Initial packets with (RFC 9001 5.2; RFC 9369 3.3 for v2):
/// AES-128-GCM, from the DCID of the client's first Initial.
fn client_initial_keys(version: Version, dcid: &[u8]) -> Result<DirectionalKeys, QuicError> {
    let suite = initial_suite()?;
    Ok(Keys::initial(version.keys(), suite.suite, suite.quic, dcid, Side::Server).remote)
}

fn initial_suite() -> Result<rustls::quic::Suite, QuicError> {
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|suite| suite.quic_suite())
        .ok_or(QuicError::NoInitialSuite)
}

/// The full packet number from its truncated form and the largest one received (RFC 9000 A.3).
fn decode_packet_number(largest: Option<u64>, truncated: u64, pn_len: usize) -> u64 {
    let expected = largest.map_or(0, |l| l + 1);
    let window = 1u64 << (pn_len * 8);
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate + half <= expected && candidate < (1 << 62) - window {
        candidate + window
    } else if candidate > expected + half && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// Removes header protection and decrypts one packet: its packet number and its plaintext
/// payload. Errors change nothing.
fn decrypt(
    keys: &DirectionalKeys,
    packet: &[u8],
    header: &LongHeader<'_>,
    largest: Option<u64>,
) -> Result<(u64, Vec<u8>), QuicError> {
    let pn_offset = header.pn_offset;
    let sample_at = pn_offset + MAX_PN_LEN;
    let sample = packet
        .get(sample_at..sample_at + keys.header.sample_len())
        .ok_or(QuicError::Truncated(
            "its payload (too short for a header protection sample)",
        ))?;
    let mut first = packet[0];
    let mut pn = [0u8; MAX_PN_LEN];
    pn.copy_from_slice(&packet[pn_offset..sample_at]);
    keys.header
        .decrypt_in_place(sample, &mut first, &mut pn)
        .map_err(|_| QuicError::Decrypt)?;
    let pn_len = usize::from(first & 0x03) + 1;
    let truncated = pn[..pn_len]
        .iter()
        .fold(0u64, |n, &b| (n << 8) | u64::from(b));
    let number = decode_packet_number(largest, truncated, pn_len);
    let mut buf = packet.to_vec();
    buf[0] = first;
    buf[pn_offset..pn_offset + pn_len].copy_from_slice(&pn[..pn_len]);
    let (head, payload) = buf.split_at_mut(pn_offset + pn_len);
    let plain_len = keys
        .packet
        .decrypt_in_place(number, head, payload)
        .map_err(|_| QuicError::Decrypt)?
        .len();
    if first & LONG_RESERVED != 0 {
        // Checked once the packet is authenticated (RFC 9000 17.2): a forged byte is a decrypt
        // error, not this.
        return Err(QuicError::ReservedBits);
    }
    buf.drain(..pn_offset + pn_len);
    buf.truncate(plain_len);
    Ok((number, buf))
}

/// The start of the CRYPTO stream as it arrives, out of order: the bytes, and the ranges of them
/// received (sorted, disjoint and not touching, at most [`MAX_FRAGMENTS`]).
#[derive(Debug, Default)]
struct Reassembly {
    data: Vec<u8>,
    ranges: Vec<(usize, usize)>,
}

impl Reassembly {
    /// Takes the bytes of one CRYPTO frame. Bytes received before must be sent the same again.
    fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<(), QuicError> {
        let end = offset
            .checked_add(bytes.len() as u64)
            .filter(|&end| end <= MAX_VARINT)
            .ok_or(QuicError::CryptoTooLarge)?;
        if end > MAX_CRYPTO as u64 {
            return Err(QuicError::CryptoTooLarge);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // Both within MAX_CRYPTO, checked just above.
        let (start, end) = (offset as usize, end as usize);
        let mut touching = 0;
        for &(s, e) in &self.ranges {
            let (lo, hi) = (s.max(start), e.min(end));
            if lo < hi && self.data[lo..hi] != bytes[lo - start..hi - start] {
                return Err(QuicError::CryptoConflict);
            }
            if s <= end && e >= start {
                touching += 1;
            }
        }
        if self.ranges.len() + 1 - touching > MAX_FRAGMENTS {
            return Err(QuicError::TooFragmented);
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        let mut merged = (start, end);
        self.ranges.retain(|&(s, e)| {
            let touches = s <= end && e >= start;
            if touches {
                merged = (merged.0.min(s), merged.1.max(e));
            }
            !touches
        });
        let at = self.ranges.partition_point(|&(s, _)| s < merged.0);
        self.ranges.insert(at, merged);
        Ok(())
    }

    /// The bytes received without a gap from the stream's start.
    fn prefix(&self) -> &[u8] {
        match self.ranges.first() {
            Some(&(0, end)) => &self.data[..end],
            _ => &[],
        }
    }
}

/// Reads the frames of a decrypted client Initial into the CRYPTO stream (RFC 9000 12.4: PADDING,
/// PING, ACK and CRYPTO; CONNECTION_CLOSE ends the connection; any other is an error).
fn read_frames(plain: &[u8], crypto: &mut Reassembly) -> Result<(), QuicError> {
    if plain.is_empty() {
        return Err(QuicError::NoFrames);
    }
    let mut c = Cursor::new(plain);
    while !c.is_empty() {
        match c.varint("a frame type")? {
            FRAME_PADDING | FRAME_PING => {}
            kind @ (FRAME_ACK | FRAME_ACK_ECN) => skip_ack(&mut c, kind == FRAME_ACK_ECN)?,
            FRAME_CRYPTO => {
                let offset = c.varint("a CRYPTO frame's offset")?;
                let len = c.varint_len("a CRYPTO frame's length")?;
                let data = c.take(len, "a CRYPTO frame's data")?;
                crypto.insert(offset, data)?;
            }
            FRAME_CONNECTION_CLOSE => return Err(QuicError::ClientClosed),
            other => return Err(QuicError::FrameNotAllowed(other)),
        }
    }
    Ok(())
}

/// Reads past an ACK frame (RFC 9000 19.3). Every field takes a byte at least, so a range count
/// larger than the packet ends in `Truncated`, not in a long loop.
fn skip_ack(c: &mut Cursor<'_>, ecn: bool) -> Result<(), QuicError> {
    c.varint("an ACK frame's largest acknowledged")?;
    c.varint("an ACK frame's delay")?;
    let ranges = c.varint("an ACK frame's range count")?;
    c.varint("an ACK frame's first range")?;
    for _ in 0..ranges {
        c.varint("an ACK frame's gap")?;
        c.varint("an ACK frame's range")?;
    }
    if ecn {
        for _ in 0..3 {
            c.varint("an ACK frame's ECN counts")?;
        }
    }
    Ok(())
}

/// What a client's Initials have given so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The ClientHello is not whole yet: more Initial packets are needed.
    NeedMore,
    /// The whole ClientHello: its server name and protocols.
    Hello(ClientHello),
}

#[derive(Debug)]
enum State {
    Reading,
    Done(ClientHello),
    Failed(QuicError),
}

/// One candidate connection's Initial packets, read until its ClientHello is whole: the client's
/// Initial keys (from the DCID of its first Initial) and the CRYPTO stream so far. Pure: feed it
/// the client's datagrams in the order they came.
pub(crate) struct InitialReader {
    version: Version,
    dcid: Vec<u8>,
    keys: DirectionalKeys,
    crypto: Reassembly,
    largest_pn: Option<u64>,
    packets: u32,
    state: State,
}

impl fmt::Debug for InitialReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitialReader")
            .field("version", &self.version)
            .field("dcid", &self.dcid)
            .field("crypto", &self.crypto.ranges)
            .field("packets", &self.packets)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl InitialReader {
    /// Starts reading the connection a client's first datagram opens: its first packet must be an
    /// Initial of version 1 or 2 whose DCID is 8 to 20 bytes. A DCID under 8 bytes is taken when
    /// the Initial carries a token: after a Retry the client uses the connection ID the server
    /// chose, which may be shorter (RFC 9000 7.2). Only the header is read here: pass the same
    /// datagram to [`push`](Self::push).
    pub(crate) fn new(first: &[u8]) -> Result<Self, QuicError> {
        let header = parse_long_header(first)?;
        if header.packet_type != PacketType::Initial {
            return Err(QuicError::NotInitial(header.packet_type));
        }
        if header.dcid.len() < MIN_INITIAL_DCID_LEN && header.token.is_empty() {
            return Err(QuicError::InitialCidTooShort(header.dcid.len()));
        }
        Ok(InitialReader {
            version: header.version,
            dcid: header.dcid.to_vec(),
            keys: client_initial_keys(header.version, header.dcid)?,
            crypto: Reassembly::default(),
            largest_pn: None,
            packets: 0,
            state: State::Reading,
        })
    }

    pub(crate) fn version(&self) -> Version {
        self.version
    }

    /// The Destination Connection ID of the client's first Initial.
    #[cfg(test)]
    pub(crate) fn dcid(&self) -> &[u8] {
        &self.dcid
    }

    /// Whether a packet's content failed the reader for good (every later `push` fails).
    pub(crate) fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// Reads the Initial packets of one datagram from the client. Its first packet must be this
    /// connection's (its version and DCID); coalesced packets of other types or connections are
    /// passed over, as is a coalesced packet that does not decrypt. Once the hello is whole, every
    /// later call gives it again; once the reader has failed, every later call gives its error.
    pub(crate) fn push(&mut self, datagram: &[u8]) -> Result<Progress, QuicError> {
        match &self.state {
            State::Done(hello) => return Ok(Progress::Hello(hello.clone())),
            State::Failed(e) => return Err(e.clone()),
            State::Reading => {}
        }
        if !is_long_header(datagram) {
            return Err(version(datagram).err().unwrap_or(QuicError::NotLongHeader));
        }
        for (n, packet) in long_packets(datagram).enumerate() {
            let first = n == 0;
            let (bytes, header) = match packet {
                Ok(p) => p,
                Err(e) if first => return Err(e),
                Err(_) => break,
            };
            if header.version != self.version || header.dcid != self.dcid.as_slice() {
                if first {
                    return Err(QuicError::OtherConnection);
                }
                continue;
            }
            if header.packet_type != PacketType::Initial {
                continue;
            }
            let (number, plain) = match decrypt(&self.keys, bytes, &header, self.largest_pn) {
                Ok(decrypted) => decrypted,
                Err(QuicError::ReservedBits) => return Err(self.fail(QuicError::ReservedBits)),
                Err(e) if first => return Err(e),
                Err(_) => continue,
            };
            self.largest_pn = Some(self.largest_pn.map_or(number, |l| l.max(number)));
            self.packets += 1;
            if self.packets > MAX_PACKETS {
                return Err(self.fail(QuicError::TooManyPackets));
            }
            if let Err(e) = read_frames(&plain, &mut self.crypto) {
                return Err(self.fail(e));
            }
        }
        match hello::parse_message(self.crypto.prefix()) {
            Ok(Some(hello)) => {
                self.state = State::Done(hello.clone());
                Ok(Progress::Hello(hello))
            }
            Ok(None) => Ok(Progress::NeedMore),
            Err(e) => Err(self.fail(QuicError::Hello(e))),
        }
    }

    fn fail(&mut self, e: QuicError) -> QuicError {
        self.state = State::Failed(e.clone());
        e
    }
}

#[cfg(test)]
pub(crate) mod tests;
