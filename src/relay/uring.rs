//! The io_uring engine (`relay: uring`): each direction keeps a multishot receive armed (where the
//! kernel has them, 6.0+) and one send in flight on the worker thread's ring, and every operation
//! the worker's sessions start in one scheduler tick is submitted with one `io_uring_enter`, their
//! completions reaped in one pass. The epoll engines pay a readiness wake-up plus a `recv` and a
//! `send` per message; here the kernel does the waiting and the copies, and the thread enters it
//! once per batch.
//!
//! A multishot receive is armed once and completes once per message, each into a buffer the
//! kernel takes from the ring's pool of provided buffers (`bufs.rs`), instead of one receive (and
//! one internal poll) armed per message. The direction copies each message out into its own
//! buffer and gives the pool buffer back at once. Two limits keep the shared pool from running
//! dry: a direction whose destination pushes back has its receive cancelled once it holds
//! [`STREAM_CAP`] pool buffers, and armed again once what it holds is sent; and a receive the pool
//! could not serve (ENOBUFS) is followed by one one-shot receive into the direction's own buffer,
//! so a dry pool slows a direction and never stalls it. Where the kernel has no provided-buffer
//! rings (before 5.19) or refuses a multishot receive (before 6.0), every receive is one-shot.
//!
//! How it lives beside tokio: every worker thread owns one ring (created on first use), set up with
//! DEFER_TASKRUN where the kernel has it (6.1+): the work that turns an arrival into a completion is
//! queued for this thread and run only when it enters the ring, instead of interrupting it (an IPI
//! from the CPU where the data arrived, a task-work run on its way back to user space) whenever it
//! is busy. The kernel signals an eventfd registered with the ring when such work is queued; that
//! eventfd is registered with the worker's tokio reactor (`AsyncFd`), so the thread, asleep in
//! `epoll_wait`, wakes like it would for a socket, and a driver task on the same thread enters the
//! ring (which runs the queued work), reaps the completions and wakes the futures waiting for them.
//! Every entry runs queued work (IORING_ENTER_GETEVENTS), but only a bounded batch of it (20 items
//! on recent kernels), and what it leaves is not signalled again; so before the driver goes idle after an
//! entry it asks the ring's own descriptor (`poll(2)`, no wait) whether work is still queued, and
//! enters again if so. Without DEFER_TASKRUN the ring's own descriptor is what the reactor watches.
//! A future that starts an operation stages its entry with the driver and wakes it; the driver runs
//! after the tasks already woken in this tick, so their entries go into the kernel's submission
//! queue together, right before the `io_uring_enter` that submits them. A one-shot receive waits
//! for data before it tries to read (IORING_RECVSEND_POLL_FIRST): it is started right after the
//! previous message was passed on, when the next one has almost never arrived, so an attempt at once
//! would fail and cost a second one.
//!
//! Ownership: the kernel writes into a receive buffer and reads a send buffer until the completion
//! arrives, so an operation ([`Op`]) is built by a constructor that takes its buffer and borrows its
//! socket: the borrow outlives the operation, so the session cannot close the socket while it exists.
//! A future dropped before its completion (a timeout, the drain's cut, the other direction's reset)
//! leaves nothing that can reach the socket once the session closes it and the number is reused:
//! - still staged (the kernel never saw it): removed, and its buffer freed;
//! - in the submission queue but not consumed by the kernel (only after a failed or partial
//!   submission): its entry is rewritten in place into a no-op, and its buffer freed;
//! - consumed (in flight): cancelled; the kernel holds its own reference to the socket's file, so the
//!   operation can only complete on that socket, and the driver keeps the buffer until it does.
//!
//! Rewriting the entry was chosen over the alternatives: a submission forced from `drop` can fail for
//! as long as the kernel is short of memory and cannot wait without blocking the thread; registered
//! files (IORING_REGISTER_FILES) need each socket installed, either by an entry (the same late
//! submission problem) or by a synchronous `io_uring_register` per socket (two to four more system
//! calls per connection, where churn already costs the ring most), and the table's reference keeps a
//! closed socket open, its FIN or RST delayed, until the slot is released.
//!
//! Submission failures: what the kernel did not take stays queued and is retried after a back-off
//! (1 ms, doubling up to 100 ms, on a tokio timer), never by polling again at once; the failures are
//! logged at most once every 10 s. When the completion queue overflows, the kernel keeps completions
//! in its overflow list (IORING_FEAT_NODROP) until an `io_uring_enter` moves them back; the driver
//! makes that call whenever the ring reports an overflow.
//!
//! Ownership of a multishot receive ([`MultiRecv`]) is the same, except that the memory the kernel
//! writes into is the pool's, which lives as long as the ring; a dropped one's queued buffers go back
//! to the pool at once, and its slot stays until the kernel's last completion for it, each of which
//! gives its buffer back.
//!
//! Memory: a direction's buffer starts at 2 KiB (requests and responses fit) and grows to 16 KiB
//! only after a receive fills it, so an idle connection holds 4 KiB, and at most 32 KiB in bulk;
//! and each ring's pool, 1 MiB, touched as the kernel uses it.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::{finish, DirEnd, Flow, COPY_BUF};

pub(super) mod bufs;
#[cfg(test)]
mod tests;

use bufs::BufPool;

/// Submission queue entries per ring: one `io_uring_enter` submits at most this many.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: two operations in flight per connection fit for 8k connections; past
/// that the kernel keeps completions in its overflow list (IORING_FEAT_NODROP) until the driver
/// moves them back.
const CQ_ENTRIES: u32 = 16 * 1024;
/// A direction's first buffer; it grows to [`COPY_BUF`] after a receive fills it.
const SMALL_BUF: usize = 2 * 1024;
/// Pool buffers a direction's multishot receive may hold (messages received, not yet taken because
/// the destination has not taken the last ones) before it is cancelled, to be armed again once they
/// are sent: 64 directions pushed back before a pool of 512 runs dry. (A few more may complete
/// before the cancellation reaches the kernel.)
const STREAM_CAP: usize = 8;
/// `user_data` of entries whose completions are ignored: cancellations, and operations rewritten
/// into no-ops. (An operation's `user_data` has its slot in the low 32 bits, never all ones.)
const IGNORED: u64 = u64::MAX;
/// Submissions in one driver pass at most; a pass that has not emptied the queue by then yields to
/// the thread's other tasks and continues on its next poll.
const FLUSH_ROUNDS: usize = 16;
/// Rounds of reaping and submitting in one poll of the driver task before it yields.
const DRIVER_ROUNDS: usize = 64;
/// The first wait after a failed submission; each further failure in a row doubles it, up to
/// [`BACKOFF_CAP`].
const BACKOFF_FIRST: Duration = Duration::from_millis(1);
const BACKOFF_CAP: Duration = Duration::from_millis(100);
/// Failed submissions are logged at most this often (with the count since the last line).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The `mmap` offset of a ring's submission entries (`IORING_OFF_SQES` in linux/io_uring.h).
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
/// `io_uring_enter`'s flag to reap completions and run the queued work of a DEFER_TASKRUN ring
/// (`IORING_ENTER_GETEVENTS` in linux/io_uring.h; the `io-uring` crate keeps its constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// A receive's `ioprio` flag to wait for data before trying to read (`IORING_RECVSEND_POLL_FIRST`).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Whether io_uring can be used in this process, probed once: `Err` names why not.
pub(crate) fn availability() -> &'static Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(|| {
        if std::env::var("SLUICEGATE_IO_URING").is_ok_and(|v| v.trim() == "off") {
            return Err("disabled by SLUICEGATE_IO_URING=off".into());
        }
        let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        // A policy (seccomp) can allow io_uring_setup and refuse io_uring_enter, the call every
        // engine on io_uring lives in: a ring is usable only once an entry went through it.
        nop_through(&mut ring)?;
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

