//! The ring worker's one way into the kernel and out of it: [`Sq`] builds every submission entry
//! from what it points to, counts it in its connection's [`Refs`] and pushes it; every completion
//! comes out of it as a [`Done`], the only thing that hands over what the kernel made (a new
//! descriptor, a pool buffer it filled: [`Filled`]) or wrote (the bytes of a receive into a
//! connection's own buffer: [`Own`]). The steps (`accept`, `connect`, `flow`, `end`) hold no
//! `unsafe`: they say what to submit, and this file says why the kernel may have it.
//!
//! Why that is sound, the contract of `io_uring`'s `push` ("parameters of the entry (such as
//! buffer) are valid and will be valid for the entire duration of the operation") kept piece by
//! piece:
//! - A connection's entries name its own sockets (`Conn::client`, `backend`, read here, never a
//!   descriptor passed in) and point into its box: its backend's address and the linked timeout's
//!   timespec (`Conn::to`, `link`), which the kernel copies when it takes the entry, and its own
//!   buffers (`Conn::pre`, `post`). Each entry is counted in the connection's `refs` as it is
//!   pushed (`Sq::push_for`, the one place they are counted up), and the worker takes a box out of
//!   its slot and closes its sockets only once the count is back to zero (`Worker::maybe_free`,
//!   `quiet`).
//! - An own buffer is lent to one operation at a time ([`Own`]): while lent it is neither
//!   reallocated nor freed (a replaced or dropped one is leaked), and only that operation's
//!   completion sets how much of it is filled.
//! - Pool buffers live as long as the worker (leaked if it exits with operations in the kernel);
//!   a receive writes only into buffers in the kernel's ring, and one the kernel has handed over
//!   is read only through its [`Filled`], made here once per completion that names it and given
//!   up to give the buffer back.
//! - A listener's accepts write the client's address into their place ([`Places`], boxed in the
//!   listener), armed here; the worker drops a listener only once none is armed
//!   (`Worker::maybe_unlistened`), and a box with a place still armed is leaked rather than freed.
//! - The worker's own timeouts (the tick, `Worker::arm_at`'s) point to timespecs kept here until
//!   their completion.
#![allow(unsafe_code)]

use std::ops::Deref;

use super::connect::nodelay_len;
use super::*;
use crate::relay::uring::bufs::Filled;

/// The submission side of a worker's ring (and its completions' way out): the ring, the entries
/// its queue had no room for, and the timespecs of the worker's own timeouts.
pub(super) struct Sq {
    /// First, so that it is dropped first: the ring closes before anything it pointed to goes.
    ring: IoUring,
    /// Entries the submission queue had no room for, in groups that go in together (a connect and
    /// its linked timeout).
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// The tick's timespec (`tick`), and whether its timeout is in the kernel.
    tick: Box<types::Timespec>,
    tick_out: bool,
    /// The timespecs of the timeouts armed besides the tick (`until`), by their place, each kept
    /// until its timeout completes (`reap`).
    untils: Vec<Option<Box<types::Timespec>>>,
}

impl Sq {
    pub(super) fn new(ring: IoUring) -> Sq {
        Sq {
            ring,
            backlog: VecDeque::new(),
            tick: Box::new(types::Timespec::new()),
            tick_out: false,
            untils: Vec::new(),
        }
    }

    /// Queues `entries` for the next entry into the kernel, together.
    ///
    /// # Safety
    ///
    /// What each entry points to (a buffer, an address, a timespec) must stay valid, and each
    /// descriptor it names open, until the entry's last completion.
    unsafe fn push(&mut self, entries: &[squeue::Entry]) {
        if self.backlog.is_empty() {
            // SAFETY: the caller's promise, passed on.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return;
            }
            // Full: submit what is queued (without waiting) and try once more.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entries.to_vec());
    }

