//! The ring worker's way from a client to a backend: the client's first bytes when the host asks
//! for them (a PROXY header), the backend socket and its options (made on the ring where the
//! kernel can), the connect with its linked timeout, another backend when it fails or a wait for
//! one when every backend is full (`go`, `retry_waiting`), and the relay's receives armed once
//! connected (`relay`).

use super::*;

impl<H: Host> Worker<H> {
    /// Reads more of a client's first bytes into `pre`, with what is left of its deadline linked.
    pub(super) fn read_pre(&mut self, slot: u32) {
        let now = self.now;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let Some(by) = c.reading else { return };
        let left = by.saturating_duration_since(now);
        if left.is_zero() {
            return self.preamble(slot, Err(PreEnd::TimedOut));
        }
        if c.pre.spare() == 0 {
            return self.finish(slot, Supervised::ended(Outcome::ProxyHeader));
        }
        self.sq.recv_pre(c, slot, left);
    }

    pub(super) fn on_pre(&mut self, slot: u32, done: &Done) {
        // The bytes it read count in `pre` first (`Own::returned`), whatever comes next.
        if let Some(c) = self.conn(slot) {
            c.pre.returned(done);
        }
        if !self.completed(slot) {
            return;
        }
        let got = match done.result() {
            n if n > 0 => Ok(()),
            0 => Err(PreEnd::Closed),
            e if e == -libc::ECANCELED => Err(PreEnd::TimedOut),
            e => Err(PreEnd::Failed(io::Error::from_raw_os_error(-e))),
        };
        self.preamble(slot, got);
    }

