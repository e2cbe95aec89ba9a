//! New QUIC clients on a shared UDP address waiting for their route: their Initial datagrams are
//! held, and read ([`super::quic::InitialReader`]), until the ClientHello is whole and names the
//! server; then they all go, in order, to the backend the route picks. Most hellos fit in the first
//! datagram and wait for nothing; one with post-quantum key shares spans two or three. Pure: the
//! listen loop gives it the clock.
//!
//! Bounds: at most [`MAX_WAITING`] clients wait at once (a new one past that ends the wait of the
//! one waiting longest, whose datagrams are dropped), each holding at most [`MAX_HELD`] bytes (one
//! more ends its wait), for at most [`WAIT_MS`] (its datagrams are dropped when a later arrival
//! finds it expired). Whatever is dropped is counted by the loop as `quic_unread`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use super::quic::{InitialReader, Progress, QuicError, Version};
use crate::tls::ClientHello;

/// The most clients waiting for their hello at once.
pub(crate) const MAX_WAITING: usize = 1024;
/// The most bytes of datagrams held for one client: a 16 KiB hello in 1,200-byte Initials, with
/// room for 0-RTT packets sent meanwhile.
pub(crate) const MAX_HELD: usize = 32 * 1024;
/// How long a client's hello may take to be whole, in milliseconds: a lost Initial is sent again
/// within about a second.
pub(crate) const WAIT_MS: u64 = 5_000;
/// The smallest datagram a client's Initial may come in (RFC 9000 14.1): smaller ones are refused
/// before any key is derived, so forging Initials costs the sender as much as it costs us.
pub(crate) const MIN_INITIAL_DATAGRAM: usize = 1200;

/// A client, by its address and the address it sent to.
pub(crate) type Key = (SocketAddr, SocketAddr);

struct Waiting {
    reader: InitialReader,
    held: Vec<Box<[u8]>>,
    bytes: usize,
    since: u64,
}

/// What a client datagram came to.
#[derive(Debug)]
pub(crate) enum Read {
    /// The hello is whole: route by it, and send `held` (this datagram last) in order.
    Hello {
        hello: ClientHello,
        version: Version,
        held: Vec<Box<[u8]>>,
    },
    /// Held until more Initials come.
    Held,
    /// Not a QUIC Initial starting a connection, and nobody waits at this address: the caller
    /// routes it as it would any datagram.
    NotInitial,
    /// This datagram is dropped (malformed, another connection's, undecryptable), and so are the
    /// `dropped` held before it if the client's wait ended with it.
    Unread { error: Unread, dropped: usize },
}

/// Why a datagram could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unread {
    Quic(QuicError),
    /// The client's datagrams passed [`MAX_HELD`] before its hello was whole.
    TooMuch,
    /// An Initial in a datagram under [`MIN_INITIAL_DATAGRAM`] bytes.
    TooSmall,
}

/// The clients waiting.
#[derive(Default)]
pub(crate) struct Pending {
    waiting: HashMap<Key, Waiting>,
    /// Keys in the order they began waiting, with when: the front expires first. An entry whose
    /// key waits no more (or began again) is passed over.
    order: VecDeque<(Key, u64)>,
}

impl Pending {
    /// Datagrams dropped by waits that ended (expired, or the longest evicted for room) before
    /// this call's datagram was read, with this call's outcome.
    pub(crate) fn push(&mut self, key: Key, datagram: &[u8], now: u64) -> (usize, Read) {
        let expired = self.expire(now);
        let read = match self.waiting.get_mut(&key) {
            Some(w) => Self::more(w, datagram),
            None => return self.first(key, datagram, now, expired),
        };
        match read {
            Step::Wait => (expired, Read::Held),
            Step::Done(hello) => {
                let (version, held) = match self.waiting.remove(&key) {
                    Some(w) => (w.reader.version(), w.held),
                    None => return (expired, Read::Held),
                };
                (
                    expired,
                    Read::Hello {
                        hello,
                        version,
                        held,
                    },
                )
            }
            Step::Drop(error) => (expired, Read::Unread { error, dropped: 0 }),
            Step::End(error) => {
                let dropped = self.waiting.remove(&key).map_or(0, |w| w.held.len());
                (expired, Read::Unread { error, dropped })
            }
        }
    }

