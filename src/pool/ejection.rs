//! Passive health: consecutive connect failures eject a backend for a cool-down. The failure is seen
//! on a data-plane worker, which only flips the backend's flag (every policy skips an ejected backend
//! at pick time, `Candidate::available`) and queues it; the control runtime rebuilds the snapshot
//! without it and brings it back after the cool-down, on probation.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, Ejected, Pool, Transition};
use crate::util::lock;

impl Pool {
    /// Records a successful connect.
    pub(crate) fn connect_succeeded(&self, backend: &Backend) {
        backend.connect_succeeded();
    }

    /// A UDP session opened on `backend`: counted in its total, but proof of nothing (a datagram
    /// socket connects to any address), so a failure streak stands until the backend answers.
    pub(crate) fn session_opened(&self, backend: &Backend) {
        backend.session_opened();
    }

    /// The backend answered a UDP session: a failure streak is cleared, as a connect clears it.
    pub(crate) fn answered(&self, backend: &Backend) {
        backend.answered();
    }

    /// Records a failed connect attempt to `backend`; ejects it when the streak reaches `max_fails`.
    /// Returns the streak when this call ejected it.
    ///
    /// Runs on the worker that saw the failure, so it takes no lock, builds nothing and logs
    /// nothing: the flag takes the backend out of every pick at once, and the control runtime
    /// publishes the ejection, asks DNS for an early look, rebuilds the snapshot and schedules the
    /// return after the cool-down ([`Pool::apply_ejections`]).
    pub(crate) fn connect_failed(&self, backend: &Arc<Backend>) -> Option<u32> {
        let fails = backend.connect_failed(self.settings().passive.max_fails)?;
        // Fails only once the pool is gone, when nothing is left to rebuild.
        let _ = self.ejections.send((backend.clone(), fails));
        Some(fails)
    }

    /// The control runtime's half of passive ejection: a snapshot without the backends the workers
    /// ejected (one for every ejection queued meanwhile), and each one's return after the cool-down.
    pub(super) async fn apply_ejections(
        self: Arc<Pool>,
        mut rx: mpsc::UnboundedReceiver<Ejected>,
        stop: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return,
                b = rx.recv() => match b {
                    Some(b) => b,
                    None => return,
                },
            };
            let mut ejected = vec![first];
            while let Ok(b) = rx.try_recv() {
                ejected.push(b);
            }
            let cooldown = self.settings().passive.cooldown;
            {
                let mut inner = lock(&self.inner);
                self.rebuild_locked(&mut inner);
                for (b, _) in &ejected {
                    let b = b.clone();
                    inner.spawn(move |pool, stop| async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = tokio::time::sleep(cooldown) => { pool.reinstate(&b); }
                        }
                    });
                }
            }
            let mut transitions = Vec::with_capacity(ejected.len());
            for (b, consecutive_fails) in ejected {
                // Its name may no longer list it: ask for an early look.
                self.nudge_dns(&b);
                transitions.push(Transition::Ejected {
                    backend: b.addr,
                    consecutive_fails,
                    cooldown,
                });
            }
            self.publish(transitions);
        }
    }

    /// Ends an ejection after its cool-down (the backend decides the probation).
    fn reinstate(&self, backend: &Backend) {
        if backend.reinstate(self.settings().passive.max_fails) {
            self.rebuild_locked(&mut lock(&self.inner));
            self.publish(vec![Transition::Returned {
                backend: backend.addr,
            }]);
        }
    }
}
