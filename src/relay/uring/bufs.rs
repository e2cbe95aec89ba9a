//! The ring's provided buffers: one pool per ring, shared by every multishot receive on it. The
//! kernel picks a buffer from the pool for each message a multishot receive gets and names it in the
//! completion; the buffer is ours, as a [`Filled`], until [`BufPool::give_back`] takes that and
//! hands the buffer to the kernel again.
//!
//! Why a pool and not a buffer per receive: a multishot receive stays armed for a connection's life
//! and the kernel, not the program, decides when it writes, so it cannot write into one buffer of the
//! direction's own (the next message would overwrite the one not yet sent). What the pool costs is
//! its size in address space, touched as the kernel uses it: for a ring worker (`ring/`), which sends
//! from the pool's buffers themselves, up to 1,024 of 16 KiB, given a few at a time as receives find
//! the pool dry ([`BufPool::grow`]). The kernel takes buffers in the order they were
//! given, so a buffer given once is used again in turn: every buffer ever given is eventually
//! touched, and what the process keeps resident follows how many were given, not how many are in use.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering::Release};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The pool's buffer group, the one every multishot receive names.
pub(crate) const GROUP: u16 = 0;

/// One anonymous private mapping of `len` bytes.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a new anonymous mapping that overlaps no Rust object; the result is checked
        // before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created, once. A pool whose buffers the kernel
        // may still write into is never dropped (`BufPool::leak`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A pool buffer a completion named: the kernel wrote a message into it and took it out of its
/// ring, so it is the program's, to read ([`BufPool::bytes`]) until it is given back
/// ([`BufPool::give_back`], which takes the token). Neither `Clone` nor `Send`: one token per time
/// the kernel hands a buffer over, on the thread of the ring (and so of the one pool) it came from.
#[derive(Debug)]
pub(crate) struct Filled {
    bid: u16,
    _thread: PhantomData<*const ()>,
}

impl Filled {
    /// The token for buffer `bid`.
    ///
    /// # Safety
    ///
    /// A completion of a receive from this thread's pool named `bid` (its `IORING_CQE_F_BUFFER`),
    /// and this is the one token made for that completion: the buffer is out of the kernel's ring
    /// until the token is given back.
    pub(crate) unsafe fn named(bid: u16) -> Filled {
        Filled {
            bid,
            _thread: PhantomData,
        }
    }
}

/// A ring of provided buffers registered with one io_uring ring as [`GROUP`].
pub(crate) struct BufPool {
    /// The ring of entries (`struct io_uring_buf`) the kernel takes buffers from.
    entries: Mapping,
    /// The buffers, `size` bytes each, buffer `i` at `i * size`.
    bufs: Mapping,
    count: u16,
    size: usize,
    /// The ring's tail as this side last published it.
    tail: Cell<u16>,
    /// Buffers `0..given` have been given to the kernel (and are its, or ours until given back);
    /// the rest never have, and their pages are untouched.
    given: Cell<u16>,
}

impl BufPool {
    /// A pool of `count` buffers (a power of two) of `size` bytes, the first `first` of them given
    /// to the kernel (the rest by [`BufPool::grow`]), registered with `ring`. `Err` where the
    /// kernel has no provided-buffer rings (before 5.19).
    pub(crate) fn register(
        ring: &IoUring,
        count: u16,
        size: u32,
        first: u16,
    ) -> io::Result<BufPool> {
        if !count.is_power_of_two() || size == 0 {
            return Err(io::Error::other(
                "provided buffers: count not a power of two, or size 0",
            ));
        }
        let size = size as usize;
        let entries = Mapping::new(usize::from(count) * size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(usize::from(count) * size)?;
        let pool = BufPool {
            entries,
            bufs,
            count,
            size,
            tail: Cell::new(0),
            given: Cell::new(first.min(count)),
        };
        for bid in 0..pool.given.get() {
            pool.put(bid);
        }
        // SAFETY: the entries are `count` `struct io_uring_buf`s in a page-aligned mapping the
        // pool owns; the pool lives as long as the ring (it is the ring's driver's, and leaked
        // where the kernel may still use it), so the kernel never reads a freed ring.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.entries.ptr.as_ptr() as u64,
                count,
                GROUP,
                0,
            )?;
        }
        pool.publish();
        Ok(pool)
    }

    /// Writes buffer `bid` into the next free entry of the ring (not yet visible to the kernel).
    fn put(&self, bid: u16) {
        let tail = self.tail.get();
        let i = usize::from(tail & (self.count - 1));
        let addr = self.bufs.ptr.as_ptr() as u64 + u64::from(bid) * self.size as u64;
        // SAFETY: `i < count`, so the entry lies within the mapping; the kernel reads only entries
        // before the published tail, and this one is at or past it (`count` buffers at most are
        // ever given, each once until it comes back).
        let e = unsafe { &mut *self.entries.ptr.as_ptr().cast::<BufRingEntry>().add(i) };
        e.set_addr(addr);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring's tail is the last `u16` of its first entry (the kernel's ABI; the
        // crate's `tail` computes its address), aligned for an atomic store; the kernel reads it
        // concurrently, hence the atomic with release order, after the entries it covers.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr.as_ptr().cast()) as *const AtomicU16;
            (*tail).store(self.tail.get(), Release);
        }
    }

    /// Gives the kernel up to `more` buffers it has never had; how many it got (none once every
    /// buffer has been given).
    pub(crate) fn grow(&self, more: u16) -> u16 {
        let from = self.given.get();
        let to = from.saturating_add(more).min(self.count);
        for bid in from..to {
            self.put(bid);
        }
        if to > from {
            self.given.set(to);
            self.publish();
        }
        to - from
    }

    /// How many buffers have been given to the kernel so far.
    pub(crate) fn given(&self) -> u16 {
        self.given.get()
    }

    /// Gives a buffer back to the kernel, with its token: nothing reads the buffer after.
    pub(crate) fn give_back(&self, buf: Filled) {
        if buf.bid < self.given.get() {
            self.put(buf.bid);
            self.publish();
        }
    }

    /// The whole of buffer `buf` (the message is its first bytes, as many as the completion said),
    /// borrowed with the token: it cannot be given back while they are read.
    pub(crate) fn bytes<'a>(&'a self, buf: &'a Filled) -> &'a [u8] {
        if buf.bid >= self.count {
            return &[];
        }
        // SAFETY: within the mapping (`bid < count`, `size` bytes from its start), which was
        // initialised (zeros, from `mmap`) before the kernel first wrote into it. The kernel writes
        // only into buffers in its ring, and this one is out of it until `give_back` takes the
        // token (`Filled`), which these bytes borrow: nothing writes them while they are read.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs.ptr.as_ptr().add(usize::from(buf.bid) * self.size),
                self.size,
            )
        }
    }

    /// Never unmaps the pool: for a ring that closes with multishot receives still armed, which the
    /// kernel cancels only after the close returns.
    pub(crate) fn leak(self) {
        std::mem::forget(self);
    }
}