    /// Queues `entries` for connection `c`, together, and counts `counted` of them in its `refs`
    /// (all but a backend socket's options): the one place a connection's operations are counted.
    ///
    /// # Safety
    ///
    /// As for `push`.
    unsafe fn push_for<C>(&mut self, c: &mut Conn<C>, counted: u32, entries: &[squeue::Entry]) {
        c.refs.0 += counted;
        // SAFETY: the caller's promise, passed on.
        unsafe { self.push(entries) };
    }

    /// Moves what the submission queue had no room for into it, in order, as far as it goes.
    pub(super) fn flush_backlog(&mut self) {
        while let Some(group) = self.backlog.front() {
            // SAFETY: each group was pushed with `push`'s promise, which still holds: what it
            // points to stays until its completion, which has not come (it was never submitted).
            if unsafe { self.ring.submission().push_multiple(group) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// Entries wait for room in the submission queue.
    pub(super) fn backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Submits what is queued and waits for `want` completions (`io_uring_enter`).
    pub(super) fn enter(&mut self, want: usize) -> io::Result<usize> {
        self.ring.submit_and_wait(want)
    }

    /// Takes every completion posted so far, in order, into `done`, each with what the kernel
    /// made for it; a timeout that completed frees its timespec.
    pub(super) fn reap(&mut self, done: &mut Vec<Done>) {
        for c in self.ring.completion() {
            let (ud, res, flags) = (c.user_data(), c.result(), c.flags());
            let mut d = Done {
                ud,
                res,
                flags,
                fd: None,
                buf: None,
            };
            match ud & 15 {
                K_ACCEPT | K_SOCKET if res >= 0 => {
                    // SAFETY: the kernel installed this descriptor for this completion (only
                    // `accept` and `socket` push entries of these kinds), once; nothing else owns
                    // it. Left untaken, it closes with the `Done`.
                    d.fd = Some(unsafe { OwnedFd::from_raw_fd(res) });
                }
                K_RECV => {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        // SAFETY: a receive from the worker's pool (the one group every receive
                        // into the pool names) completed naming `bid`, and this is the one token
                        // made for this completion.
                        d.buf = Some(unsafe { Filled::named(bid) });
                    }
                }
                K_TICK => self.tick_out = false,
                K_UNTIL => {
                    if let Some(t) = self.untils.get_mut((ud >> 32) as usize) {
                        *t = None;
                    }
                }
                _ => {}
            }
            done.push(d);
        }
    }

    /// Submits everything queued, the backlog too, without waiting for completions; a bounded
    /// number of tries, as a stopping worker's last act.
    pub(super) fn submit_what_is_left(&mut self) {
        for _ in 0..64 {
            self.flush_backlog();
            if self.ring.submission().is_empty() && self.backlog.is_empty() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                    tracing::warn!(error = %e, "ring worker: its last submission failed");
                    return;
                }
            }
            // Room for the backlog. With every connection and listener gone, what completes now
            // is a close, a cancellation, a timeout or the wake-up poll; after `STOP_WAIT`, also
            // an operation of what is leaked below. Nothing is left to act on any of them.
            self.ring.completion().for_each(drop);
        }
    }

    /// Polls the worker's wake-up eventfd (multishot), through which commands come.
    pub(super) fn poll_wake(&mut self, fd: &OwnedFd) {
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(K_WAKE);
        // SAFETY: points to nothing; the eventfd is the worker's (`wake`) for its whole life.
        unsafe { self.push(&[e]) };
    }

    /// Arms the tick, `period` from now.
    pub(super) fn tick(&mut self, period: Duration) {
        let ts = types::Timespec::from(period);
        if self.tick_out {
            // The worker arms one tick at a time, so this does not happen; were it to, the one in
            // the kernel keeps its timespec.
            std::mem::forget(std::mem::replace(&mut self.tick, Box::new(ts)));
        } else {
            *self.tick = ts;
        }
        self.tick_out = true;
        let e = opcode::Timeout::new(&*self.tick).build().user_data(K_TICK);
        // SAFETY: the timespec is boxed here, and not written or freed until this timeout
        // completes (`tick_out`, cleared by `reap`) or the ring is gone.
        unsafe { self.push(&[e]) };
    }

