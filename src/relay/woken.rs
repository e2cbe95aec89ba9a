//! Which of a connection's futures woke its task. A relay's task waits on several futures at once
//! (each direction, the inactivity timer, the drain's cut, an upgrade's carry), and `tokio::select!`
//! or a `poll_fn` over them polls every one whenever the task wakes: once per message, although
//! almost always only one direction has anything to do (the timer, the cut and `carry` fire at most a
//! few times in a connection's life, and polling a cancellation token takes a lock). Here each
//! future, or group of futures, is polled through a [`Woken`] with a waker of its own, which marks
//! it and wakes the task; an unmarked one costs an atomic swap instead of a poll.
//! (`FuturesUnordered` does the same for a set of like futures; these are all different.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A mark set by the waker of the futures polled through it, and the task to wake then.
struct Mark {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls its futures only when their waker fired since the last poll (and on the first poll).
pub(super) struct Woken {
    mark: Arc<Mark>,
    /// The waker handed to the futures: built once, so they see the same waker on every poll and
    /// never clone a new one.
    waker: Waker,
}

impl Woken {
    pub(super) fn new() -> Woken {
        let mark = Arc::new(Mark {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(mark.clone());
        Woken { mark, waker }
    }

    /// Runs `poll` (which polls the futures, with the context it is given) if they were woken since
    /// the last time, else returns `Pending` at once. The task's waker is registered either way, so
    /// a later wake-up of the futures reaches the task. A `Ready` leaves the mark set: what `poll`
    /// did not get to (a later future of a group) is polled next time.
    pub(super) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before the mark is read: a wake-up between the two still finds the task.
        self.mark.task.register(cx.waker());
        if !self.mark.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let r = poll(&mut Context::from_waker(&self.waker));
        if r.is_ready() {
            self.set();
        }
        r
    }

    /// Makes the next `poll` run: for a change made outside a poll (a timer reset), after which the
    /// future must be polled to wait on its new state.
    pub(super) fn set(&self) {
        self.mark.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::future::{poll_fn, Future};
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and is ready once `open` is set (by whoever holds its waker).
    struct Gate<'a> {
        polls: &'a AtomicUsize,
        open: &'a AtomicBool,
        waker: &'a std::sync::Mutex<Option<Waker>>,
    }

    impl Future for Gate<'_> {
        type Output = ();
        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_future_is_polled_only_after_its_own_wake_up() {
        let (polls_a, open_a, waker_a) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None),
        );
        let (polls_b, open_b, waker_b) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None::<Waker>),
        );
        let mut a = pin!(Gate {
            polls: &polls_a,
            open: &open_a,
            waker: &waker_a
        });
        let mut b = pin!(Gate {
            polls: &polls_b,
            open: &open_b,
            waker: &waker_b
        });
        let (wa, wb) = (Woken::new(), Woken::new());
        let mut both = pin!(poll_fn(|cx| {
            if wa.poll(cx, |cx| a.as_mut().poll(cx)).is_ready() {
                return Poll::Ready('a');
            }
            wb.poll(cx, |cx| b.as_mut().poll(cx)).map(|()| 'b')
        }));
        // First poll: both polled once, both pending.
        assert!(poll_fn(|cx| Poll::Ready(both.as_mut().poll(cx).is_pending())).await);
        assert_eq!(
            (
                polls_a.load(Ordering::SeqCst),
                polls_b.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        // A spurious poll of the task (nothing woke either): neither is polled again.
        assert!(poll_fn(|cx| Poll::Ready(both.as_mut().poll(cx).is_pending())).await);
        assert_eq!(
            (
                polls_a.load(Ordering::SeqCst),
                polls_b.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        // b's waker fires: only b is polled, and it is the one that completes.
        open_b.store(true, Ordering::SeqCst);
        waker_b.lock().unwrap().take().unwrap().wake();
        assert_eq!(both.as_mut().await, 'b');
        assert_eq!(
            (
                polls_a.load(Ordering::SeqCst),
                polls_b.load(Ordering::SeqCst)
            ),
            (1, 2)
        );
    }

    #[tokio::test]
    async fn a_wake_up_reaches_the_task_that_polled_last() {
        let (polls, open, waker) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None),
        );
        let w = Woken::new();
        let waker = &waker;
        let opened = async {
            let mut g = pin!(Gate {
                polls: &polls,
                open: &open,
                waker
            });
            poll_fn(|cx| w.poll(cx, |cx| g.as_mut().poll(cx))).await
        };
        let opener = async {
            tokio::task::yield_now().await;
            open.store(true, Ordering::SeqCst);
            waker.lock().unwrap().take().unwrap().wake();
        };
        // Completes only if the gate's wake-up, through the mark, woke the task awaiting it.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(opened, opener)
        })
        .await
        .expect("the wake-up reached the task");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn set_makes_the_next_poll_run() {
        let w = Woken::new();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut runs = 0;
        let _ = w.poll(&mut cx, |_| {
            runs += 1;
            Poll::<()>::Pending
        });
        let _ = w.poll(&mut cx, |_| {
            runs += 1;
            Poll::<()>::Pending
        });
        assert_eq!(runs, 1);
        w.set();
        let _ = w.poll(&mut cx, |_| {
            runs += 1;
            Poll::<()>::Pending
        });
        assert_eq!(runs, 2);
    }
}
