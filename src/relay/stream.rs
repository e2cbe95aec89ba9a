//! The relay for connections whose ends are not both plain sockets: TLS terminated for the client,
//! originated to the backend, or both. Same contract as the socket engines (module docs): half-close
//! (EOF read becomes a shutdown of the other side's writing: for TLS, close_notify then FIN), resets
//! passed on as resets (on the TCP socket under the TLS), at most one buffer per direction, bytes
//! counted as they are written, the same timers and cut. Everything in user space: the bytes must be
//! decrypted or encrypted here, so neither splice nor the ring can move them.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{supervise, DirEnd, Ended, Flow, LiveCounters, RelayOptions, Relayed, Side};
use crate::outcome::Outcome;

/// A byte stream the relay moves through, and the TCP socket under it (where a reset is armed).
pub(crate) trait Endpoint: AsyncRead + AsyncWrite + Unpin {
    fn socket(&self) -> &TcpStream;
}

impl Endpoint for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl<IO: Endpoint> Endpoint for tokio_rustls::server::TlsStream<IO> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.socket()
    }
}

impl<IO: Endpoint> Endpoint for tokio_rustls::client::TlsStream<IO> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.socket()
    }
}

/// Per direction: bytes copied through a buffer of their own.
const BUF: usize = 16 * 1024;

/// One direction's copy in progress.
struct Half {
    buf: Box<[u8]>,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    /// The source sent EOF.
    eof: bool,
    /// Written since the last flush: a TLS writer holds records until flushed.
    unflushed: bool,
    /// Writing is over: the destination's write side is being (or has been) shut down.
    shutting_down: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            unflushed: false,
            shutting_down: false,
        }
    }

    /// Moves bytes from `src` to `dst` until the source's EOF has been passed on (`Ready(Eof)`), a
    /// side fails, or neither can make progress now (`Pending`, with both wakers registered).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        flow: &Flow<'_>,
    ) -> Poll<DirEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.shutting_down {
                return match Pin::new(&mut *dst).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(DirEnd::Eof),
                    Poll::Ready(Err(e)) => Poll::Ready(DirEnd::DestError(e)),
                    Poll::Pending => Poll::Pending,
                };
            }
            while self.pos < self.cap {
                match Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.cap]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(DirEnd::DestError(io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.unflushed = true;
                        flow.wrote(n);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(DirEnd::DestError(e)),
                    Poll::Pending => {
                        flow.blocked.store(true, Relaxed);
                        return Poll::Pending;
                    }
                }
            }
            flow.blocked.store(false, Relaxed);
            if self.eof {
                self.shutting_down = true;
                continue;
            }
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.eof = true;
                    }
                    (self.pos, self.cap) = (0, n);
                }
                // A TLS peer that closes its TCP without close_notify: an end of stream, as every
                // proxy treats it (the peer behind us learns of it the same way, by a FIN).
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.eof = true;
                    (self.pos, self.cap) = (0, 0);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(DirEnd::SourceError(e)),
                Poll::Pending => {
                    // Nothing more to read now: push what was written out of the writer's buffer.
                    if self.unflushed {
                        match Pin::new(&mut *dst).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(DirEnd::DestError(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Relays between two streams until both directions end, one side fails, a timer fires or `cut`
/// completes. On return, resets have been armed on the sockets that must see one; the caller closes
/// both by dropping them. `cut` comes pinned, as [`super::relay`]'s does.
pub(crate) async fn relay_streams<C: Endpoint, B: Endpoint, K: Future<Output = Outcome>>(
    client: &mut C,
    backend: &mut B,
    opts: &RelayOptions,
    cut: Pin<&mut K>,
    live: LiveCounters<'_>,
    first_byte_by: Option<Instant>,
) -> Relayed {
    let start = Instant::now();
    let up = Flow::new(live.up, backend.socket().as_raw_fd(), live.conn, true);
    let down = Flow::new(live.down, client.socket().as_raw_fd(), live.conn, false);
    let (mut to_backend, mut to_client) = (Half::new(), Half::new());
    let (mut up_done, mut down_done) = (false, false);
    // Both directions are polled on every wake-up here (no `Woken`): reading a TLS stream may write
    // to its socket (an alert, a key update) and wait for the write readiness the other direction
    // waits for, through the socket's single writer waker, which must then wake them both.
    let directions = std::pin::pin!(poll_fn(|cx| {
        if !up_done {
            if let Poll::Ready(end) = to_backend.poll_copy(cx, client, backend, &up) {
                up_done = true;
                return Poll::Ready((Side::Up, end));
            }
        }
        if !down_done {
            if let Poll::Ready(end) = to_client.poll_copy(cx, backend, client, &down) {
                down_done = true;
                return Poll::Ready((Side::Down, end));
            }
        }
        Poll::Pending
    }));
    // Never carried: the TLS state lives in this process (the connection drains here instead).
    let carry = std::pin::pin!(std::future::pending());
    let supervised = supervise(
        directions,
        &up,
        &down,
        opts,
        start,
        cut,
        carry,
        Ended {
            first_byte_by: super::FirstByteIn::until(first_byte_by),
            ..Ended::default()
        },
    )
    .await;
    super::conclude(supervised, &up, &down, client.socket(), backend.socket())
}