    /// Arms a timeout `left` from now in place `place` of the worker's (`Worker::arm_at`), which
    /// its `user_data` carries.
    pub(super) fn until(&mut self, place: usize, left: Duration) {
        if self.untils.len() <= place {
            self.untils.resize_with(place + 1, || None);
        }
        let ts = Box::new(types::Timespec::from(left));
        let e = opcode::Timeout::new(&*ts).build().user_data(user_data(
            K_UNTIL,
            place as u32,
            Side::Up,
        ));
        if let Some(old) = self.untils[place].replace(ts) {
            // A place the worker reuses only once its timeout has completed; were one reused
            // before, its timespec is never freed.
            std::mem::forget(old);
        }
        // SAFETY: the timespec is boxed in `untils`, where it stays until this timeout completes
        // (`reap` frees its place) or the ring is gone.
        unsafe { self.push(&[e]) };
    }

    /// Arms accept `k` of listener `id` (`l`), into its place; with `ioprio`, the flags the kernel
    /// reads there (`with_ioprio`). Nothing if the place is armed already.
    pub(super) fn accept(&mut self, l: &mut Listening, id: u32, k: usize, ioprio: Option<u16>) {
        let fd = l.fd.as_raw_fd();
        let ud = accept_data(K_ACCEPT, id, k);
        let Some(a) = l.accepts.arm(k, ud) else {
            return;
        };
        a.flagged = ioprio.is_some();
        a.len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let e = opcode::Accept::new(
            types::Fd(fd),
            std::ptr::from_mut(&mut a.addr).cast(),
            &mut a.len,
        )
        .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
        .build()
        .user_data(ud);
        let e = match ioprio {
            Some(p) => with_ioprio(e, p),
            None => e,
        };
        // SAFETY: the address and its length are in the listener's boxed places, and the
        // descriptor in the listener; the place is armed until this accept's completion
        // (`Places::done`), and the worker keeps the listener until none is (`maybe_unlistened`;
        // a box with a place armed is never freed: `Places`'s drop).
        unsafe { self.push(&[e]) };
    }

    /// Waits, in accept `k`'s place, for a client on listener `id` (`l`), exclusively: a client
    /// wakes one waiter of all the workers'. Nothing if the place is armed already.
    pub(super) fn poll_accept(&mut self, l: &mut Listening, id: u32, k: usize) {
        let fd = l.fd.as_raw_fd();
        let ud = accept_data(K_READABLE, id, k);
        if l.accepts.arm(k, ud).is_none() {
            return;
        }
        let e = opcode::PollAdd::new(
            types::Fd(fd),
            libc::POLLIN as u32 | libc::EPOLLEXCLUSIVE as u32,
        )
        .build()
        .user_data(ud);
        // SAFETY: points to nothing; the descriptor is the listener's, which stays in the worker
        // until every operation of it has completed (as for accepts).
        unsafe { self.push(&[e]) };
    }

