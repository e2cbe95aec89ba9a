//! A relay stopped for `carry` and resumed where it stopped, on real loopback sockets, for each
//! engine: every byte arrives exactly once and in order, whether it was in the kernel, in the relay's
//! own buffer, in a pipe or in a ring operation when the relay stopped, and a half-close before the
//! stop carries over.

use std::sync::atomic::AtomicU64;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// (client, proxy's client side, proxy's backend side, backend): two loopback connections, every
/// socket with a small receive buffer, so that the kernel cannot take a whole transfer at once and the
/// slow readers below set its pace (loopback's buffers would otherwise swallow megabytes).
async fn quartet() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    const RCVBUF: u32 = 32 << 10;
    let ls = tokio::net::TcpSocket::new_v4().unwrap();
    ls.set_recv_buffer_size(RCVBUF).unwrap();
    ls.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = ls.listen(16).unwrap();
    let addr = l.local_addr().unwrap();
    let connect = || async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(RCVBUF).unwrap();
        s.connect(addr).await.unwrap()
    };
    let client = connect().await;
    let (proxy_c, _) = l.accept().await.unwrap();
    let proxy_b = connect().await;
    let (backend, _) = l.accept().await.unwrap();
    (client, proxy_c, proxy_b, backend)
}

fn payload(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn opts(mode: RelayMode) -> RelayOptions {
    RelayOptions {
        mode,
        idle_timeout: Duration::from_secs(30),
        half_close_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(300),
        first_byte_timeout: None,
        client_watch: Default::default(),
        backend_watch: Default::default(),
    }
}

/// One end of the connection: sends `data` then its FIN, while reading slowly (`chunk` bytes at a
/// time, so the relay's writes to it push back) until the other side's FIN; returns what it read.
async fn end(mut s: TcpStream, data: Vec<u8>, chunk: usize) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        let mut b = vec![0u8; chunk];
        loop {
            tokio::time::sleep(Duration::from_micros(200)).await;
            match r.read(&mut b).await.unwrap() {
                0 => break got,
                n => got.extend_from_slice(&b[..n]),
            }
        }
    };
    tokio::join!(send, recv).1
}

/// 4 MiB each way while both readers are slow (so the relay holds bytes when it stops), the client's
/// side half-closed after its data; the relay is stopped for `carry` after `stop_after` and resumed,
/// then both ends check everything they read.
async fn carried_mid_stream(mode: RelayMode, stop_after: Duration) {
    let (client, proxy_c, proxy_b, backend) = quartet().await;
    let up_data = payload(1, 4 << 20);
    let down_data = payload(2, 4 << 20);
    let (up_live, down_live) = (AtomicU64::new(0), AtomicU64::new(0));
    let live = LiveCounters {
        up: &up_live,
        down: &down_live,
        conn: None,
    };
    let (cw, dw) = (up_data.clone(), down_data.clone());
    let client_side = end(client, cw, 7000);
    let backend_side = end(backend, dw, 5000);
    let proxy = async move {
        let carry = CancellationToken::new();
        let stop = carry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(stop_after).await;
            stop.cancel();
        });
        let first = relay(
            &proxy_c,
            &proxy_b,
            &opts(mode),
            std::pin::pin!(std::future::pending()),
            Some(&carry),
            live,
            Begin::New {
                ack_held: false,
                first_byte_by: FirstByteIn::NONE,
            },
        )
        .await;
        let Some(held) = first.carried else {
            panic!(
                "{mode:?} after {stop_after:?}: ended ({:?}, {:?}), not stopped for carry",
                first.end, first.broken
            )
        };
        // Another relay picks it up where it stopped (another process would, on the same sockets).
        let second = relay(
            &proxy_c,
            &proxy_b,
            &opts(mode),
            std::pin::pin!(std::future::pending()),
            None,
            live,
            Begin::Resumed(Box::new(held.clone())),
        )
        .await;
        // The relay may leave the last FIN to the close, as a session does.
        drop((proxy_c, proxy_b));
        assert!(second.carried.is_none());
        // Both ends send and close: whichever FIN came first names the end.
        assert!(
            matches!(second.end, Outcome::ClientClosed | Outcome::BackendClosed),
            "{:?} {:?}",
            second.end,
            second.broken
        );
        (
            first.bytes_up + second.bytes_up,
            first.bytes_down + second.bytes_down,
            held,
        )
    };
    let (to_client, to_backend, (up, down, held)) = tokio::join!(client_side, backend_side, proxy);
    assert_eq!(
        to_backend.len(),
        up_data.len(),
        "{mode:?}: up length (held {held:?})"
    );
    assert_eq!(
        Sha256::digest(&to_backend),
        Sha256::digest(&up_data),
        "{mode:?}: up bytes"
    );
    assert_eq!(to_client.len(), down_data.len(), "{mode:?}: down length");
    assert_eq!(
        Sha256::digest(&to_client),
        Sha256::digest(&down_data),
        "{mode:?}: down bytes"
    );
    assert_eq!(
        (up, down),
        (up_data.len() as u64, down_data.len() as u64),
        "counted once"
    );
}

fn run(mode: RelayMode, stop_after: Duration) {
    on_own_thread(move || carried_mid_stream(mode, stop_after));
}