/// A seccomp filter on the calling thread alone (no TSYNC; it ends with the thread) under
/// which io_uring_enter fails with EPERM, as under a policy that allows setting a ring up but
/// not entering it; every other call is allowed.
#[cfg(test)]
pub(crate) fn refuse_enter_on_this_thread() -> io::Result<()> {
    let filter = [
        // The system call's number, the first word of `seccomp_data`. No check of the
        // architecture: a test of this build's own calls, not a sandbox.
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 1,
            jf: 0,
            k: libc::SYS_io_uring_enter as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl(2) with integers, then with a pointer to `program`, which points to
    // `filter`; both live through the call, and the kernel copies the program. Both settings
    // are the calling thread's alone (no SECCOMP_FILTER_FLAG_TSYNC).
    let failed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
    };
    if failed {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Submits a NOP through `io_uring_enter` on `ring` and waits for its completion: `Err` says how
/// it failed (EPERM from a seccomp profile that refuses the call, say).
fn nop_through(ring: &mut IoUring) -> Result<(), String> {
    const PROBE: u64 = 0x5e7e;
    let nop = opcode::Nop::new().build().user_data(PROBE);
    // SAFETY: a NOP points to nothing.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| "io_uring probe: no room for one entry in a new ring".to_string())?;
    // A signal may interrupt the wait: a few tries, then its error stands.
    let mut tries = 0;
    while let Err(e) = ring.submit_and_wait(1) {
        tries += 1;
        if e.raw_os_error() != Some(libc::EINTR) || tries == 8 {
            return Err(format!("io_uring_enter refused: {e}"));
        }
    }
    match ring.completion().next() {
        Some(c) if c.user_data() == PROBE && c.result() >= 0 => Ok(()),
        Some(c) => Err(format!(
            "io_uring_enter: the probe's NOP failed: {}",
            io::Error::from_raw_os_error(-c.result())
        )),
        None => Err("io_uring_enter: the probe's NOP did not complete".into()),
    }
}

enum Slot {
    /// Started and not completed, with the waker of the future waiting for it. `pos` is the ring
    /// position its entry was pushed at, `None` while the entry is staged in the driver.
    Waiting {
        waker: Option<Waker>,
        pos: Option<u32>,
    },
    /// Completed; the result waits for its future.
    Done(i32),
    /// Its future is gone: the buffer stays here until the kernel has finished with it.
    Orphaned(#[allow(dead_code)] Box<[u8]>),
    /// A multishot receive, armed until a completion without IORING_CQE_F_MORE.
    Stream(Stream),
}

/// A multishot receive's completions not yet taken by its direction.
#[derive(Default)]
struct Stream {
    waker: Option<Waker>,
    /// As [`Slot::Waiting`]'s.
    pos: Option<u32>,
    /// Results in order: bytes in a pool buffer (`Some(bid)`), 0 (EOF) or a negative errno.
    got: VecDeque<(i32, Option<u16>)>,
    /// Of the first result's bytes, how many were taken already.
    front_taken: usize,
    /// The last completion (without MORE) arrived: the kernel is done with the socket.
    ended: bool,
    /// A cancellation was staged (back-pressure, or the relay's `carry`).
    cancelling: bool,
    /// Its direction is gone: completions give their buffers back, the last frees the slot.
    orphaned: bool,
}

/// A slot and the `user_data` of the operation in it: the slot's index in the low 32 bits and a
/// generation above, so a late cancellation can never hit the next operation to use the slot.
struct SlotEntry {
    user_data: u64,
    slot: Option<Slot>,
}

/// An entry waiting for the driver's next pass, with the slot of its operation (`None` for a
/// cancellation).
struct Staged {
    slot: Option<usize>,
    entry: squeue::Entry,
}

/// What the driver did, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stats {
    /// `io_uring_enter` calls made to submit (or to move overflowed completions back).
    submits: u64,
    /// Of which failed or took nothing: each is followed by a back-off.
    failed_submits: u64,
    /// Of which the kernel took some entries but not all.
    partial_submits: u64,
    /// Calls made because the completion queue had overflowed.
    overflow_flushes: u64,
    /// Back-off waits started.
    backoffs: u64,
    /// Operations dropped while staged: never seen by the kernel.
    dropped_staged: u64,
    /// Operations dropped while in the submission queue, unconsumed: rewritten into no-ops.
    neutralised: u64,
    /// Operations dropped in flight: cancelled.
    cancelled: u64,
    /// Multishot receives armed.
    streams: u64,
    /// Messages they received (completions with bytes).
    stream_messages: u64,
    /// Multishot receives cancelled because their direction held [`STREAM_CAP`] buffers.
    stream_backpressure: u64,
    /// Multishot receives ended because the pool had no buffer free (ENOBUFS).
    stream_no_buffers: u64,
}

/// A second mapping of the ring's submission entries (the `io-uring` crate keeps its own private),
/// used for one thing only: rewriting an entry the kernel has not consumed yet.
struct SqeMap {
    sqes: NonNull<squeue::Entry>,
    /// Entries in the array (a power of two: a ring position `p` is entry `p & (entries - 1)`).
    entries: u32,
}

impl SqeMap {
    fn new(ring: &IoUring) -> io::Result<SqeMap> {
        const _: () = assert!(size_of::<squeue::Entry>() == 64);
        let entries = ring.params().sq_entries();
        if !entries.is_power_of_two() {
            return Err(io::Error::other(
                "io_uring submission queue size not a power of two",
            ));
        }
        let len = entries as usize * size_of::<squeue::Entry>();
        // SAFETY: maps the ring's own submission entries (the descriptor is open, the offset and the
        // length are the ones the kernel defines and reported) into a new, shared mapping that
        // overlaps no Rust object; the pointer is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                ring.as_raw_fd(),
                IORING_OFF_SQES,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let sqes = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SqeMap { sqes, entries })
    }

    /// Rewrites the entry at ring position `pos` into a no-op whose completion is ignored.
    ///
    /// # Safety
    ///
    /// `pos` must be in the submission queue and not consumed by the kernel, and no submission may
    /// run during the call. The kernel reads an entry only inside an `io_uring_enter` (the ring has
    /// no SQPOLL thread), and only the driver's thread makes that call.
    unsafe fn neutralise(&self, pos: u32) {
        let nop = opcode::Nop::new().build().user_data(IGNORED);
        let i = (pos & (self.entries - 1)) as usize;
        // SAFETY: `i` is within the mapping's `entries` entries; the ring's array maps each position
        // to the entry of the same index (the `io-uring` crate sets it up so, as liburing does), so
        // this is the unconsumed entry at `pos`, which the kernel has not read and, by the caller's
        // promise, cannot read during the write.
        unsafe { self.sqes.as_ptr().add(i).write_volatile(nop) };
    }
}

impl Drop for SqeMap {
    fn drop(&mut self) {
        let len = self.entries as usize * size_of::<squeue::Entry>();
        // SAFETY: unmaps exactly the mapping `new` created, once; nothing refers to it afterwards.
        unsafe { libc::munmap(self.sqes.as_ptr().cast(), len) };
    }
}

/// Whether the entry pushed at ring position `pos` is still in the submission queue, unconsumed:
/// the queue holds the `len` positions before `tail`.
fn still_queued(pos: u32, tail: u32, len: usize) -> bool {
    (tail.wrapping_sub(pos) as usize) <= len && tail != pos
}

/// How a driver pass over the submission queue ended.
#[derive(Debug)]
enum Flushed {
    /// Nothing left to submit.
    Done,
    /// Entries left after the pass's rounds: the next pass continues.
    More,
    /// A submission failed; `progressed` if ones before it in the pass went through.
    Failed { error: io::Error, progressed: bool },
}

/// One worker thread's ring and the operations in flight on it.
struct Driver {
    /// The descriptor the reactor watches: `wake` with DEFER_TASKRUN, else the ring's. Declared
    /// before both, so it is deregistered before either closes.
    ready: AsyncFd<RawFd>,
    /// With DEFER_TASKRUN: the eventfd the kernel signals when work for this thread is queued.
    wake: Option<OwnedFd>,
    /// With DEFER_TASKRUN: the next pass must enter the ring even with nothing to submit, to run
    /// the work queued for this thread.
    owed: Cell<bool>,
    /// With DEFER_TASKRUN: the ring was entered since the driver last asked it for work left over.
    entered: Cell<bool>,
    sqes: SqeMap,
    ring: RefCell<IoUring>,
    /// The provided buffers of multishot receives; `None` where the kernel has none (before 5.19),
    /// or once a multishot receive was refused (before 6.0): receives are then one-shot.
    pool: Option<BufPool>,
    /// A multishot receive was refused (EINVAL before anything came): the kernel has none.
    no_streams: Cell<bool>,
    /// Indexed by the low 32 bits of `user_data`.
    slots: RefCell<Vec<SlotEntry>>,
    free: RefCell<Vec<usize>>,
    /// Entries waiting for the driver's next pass, in the order they were started.
    staged: RefCell<VecDeque<Staged>>,
    /// Entries pushed into the submission queue since the ring was created, which is the queue's
    /// tail (the kernel starts it at 0, and every push goes through [`Driver::push_staged`]).
    pushed: Cell<u32>,
    /// The generation of the next operation's `user_data`.
    generation: Cell<u32>,
    stats: Cell<Stats>,
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

/// This thread's driver if it exists (and, with `id`, is that one).
fn existing_driver(id: Option<u64>) -> Option<Rc<Driver>> {
    DRIVER.with(|d| match d.borrow().as_ref() {
        Some(Ok(d)) if id.is_none_or(|id| d.id == id) => Some(d.clone()),
        _ => None,
    })
}

/// The submission and completion queue sizes of a new ring (tests shrink them for their thread).
fn ring_sizes() -> (u32, u32) {
    #[cfg(test)]
    if let Some(sizes) = tests::ring_sizes() {
        return sizes;
    }
    (SQ_ENTRIES, CQ_ENTRIES)
}

/// Buffers in a new ring's pool (tests shrink it for their thread).
fn pool_size() -> u16 {
    #[cfg(test)]
    if let Some(n) = tests::pool_size() {
        return n;
    }
    bufs::BUFS
}

/// This thread's ring, and with DEFER_TASKRUN the eventfd the kernel signals when it queues work
/// for the thread. SINGLE_ISSUER: only this thread submits (DEFER_TASKRUN requires it). SUBMIT_ALL:
/// an entry that fails at submission does not stop the rest of the batch. Without DEFER_TASKRUN
/// (before 6.1, or when the eventfd cannot be had), a ring whose completions wake the thread on their
/// own; on the oldest kernels, one without either flag. Never SQPOLL: `SqeMap::neutralise` relies
/// on the kernel reading entries only when this thread enters it.
fn build_ring() -> io::Result<(IoUring, Option<OwnedFd>)> {
    let (sq, cq) = ring_sizes();
    let deferred = IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_submit_all()
        .setup_defer_taskrun()
        .build(sq)
        .and_then(|ring| {
            let wake = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
            )?;
            ring.submitter().register_eventfd(wake.as_raw_fd())?;
            Ok((ring, Some(wake)))
        });
    if let Ok(r) = deferred {
        return Ok(r);
    }
    let ring = IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_submit_all()
        .build(sq)
        .or_else(|_| IoUring::builder().setup_cqsize(cq).build(sq))?;
    Ok((ring, None))
}

impl Driver {
    fn new() -> io::Result<Driver> {
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let (ring, wake) = build_ring()?;
        let sqes = SqeMap::new(&ring)?;
        let pool = match BufPool::register(&ring, pool_size(), bufs::BUF_SIZE as u32, pool_size()) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!(error = %e, "io_uring: no provided buffers; receives are one-shot");
                None
            }
        };
        let watched = wake.as_ref().map_or(ring.as_raw_fd(), |fd| fd.as_raw_fd());
        // SAFETY: the descriptor is the eventfd or the ring's, both owned by the same `Driver`;
        // `ready` is declared first, so it is deregistered before either closes.
        let ready =
            unsafe { AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE)? };
        let driver = Driver {
            ready,
            wake,
            owed: Cell::new(false),
            entered: Cell::new(false),
            sqes,
            ring: RefCell::new(ring),
            pool,
            no_streams: Cell::new(false),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            staged: RefCell::new(VecDeque::new()),
            pushed: Cell::new(0),
            generation: Cell::new(0),
            stats: Cell::new(Stats::default()),
            task: RefCell::new(None),
            id: next_id(),
        };
        tokio::spawn(DriverTask::default());
        Ok(driver)
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Takes a slot for an operation whose entry is `entry`, stages the entry, and returns the slot.
    fn start(&self, entry: squeue::Entry) -> usize {
        self.start_in(
            entry,
            Slot::Waiting {
                waker: None,
                pos: None,
            },
        )
    }

    /// Takes a slot in state `slot` for an operation whose entry is `entry`, stages the entry.
    fn start_in(&self, entry: squeue::Entry, slot: Slot) -> usize {
        let generation = self.generation.get();
        self.generation.set(generation.wrapping_add(1));
        let mut slots = self.slots.borrow_mut();
        let idx = self.free.borrow_mut().pop().unwrap_or_else(|| {
            slots.push(SlotEntry {
                user_data: IGNORED,
                slot: None,
            });
            slots.len() - 1
        });
        let user_data = (u64::from(generation) << 32) | idx as u64;
        slots[idx] = SlotEntry {
            user_data,
            slot: Some(slot),
        };
        drop(slots);
        self.stage(Some(idx), entry.user_data(user_data));
        idx
    }

    fn stage(&self, slot: Option<usize>, entry: squeue::Entry) {
        let mut staged = self.staged.borrow_mut();
        staged.push_back(Staged { slot, entry });
        if staged.len() == 1 {
            if let Some(w) = self.task.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    fn release(&self, idx: usize) {
        self.slots.borrow_mut()[idx].slot = None;
        self.free.borrow_mut().push(idx);
    }

    /// Moves staged entries into the submission queue while it has room; records where each went.
    fn push_staged(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut sq = ring.submission();
        let mut staged = self.staged.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        while !sq.is_full() {
            let Some(s) = staged.pop_front() else { break };
            // SAFETY: an operation's entry was built by one of `Op`'s constructors, under
            // `Op::start`'s contract: its memory is the operation's buffer, kept (by the operation
            // or, once dropped, by its orphaned slot) until the completion is reaped, and its
            // descriptor is borrowed by the operation, whose drop leaves nothing of it to reach the
            // kernel. A multishot receive (`MultiRecv::start`) points at no memory but the pool,
            // which lives as long as the ring, and is kept from its socket the same way. A
            // cancellation points at no memory and no descriptor.
            if unsafe { sq.push(&s.entry) }.is_err() {
                staged.push_front(s);
                break;
            }
            let pos = self.pushed.get();
            self.pushed.set(pos.wrapping_add(1));
            match s.slot.and_then(|i| slots[i].slot.as_mut()) {
                Some(Slot::Waiting { pos: p, .. }) | Some(Slot::Stream(Stream { pos: p, .. })) => {
                    *p = Some(pos);
                }
                _ => {}
            }
        }
    }

    /// Pushes staged entries and submits them, moving overflowed completions back when the ring
    /// asks for it, for at most [`FLUSH_ROUNDS`] submissions. A partial submission is retried at
    /// once: the kernel took something, so it is not stuck. A failed one, or one the kernel took
    /// nothing of, ends the pass: the entries stay queued and the caller backs off.
    fn flush(&self) -> Flushed {
        let mut progressed = false;
        for _ in 0..FLUSH_ROUNDS {
            self.push_staged();
            let (queued, overflow) = {
                let mut ring = self.ring.borrow_mut();
                let sq = ring.submission();
                (sq.len(), sq.cq_overflow())
            };
            if queued == 0 && !overflow && !self.owed.get() {
                return Flushed::Done;
            }
            let r = self.enter(queued);
            let left = self.ring.borrow_mut().submission().len();
            self.count(|s| {
                s.submits += 1;
                s.overflow_flushes += u64::from(overflow);
            });
            let error = match r {
                Err(e) => Some(e),
                Ok(_) if queued > 0 && left == queued => {
                    Some(io::Error::other("the kernel took no submission"))
                }
                Ok(_) => None,
            };
            if let Some(error) = error {
                self.count(|s| s.failed_submits += 1);
                return Flushed::Failed { error, progressed };
            }
            if left > 0 {
                self.count(|s| s.partial_submits += 1);
            }
            progressed = true;
            if overflow {
                // Room for the next part of the overflow list.
                self.reap();
            }
        }
        Flushed::More
    }

    /// One `io_uring_enter` for the `queued` entries: with DEFER_TASKRUN it also runs the queued work
    /// (GETEVENTS, waiting for nothing); without, the crate adds GETEVENTS on an overflow.
    fn enter(&self, queued: usize) -> io::Result<usize> {
        let ring = self.ring.borrow();
        #[cfg(test)]
        match tests::next_fault() {
            Some(tests::Fault::Fail) => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            Some(tests::Fault::Partial) if queued > 1 => {
                let half = (queued / 2) as u32;
                // SAFETY: asks the kernel to consume the first half of the queued entries, with no
                // wait and no argument: a real submission, only shorter.
                return unsafe { ring.submitter().enter::<libc::sigset_t>(half, 0, 0, None) };
            }
            _ => {}
        }
        if self.wake.is_some() {
            self.owed.set(false);
            self.entered.set(true);
            let n = u32::try_from(queued).unwrap_or(u32::MAX);
            // SAFETY: submits the `queued` entries pushed (and synced) into the submission queue,
            // as `submit` does, and reaps without waiting: no argument, no pointer.
            return unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(n, 0, IORING_ENTER_GETEVENTS, None)
            };
        }
        ring.submit()
    }

    /// Whether the entry pushed at `pos` is still in the submission queue, unconsumed.
    fn unconsumed(&self, pos: u32) -> bool {
        let len = self.ring.borrow_mut().submission().len();
        still_queued(pos, self.pushed.get(), len)
    }

    /// With DEFER_TASKRUN, after an entry: whether work the entry did not get to is still queued for
    /// this thread (see the module's header). One `poll(2)` of the ring's descriptor, without
    /// waiting, where a chain of entries ends with nothing else to do. An error (none is expected for
    /// a zero wait on a descriptor this driver owns) counts as nothing left: the next arrival
    /// signals the eventfd and its entry runs what was left as well.
    fn work_left(&self) -> bool {
        if self.wake.is_none() || !self.entered.replace(false) {
            return false;
        }
        let ring = self.ring.borrow();
        // SAFETY: the ring's descriptor, open for as long as `ring` is borrowed, which outlives
        // `fd` (this version of the crate has no `AsFd` for the ring).
        let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&now)) {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!(error = %e, "io_uring ring cannot be asked for work left");
                false
            }
        }
    }

    /// Takes every completion: stores its result and wakes its future, or frees an orphan's buffer.
    fn reap(&self) -> usize {
        let mut n = 0;
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            n += 1;
            let ud = cqe.user_data();
            let Some(e) = slots
                .get_mut(ud as u32 as usize)
                .filter(|e| ud != IGNORED && e.user_data == ud)
            else {
                continue;
            };
            match e.slot.take() {
                Some(Slot::Waiting { waker, .. }) => {
                    e.slot = Some(Slot::Done(cqe.result()));
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                Some(Slot::Orphaned(buf)) => {
                    drop(buf);
                    self.free.borrow_mut().push(ud as u32 as usize);
                }
                Some(Slot::Stream(mut st)) => {
                    if self.streamed(&mut st, ud, cqe.result(), cqe.flags()) {
                        e.slot = Some(Slot::Stream(st));
                    } else {
                        self.free.borrow_mut().push(ud as u32 as usize);
                    }
                }
                other => e.slot = other,
            }
        }
        n
    }

    /// A completion of the multishot receive `st` (whose `user_data` is `ud`): its bytes queued for
    /// the direction, which is woken, or, for an orphan, its buffer given back. At [`STREAM_CAP`]
    /// buffers queued the receive is cancelled (back-pressure: a destination that does not take what
    /// it is sent must not drain the pool every connection shares). `false`: the slot is free.
    /// (Counted in buffers, not bytes: what runs short is the pool's buffers, one per message.)
    fn streamed(&self, st: &mut Stream, ud: u64, result: i32, flags: u32) -> bool {
        let bid = io_uring::cqueue::buffer_select(flags);
        let last = !io_uring::cqueue::more(flags);
        if st.orphaned || result <= 0 {
            if let (Some(b), Some(pool)) = (bid, &self.pool) {
                pool.give_back(b);
            }
        }
        if st.orphaned {
            return !last;
        }
        if result == -libc::ENOBUFS {
            self.count(|s| s.stream_no_buffers += 1);
        }
        if result > 0 {
            self.count(|s| s.stream_messages += 1);
            st.got.push_back((result, bid));
        } else if result < 0 || last {
            st.got.push_back((result, None));
        }
        st.ended = last;
        if !last && !st.cancelling && st.got.len() >= STREAM_CAP {
            st.cancelling = true;
            self.count(|s| s.stream_backpressure += 1);
            self.stage(
                None,
                opcode::AsyncCancel::new(ud).build().user_data(IGNORED),
            );
        }
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
        true
    }

    /// Asks that the operation in `idx` stop early, its future still waiting for it: it completes
    /// with -ECANCELED, or with what it did before the cancellation reached it (a receive that got
    /// bytes returns them). Nothing happens to an operation already done.
    fn cancel(&self, idx: usize) {
        let (pos, user_data) = {
            let slots = self.slots.borrow();
            match slots.get(idx).map(|e| (&e.slot, e.user_data)) {
                Some((Some(Slot::Waiting { pos, .. }), ud)) => (*pos, ud),
                Some((Some(Slot::Stream(_)), _)) => {
                    drop(slots);
                    return self.cancel_stream(idx);
                }
                _ => return,
            }
        };
        match pos {
            // Staged, never seen by the kernel: withdrawn.
            None => {
                self.staged.borrow_mut().retain(|s| s.slot != Some(idx));
                self.complete(idx, -libc::ECANCELED);
            }
            Some(pos) if self.unconsumed(pos) => {
                // SAFETY: the entry at `pos` is in the queue and unconsumed (just checked), and no
                // submission runs during this call: only this thread submits.
                unsafe { self.sqes.neutralise(pos) };
                self.complete(idx, -libc::ECANCELED);
            }
            Some(_) => {
                let cancel = opcode::AsyncCancel::new(user_data)
                    .build()
                    .user_data(IGNORED);
                self.stage(None, cancel);
            }
        }
    }

    /// Asks the multishot receive in `idx` to stop: what it received before the cancellation
    /// reached it is still taken, then its end (-ECANCELED).
    fn cancel_stream(&self, idx: usize) {
        let mut slots = self.slots.borrow_mut();
        let user_data = slots[idx].user_data;
        let Some(Slot::Stream(st)) = slots[idx].slot.as_mut() else {
            return;
        };
        if st.ended || st.cancelling {
            return;
        }
        st.cancelling = true;
        match st.pos {
            Some(pos) if !self.unconsumed(pos) => {
                drop(slots);
                let cancel = opcode::AsyncCancel::new(user_data)
                    .build()
                    .user_data(IGNORED);
                self.stage(None, cancel);
            }
            pos => {
                if let Some(pos) = pos {
                    // SAFETY: the entry at `pos` is in the queue and unconsumed (just checked),
                    // and no submission runs during this call: only this thread submits.
                    unsafe { self.sqes.neutralise(pos) };
                } else {
                    self.staged.borrow_mut().retain(|s| s.slot != Some(idx));
                }
                // Never seen by the kernel: ended here.
                st.ended = true;
                st.got.push_back((-libc::ECANCELED, None));
                if let Some(w) = &st.waker {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// The direction of the multishot receive in `idx` is gone: its queued buffers go back to the
    /// pool at once; if the kernel may still complete it, it is cancelled and its slot stays
    /// (orphaned) until its last completion, so no completion can reach a reused slot or socket.
    fn abandon_stream(&self, idx: usize) {
        let Some(Slot::Stream(mut st)) = self.slots.borrow_mut()[idx].slot.take() else {
            return;
        };
        for (_, bid) in st.got.drain(..) {
            if let (Some(b), Some(pool)) = (bid, &self.pool) {
                pool.give_back(b);
            }
        }
        if st.ended {
            return self.release(idx);
        }
        match st.pos {
            None => {
                self.staged.borrow_mut().retain(|s| s.slot != Some(idx));
                self.count(|s| s.dropped_staged += 1);
                self.release(idx);
            }
            Some(pos) if self.unconsumed(pos) => {
                // SAFETY: as in `abandon`.
                unsafe { self.sqes.neutralise(pos) };
                self.count(|s| s.neutralised += 1);
                self.release(idx);
            }
            Some(_) => {
                let user_data = self.slots.borrow()[idx].user_data;
                let cancelling = st.cancelling;
                st.orphaned = true;
                st.waker = None;
                self.slots.borrow_mut()[idx].slot = Some(Slot::Stream(st));
                if !cancelling {
                    let cancel = opcode::AsyncCancel::new(user_data)
                        .build()
                        .user_data(IGNORED);
                    self.stage(None, cancel);
                }
                self.count(|s| s.cancelled += 1);
            }
        }
    }

    /// What the multishot receive in `idx` has queued, up to `max` bytes across messages, copied
    /// into a buffer of exactly that size, each pool buffer given back once it is all taken; or its
    /// end, once nothing is queued before it; or registers `cx`'s waker.
    fn poll_stream(&self, idx: usize, max: usize, cx: &mut Context<'_>) -> Poll<Taken> {
        let mut slots = self.slots.borrow_mut();
        let Some(Slot::Stream(st)) = slots[idx].slot.as_mut() else {
            return Poll::Ready(Taken::End(-libc::EINVAL));
        };
        let queued: usize = st
            .got
            .iter()
            .take_while(|(r, _)| *r > 0)
            .map(|(r, _)| *r as usize)
            .sum();
        let want = queued.saturating_sub(st.front_taken).min(max);
        if want > 0 {
            let Some(pool) = &self.pool else {
                return Poll::Ready(Taken::End(-libc::EIO));
            };
            let mut bytes = Vec::with_capacity(want);
            while bytes.len() < want {
                let Some(&(r, Some(b))) = st.got.front() else {
                    // Bytes without a buffer: not something the kernel does.
                    return Poll::Ready(Taken::End(-libc::EIO));
                };
                let len = r as usize;
                // SAFETY: `b` was named by this completion and is given back only below.
                let got = unsafe { pool.bytes(b, len) };
                let k = (len - st.front_taken).min(want - bytes.len());
                bytes.extend_from_slice(&got[st.front_taken..st.front_taken + k]);
                st.front_taken += k;
                if st.front_taken == len {
                    st.front_taken = 0;
                    st.got.pop_front();
                    pool.give_back(b);
                }
            }
            return Poll::Ready(Taken::Bytes(bytes.into_boxed_slice()));
        }
        if let Some((r, _)) = st.got.pop_front() {
            return Poll::Ready(Taken::End(r));
        }
        if st.ended {
            return Poll::Ready(Taken::End(-libc::ECANCELED));
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Completes the operation in `idx` with `result` without the kernel, and wakes its future.
    fn complete(&self, idx: usize, result: i32) {
        let mut slots = self.slots.borrow_mut();
        if let Some(Slot::Waiting { waker, .. }) = slots[idx].slot.take() {
            slots[idx].slot = Some(Slot::Done(result));
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// The operation in `idx` was dropped with `buf` before its future took the result: make sure
    /// nothing of it reaches the kernel after this returns (see the module's header).
    fn abandon(&self, idx: usize, buf: Box<[u8]>) {
        let (state, user_data) = {
            let mut slots = self.slots.borrow_mut();
            (slots[idx].slot.take(), slots[idx].user_data)
        };
        match state {
            Some(Slot::Done(_)) => self.release(idx),
            Some(Slot::Waiting { pos: None, .. }) => {
                self.staged.borrow_mut().retain(|s| s.slot != Some(idx));
                self.release(idx);
                self.count(|s| s.dropped_staged += 1);
                drop(buf);
            }
            Some(Slot::Waiting { pos: Some(pos), .. }) if self.unconsumed(pos) => {
                // SAFETY: the entry at `pos` is in the queue and unconsumed (just checked), and no
                // submission runs during this call: only this thread submits.
                unsafe { self.sqes.neutralise(pos) };
                self.release(idx);
                self.count(|s| s.neutralised += 1);
                drop(buf);
            }
            Some(Slot::Waiting { .. }) => {
                self.slots.borrow_mut()[idx].slot = Some(Slot::Orphaned(buf));
                let cancel = opcode::AsyncCancel::new(user_data)
                    .build()
                    .user_data(IGNORED);
                self.stage(None, cancel);
                self.count(|s| s.cancelled += 1);
            }
            other => {
                // Not a pending operation of this request's (a slot already free or orphaned): the
                // bookkeeping is wrong, and whether the kernel may still write into `buf` is unknown,
                // so it is leaked rather than freed. Unreachable while every request owns its slot.
                self.slots.borrow_mut()[idx].slot = other;
                std::mem::forget(buf);
            }
        }
    }

    /// Registers `cx`'s waker for the operation in `idx`, or returns its result and frees the slot.
    fn poll_op(&self, idx: usize, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.slots.borrow_mut();
        match slots[idx].slot.as_mut() {
            Some(Slot::Done(r)) => {
                let r = *r;
                drop(slots);
                self.release(idx);
                Poll::Ready(r)
            }
            Some(Slot::Waiting { waker, .. }) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => Poll::Ready(-libc::EINVAL),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The thread is ending with operations in flight: closing the ring cancels them, but not
        // before this returns, so their buffers are leaked rather than freed under the kernel.
        let mut streams = false;
        for e in self.slots.get_mut().drain(..) {
            match e.slot {
                Some(Slot::Orphaned(buf)) => std::mem::forget(buf),
                Some(Slot::Stream(st)) => streams |= !st.ended,
                _ => {}
            }
        }
        // Likewise the pool of a multishot receive still armed.
        if let Some(pool) = self.pool.take().filter(|_| streams) {
            pool.leak();
        }
    }
}

/// Consecutive failed submissions: how long to wait before the next try, and whether to log.
#[derive(Debug, Default)]
struct Backoff {
    /// Failures since the last success.
    streak: u32,
    /// When a failure was last logged.
    logged_at: Option<Instant>,
    /// Failures not logged yet.
    unlogged: u64,
}

impl Backoff {
    /// A submission failed at `now`: the wait before the next try, and `Some(failures)` when a line
    /// is due, covering the `failures` since the last one.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.streak = self.streak.saturating_add(1);
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        let log = due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        (backoff_delay(self.streak), log)
    }

    /// A submission went through: the next failure waits the shortest time again.
    fn succeeded(&mut self) {
        self.streak = 0;
    }
}

/// The wait after the `streak`-th failure in a row: 1 ms, 2 ms, 4 ms … at most [`BACKOFF_CAP`].
fn backoff_delay(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_CAP)
}

/// Submits what the thread's sessions staged and reaps completions, for as long as the thread runs.
#[derive(Default)]
struct DriverTask {
    backoff: Backoff,
    /// Set while backing off: no submission before it fires.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DriverTask {
    /// Whether the back-off (if any) is over.
    fn may_submit(&mut self, cx: &mut Context<'_>) -> bool {
        match self.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
            Some(Poll::Pending) => false,
            Some(Poll::Ready(())) => {
                self.sleep = None;
                true
            }
            None => true,
        }
    }

    fn back_off(&mut self, d: &Driver, e: &io::Error, cx: &mut Context<'_>) {
        let now = Instant::now();
        let (delay, log) = self.backoff.failed(now);
        if let Some(failures) = log {
            tracing::warn!(error = %e, failures, retry_in = ?delay, "io_uring submission failed; backing off");
        }
        d.count(|s| s.backoffs += 1);
        let mut sleep = Box::pin(tokio::time::sleep_until(now + delay));
        // Registers the waker; a zero wait is not possible (the first is 1 ms).
        let _ = sleep.as_mut().poll(cx);
        self.sleep = Some(sleep);
    }
}

impl Future for DriverTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(d) = existing_driver(None) else {
            return Poll::Ready(());
        };
        {
            let mut task = d.task.borrow_mut();
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        for _ in 0..DRIVER_ROUNDS {
            let mut reaped = d.reap();
            // Entries left after a pass that ran out of rounds: nothing else wakes this task for
            // them (staging wakes it only when nothing was staged).
            let mut more = false;
            if this.may_submit(cx) {
                match d.flush() {
                    Flushed::Done => this.backoff.succeeded(),
                    Flushed::More => {
                        this.backoff.succeeded();
                        more = true;
                    }
                    Flushed::Failed { error, progressed } => {
                        // Only failures in a row, with nothing submitted between them, lengthen
                        // the wait.
                        if progressed {
                            this.backoff.succeeded();
                        }
                        this.back_off(&d, &error, cx);
                    }
                }
                reaped += d.reap();
            }
            match d.ready.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) if d.wake.is_some() => {
                    // Work is queued: the next round enters the ring to run it. Cleared first, so
                    // work queued after that entry signals the eventfd again (the kernel signals it
                    // when work is queued for an idle ring; its count is never read, readiness is
                    // edge-triggered).
                    guard.clear_ready();
                    d.owed.set(true);
                }
                Poll::Ready(Ok(mut guard)) => {
                    // Readiness is cleared only once the queue is seen empty; a completion posted
                    // after this check raises a new edge. Entries left unsubmitted do not keep it
                    // set: the back-off timer or the next staged entry wakes this task for them.
                    if reaped == 0 && d.reap() == 0 {
                        guard.clear_ready();
                    }
                }
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "io_uring ring cannot be polled");
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // The ring is asked for work left over only at the end of a chain of entries:
                    // a pass that completed something woke futures, which run next and usually
                    // stage entries, so it polls again after them (`entered` still set) instead.
                    let settling = reaped > 0 && d.entered.get();
                    if !more && !d.owed.get() && !settling && d.work_left() {
                        d.owed.set(true);
                    }
                    // Owed an entry: after the futures just woken have run and staged what they
                    // start next, which that entry then submits.
                    if more || d.owed.get() || settling {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        }
        // Completions keep coming: let the thread's other tasks run before the next round.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One receive or send in flight, owning its buffer until it completes and borrowing the socket it
/// targets for `'fd`. Built only by [`Op::recv`] and [`Op::send`]; never leaked (`pump` awaits or
/// drops every one), since `Drop` is what keeps a dropped operation away from a reused descriptor.
struct Op<'fd> {
    driver: u64,
    idx: usize,
    buf: Option<Box<[u8]>>,
    _fd: PhantomData<BorrowedFd<'fd>>,
}

impl<'fd> Op<'fd> {
    /// A receive from `fd` into the whole of `buf`.
    fn recv(fd: BorrowedFd<'fd>, mut buf: Box<[u8]>) -> io::Result<Op<'fd>> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .ioprio(IORING_RECVSEND_POLL_FIRST)
            .build();
        // SAFETY: the entry points at the first `len` bytes of `buf`'s heap allocation, which
        // `start` takes (moving the box does not move the allocation), and targets `fd`, borrowed
        // for `'fd`.
        unsafe { Op::start(entry, buf) }
    }

    /// A send of `buf[range]` to `fd` (no SIGPIPE: a broken socket is an error).
    fn send(fd: BorrowedFd<'fd>, buf: Box<[u8]>, range: Range<usize>) -> io::Result<Op<'fd>> {
        let bytes = buf.get(range).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "send range outside the buffer")
        })?;
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        // SAFETY: the entry points at bytes within `buf`'s heap allocation, which `start` takes,
        // and targets `fd`, borrowed for `'fd`.
        unsafe { Op::start(entry, buf) }
    }

    /// Stages `entry` on this thread's ring, as an operation owning `buf`.
    ///
    /// # Safety
    ///
    /// All memory `entry` points at must lie within `buf`'s heap allocation, and the only
    /// descriptor it names must stay open for `'fd`.
    unsafe fn start(entry: squeue::Entry, buf: Box<[u8]>) -> io::Result<Op<'fd>> {
        let d = driver().ok_or_else(|| io::Error::other("io_uring ring unavailable"))?;
        let idx = d.start(entry);
        Ok(Op {
            driver: d.id,
            idx,
            buf: Some(buf),
            _fd: PhantomData,
        })
    }
}

impl Future for Op<'_> {
    /// The completion's result (bytes moved, or a negative errno), and the buffer back.
    type Output = (i32, Box<[u8]>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(d) = existing_driver(Some(self.driver)) else {
            // Polled on a thread that is not the ring's: never expected (sessions stay on the worker
            // that accepted them). Report it as an error; `drop` keeps the buffer alive.
            return Poll::Ready((-libc::EXDEV, vec![0u8; 0].into_boxed_slice()));
        };
        match d.poll_op(self.idx, cx) {
            Poll::Ready(r) => Poll::Ready((r, self.buf.take().unwrap_or_default())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else {
            return; // completed and returned
        };
        let Some(d) = existing_driver(Some(self.driver)) else {
            // Not on the ring's thread: the kernel may still write into the buffer, so it is never
            // freed (a leak, not a use after free).
            std::mem::forget(buf);
            return;
        };
        d.abandon(self.idx, buf);
    }
}

/// What a multishot receive gave its direction.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Bytes, copied out of the pool into a buffer of their own.
    Bytes(Box<[u8]>),
    /// Its end, nothing queued before it: 0 (EOF) or a negative errno; -ECANCELED where it was
    /// stopped (a cancellation, back-pressure, or the kernel's own reasons) and may be armed again,
    /// -ENOBUFS where the pool had no buffer free.
    End(i32),
}

/// A multishot receive on a socket borrowed for `'fd`: armed once, it completes once per message
/// into the ring's pool until it ends. Dropping it leaves nothing that can reach the socket (as for
/// [`Op`]).
struct MultiRecv<'fd> {
    driver: u64,
    idx: usize,
    _fd: PhantomData<BorrowedFd<'fd>>,
}

