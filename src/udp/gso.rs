//! Which datagrams to one destination go out together, and what a failed send means for each
//! (pure: the caller gives the send and hears of every datagram). Consecutive datagrams of one
//! size go as one send with UDP generic segmentation offload (GSO): the kernel cuts the buffer
//! into datagrams of that size, the last one possibly shorter. Others go one by one.

use std::io;

/// The most one GSO send carries: the largest IPv4 UDP payload (the kernel builds one datagram of
/// them all before it cuts it).
const MAX_BYTES: usize = 65_507;

/// The largest segment sent with GSO: one that fits a 1,500-byte Ethernet frame with its IP and
/// UDP headers. The kernel refuses a segment larger than the route's MTU, where a datagram sent
/// alone is fragmented instead.
pub(crate) fn max_segment(ipv6: bool) -> usize {
    if ipv6 {
        1_500 - 40 - 8
    } else {
        1_500 - 20 - 8
    }
}

/// How many of the datagrams sized `sizes`, from the first, go in one send (1: alone; 0: none
/// left): a run of one size, at most `max_segments` of them (what the kernel takes, 1 where it has
/// no GSO) and at most [`MAX_BYTES`] in all, its last one possibly shorter (which ends the run). A
/// zero-length datagram, or one larger than `max_segment`, goes alone.
pub(crate) fn run(
    sizes: impl IntoIterator<Item = usize>,
    max_segments: usize,
    max_segment: usize,
) -> usize {
    let mut sizes = sizes.into_iter();
    let Some(first) = sizes.next() else {
        return 0;
    };
    if first == 0 || first > max_segment {
        return 1;
    }
    let (mut n, mut total) = (1, first);
    for size in sizes {
        if n >= max_segments || size == 0 || size > first || total + size > MAX_BYTES {
            break;
        }
        n += 1;
        total += size;
        if size < first {
            break;
        }
    }
    n
}

/// Whether a GSO send's failure is the segmentation's (no GSO on the device, a segment over the
/// route's MTU, an old kernel): its datagrams go again one by one. Any other error is the
/// datagrams' own (the destination unreachable, a firewall), which a send one by one would
/// meet again, or worse, not see (a pending ICMP error is reported once).
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
    )
}

/// Sends the datagrams laid end to end in `bytes`, sized `sizes`, in as few sends as [`run`]
/// allows: `out` sends a buffer given its segment size (`None`: one datagram), `each` hears of every
/// datagram in order, sent (`Ok`) or not (the error; `WouldBlock` for all the rest once the socket
/// is full: nothing waits for room), and says whether to go on (`false`: stop, the rest unsent and
/// unheard of). A GSO send the kernel refuses goes again one by one.
pub(crate) fn send(
    bytes: &[u8],
    sizes: &[usize],
    (max_segments, max_segment): (usize, usize),
    mut out: impl FnMut(&[u8], Option<usize>) -> io::Result<()>,
    mut each: impl FnMut(usize, Result<(), &io::Error>) -> bool,
) {
    let (mut i, mut at) = (0, 0);
    while i < sizes.len() {
        let n = run(sizes[i..].iter().copied(), max_segments, max_segment);
        let len: usize = sizes[i..i + n].iter().sum();
        let Some(buf) = bytes.get(at..at + len) else {
            return;
        };
        let outcome = match out(buf, (n > 1).then_some(sizes[i])) {
            Err(e) if n > 1 && refused(&e) => singly(buf, i, &sizes[i..i + n], &mut out, &mut each),
            r => report(r, i..i + n, &mut each),
        };
        match outcome {
            Outcome::Next => {}
            Outcome::Stop => return,
            Outcome::Full(e, next) => {
                for k in next..sizes.len() {
                    if !each(k, Err(&e)) {
                        return;
                    }
                }
                return;
            }
        }
        i += n;
        at += len;
    }
}

/// What a send came to for the datagrams it carried.
enum Outcome {
    Next,
    /// The caller said stop.
    Stop,
    /// The socket is full: the datagrams from this index on are not tried.
    Full(io::Error, usize),
}

/// Tells `each` of a send's datagrams (indices `range`).
fn report(
    r: io::Result<()>,
    range: std::ops::Range<usize>,
    each: &mut impl FnMut(usize, Result<(), &io::Error>) -> bool,
) -> Outcome {
    let end = range.end;
    for k in range {
        if !each(k, r.as_ref().map(|_| ())) {
            return Outcome::Stop;
        }
    }
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Outcome::Full(e, end),
        _ => Outcome::Next,
    }
}

