//! The ring worker's relay: each direction's multishot receive into the pool (one-shot when a dry
//! pool wakes it), its sends in order, back-pressure at `CAP`, the held handshake ACK, a bulk
//! direction's move to splice(2), and a FIN or a break passed on.

use super::*;

impl<H: Host> Worker<H> {
    pub(super) fn arm_recv(&mut self, slot: u32, side: Side) {
        self.arm_receive(slot, side, false);
    }

    /// Arms a direction's receive: multishot, or with `once` a single receive into one buffer,
    /// whose completion arms the multishot one again (`on_recv`, as after any last completion).
    fn arm_receive(&mut self, slot: u32, side: Side, once: bool) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let d = c.dir(side);
        d.armed = true;
        d.own = false;
        d.cancelling = false;
        bump(&self.counts.receives_armed);
        self.sq.recv_pool(c, slot, side, once);
    }

    /// Arms a one-shot receive of a direction that holds nothing into the connection's own buffer
    /// (`Conn::pre` towards the backend, `post` towards the client, empty while it holds nothing),
    /// [`OWN_BUF`] bytes: the pool has given every buffer and has none free. So a direction that
    /// holds nothing always moves, however many others hold the pool's buffers; its bytes are sent
    /// from there as a carried-in connection's are (`Buf::Own`), and the buffer is freed once they
    /// are sent. Only a dry pool costs this allocation.
    fn arm_own(&mut self, slot: u32, side: Side) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let d = c.dir(side);
        d.armed = true;
        d.own = true;
        d.cancelling = false;
        bump(&self.counts.receives_armed);
        bump(&self.counts.own_receives);
        self.sq.recv_own(c, slot, side);
    }

    pub(super) fn send_next(&mut self, slot: u32, side: Side) {
        let Some(pool) = self.pool.as_ref() else {
            return;
        };
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let d = c.dir(side);
        // The last bytes before a FIN already read: the FIN is passed on (`shut`) as soon as this
        // send completes, and MSG_MORE keeps them in the socket until then, so they leave in one
        // segment with it, and the peer acknowledges both at once (HAProxy does the same).
        let more = if d.eof && !d.shut && d.held.len() == 1 {
            libc::MSG_MORE
        } else {
            0
        };
        if self.sq.send(c, slot, side, &pool.bufs, more) {
            c.dir(side).sending = true;
        }
    }

    /// Starts the sends this batch's receives call for, once the whole batch is in: a FIN that
    /// came in the same batch is known by then, and leaves with the last bytes (`send_next`).
    /// Nothing is submitted before the batch ends anyway (unless the submission queue fills), so
    /// waiting for its end costs no time. Sends started otherwise (the next after one completes,
    /// after a poll for room, going on after a carry) are pushed at once.
    pub(super) fn send_due(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        for (slot, side) in due.drain(..) {
            let Some(c) = self.conn(slot) else { continue };
            let stopping = c.stopping();
            let d = c.dir(side);
            // A direction that since started a send, or a connection that is ending or stopping
            // to be carried, sends nothing more here; nor does another connection that took the
            // slot meanwhile (its flag is not set).
            if std::mem::take(&mut d.send_due) && !d.sending && !stopping {
                self.send_next(slot, side);
            }
        }
        self.due = due;
    }

    /// Ends the turn for the handshakes' last ACKs held back (`Conn::ack_held`). A connection
    /// connected in the previous turn has had its client receive submitted since, normally with
    /// this turn's entry into the kernel, which completes it at once with whatever the client had
    /// sent by then: bytes (or a FIN) on their way carry the ACK; where none are (a client slow to
    /// speak, a protocol where the server speaks first, bytes kept for a carry) the ACK is sent
    /// now, so the backend sees the connection within a turn, not at the delayed-ACK timer.
    pub(super) fn release_acks(&mut self) {
        let turn = self.turn;
        self.turn += 1;
        let conns = &mut self.conns;
        self.acks.retain(|&(slot, since)| {
            if since == turn {
                return true;
            }
            let Some(c) = at(conns, slot).filter(|c| c.ack_held == Some(since)) else {
                return false; // Sent, or the connection is gone.
            };
            let up = &c.dirs[Side::Up as usize];
            // A connection stopping to be carried sends nothing more from here.
            let carried = !c.carry && (up.sending || !up.held.is_empty() || up.eof || up.sent > 0);
            if carried || c.end.is_some() {
                // Leaves with what is sent, or with the FIN or reset the end sends.
                c.ack_held = None;
            } else {
                send_held_ack(c);
            }
            false
        });
    }

    pub(super) fn on_recv(&mut self, slot: u32, side: Side, mut done: Done) {
        let (res, flags) = (done.result(), done.flags());
        let more = cqueue::more(flags);
        let now = self.now;
        let pool = self.pool.as_ref();
        let cap = cap_of(pool);
        let spent = pool.is_some_and(Pool::spent);
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let ending = c.end.is_some();
        let carry = c.carry;
        // Into the connection's own buffer (`arm_own`): one-shot, and names no pool buffer. The
        // bytes it read count in that buffer first (`Own::returned`).
        let own = c.dir(side).own;
        let buf = if own {
            c.own(side).returned(&done);
            Some(Buf::Own)
        } else {
            done.take_buffer().map(Buf::Pool)
        };
        if !more {
            c.receive_ended(side);
        }
        let mut r = Received::default();
        if res > 0 && buf.is_none() {
            // A receive into the pool that names no buffer: the kernel broke its own contract.
            r.broke = Some(io::Error::other(
                "a receive into the pool completed without a buffer",
            ));
        } else if let (true, Some(buf)) = (res > 0, buf) {
            if ending {
                if let (Some(p), Buf::Pool(f)) = (pool, buf) {
                    p.give_back(f);
                    r.returned = 1;
                }
            } else {
                c.keep_received(side, buf, res as u32, pool, now);
                // Stopping to be carried: kept, to go along (its receive is being cancelled).
                if !carry {
                    r = c.received_calls_for(side, res as u32, cap, self.splice);
                }
            }
        } else if res == 0 {
            let d = c.dir(side);
            d.eof = true;
            // Not once the connection is ending: a cut's reset must not follow a clean FIN. Nor
            // while it stops to be carried: whether it can go is decided once it is quiet.
            r.shut = d.should_shut() && !ending && !carry;
        } else if res == -libc::ENOBUFS {
            bump(&self.counts.starved);
            r.own_next = c.ran_dry(slot, side, spent, &mut self.starved);
        } else if res != -libc::ECANCELED {
            r.broke = Some(io::Error::from_raw_os_error(-res));
        }
        let ending = c.stopping();
        r.rearm = !more && c.dir(side).should_arm(ending, cap);
        if r.send {
            c.dir(side).send_due = true;
            self.due.push((slot, side));
        }
        self.after_recv(slot, side, res, more, r);
    }

    /// Acts on what a receive's completion called for ([`Received`], decided by `on_recv` while it
    /// held the connection), in this order: the cancel of its receive, then one of: the break, the
    /// FIN passed on, the receive armed again (into its own buffer when the pool is spent), or a
    /// move to splice after a last completion; then the pool grown if it ran dry, and the buffers
    /// given back counted.
    fn after_recv(&mut self, slot: u32, side: Side, res: i32, more: bool, r: Received) {
        if r.cancel {
            self.cancel_recv(slot, side, !r.to_splice);
        }
        if let Some(e) = r.broke {
            self.broke(slot, side, DirEnd::SourceError(e));
        } else if r.shut {
            self.shut(slot, side);
        } else if r.rearm && r.own_next {
            self.arm_own(slot, side);
        } else if r.rearm {
            self.arm_recv(slot, side);
        } else if !more {
            self.maybe_splice(slot, side);
        }
        if res == -libc::ENOBUFS {
            self.grow_pool();
        }
        self.buffers_back(r.returned);
        self.maybe_free(slot);
    }

    /// Cancels a direction's receive; `at_cap`: because the direction holds `CAP` buffers (else it
    /// turned bulk).
    fn cancel_recv(&mut self, slot: u32, side: Side, at_cap: bool) {
        if at_cap {
            bump(&self.counts.cancels_at_cap);
        }
        if let Some(c) = at(&mut self.conns, slot) {
            self.sq.cancel_recv(c, slot, side);
        }
    }

    /// The pool ran dry: it gives the kernel buffers it has not had yet, while any are left, and
    /// the directions it could not serve receive again at once.
    fn grow_pool(&mut self) {
        let Some(pool) = &self.pool else { return };
        if pool.bufs.grow(POOL_GROW) > 0 {
            self.counts
                .pool_given
                .store(u64::from(pool.bufs.given()), Relaxed);
            self.wake_starved(usize::MAX);
        }
    }

    pub(super) fn on_send(&mut self, slot: u32, side: Side, done: &Done) {
        let res = done.result();
        let now = self.now;
        let cap = cap_of(self.pool.as_ref());
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        // Sent from its own buffer, that buffer is the worker's again.
        c.own(side).returned(done);
        c.refs.done();
        let ending = c.stopping();
        if res == -libc::EAGAIN && !ending {
            // No room: still sending (nothing else goes out, no FIN), once the socket has some
            // (`on_writable`).
            return self.sq.poll_room(c, slot, side);
        }
        let d = c.dir(side);
        d.sending = false;
        if res < 0 {
            return self.send_failed(slot, side, res, ending);
        }
        c.last = now;
        let preface = if side == Side::Up { c.preface } else { 0 };
        let relaying = c.relaying;
        let d = c.dir(side);
        let front = d.sent_from_front(res as u32, preface);
        let more_to_send = !d.held.is_empty();
        d.bytes_taken(now, more_to_send || d.sending);
        if !more_to_send && relaying && !ending {
            // It waited for the pool with buffers of its own; holding none now, it receives at
            // once (into its own buffer if the pool is still dry: `on_recv`), not when buffers
            // come back. Its entry in `starved` is passed over (`Dir::leaves_starved`).
            d.starved = None;
        }
        let shut = d.should_shut();
        let rearm = relaying && d.should_arm(ending, cap);
        // Connected while connections are being carried away, with a preface to send first: it
        // goes now that the preface is out (see `on_connect`).
        let carry_now =
            front.owned_sent && side == Side::Up && !relaying && self.carrying && !ending;
        if front.owned_sent {
            c.free_owned(side);
        }
        c.carry |= carry_now;
        if let Some(h) = c.host.as_mut().filter(|_| front.preface_out && !ending) {
            self.host.established(h);
        }
        let given = front.given.is_some();
        if let (Some(f), Some(p)) = (front.given, &self.pool) {
            p.give_back(f);
        }
        if carry_now {
            self.cancel_all(slot);
        } else if !ending {
            if more_to_send {
                self.send_next(slot, side);
            } else if shut {
                self.shut(slot, side);
            }
            if front.owned_sent && !relaying {
                self.relay(slot);
            } else if rearm && !shut {
                self.arm_recv(slot, side);
            }
            self.maybe_splice(slot, side);
        }
        self.buffers_back(usize::from(given));
        self.maybe_free(slot);
    }

    /// A send of connection `slot`'s `side` failed with `-res` (`ending`: it was stopping then).
    fn send_failed(&mut self, slot: u32, side: Side, res: i32, ending: bool) {
        let Some(c) = self.conn(slot) else { return };
        // Stopping to be carried, a send that found no room (or was cancelled) leaves its bytes
        // held for the process the connection goes to; one that failed ends it here, as a failed
        // receive does. It took the socket's error with it: the new process would meet a FIN
        // where the peer had reset.
        let failed =
            !ending || (c.end.is_none() && res != -libc::EAGAIN && res != -libc::ECANCELED);
        if failed {
            let e = io::Error::from_raw_os_error(-res);
            // Nothing of the client's counted as sent (a partial `pre` past its preface is not
            // taken back): another backend can have the whole of it.
            if side == Side::Up && !c.relaying && c.dirs[Side::Up as usize].sent == 0 {
                return self.first_bytes_failed(slot, e);
            }
            self.broke(slot, side, DirEnd::DestError(e));
        }
        self.maybe_free(slot);
    }

    /// The socket a send found full has room (or an error, which the send will meet): send again.
    pub(super) fn on_writable(&mut self, slot: u32, side: Side) {
        if self.completed(slot) {
            self.send_next(slot, side);
        }
    }

    /// A bulk direction whose receive has ended and whose held bytes are sent takes a pipe and
    /// splices from now on; with no pipe to be had it goes back to receiving.
    pub(super) fn maybe_splice(&mut self, slot: u32, side: Side) {
        let pipes = self.pipes;
        let cap = cap_of(self.pool.as_ref());
        let Some(c) = self.conn(slot) else { return };
        let d = &mut c.dirs[side as usize];
        if c.end.is_some() || c.carry || !d.may_splice() {
            return;
        }
        let Some(pipe) = pipes.lend() else {
            d.back_to_receiving();
            if d.should_arm(false, cap) {
                self.arm_recv(slot, side);
            }
            return;
        };
        d.pipe = Some(pipe);
        // Its last receive may have ended for want of a buffer: that no longer matters (its entry
        // in `starved` is passed over: `Dir::leaves_starved`).
        d.starved = None;
        c.spliced = true;
        self.pump(slot, side, false);
    }

    /// Moves a splicing direction's bytes, socket → pipe → socket with non-blocking splice(2) on
    /// this thread (the ring's splice is always handed to io-wq), until a socket would block, then
    /// polls it through the ring. At most `SPLICE_ROUNDS` calls at a time: a direction that never
    /// blocks polls a ready socket (which completes at once) and lets the others go first.
    ///
    /// `readable`: its source was just polled readable. If splice still finds nothing to read, the
    /// socket is at TCP urgent data, where splice stops and poll keeps saying readable: polling
    /// again would spin, so the direction goes back to receiving (which reads past it), for good.
    /// The same when splice reads an end of stream with bytes still queued past the mark.
    pub(super) fn pump(&mut self, slot: u32, side: Side, readable: bool) {
        let now = self.now;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let (Some(client), Some(backend)) = (c.client.as_ref(), c.backend.as_ref()) else {
            return;
        };
        let (from, to) = match side {
            Side::Up => (client.as_fd(), backend.as_fd()),
            Side::Down => (backend.as_fd(), client.as_fd()),
        };
        let d = &mut c.dirs[side as usize];
        let Some(pumped) = splice_rounds(d, from, to, readable) else {
            return;
        };
        let pending = pumped.pending;
        if pumped.taken || !pending {
            d.bytes_taken(now, pending);
        } else {
            d.bytes_wait(now);
        }
        if pumped.moved {
            c.last = now;
        }
        match pumped.next {
            Pump::Wait { dest } => self.sq.poll_splice(c, slot, side, dest),
            Pump::Eof => {
                let d = c.dir(side);
                // Empty (it is filled only once empty): back to the pool for others now, not
                // when the connection ends.
                d.pipe = None;
                if d.should_shut() {
                    self.shut(slot, side);
                }
            }
            Pump::Stuck => {
                let cap = cap_of(self.pool.as_ref());
                let d = c.dir(side);
                d.back_to_receiving();
                bump(&self.counts.splices_stuck);
                if d.should_arm(false, cap) {
                    self.arm_recv(slot, side);
                }
            }
            Pump::Broke(end) => self.broke(slot, side, end),
        }
    }

    /// A splicing direction's socket is ready, or its poll failed.
    pub(super) fn on_splice_ready(&mut self, slot: u32, side: Side, res: i32) {
        if !self.completed(slot) {
            return;
        }
        // It polled its destination for room when the pipe held bytes, else its source.
        let Some(c) = self.conn(slot) else { return };
        let to_dest = c.dir(side).pipe.as_ref().is_some_and(|p| p.pending > 0);
        if res < 0 {
            // Not a cancellation (that comes only to an ending connection): the poll itself
            // failed, and polling again would only fail again.
            let e = io::Error::from_raw_os_error(-res);
            let end = if to_dest {
                DirEnd::DestError(e)
            } else {
                DirEnd::SourceError(e)
            };
            return self.broke(slot, side, end);
        }
        let readable = !to_dest && res & i32::from(libc::POLLIN) != 0;
        self.pump(slot, side, readable);
    }

    /// `n` pool buffers came back (from a send, an ending receive, a freed or carried
    /// connection): the directions a dry pool stopped receive again now, two per buffer (each
    /// that finds the pool dry again costs an operation), the rest on the tick's slow part.
    pub(super) fn buffers_back(&mut self, n: usize) {
        if n > 0 && !self.starved.is_empty() {
            self.wake_starved(2 * n);
        }
    }

    /// Arms the receives of up to `most` directions the pool could not serve, those that have
    /// waited longest first (`Starved`); an entry that is no longer its direction's place is
    /// skipped (`Dir::leaves_starved`).
    /// Each receives once, into one buffer: a multishot receive with bytes waiting behind it would
    /// take every buffer that came back (the kernel goes on past the cap before the worker can
    /// cancel it), and leave those woken after it, one that holds none among them (no send of its
    /// own will wake it), dry until the tick's slow part. Of those woken here with bytes waiting,
    /// each gets one buffer, in the order they are pushed, before any gets a second.
    pub(super) fn wake_starved(&mut self, most: usize) {
        let cap = cap_of(self.pool.as_ref());
        let mut woken = 0;
        while woken < most {
            let Some((slot, side, ticket)) = self.starved.next() else {
                return;
            };
            let Some(c) = self.conn(slot) else { continue };
            let ending = c.stopping();
            let d = c.dir(side);
            if !d.leaves_starved(ticket) {
                continue;
            }
            if d.should_arm(ending, cap) {
                woken += 1;
                self.arm_receive(slot, side, true);
            }
        }
    }

    /// Passes a FIN on: the destination's write side shut down.
    pub(super) fn shut(&mut self, slot: u32, side: Side) {
        let now = self.now;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let r = match c.dest(side) {
            Some(to) => rustix::net::shutdown(to, rustix::net::Shutdown::Write),
            // Gone (as a closed descriptor would say).
            None => Err(rustix::io::Errno::BADF),
        };
        if let Err(e) = r {
            return self.broke(slot, side, DirEnd::DestError(e.into()));
        }
        c.dir(side).shut = true;
        if let Some(h) = c.host.as_ref() {
            self.host.half_closed(h);
        }
        // Half-closing restarts the clock (then against `half_close_timeout`).
        c.last = now;
        let _ = direction_ended(side, DirEnd::Eof, &mut c.first_fin, Watched::default());
        if c.both_shut() {
            let end = Supervised::ended(c.first_fin.unwrap_or(Outcome::ClientClosed));
            return self.finish(slot, end);
        }
        let timeouts = c.timeouts;
        self.note_tick(tick_for(&timeouts, true, self.base_tick));
    }

    /// A side broke: the other sees a reset.
    fn broke(&mut self, slot: u32, side: Side, end: DirEnd) {
        let Some(c) = self.conn(slot) else { return };
        if let Some(s) = direction_ended(side, end, &mut c.first_fin, c.timeouts.watched) {
            self.finish(slot, s);
        }
    }
}