/// Runs `test` on a thread and runtime of its own, passing its panic on: the ring engine's ring is
/// per thread, and so are a test's broken pipe reads (`splice::break_reads_here`).
fn on_own_thread<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
}

#[test]
fn a_copied_relay_is_carried_exactly() {
    for ms in [0, 3, 30] {
        run(RelayMode::Copy, Duration::from_millis(ms));
    }
}

#[test]
fn a_spliced_relay_is_carried_exactly() {
    for ms in [0, 3, 30] {
        run(RelayMode::Splice, Duration::from_millis(ms));
    }
}

#[test]
fn an_epoll_relay_is_carried_exactly() {
    for ms in [0, 3, 30] {
        run(RelayMode::Epoll, Duration::from_millis(ms));
    }
}

/// A connection half-closed by the client before the stop: the new relay does not read the client
/// again, and the backend's answer still arrives, then the backend's FIN ends it.
#[test]
fn a_half_closed_relay_carries_its_half_close() {
    on_own_thread(|| async {
        let (mut client, proxy_c, proxy_b, mut backend) = quartet().await;
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let live = LiveCounters {
            up: &a,
            down: &b,
            conn: None,
        };
        let carry = CancellationToken::new();
        let relayed = async {
            relay(
                &proxy_c,
                &proxy_b,
                &opts(RelayMode::Epoll),
                std::pin::pin!(std::future::pending()),
                Some(&carry),
                live,
                Begin::New {
                    ack_held: false,
                    first_byte_by: FirstByteIn::NONE,
                },
            )
            .await
        };
        let ends = async {
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"request", "the FIN came through before the stop");
            carry.cancel();
        };
        let (first, ()) = tokio::join!(relayed, ends);
        let held = first.carried.expect("carried");
        assert!(held.up_done && !held.down_done, "{held:?}");
        let o = opts(RelayMode::Epoll);
        let second = async {
            let r = relay(
                &proxy_c,
                &proxy_b,
                &o,
                std::pin::pin!(std::future::pending()),
                None,
                live,
                Begin::Resumed(Box::new(held)),
            )
            .await;
            // The relay may leave the last FIN to the close, as a session does.
            drop((proxy_c, proxy_b));
            r
        };
        let answer = async {
            backend.write_all(b"answer").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let (second, got) = tokio::join!(second, answer);
        assert_eq!(got, b"answer");
        assert_eq!(second.end, Outcome::ClientClosed);
    });
}

/// One end of a connection whose relay is to break: sends `data` (which the reset may cut short)
/// while reading slowly, until the stream ends; the error it ended with (`None`: a FIN).
async fn until_broken(mut s: TcpStream, data: Vec<u8>) -> Option<io::ErrorKind> {
    let (mut r, mut w) = s.split();
    let send = async {
        let _ = w.write_all(&data).await;
    };
    let recv = async {
        let mut b = vec![0u8; 5000];
        loop {
            tokio::time::sleep(Duration::from_micros(200)).await;
            match r.read(&mut b).await {
                Ok(0) => break None,
                Ok(_) => {}
                Err(e) => break Some(e.kind()),
            }
        }
    };
    tokio::join!(send, recv).1
}

/// A spliced relay stopped for `carry` while a pipe holds bytes that cannot be read back: they
/// cannot go along, so it is not carried. It ends as broken, and both sides see a reset, as
/// neither may take what it got for the whole stream (`conclude`).
#[test]
fn a_relay_whose_pipe_cannot_be_read_back_is_not_carried_and_resets_both_sides() {
    on_own_thread(|| async {
        splice::break_reads_here();
        let (client, proxy_c, proxy_b, backend) = quartet().await;
        let bounded = |end| tokio::time::timeout(Duration::from_secs(10), end);
        let client_side = bounded(until_broken(client, payload(1, 4 << 20)));
        let backend_side = bounded(until_broken(backend, payload(2, 4 << 20)));
        let proxy = async move {
            let carry = CancellationToken::new();
            let stop = carry.clone();
            tokio::spawn(async move {
                // Both readers are slow: by then the pipes hold bytes.
                tokio::time::sleep(Duration::from_millis(30)).await;
                stop.cancel();
            });
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let relayed = relay(
                &proxy_c,
                &proxy_b,
                &opts(RelayMode::Splice),
                std::pin::pin!(std::future::pending()),
                Some(&carry),
                LiveCounters {
                    up: &a,
                    down: &b,
                    conn: None,
                },
                Begin::New {
                    ack_held: false,
                    first_byte_by: FirstByteIn::NONE,
                },
            )
            .await;
            drop((proxy_c, proxy_b));
            relayed
        };
        let (c, b, r) = tokio::join!(client_side, backend_side, proxy);
        assert!(
            r.carried.is_none(),
            "not carried: {:?}",
            r.carried.map(|q| q.up_done)
        );
        assert_eq!(r.end, Outcome::BackendReset);
        let why = r.broken.as_ref().and_then(io::Error::raw_os_error);
        assert_eq!(why, Some(libc::EIO), "the pipe's read failed");
        let reset = Some(io::ErrorKind::ConnectionReset);
        assert_eq!(c.expect("the client's end ends in time"), reset);
        assert_eq!(b.expect("the backend's end ends in time"), reset);
    });
}