impl<'fd> MultiRecv<'fd> {
    /// Arms one on `fd`; `None` where this thread's ring has no pool or its kernel refused one.
    fn start(fd: BorrowedFd<'fd>) -> Option<MultiRecv<'fd>> {
        let d = driver()?;
        if d.pool.is_none() || d.no_streams.get() {
            return None;
        }
        let entry = opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), bufs::GROUP).build();
        let idx = d.start_in(entry, Slot::Stream(Stream::default()));
        d.count(|s| s.streams += 1);
        Some(MultiRecv {
            driver: d.id,
            idx,
            _fd: PhantomData,
        })
    }

    /// The next bytes (at most `max`) or the end.
    fn take(&mut self, max: usize) -> impl Future<Output = Taken> + '_ {
        let (driver, idx) = (self.driver, self.idx);
        std::future::poll_fn(move |cx| match existing_driver(Some(driver)) {
            Some(d) => d.poll_stream(idx, max, cx),
            None => Poll::Ready(Taken::End(-libc::EXDEV)),
        })
    }

    /// Asks it to stop: what came before still comes, then `End(-ECANCELED)`.
    fn cancel(&self) {
        if let Some(d) = existing_driver(Some(self.driver)) {
            d.cancel_stream(self.idx);
        }
    }
}

