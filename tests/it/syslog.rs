//! The routing log to a syslog collector (docs/configuration.md "Syslog"): `log.access.syslog` over
//! UDP and TCP, each line an RFC 5424 message with the JSON line as its MSG; a TCP collector that
//! restarts gets the lines again, and one that reads nothing stalls no connection (its copy is
//! dropped and counted).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::cli::{dropped_lines, round_trips, Sg};
use crate::common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// One service `t` in front of `backend`, JSON logs, the routing log only to the collector `to`.
fn yaml(to: &str, backend: SocketAddr, buffer_lines: u32) -> String {
    format!(
        "log: {{level: info, format: json, buffer_lines: {buffer_lines}, access: {{to: off, syslog: \"{to}\"}}}}\nadmin: {{listen: 127.0.0.1:0}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: copy\n    backends: [{{address: \"{backend}\"}}]\n"
    )
}

fn admin_of(sg: &mut Sg) -> SocketAddr {
    let l = sg.wait_line(SECS(20), |l| l["msg"] == "admin API listening");
    l["listen"].as_str().unwrap().parse().unwrap()
}

/// An RFC 5424 message as sluicegate writes it: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID -
/// MSG`, the MSG a JSON routing line.
#[derive(Debug)]
struct Message {
    pri: u32,
    procid: String,
    msgid: String,
    line: Value,
}

fn parse(msg: &[u8]) -> Message {
    let text = std::str::from_utf8(msg).expect("UTF-8");
    let (pri, rest) = text
        .strip_prefix('<')
        .and_then(|t| t.split_once('>'))
        .unwrap_or_else(|| panic!("no PRI: {text}"));
    let f: Vec<&str> = rest.splitn(7, ' ').collect();
    assert_eq!(f.len(), 7, "seven fields after PRI: {text}");
    assert_eq!(f[0], "1", "version 1: {text}");
    assert!(
        f[1].len() >= 20 && f[1].ends_with('Z') && f[1].as_bytes()[10] == b'T',
        "an RFC 3339 UTC timestamp: {text}"
    );
    assert!(!f[2].is_empty() && f[2].bytes().all(|b| b.is_ascii_graphic()));
    assert_eq!(f[3], "sluicegate", "APP-NAME: {text}");
    let msg = f[6]
        .strip_prefix("- ")
        .unwrap_or_else(|| panic!("no structured data (-): {text}"));
    assert!(!msg.ends_with('\n'), "MSG without the line's newline");
    Message {
        pri: pri.parse().expect("PRI a number"),
        procid: f[4].to_string(),
        msgid: f[5].to_string(),
        line: serde_json::from_str(msg).unwrap_or_else(|e| panic!("MSG not JSON ({e}): {msg}")),
    }
}

/// A routing line of service `t`'s echo round trips, by sluicegate `pid`, facility local0.
fn assert_routing_message(m: &Message, pid: i32) {
    assert_eq!(m.pri, 16 * 8 + 6, "local0.info");
    assert_eq!(m.procid, pid.to_string());
    assert_eq!(m.msgid, "route");
    assert_eq!(m.line["target"], "sluicegate::route", "{:?}", m.line);
    assert_eq!(m.line["service"], "t", "{:?}", m.line);
    assert_eq!(m.line["event"], "end", "{:?}", m.line);
    assert!(m.line["end"].is_string(), "{:?}", m.line);
    assert_eq!(m.line["bytes_up"], 4, "{:?}", m.line);
}

/// Reads RFC 6587 octet-counted frames (`LEN SP MSG`) from a collector's connection.
struct Frames(BufReader<TcpStream>);

impl Frames {
    async fn next(&mut self) -> std::io::Result<Vec<u8>> {
        let mut len = Vec::new();
        self.0.read_until(b' ', &mut len).await?;
        let len = std::str::from_utf8(&len)
            .ok()
            .and_then(|l| l.strip_suffix(' '))
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("not an octet count: {len:?}"));
        assert!(len < 64 * 1024, "a frame of {len} bytes");
        let mut msg = vec![0; len];
        self.0.read_exact(&mut msg).await?;
        Ok(msg)
    }
}

