//! UDP services (`protocol: udp`) over real sockets on loopback: sessions and their affinity,
//! `responses`, `idle_timeout`, the bounded table under a flood of sources, `per_packet`, a
//! backend whose port is closed, datagram sizes, PROXY v2 over UDP, two balancers agreeing, the
//! drain, real DNS servers behind the balancer (hickory's in process, and two `knotd` answering
//! `dig` with a `kind: dns` probe watching them), and QUIC (aioquic) routed by server name on a
//! shared port and followed when its client moves.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::common::dns::{a_query, FakeDns};
use crate::common::http::get;
use crate::common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// What a backend received: from whom, and the bytes.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP backend that answers each datagram with its tag and the datagram, and records who sent
/// what.
struct Echo {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start(ip: [u8; 4], tag: &'static str, answer: bool) -> Echo {
        let socket = UdpSocket::bind(SocketAddr::from((ip, 0))).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                log.lock().unwrap().push((from, buf[..n].to_vec()));
                if answer {
                    let mut reply = tag.as_bytes().to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Echo { addr, seen, task }
    }

    fn received(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn sources(&self) -> HashSet<SocketAddr> {
        self.seen.lock().unwrap().iter().map(|(a, _)| *a).collect()
    }
}

fn yaml(backends: &[SocketAddr], udp: &str, extra: &str) -> String {
    let list: String = backends
        .iter()
        .map(|b| format!("      - address: \"{b}\"\n"))
        .collect();
    format!(
        "services:\n  - name: dgram\n    protocol: udp\n    listen: \"127.0.0.1:0\"\n    balance: round_robin\n    udp: {{{udp}}}\n{extra}    backends:\n{list}"
    )
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `msg` and waits for one answer.
async fn ask(c: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    c.send_to(msg, to).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = within(SECS(5), "an answer", c.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        from, to,
        "the answer must come from the address the client sent to"
    );
    buf.truncate(n);
    buf
}

/// sluicegate in front of `be` with its admin API, and the API's address.
async fn with_admin(be: &Echo) -> (Proxy, SocketAddr) {
    let config = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        yaml(&[be.addr], "", "")
    );
    let p = Proxy::start(&config).await;
    let admin = p.admin.expect("admin");
    (p, admin)
}

fn active(p: &Proxy, b: SocketAddr) -> u64 {
    p.backend(b).active()
}

/// One client's 50 datagrams go to one backend, in order, from one source; another client's
/// session takes the next backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_datagrams_stay_on_one_backend_in_order() {
    let (a, b) = (
        Echo::start([127, 0, 0, 1], "a", true).await,
        Echo::start([127, 0, 0, 1], "b", true).await,
    );
    let p = Proxy::start(&yaml(&[a.addr, b.addr], "", "")).await;
    let c = client().await;
    let mut tags = HashSet::new();
    for i in 0..50u32 {
        let msg = format!("#{i}");
        let got = ask(&c, p.addr, msg.as_bytes()).await;
        tags.insert(got[0]);
        assert_eq!(&got[1..], msg.as_bytes(), "answers in order");
    }
    assert_eq!(tags.len(), 1, "one backend for the session");
    let first = if tags.contains(&b'a') { &a } else { &b };
    assert_eq!(first.received(), 50);
    assert_eq!(
        first.sources().len(),
        1,
        "one source per client as the backend sees it"
    );
    let other = client().await;
    let got = ask(&other, p.addr, b"hello").await;
    assert_ne!(
        got[0],
        *tags.iter().next().unwrap(),
        "a new session takes the next backend"
    );
}

/// `responses: 1`: each answer ends its session, so each query is balanced anew; the backends'
/// counts say so and nothing stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_response_per_query_ends_each_session() {
    let (a, b) = (
        Echo::start([127, 0, 0, 1], "a", true).await,
        Echo::start([127, 0, 0, 1], "b", true).await,
    );
    let p = Proxy::start(&yaml(&[a.addr, b.addr], "responses: 1", "")).await;
    let c = client().await;
    let mut tags = Vec::new();
    for i in 0..6u32 {
        let got = ask(&c, p.addr, format!("q{i}").as_bytes()).await;
        tags.push(got[0]);
        let (pa, pb) = (a.addr, b.addr);
        wait_until(SECS(5), "the session ended", || async {
            active(&p, pa) + active(&p, pb) == 0
        })
        .await;
    }
    // Round robin from wherever it starts: each query to the other backend.
    assert!(tags.windows(2).all(|w| w[0] != w[1]), "{tags:?}");
    assert_eq!(p.backend(a.addr).view().total, 3);
    assert_eq!(p.backend(b.addr).view().total, 3);
}