    /// Cancels every operation of listener `l`.
    pub(super) fn cancel_accepts(&mut self, l: &Listening) {
        let fd = types::Fd(l.fd.as_raw_fd());
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(fd).all())
            .build()
            .user_data(K_CLOSE);
        // SAFETY: a cancellation points to nothing.
        unsafe { self.push(&[e]) };
    }

    /// Receives connection `c`'s first bytes from its client into the spare capacity of `pre`,
    /// within `left` (a linked timeout). Nothing if `pre` has no room (or is lent already).
    pub(super) fn recv_pre<C>(&mut self, c: &mut Conn<C>, slot: u32, left: Duration) {
        let (from, _) = c.ends(Side::Up);
        let ud = user_data(K_PRE, slot, Side::Up);
        let Some((ptr, room)) = c.pre.lend_spare(ud) else {
            return;
        };
        c.link = types::Timespec::from(left);
        let recv = opcode::Recv::new(types::Fd(from), ptr, room)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(ud);
        let link = opcode::LinkTimeout::new(&c.link)
            .build()
            .user_data(user_data(K_LINK, slot, Side::Up));
        // SAFETY: the kernel writes at most `room` bytes into `pre`'s spare capacity, lent to
        // this receive (`Own`) until its completion, and copies the timespec, in the connection's
        // box, when it takes the entry; the box stays in its slot, and the client socket in it,
        // until both operations have completed (`refs`).
        unsafe { self.push_for(c, 2, &[recv, link]) };
    }

    /// Makes a backend socket for connection `c`, of `to`'s family.
    pub(super) fn socket<C>(&mut self, c: &mut Conn<C>, slot: u32, to: SocketAddr) {
        let domain = socket2::Domain::for_address(to).into();
        let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let e = opcode::Socket::new(domain, kind, libc::IPPROTO_TCP)
            .build()
            .user_data(user_data(K_SOCKET, slot, Side::Up));
        // SAFETY: making a socket points to nothing.
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Connects `socket`, which becomes connection `c`'s backend, to `c.to`, the timeout `c.link`
    /// linked; with `options`, TCP_NODELAY on and quick ACKs off first, in the same chain
    /// (`Worker::connect_with` says why each is hard-linked and best effort).
    pub(super) fn connect<C>(
        &mut self,
        c: &mut Conn<C>,
        slot: u32,
        socket: OwnedFd,
        options: bool,
    ) {
        let fd = socket.as_raw_fd();
        c.backend = Some(socket);
        let connect = opcode::Connect::new(types::Fd(fd), c.to.as_ptr().cast(), c.to.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(K_CONNECT, slot, Side::Up));
        let link = opcode::LinkTimeout::new(&c.link)
            .build()
            .user_data(user_data(K_LINK, slot, Side::Up));
        if !options {
            // SAFETY: the kernel copies the address and the timespec, in the connection's box,
            // when it takes the entries; the box stays in its slot, and the socket in it, until
            // both operations have completed (`refs`).
            return unsafe { self.push_for(c, 2, &[connect, link]) };
        }
        // The options post no completion unless they fail (SKIP_SUCCESS): two fewer to reap, and
        // none that ends the kernel's wait before the connect's. A failed one's is reaped and
        // passed over. Not counted: they complete before the connect chained after them is issued.
        let quiet = squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS;
        let nodelay = tcp_option(fd, libc::TCP_NODELAY, &ON, nodelay_len())
            .flags(quiet)
            .user_data(user_data(K_SOCKOPT, slot, Side::Up));
        let quickack = tcp_option(fd, libc::TCP_QUICKACK, &OFF, INT_LEN)
            .flags(quiet)
            .user_data(user_data(K_SOCKOPT, slot, Side::Down));
        // SAFETY: as above (the options go before the connect, which keeps the socket open and
        // the box in its slot); the options' values are statics, read an int's worth at most
        // (`tcp_option`).
        unsafe { self.push_for(c, 2, &[nodelay, quickack, connect, link]) };
    }

    /// Arms a receive of connection `c`'s `side` into the pool: multishot, or with `once` a
    /// single receive into one buffer.
    pub(super) fn recv_pool<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side, once: bool) {
        let (from, _) = c.ends(side);
        let e = if once {
            opcode::Recv::new(types::Fd(from), std::ptr::null_mut(), POOL_BUF)
                .buf_group(GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(types::Fd(from), GROUP).build()
        };
        let e = e.user_data(user_data(K_RECV, slot, side));
        // SAFETY: the kernel writes only into pool buffers in its ring, which live as long as the
        // worker (leaked if it exits with operations in the kernel); the socket stays open in the
        // connection until this receive's last completion (`refs`).
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Arms a one-shot receive of connection `c`'s `side` into its own buffer (`pre` towards the
    /// backend, `post` towards the client), emptied first, [`OWN_BUF`] bytes. Nothing if that
    /// buffer is lent already.
    pub(super) fn recv_own<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side) {
        let (from, _) = c.ends(side);
        let ud = user_data(K_RECV, slot, side);
        let Some((ptr, len)) = c.own(side).lend_empty(ud, OWN_BUF) else {
            return;
        };
        let e = opcode::Recv::new(types::Fd(from), ptr, len)
            .build()
            .user_data(ud);
        // SAFETY: the kernel writes at most `len` bytes at `ptr`, the buffer's capacity, lent to
        // this receive (`Own`) until its completion; the socket stays open in the connection
        // until then (`refs`).
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Sends what is left of the buffer at the front of connection `c`'s `side` (a pool buffer
    /// the direction holds, or its own buffer), with `flags` besides MSG_NOSIGNAL and
    /// MSG_DONTWAIT; whether it was pushed (not if the direction holds nothing).
    pub(super) fn send<C>(
        &mut self,
        c: &mut Conn<C>,
        slot: u32,
        side: Side,
        pool: &BufPool,
        flags: i32,
    ) -> bool {
        let (_, to) = c.ends(side);
        let ud = user_data(K_SEND, slot, side);
        let Some(h) = c.dirs[side as usize].held.front() else {
            return false;
        };
        let (off, len) = (h.off as usize, h.len as usize);
        let rest = |bytes: &[u8]| {
            let rest = bytes.get(off..len).unwrap_or_default();
            (rest.as_ptr(), rest.len() as u32)
        };
        let in_pool = match &h.buf {
            Buf::Pool(f) => Some(rest(pool.bytes(f))),
            Buf::Own => None,
        };
        let (ptr, n) = match in_pool {
            Some(at) => at,
            None => {
                let own = c.own(side);
                if !own.lend(ud) {
                    return false;
                }
                rest(&own[..])
            }
        };
        // MSG_DONTWAIT: a send the socket has no room for completes with EAGAIN and the worker
        // polls for room itself (`on_send`). Without it the kernel polls, and a send that finds no
        // room again after that poll fired is handed to an io-wq thread (`iou-wrk`), which
        // blocks in it.
        let e = opcode::Send::new(types::Fd(to), ptr, n)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | flags)
            .build()
            .user_data(ud);
        // SAFETY: the bytes are in a pool buffer (which lives as long as the worker) the direction
        // holds until this send completes (`Dir::sent_from_front` lets it go then), or in the
        // connection's own buffer, lent to this send (`Own`) until its completion; the socket
        // stays open in the connection until then (`refs`).
        unsafe { self.push_for(c, 1, &[e]) };
        true
    }

    /// Polls connection `c`'s `side`'s destination for room (a send found none).
    pub(super) fn poll_room<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side) {
        let (_, to) = c.ends(side);
        self.poll(c, to, libc::POLLOUT, user_data(K_WRITABLE, slot, side));
    }

    /// Polls a splicing direction's socket: its destination for room (`dest`), or its source for
    /// bytes.
    pub(super) fn poll_splice<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side, dest: bool) {
        let (from, to) = c.ends(side);
        let (fd, events) = if dest {
            (to, libc::POLLOUT)
        } else {
            (from, libc::POLLIN)
        };
        self.poll(c, fd, events, user_data(K_SPLICE, slot, side));
    }

    /// Polls `fd`, one of connection `c`'s sockets (`Conn::ends`), for `events`.
    fn poll<C>(&mut self, c: &mut Conn<C>, fd: RawFd, events: i16, ud: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), events as u32)
            .build()
            .user_data(ud);
        // SAFETY: points to nothing; the socket stays open in the connection until the poll
        // completes (`refs`), and a connection's end cancels it with the rest (by descriptor).
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Cancels the receive of connection `c`'s `side`.
    pub(super) fn cancel_recv<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side) {
        let e = opcode::AsyncCancel::new(user_data(K_RECV, slot, side))
            .build()
            .user_data(user_data(K_CANCEL, slot, side));
        // SAFETY: a cancellation points to nothing.
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Cancels every operation on one of connection `c`'s sockets: the client's (`Side::Up`, as
    /// the cancellation's `user_data` says) or the backend's (`Side::Down`); nothing if it has
    /// none.
    pub(super) fn cancel_socket<C>(&mut self, c: &mut Conn<C>, slot: u32, side: Side) {
        let socket = match side {
            Side::Up => &c.client,
            Side::Down => &c.backend,
        };
        let Some(fd) = socket.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data(K_CANCEL, slot, side));
        // SAFETY: a cancellation points to nothing.
        unsafe { self.push_for(c, 1, &[e]) };
    }

    /// Closes `fd` through the ring.
    pub(super) fn close(&mut self, fd: OwnedFd) {
        let e = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .user_data(K_CLOSE);
        // SAFETY: points to nothing; the descriptor was given up above, so nothing else closes it
        // or uses it again.
        unsafe { self.push(&[e]) };
    }
}

