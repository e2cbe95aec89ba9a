//! What `kind: exec` checks leave behind, killed and reaped.
//!
//! A check runs in a process group of its own, killed whole when the check ends; a process that
//! left that group (`setsid`, a double fork into a new session) escapes a group kill. So the binary
//! makes sluicegate a *child subreaper* ([`adopt_orphans`]): a process whose parent dies is
//! reparented to sluicegate instead of init, and after each check (and at exit) [`reap_orphans`]
//! kills and reaps every child of sluicegate that is not one it started and is still waiting for.
//! A subreaper rather than a cgroup per check: it works on every kernel since 3.4, without a
//! writable cgroup v2 tree or a delegated systemd unit.
//!
//! Which children are strays is [`strays`], pure: tokio reaps the commands it started by their
//! pids, and the upgrade's new process is a child too, so a blanket `waitpid(-1)` would steal their
//! exit statuses; only the processes that [`strays`] names are killed and waited for, each by its
//! pid.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};

/// Whether this process adopts orphans ([`adopt_orphans`] was called): only then are its stray
/// children ours to kill. A library user (the in-process tests) has children of its own.
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// The exec checks in flight: each command's pid, from its spawn until it is reaped. Held across
/// the spawn, so a sweep never sees a command started but not yet listed; bounded by the exec
/// slots.
static IN_FLIGHT: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Scans of one sweep after a check: enough for a chain of a few generations to be killed one
/// after another (each kill reparents the victim's children); what is left waits for the next.
pub(super) const ROUNDS_AFTER_CHECK: usize = 8;

/// Scans of the sweep at exit, when nothing comes after it.
const ROUNDS_AT_EXIT: usize = 100;

/// Between two scans: for a killed process to die, so that its children are reparented.
const BETWEEN_ROUNDS: Duration = Duration::from_millis(5);

/// Makes this process a child subreaper, so that what exec checks leave behind (a process in a
/// session of its own whose parent exited) becomes its child, and [`reap_orphans`] may kill and
/// reap it. For the binary: a process embedding sluicegate keeps its own children to itself.
///
/// # Errors
/// When `prctl(PR_SET_CHILD_SUBREAPER)` is refused (a kernel before 3.4): such orphans then go to
/// init, and only the check's process group is killed.
pub fn adopt_orphans() -> std::io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    ADOPTING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Kills and reaps what exec checks left running, at exit: the process group of every check still
/// in flight (none after the runtime dropped the probes, each killing its own; some at a forced
/// exit), then their leaders and anything they left, children of this process by now or about to
/// be. Returns how many strays were killed. Only the groups are killed unless [`adopt_orphans`]
/// succeeded.
pub fn reap_orphans() -> usize {
    let flying = std::mem::take(&mut *in_flight());
    for pid in flying
        .iter()
        .filter_map(|&p| Pid::from_raw(i32::try_from(p).ok()?))
    {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
    sweep(ROUNDS_AT_EXIT)
}

/// Whether [`adopt_orphans`] succeeded in this process.
pub(super) fn adopting() -> bool {
    ADOPTING.load(Ordering::Relaxed)
}

/// One process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Row {
    pub(super) pid: u32,
    pub(super) ppid: u32,
    pub(super) pgid: u32,
}

/// The children of `me` that are ours to kill: every child that is neither in `my_group` (the
/// upgrade's new process, anything started other than as a check) nor a check in flight, nor in
/// the process group of one (its own group kill takes it when it ends).
pub(super) fn strays(rows: &[Row], me: u32, my_group: u32, in_flight: &BTreeSet<u32>) -> Vec<u32> {
    rows.iter()
        .filter(|r| r.ppid == me && r.pgid != my_group)
        .filter(|r| !in_flight.contains(&r.pid) && !in_flight.contains(&r.pgid))
        .map(|r| r.pid)
        .collect()
}

/// The pid, parent and process group in a `/proc/PID/stat` line, `None` when it is not one. The
/// command name is in parentheses and may hold anything, parentheses and spaces too: the fields
/// are counted from the last `)`.
pub(super) fn parse_stat(line: &str) -> Option<Row> {
    let (head, tail) = line.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = tail.split_ascii_whitespace().skip(1); // the state
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some(Row { pid, ppid, pgid })
}

