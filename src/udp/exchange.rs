//! What a session has carried against what its service expects of it (`udp.responses`,
//! `udp.requests`, as nginx's `proxy_responses` and `proxy_requests` mean them): pure counting, the
//! session acts on the verdicts.

/// A session's datagrams so far, and the limits it ends by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exchange {
    /// Datagrams the backend sends per client datagram; `None`: no limit.
    responses: Option<u32>,
    /// Client datagrams the session takes; `None`: no limit.
    requests: Option<u32>,
    pub(crate) up: u64,
    pub(crate) down: u64,
}

/// What a client datagram does to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Up {
    /// Send it; the session may take more.
    Open,
    /// Send it; it was the last the session takes (`requests`): the client's next datagram starts
    /// a new session, and this one lives until its answers are in.
    Last,
    /// Send it; with `responses: 0` nothing comes back, so the session has ended.
    Done,
}

/// Why a session ended on its own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    /// Every client datagram has had its answers.
    Responses,
    /// It took its `requests` and they have had their answers.
    Requests,
}

impl Exchange {
    pub(crate) fn new(responses: Option<u32>, requests: Option<u32>) -> Exchange {
        Exchange {
            responses,
            requests,
            up: 0,
            down: 0,
        }
    }

    /// Whether the session takes another client datagram (not past `requests`).
    pub(crate) fn takes_more(&self) -> bool {
        self.requests.is_none_or(|r| self.up < u64::from(r))
    }

    /// A client datagram was sent on.
    pub(crate) fn up(&mut self) -> Up {
        self.up += 1;
        if self.answered().is_some() {
            return Up::Done;
        }
        if self.takes_more() {
            Up::Open
        } else {
            Up::Last
        }
    }

    /// A backend datagram was sent back: `Some` when that was the last one expected.
    pub(crate) fn down(&mut self) -> Option<Counted> {
        self.down += 1;
        self.answered()
    }

    /// Whether every client datagram leaves the session open ([`Up::Open`]) whatever was carried
    /// before: no `requests`, and `responses` not 0 (a live session has had fewer answers than
    /// it waits for, so one more datagram cannot complete it). The loop may then send a batch's
    /// datagrams later in one go and count them then: no datagram's verdict changes where the
    /// next one goes.
    pub(crate) fn always_open(&self) -> bool {
        self.requests.is_none() && self.responses != Some(0)
    }

    /// Backend datagrams the session sends back before its count ends it: the one that ends it is
    /// the first sent with every client datagram answered, so at least one more goes (an answer
    /// before any request ends it too); unlimited without `responses`.
    pub(crate) fn downs_left(&self) -> usize {
        self.responses.map_or(usize::MAX, |per| {
            let expected = self.up.saturating_mul(u64::from(per));
            let left = expected.saturating_sub(self.down).max(1);
            usize::try_from(left).unwrap_or(usize::MAX)
        })
    }

    /// Answers still expected (0 with no `responses` set: none is known to be).
    pub(crate) fn unanswered(&self) -> u64 {
        self.responses.map_or(0, |per| {
            self.up
                .saturating_mul(u64::from(per))
                .saturating_sub(self.down)
        })
    }

    /// Whether every client datagram has had its answers, and why that ends the session.
    fn answered(&self) -> Option<Counted> {
        let per = u64::from(self.responses?);
        if self.down < self.up.saturating_mul(per) {
            return None;
        }
        Some(if self.takes_more() {
            Counted::Responses
        } else {
            Counted::Requests
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_no_limits_a_session_never_ends_on_its_count() {
        let mut e = Exchange::new(None, None);
        for _ in 0..100 {
            assert_eq!(e.up(), Up::Open);
            assert_eq!(e.down(), None);
            assert_eq!(e.down(), None);
        }
        assert!(e.takes_more());
    }

    #[test]
    fn one_response_per_request_ends_when_each_is_answered() {
        // DNS: two queries in flight, two answers end it.
        let mut e = Exchange::new(Some(1), None);
        assert_eq!(e.up(), Up::Open);
        assert_eq!(e.up(), Up::Open);
        assert_eq!(e.down(), None);
        assert_eq!(e.down(), Some(Counted::Responses));
    }

    #[test]
    fn zero_responses_ends_with_the_datagram() {
        let mut e = Exchange::new(Some(0), None);
        assert_eq!(e.up(), Up::Done);
    }

    #[test]
    fn requests_close_the_session_to_more_then_it_waits_for_answers() {
        let mut e = Exchange::new(Some(2), Some(2));
        assert_eq!(e.up(), Up::Open);
        assert_eq!(e.up(), Up::Last);
        assert!(!e.takes_more());
        for _ in 0..3 {
            assert_eq!(e.down(), None);
        }
        assert_eq!(e.down(), Some(Counted::Requests));
    }

    #[test]
    fn requests_without_responses_end_only_by_the_idle_timer() {
        let mut e = Exchange::new(None, Some(1));
        assert_eq!(e.up(), Up::Last);
        assert_eq!(e.down(), None);
        assert!(!e.takes_more());
    }

    #[test]
    fn only_sessions_without_requests_or_zero_responses_are_always_open() {
        assert!(Exchange::new(None, None).always_open());
        assert!(Exchange::new(Some(1), None).always_open());
        assert!(!Exchange::new(Some(0), None).always_open());
        assert!(!Exchange::new(Some(1), Some(4)).always_open());
        // What it promises: for a session not yet ended, every datagram up is Open.
        let mut e = Exchange::new(Some(2), None);
        for _ in 0..10 {
            assert_eq!(e.up(), Up::Open);
            assert_eq!(e.down(), None);
        }
    }

    #[test]
    fn the_answers_left_are_those_that_end_the_session() {
        let mut e = Exchange::new(Some(2), None);
        assert_eq!(e.downs_left(), 1, "an answer before any request ends it");
        e.up();
        e.up();
        assert_eq!(e.downs_left(), 4);
        for left in (1..=4).rev() {
            assert_eq!(e.downs_left(), left);
            let ended = e.down().is_some();
            assert_eq!(ended, left == 1);
        }
        assert_eq!(Exchange::new(None, Some(1)).downs_left(), usize::MAX);
    }

    #[test]
    fn answers_beyond_the_expected_are_not_counted_twice() {
        let mut e = Exchange::new(Some(1), None);
        assert_eq!(e.up(), Up::Open);
        assert_eq!(e.down(), Some(Counted::Responses));
        // A late extra answer: still answered (the session has already ended on the first).
        assert_eq!(e.down(), Some(Counted::Responses));
    }
}