/// A completion, as [`Sq::reap`] took it from the ring (nothing else makes one): its
/// `user_data`, result and flags, and what the kernel made for it, to be taken once.
pub(super) struct Done {
    ud: u64,
    res: i32,
    flags: u32,
    /// An accept's client, a socket operation's socket.
    fd: Option<OwnedFd>,
    /// The pool buffer a receive's completion named.
    buf: Option<Filled>,
}

impl Done {
    pub(super) fn user_data(&self) -> u64 {
        self.ud
    }

    pub(super) fn result(&self) -> i32 {
        self.res
    }

    pub(super) fn flags(&self) -> u32 {
        self.flags
    }

    /// The descriptor an accept or a socket operation made (if it succeeded), taken: untaken,
    /// it closes with the completion.
    pub(super) fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// The pool buffer a receive's completion named (if any), taken: the direction's to hold
    /// and give back. Untaken, it never goes back to the kernel.
    pub(super) fn take_buffer(&mut self) -> Option<Filled> {
        self.buf.take()
    }
}

/// A connection's count of its operations in the kernel (but for a backend socket's options,
/// which complete before the connect chained after them is issued): counted up only as [`Sq`]
/// pushes them (`Sq::push_for`), and down by the worker at each one's last completion.
#[derive(Debug, Default)]
pub(super) struct Refs(u32);