/// `idle_timeout`: a silent session ends, and the client's next datagram is a new pick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_ends_and_the_next_datagram_picks_again() {
    let (a, b) = (
        Echo::start([127, 0, 0, 1], "a", true).await,
        Echo::start([127, 0, 0, 1], "b", true).await,
    );
    let p = Proxy::start(&yaml(&[a.addr, b.addr], "idle_timeout: 300ms", "")).await;
    let c = client().await;
    let first = ask(&c, p.addr, b"1").await[0];
    assert_eq!(ask(&c, p.addr, b"2").await[0], first, "still the session");
    let (pa, pb) = (a.addr, b.addr);
    wait_until(SECS(10), "the idle session ended", || async {
        active(&p, pa) + active(&p, pb) == 0
    })
    .await;
    assert_ne!(ask(&c, p.addr, b"3").await[0], first);
}

/// A flood of 10,000 sources against `max_sessions: 100`: the table never holds more, the
/// sessions idle longest make room, and every source is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sources_is_served_within_the_table_bound() {
    let a = Echo::start([127, 0, 0, 1], "a", true).await;
    let p = Proxy::start(&yaml(&[a.addr], "max_sessions: 100", "")).await;
    let keep = client().await;
    ask(&keep, p.addr, b"first").await;
    let mut most = 0;
    for i in 0..10_000u32 {
        let c = client().await;
        ask(&c, p.addr, &i.to_be_bytes()).await;
        most = most.max(active(&p, a.addr));
        assert!(p.service.stats.active_now() <= 100);
    }
    assert!(most <= 100, "at most 100 sessions, saw {most}");
    // A closed client's port may come back to a later one, whose datagram then finds the session
    // still open: nearly every source is a session of its own, not exactly every one.
    let total = p.backend(a.addr).view().total;
    assert!(total > 9_000, "{total} sessions for 10,001 sources");
    // The first client's session was evicted long ago: it gets a new one.
    assert_eq!(ask(&keep, p.addr, b"again").await[0], b'a');
    assert_eq!(p.backend(a.addr).view().total, total + 1);
}

/// `per_packet`: no sessions, each datagram balanced on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_packet_spreads_every_datagram() {
    let (a, b) = (
        Echo::start([127, 0, 0, 1], "a", false).await,
        Echo::start([127, 0, 0, 1], "b", false).await,
    );
    let p = Proxy::start(&yaml(&[a.addr, b.addr], "per_packet: true", "")).await;
    let c = client().await;
    for i in 0..20u32 {
        c.send_to(format!("log line {i}").as_bytes(), p.addr)
            .await
            .unwrap();
    }
    wait_until(SECS(5), "every datagram delivered", || async {
        a.received() + b.received() == 20
    })
    .await;
    assert_eq!((a.received(), b.received()), (10, 10));
    assert_eq!(p.service.stats.active_now(), 0, "no sessions");
}

/// A backend whose port is closed answers with ICMP port-unreachable: its session ends, and the
/// client's next datagram is served by another backend: at most one datagram is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_backend_port_costs_a_client_at_most_one_datagram() {
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let live = Echo::start([127, 0, 0, 1], "l", true).await;
    let p = Proxy::start(&yaml(&[dead, live.addr], "", "")).await;
    // Round robin: one of the two clients' sessions starts on the closed port.
    for _ in 0..2 {
        let c = client().await;
        let mut buf = [0u8; 64];
        let mut lost = 0;
        for i in 0..3u32 {
            c.send_to(format!("d{i}").as_bytes(), p.addr).await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), c.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    assert_eq!(&buf[..1], b"l");
                    assert_eq!(&buf[1..n], format!("d{i}").as_bytes());
                }
                _ => lost += 1,
            }
        }
        assert!(lost <= 1, "{lost} datagrams lost");
    }
    assert!(
        p.backend(dead).view().failed >= 1,
        "the closed port counts against its backend"
    );
}

/// A client that asks once from each source port (a DNS resolver) never resends on a session:
/// the ICMP error that comes back for its datagram still ends the session at once, and counts
/// against the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_found_without_the_client_sending_again() {
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let live = Echo::start([127, 0, 0, 1], "l", true).await;
    let p = Proxy::start(&yaml(&[dead, live.addr], "idle_timeout: 1h", "")).await;
    // Round robin: of two fresh clients, one goes to the closed port.
    for _ in 0..2 {
        client().await.send_to(b"q", p.addr).await.unwrap();
    }
    let d = dead;
    wait_until(SECS(10), "the closed port's session ended", || async {
        p.backend(d).view().failed >= 1 && p.backend(d).active() == 0
    })
    .await;
}