/// The process table. A process that exits while it is read is left out; so is everything when
/// `/proc` cannot be read (the next sweep tries again).
fn scan() -> Vec<Row> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .collect()
}

/// The list of checks in flight; a poisoned lock is taken over (the set is consistent after every
/// statement that changes it).
pub(super) fn in_flight() -> MutexGuard<'static, BTreeSet<u32>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Up to `rounds` scans, each killing and reaping the strays it finds, until one finds none.
/// Returns how many were killed.
pub(super) fn sweep(rounds: usize) -> usize {
    if !adopting() {
        return 0;
    }
    let me = rustix::process::getpid();
    let my_group = rustix::process::getpgrp();
    let mut killed = 0;
    for round in 0..rounds {
        let found = {
            // Held while the strays are killed and reaped: no check can start (and be taken for a
            // stray) meanwhile, and no pid here can be reused, as only this sweep reaps them.
            let flying = in_flight();
            let found = strays(
                &scan(),
                me.as_raw_nonzero().get().unsigned_abs(),
                my_group.as_raw_nonzero().get().unsigned_abs(),
                &flying,
            );
            for pid in found
                .iter()
                .filter_map(|&p| Pid::from_raw(i32::try_from(p).ok()?))
            {
                // Its group too, when it leads one: what it started there goes at once.
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                // Reaped now if it is dead already; else it is found again by the next scan.
                let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
            }
            found.len()
        };
        if found == 0 {
            break;
        }
        killed += found;
        if round + 1 < rounds {
            std::thread::sleep(BETWEEN_ROUNDS);
        }
    }
    if killed > 0 {
        tracing::debug!(killed, "health: killed what exec checks left running");
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, ppid: u32, pgid: u32) -> Row {
        Row { pid, ppid, pgid }
    }

    #[test]
    fn strays_are_the_children_no_check_and_no_other_part_of_us_waits_for() {
        let (me, my_group) = (100, 90);
        let in_flight = BTreeSet::from([200, 300]);
        let rows = [
            row(1, 0, 1),       // init: not our child
            row(100, 90, 90),   // ourselves
            row(150, 100, 90),  // the upgrade's new process: in our group
            row(200, 100, 200), // a check in flight
            row(201, 100, 200), // left by it, in its group: its own group kill takes it
            row(210, 200, 200), // its child, not ours
            row(300, 100, 300), // another check in flight
            row(400, 100, 400), // a `setsid` child whose parent, a finished check, is gone
            row(401, 400, 400), // its child: not ours until 400 dies
            row(500, 100, 250), // left by a finished check in that check's group
            row(600, 7, 600),   // someone else's
        ];
        assert_eq!(strays(&rows, me, my_group, &in_flight), vec![400, 500]);
        // Once the checks are done, what they left is ours too; our group never is.
        let none = BTreeSet::new();
        assert_eq!(
            strays(&rows, me, my_group, &none),
            vec![200, 201, 300, 400, 500]
        );
    }

    #[test]
    fn stat_lines_are_read_from_the_last_parenthesis() {
        assert_eq!(
            parse_stat("4242 (sleep) S 1 4242 4242 0 -1 4194560 100 0"),
            Some(row(4242, 1, 4242))
        );
        assert_eq!(
            parse_stat("77 (a) b (c) Z 100 77 60 0"),
            Some(row(77, 100, 77)),
            "a name with parentheses and spaces"
        );
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("77 (x) S"), None, "cut short");
        assert_eq!(parse_stat("x (y) S 1 2"), None, "not a pid");
    }

    #[test]
    fn the_process_table_is_read() {
        let me = std::process::id();
        let rows = scan();
        let mine = rows.iter().find(|r| r.pid == me).expect("this process");
        assert_eq!(
            mine.pgid,
            rustix::process::getpgrp()
                .as_raw_nonzero()
                .get()
                .unsigned_abs()
        );
    }

    #[test]
    fn nothing_is_swept_unless_orphans_are_adopted() {
        // The test process never calls adopt_orphans: its children (other tests') are its own.
        assert_eq!(sweep(ROUNDS_AFTER_CHECK), 0);
    }
}