    /// How many wait now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    fn first(&mut self, key: Key, datagram: &[u8], now: u64, expired: usize) -> (usize, Read) {
        let unread = |error| (expired, Read::Unread { error, dropped: 0 });
        let mut reader = match InitialReader::new(datagram) {
            Ok(r) => r,
            Err(_) => return (expired, Read::NotInitial),
        };
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            return unread(Unread::TooSmall);
        }
        if datagram.len() > MAX_HELD {
            return unread(Unread::TooMuch);
        }
        let held = vec![Box::from(datagram)];
        match reader.push(datagram) {
            Ok(Progress::Hello(hello)) => {
                let version = reader.version();
                (
                    expired,
                    Read::Hello {
                        hello,
                        version,
                        held,
                    },
                )
            }
            Ok(Progress::NeedMore) => {
                let mut evicted = 0;
                if self.waiting.len() >= MAX_WAITING {
                    evicted = self.evict_oldest();
                }
                self.waiting.insert(
                    key,
                    Waiting {
                        reader,
                        held,
                        bytes: datagram.len(),
                        since: now,
                    },
                );
                self.order.push_back((key, now));
                // Waits that ended early leave their place in the order behind: kept within
                // twice the bound.
                if self.order.len() > 2 * MAX_WAITING {
                    let waiting = &self.waiting;
                    self.order
                        .retain(|(k, since)| waiting.get(k).is_some_and(|w| w.since == *since));
                }
                (expired + evicted, Read::Held)
            }
            Err(e) => (
                expired,
                Read::Unread {
                    error: Unread::Quic(e),
                    dropped: 0,
                },
            ),
        }
    }

    fn more(w: &mut Waiting, datagram: &[u8]) -> Step {
        if w.bytes + datagram.len() > MAX_HELD {
            return Step::End(Unread::TooMuch);
        }
        match w.reader.push(datagram) {
            Ok(progress) => {
                w.held.push(Box::from(datagram));
                w.bytes += datagram.len();
                match progress {
                    Progress::Hello(hello) => Step::Done(hello),
                    Progress::NeedMore => Step::Wait,
                }
            }
            Err(e) if w.reader.failed() => Step::End(Unread::Quic(e)),
            // Anyone can send from the client's address: a datagram that is not the
            // connection's changes nothing.
            Err(e) => Step::Drop(Unread::Quic(e)),
        }
    }

    /// Ends every wait (the address no longer routes by name): how many datagrams they held.
    pub(crate) fn clear(&mut self) -> usize {
        self.order.clear();
        self.waiting.drain().map(|(_, w)| w.held.len()).sum()
    }

    /// Ends the waits older than [`WAIT_MS`]: how many datagrams they held.
    fn expire(&mut self, now: u64) -> usize {
        let mut dropped = 0;
        while let Some(&(key, since)) = self.order.front() {
            if now.saturating_sub(since) < WAIT_MS {
                break;
            }
            self.order.pop_front();
            if self.waiting.get(&key).is_some_and(|w| w.since == since) {
                dropped += self.waiting.remove(&key).map_or(0, |w| w.held.len());
            }
        }
        dropped
    }

    fn evict_oldest(&mut self) -> usize {
        while let Some((key, since)) = self.order.pop_front() {
            if self.waiting.get(&key).is_some_and(|w| w.since == since) {
                return self.waiting.remove(&key).map_or(0, |w| w.held.len());
            }
        }
        0
    }
}

enum Step {
    Wait,
    Done(ClientHello),
    /// This datagram only.
    Drop(Unread),
    /// The client's wait.
    End(Unread),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::quic::tests::{big_alpn, crypto_frame, hello, hello_message, initial};

