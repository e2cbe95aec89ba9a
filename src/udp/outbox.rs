//! Client datagrams of one receive batch on their way up, gathered per session: a session's
//! datagrams go to its backend together when the batch has been read ([`super::gso`] decides how
//! many to a send). No queue outlives its batch, so what waits here is bounded by one receive
//! batch (`socket::BATCH` buffers); the buffers are kept for the next batch.

/// One session's datagrams of this batch.
#[derive(Debug)]
pub(crate) struct Run<S> {
    pub(crate) id: u64,
    /// The session (`None` once the batch is done: its buffers wait for the next).
    pub(crate) session: Option<S>,
    /// What goes to the backend, laid end to end: each datagram, behind its PROXY header if any.
    pub(crate) bytes: Vec<u8>,
    /// The size of each as sent (header and payload).
    pub(crate) sizes: Vec<usize>,
    /// The size of each one's payload: what the client sent, and what is counted.
    pub(crate) payloads: Vec<usize>,
}

impl<S> Run<S> {
    /// Adds a datagram: `header` (empty without `proxy_protocol`) then `payload`.
    pub(crate) fn push(&mut self, header: &[u8], payload: &[u8]) {
        self.bytes.extend_from_slice(header);
        self.bytes.extend_from_slice(payload);
        self.sizes.push(header.len() + payload.len());
        self.payloads.push(payload.len());
    }

    /// Datagram `k`'s payload (as the client sent it).
    pub(crate) fn payload(&self, k: usize) -> &[u8] {
        let end: usize = self.sizes[..=k].iter().sum();
        &self.bytes[end - self.payloads[k]..end]
    }
}

/// This batch's runs, one per session, in the order their first datagram came.
#[derive(Debug)]
pub(crate) struct Outbox<S> {
    runs: Vec<Run<S>>,
    used: usize,
}

impl<S> Default for Outbox<S> {
    fn default() -> Self {
        Outbox {
            runs: Vec::new(),
            used: 0,
        }
    }
}

impl<S: Clone> Outbox<S> {
    /// Session `id`'s run, started if this batch has none yet.
    pub(crate) fn run(&mut self, id: u64, session: &S) -> &mut Run<S> {
        // The last one first: a client's datagrams tend to come together.
        let found = self.runs[..self.used].iter().rposition(|r| r.id == id);
        let i = match found {
            Some(i) => i,
            None => {
                if self.used == self.runs.len() {
                    self.runs.push(Run {
                        id,
                        session: None,
                        bytes: Vec::new(),
                        sizes: Vec::new(),
                        payloads: Vec::new(),
                    });
                }
                let run = &mut self.runs[self.used];
                run.id = id;
                run.session = Some(session.clone());
                self.used += 1;
                self.used - 1
            }
        };
        &mut self.runs[i]
    }
}

impl<S> Outbox<S> {
    pub(crate) fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// This batch's runs.
    pub(crate) fn runs(&self) -> &[Run<S>] {
        &self.runs[..self.used]
    }

    /// Empties it for the next batch, keeping the buffers.
    pub(crate) fn clear(&mut self) {
        for run in &mut self.runs[..self.used] {
            run.session = None;
            run.bytes.clear();
            run.sizes.clear();
            run.payloads.clear();
        }
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_session_gets_one_run_in_the_order_it_came() {
        let mut o: Outbox<&str> = Outbox::default();
        o.run(7, &"a").push(b"", b"one");
        o.run(9, &"b").push(b"", b"two");
        o.run(7, &"a").push(b"", b"three");
        let runs = o.runs();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].id, runs[0].session), (7, Some("a")));
        assert_eq!(runs[0].bytes, b"onethree");
        assert_eq!(runs[0].sizes, [3, 5]);
        assert_eq!(runs[1].bytes, b"two");
    }

    #[test]
    fn a_header_is_sent_but_the_payload_is_what_counts() {
        let mut o: Outbox<()> = Outbox::default();
        let run = o.run(1, &());
        run.push(b"HDR", b"abc");
        run.push(b"HDR", b"");
        run.push(b"HDR", b"de");
        assert_eq!(run.bytes, b"HDRabcHDRHDRde");
        assert_eq!(run.sizes, [6, 3, 5]);
        assert_eq!(run.payloads, [3, 0, 2]);
        assert_eq!(run.payload(0), b"abc");
        assert_eq!(run.payload(1), b"");
        assert_eq!(run.payload(2), b"de");
    }

    #[test]
    fn cleared_it_keeps_its_buffers_and_forgets_its_sessions() {
        let mut o: Outbox<u8> = Outbox::default();
        o.run(1, &1).push(b"", &[0; 1_200]);
        o.run(2, &2).push(b"", &[0; 1_200]);
        o.clear();
        assert!(o.is_empty());
        assert!(o
            .runs
            .iter()
            .all(|r| r.session.is_none() && r.bytes.is_empty()));
        assert!(
            o.runs[0].bytes.capacity() >= 1_200,
            "kept for the next batch"
        );
        o.run(3, &3).push(b"", b"x");
        assert_eq!(o.runs().len(), 1);
        assert_eq!(o.runs()[0].id, 3);
        assert_eq!(o.runs.len(), 2, "no run made while one was free");
    }
}