impl Drop for MultiRecv<'_> {
    fn drop(&mut self) {
        if let Some(d) = existing_driver(Some(self.driver)) {
            d.abandon_stream(self.idx);
        }
        // On another thread (never expected): the slot stays, and with it the pool (see `Driver`'s
        // drop): a leak, not a write into freed memory.
    }
}

/// The operation a direction waits for, if any (its driver and slot), so that a relay stopped for
/// `carry` can cancel it and wait for what it did. Written only by the direction's pump.
#[derive(Debug, Default)]
pub(super) struct InFlight(AtomicU64);

impl InFlight {
    fn set(&self, op: &Op<'_>) {
        self.mark(op.driver, op.idx);
    }

    fn mark(&self, driver: u64, idx: usize) {
        self.0
            .store((driver << 32) | (idx as u64 & 0xffff_ffff), Relaxed);
    }

    fn clear(&self) {
        self.0.store(0, Relaxed);
    }

    /// Whether an operation is in flight.
    pub(super) fn busy(&self) -> bool {
        self.0.load(Relaxed) != 0
    }

    /// Cancels the operation in flight, if any (on the thread that started it: the relay's).
    pub(super) fn cancel(&self) {
        let v = self.0.load(Relaxed);
        if v == 0 {
            return;
        }
        if let Some(d) = existing_driver(Some(v >> 32)) {
            d.cancel((v & 0xffff_ffff) as usize);
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
///
/// Receives are multishot where the ring has a pool of provided buffers: armed once, completed once
/// per message, instead of one receive (and one internal poll) armed per message. Each message is
/// copied out of the pool into the direction's own buffer (small messages: the copy costs less than
/// the bookkeeping of sending from the pool) and its pool buffer given back at once. A receive the
/// pool could not serve (ENOBUFS) is followed by one one-shot receive into the direction's buffer,
/// so a drained pool slows a direction down and never stalls it.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    other: &Flow<'_>,
) -> Option<DirEnd> {
    // A carried connection's held bytes, if any, are sent first.
    let (mut buf, mut n, mut off) = match flow.pending.take() {
        Some(p) => (p.buf, p.end, p.off),
        None => (Box::default(), 0, 0),
    };
    // How much one receive takes: 2 KiB, 16 KiB once one came back full.
    let mut size = SMALL_BUF;
    let mut stream: Option<MultiRecv<'_>> = None;
    // The next receive is one-shot (the pool was empty last time).
    let mut one_shot = false;
    // Bulk was seen: the multishot receive is stopping, and its end hands over to splice.
    let mut leaving = false;
    // The multishot receive has delivered bytes (an EINVAL after that is the socket's, not the
    // kernel saying it has no multishot receives).
    let mut delivered = false;
    loop {
        buf = match send_or_stop(dst, flow, &mut stream, buf, off..n).await {
            Ok(b) => b,
            Err(end) => return Some(end),
        };
        if flow.carrying.load(Relaxed) {
            return Some(carry_out(flow, stream, buf, 0, 0).await);
        }
        off = 0;
        if stream.is_none() && !one_shot && !leaving {
            stream = MultiRecv::start(src.as_fd());
        }
        n = if let Some(s) = stream.as_mut() {
            // Armed, the direction holds no buffer of its own: bytes come in one of their size,
            // so an idle connection keeps nothing but its sockets and the two receives.
            buf = Box::default();
            match flow.take(s, size).await {
                Taken::Bytes(b) => {
                    delivered = true;
                    buf = b;
                    buf.len()
                }
                Taken::End(0) => return Some(finish(dst, flow, other)),
                Taken::End(e) => {
                    stream = None;
                    if leaving {
                        // Everything it received was sent: splice takes over the socket.
                        return None;
                    }
                    match after_stream(e, delivered) {
                        Ok(once) => one_shot = once,
                        Err(e) => return Some(DirEnd::SourceError(e)),
                    }
                    0
                }
            }
        } else {
            one_shot = false;
            let (b, got) = receive_once(src, flow, buf, size).await;
            buf = b;
            match got {
                Ok(Some(n)) => n,
                Ok(None) => return Some(finish(dst, flow, other)),
                Err(e) => return Some(DirEnd::SourceError(e)),
            }
        };
        if flow.carrying.load(Relaxed) {
            // Received as the relay stopped: these bytes go along, unsent.
            return Some(carry_out(flow, stream, buf, 0, n).await);
        }
        if n == 0 {
            continue;
        }
        // A full receive means more is coming: take more next time; a full big one means bulk.
        if n == size {
            // Everything received is sent first (the send loop above runs before the next receive).
            let bulk = size >= COPY_BUF;
            buf = match send_or_stop(dst, flow, &mut stream, buf, off..n).await {
                Ok(b) => b,
                Err(end) => return Some(end),
            };
            if bulk {
                let Some(s) = &stream else { return None };
                // What the multishot receive got before it stops is sent first, at the top.
                s.cancel();
                leaving = true;
            } else {
                size = COPY_BUF;
            }
            // All of it sent: nothing is left for the send at the top.
            n = 0;
        }
    }
}

/// One one-shot receive into the direction's own buffer (made `size` long): the buffer back, with
/// the bytes received (0: none yet, to be tried again), `None` at EOF, or the source's error.
async fn receive_once(
    src: &TcpStream,
    flow: &Flow<'_>,
    mut buf: Box<[u8]>,
    size: usize,
) -> (Box<[u8]>, io::Result<Option<usize>>) {
    if buf.len() != size {
        buf = vec![0u8; size].into_boxed_slice();
    }
    let op = match Op::recv(src.as_fd(), buf) {
        Ok(op) => op,
        Err(e) => return (Box::default(), Err(e)),
    };
    let (r, buf) = flow.wait(op).await;
    let got = match r {
        0 => Ok(None),
        r if r > 0 => Ok(Some(r as usize)),
        e if -e == libc::EINTR || -e == libc::EAGAIN || -e == libc::ECANCELED => Ok(Some(0)),
        e => Err(io::Error::from_raw_os_error(-e)),
    };
    (buf, got)
}

/// [`send_all`] of `buf[unsent]`, the buffer back once it is all sent; or how the direction ends
/// (the destination failed, or the relay stops for `carry`: the unsent rest goes along, and the
/// multishot receive is drained into it first).
async fn send_or_stop(
    dst: &TcpStream,
    flow: &Flow<'_>,
    stream: &mut Option<MultiRecv<'_>>,
    buf: Box<[u8]>,
    unsent: Range<usize>,
) -> Result<Box<[u8]>, DirEnd> {
    match send_all(dst, flow, buf, unsent.start, unsent.end).await {
        Ok(b) => Ok(b),
        Err(Stopped::End(end)) => Err(end),
        Err(Stopped::Carry(b, off, end)) => Err(carry_out(flow, stream.take(), b, off, end).await),
    }
}

/// What a multishot receive's last completion with error `err` (negative) means for its
/// direction: receive next one-shot (`Ok(true)`: the pool was empty), arm a multishot receive again
/// (`Ok(false)`), or the source broke. EINVAL before any byte is the kernel refusing multishot
/// receives, said once for the ring: its receives are one-shot from then on.
fn after_stream(err: i32, delivered: bool) -> io::Result<bool> {
    match -err {
        libc::ECANCELED | libc::EINTR | libc::EAGAIN => Ok(false),
        libc::ENOBUFS => Ok(true),
        libc::EINVAL if !delivered => {
            if let Some(d) = existing_driver(None) {
                d.no_streams.set(true);
            }
            tracing::debug!("io_uring: multishot receive refused; receives are one-shot");
            Ok(false)
        }
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Why [`send_all`] stopped before sending everything.
enum Stopped {
    /// The direction ended (the destination failed).
    End(DirEnd),
    /// The relay stops for `carry`: `buf[off..end]` is unsent.
    Carry(Box<[u8]>, usize, usize),
}

/// Sends `buf[off..n]` whole through the ring, counting as it goes.
async fn send_all(
    dst: &TcpStream,
    flow: &Flow<'_>,
    mut buf: Box<[u8]>,
    mut off: usize,
    n: usize,
) -> Result<Box<[u8]>, Stopped> {
    while off < n {
        let op =
            Op::send(dst.as_fd(), buf, off..n).map_err(|e| Stopped::End(DirEnd::DestError(e)))?;
        let (r, b) = flow.wait(op).await;
        buf = b;
        match r {
            r if r > 0 => {
                off += r as usize;
                flow.wrote(r as usize);
            }
            e if -e == libc::EINTR || -e == libc::EAGAIN || -e == libc::ECANCELED => {}
            0 => {
                return Err(Stopped::End(DirEnd::DestError(
                    io::ErrorKind::WriteZero.into(),
                )))
            }
            e => {
                return Err(Stopped::End(DirEnd::DestError(
                    io::Error::from_raw_os_error(-e),
                )))
            }
        }
        if flow.carrying.load(Relaxed) {
            return Err(Stopped::Carry(buf, off, n));
        }
    }
    Ok(buf)
}

/// Stops the direction for `carry` holding `buf[off..end]` unsent, and, if a multishot receive is
/// armed, everything it received before it stopped: parked for the relay to take along. An EOF it
/// met is left to whoever carries on (a socket that read EOF reads it again); an error breaks the
/// direction as it would have.
async fn carry_out(
    flow: &Flow<'_>,
    stream: Option<MultiRecv<'_>>,
    buf: Box<[u8]>,
    off: usize,
    end: usize,
) -> DirEnd {
    let Some(mut s) = stream else {
        return flow.park(buf, off, end);
    };
    s.cancel();
    let mut held = buf.get(off..end).unwrap_or_default().to_vec();
    loop {
        match flow.take(&mut s, COPY_BUF).await {
            Taken::Bytes(b) => held.extend_from_slice(&b),
            Taken::End(0) => break,
            Taken::End(e)
                if [libc::ECANCELED, libc::ENOBUFS, libc::EINTR, libc::EAGAIN].contains(&-e) =>
            {
                break
            }
            Taken::End(e) => return DirEnd::SourceError(io::Error::from_raw_os_error(-e)),
        }
    }
    let end = held.len();
    flow.park(held.into_boxed_slice(), 0, end)
}

impl Flow<'_> {
    /// Awaits `op`, marked in flight meanwhile so that a relay stopped for `carry` can cancel it.
    async fn wait(&self, op: Op<'_>) -> (i32, Box<[u8]>) {
        self.op.set(&op);
        let r = op.await;
        self.op.clear();
        r
    }

    /// Awaits the next of `s`, marked in flight meanwhile (as `wait`).
    async fn take(&self, s: &mut MultiRecv<'_>, max: usize) -> Taken {
        self.op.mark(s.driver, s.idx);
        let r = s.take(max).await;
        self.op.clear();
        r
    }

    /// Stops for `carry` holding `buf[off..end]` unsent: parked for the relay to take along.
    fn park(&self, buf: Box<[u8]>, off: usize, end: usize) -> DirEnd {
        if off < end {
            self.hold(buf, off, end);
        }
        DirEnd::Carried
    }
}
