//! The routing log's copy for a syslog collector (`log.access.syslog`): each line as one RFC 5424
//! message, `<PRI>1 TIMESTAMP HOSTNAME sluicegate PID route - LINE`, over UDP (a datagram each), TCP
//! (RFC 6587 octet counting, `LEN SP MSG`) or a unix datagram socket (`/dev/log`).
//!
//! [`Sender`] is the destination of a `logging` writer thread, behind the same bounded lossy queue as
//! stdout and files: it may wait on the network (a collector that does not read, a connect), never a
//! worker. A line it cannot send is an error its writer counts as dropped (`write_error`). A TCP or
//! unix connection that fails is made again on a later line, after a backoff (100 ms doubling to
//! 5 s) while it keeps failing; lines in between are dropped and counted. A TCP collector that closed
//! is noticed before a line is written to it (a peek), so a restart loses at most what was in
//! flight.

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{Facility, SyslogAddr};

/// RFC 5424's APP-NAME of every message.
const APP_NAME: &str = "sluicegate";
/// RFC 5424's MSGID: the routing log's lines, by their message.
const MSG_ID: &str = "route";
/// Severity `informational`: routing lines are written at INFO.
const SEVERITY: u8 = 6;
/// How long a connect to a TCP collector may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one line may wait for a collector that does not read: then the connection is given up
/// (a frame may be cut) and made again.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before a failed connection is tried again, doubled up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("log.access.syslog {to}: {reason}")]
    Start { to: String, reason: String },
}

/// What every message's header says: the same for the whole process.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    pri: u8,
    hostname: String,
    pid: u32,
}

impl Header {
    fn new(facility: Facility, hostname: &str, pid: u32) -> Header {
        Header {
            pri: facility.code() * 8 + SEVERITY,
            hostname: header_field(hostname, 255),
            pid,
        }
    }

    /// `line` (without its newline) as an RFC 5424 message sent at `ts` (RFC 3339, UTC).
    fn message(&self, ts: &str, line: &str) -> String {
        format!(
            "<{}>1 {ts} {} {APP_NAME} {} {MSG_ID} - {line}",
            self.pri, self.hostname, self.pid
        )
    }
}

/// A header field as RFC 5424 allows it: printable ASCII without spaces, at most `max` bytes, `-`
/// (its NILVALUE) when nothing is left.
fn header_field(s: &str, max: usize) -> String {
    let kept: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if kept.is_empty() {
        "-".into()
    } else {
        kept
    }
}

/// `msg` framed by octet counting (RFC 6587 3.4.1): its length in bytes, a space, the message.
fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 8);
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
    out
}

/// When a connection that failed may be tried again: at once the first time, then after a wait that
/// doubles with each failure in a row, up to [`LAST_RETRY`].
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    fn may_try(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// Another failure at `now`: returns how long until the next try.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = FIRST_RETRY
            .saturating_mul(1 << self.failures.min(16))
            .min(LAST_RETRY);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + wait);
        wait
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    fn left(&self, now: Instant) -> Duration {
        self.retry_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
    }
}

/// A connection to the collector.
enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Unix(UnixDatagram),
}

impl Conn {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        match self {
            Conn::Udp(s) => s.send(msg).map(drop),
            Conn::Unix(s) => s.send(msg).map(drop),
            Conn::Tcp(s) => s.write_all(&octet_counted(msg)),
        }
    }

    /// Whether a TCP collector has closed its end (or reset it): a line written now would be lost
    /// without an error.
    fn closed_by_peer(&self) -> bool {
        let Conn::Tcp(s) = self else { return false };
        let mut byte = [MaybeUninit::uninit()];
        match socket2::SockRef::from(s)
            .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }
}

/// Sends each line written to it to the collector as one message; see the module's doc.
pub(crate) struct Sender {
    to: SyslogAddr,
    header: Header,
    conn: Option<Conn>,
    backoff: Backoff,
}

impl Sender {
    /// A sender to `to`. A name is resolved now (and again at each TCP reconnect): one that does not
    /// resolve is an error, as the start's. TCP and unix connect at the first line.
    pub(crate) fn new(to: &SyslogAddr, facility: Facility) -> Result<Sender, SyslogError> {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut sender = Sender {
            to: to.clone(),
            header: Header::new(facility, hostname.trim(), std::process::id()),
            conn: None,
            backoff: Backoff::default(),
        };
        let start_err = |e: io::Error| SyslogError::Start {
            to: to.to_string(),
            reason: e.to_string(),
        };
        match to {
            SyslogAddr::Udp { .. } => sender.conn = Some(sender.connect().map_err(start_err)?),
            SyslogAddr::Tcp { host, port } => {
                resolve(host, *port).map_err(start_err)?;
            }
            SyslogAddr::Unix(_) => {}
        }
        Ok(sender)
    }