impl Refs {
    /// One operation had its last completion.
    pub(super) fn done(&mut self) {
        self.0 -= 1;
    }

    /// Nothing of the connection is in the kernel.
    pub(super) fn none(&self) -> bool {
        self.0 == 0
    }
}

/// A connection's own buffer (`Conn::pre`, `post`): bytes the worker reads freely, and spare
/// capacity lent to at most one operation at a time (a receive into it, or a send from it, by
/// [`Sq`]), whose completion alone sets how much of it is filled ([`Own::returned`]). While lent
/// it is never reallocated or freed: a buffer replaced or dropped then is leaked instead.
#[derive(Debug, Default)]
pub(super) struct Own {
    bytes: Vec<u8>,
    /// The `user_data` of the operation it is lent to.
    lent: Option<u64>,
}

impl From<Vec<u8>> for Own {
    fn from(bytes: Vec<u8>) -> Own {
        Own { bytes, lent: None }
    }
}

impl Deref for Own {
    type Target = [u8];

    /// The bytes filled so far: a receive writes only past them, a send only reads.
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        if self.lent.is_some() {
            // The kernel may still write into it (the worker frees a connection only with
            // nothing in the kernel, so this does not happen).
            std::mem::forget(std::mem::take(&mut self.bytes));
        }
    }
}

