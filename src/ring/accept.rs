//! The ring worker's accepts: the accepts each listener keeps in flight, the poll a worker waits
//! in when no client is queued, a listener's end (its last queued clients taken first), and a new
//! or adopted connection's admission and its slot.

use super::*;
use crate::util::accept_failed_one_client;

impl<H: Host> Worker<H> {
    /// Arms accept `k` of listener `id`, unless it is gone or the place is armed already. The
    /// listener stays in `listeners` until every accept of it has completed (`unlisten` cancels
    /// them, `on_accept` removes it after the last).
    pub(super) fn arm_accept(&mut self, id: u32, k: usize) {
        let Some(l) = self.listeners.get_mut(&id) else {
            return;
        };
        // The kernel's own poll for a client re-runs the accept when woken, and if another worker
        // took that client first (they share the listener) the accept is handed to an io-wq
        // thread (work, and a wake-up, from another CPU): with DONTWAIT the worker polls
        // (`arm_readable`) instead.
        let ioprio = self.dontwait.then(accept_flag);
        self.sq.accept(l, id, k, ioprio);
    }

    /// Waits for a client on listener `id` in accept `k`'s place, then accepts (`on_readable`).
    /// Exclusive: a client wakes one waiter of all the workers', not every one.
    fn arm_readable(&mut self, id: u32, k: usize) {
        if let Some(l) = self.listeners.get_mut(&id) {
            self.sq.poll_accept(l, id, k);
        }
    }

    pub(super) fn on_readable(&mut self, id: u32, k: usize, done: &Done) {
        let res = done.result();
        let Some(l) = self.listeners.get_mut(&id) else {
            return;
        };
        if l.accepts.done(k, done).is_none() {
            return;
        }
        if !l.closing {
            // A failed poll (not a cancelled one) is a broken listener: as a failed accept.
            if res < 0 && res != -libc::ECANCELED {
                back_off(l, &mut self.errors, res);
                self.arm_tick();
            } else {
                self.arm_accept(id, k);
            }
        }
        self.maybe_unlistened(id);
    }

    /// A closing listener goes once nothing of it is in the kernel: first taking, unless the
    /// worker is stopping, the clients its waits may have been woken for (`take_stragglers`).
    fn maybe_unlistened(&mut self, id: u32) {
        if !self
            .listeners
            .get(&id)
            .is_some_and(|l| l.closing && !l.armed())
        {
            return;
        }
        let Some(l) = self.listeners.remove(&id) else {
            return;
        };
        if self.stopping.is_none() {
            self.take_stragglers(id, &l.fd);
        }
        drop(l);
        self.host.unlistened(id);
    }

    /// Accepts, without waiting, up to one queued client per accept place of a closing listener. A
    /// new client wakes one exclusive waiter of all those on the socket (`arm_readable`; the
    /// kernel's own poll for an accept is exclusive too), and a wait that completes, or is
    /// cancelled, once its listener is closing takes that wake-up along. Where the socket lives on
    /// (the new process of an upgrade waits on it too) the client would sit in its queue, answered
    /// by no one, until another client woke a waiter there. Each place consumed at most one
    /// wake-up; the host still knows the listener, and serves, hands off or carries these clients
    /// as any other (where the socket closes with this worker, they are served instead of reset).
    /// A listener this worker would block on is left alone: every one sluicegate serves is
    /// non-blocking (`listener.rs`), and the flag is never cleared.
    fn take_stragglers(&mut self, id: u32, fd: &OwnedFd) {
        if !SockRef::from(fd).nonblocking().unwrap_or(false) {
            return;
        }
        let flags = rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC;
        for _ in 0..ACCEPTS {
            match rustix::net::accept_with(fd, flags) {
                Ok(client) => {
                    bump(&self.counts.accepted);
                    self.admit(id, client, None);
                }
                // An error of that client alone (it reset in the queue): the next may be there.
                Err(e) if accept_failed_one_client(e.raw_os_error()) => {}
                // None left (EAGAIN), or none to be had: the listener goes either way.
                Err(_) => return,
            }
        }
    }