    fn connect(&self) -> io::Result<Conn> {
        match &self.to {
            SyslogAddr::Udp { host, port } => {
                let addr = resolve(host, *port)?[0];
                let any: SocketAddr = match addr {
                    SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                    SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let s = UdpSocket::bind(any)?;
                s.connect(addr)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Ok(Conn::Udp(s))
            }
            SyslogAddr::Tcp { host, port } => {
                let mut last = None;
                for addr in resolve(host, *port)? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| io::Error::other("no address")))
            }
            SyslogAddr::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Ok(Conn::Unix(s))
            }
        }
    }

    /// Sends `msg`, connecting first when there is no connection and the backoff allows.
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let now = Instant::now();
        if self.conn.as_ref().is_some_and(Conn::closed_by_peer) {
            self.conn = None;
        }
        let conn = match &mut self.conn {
            Some(c) => c,
            None if !self.backoff.may_try(now) => {
                let left = self.backoff.left(now);
                return Err(io::Error::other(format!(
                    "{}: not connected, trying again in {left:?}",
                    self.to
                )));
            }
            None => match self.connect() {
                Ok(c) => {
                    self.backoff.succeeded();
                    self.conn.insert(c)
                }
                Err(e) => {
                    let wait = self.backoff.failed(now);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e} (trying again in {wait:?})", self.to),
                    ));
                }
            },
        };
        let udp = matches!(conn, Conn::Udp(_));
        if let Err(e) = conn.send(msg) {
            // A stream may hold half a frame now, and a unix collector may have been restarted
            // on a new socket: both are made again. A UDP socket stays (its error was an ICMP
            // answer to an earlier datagram, or this one's size).
            if !udp {
                self.conn = None;
            }
            return Err(io::Error::new(e.kind(), format!("{}: {e}", self.to)));
        }
        Ok(())
    }
}

impl io::Write for Sender {
    /// `buf` is one formatted line (the writer thread's queue holds whole lines).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        let line = line.trim_end_matches(['\n', '\r']);
        let ts = crate::util::rfc3339(SystemTime::now());
        self.send(self.header.message(&ts, line).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::other(format!("{host} has no address")));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_line_becomes_one_rfc_5424_message() {
        let h = Header::new(Facility::Local0, "lb-1", 4242);
        let m = h.message(
            "2026-11-30T06:41:07.123Z",
            r#"{"msg":"route","end":"client_closed"}"#,
        );
        assert_eq!(
            m,
            r#"<134>1 2026-11-30T06:41:07.123Z lb-1 sluicegate 4242 route - {"msg":"route","end":"client_closed"}"#
        );
        assert_eq!(Header::new(Facility::Kern, "h", 1).pri, 6);
        assert_eq!(Header::new(Facility::Local7, "h", 1).pri, 190);
    }

    #[test]
    fn a_hostname_is_kept_to_what_the_header_allows() {
        assert_eq!(header_field("lb 1\té", 255), "lb1");
        assert_eq!(header_field("", 255), "-");
        assert_eq!(header_field(" \n", 255), "-");
        assert_eq!(header_field(&"h".repeat(300), 255).len(), 255);
    }

    #[test]
    fn octet_counting_counts_bytes() {
        assert_eq!(octet_counted(b"<134>1 x"), b"8 <134>1 x");
        let unicode = "é".as_bytes();
        assert_eq!(octet_counted(unicode), [b"2 ".as_slice(), unicode].concat());
        assert_eq!(octet_counted(b""), b"0 ");
    }

    #[test]
    fn reconnects_back_off_doubling_to_a_bound_and_reset_on_success() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.may_try(t0), "the first try is at once");
        let waits: Vec<Duration> = (0..8).map(|_| b.failed(t0)).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(!b.may_try(t0 + Duration::from_millis(4999)));
        assert!(b.may_try(t0 + LAST_RETRY));
        for _ in 0..100 {
            b.failed(t0);
        }
        assert_eq!(b.failed(t0), LAST_RETRY, "no overflow after many failures");
        b.succeeded();
        assert!(b.may_try(t0));
        assert_eq!(b.failed(t0), FIRST_RETRY);
    }

    /// A unix datagram collector (as `/dev/log`) gets one message per line; one that goes away
    /// fails the line, and one that comes back on the same path gets the lines again.
    #[test]
    fn a_unix_collector_gets_each_line_and_is_found_again_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("sluicegate-syslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let collector = UnixDatagram::bind(&path).unwrap();
        collector
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let to = SyslogAddr::Unix(path.clone());
        let mut sender = Sender::new(&to, Facility::Daemon).unwrap();
        sender.write_all(b"first line\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = collector.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(got.starts_with("<30>1 "), "{got}");
        let pid = format!(" sluicegate {} route - ", std::process::id());
        assert!(got.contains(&pid), "{got}");
        assert!(got.ends_with(" route - first line"), "{got}");
        drop(collector);
        std::fs::remove_file(&path).unwrap();
        assert!(
            sender.write(b"lost\n").is_err(),
            "no collector: an error to count"
        );
        let collector = UnixDatagram::bind(&path).unwrap();
        collector
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Tried again once the backoff allows: bounded by its longest wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sender.write(b"again\n").is_err() {
            assert!(
                Instant::now() < deadline,
                "the collector was not found again"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = collector.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .ends_with(" - again"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_name_that_does_not_resolve_fails_the_start() {
        let to: SyslogAddr = "tcp://no-such-host.invalid:514".parse().unwrap();
        let e = Sender::new(&to, Facility::Local0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("log.access.syslog tcp://no-such-host.invalid:514: "),
            "{e}"
        );
    }
}
