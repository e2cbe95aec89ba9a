//! The hand-over's messages between the old process and the new, over a Unix `SOCK_SEQPACKET`
//! socket (each message arrives whole, with the descriptors sent beside it by `SCM_RIGHTS`).
//!
//! Every message starts `SG`, then a kind byte, then its body: JSON, which ignores fields it does not
//! know, or raw bytes (`Chunk`). What may change between builds is in [`FORMAT`]: the hello and the
//! ready message each say the session format their process speaks, and connections are carried only
//! when both say the same one. Listeners pass between any two builds that know these kinds.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::session::CarriedFacts;

/// The session format: how a carried connection, the counters and the end are described. Raise it
/// on any change to [`SessionMeta`], [`CarriedFacts`] or the totals that the other side could not
/// read (a field added with a default, like the totals' `deny`, it reads: older ones ignore it).
pub(crate) const FORMAT: u32 = 1;

/// A message is at most this long (the socket's default send buffer takes it whole); held bytes
/// longer than a chunk go in several.
pub(crate) const MAX_MESSAGE: usize = 64 << 10;
const CHUNK: usize = MAX_MESSAGE - 16;

const MAGIC: [u8; 2] = *b"SG";

/// One message.
#[derive(Debug)]
pub(crate) enum Frame {
    /// Old → new, first: who is handing over and which session format it speaks.
    Hello(Peer),
    /// Old → new: one listening socket (its descriptor beside it).
    Listener {
        name: Option<String>,
        socket: OwnedFd,
    },
    /// Old → new: every listener has been sent.
    ListenersEnd,
    /// New → old: accepting on every listener now; stop accepting.
    Ready(Peer),
    /// New → old: cannot take over (the config, a socket); the old process goes on.
    Failed { reason: String },
    /// Old → new: a connection carried over (client then backend descriptor beside it); its held
    /// bytes follow in `Chunk`s.
    Session {
        meta: Box<SessionMeta>,
        client: OwnedFd,
        backend: OwnedFd,
    },
    /// Old → new: the next held bytes of the last `Session`.
    Chunk(Vec<u8>),
    /// Old → new: counters to add to the new process's (JSON of `control::Totals`).
    Totals(serde_json::Value),
    /// Old → new: nothing more will come; the old process exits.
    Done(Done),
    /// Old → new: every connection that goes has gone (this many); say when they are taken.
    SessionsEnd { carried: u64 },
    /// New → old: every carried connection taken, and serving: the old process may close its
    /// listening sockets (until then it keeps them, to accept again should this process die).
    Serving,
}

/// Who speaks: in the hello, the old process; in the ready message, the new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Peer {
    pub(crate) pid: u32,
    /// The session format it speaks ([`FORMAT`]).
    pub(crate) format: u32,
    pub(crate) version: String,
    /// In the ready message: this process says `Serving` after `SessionsEnd` (a build before it
    /// does not, and the old process then closes its sockets without waiting).
    #[serde(default)]
    pub(crate) confirms: bool,
}

impl Peer {
    pub(crate) fn me() -> Peer {
        Peer {
            pid: std::process::id(),
            format: FORMAT,
            version: env!("CARGO_PKG_VERSION").to_string(),
            confirms: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Done {
    /// Connections carried over, and those that ended (or were cut) in the old process.
    pub(crate) carried: u64,
    pub(crate) stayed: u64,
}

/// A carried connection beside its two descriptors: its facts and what its relay held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SessionMeta {
    pub(crate) facts: CarriedFacts,
    /// Bytes read from the client, not yet written to the backend; then those for the client. They
    /// follow in `Chunk`s, in that order.
    pub(crate) to_backend: usize,
    pub(crate) to_client: usize,
    pub(crate) up_done: bool,
    pub(crate) down_done: bool,
    pub(crate) quiet_ms: u64,
}

/// A message that cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the hand-over socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other process closed the hand-over socket")]
    Closed,
    #[error("not a hand-over message (it does not start with SG)")]
    NotOurs,
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("a {kind} message came with {got} descriptors, not {want}")]
    Descriptors {
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("a {kind} message does not parse: {error}")]
    Body {
        kind: &'static str,
        error: serde_json::Error,
    },
    #[error("a message was cut short (longer than {MAX_MESSAGE} bytes, or too many descriptors)")]
    Truncated,
}

