//! How a ring worker's connection ends: its operations cancelled (asked again while its connect
//! is not yet issued), its slot freed once nothing of it is in the kernel, its sockets closed on
//! the ring; and the cuts and carries the control plane asks for.

use super::flow::send_held_ack;
use super::*;

impl<H: Host> Worker<H> {
    /// Decides how the connection ends (the first decision stands) and takes back what it has in
    /// the kernel; it is freed when the last of that completes.
    pub(super) fn finish(&mut self, slot: u32, end: Supervised) {
        let Some(c) = self.conn(slot) else { return };
        if c.end.is_some() {
            return;
        }
        c.end = Some(end);
        if std::mem::take(&mut c.waiting) {
            // Not asked again: the slot may hold another connection by then.
            self.waiting.retain(|&s| s != slot);
        }
        self.cancel_all(slot);
        self.maybe_free(slot);
    }

    /// Cancels every operation connection `slot` has in the kernel, by descriptor: the client's
    /// (`Side::Up` in the cancellation's `user_data`) and the backend's (`Side::Down`).
    pub(super) fn cancel_all(&mut self, slot: u32) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        if c.refs.none() {
            return;
        }
        for side in [Side::Up, Side::Down] {
            self.sq.cancel_socket(c, slot, side);
        }
    }

    /// A cancellation completed. One of an ending connection's backend operations that found
    /// nothing while its connect is out came before the kernel issued that connect: chained after
    /// the socket's options (`connect_with`) and submitted with the cancellation, it is issued
    /// only from the work the kernel defers to the worker's next wait. Asked again (its hold on the
    /// connection passed on) once that work has run, it finds the connect, so the connection ends
    /// now and not at the connect's timeout. After turns that did not wait (`Worker::waited`) it is
    /// asked again without counting; after those that did, `RECANCELS` times at most (a wait may
    /// run only part of the deferred work): the timeout ends it anyway.
    pub(super) fn on_cancel(&mut self, slot: u32, side: Side, res: i32) {
        let waited = self.waited;
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        // A cancellation of all of a descriptor's operations completes with how many it found.
        // (`cancel_recv`'s, of one, completes with 0 when it found it, but never while a connect
        // is out: receives are armed once connected.)
        let retry = recancel(res, side, c.end.is_some(), c.connect_out, waited);
        match retry.filter(|_| c.backend.is_some()) {
            Some(counted) => {
                c.connect_out = Some(counted);
                bump(&self.counts.recancels);
                // Its hold on the connection passes to the one asked again.
                c.refs.done();
                self.sq.cancel_socket(c, slot, side);
            }
            None => self.release(slot),
        }
    }

    /// An operation of connection `slot` completed for the last time: whether the connection goes
    /// on (it is there and not stopping; an ending one is freed, and one stopping to be carried
    /// goes, if that was its last operation).
    pub(super) fn completed(&mut self, slot: u32) -> bool {
        let Some(c) = self.conn(slot) else {
            return false;
        };
        c.refs.done();
        if c.stopping() {
            self.maybe_free(slot);
            return false;
        }
        true
    }

    /// An operation that only held the connection (a linked timeout, a cancellation) completed.
    pub(super) fn release(&mut self, slot: u32) {
        if let Some(c) = self.conn(slot) {
            c.refs.done();
            self.maybe_free(slot);
        }
    }

    pub(super) fn maybe_free(&mut self, slot: u32) {
        let Some(c) = self.conn(slot) else { return };
        if !c.refs.none() {
            return;
        }
        if c.end.is_none() {
            if c.carry {
                self.quiet(slot);
            }
            return;
        }
        let Some(mut c) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.live -= 1;
        self.counts.open.store(self.live as u64, Relaxed);
        let Some(end) = c.end.take() else { return };
        let mut returned = 0;
        if let Some(p) = &self.pool {
            for d in &mut c.dirs {
                for h in d.held.drain(..) {
                    if let Buf::Pool(f) = h.buf {
                        p.give_back(f);
                        returned += 1;
                    }
                }
            }
        }
        self.buffers_back(returned);
        self.note_pool_held();
        let (reset_client, reset_backend) = (end.reset_client, end.reset_backend);
        self.account_end(&mut c, end);
        // After the accounting: whoever sees the close finds the connection counted.
        for (fd, reset) in [
            (c.client.take(), reset_client),
            (c.backend.take(), reset_backend),
        ] {
            let Some(fd) = fd else { continue };
            if reset {
                // Best effort: if the option cannot be set the socket still closes, with a FIN.
                let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
            }
            self.close(fd);
        }
    }

    /// Tells the host that connection `c` ended, as `end` says: the bytes it sent since the last
    /// tick, then its totals (once: the host's part is taken).
    pub(super) fn account_end(&mut self, c: &mut Conn<H::Conn>, end: Supervised) {
        let Some(h) = c.host.take() else { return };
        let (up, down) = (c.dirs[0].unflushed, c.dirs[1].unflushed);
        if up + down > 0 {
            self.host.sent(&h, up, down);
        }
        let finished = Finished {
            bytes_up: c.dirs[0].sent,
            bytes_down: c.dirs[1].sent,
            end: end.end,
            broken: end.broken,
            spliced: c.spliced,
        };
        self.host.ended(h, finished);
    }

    /// Closes `fd` through the ring.
    pub(super) fn close(&mut self, fd: OwnedFd) {
        self.sq.close(fd);
    }

    pub(super) fn cut_all(&mut self, end: Outcome) {
        for slot in 0..self.conns.len() as u32 {
            if self.conn(slot).is_some() {
                self.finish(slot, Supervised::cut(end));
            }
        }
    }

    /// Whether the host says connection `slot` is cut, and why.
    pub(super) fn cut_of(&mut self, slot: u32) -> Option<Supervised> {
        let h = at(&mut self.conns, slot)?.host.as_ref()?;
        self.host.cut(h)
    }

    /// Cuts the relayed connections the host says are cut (`Host::cut`), and those an operator
    /// killed before they connected (reading a header, waiting for a backend, connecting): a
    /// backend's cut reaches those as they connect, a kill at once.
    pub(super) fn cut_those_cut(&mut self) {
        let mut ending = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c.as_deref() else { continue };
            let Some(h) = c.host.as_ref() else { continue };
            if c.end.is_none() {
                match self.host.cut(h) {
                    Some(end) if c.connected || end.end == Outcome::Killed => {
                        ending.push((slot as u32, end));
                    }
                    _ => {}
                }
            }
        }
        for (slot, end) in ending {
            self.finish(slot, end);
        }
    }

    /// Starts carrying every relayed connection away (`Command::Carry`), and each that connects
    /// from now on, until the host takes no more. One still reading a header or waiting for a
    /// backend goes once it connects, if the host still takes connections then; else it stays (and
    /// drains), as in `session`.
    pub(super) fn carry_all(&mut self) {
        self.carrying = true;
        for slot in 0..self.conns.len() as u32 {
            let Some(c) = self.conn(slot) else { continue };
            // One still sending its first bytes goes once they are out (`on_send`): carried now,
            // the rest of a preface would reach the new process as the client's bytes, and a
            // failed send could no longer try another backend.
            if c.stopping() || !c.relaying || c.host.is_none() {
                continue;
            }
            c.carry = true;
            self.cancel_all(slot);
            self.maybe_free(slot);
        }
    }

    /// A connection stopping to be carried has nothing left in the kernel: it goes to the host,
    /// with what each direction holds, or, when it cannot go, it goes on here.
    fn quiet(&mut self, slot: u32) {
        // A FIN read and not passed on, with nothing before it left to send: passed on now. With
        // bytes before it still held, the direction goes as not ended: a socket that has read its
        // FIN reads it again, so the process it goes to sends those bytes, then meets the FIN and
        // passes it on.
        for side in [Side::Up, Side::Down] {
            let Some(c) = self.conn(slot) else { return };
            if !c.dir(side).should_shut() {
                continue;
            }
            self.shut(slot, side);
            if self.conn(slot).is_none_or(|c| c.end.is_some()) {
                return; // Both FINs passed on, or a side broke: it ended (and is freed) here.
            }
        }
        if let Some(c) = self.conn(slot).filter(|c| c.ack_held.is_some()) {
            // Its handshake's last ACK waits for bytes that this process may not send: out now,
            // or the backend would see the connection only at the delayed-ACK timer.
            send_held_ack(c);
        }
        let carrier = match self.carrying.then(|| self.host.carrier()).flatten() {
            Some(to) => to,
            None => {
                self.carrying = false;
                return self.go_on(slot);
            }
        };
        let now = self.now;
        let Some(pool) = self.pool.as_ref() else {
            return;
        };
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        let bytes = match unsent(c, &pool.bufs) {
            Ok(b) => b,
            Err(e) => {
                // Bytes in a pipe that cannot be read cannot go along: neither side may take what
                // it got for the whole stream, so both are reset (as `relay::conclude` does).
                let end = Supervised {
                    reset_backend: true,
                    ..Supervised::broken(Outcome::BackendReset, true, e)
                };
                return self.finish(slot, end);
            }
        };
        let Some(mut c) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.live -= 1;
        self.counts.open.store(self.live as u64, Relaxed);
        let mut returned = 0;
        for d in &mut c.dirs {
            for h in d.held.drain(..) {
                if let Buf::Pool(f) = h.buf {
                    pool.give_back(f);
                    returned += 1;
                }
            }
        }
        let [to_backend, to_client] = bytes;
        let held = Quiesced {
            to_backend,
            to_client,
            up_done: c.dirs[0].shut,
            down_done: c.dirs[1].shut,
            quiet_for: now.saturating_duration_since(c.last),
        };
        let (Some(h), Some(client), Some(backend)) =
            (c.host.take(), c.client.take(), c.backend.take())
        else {
            return;
        };
        let (up, down) = (c.dirs[0].unflushed, c.dirs[1].unflushed);
        if up + down > 0 {
            self.host.sent(&h, up, down);
        }
        let quiet = Quiet {
            client,
            backend,
            held,
            bytes_up: c.dirs[0].sent,
            bytes_down: c.dirs[1].sent,
        };
        bump(&self.counts.carried);
        self.host.carried(h, carrier, quiet);
        self.buffers_back(returned);
        // `c` (its pipes go back to the pool) drops here.
    }

    /// A connection stopped at a quiet point that is not carried after all goes on where it
    /// stopped: what each direction holds is sent, its receives armed again, its splicing resumed.
    pub(super) fn go_on(&mut self, slot: u32) {
        let Some(c) = at(&mut self.conns, slot) else {
            return;
        };
        c.carry = false;
        // Stopped once its first bytes were out (or with none to send) but before it armed its
        // receives: it relays from here, as `relay` would have begun. With `pre` still held, that
        // send arms them (`on_send`).
        if !c.relaying && c.dirs[Side::Up as usize].held.is_empty() {
            c.starts_relaying(&mut self.host);
        }
        for side in [Side::Up, Side::Down] {
            let Some(c) = self.conn(slot).filter(|c| c.end.is_none()) else {
                return;
            };
            let d = c.dir(side);
            if d.pipe.is_some() {
                self.pump(slot, side, false);
                continue;
            }
            let relaying = c.relaying;
            let cap = cap_of(self.pool.as_ref());
            let Some(c) = self.conn(slot) else { return };
            let d = c.dir(side);
            let (held, shut) = (!d.held.is_empty(), d.should_shut());
            // Not relaying yet: the send of `pre` arms the receives once it completes.
            let arm = relaying && d.should_arm(false, cap);
            if held {
                self.send_next(slot, side);
            } else if shut {
                self.shut(slot, side);
            }
            if arm {
                self.arm_recv(slot, side);
            } else if !held {
                self.maybe_splice(slot, side);
            }
        }
    }
}

/// What each direction of a quiet connection read and has not sent, up then down: its held
/// buffers, then its pipe's bytes (a direction takes a pipe only with nothing held, so in this
/// order they are the stream's order). The pipes are left empty; the buffers stay held.
fn unsent<C>(c: &mut Conn<C>, pool: &BufPool) -> io::Result<[Vec<u8>; 2]> {
    let mut bytes: [Vec<u8>; 2] = Default::default();
    for (side, out) in [Side::Up, Side::Down].into_iter().zip(bytes.iter_mut()) {
        let d = &c.dirs[side as usize];
        for h in &d.held {
            let b = match &h.buf {
                Buf::Own => c.owned(side),
                Buf::Pool(f) => pool.bytes(f),
            };
            out.extend_from_slice(b.get(h.off as usize..h.len as usize).unwrap_or_default());
        }
        if let Some(p) = c.dirs[side as usize].pipe.as_mut() {
            out.extend_from_slice(&p.take_pending()?);
        }
    }
    Ok(bytes)
}