    /// `io_uring_enter` keeps failing: no accept of this worker's goes in. Each listener not yet
    /// given up goes to the host (a duplicate of its socket, [`Host::enter_refused`]) and is
    /// unlistened here (its cancellations go in if the ring ever takes entries again).
    pub(super) fn give_up_listeners(&mut self) {
        let open: Vec<u32> = self
            .listeners
            .iter()
            .filter(|(_, l)| !l.closing)
            .map(|(id, _)| *id)
            .collect();
        for id in open {
            match self.listeners.get(&id).map(|l| l.fd.try_clone()) {
                Some(Ok(socket)) => self.host.enter_refused(id, socket),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "ring worker: cannot hand over a listener it cannot serve")
                }
                None => {}
            }
            self.unlisten(id);
        }
    }

    pub(super) fn unlisten(&mut self, id: u32) {
        let Some(l) = self.listeners.get_mut(&id) else {
            return;
        };
        if l.closing {
            return;
        }
        l.closing = true;
        if !l.armed() {
            // Backing off (a wait may have fired and its accept failed): it goes now.
            return self.maybe_unlistened(id);
        }
        self.sq.cancel_accepts(l);
    }

    pub(super) fn on_accept(&mut self, id: u32, k: usize, mut done: Done) {
        let (res, flags) = (done.result(), done.flags());
        let client = done.take_fd();
        let Some(l) = self.listeners.get_mut(&id) else {
            return; // `client`, if any, closes here.
        };
        let Some(a) = l.accepts.done(k, &done) else {
            return;
        };
        let flagged = a.flagged();
        let peer = a.peer();
        // Errors of the connection being accepted (it reset in the backlog) are retried at once;
        // any other (out of descriptors or memory, a broken listener) waits for the tick's slow
        // part, so a listener that keeps failing never spins the thread.
        let empty = res == -libc::EAGAIN;
        // A kernel that reports 6.10+ but refuses the flag (a backport, a patched kernel): accept
        // without it from now on, rather than fail every accept. Each accept that carried it is
        // refused so, not just the first to complete (they are armed together). A listener broken
        // for another reason fails again without the flag, and backs off then.
        let refused_flag = res == -libc::EINVAL && flagged && !l.closing;
        if refused_flag && self.dontwait {
            self.dontwait = false;
            tracing::warn!(
                "ring worker: the kernel refused IORING_ACCEPT_DONTWAIT; accepting without it"
            );
        }
        let failed = res < 0 && res != -libc::ECANCELED && !empty && !refused_flag;
        if failed && !l.closing && !accept_failed_one_client(-res) {
            back_off(l, &mut self.errors, res);
        }
        let (closing, backoff) = (l.closing, l.backoff);
        if !closing && !backoff {
            // No client left (EAGAIN, or the kernel said none followed this one): wait for one.
            if empty || (self.dontwait && res >= 0 && !cqueue::sock_nonempty(flags)) {
                self.arm_readable(id, k);
            } else {
                self.arm_accept(id, k);
            }
        }
        if backoff {
            self.arm_tick();
        }
        // Before the listener may go: the host still knows it while it admits this client.
        if let Some(client) = client {
            bump(&self.counts.accepted);
            self.admit(id, client, peer);
        }
        self.maybe_unlistened(id);
    }

    fn admit(&mut self, id: u32, client: OwnedFd, peer: Option<SocketAddr>) {
        let peer = peer.or_else(|| SockRef::from(&client).peer_addr().ok()?.as_socket());
        let Some(peer) = peer else {
            return; // No address, and gone before it was asked: it closes here.
        };
        let Some(client) = self.host.hand_off(id, client, peer) else {
            return;
        };
        let Some((conn, admit, timeouts)) = self.host.accepted(id, peer, client.as_fd()) else {
            self.close(client);
            return;
        };
        // The preface moves into the connection (no copy); `target` is what comes next: a connect
        // or a wait (`Some`), or reading the client's first bytes (`None`).
        let (pre, preface, reading, target) = match admit {
            Admit::Connect { target, preface } => {
                let n = preface.len() as u32;
                (preface, n, None, Some(target))
            }
            Admit::Read { limit, room } => {
                (Vec::with_capacity(room), 0, Some(self.now + limit), None)
            }
        };
        let c = Box::new(Conn {
            host: Some(conn),
            client: Some(client),
            backend: None,
            // Set by `connect` before the kernel reads them.
            to: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            link: types::Timespec::new(),
            timeouts,
            connected: false,
            relaying: false,
            pre: Own::from(pre),
            preface,
            post: Own::default(),
            reading,
            ack_held: None,
            waiting: false,
            connect_out: None,
            dirs: Default::default(),
            refs: Refs::default(),
            first_fin: None,
            end: None,
            last: self.now,
            accepted: self.now,
            spliced: false,
            carry: false,
        });
        let Some(slot) = self.place(c) else { return };
        match target {
            Some(target) => self.go(slot, target),
            None => self.read_pre(slot),
        }
    }

    /// Gives a new connection a slot; `None` when the worker is stopping (it is cut like the rest).
    fn place(&mut self, c: Box<Conn<H::Conn>>) -> Option<u32> {
        // (An adopted connection may come half-closed.)
        let want = tick_for(&c.timeouts, c.dirs.iter().any(|d| d.shut), self.base_tick);
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(c);
                s
            }
            None => {
                self.conns.push(Some(c));
                (self.conns.len() - 1) as u32
            }
        };
        self.live += 1;
        self.counts.open.store(self.live as u64, Relaxed);
        self.note_tick(want);
        self.arm_tick();
        if self.stopping.is_some() {
            self.finish(slot, Supervised::cut(Outcome::DrainDeadline));
            return None;
        }
        Some(slot)
    }

    /// Relays on a connection carried in from another process, as a connection stopped at a quiet
    /// point goes on (`go_on`): what each direction held is sent first, a FIN passed on there stays
    /// passed on, and its silence so far counts towards its timeouts.
    pub(super) fn adopt(&mut self, a: Adopt<H::Conn>) {
        let Adopt {
            conn,
            client,
            backend,
            held,
            so_far,
            timeouts,
        } = a;
        // Non-blocking, as the worker's own sockets are (`pump` splices on this thread), and the
        // zero linger armed for the transit cleared, so that the connection's end closes each side
        // with a FIN after what it was sent, not a reset that drops it. Failing either, the
        // connection is cut (both reset), as the epoll engine cuts one it cannot take.
        let ready = [&client, &backend].iter().all(|s| {
            let s = SockRef::from(*s);
            s.set_nonblocking(true).is_ok() && s.set_linger(None).is_ok()
        });
        let mut dirs: [Dir; 2] = Default::default();
        let mut first_fin = None;
        let ends = [(held.up_done, so_far.0), (held.down_done, so_far.1)];
        for ((side, d), (done, sent)) in [Side::Up, Side::Down].into_iter().zip(&mut dirs).zip(ends)
        {
            d.sent = sent;
            if done {
                (d.eof, d.shut) = (true, true);
                let _ = direction_ended(side, DirEnd::Eof, &mut first_fin, Watched::default());
            }
        }
        let now = self.now;
        let owned = |d: &mut Dir, bytes: &[u8]| {
            if !bytes.is_empty() {
                d.bytes_wait(now);
                let len = bytes.len() as u32;
                d.held.push_back(Held {
                    buf: Buf::Own,
                    len,
                    off: 0,
                });
            }
        };
        owned(&mut dirs[Side::Up as usize], &held.to_backend);
        owned(&mut dirs[Side::Down as usize], &held.to_client);
        let c = Box::new(Conn {
            host: Some(conn),
            client: Some(client),
            backend: Some(backend),
            to: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            link: types::Timespec::new(),
            // Not new: a client silent so far was not, in the process it comes from.
            timeouts: Timeouts {
                first_byte: None,
                ..timeouts
            },
            connected: true,
            relaying: true,
            pre: Own::from(held.to_backend),
            preface: 0,
            post: Own::from(held.to_client),
            reading: None,
            // Connected in the process it comes from: never connects here.
            ack_held: None,
            waiting: false,
            connect_out: None,
            dirs,
            refs: Refs::default(),
            first_fin,
            end: None,
            last: self.now.checked_sub(held.quiet_for).unwrap_or(self.now),
            accepted: self.now,
            spliced: false,
            carry: false,
        });
        bump(&self.counts.adopted);
        match self.place(c) {
            // Its backend cut on its way here: `Command::BackendCut` may have come first.
            Some(slot) if ready => match self.cut_of(slot) {
                Some(end) => self.finish(slot, end),
                None => self.go_on(slot),
            },
            Some(slot) => self.finish(slot, Supervised::cut(Outcome::ClientReset)),
            None => {}
        }
    }
}

/// Listener `l` failed with `-res` (out of descriptors or memory, refused, broken): it is armed
/// again by the tick's slow part (about every 250 ms, the worker's base tick), so a listener that
/// keeps failing never spins the thread; said at most once a second.
fn back_off(l: &mut Listening, errors: &mut RateLimited, res: i32) {
    l.backoff = true;
    if let Some(suppressed) = errors.allow() {
        let e = io::Error::from_raw_os_error(-res);
        tracing::error!(error = %e, suppressed, "ring worker: accept failed; backing off");
    }
}
