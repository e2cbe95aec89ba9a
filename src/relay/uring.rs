//! The io_uring engine (`relay: uring`): each direction keeps one receive or one send in flight on
//! the worker thread's ring, and every operation the worker's sessions start in one scheduler tick
//! is submitted with one `io_uring_enter`, their completions reaped in one pass. The epoll engines
//! pay a readiness wake-up plus a `recv` and a `send` per message; here the kernel does the waiting
//! and the copies, and the thread enters it once per batch.
//!
//! How it lives beside tokio: every worker thread owns one ring (created on first use). The ring's
//! descriptor is registered with the worker's tokio reactor (`AsyncFd`), so a completion wakes the
//! thread like any socket would, and a driver task on the same thread reaps completions and wakes the
//! futures waiting for them. A future that starts an operation wakes the driver, which runs after
//! the tasks already woken in this tick, so their submissions go in together.
//!
//! Ownership: the kernel writes into a receive buffer and reads a send buffer until the completion
//! arrives, so an operation owns its buffer while in flight. A future dropped before its completion
//! (a timeout, the drain's cut, the other direction's reset) leaves the buffer with the driver and
//! asks the kernel to cancel; the buffer is freed when the cancelled operation completes. Sockets are
//! borrowed from the session, which closes them only after the relay returns; an operation dropped
//! before it was submitted is submitted at once, while its socket is still open (the kernel takes its
//! own reference to the file on submission), so a closed and reused descriptor number can never be
//! the target of a late submission.
//!
//! Memory: a direction's buffer starts at 2 KiB (requests and responses fit) and grows to 16 KiB
//! only after a receive fills it, so an idle connection holds 4 KiB, and at most 32 KiB in bulk.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{finish, DirEnd, Flow, COPY_BUF};

/// Submission queue entries per ring; a full queue is submitted at once, so this bounds a batch.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: two operations in flight per connection fit for 8k connections; past
/// that the kernel keeps completions in its overflow list (IORING_FEAT_NODROP) until reaped.
const CQ_ENTRIES: u32 = 16 * 1024;
/// A direction's first buffer; it grows to [`COPY_BUF`] after a receive fills it.
const SMALL_BUF: usize = 2 * 1024;
/// `user_data` of cancellation requests, whose completions are ignored.
const CANCEL: u64 = u64::MAX;

/// Whether io_uring can be used in this process, probed once: `Err` names why not.
pub(crate) fn availability() -> &'static Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(|| {
        if std::env::var("SLUICEGATE_IO_URING").is_ok_and(|v| v.trim() == "off") {
            return Err("disabled by SLUICEGATE_IO_URING=off".into());
        }
        let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("io_uring probe failed: {e}"))?;
        for (code, name) in [
            (opcode::Recv::CODE, "recv"),
            (opcode::Send::CODE, "send"),
            (opcode::AsyncCancel::CODE, "cancel"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("the kernel's io_uring has no {name} operation"));
            }
        }
        Ok(())
    })
}

enum Slot {
    /// In flight, with the waker of the future waiting for it.
    Waiting(Option<Waker>),
    /// Completed; the result waits for its future.
    Done(i32),
    /// Its future is gone: the buffer stays here until the kernel has finished with it.
    Orphaned(#[allow(dead_code)] Box<[u8]>),
}

/// One worker thread's ring and the operations in flight on it.
struct Driver {
    /// Declared before `ring`, so it is deregistered before the ring's descriptor closes.
    ready: AsyncFd<RawFd>,
    ring: RefCell<IoUring>,
    /// Indexed by `user_data`.
    slots: RefCell<Vec<Option<Slot>>>,
    free: RefCell<Vec<usize>>,
    /// Entries pushed but not yet submitted.
    unsubmitted: Cell<bool>,
    /// The driver task, woken to submit.
    task: RefCell<Option<Waker>>,
    /// Identifies this thread's driver in the operations it started.
    id: u64,
}

thread_local! {
    /// This thread's driver: created on first use, `None` once creating it failed.
    static DRIVER: RefCell<Option<Result<Rc<Driver>, ()>>> = const { RefCell::new(None) };
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// This thread's driver, creating it (and spawning its task) on first use. `None` when the thread
/// cannot have a ring (no tokio runtime, or the kernel refused one).
fn driver() -> Option<Rc<Driver>> {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(Driver::new().map(Rc::new).map_err(|e| {
                tracing::warn!(error = %e, "io_uring ring could not be created on this worker; its connections use the epoll relay");
            }));
        }
        match d.as_ref() {
            Some(Ok(driver)) => Some(driver.clone()),
            _ => None,
        }
    })
}