/// At the service's `max_connections` the session idle longest makes room, as at a full table:
/// 50 sources against a cap of 10 are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_service_cap_the_idle_longest_session_makes_room() {
    let a = Echo::start([127, 0, 0, 1], "a", true).await;
    let p = Proxy::start(&yaml(&[a.addr], "", "    max_connections: 10\n")).await;
    let mut clients = Vec::new();
    for i in 0..50u32 {
        let c = client().await;
        ask(&c, p.addr, &i.to_be_bytes()).await;
        assert!(p.service.stats.active_now() <= 10);
        clients.push(c);
    }
}

/// Datagrams of 0, 1 and 65,507 bytes (the IPv4 maximum) arrive exact, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_of_every_size_arrive_exact() {
    // The largest reply is the tag and the datagram: the echo drops its tag for this one.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    let p = Proxy::start(&yaml(&[addr], "", "")).await;
    let c = client().await;
    for size in [0usize, 1, 1_200, 65_507] {
        let msg = payload(size as u64, size);
        assert_eq!(ask(&c, p.addr, &msg).await, msg, "{size} bytes");
    }
    echo.abort();
}

/// `proxy_protocol: v2` puts a PROXY v2 header (DGRAM) before every datagram to the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_names_the_client_on_every_datagram() {
    let a = Echo::start([127, 0, 0, 1], "a", false).await;
    let p = Proxy::start(&yaml(&[a.addr], "", "    proxy_protocol: v2\n")).await;
    let c = client().await;
    for i in 0..2u8 {
        c.send_to(&[i; 3], p.addr).await.unwrap();
    }
    wait_until(SECS(5), "both datagrams", || async { a.received() == 2 }).await;
    let client = c.local_addr().unwrap();
    for (i, (_, bytes)) in a.seen.lock().unwrap().iter().enumerate() {
        // The signature, version 2 PROXY, AF_INET over DGRAM, 12 bytes of addresses.
        assert_eq!(&bytes[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(bytes[12], 0x21);
        assert_eq!(bytes[13], 0x12, "AF_INET, DGRAM");
        assert_eq!(u16::from_be_bytes([bytes[14], bytes[15]]), 12);
        let ip =
            |o: usize| std::net::Ipv4Addr::new(bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]);
        let port = |o: usize| u16::from_be_bytes([bytes[o], bytes[o + 1]]);
        assert_eq!(SocketAddr::from((ip(16), port(24))), client);
        assert_eq!(SocketAddr::from((ip(20), port(26))), p.addr);
        assert_eq!(&bytes[28..], &[i as u8; 3], "the payload after the header");
    }
}

/// Sends `msgs` back to back (they queue, and the balancer reads, sends on and answers them in
/// batches), then reads an answer for each: the answers, each from the address the client sent to.
async fn burst(c: &UdpSocket, to: SocketAddr, msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    for m in msgs {
        c.send_to(m, to).await.unwrap();
    }
    let mut buf = vec![0u8; 65_536];
    let mut answers = Vec::new();
    for i in 0..msgs.len() {
        let (n, from) = within(SECS(5), "the burst's answers", c.recv_from(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(from, to, "answer {i} from the address the client sent to");
        answers.push(buf[..n].to_vec());
    }
    answers
}

/// Checks that the backend `be` received `sent` and the client `answers` (tagged `a`), each
/// whole and in order.
fn check_burst(be: &Echo, sent: &[Vec<u8>], answers: &[Vec<u8>]) {
    for (i, (m, got)) in sent.iter().zip(answers).enumerate() {
        assert!(
            got.first() == Some(&b'a') && got[1..] == m[..],
            "answer {i} ({} bytes) whole and in order, got {} bytes",
            m.len(),
            got.len()
        );
    }
    let seen = be.seen.lock().unwrap();
    assert_eq!(seen.len(), sent.len(), "every datagram at the backend");
    for (i, ((_, got), m)) in seen.iter().zip(sent).enumerate() {
        assert!(
            got == m,
            "datagram {i} ({} bytes) whole and in order at the backend",
            m.len()
        );
    }
}

/// A burst of same-size datagrams from one client, sent back to back so that they queue (read,
/// sent on and answered in batches, several to a send with GSO where the kernel has it), all
/// arrive at the backend whole and in order, and every answer comes back in order from the
/// address the client sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_same_size_datagrams_goes_both_ways_whole_and_in_order() {
    let a = Echo::start([127, 0, 0, 1], "a", true).await;
    let p = Proxy::start(&yaml(&[a.addr], "", "")).await;
    let c = client().await;
    let (mut sent, mut answers) = (Vec::new(), Vec::new());
    for round in 0..4u64 {
        let msgs: Vec<Vec<u8>> = (0..32).map(|i| payload(round * 100 + i, 1_200)).collect();
        answers.extend(burst(&c, p.addr, &msgs).await);
        sent.extend(msgs);
    }
    check_burst(&a, &sent, &answers);
    assert_eq!(a.sources().len(), 1, "one session");
}

/// A burst of mixed sizes (runs of one size, a shorter one ending a run, empty datagrams, some
/// past one Ethernet frame, which go alone) arrives whole and in order both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_mixed_sizes_goes_both_ways_whole_and_in_order() {
    const SIZES: [usize; 18] = [
        1_200, 1_200, 1_200, 700, 1_200, 0, 1, 1, 1, 1_472, 1_472, 1_473, 3_000, 3_000, 9_000,
        1_200, 1_200, 0,
    ];
    let a = Echo::start([127, 0, 0, 1], "a", true).await;
    let p = Proxy::start(&yaml(&[a.addr], "", "")).await;
    let c = client().await;
    let (mut sent, mut answers) = (Vec::new(), Vec::new());
    for round in 0..3u64 {
        let msgs: Vec<Vec<u8>> = SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(round * 100 + i as u64, n))
            .collect();
        answers.extend(burst(&c, p.addr, &msgs).await);
        sent.extend(msgs);
    }
    check_burst(&a, &sent, &answers);
}