impl Own {
    /// Room left for a receive into it.
    pub(super) fn spare(&self) -> usize {
        self.bytes.capacity() - self.bytes.len()
    }

    /// The operation it was lent to (if it was: `user_data` says) completed: it is the worker's
    /// again, and a receive's bytes are counted in.
    pub(super) fn returned(&mut self, done: &Done) {
        if self.lent != Some(done.ud) {
            return;
        }
        self.lent = None;
        if done.ud & 15 != K_SEND && done.res > 0 {
            let len = (self.bytes.len() + done.res as usize).min(self.bytes.capacity());
            // SAFETY: this is the completion of the receive it was lent to (by its `user_data`,
            // one operation at a time), which wrote `res` bytes into the spare capacity it was
            // given, from the end of the bytes filled before (`lend_spare`, `lend_empty`).
            unsafe { self.bytes.set_len(len) };
        }
    }

    /// Lends it to operation `ud` (a send from it); `false` if it is lent already.
    fn lend(&mut self, ud: u64) -> bool {
        if self.lent.is_some() {
            return false;
        }
        self.lent = Some(ud);
        true
    }

    /// Lends its spare capacity to receive `ud`: where, and how many bytes.
    fn lend_spare(&mut self, ud: u64) -> Option<(*mut u8, u32)> {
        if self.lent.is_some() || self.spare() == 0 {
            return None;
        }
        self.lent = Some(ud);
        let spare = self.bytes.spare_capacity_mut();
        Some((spare.as_mut_ptr().cast(), spare.len() as u32))
    }

    /// Empties it and lends `room` bytes of capacity to receive `ud`.
    fn lend_empty(&mut self, ud: u64, room: usize) -> Option<(*mut u8, u32)> {
        if self.lent.is_some() {
            return None;
        }
        self.bytes.clear();
        self.bytes.reserve_exact(room);
        self.lent = Some(ud);
        let len = self.bytes.capacity().min(room) as u32;
        Some((self.bytes.as_mut_ptr(), len))
    }
}

impl<C> Conn<C> {
    /// The connection's own buffer towards `side`'s destination: `pre` towards the backend,
    /// `post` towards the client.
    pub(super) fn own(&mut self, side: Side) -> &mut Own {
        match side {
            Side::Up => &mut self.pre,
            Side::Down => &mut self.post,
        }
    }
}

/// One of a listener's accept places: where an accept has the kernel write its client's address.
pub(super) struct Accepting {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    /// The `user_data` of the accept or wait armed in it, until its completion.
    armed: Option<u64>,
    /// Armed with IORING_ACCEPT_DONTWAIT: an EINVAL is the kernel refusing the flag.
    flagged: bool,
}

impl Accepting {
    fn new() -> Accepting {
        Accepting {
            // SAFETY: a C struct of integers and byte arrays, for which all zeros is a value.
            addr: unsafe { std::mem::zeroed() },
            len: 0,
            armed: None,
            flagged: false,
        }
    }

    /// Its last accept carried IORING_ACCEPT_DONTWAIT.
    pub(super) fn flagged(&self) -> bool {
        self.flagged
    }