impl Driver {
    fn new() -> io::Result<Driver> {
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        // SINGLE_ISSUER: only this thread submits (older kernels lack it). Not COOP_TASKRUN nor
        // DEFER_TASKRUN: both leave a completion's work for the thread's next entry into the kernel
        // without waking it, and this thread sleeps in epoll_wait, not in io_uring_enter.
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .build(SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })?;
        // SAFETY: the descriptor is the ring's, which the same `Driver` owns; `ready` is declared
        // first, so it is deregistered before the ring closes the descriptor.
        let ready = unsafe {
            AsyncFd::register_with_interest(ring.as_raw_fd(), tokio::io::Interest::READABLE)?
        };
        let driver = Driver {
            ready,
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            unsubmitted: Cell::new(false),
            task: RefCell::new(None),
            id: next_id(),
        };
        tokio::spawn(DriverTask);
        Ok(driver)
    }

    /// Queues `entry` for the operation in a new slot and returns the slot.
    fn push(&self, entry: io_uring::squeue::Entry) -> io::Result<usize> {
        let idx = {
            let mut slots = self.slots.borrow_mut();
            match self.free.borrow_mut().pop() {
                Some(i) => {
                    slots[i] = Some(Slot::Waiting(None));
                    i
                }
                None => {
                    slots.push(Some(Slot::Waiting(None)));
                    slots.len() - 1
                }
            }
        };
        if let Err(e) = self.push_entry(entry.user_data(idx as u64)) {
            self.release(idx);
            return Err(e);
        }
        Ok(idx)
    }

    fn push_entry(&self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry's buffer is owned by the operation (or by its orphaned slot) until the
        // completion for it is reaped, and its descriptor is open now and, if not submitted at once,
        // stays open until submission (see the module's header and `Op::drop`).
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // The queue is full: submit it now and retry.
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        if !self.unsubmitted.replace(true) {
            if let Some(w) = self.task.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
        Ok(())
    }

    fn submit(&self) {
        if self.unsubmitted.replace(false) {
            // An error here (EBUSY with the completion queue overflowing, EINTR) leaves the entries
            // queued; the next pass submits them again.
            if self.ring.borrow().submit().is_err() {
                self.unsubmitted.set(true);
            }
        }
    }

    fn release(&self, idx: usize) {
        self.slots.borrow_mut()[idx] = None;
        self.free.borrow_mut().push(idx);
    }

    /// Takes every completion: stores its result and wakes its future, or frees an orphan's buffer.
    fn reap(&self) -> usize {
        let mut n = 0;
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            n += 1;
            let ud = cqe.user_data();
            if ud == CANCEL {
                continue;
            }
            let idx = ud as usize;
            match slots.get_mut(idx).and_then(Option::take) {
                Some(Slot::Waiting(w)) => {
                    slots[idx] = Some(Slot::Done(cqe.result()));
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                Some(Slot::Orphaned(buf)) => {
                    drop(buf);
                    self.free.borrow_mut().push(idx);
                }
                other => slots[idx] = other,
            }
        }
        n
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The thread is ending with operations in flight: closing the ring cancels them, but not
        // before this returns, so their buffers are leaked rather than freed under the kernel.
        for slot in self.slots.get_mut().drain(..) {
            if let Some(Slot::Orphaned(buf)) = slot {
                std::mem::forget(buf);
            }
        }
    }
}

/// Submits what the thread's sessions queued and reaps completions, for as long as the thread runs.
struct DriverTask;

impl Future for DriverTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(d) = DRIVER.with(|d| match d.borrow().as_ref() {
            Some(Ok(d)) => Some(d.clone()),
            _ => None,
        }) else {
            return Poll::Ready(());
        };
        {
            let mut task = d.task.borrow_mut();
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        loop {
            d.submit();
            d.reap();
            match d.ready.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // Readiness is cleared only once the queue is seen empty; a completion posted
                    // after this check raises a new edge.
                    if d.reap() == 0 && !d.unsubmitted.get() {
                        guard.clear_ready();
                    }
                }
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "io_uring ring cannot be polled");
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One receive or send in flight, owning its buffer until it completes.
struct Op {
    driver: u64,
    idx: usize,
    buf: Option<Box<[u8]>>,
}

impl Op {
    /// Queues `entry` on this thread's ring; `buf` is the memory it points into.
    fn start(entry: io_uring::squeue::Entry, buf: Box<[u8]>) -> io::Result<Op> {
        let d = driver().ok_or_else(|| io::Error::other("io_uring ring unavailable"))?;
        let idx = d.push(entry)?;
        Ok(Op {
            driver: d.id,
            idx,
            buf: Some(buf),
        })
    }
}