/// With `proxy_protocol: v2` a burst's datagrams each reach the backend behind their own header,
/// whole and in order (a header and a payload of one size make datagrams of one size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_behind_proxy_v2_headers_arrives_whole_and_in_order() {
    let a = Echo::start([127, 0, 0, 1], "a", false).await;
    let p = Proxy::start(&yaml(&[a.addr], "", "    proxy_protocol: v2\n")).await;
    let c = client().await;
    let msgs: Vec<Vec<u8>> = (0..48).map(|i| payload(i, 1_200)).collect();
    for m in &msgs {
        c.send_to(m, p.addr).await.unwrap();
    }
    wait_until(SECS(5), "the burst at the backend", || async {
        a.received() == msgs.len()
    })
    .await;
    let header = sluicegate::proxy_protocol::encode_dgram(c.local_addr().unwrap(), p.addr);
    for (i, ((_, got), m)) in a.seen.lock().unwrap().iter().zip(&msgs).enumerate() {
        assert!(
            got.len() == header.len() + m.len() && got[..header.len()] == header[..],
            "datagram {i} behind its header"
        );
        assert!(
            got[header.len()..] == m[..],
            "datagram {i} whole and in order"
        );
    }
}

/// Two balancers with `balance: source_hash` send each of 200 clients to the same backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_agree_on_every_clients_backend() {
    let echoes = [
        Echo::start([127, 0, 0, 1], "a", true).await,
        Echo::start([127, 0, 0, 1], "b", true).await,
        Echo::start([127, 0, 0, 1], "c", true).await,
    ];
    let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    let config = yaml(&addrs, "", "").replace("round_robin", "source_hash");
    let (one, two) = (Proxy::start(&config).await, Proxy::start(&config).await);
    let mut spread = HashMap::new();
    for i in 0..200u8 {
        // source_hash hashes the client's address: 200 addresses of 127.0.0.0/8.
        let c = UdpSocket::bind((std::net::Ipv4Addr::new(127, 1, 0, i), 0))
            .await
            .unwrap();
        let x = ask(&c, one.addr, b"?").await[0];
        let y = ask(&c, two.addr, b"?").await[0];
        assert_eq!(
            x,
            y,
            "both balancers pick one backend for {}",
            c.local_addr().unwrap()
        );
        *spread.entry(x).or_insert(0) += 1;
    }
    assert_eq!(
        spread.len(),
        3,
        "every backend takes some clients: {spread:?}"
    );
}

/// The drain: new clients are refused, an open session goes on until it ends, then the server
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_refuses_new_sessions_and_lets_open_ones_finish() {
    let a = Echo::start([127, 0, 0, 1], "a", true).await;
    let mut p = Proxy::start(&yaml(&[a.addr], "idle_timeout: 1s", "")).await;
    let open = client().await;
    ask(&open, p.addr, b"before").await;
    p.signal_stop();
    wait_until(SECS(5), "draining", || async {
        p.control.readiness().is_draining()
    })
    .await;
    // The open session is still served.
    assert_eq!(ask(&open, p.addr, b"during").await, b"aduring");
    // New clients are refused once the UDP loops have heard of the drain.
    wait_until(SECS(5), "a new client refused", || async {
        let late = client().await;
        late.send_to(b"late", p.addr).await.unwrap();
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_millis(200), late.recv_from(&mut buf))
            .await
            .is_err()
    })
    .await;
    assert_eq!(ask(&open, p.addr, b"still").await, b"astill");
    // The open one ends at its idle timeout, and the server with it.
    within(SECS(10), "the drain ends", p.stopped()).await;
}