impl Frame {
    fn kind(&self) -> (u8, &'static str) {
        match self {
            Frame::Hello(_) => (1, "hello"),
            Frame::Listener { .. } => (2, "listener"),
            Frame::ListenersEnd => (3, "listeners-end"),
            Frame::Ready(_) => (4, "ready"),
            Frame::Failed { .. } => (5, "failed"),
            Frame::Session { .. } => (6, "session"),
            Frame::Chunk(_) => (7, "chunk"),
            Frame::Totals(_) => (8, "totals"),
            Frame::Done(_) => (9, "done"),
            Frame::SessionsEnd { .. } => (10, "sessions-end"),
            Frame::Serving => (11, "serving"),
        }
    }

    /// The message's bytes and the descriptors that go beside them.
    pub(crate) fn encode(&self) -> (Vec<u8>, Vec<std::os::fd::BorrowedFd<'_>>) {
        let mut out = MAGIC.to_vec();
        out.push(self.kind().0);
        let json = |out: &mut Vec<u8>, v: &dyn erased::Json| out.extend(v.to_json());
        let mut fds = Vec::new();
        match self {
            Frame::Hello(h) => json(&mut out, h),
            Frame::Listener { name, socket } => {
                json(&mut out, name);
                fds.push(socket.as_fd());
            }
            Frame::ListenersEnd => {}
            Frame::Ready(r) => json(&mut out, r),
            Frame::Failed { reason } => json(&mut out, reason),
            Frame::Session {
                meta,
                client,
                backend,
            } => {
                json(&mut out, meta.as_ref());
                fds.push(client.as_fd());
                fds.push(backend.as_fd());
            }
            Frame::Chunk(b) => out.extend_from_slice(b),
            Frame::Totals(v) => json(&mut out, v),
            Frame::Done(d) => json(&mut out, d),
            Frame::SessionsEnd { carried } => json(&mut out, carried),
            Frame::Serving => {}
        }
        (out, fds)
    }

    /// A message as received, with the descriptors that came beside it (closed when not taken).
    pub(crate) fn decode(buf: &[u8], mut fds: Vec<OwnedFd>) -> Result<Frame, WireError> {
        if buf.len() < 3 || buf[..2] != MAGIC {
            return Err(WireError::NotOurs);
        }
        let body = &buf[3..];
        let want = |kind: &'static str, n: usize, fds: &Vec<OwnedFd>| {
            if fds.len() == n {
                Ok(())
            } else {
                Err(WireError::Descriptors {
                    kind,
                    got: fds.len(),
                    want: n,
                })
            }
        };
        fn parse<T: serde::de::DeserializeOwned>(
            kind: &'static str,
            body: &[u8],
        ) -> Result<T, WireError> {
            serde_json::from_slice(body).map_err(|error| WireError::Body { kind, error })
        }
        let frame = match buf[2] {
            1 => Frame::Hello(parse("hello", body)?),
            2 => {
                want("listener", 1, &fds)?;
                Frame::Listener {
                    name: parse("listener", body)?,
                    socket: fds.remove(0),
                }
            }
            3 => Frame::ListenersEnd,
            4 => Frame::Ready(parse("ready", body)?),
            5 => Frame::Failed {
                reason: parse("failed", body)?,
            },
            6 => {
                want("session", 2, &fds)?;
                let meta = Box::new(parse("session", body)?);
                let backend = fds.remove(1);
                let client = fds.remove(0);
                Frame::Session {
                    meta,
                    client,
                    backend,
                }
            }
            7 => Frame::Chunk(body.to_vec()),
            8 => Frame::Totals(parse("totals", body)?),
            9 => Frame::Done(parse("done", body)?),
            10 => Frame::SessionsEnd {
                carried: parse("sessions-end", body)?,
            },
            11 => Frame::Serving,
            k => return Err(WireError::Kind(k)),
        };
        if !fds.is_empty() && !matches!(buf[2], 2 | 6) {
            let (_, kind) = frame.kind();
            return Err(WireError::Descriptors {
                kind,
                got: fds.len(),
                want: 0,
            });
        }
        Ok(frame)
    }
}