    /// Asks the host what the client's first bytes (or their end) mean, and acts on it.
    fn preamble(&mut self, slot: u32, got: Result<(), PreEnd>) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let Conn {
            host, client, pre, ..
        } = &mut *c;
        let (Some(h), Some(fd)) = (host.as_mut(), client.as_ref()) else {
            return;
        };
        let more_may_come = got.is_ok();
        let step = match got {
            Ok(()) => self.host.preamble(h, fd.as_fd(), Got::Bytes(pre)),
            Err(PreEnd::Closed) => self.host.preamble(h, fd.as_fd(), Got::Closed(pre.len())),
            Err(PreEnd::TimedOut) => self.host.preamble(h, fd.as_fd(), Got::TimedOut),
            Err(PreEnd::Failed(e)) => self.host.preamble(h, fd.as_fd(), Got::Failed(e)),
        };
        match step {
            // With no room left `read_pre` refuses: never read forever.
            Step::More if more_may_come => self.read_pre(slot),
            // Nothing more will come (closed, timed out, failed): a host that still wants more
            // gets none.
            Step::More => self.finish(slot, Supervised::ended(Outcome::ProxyHeader)),
            Step::Refuse(end) => self.finish(slot, Supervised::ended(end)),
            Step::Connect {
                target,
                consumed,
                preface,
            } => {
                c.reading = None;
                let rest = c.pre.get(consumed..).unwrap_or_default();
                c.preface = preface.len() as u32;
                c.pre = Own::from([preface.as_slice(), rest].concat());
                self.go(slot, target);
            }
        }
    }

    /// Starts a connect to `target`, with its timeout linked: on the ring from the socket's making
    /// on where this kernel sets socket options there (`Worker::sockets`), else on a socket made
    /// by system calls.
    fn connect(&mut self, slot: u32, target: Target) {
        let on_ring = self.sockets;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        c.to = SockAddr::from(target.addr);
        c.link = types::Timespec::from(target.timeout);
        if !on_ring {
            return match backend_socket(target.addr) {
                Ok(s) => self.connect_with(slot, s, false),
                Err(e) => self.connect_failed(slot, e),
            };
        }
        self.sq.socket(c, slot, target.addr);
    }

    pub(super) fn on_socket(&mut self, slot: u32, mut done: Done) {
        let res = done.result();
        let socket = done.take_fd();
        if !self.completed(slot) {
            return; // Ending: the socket closes here.
        }
        match socket {
            Some(s) => {
                bump(&self.counts.sockets_made);
                self.connect_with(slot, s, true)
            }
            None => self.connect_failed(slot, io::Error::from_raw_os_error(-res)),
        }
    }

    /// Connects `socket` to the connection's `to`, the timeout `link` linked. With `options`, the
    /// socket was made on the ring and its options (`backend_socket` says which and why) are set
    /// first, in the same chain. Both are hard-linked, so the connect is issued whatever they
    /// return: a failed linked entry that posts no completion on success would have the kernel
    /// post none for the entries it cancels, the connect's included, and nothing would end the
    /// connection. Both are best effort, as they are for `backend_socket` and the epoll engine
    /// (`relay::connect_holding_ack`): without them the connection works, if slower, and a
    /// failure to set an option on a socket of our own is not the backend's to answer for.
    fn connect_with(&mut self, slot: u32, socket: OwnedFd, options: bool) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        c.connect_out = Some(0);
        if let Some(h) = c.host.as_ref() {
            self.host.backend_socket(h, socket.as_fd());
        }
        self.sq.connect(c, slot, socket, options);
    }

    pub(super) fn on_connect(&mut self, slot: u32, res: i32) {
        if let Some(c) = self.conn(slot) {
            c.connect_out = None;
        }
        if !self.completed(slot) {
            return;
        }
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        if let Err(e) = connect_result(res) {
            return self.connect_failed(slot, e);
        }
        c.connected = true;
        c.last = self.now;
        if let Some(h) = c.host.as_mut() {
            self.host.connected(h);
            if c.preface == 0 {
                self.host.established(h);
            }
        }
        // Its backend cut while it connected (or as it picked it): `Command::BackendCut` passed
        // it by, and it goes before it relays anything. Without a preface it was credited just
        // above, as the epoll engine credits a connect whose relay then sees the cut.
        if let Some(end) = self.cut_of(slot) {
            return self.finish(slot, end);
        }
        let now = self.now;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        // Held back by the kernel (`backend_socket`) for the first bytes sent.
        c.ack_held = Some(self.turn);
        let owned = !c.pre.is_empty();
        if owned {
            let len = c.pre.len() as u32;
            c.dirs[Side::Up as usize].bytes_wait(now);
            c.dirs[Side::Up as usize].held.push_back(Held {
                buf: Buf::Own,
                len,
                off: 0,
            });
        }
        if self.carrying && c.preface == 0 {
            // Connected while connections are being carried away: it goes too, before it starts.
            // One with a preface (a PROXY header to the backend) sends it first (`on_send`): the
            // process it goes to would count a preface's bytes as the client's. Its handshake's
            // last ACK goes as it does (`quiet`).
            c.carry = true;
            return self.maybe_free(slot);
        }
        if owned {
            // Its first bytes carry the ACK.
            c.ack_held = None;
            // The receives wait until it is out (`on_send`): if it cannot go, the connection can
            // still try another backend.
            self.send_next(slot, Side::Up);
        } else {
            // The client's bytes carry it if they come within a turn (`release_acks`).
            self.acks.push((slot, self.turn));
            self.relay(slot);
        }
    }

    /// Arms both receives: the relay proper starts.
    pub(super) fn relay(&mut self, slot: u32) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        c.starts_relaying(&mut self.host);
        let cap = cap_of(self.pool.as_ref());
        for side in [Side::Up, Side::Down] {
            if self
                .conn(slot)
                .is_some_and(|c| c.dir(side).should_arm(false, cap))
            {
                self.arm_recv(slot, side);
            }
        }
    }

    /// The backend took the connection but `pre` could not be sent to it: the next target the host
    /// names gets all of it, from its first byte.
    pub(super) fn first_bytes_failed(&mut self, slot: u32, e: io::Error) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        c.connected = false;
        // `pre` is all it held (nothing was received yet): the next connect queues it again.
        c.dir(Side::Up).held.clear();
        self.try_another(slot, e, true);
    }

    fn connect_failed(&mut self, slot: u32, e: io::Error) {
        self.try_another(slot, e, false);
    }

    /// The attempt on the connection's backend failed (its connect, or with `first_bytes` the send
    /// of `pre`): its socket closes, and the host names what comes next.
    fn try_another(&mut self, slot: u32, e: io::Error, first_bytes: bool) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let old = c.backend.take();
        let next = match c.host.as_mut() {
            Some(h) if first_bytes => self.host.first_bytes_failed(h, e),
            Some(h) => self.host.connect_failed(h, e),
            None => Err(Outcome::ConnectFailed),
        };
        if let Some(old) = old {
            self.close(old);
        }
        match next {
            Ok(target) => self.go(slot, target),
            Err(end) => self.finish(slot, Supervised::ended(end)),
        }
    }

    /// Connects to `target`; with none, waits for the host to name one (`retry_waiting`).
    pub(super) fn go(&mut self, slot: u32, target: Option<Target>) {
        match target {
            Some(t) => self.connect(slot, t),
            None => {
                let Some(c) = at(&mut self.conns, slot) else {
                    return;
                };
                c.waiting = true;
                // Its own deadline only: those already waiting have timeouts for theirs (a scan
                // of every wait per new one would cost a long queue quadratic time).
                let left = c.host.as_ref().and_then(|h| self.host.wait_left(h));
                self.waiting.push(slot);
                if let Some(left) = left {
                    self.arm_at(left, Until::Waits);
                }
            }
        }
    }

    /// Asks the host again for each connection waiting for a backend, in the order they began to.
    pub(super) fn retry_waiting(&mut self) {
        for slot in std::mem::take(&mut self.waiting) {
            let Some(c) = at(&mut self.conns, slot) else {
                continue;
            };
            let Some(h) = c.host.as_mut().filter(|_| c.waiting && c.end.is_none()) else {
                continue;
            };
            match self.host.retry(h) {
                Ok(Some(t)) => {
                    c.waiting = false;
                    self.connect(slot, t);
                }
                Ok(None) => self.waiting.push(slot),
                Err(end) => self.finish(slot, Supervised::ended(end)),
            }
        }
        self.arm_until();
    }
}

