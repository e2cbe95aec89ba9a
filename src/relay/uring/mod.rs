//! What io_uring is to this process, in the data plane's lowest layer (`relay`, which the ring
//! workers build on): whether it can be used here
//! (probed once: the kernel's version and operations, a seccomp profile, `io_uring_disabled`,
//! `SLUICEGATE_IO_URING=off`), how a ring is set up, and the pool of provided buffers a ring's
//! multishot receives fill (`bufs.rs`). The ring workers (`ring/`) are the one io_uring data plane;
//! `relay::engine_for` asks here whether `auto` may put a service on them, and the routes
//! (`route.rs`) why a shared address cannot be.
//!
//! A module of the data plane's kernel-facing side, allowed `unsafe` (as `ring/submit.rs` and
//! `relay/splice.rs` are): the buffer pool's memory is shared with the kernel, and a probe pushes
//! one submission entry.
#![allow(unsafe_code)]

pub(crate) mod bufs;

use std::io;
use std::sync::OnceLock;

use io_uring::{opcode, IoUring};

use bufs::BufPool;

/// Whether this kernel has what a ring worker needs (multishot accept and receive, provided
/// buffer rings, DEFER_TASKRUN: Linux 6.1), and io_uring is allowed (not `io_uring_disabled`, not
/// a seccomp profile that blocks it, not `SLUICEGATE_IO_URING=off`). `Err` says what is missing.
/// Probed once per process: every service `auto` resolves asks.
pub(crate) fn availability() -> &'static Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(probe)
}

/// Why the ring workers could not start in this process, once they failed to (a thread or a ring
/// refused for want of memory, with the probe passed): they are not tried again.
static NO_WORKERS: OnceLock<String> = OnceLock::new();

/// Records that the ring workers could not start, so services resolved from now on run `epoll`.
pub(crate) fn workers_failed(why: String) {
    let _ = NO_WORKERS.set(why);
}

/// Whether a service can be put on the ring workers: io_uring has what they need and they have
/// not failed to start.
pub(crate) fn usable() -> Result<(), &'static str> {
    availability().as_ref().map_err(String::as_str)?;
    NO_WORKERS.get().map_or(Ok(()), |why| Err(why.as_str()))
}

fn probe() -> Result<(), String> {
    if std::env::var("SLUICEGATE_IO_URING").is_ok_and(|v| v.trim() == "off") {
        return Err("disabled by SLUICEGATE_IO_URING=off".into());
    }
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    // A policy (seccomp) can allow io_uring_setup and refuse io_uring_enter, the call a ring
    // lives in: io_uring is usable only once an entry went through it.
    nop_through(&mut ring)?;
    drop(ring);
    let ring = build(8, 8)
        .map_err(|e| format!("no ring with SINGLE_ISSUER and DEFER_TASKRUN (Linux 6.1+): {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::Accept::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::LinkTimeout::CODE, "link timeout"),
        (opcode::RecvMulti::CODE, "receive"),
        (opcode::Recv::CODE, "one-shot receive"),
        (opcode::Send::CODE, "send"),
        (opcode::Close::CODE, "close"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::AsyncCancel2::CODE, "cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring has no {name} operation"));
        }
    }
    BufPool::register(&ring, 8, 64, 8)
        .map(drop)
        .map_err(|e| format!("no provided-buffer rings (Linux 5.19+): {e}"))
}

/// A ring as a worker runs it: `sq` submission and `cq` completion entries, one thread submitting
/// (SINGLE_ISSUER), its queued work run only when that thread enters (DEFER_TASKRUN: no
/// interruption while it is busy), and a submission that fails part-way still submitting the rest
/// (SUBMIT_ALL).
pub(crate) fn build(sq: u32, cq: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_submit_all()
        .setup_defer_taskrun()
        .build(sq)
}

/// Runs `f` (a ring's setup, the pages it pins) again on ENOMEM, a few times over at most 200 ms:
/// the kernel gives back what a closed ring held (pinned pages, counted against `RLIMIT_MEMLOCK`)
/// from a worker of its own, a little after the close, so a ring made just after others closed
/// (the old process's at an upgrade, the tests' one after another) may find the limit still
/// taken. Without it such a worker fails to start and its services run on epoll.
pub(crate) fn after_closed_rings<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    const TRIES: u32 = 20;
    for _ in 1..TRIES {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            done => return done,
        }
    }
    f()
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

/// For a test of the ring workers: `true` (skip the test, saying why) when io_uring is missing
/// here and `SLUICEGATE_TEST_NO_IO_URING=1` says that is expected; a panic when it is missing and
/// nothing said so, so a test of the ring cannot pass without the ring having run.
#[cfg(test)]
pub(crate) fn missing_in_test() -> bool {
    let Err(why) = availability() else {
        return false;
    };
    assert!(
        std::env::var("SLUICEGATE_TEST_NO_IO_URING").is_ok_and(|v| v == "1"),
        "io_uring is unavailable here ({why}): a test of the ring workers cannot run; set \
         SLUICEGATE_TEST_NO_IO_URING=1 where that is expected"
    );
    eprintln!("skipped (SLUICEGATE_TEST_NO_IO_URING=1): no ring worker here: {why}");
    true
}