/// A real DNS server (hickory's, in process) behind the balancer with `responses: 1`: queries
/// from one client alternate between the two servers, each answered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_queries_are_answered_through_the_balancer() {
    let (one, two) = (FakeDns::start().await, FakeDns::start().await);
    one.set_ips("svc.test", &[[10, 0, 0, 1]]);
    two.set_ips("svc.test", &[[10, 0, 0, 2]]);
    let p = Proxy::start(&yaml(&[one.addr, two.addr], "responses: 1", "")).await;
    let c = client().await;
    let mut seen = Vec::new();
    for id in 1..=4u16 {
        let answer = ask(&c, p.addr, &a_query(id, "svc.test")).await;
        assert_eq!(&answer[..2], &id.to_be_bytes(), "the answer to this query");
        assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 1, "one answer");
        seen.push(answer[answer.len() - 1]);
    }
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "{seen:?}");
    assert!(seen.iter().all(|&x| x == 1 || x == 2), "{seen:?}");
}

/// Two real authoritative servers (`knotd`) behind the balancer with `responses: 1` and a
/// `kind: dns` probe, asked by a real client (`dig`): both answer across the queries; one stopped
/// is marked down by the probe and the rest of the queries go to the other; started again, it is
/// marked up and answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knot_servers_answer_dig_through_the_balancer() {
    use crate::common::knot::{dig, Knot, NAME};
    use sluicegate::Health;
    if !Knot::available("udp::knot_servers_answer_dig_through_the_balancer") {
        return;
    }
    let one = Knot::start([10, 0, 0, 1].into()).await;
    let mut two = Knot::start([10, 0, 0, 2].into()).await;
    let health = format!(
        "    health: {{kind: dns, name: {NAME}, expect_answer: true, interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\n"
    );
    let p = Proxy::start(&yaml(&[one.addr, two.addr], "responses: 1", &health)).await;
    let both = [one.answer.to_string(), two.answer.to_string()];
    let healthy = |b: SocketAddr| p.backend(b).health() == Health::Healthy;
    wait_for(SECS(10), "both servers probed healthy", || {
        healthy(one.addr) && healthy(two.addr)
    })
    .await;
    let mut answered = HashSet::new();
    for _ in 0..6 {
        let got = dig(p.addr).await;
        assert!(
            got.len() == 1 && both.contains(&got[0]),
            "dig printed {got:?}"
        );
        answered.insert(got[0].clone());
    }
    assert_eq!(answered.len(), 2, "both servers answer: {answered:?}");

    two.stop();
    let b = p.backend(two.addr);
    wait_for(SECS(10), "the stopped server probed down", || {
        b.health() == Health::Unhealthy
    })
    .await;
    for _ in 0..4 {
        assert_eq!(
            dig(p.addr).await,
            [both[0].clone()],
            "only the running server"
        );
    }
    two.restart().await;
    wait_for(SECS(10), "the restarted server probed up", || {
        healthy(two.addr)
    })
    .await;
    let mut answered = HashSet::new();
    for _ in 0..6 {
        answered.extend(dig(p.addr).await);
    }
    assert_eq!(answered, HashSet::from(both), "both answer again");
}

/// A real QUIC server (aioquic, tests/quic/peer.py) answering with its name; ended with the test.
struct QuicServer {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that has aioquic: `SLUICEGATE_QUIC_PYTHON` (CI's virtualenv), else `python3`.
fn quic_python() -> Option<String> {
    let python = std::env::var("SLUICEGATE_QUIC_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import aioquic"])
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = (!ok).then(|| format!("{python} has no aioquic (pip install aioquic)"));
    require_tool("AIOQUIC", missing).then_some(python)
}

fn peer_script() -> String {
    format!("{}/tests/quic/peer.py", env!("CARGO_MANIFEST_DIR"))
}

impl QuicServer {
    fn start(python: &str, pair: &pki::Pair, name: &str) -> QuicServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new(python)
            .arg(peer_script())
            .args(["server", "--listen", "127.0.0.1:0", "--name", name])
            .arg("--cert")
            .arg(&pair.cert)
            .arg("--key")
            .arg(&pair.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the aioquic server");
        let out = child.stdout.take().expect("its stdout");
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("its ready line");
        let port: u16 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the aioquic server said {line:?}"));
        QuicServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        }
    }
}

