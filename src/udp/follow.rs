//! QUIC connection IDs and the sessions they belong to, so that a connection whose client address
//! changes (NAT rebinding) stays on its backend: a datagram from an address with no session whose
//! Destination Connection ID is known goes to that ID's backend, as a new session there. Pure: the
//! listen loop and its sessions' tasks feed it and act on what it finds.
//!
//! Which IDs are known: the DCID of the client's first Initial (chosen by the client) and the
//! Source Connection IDs of the backend's long-header packets (chosen by the server; the client's
//! short-header packets carry one of them). IDs the server hands out later in encrypted
//! NEW_CONNECTION_ID frames cannot be seen by a passthrough balancer: a client that switches to one
//! on purpose (active migration) is not followed.
//!
//! Bounds: at most [`PER_SESSION`] IDs per session, and at most `max` IDs in all (the loop gives
//! a few per session of its table); past either, a new ID is not recorded, so that connection
//! cannot be followed if it moves (counted by the caller). A short header does not say how long
//! its DCID is: the lengths of the IDs recorded are tried, shortest first, at most [`MAX_LENGTHS`]
//! of them.

use std::collections::HashMap;

use super::quic::{self, MAX_CID_LEN};

/// The most connection IDs recorded for one session.
pub(crate) const PER_SESSION: usize = 4;
/// The most distinct ID lengths tried on a short header.
const MAX_LENGTHS: usize = 4;

/// A session's place in the loop's table.
pub(crate) type SessionId = u64;

/// Connection IDs to the session that carries them.
#[derive(Debug)]
pub(crate) struct Cids {
    ids: HashMap<Box<[u8]>, SessionId>,
    /// How many IDs of each length are recorded (index: the length).
    lengths: [u32; MAX_CID_LEN + 1],
    max: usize,
}

/// What became of an ID offered to [`Cids::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// New, or moved to this session.
    Yes,
    /// Already this session's.
    Known,
    /// Empty, or past the bounds: not recorded.
    No,
}

impl Cids {
    pub(crate) fn new(max: usize) -> Cids {
        Cids {
            ids: HashMap::new(),
            lengths: [0; MAX_CID_LEN + 1],
            max,
        }
    }

    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Records `cid` as `session`'s, which holds `held` IDs already (the caller keeps that list).
    pub(crate) fn record(&mut self, cid: &[u8], session: SessionId, held: usize) -> Recorded {
        if cid.is_empty() || cid.len() > MAX_CID_LEN {
            return Recorded::No;
        }
        if let Some(owner) = self.ids.get_mut(cid) {
            if *owner == session {
                return Recorded::Known;
            }
            *owner = session;
            return Recorded::Yes;
        }
        let lengths_known = self.lengths.iter().filter(|n| **n > 0).count();
        let new_length = self.lengths[cid.len()] == 0;
        if held >= PER_SESSION
            || self.ids.len() >= self.max
            || (new_length && lengths_known >= MAX_LENGTHS)
        {
            return Recorded::No;
        }
        self.ids.insert(cid.into(), session);
        self.lengths[cid.len()] += 1;
        Recorded::Yes
    }

    /// Forgets the IDs of `cids` that are still `session`'s (a later session may have taken one).
    pub(crate) fn forget<'a>(&mut self, session: SessionId, cids: impl Iterator<Item = &'a [u8]>) {
        for cid in cids {
            if self.ids.get(cid) == Some(&session) {
                self.ids.remove(cid);
                self.lengths[cid.len()] -= 1;
            }
        }
    }

    /// The session whose connection a client datagram belongs to, by its Destination Connection ID
    /// (its first packet's, for a long header), with that ID.
    pub(crate) fn find<'d>(&self, datagram: &'d [u8]) -> Option<(SessionId, &'d [u8])> {
        if quic::is_long_header(datagram) {
            let header = quic::parse_long_header(datagram).ok()?;
            return self.ids.get(header.dcid).map(|s| (*s, header.dcid));
        }
        (1..=MAX_CID_LEN)
            .filter(|&n| self.lengths[n] > 0)
            .filter_map(|n| quic::short_header_dcid(datagram, n))
            .find_map(|cid| self.ids.get(cid).map(|s| (*s, cid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short-header packet carrying `dcid`.
    fn short(dcid: &[u8]) -> Vec<u8> {
        let mut d = vec![0x40];
        d.extend_from_slice(dcid);
        d.extend_from_slice(&[0u8; 24]);
        d
    }

    #[test]
    fn a_known_id_finds_its_session_whatever_its_length() {
        let mut c = Cids::new(100);
        assert_eq!(c.record(&[1; 8], 7, 0), Recorded::Yes);
        assert_eq!(c.record(&[2; 16], 9, 0), Recorded::Yes);
        assert_eq!(c.record(&[1; 8], 7, 1), Recorded::Known);
        assert_eq!(c.find(&short(&[1; 8])).map(|f| f.0), Some(7));
        assert_eq!(c.find(&short(&[2; 16])).map(|f| f.0), Some(9));
        assert_eq!(c.find(&short(&[3; 16])), None);
        assert_eq!(c.find(&[]), None, "nothing to read");
        assert_eq!(c.find(&[0x40, 1, 1]), None, "shorter than any ID");
    }

    #[test]
    fn a_later_session_takes_an_id_and_the_earlier_one_forgets_only_its_own() {
        let mut c = Cids::new(100);
        c.record(&[1; 8], 1, 0);
        c.record(&[2; 8], 1, 1);
        assert_eq!(c.record(&[1; 8], 2, 0), Recorded::Yes, "the client moved");
        c.forget(1, [&[1u8; 8][..], &[2u8; 8][..]].into_iter());
        assert_eq!(c.find(&short(&[1; 8])).map(|f| f.0), Some(2));
        assert_eq!(c.find(&short(&[2; 8])), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_bounds_hold() {
        let mut c = Cids::new(3);
        assert_eq!(
            c.record(&[], 1, 0),
            Recorded::No,
            "an empty ID tells nothing apart"
        );
        assert_eq!(
            c.record(&[1; 21], 1, 0),
            Recorded::No,
            "longer than QUIC allows"
        );
        assert_eq!(
            c.record(&[1; 8], 1, PER_SESSION),
            Recorded::No,
            "the session holds enough"
        );
        for i in 0..3u8 {
            assert_eq!(c.record(&[i; 8], u64::from(i), 0), Recorded::Yes);
        }
        assert_eq!(c.record(&[9; 8], 9, 0), Recorded::No, "the map is full");
        let mut c = Cids::new(100);
        for n in 1..=MAX_LENGTHS {
            assert_eq!(c.record(&vec![1; n], 1, 0), Recorded::Yes);
        }
        assert_eq!(
            c.record(&[1; 12], 2, 0),
            Recorded::No,
            "one length too many to try"
        );
    }
}