/// The datagrams of a refused GSO send again, one send each: `buf`, sized `sizes`, the first one
/// at index `first`.
fn singly(
    buf: &[u8],
    first: usize,
    sizes: &[usize],
    out: &mut impl FnMut(&[u8], Option<usize>) -> io::Result<()>,
    each: &mut impl FnMut(usize, Result<(), &io::Error>) -> bool,
) -> Outcome {
    let mut at = 0;
    for (k, &size) in sizes.iter().enumerate() {
        let one = &buf[at..at + size];
        at += size;
        match report(out(one, None), first + k..first + k + 1, each) {
            Outcome::Next => {}
            other => return other,
        }
    }
    Outcome::Next
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: usize = 1_472;

    #[test]
    fn a_run_of_one_size_goes_as_one_send() {
        assert_eq!(run([1_200; 10], 64, V4), 10);
        assert_eq!(
            run([1_200, 1_200, 1_200, 700], 64, V4),
            4,
            "the last may be shorter"
        );
    }

    #[test]
    fn a_shorter_datagram_ends_the_run_and_a_longer_one_is_not_in_it() {
        assert_eq!(run([1_200, 1_200, 700, 1_200], 64, V4), 3);
        assert_eq!(run([700, 1_200, 1_200], 64, V4), 1);
        assert_eq!(run([1_200, 1_201], 64, V4), 1);
    }

    #[test]
    fn a_run_stops_at_the_kernels_segment_count_and_at_the_largest_datagram() {
        assert_eq!(run([100; 100], 64, V4), 64);
        assert_eq!(
            run([1_200; 100], 64, V4),
            54,
            "54 x 1,200 fits 65,507 bytes, 55 do not"
        );
        assert_eq!(run([1_200; 10], 1, V4), 1, "no GSO: one by one");
    }

    #[test]
    fn empty_and_large_datagrams_go_alone() {
        assert_eq!(run([0, 0, 0], 64, V4), 1);
        assert_eq!(
            run([1_200, 0], 64, V4),
            1,
            "a zero-length datagram is no segment"
        );
        assert_eq!(run([1_473, 1_473], 64, V4), 1, "past one Ethernet frame");
        assert_eq!(run([1_452, 1_452], 64, max_segment(true)), 2);
        assert_eq!(run([1_453, 1_453], 64, max_segment(true)), 1);
        assert_eq!(run(std::iter::empty(), 64, V4), 0);
    }

    /// The sends [`send`] made (length, segment) and each datagram's outcome.
    type Driven = (Vec<(usize, Option<usize>)>, Vec<Result<(), io::ErrorKind>>);

    /// What [`send`] did.
    fn drive(
        sizes: &[usize],
        max_segments: usize,
        mut answer: impl FnMut(usize, Option<usize>) -> io::Result<()>,
    ) -> Driven {
        let bytes: Vec<u8> = (0..sizes.iter().sum::<usize>()).map(|i| i as u8).collect();
        let mut sends = Vec::new();
        let mut heard = Vec::new();
        send(
            &bytes,
            sizes,
            (max_segments, V4),
            |buf, segment| {
                sends.push((buf.len(), segment));
                answer(buf.len(), segment)
            },
            |k, r| {
                assert_eq!(k, heard.len(), "every datagram heard of, in order");
                heard.push(r.map_err(io::Error::kind));
                true
            },
        );
        (sends, heard)
    }

    #[test]
    fn mixed_sizes_go_in_runs_and_every_datagram_is_heard_of() {
        let sizes = [1_200, 1_200, 1_200, 500, 1_200, 0, 3_000, 3_000, 1, 1];
        let (sends, heard) = drive(&sizes, 64, |_, _| Ok(()));
        assert_eq!(
            sends,
            [
                (4_100, Some(1_200)),
                (1_200, None),
                (0, None),
                (3_000, None),
                (3_000, None),
                (2, Some(1)),
            ]
        );
        assert_eq!(heard.len(), sizes.len());
        assert!(heard.iter().all(Result::is_ok));
    }

    #[test]
    fn a_refused_gso_send_goes_again_one_by_one() {
        for errno in [libc::EIO, libc::EINVAL, libc::EMSGSIZE] {
            let (sends, heard) = drive(&[1_200, 1_200, 800], 64, |_, segment| match segment {
                Some(_) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            });
            assert_eq!(
                sends,
                [
                    (3_200, Some(1_200)),
                    (1_200, None),
                    (1_200, None),
                    (800, None)
                ]
            );
            assert!(heard.iter().all(Result::is_ok), "none lost: {heard:?}");
        }
    }

    #[test]
    fn another_error_is_the_datagrams_own_and_is_not_sent_again() {
        let (sends, heard) = drive(&[1_200, 1_200, 1_000], 64, |_, segment| match segment {
            Some(_) => Err(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            None => Ok(()),
        });
        assert_eq!(sends, [(3_400, Some(1_200))]);
        assert_eq!(heard, vec![Err(io::ErrorKind::ConnectionRefused); 3]);
    }

    #[test]
    fn a_full_socket_drops_the_rest_without_trying_them() {
        let mut left = 2;
        let (sends, heard) = drive(&[100, 100, 50, 100, 7, 100], 64, |_, _| {
            if left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            left -= 1;
            Ok(())
        });
        assert_eq!(sends, [(250, Some(100)), (107, Some(100)), (100, None)]);
        let went = heard.iter().filter(|r| r.is_ok()).count();
        assert_eq!(went, 5);
        assert_eq!(heard[5], Err(io::ErrorKind::WouldBlock));
        let (sends, heard) = drive(&[100, 100, 50, 100], 1, |_, _| {
            Err(io::ErrorKind::WouldBlock.into())
        });
        assert_eq!(sends.len(), 1, "one refusal is enough");
        assert_eq!(heard, vec![Err(io::ErrorKind::WouldBlock); 4]);
    }

    #[test]
    fn the_caller_stops_it() {
        let bytes = [0u8; 300];
        let mut sends = 0;
        let mut heard = 0;
        send(
            &bytes,
            &[100, 100, 100],
            (1, V4),
            |_, _| {
                sends += 1;
                Ok(())
            },
            |_, _| {
                heard += 1;
                false
            },
        );
        assert_eq!((sends, heard), (1, 1));
    }
}