/// Runs the aioquic client against `to` for server name `sni`: the answers it got, in order.
async fn quic_client(
    python: &str,
    ca: &std::path::Path,
    to: SocketAddr,
    sni: &str,
    moves: bool,
) -> Vec<String> {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(peer_script())
        .args(["client", "--connect", &to.to_string(), "--sni", sni, "--ca"])
        .arg(ca);
    if moves {
        cmd.arg("--move");
    }
    let out = within(SECS(30), "the aioquic client", cmd.output())
        .await
        .expect("run the aioquic client");
    assert!(
        out.status.success(),
        "the QUIC client for {sni} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON line");
    let sources = v["sources"].as_array().map_or(0, Vec::len);
    assert_eq!(sources, if moves { 2 } else { 1 }, "{v}");
    v["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect()
}

/// QUIC on one shared UDP port: two services routed by the server name in the client's Initials,
/// each backend (aioquic) with its own certificate that the client verifies (passthrough); and a
/// client that moves to a new source port mid-connection stays on its backend, its connection
/// alive, though its service has two backends and the new address alone would be balanced anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_is_routed_by_server_name_and_followed_when_the_client_moves() {
    let Some(python) = quic_python() else {
        return;
    };
    let pki = pki::Pki::new("quic");
    let a_pair = pki.server("a", &["a.test"]);
    let b_pair = pki.server("b", &["b.test"]);
    let a1 = QuicServer::start(&python, &a_pair, "a1");
    let a2 = QuicServer::start(&python, &a_pair, "a2");
    let b = QuicServer::start(&python, &b_pair, "b");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let service = |name: &str, sni: &str, backends: &[&QuicServer]| {
        let list: String = backends
            .iter()
            .map(|s| format!("      - address: \"{}\"\n", s.addr))
            .collect();
        format!("  - name: {name}\n    protocol: udp\n    listen: \"{listen}\"\n    sni: [\"{sni}\"]\n    balance: round_robin\n    backends:\n{list}")
    };
    let yaml = format!(
        "admin:\n  listen: \"127.0.0.1:0\"\nservices:\n{}{}",
        service("quic-a", "a.test", &[&a1, &a2]),
        service("quic-b", "b.test", &[&b])
    );
    let p = Proxy::start(&yaml).await;
    let admin = p.admin.expect("the admin API");
    for (sni, service, route) in [
        ("a.test", "quic-a", "exact"),
        ("b.test", "quic-b", "exact"),
        ("c.test", "null", "no_route"),
    ] {
        let r = get(
            admin,
            &format!("/route?listen={listen}&sni={sni}&protocol=udp"),
        )
        .await;
        let v = r.json();
        assert_eq!(v["protocol"], "udp", "{v}");
        assert_eq!(v["service"].to_string().trim_matches('"'), service, "{v}");
        assert_eq!(v["route"], route, "{v}");
    }
    let tcp = get(admin, &format!("/route?listen={listen}&sni=a.test")).await;
    assert_eq!(tcp.status, 404, "no TCP service there");
    let ca = pki.ca.clone();
    let answers = quic_client(&python, &ca, listen, "b.test", false).await;
    assert_eq!(answers, vec!["b:hello"]);
    for _ in 0..2 {
        let answers = quic_client(&python, &ca, listen, "a.test", true).await;
        assert_eq!(answers.len(), 2, "{answers:?}");
        let server = answers[0].split(':').next().unwrap_or_default().to_string();
        assert!(server == "a1" || server == "a2", "{answers:?}");
        assert_eq!(
            answers[1],
            format!("{server}:again"),
            "the moved client stayed on its backend"
        );
    }
    // A name no route takes, with no default: no answer, and nothing else disturbed.
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(peer_script())
        .args([
            "client",
            "--connect",
            &listen.to_string(),
            "--sni",
            "c.test",
            "--seconds",
            "2",
            "--ca",
        ])
        .arg(&ca);
    let out = within(SECS(20), "the unrouted client", cmd.output())
        .await
        .unwrap();
    assert!(!out.status.success(), "c.test has no route");
    assert_eq!(
        quic_client(&python, &ca, listen, "b.test", false).await,
        vec!["b:hello"]
    );
}