/// A listener on `addr` that may take a port just closed (its old connection in TIME_WAIT).
fn collector_on(addr: SocketAddr) -> TcpListener {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_lines_reach_a_udp_collector() {
    let collector = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let to = format!("udp://{}", collector.local_addr().unwrap());
    let sg = Sg::start(&yaml(&to, backend.addr, 8192));
    for _ in 0..3 {
        assert_eq!(round_trip(sg.addr, b"ping").await.unwrap(), b"ping");
    }
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        let n = within(SECS(10), "a datagram", collector.recv(&mut buf))
            .await
            .unwrap();
        assert_routing_message(&parse(&buf[..n]), sg.pid());
    }
}

/// The collector goes away (its listener and connection closed) and comes back on the same port:
/// lines while it is away are counted as dropped, and lines come again once sluicegate has
/// connected again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_lines_reach_a_tcp_collector_and_resume_after_it_restarts() {
    let listener = collector_on("127.0.0.1:0".parse().unwrap());
    let at = listener.local_addr().unwrap();
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let mut sg = Sg::start(&yaml(&format!("tcp://{at}"), backend.addr, 8192));
    let admin = admin_of(&mut sg);
    assert_eq!(round_trip(sg.addr, b"ping").await.unwrap(), b"ping");
    let (conn, _) = within(SECS(10), "sluicegate connects", listener.accept())
        .await
        .unwrap();
    let mut frames = Frames(BufReader::new(conn));
    let frame = within(SECS(10), "a frame", frames.next()).await.unwrap();
    assert_routing_message(&parse(&frame), sg.pid());

    // The collector stops: what comes meanwhile cannot be sent, and is counted.
    drop((frames, listener));
    round_trips(sg.addr, 5, 1).await;
    wait_until(
        SECS(10),
        "lines to the stopped collector counted",
        || async { dropped_lines(admin, "syslog", "write_error").await > 0 },
    )
    .await;

    // It starts again on the same port: sluicegate connects again at a later line (its backoff is
    // at most 5 s), while traffic goes on.
    let listener = collector_on(at);
    let stop = CancellationToken::new();
    let traffic = tokio::spawn({
        let (stop, addr) = (stop.clone(), sg.addr);
        async move {
            while !stop.is_cancelled() {
                round_trips(addr, 1, 1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let (conn, _) = within(SECS(30), "sluicegate connects again", listener.accept())
        .await
        .unwrap();
    let mut frames = Frames(BufReader::new(conn));
    let frame = within(SECS(10), "a frame after the restart", frames.next())
        .await
        .unwrap();
    assert_routing_message(&parse(&frame), sg.pid());
    stop.cancel();
    traffic.await.unwrap();
}

/// reliability.md `log-syslog-stalled`: a TCP collector that never accepts nor reads (its
/// connections wait in the listen queue, their window closed) stalls no connection: the syslog
/// copy's queue fills and its lines are dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_does_not_read_stalls_no_connection() {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small window: sluicegate's socket buffers fill after a few lines.
    s.set_recv_buffer_size(4096).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(4).unwrap();
    let at = s.local_addr().unwrap().as_socket().unwrap();
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let mut sg = Sg::start(&yaml(&format!("tcp://{at}"), backend.addr, 16));
    let admin = admin_of(&mut sg);
    within(
        SECS(60),
        "3,000 round trips while the collector reads nothing",
        round_trips(sg.addr, 3000, 16),
    )
    .await;
    wait_until(
        SECS(10),
        "the syslog copy's lines dropped and counted",
        || async { dropped_lines(admin, "syslog", "queue_full").await > 0 },
    )
    .await;
    drop(s);
}