/// What a splicing direction does after its last splice.
enum Pump {
    /// Poll a socket, then splice again: the destination for room (`dest`), or the source for
    /// bytes.
    Wait { dest: bool },
    /// The source's FIN: pass it on.
    Eof,
    /// Splice stopped at urgent data in the source (see `stuck_at_urgent`): receive instead.
    Stuck,
    /// A side failed.
    Broke(DirEnd),
}

/// What one `Worker::pump` of a splicing direction did (`splice_rounds`).
struct Pumped {
    /// A splice succeeded, other than one that read the end of the stream: the connection was
    /// not idle (`Conn::last`).
    moved: bool,
    /// Its destination took bytes.
    taken: bool,
    /// Bytes are left in the pipe.
    pending: bool,
    next: Pump,
}

/// The splicing part of `Worker::pump`: moves direction `d`'s bytes, socket `from` → its pipe →
/// socket `to`, with non-blocking splice(2), at most `SPLICE_ROUNDS` calls, emptying the pipe
/// before filling it again, and counts what its destination took as sent. Returns what it did and
/// what the direction does next, or `None` when it has no pipe. `readable`: as for `pump`.
#[inline]
fn splice_rounds(
    d: &mut Dir,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    readable: bool,
) -> Option<Pumped> {
    const SPLICE_ROUNDS: usize = 32;
    let pipe = d.pipe.as_mut()?;
    let mut moved = false;
    let mut taken = false;
    let mut next = None;
    for round in 0..SPLICE_ROUNDS {
        // Empty the pipe before filling it again.
        let out = pipe.pending > 0;
        let (r, failed): (_, fn(io::Error) -> DirEnd) = if out {
            (pipe.drain_to(to), DirEnd::DestError)
        } else {
            (pipe.fill_from(from, PIPE_SIZE), DirEnd::SourceError)
        };
        match r {
            Ok(0) if !out => {
                next = Some(match stuck_at_urgent(from, true) {
                    Ok(true) => Pump::Stuck,
                    Ok(false) => {
                        d.eof = true;
                        Pump::Eof
                    }
                    Err(e) => Pump::Broke(failed(e)),
                });
                break;
            }
            Ok(n) => {
                moved = true;
                if out {
                    taken |= n > 0;
                    d.sent += n as u64;
                    d.unflushed += n as u64;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                next = Some(if readable && round == 0 && !out {
                    Pump::Stuck
                } else {
                    Pump::Wait { dest: out }
                });
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                next = Some(Pump::Broke(failed(e)));
                break;
            }
        }
    }
    // Out of rounds: wait for what it would do next, which is ready (a yield).
    let pending = pipe.pending > 0;
    let next = next.unwrap_or(Pump::Wait { dest: pending });
    Some(Pumped {
        moved,
        taken,
        pending,
        next,
    })
}

/// What a receive's completion calls for: decided by `Worker::on_recv` while it holds the
/// connection, acted on after (`Worker::after_recv`).
#[derive(Default)]
struct Received {
    /// Its bytes are to be sent once the whole batch is in (`Worker::send_due`).
    send: bool,
    /// Its receive is to be cancelled.
    cancel: bool,
    /// The cancel is for the move to splice (else the direction is at the cap).
    to_splice: bool,
    /// Its FIN is to be passed on.
    shut: bool,
    /// Its source failed.
    broke: Option<io::Error>,
    /// Pool buffers given back (an ending connection's receive).
    returned: usize,
    /// The pool is spent and it holds nothing: it receives next into its own buffer (`arm_own`).
    own_next: bool,
    /// Its receive is to be armed again.
    rearm: bool,
}

impl<C> Conn<C> {
    /// The connection's own buffer towards `side`'s destination (`Buf::Own`) is sent: freed.
    #[inline]
    fn free_owned(&mut self, side: Side) {
        match side {
            Side::Up => {
                self.pre = Own::default();
                // What the connection's own buffer carries from now on (`arm_own`) is the
                // client's.
                self.preface = 0;
            }
            Side::Down => self.post = Own::default(),
        }
    }

    /// A receive of `side` had its last completion: it is no longer in the kernel.
    #[inline]
    fn receive_ended(&mut self, side: Side) {
        self.refs.done();
        let d = self.dir(side);
        d.armed = false;
        d.own = false;
        d.cancelling = false;
    }

    /// Holds the `n` bytes a receive of `side` just brought in `buf`: a pool buffer, counted as
    /// taken, or the connection's own (`Worker::arm_own`), whose length its completion set
    /// (`Own::returned`). They wait for their destination from `now`.
    #[inline]
    fn keep_received(&mut self, side: Side, buf: Buf, n: u32, pool: Option<&Pool>, now: Instant) {
        if let (Buf::Pool(_), Some(p)) = (&buf, pool) {
            p.took();
        }
        self.last = now;
        let d = self.dir(side);
        d.bytes_wait(now);
        d.held.push_back(Held {
            buf,
            len: n,
            off: 0,
        });
    }

    /// What the `n` bytes just held (`keep_received`) call for, when the connection is not
    /// stopping to be carried: a send, unless one is in the kernel or due; a cancel of the receive
    /// once the direction holds `cap` buffers; and, where the worker splices (`splice`), the move
    /// to splice of a direction they make bulk.
    #[inline]
    fn received_calls_for(&mut self, side: Side, n: u32, cap: usize, splice: bool) -> Received {
        let d = self.dir(side);
        let send = !d.sending && !d.send_due;
        let mut cancel = d.should_cancel(cap);
        let mut to_splice = false;
        if splice && d.turns_bulk(n) {
            // Its receive ends here (what it already took is sent first), then it splices.
            d.bulk = true;
            to_splice = true;
            if d.armed && !d.cancelling {
                cancel = true;
            }
        }
        if cancel {
            d.cancelling = true;
        }
        Received {
            send,
            cancel,
            to_splice,
            ..Received::default()
        }
    }

    /// A receive of `side` found the pool dry (ENOBUFS): returns whether it receives into its own
    /// buffer at once; if not, it waits for buffers in `starved` (unless it already does).
    #[inline]
    fn ran_dry(&mut self, slot: u32, side: Side, spent: bool, starved: &mut Starved) -> bool {
        // Holding nothing, no send of its own would wake it, and with every buffer given (`spent`)
        // the others may hold them for as long as their destinations do not read: it receives
        // into its own buffer at once. Holding some, it waits for buffers to come back (its
        // own sends give them).
        let holds_none = self.dir(side).held.is_empty() && self.owned(side).is_empty();
        let d = self.dir(side);
        if spent && holds_none {
            return true;
        }
        if d.starved.is_none() {
            d.starved = Some(starved.push(slot, side));
        }
        false
    }
}

/// Sends the handshake's last ACK, held back since the connect (`backend_socket`), if it still is:
/// turning quick ACKs on sends an ACK the kernel holds.
pub(super) fn send_held_ack<C>(c: &mut Conn<C>) {
    if let Some(b) = c.backend.as_ref() {
        // Best effort: the delayed-ACK timer sends it otherwise.
        let _ = SockRef::from(b).set_tcp_quickack(true);
    }
    c.ack_held = None;
}

/// The directions a dry pool stopped (their receive ended with ENOBUFS), in the order they ran
/// dry, so that the buffers that come back wake those that have waited longest, and one that runs
/// dry again goes to the back. Each entry has a ticket, kept in its direction (`Dir::starved`), so
/// that an entry left behind cannot stand for the direction's newer place.
#[derive(Debug, Default)]
pub(super) struct Starved {
    queue: VecDeque<(u32, Side, u32)>,
    tickets: u32,
}

impl Starved {
    /// Puts a direction at the back; returns its ticket.
    pub(super) fn push(&mut self, slot: u32, side: Side) -> u32 {
        let ticket = self.tickets;
        // Wraps after 2^32 pushes: every entry is gone long before (the first slow part of the tick
        // after it, 250 ms in service, takes them all out).
        self.tickets = self.tickets.wrapping_add(1);
        self.queue.push_back((slot, side, ticket));
        ticket
    }

    /// The entry that has waited longest, taken out.
    pub(super) fn next(&mut self) -> Option<(u32, Side, u32)> {
        self.queue.pop_front()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// What a send's completion let go of at the front of its direction (`Dir::sent_from_front`).
#[derive(Default)]
struct SentFront {
    /// The pool buffer it emptied, to give back.
    given: Option<Filled>,
    /// It emptied the connection's own buffer (`Buf::Own`), which is freed (`Conn::free_owned`).
    owned_sent: bool,
    /// The last of the preface went with it.
    preface_out: bool,
}

impl Dir {
    /// A send of the front of what it holds took `n` bytes: they count as sent (but for what of
    /// them is the `preface` at the front of the connection's own buffer), and the front goes once
    /// all of it is out.
    #[inline]
    fn sent_from_front(&mut self, n: u32, preface: u32) -> SentFront {
        let mut counted = n;
        let mut front = SentFront::default();
        let mut emptied = false;
        if let Some(h) = self.held.front_mut() {
            if matches!(h.buf, Buf::Own) {
                // The preface is not the client's: only what follows it counts as relayed.
                counted = n - preface.saturating_sub(h.off).min(n);
                // Credited once it is out (`established`), unless the connection is ending.
                front.preface_out = h.off < preface && h.off + n >= preface;
            }
            h.off += n;
            emptied = h.off >= h.len;
        }
        if emptied {
            match self.held.pop_front().map(|h| h.buf) {
                Some(Buf::Own) => front.owned_sent = true,
                Some(Buf::Pool(f)) => front.given = Some(f),
                None => {}
            }
        }
        self.sent += u64::from(counted);
        self.unflushed += u64::from(counted);
        front
    }
}