fn this_driver(id: u64) -> Option<Rc<Driver>> {
    DRIVER.with(|d| match d.borrow().as_ref() {
        Some(Ok(d)) if d.id == id => Some(d.clone()),
        _ => None,
    })
}

impl Future for Op {
    /// The completion's result (bytes moved, or a negative errno), and the buffer back.
    type Output = (i32, Box<[u8]>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(d) = this_driver(self.driver) else {
            // Polled on a thread that is not the ring's: never expected (sessions stay on the worker
            // that accepted them). Report it as an error; `drop` keeps the buffer alive.
            return Poll::Ready((-libc::EXDEV, vec![0u8; 0].into_boxed_slice()));
        };
        let mut slots = d.slots.borrow_mut();
        match slots[self.idx].as_mut() {
            Some(Slot::Done(r)) => {
                let r = *r;
                drop(slots);
                d.release(self.idx);
                let buf = self.buf.take().unwrap_or_default();
                Poll::Ready((r, buf))
            }
            Some(Slot::Waiting(w)) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => Poll::Ready((-libc::EINVAL, self.buf.take().unwrap_or_default())),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else {
            return; // completed and returned
        };
        let Some(d) = this_driver(self.driver) else {
            // Not on the ring's thread: the kernel may still write into the buffer, so it is never
            // freed (a leak, not a use after free).
            std::mem::forget(buf);
            return;
        };
        let state = d.slots.borrow_mut()[self.idx].take();
        match state {
            Some(Slot::Done(_)) => d.release(self.idx),
            Some(Slot::Waiting(_)) => {
                d.slots.borrow_mut()[self.idx] = Some(Slot::Orphaned(buf));
                // Submit now, while the borrowed socket is still open, then cancel.
                d.submit();
                let cancel = opcode::AsyncCancel::new(self.idx as u64)
                    .build()
                    .user_data(CANCEL);
                if d.push_entry(cancel).is_err() {
                    // Without a cancel the operation still completes when its socket closes.
                }
            }
            other => {
                d.slots.borrow_mut()[self.idx] = other;
                std::mem::forget(buf);
            }
        }
    }
}

/// Whether this thread can relay through a ring (creating it on first use).
pub(super) fn usable() -> bool {
    availability().is_ok() && driver().is_some()
}

/// One direction through the ring: receive from `src`, send all of it to `dst`, until EOF or an
/// error (`Some`, same contract as `pump`: half-close through `finish`, counts as bytes are sent), or
/// until a 16 KiB receive comes back full (`None`): bulk data, which splice moves for less, with
/// everything received so far sent.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    other: &Flow<'_>,
    start: Instant,
) -> Option<DirEnd> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut buf: Box<[u8]> = vec![0u8; SMALL_BUF].into_boxed_slice();
    loop {
        let len = buf.len();
        let recv = opcode::Recv::new(types::Fd(sfd), buf.as_mut_ptr(), len as u32).build();
        let op = match Op::start(recv, buf) {
            Ok(op) => op,
            Err(e) => return Some(DirEnd::SourceError(e)),
        };
        let (r, b) = op.await;
        buf = b;
        let n = match r {
            0 => return Some(finish(dst, flow, other)),
            r if r > 0 => r as usize,
            e if -e == libc::EINTR || -e == libc::EAGAIN => continue,
            e => return Some(DirEnd::SourceError(io::Error::from_raw_os_error(-e))),
        };
        let mut off = 0;
        while off < n {
            // SAFETY of the pointer: `buf` moves into the operation and is not touched until the
            // completion gives it back.
            let send = opcode::Send::new(types::Fd(dfd), buf[off..].as_ptr(), (n - off) as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            let op = match Op::start(send, buf) {
                Ok(op) => op,
                Err(e) => return Some(DirEnd::DestError(e)),
            };
            let (r, b) = op.await;
            buf = b;
            match r {
                r if r > 0 => {
                    off += r as usize;
                    flow.wrote(r as usize, start);
                }
                e if -e == libc::EINTR || -e == libc::EAGAIN => continue,
                0 => return Some(DirEnd::DestError(io::ErrorKind::WriteZero.into())),
                e => return Some(DirEnd::DestError(io::Error::from_raw_os_error(-e))),
            }
        }
        // A full buffer means more is coming: take the bigger one; a full big one means bulk.
        if n == buf.len() {
            if buf.len() >= COPY_BUF {
                return None;
            }
            buf = vec![0u8; COPY_BUF].into_boxed_slice();
        }
    }
}