    fn key(port: u16) -> Key {
        (
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], 443)),
        )
    }

    /// Frames padded (PADDING frames) to fill a 1,200-byte datagram, as clients must.
    fn padded(frames: &[u8]) -> Vec<u8> {
        let mut f = frames.to_vec();
        f.resize(f.len().max(MIN_INITIAL_DATAGRAM), 0);
        f
    }

    /// A hello too big for one datagram, in two Initials of connection `dcid`.
    fn two_halves(dcid: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let message = hello_message("big.example", &big_alpn());
        let half = message.len() / 2;
        (
            initial(Version::V1, dcid, 0, 1, &crypto_frame(0, &message[..half])),
            initial(
                Version::V1,
                dcid,
                1,
                1,
                &crypto_frame(half, &message[half..]),
            ),
        )
    }

    #[test]
    fn a_hello_in_one_datagram_waits_for_nothing() {
        let mut p = Pending::default();
        let message = hello_message("a.example", &["h3".to_string()]);
        let one = initial(
            Version::V2,
            &[3; 8],
            0,
            1,
            &padded(&crypto_frame(0, &message)),
        );
        match p.push(key(1), &one, 0) {
            (
                0,
                Read::Hello {
                    hello: h,
                    version,
                    held,
                },
            ) => {
                assert_eq!(h, hello("a.example", &["h3"]));
                assert_eq!(version, Version::V2);
                assert_eq!(held, vec![Box::from(&one[..])]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn a_hello_over_two_datagrams_is_held_then_sent_whole_in_order() {
        let mut p = Pending::default();
        let (one, two) = two_halves(&[5; 8]);
        assert!(matches!(p.push(key(1), &one, 0), (0, Read::Held)));
        // Another client's datagram and a stranger's from the same address change nothing.
        assert!(matches!(
            p.push(key(2), b"not quic", 1),
            (0, Read::NotInitial)
        ));
        let (other, _) = two_halves(&[6; 8]);
        assert!(matches!(
            p.push(key(1), &other, 2),
            (0, Read::Unread { dropped: 0, .. })
        ));
        match p.push(key(1), &two, 3) {
            (0, Read::Hello { hello: h, held, .. }) => {
                assert_eq!(h.sni.as_deref(), Some("big.example"));
                assert_eq!(held, vec![Box::from(&one[..]), Box::from(&two[..])]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn clearing_ends_every_wait_and_the_order_stays_bounded() {
        let mut p = Pending::default();
        let (one, two) = two_halves(&[5; 8]);
        for round in 0..3 * MAX_WAITING as u64 {
            assert!(matches!(p.push(key(1), &one, round), (0, Read::Held)));
            assert!(matches!(
                p.push(key(1), &two, round),
                (0, Read::Hello { .. })
            ));
        }
        assert!(p.order.len() <= 2 * MAX_WAITING + 1, "{}", p.order.len());
        assert!(matches!(p.push(key(2), &one, 0), (_, Read::Held)));
        assert_eq!(p.clear(), 1);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn waits_end_when_they_expire_or_make_room() {
        let mut p = Pending::default();
        let (one, _) = two_halves(&[5; 8]);
        assert!(matches!(p.push(key(1), &one, 0), (0, Read::Held)));
        assert!(matches!(p.push(key(2), &one, WAIT_MS / 2), (0, Read::Held)));
        let (n, _) = p.push(key(3), b"x", WAIT_MS);
        assert_eq!(n, 1, "the first wait expired with its datagram");
        assert_eq!(p.len(), 1);
        let mut p = Pending::default();
        for port in 0..MAX_WAITING as u16 {
            assert!(matches!(p.push(key(port), &one, 0), (0, Read::Held)));
        }
        assert!(
            matches!(p.push(key(60000), &one, 1), (1, Read::Held)),
            "the longest waiting made room"
        );
        assert_eq!(p.len(), MAX_WAITING);
    }

    #[test]
    fn a_client_holding_too_much_or_sending_a_bad_hello_ends_its_wait() {
        let mut p = Pending::default();
        let (one, _) = two_halves(&[5; 8]);
        assert!(matches!(p.push(key(1), &one, 0), (0, Read::Held)));
        // 0-RTT-sized repeats of the first half: held until the bound.
        let mut ended = None;
        for i in 0..64 {
            match p.push(key(1), &one, i) {
                (_, Read::Held) => {}
                (_, Read::Unread { error, dropped }) => {
                    ended = Some((error, dropped));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let (error, dropped) = ended.expect("the bound ends the wait");
        assert_eq!(error, Unread::TooMuch);
        assert!(dropped * one.len() <= MAX_HELD && dropped > 1, "{dropped}");
        assert_eq!(p.len(), 0);
        // CRYPTO data that is not a hello: the reader fails, and so does the wait.
        let junk = initial(
            Version::V1,
            &[8; 8],
            0,
            1,
            &padded(&crypto_frame(0, &[0xff; 64])),
        );
        assert!(matches!(p.push(key(2), &junk, 0), (0, Read::Unread { .. })));
        assert_eq!(p.len(), 0);
        // Under 1,200 bytes: refused before any key is derived.
        let message = hello_message("a.example", &["h3".to_string()]);
        let small = initial(Version::V1, &[3; 8], 0, 1, &crypto_frame(0, &message));
        assert!(small.len() < MIN_INITIAL_DATAGRAM);
        match p.push(key(3), &small, 0) {
            (0, Read::Unread { error, dropped: 0 }) => assert_eq!(error, Unread::TooSmall),
            other => panic!("{other:?}"),
        }
    }
}