/// Serialising the bodies behind one object-safe call.
mod erased {
    pub(super) trait Json {
        fn to_json(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            // Plain data (strings, numbers, addresses): serialising it cannot fail.
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// Splits held bytes into `Chunk` messages.
pub(crate) fn chunks(bytes: &[u8]) -> impl Iterator<Item = Frame> + '_ {
    bytes.chunks(CHUNK).map(|c| Frame::Chunk(c.to_vec()))
}

/// One end of the hand-over socket.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
}

/// The abstract Unix socket name `name` (no file: it goes away with the process).
fn abstract_addr(name: &str) -> std::io::Result<SocketAddrUnix> {
    Ok(SocketAddrUnix::new_abstract_name(name.as_bytes())?)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Connects to the hand-over socket at the abstract name `name`: how a process of an earlier
/// release (one that bound a name) hands over to this one.
pub(crate) fn connect(name: &str) -> std::io::Result<Channel> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &abstract_addr(name)?)?;
    Ok(Channel { fd })
}

/// Why standard input is not the hand-over socket an upgrade said it is.
fn not_handover(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("standard input is not the hand-over socket ({what})"),
    )
}

impl Channel {
    /// A connected pair with no name: the old process keeps one end and gives the other to the
    /// process it starts as its standard input, so nothing else can reach the hand-over.
    pub(crate) fn pair() -> std::io::Result<(Channel, OwnedFd)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Channel { fd: a }, b))
    }

    /// The end of [`Channel::pair`] this process was started with on its standard input: taken
    /// (close-on-exec, so no later child inherits it), and `/dev/null` put in its place, so that
    /// closing the channel closes the socket.
    pub(crate) fn from_stdin() -> std::io::Result<Channel> {
        let stdin = std::io::stdin();
        match rustix::net::sockopt::socket_type(stdin.as_fd()) {
            Ok(SocketType::SEQPACKET) => {}
            Ok(other) => return Err(not_handover(&format!("a socket of type {other:?}"))),
            Err(e) => return Err(not_handover(&e.to_string())),
        }
        let fd = rustix::io::fcntl_dupfd_cloexec(stdin.as_fd(), 3)?;
        rustix::stdio::dup2_stdin(std::fs::File::open("/dev/null")?)?;
        Ok(Channel { fd })
    }

    /// The process at the other end.
    pub(crate) fn peer_pid(&self) -> std::io::Result<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.fd)?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }

    /// Bounds each later send and receive (`TimedOut` past it); `None` waits as long as it takes.
    pub(crate) fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        use rustix::net::sockopt::{set_socket_timeout, Timeout};
        self.set_recv_timeout(t)?;
        set_socket_timeout(&self.fd, Timeout::Send, t)?;
        Ok(())
    }

    /// Bounds each later receive only: for a thread that listens while another sends.
    pub(crate) fn set_recv_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        use rustix::net::sockopt::{set_socket_timeout, Timeout};
        Ok(set_socket_timeout(&self.fd, Timeout::Recv, t)?)
    }

    pub(crate) fn send(&self, frame: &Frame) -> std::io::Result<()> {
        let (bytes, fds) = frame.encode();
        if bytes.len() > MAX_MESSAGE {
            // The other side reads at most this much: it would take the message as cut short.
            return Err(std::io::Error::other(format!(
                "a {} message of {} bytes, over the {MAX_MESSAGE} a message may have",
                frame.kind().1,
                bytes.len()
            )));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(timed_out)?;
        if sent != bytes.len() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }

    pub(crate) fn recv(&self) -> Result<Frame, WireError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        // Room for more descriptors than any message has: extra ones are received (and closed)
        // rather than cutting the message.
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| WireError::Io(timed_out(e)))?;
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        if got
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(WireError::Truncated);
        }
        if got.bytes == 0 {
            return Err(WireError::Closed);
        }
        Frame::decode(&buf[..got.bytes], fds)
    }
}