/// Whether a connect succeeded, from its completion's `res`. Cancelled (ECANCELED) is its linked
/// timeout's doing.
pub(super) fn connect_result(res: i32) -> io::Result<()> {
    match res {
        r if r == -libc::ECANCELED => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        }
        r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        _ => Ok(()),
    }
}

/// The length TCP_NODELAY is set with on the ring: an int's, but 0 on a thread that called
/// [`fail_nodelay_here`], which the kernel refuses (EINVAL).
pub(super) fn nodelay_len() -> u32 {
    #[cfg(test)]
    if NODELAY_FAILS.get() {
        return 0;
    }
    size_of::<libc::c_int>() as u32
}

#[cfg(test)]
thread_local! {
    static NODELAY_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From now on, on the calling thread, TCP_NODELAY set on a backend socket fails (EINVAL), on the
/// ring and by a system call (`backend_socket`): nothing outside the kernel can make it fail on a
/// new TCP socket, and what a connect does then must be tested.
#[cfg(test)]
pub(super) fn fail_nodelay_here() {
    NODELAY_FAILS.set(true);
}

/// Whether this kernel makes sockets and sets their options on the ring (`IORING_OP_SOCKET`,
/// Linux 5.19+; `SOCKET_URING_OP_SETSOCKOPT`, Linux 6.7+), asked once, of a ring and a socket of
/// its own (`submit::try_sockets_on_ring`): a kernel without the second refuses the command
/// (EOPNOTSUPP), and the workers then make their backend sockets by system calls
/// (`backend_socket`).
pub(super) fn sockets_on_ring() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| match submit::try_sockets_on_ring() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "ring workers make their backend sockets by system calls");
            false
        }
    })
}

/// A non-blocking TCP socket for `to`, with TCP_NODELAY (a proxy must not add Nagle delay) and
/// quick ACKs off, as HAProxy's `tcp-smart-connect` turns them off: the kernel then holds the
/// handshake's last ACK (for up to 200 ms; then quick ACKs are on again) and it leaves in the
/// segment with the first bytes sent. The backend gets the connection and its first bytes in one
/// segment, and wakes once to accept and read them instead of once for each
/// (benchmarks/results/2026-11-27-ack-on-every-connect.md). Where no bytes come within a loop turn,
/// the worker sends the ACK itself (`send_held_ack`).
fn backend_socket(to: SocketAddr) -> io::Result<OwnedFd> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(to),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    // Best effort, as on the ring (`Worker::connect_with`): without TCP_NODELAY the connection
    // works, if slower; without quick ACKs off the handshake ends with an ACK of its own, as it
    // would anyway.
    for (option, set) in [
        ("TCP_NODELAY", set_nodelay(&s)),
        ("TCP_QUICKACK", s.set_tcp_quickack(false)),
    ] {
        if let Err(error) = set {
            option_failed(option, false, &error);
        }
    }
    Ok(s.into())
}

/// A backend socket's option could not be set (`on_ring`: by the ring, else by a system call).
/// Best effort both ways: the connect goes on.
pub(super) fn option_failed(option: &'static str, on_ring: bool, error: &io::Error) {
    tracing::debug!(option, on_ring, %error, "a backend socket option failed");
}

/// TCP_NODELAY on, by a system call; refused (EINVAL) on a thread that called
/// [`fail_nodelay_here`], as the ring's is.
fn set_nodelay(s: &socket2::Socket) -> io::Result<()> {
    #[cfg(test)]
    if NODELAY_FAILS.get() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    s.set_tcp_nodelay(true)
}