/// Two UDP services on one address, one the default (plain datagrams), one named for QUIC: a
/// reload that takes the default off the address ends its sessions there, so its client's next
/// datagram finds no route and no answer, rather than a session of a service no longer there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_leaving_a_shared_address_ends_its_sessions_there() {
    let echo = Echo::start([127, 0, 0, 1], "plain:", true).await;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let svc = |name: &str, keys: &str| {
        format!(
            "  - name: {name}\n    protocol: udp\n    listen: \"{listen}\"\n{keys}    backends:\n      - address: \"{}\"\n",
            echo.addr
        )
    };
    let named = svc("named", "    sni: [\"x.test\"]\n");
    let p = Proxy::start(&format!("services:\n{}{named}", svc("plain", ""))).await;
    let c = client().await;
    assert_eq!(ask(&c, listen, b"one").await, b"plain:one");
    let v2 = sluicegate::config::Config::from_yaml(&format!("services:\n{named}")).unwrap();
    p.control.reload(v2).expect("applied");
    c.send_to(b"two", listen).await.unwrap();
    let mut buf = [0u8; 64];
    let answer = tokio::time::timeout(Duration::from_millis(500), c.recv_from(&mut buf)).await;
    assert!(
        answer.is_err(),
        "a session of a service gone from the address answered"
    );
    assert_eq!(
        echo.received(),
        1,
        "only the first datagram reached the backend"
    );
}

/// The runtime deny list refuses a UDP client's new sessions (counted `refused`, nothing reaches
/// the backend) until the entry is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_list_refuses_new_udp_sessions_until_removed() {
    let be = Echo::start([127, 0, 0, 1], "a", true).await;
    let (p, admin) = with_admin(&be).await;
    let r = crate::common::http::send(admin, "POST", "/deny", r#"{"cidr": "127.0.0.21"}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = UdpSocket::bind("127.0.0.21:0").await.unwrap();
    c.send_to(b"x", p.addr).await.unwrap();
    let refused = "sluicegate_udp_dropped_total{service=\"dgram\",reason=\"refused\"} ";
    wait_until(SECS(5), "the datagram refused", || async {
        let page = get(admin, "/metrics").await.body;
        page.lines()
            .find_map(|l| l.strip_prefix(refused))
            .is_some_and(|n| n != "0")
    })
    .await;
    assert_eq!(be.received(), 0);
    let r = crate::common::http::send(admin, "DELETE", "/deny/127.0.0.21%2F32", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ask(&c, p.addr, b"y").await, b"ay");
}