    /// The address the kernel wrote, if it is one of the two families a TCP listener accepts.
    pub(super) fn peer(&self) -> Option<SocketAddr> {
        let p = std::ptr::from_ref(&self.addr);
        match i32::from(self.addr.ss_family) {
            libc::AF_INET if self.len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a `sockaddr_in`, and it is aligned for
                // one (sockaddr_storage is aligned for every address type).
                let a = unsafe { &*p.cast::<libc::sockaddr_in>() };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 if self.len as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a `sockaddr_in6`.
                let a = unsafe { &*p.cast::<libc::sockaddr_in6>() };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// A listener's accept places, boxed: the kernel writes into an armed one until its accept
/// completes, whatever happens to the listeners' map. Only [`Sq`] arms a place and only its
/// completion ([`Places::done`]) frees it; none is handed out to be written, and a box with a
/// place still armed is leaked rather than freed.
pub(super) struct Places(Box<[Accepting; ACCEPTS]>);

impl Places {
    pub(super) fn new() -> Places {
        Places(Box::new(std::array::from_fn(|_| Accepting::new())))
    }

    /// Whether any place has an accept (or a wait for a client) in the kernel.
    pub(super) fn armed(&self) -> bool {
        self.0.iter().any(|a| a.armed.is_some())
    }

    /// Place `k`, now armed with operation `ud`; `None` if it is armed already (or no place).
    fn arm(&mut self, k: usize, ud: u64) -> Option<&mut Accepting> {
        let a = self.0.get_mut(k).filter(|a| a.armed.is_none())?;
        a.armed = Some(ud);
        Some(a)
    }

    /// The operation armed in place `k` completed (`done`): the place is free again, and what
    /// the kernel wrote there is read; `None` if there is no place `k`.
    pub(super) fn done(&mut self, k: usize, done: &Done) -> Option<&Accepting> {
        let a = self.0.get_mut(k)?;
        if a.armed == Some(done.ud) {
            a.armed = None;
        }
        Some(a)
    }
}

impl Drop for Places {
    fn drop(&mut self) {
        if self.armed() {
            // The kernel may still write an address into it (the worker drops a listener only
            // with nothing armed, so this does not happen).
            let places = std::mem::replace(
                &mut self.0,
                Box::new(std::array::from_fn(|_| Accepting::new())),
            );
            std::mem::forget(places);
        }
    }
}

/// `e` with `ioprio` set: the `io-uring` crate's accept has no setter for the flags the kernel
/// reads there.
pub(super) fn with_ioprio(e: squeue::Entry, ioprio: u16) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` (the sizes
    // are checked by `transmute`), a plain C struct of integers for which every bit pattern is a
    // value; `ioprio` is its u16 at byte 2 in the kernel's ABI.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(e) };
    raw[2..4].copy_from_slice(&ioprio.to_ne_bytes());
    // SAFETY: as above: any 64 bytes are an `io_uring_sqe`.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// The values of the socket options set on the ring: the kernel reads them when it takes the
/// entry, which for a linked one is after the one before it completes.
static ON: libc::c_int = 1;
static OFF: libc::c_int = 0;
const INT_LEN: u32 = size_of::<libc::c_int>() as u32;

/// Sets the TCP option `name` of `fd` to `value` (`len` bytes of it, an int's at most), on the
/// ring (`SOCKET_URING_OP_SETSOCKOPT`).
fn tcp_option(
    fd: RawFd,
    name: libc::c_int,
    value: &'static libc::c_int,
    len: u32,
) -> squeue::Entry {
    opcode::SetSockOpt::new(
        types::Fd(fd),
        libc::IPPROTO_TCP as u32,
        name as u32,
        std::ptr::from_ref(value).cast(),
        len.min(INT_LEN),
    )
    .build()
}

/// Whether this kernel makes sockets and sets their options on the ring, tried on a ring and a
/// socket of its own (`connect::sockets_on_ring` asks once).
pub(super) fn try_sockets_on_ring() -> io::Result<()> {
    let mut ring = crate::relay::uring::build(4, 4)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Socket::CODE) || !probe.is_supported(opcode::SetSockOpt::CODE) {
        return Err(io::Error::other("no socket or command operation"));
    }
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let e = tcp_option(s.as_raw_fd(), libc::TCP_NODELAY, &ON, INT_LEN);
    // SAFETY: the option's value is a static; the kernel takes the entry in the submission below,
    // before `s` can be closed (an entry never submitted goes with the ring).
    unsafe { ring.submission().push(&e) }.map_err(|_| io::Error::other("no room"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().map_or(-libc::EIO, |c| c.result());
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    if !s.tcp_nodelay()? {
        return Err(io::Error::other("the option set on the ring did not take"));
    }
    Ok(())
}