fn timed_out(e: rustix::io::Errno) -> std::io::Error {
    if e == rustix::io::Errno::AGAIN {
        std::io::ErrorKind::TimedOut.into()
    } else {
        e.into()
    }
}

/// Decodes bytes as a message that came without descriptors: its kind, or what is wrong with it
/// (the fuzz target's entry, tests/it/fuzz.rs).
pub fn decode_kind(bytes: &[u8]) -> Result<&'static str, String> {
    Frame::decode(bytes, Vec::new())
        .map(|f| f.kind().1)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_with_its_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel { fd: b };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = l.local_addr().unwrap();
        a.send(&Frame::Hello(Peer {
            pid: 7,
            format: FORMAT,
            version: "x".into(),
            confirms: true,
        }))
        .unwrap();
        a.send(&Frame::Listener {
            name: Some("web#0".into()),
            socket: OwnedFd::from(l),
        })
        .unwrap();
        a.send(&Frame::Chunk(vec![1; CHUNK])).unwrap();
        a.send(&Frame::Done(Done {
            carried: 3,
            stayed: 4,
        }))
        .unwrap();
        a.send(&Frame::SessionsEnd { carried: 5 }).unwrap();
        b.send(&Frame::Serving).unwrap();
        assert!(matches!(b.recv().unwrap(), Frame::Hello(h) if h.pid == 7 && h.format == FORMAT));
        match b.recv().unwrap() {
            Frame::Listener { name, socket } => {
                assert_eq!(name.as_deref(), Some("web#0"));
                let l = std::net::TcpListener::from(socket);
                assert_eq!(l.local_addr().unwrap(), local, "the same socket");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.recv().unwrap(), Frame::Chunk(c) if c.len() == CHUNK));
        assert!(matches!(b.recv().unwrap(), Frame::Done(d) if d.carried == 3));
        assert!(matches!(
            b.recv().unwrap(),
            Frame::SessionsEnd { carried: 5 }
        ));
        assert!(matches!(a.recv().unwrap(), Frame::Serving));
        drop(a);
        assert!(matches!(b.recv(), Err(WireError::Closed)));
    }

    #[test]
    fn bad_messages_are_named() {
        assert!(matches!(
            Frame::decode(b"", vec![]),
            Err(WireError::NotOurs)
        ));
        assert!(matches!(
            Frame::decode(b"XX\x01{}", vec![]),
            Err(WireError::NotOurs)
        ));
        assert!(matches!(
            Frame::decode(b"SG\x63", vec![]),
            Err(WireError::Kind(0x63))
        ));
        let e = Frame::decode(b"SG\x01{\"pid\":1}", vec![]).unwrap_err();
        assert!(e.to_string().contains("hello"), "{e}");
        // A listener without its descriptor.
        let e = Frame::decode(b"SG\x02null", vec![]).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::Descriptors {
                    want: 1,
                    got: 0,
                    ..
                }
            ),
            "{e}"
        );
        // Unknown fields are ignored: a later build may add some.
        let f = Frame::decode(
            b"SG\x04{\"pid\":1,\"format\":1,\"version\":\"v\",\"new\":2}",
            vec![],
        );
        assert!(matches!(f, Ok(Frame::Ready(_))));
        // A ready message of a build that does not say `Serving`: it is not waited for.
        match Frame::decode(b"SG\x04{\"pid\":1,\"format\":1,\"version\":\"v\"}", vec![]) {
            Ok(Frame::Ready(p)) => assert!(!p.confirms),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn held_bytes_go_in_chunks_that_fit_a_message() {
        let held = vec![9u8; 3 * CHUNK + 5];
        let frames: Vec<_> = chunks(&held).collect();
        assert_eq!(frames.len(), 4);
        for f in &frames {
            assert!(f.encode().0.len() <= MAX_MESSAGE);
        }
    }
}