/// A UDP session is listed by `GET /connections` (`protocol: udp`, its bytes as they move) and
/// ended by `DELETE /connections/{id}` (`end: killed`); the client's next datagram opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_listed_and_killed_through_the_connections_api() {
    let be = Echo::start([127, 0, 0, 1], "a", true).await;
    let (p, admin) = with_admin(&be).await;
    let c = client().await;
    assert_eq!(ask(&c, p.addr, b"hi").await, b"ahi");
    let path = format!("/connections?listen={}&protocol=udp", p.addr);
    let listed = get(admin, &path).await.json();
    assert_eq!(listed["total"], 1, "{listed}");
    let s = &listed["connections"][0];
    assert_eq!(s["protocol"], "udp", "{s}");
    assert_eq!(s["engine"], "udp");
    assert_eq!(s["service"], "dgram");
    assert_eq!(s["state"], "relaying");
    assert_eq!(s["client"], c.local_addr().unwrap().to_string());
    assert_eq!(s["backend"], be.addr.to_string());
    assert_eq!(
        (s["bytes_up"].as_u64(), s["bytes_down"].as_u64()),
        (Some(2), Some(3))
    );
    let id = s["id"].as_u64().unwrap();
    let r = crate::common::http::send(admin, "DELETE", &format!("/connections/{id}"), "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let killed = "sluicegate_udp_sessions_total{service=\"dgram\",end=\"killed\"} 1";
    wait_until(SECS(5), "the session ended as killed", || async {
        get(admin, "/metrics")
            .await
            .body
            .lines()
            .any(|l| l == killed)
    })
    .await;
    assert_eq!(get(admin, &path).await.json()["total"], 0);
    assert_eq!(ask(&c, p.addr, b"again").await, b"aagain");
    let again = get(admin, &path).await.json();
    assert_eq!(again["total"], 1);
    assert!(
        again["connections"][0]["id"].as_u64() > Some(id),
        "a new session"
    );
}

/// The value of the sample `name{labels}` on a metrics page, if it is there.
fn sample(page: &str, name_and_labels: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Each backend's sessions, datagrams and bytes are counted as its own, beside the service's, in
/// `/metrics` and in `/stats` (the dashboard's numbers); a backend whose port is closed has its
/// session's end counted against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_counts_its_own_datagrams_and_sessions() {
    let (a, b) = (
        Echo::start([127, 0, 0, 1], "a", true).await,
        Echo::start([127, 0, 0, 1], "b", true).await,
    );
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let config = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        yaml(&[a.addr, b.addr, dead], "idle_timeout: 1h", "")
    );
    let p = Proxy::start(&config).await;
    let admin = p.admin.expect("admin");
    // Round robin: of three clients' first datagrams, one goes to each backend; the closed
    // port's comes back as ICMP port-unreachable and is never answered. Each client waits until
    // its datagram reached an echo (then for the answer) or the closed port's session ended.
    let mut on = HashMap::new();
    for _ in 0..3 {
        let c = client().await;
        let (echoed, refused) = (a.received() + b.received(), p.backend(dead).view().failed);
        c.send_to(&[0; 10], p.addr).await.unwrap();
        wait_until(SECS(10), "an echo or the closed port took it", || async {
            a.received() + b.received() > echoed || p.backend(dead).view().failed > refused
        })
        .await;
        if a.received() + b.received() > echoed {
            let mut buf = [0u8; 64];
            let (n, _) = within(SECS(5), "the echo's answer", c.recv_from(&mut buf))
                .await
                .unwrap();
            assert_eq!(n, 11);
            on.insert(buf[0], c);
        }
    }
    let (x, y) = (&on[&b'a'], &on[&b'b']);
    for i in 1..3u8 {
        assert_eq!(ask(x, p.addr, &[i; 10]).await.len(), 11);
    }
    for i in 1..5u8 {
        assert_eq!(ask(y, p.addr, &[i; 10]).await.len(), 11);
    }
    assert_eq!((a.received(), b.received()), (3, 5));
    let of = |be: SocketAddr, family: &str, label: &str| {
        format!("sluicegate_udp_backend_{family}{{service=\"dgram\",backend=\"{be}\"{label}}}")
    };
    let unreachable = of(dead, "sessions_total", ",end=\"backend_unreachable\"");
    wait_until(SECS(10), "the closed port's session ended", || async {
        let page = get(admin, "/metrics").await.body;
        sample(&page, &unreachable) == Some(1)
    })
    .await;
    // A datagram's down count lands just after its send: wait for the last ones.
    let down = |be: SocketAddr| of(be, "datagrams_total", ",direction=\"down\"");
    let (last_a, last_b) = (down(a.addr), down(b.addr));
    wait_until(SECS(5), "every answer counted", || async {
        let page = get(admin, "/metrics").await.body;
        sample(&page, &last_a) == Some(3) && sample(&page, &last_b) == Some(5)
    })
    .await;
    let page = get(admin, "/metrics").await.body;
    for (be, n, size) in [(a.addr, 3, 10), (b.addr, 5, 10)] {
        let up = |f: &str, dir: &str| sample(&page, &of(be, f, &format!(",direction=\"{dir}\"")));
        assert_eq!(up("datagrams_total", "up"), Some(n), "{be}: {page}");
        assert_eq!(up("datagrams_total", "down"), Some(n));
        assert_eq!(up("bytes_total", "up"), Some(n * size));
        assert_eq!(up("bytes_total", "down"), Some(n * (size + 1)));
        assert_eq!(sample(&page, &of(be, "sessions", "")), Some(1));
    }
    let dropped = of(dead, "dropped_total", ",reason=\"queue_full\"");
    assert_eq!(sample(&page, &dropped), Some(0), "{page}");
    let up = "sluicegate_udp_datagrams_total{service=\"dgram\",direction=\"up\"}";
    assert_eq!(sample(&page, up), Some(3 + 5 + 1), "the service counts all");

    // /stats: the service's and each backend's `udp` (once a frame has been computed since).
    wait_until(SECS(5), "/stats shows the datagrams", || async {
        let stats = get(admin, "/stats").await.json();
        let svc = &stats["services"][0];
        let by_backend = |be: SocketAddr| {
            svc["backends"]
                .as_array()
                .and_then(|all| all.iter().find(|b| b["address"] == be.to_string()))
                .map(|b| b["udp"].clone())
                .unwrap_or_default()
        };
        svc["udp"]["datagrams_up"] == 9
            && svc["udp"]["datagrams_down"] == 8
            && by_backend(a.addr)["datagrams_down"] == 3
            && by_backend(b.addr)["bytes_up"] == 50
            && by_backend(dead)["sessions_ended"]["backend_unreachable"] == 1
    })
    .await;
}
