//! Connecting a client to a backend: pick one (never one already tried, none above its cap), connect,
//! retry elsewhere, wait in the queue when every backend is full; then what goes before the relay
//! (the PROXY header, the TLS handshake with the backend, the bytes read for the route).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::accesslog::Record;
use crate::admission::QueuePlace;
use crate::config::BackendPort;
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::relay;
use crate::service::Service;
use crate::tls::ClientStream;
use crate::util::is_local_exhaustion;

/// A backend connection counted against its backend's cap; when the service has a queue, its end
/// wakes the connections waiting there.
struct BackendSlot {
    active: Option<ActiveGuard>,
    service: Option<Arc<Service>>,
}

impl BackendSlot {
    /// Counts a connection to `backend` from the start of its connect (least-connections depends on
    /// it), unless the backend is at its `max_connections`.
    fn take(service: &Arc<Service>, backend: &Arc<Backend>) -> Option<BackendSlot> {
        let cap = service.caps.cap_of(backend);
        let active = ActiveGuard::within(backend.clone(), cap)?;
        Some(BackendSlot {
            active: Some(active),
            service: (cap.is_some() && service.queue.is_some()).then(|| service.clone()),
        })
    }
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        self.active.take();
        if let Some(s) = &self.service {
            s.occupancy.queue.slot_freed();
        }
    }
}

/// A connected backend: the stream, the slot that counts it as active, and the signal that cuts it.
pub(super) struct Connected {
    pub(super) backend: Arc<Backend>,
    pub(super) stream: BackendStream,
    _active: BackendSlot,
    pub(super) cut: Arc<CutSignal>,
    /// The handshake's last ACK is still held back for the client's first bytes
    /// ([`relay::connect_holding_ack`]): nothing went to the backend before the relay.
    pub(super) ack_held: bool,
}

/// The backend's side of a connection: its socket, or TLS over it (`backend_tls`).
pub(super) enum BackendStream {
    Plain(TcpStream),
    Tls(Box<ClientStream>),
}

impl BackendStream {
    /// Writes `bytes` whole (through the TLS, encrypted) and flushes them.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.write_all(bytes).await,
            BackendStream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }
}

/// What goes to the backend before the relay: in the clear, the PROXY `header`; then (over the TLS,
/// with `backend_tls`) the bytes the client sent first and the route read (`forward`). And the port
/// the client reached, for `backend_port: same`.
pub(super) struct Outbound<'a> {
    pub(super) header: Option<&'a [u8]>,
    pub(super) forward: &'a [u8],
    pub(super) reached_port: Option<u16>,
}

/// Picks and connects, retrying on a backend not yet tried, up to `connect_attempts`, then sends what
/// `out` holds. Nothing of the client's has been relayed yet (what `out` forwards goes to the backend
/// that takes the connection), so a retry can never duplicate data. A backend at its `max_connections` is skipped without an attempt; when every one
/// is, the connection waits in the queue (if the service has one) for one to free up.
pub(super) async fn connect(
    service: &Arc<Service>,
    client: SocketAddr,
    record: &mut Record,
    out: &Outbound<'_>,
) -> Result<Connected, Outcome> {
    let mut tried = Tried::default();
    let mut queued: Option<(QueuePlace, tokio::time::Instant)> = None;
    let connect_start = Instant::now();
    loop {
        // With a queue: armed before looking, so a slot freed between the look and the wait is not
        // missed. Without one, no waiter is registered (it takes the Notify's lock).
        let freed = service
            .queue
            .is_some()
            .then(|| service.occupancy.queue.freed.notified());
        tokio::pin!(freed);
        if let Some(f) = freed.as_mut().as_pin_mut() {
            f.enable();
        }
        let picked = service.pool.snapshot().pick(client, tried.avoid()).cloned();
        if record.attempts == 0 && !tried.any_full() {
            service.note_selection(picked.is_some());
        }
        let Some(backend) = picked else {
            if !tried.any_full() {
                return Err(if record.attempts == 0 {
                    Outcome::NoBackend
                } else {
                    Outcome::ConnectFailed
                });
            }
            // Every backend left is at its cap: wait for one to free a slot, then look at the full
            // ones again.
            wait_in_queue(service, freed.as_mut().as_pin_mut(), &mut queued).await?;
            tried.retry_full();
            continue;
        };
        let Some(slot) = BackendSlot::take(service, &backend) else {
            tried.full(backend.addr);
            continue;
        };
        record.attempts += 1;
        record.backend = Some(backend.addr);
        if let Some(connected) = attempt(service, backend.clone(), slot, out).await {
            record.connect_ms = Some(connect_start.elapsed().as_secs_f64() * 1e3);
            record.backend_name = backend.name();
            tracing::Span::current().record("backend", tracing::field::display(backend.addr));
            return Ok(connected);
        }
        if record.attempts >= service.connect_attempts {
            return Err(Outcome::ConnectFailed);
        }
        tried.failed(backend.addr);
    }
}

/// The backends a connection must not pick again: those whose connect failed, and those found at
/// their cap (which may free a slot, so the queue looks at them again).
#[derive(Debug, Default)]
pub(crate) struct Tried {
    /// The failed ones first, then the `full` ones at the end.
    addrs: Vec<SocketAddr>,
    full: usize,
}

impl Tried {
    pub(crate) fn avoid(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub(crate) fn any_full(&self) -> bool {
        self.full > 0
    }

    pub(crate) fn full(&mut self, addr: SocketAddr) {
        self.addrs.push(addr);
        self.full += 1;
    }

    pub(crate) fn failed(&mut self, addr: SocketAddr) {
        let failed_upto = self.addrs.len() - self.full;
        self.addrs.insert(failed_upto, addr);
    }

    /// Forgets the full ones (one may have a free slot now); the failed ones stay excluded.
    pub(crate) fn retry_full(&mut self) {
        self.addrs.truncate(self.addrs.len() - self.full);
        self.full = 0;
    }
}

/// Waits in the service's queue for a backend slot (`freed`, armed by the caller), joining it first;
/// `Err(BackendsFull)` without a queue, when it is full, or once the connection's wait times out.
async fn wait_in_queue(
    service: &Service,
    freed: Option<Pin<&mut Notified<'_>>>,
    queued: &mut Option<(QueuePlace, tokio::time::Instant)>,
) -> Result<(), Outcome> {
    let (Some(q), Some(freed)) = (service.queue, freed) else {
        return Err(Outcome::BackendsFull);
    };
    if queued.is_none() {
        let place = service
            .occupancy
            .queue
            .join(q.max)
            .ok_or(Outcome::BackendsFull)?;
        *queued = Some((place, tokio::time::Instant::now() + q.timeout.0));
    }
    let until = queued
        .as_ref()
        .map(|(_, t)| *t)
        .unwrap_or_else(tokio::time::Instant::now);
    tokio::select! {
        () = freed => Ok(()),
        () = tokio::time::sleep_until(until) => Err(Outcome::BackendsFull),
    }
}

/// One connect attempt to `backend` (counted in `slot` from its start), then the PROXY `header` in
/// the clear, then, with `backend_tls`, the TLS handshake, then the bytes the client sent first and
/// the route read (`forward`). `None` when it failed, counted against the backend unless the failure
/// was our own exhaustion, the header or the forward (a backend that accepts and closes is not dead);
/// a certificate the backend fails with is a failed connect like any other.
async fn attempt(
    service: &Service,
    backend: Arc<Backend>,
    slot: BackendSlot,
    out: &Outbound<'_>,
) -> Option<Connected> {
    // Taken before connecting, so a cut that happens meanwhile still reaches this session.
    let cut = backend.cut_signal();
    let started = Instant::now();
    let addr = match (service.backend_port, out.reached_port) {
        (BackendPort::Same, Some(port)) => SocketAddr::new(backend.addr.ip(), port),
        _ => backend.addr,
    };
    // Held back only where the relay sends it if the client has sent nothing
    // (`relay::connect_holding_ack`): a plain client, and an engine that starts by copying.
    let hold_ack = service.tls.terminate.is_none() && relay::sends_held_ack(service.relay.mode);
    let mut stream = match tokio::time::timeout(
        service.connect_timeout,
        relay::connect_holding_ack(addr, hold_ack, &service.relay.backend_watch),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if is_local_exhaustion(&e) => {
            // Our own descriptors or ports ran out: not the backend's fault, so no ejection.
            tracing::debug!(backend = %addr, error = %e, "connect failed locally");
            return None;
        }
        result => {
            let why = match result {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            tracing::debug!(backend = %addr, error = %why, "connect failed");
            service.pool.connect_failed(&backend);
            return None;
        }
    };
    // Whatever goes out before the relay carries it.
    let ack_held = hold_ack
        && out.header.is_none()
        && service.tls.originate.is_none()
        && out.forward.is_empty();
    if let Some(h) = out.header {
        if let Err(e) = within(service.connect_timeout, stream.write_all(h)).await {
            tracing::debug!(backend = %addr, error = %e, "sending the PROXY header failed");
            return None;
        }
    }
    let mut stream = match &service.tls.originate {
        None => BackendStream::Plain(stream),
        Some(tls) => {
            let name = tls.name_for(backend.dns_name().as_deref(), addr.ip());
            // Boxed: a plain connection's task need not keep room for a TLS handshake.
            match Box::pin(tls.connect(stream, name)).await {
                Ok(s) => BackendStream::Tls(Box::new(s)),
                Err(e) => {
                    tracing::debug!(backend = %addr, error = %e, "TLS handshake with the backend failed");
                    service.pool.connect_failed(&backend);
                    return None;
                }
            }
        }
    };
    backend.stats.connected(started.elapsed());
    service.pool.connect_succeeded(&backend);
    if !out.forward.is_empty() {
        if let Err(e) = within(service.connect_timeout, stream.send(out.forward)).await {
            tracing::debug!(backend = %addr, error = %e, "forwarding the client's first bytes failed");
            return None;
        }
    }
    Some(Connected {
        backend,
        stream,
        _active: slot,
        cut,
        ack_held,
    })
}

impl Connected {
    /// A backend connection carried in from the process this one replaced: counted as active on
    /// its backend (above its cap if need be: the connection exists already), cut with it. A
    /// backend this config no longer has gets a detached record, so it is relayed all the same.
    pub(super) fn carried(
        service: &Arc<Service>,
        addr: SocketAddr,
        stream: TcpStream,
    ) -> Connected {
        let backend = carried_backend(service, addr);
        let cut = backend.cut_signal();
        let active = ActiveGuard::within(backend.clone(), None);
        Connected {
            backend,
            stream: BackendStream::Plain(stream),
            _active: BackendSlot {
                active,
                service: service.queue.is_some().then(|| service.clone()),
            },
            cut,
            ack_held: false,
        }
    }
}

/// The backend at `addr` a carried-in connection is counted on: the service's, or, when this
/// config no longer has it, a detached record, so the connection is relayed all the same.
pub(crate) fn carried_backend(service: &Service, addr: SocketAddr) -> Arc<Backend> {
    service
        .pool
        .all_backends()
        .into_iter()
        .find(|b| b.addr == addr)
        .unwrap_or_else(|| Arc::new(Backend::new(addr, crate::config::Weight::default())))
}

/// `fut` within `limit`, a timeout being an error like the others.
async fn within<T>(
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A service with one backend at `backend`, capped at one connection, and `queue`.
    fn capped_service(backend: SocketAddr, queue: &str) -> Arc<Service> {
        let yaml = format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    queue: {queue}\n    backends: [{{address: \"{backend}\", max_connections: 1}}]\n"
        );
        let mut cfg = crate::config::Config::from_yaml(&yaml).unwrap();
        let events = crate::events::EventBus::default();
        let tls = crate::tls::ServiceTls::default();
        Arc::new(Service::new(&cfg.services.remove(0), true, tls, &events))
    }

    /// A capped backend's connection ending (its slot dropped) wakes the service's queue on both
    /// data planes: the tokio sessions waiting (`freed`), and what the ring workers set
    /// (`Queue::wake_with`), whose waiting connections would otherwise look again only on their
    /// tick.
    #[test]
    fn a_capped_slots_end_wakes_the_queue_on_both_data_planes() {
        use futures_util::FutureExt;
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

        let backend = SocketAddr::from(([127, 0, 0, 1], 9));
        let service = capped_service(backend, "{max: 8, timeout: 1s}");
        let queue = &service.occupancy.queue;
        let rings = Arc::new(AtomicU64::new(0));
        let told = rings.clone();
        queue.wake_with(|| {
            Arc::new(move || {
                told.fetch_add(1, Relaxed);
            })
        });
        let mut waiting = std::pin::pin!(queue.freed.notified());
        waiting.as_mut().enable();
        let member = service.pool.member(backend).expect("the backend");
        let slot = BackendSlot::take(&service, &member).expect("its one slot is free");
        assert!(
            BackendSlot::take(&service, &member).is_none(),
            "capped at one"
        );
        assert_eq!(rings.load(Relaxed), 0);
        drop(slot);
        assert_eq!(rings.load(Relaxed), 1, "the ring workers are told");
        assert!(
            waiting.now_or_never().is_some(),
            "the tokio waiter is woken"
        );
    }

    /// Under tokio's paused clock: a connection that finds every backend at its cap waits in the
    /// queue and is refused (`backends_full`) at the queue's timeout, not a moment before, without
    /// a connect tried; its place in the queue is given back.
    #[tokio::test(start_paused = true)]
    async fn a_queued_connection_is_refused_at_the_queue_timeout() {
        let ms = std::time::Duration::from_millis;
        let backend = SocketAddr::from(([127, 0, 0, 1], 9));
        let service = capped_service(backend, "{max: 1, timeout: 800ms}");
        let member = service.pool.member(backend).expect("the backend");
        // Its one slot, held throughout: nothing frees it.
        let _held = BackendSlot::take(&service, &member).expect("its one slot is free");
        let client = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut record = Record::new("web".into(), "round_robin", client);
        let out = Outbound {
            header: None,
            forward: b"",
            reached_port: None,
        };
        let t0 = Instant::now();
        let refused = {
            let mut wait = std::pin::pin!(connect(&service, client, &mut record, &out));
            let early = tokio::time::timeout(ms(799), &mut wait).await;
            assert!(early.is_err(), "still waiting just before the timeout");
            assert_eq!(service.occupancy.queue.waiting(), 1, "in the queue");
            tokio::time::timeout(ms(2), wait)
                .await
                .expect("refused at the timeout")
        };
        assert!(matches!(refused, Err(Outcome::BackendsFull)));
        assert_eq!(t0.elapsed(), ms(800));
        assert_eq!(record.attempts, 0, "no connect tried");
        assert_eq!(service.occupancy.queue.waiting(), 0, "its place given back");
    }

    #[test]
    fn tried_keeps_failed_backends_out_and_full_ones_until_the_queue_retries() {
        let a = |i: u8| SocketAddr::from(([127, 0, 0, i], 80));
        let mut t = Tried::default();
        t.full(a(1));
        t.failed(a(2));
        t.full(a(3));
        t.failed(a(4));
        assert!(t.any_full());
        let mut avoid = t.avoid().to_vec();
        avoid.sort();
        assert_eq!(avoid, [a(1), a(2), a(3), a(4)]);
        t.retry_full();
        assert!(!t.any_full());
        assert_eq!(t.avoid(), [a(2), a(4)], "the failed ones stay excluded");
    }

    /// Which connects hold the backend's handshake ACK back for the relay, and tell it so: those
    /// of an engine that starts by copying (`epoll`, `copy`), with nothing to send before the
    /// relay. A PROXY header, bytes a route read or a TLS handshake with the backend go first and
    /// carry the ACK, so the relay must not spend a system call on it. An engine that starts
    /// otherwise (`splice`), or a relay that starts with a TLS handshake with the client
    /// (termination), must not hold it: it would leave a server-first backend waiting 200 ms for
    /// the kernel's delayed-ACK timer. The proxy's kernel counts what it sent: the SYN alone while
    /// the ACK is held, the ACK (or the bytes carrying it) besides otherwise. That timer would send
    /// a held ACK too, so a case that took 150 ms or more from connect to count is run again
    /// (`AckTimerRuns`).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connect_holds_the_backends_ack_only_when_nothing_goes_before_the_relay() {
        let header: &[u8] = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n";
        let terminate = terminating();
        let originate = format!("backend_tls: {{ca: {FIXTURES}/ca.pem}}");
        let cases: [Case; 7] = [
            ("epoll", None, b"", "", true),
            ("copy", None, b"", "", true),
            ("splice", None, b"", "", false),
            ("epoll", Some(header), b"", "", false),
            ("epoll", None, b"routed", "", false),
            ("epoll", None, b"", &terminate, false),
            ("epoll", None, b"", &originate, false),
        ];
        for (mode, header, forward, tls, held) in cases {
            let mut runs = relay::AckTimerRuns::new();
            loop {
                runs.start();
                let (told, sent, _) = connect_and_count(mode, header, forward, tls).await;
                if !runs.in_time(mode) {
                    continue;
                }
                let what = format!(
                    "relay: {mode}, header: {}, forward: {:?}, tls: {tls:?}",
                    header.is_some(),
                    String::from_utf8_lossy(forward)
                );
                assert_eq!(told, held, "{what}: told the relay");
                // Originating, the handshake's own segments follow, however many the kernel
                // coalesces: the count says nothing there.
                if !tls.starts_with("backend_tls") {
                    assert_eq!(sent, if held { 1 } else { 2 }, "{what}: segments sent");
                }
                break;
            }
        }
    }

    /// The committed test PKI (`tests/tls/make.sh`): a CA, and a certificate it signed for
    /// 127.0.0.1.
    #[cfg(target_os = "linux")]
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/engine");

    /// The engine, the PROXY header, the bytes the route read, the service's TLS keys; whether
    /// the ACK is held.
    #[cfg(target_os = "linux")]
    type Case<'a> = (&'a str, Option<&'a [u8]>, &'a [u8], &'a str, bool);

    /// Connects a service of engine `mode` (with the YAML keys `tls`) to a backend of its own
    /// (a TLS server when the service originates), sending `header` and `forward` first: whether
    /// it tells the relay the ACK is held, the segments it sent, and the engine the service runs.
    #[cfg(target_os = "linux")]
    async fn connect_and_count(
        mode: &str,
        header: Option<&[u8]>,
        forward: &[u8],
        tls: &str,
    ) -> (bool, u32, crate::config::RelayMode) {
        use std::os::fd::AsRawFd;

        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (cfg, loaded) = one_service(mode, tls, backend.local_addr().unwrap());
        if loaded.originate.is_some() {
            tokio::spawn(tls_backend(backend));
        }
        let events = crate::events::EventBus::default();
        let service = Arc::new(Service::new(&cfg, true, loaded, &events));
        let client = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut record = Record::new("web".into(), "round_robin", client);
        let out = Outbound {
            header,
            forward,
            reached_port: None,
        };
        let Ok(c) = connect(&service, client, &mut record, &out).await else {
            panic!("{mode}, {tls:?}: the connect failed");
        };
        let fd = match &c.stream {
            BackendStream::Plain(s) => s.as_raw_fd(),
            BackendStream::Tls(s) => s.get_ref().0.as_raw_fd(),
        };
        let sent = relay::tcp_info_fd(fd).unwrap().tcpi_segs_out;
        (c.ack_held, sent, service.relay.mode)
    }

    /// A TLS server on `listener` for one client, with the fixtures' certificate for 127.0.0.1;
    /// it holds the connection open until the client goes.
    #[cfg(target_os = "linux")]
    async fn tls_backend(listener: tokio::net::TcpListener) {
        use tokio::io::AsyncReadExt;

        use crate::tls::Prefixed;

        let (_, loaded) = one_service("epoll", &terminating(), "127.0.0.1:1".parse().unwrap());
        let server = loaded.terminate.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        if let Ok((mut tls, _)) = server.accept(Prefixed::new(Vec::new(), s)).await {
            let _ = tls.read(&mut [0u8; 64]).await;
        }
    }

    /// The `tls` key of a service that terminates with the fixtures' certificate.
    #[cfg(target_os = "linux")]
    fn terminating() -> String {
        format!("tls: {{cert: {FIXTURES}/server-cert.pem, key: {FIXTURES}/server-key.pem}}")
    }

    /// The service of a config of one, of engine `mode`, with the YAML keys `keys` (none when
    /// empty) and `backend`; and its TLS, loaded.
    #[cfg(target_os = "linux")]
    fn one_service(
        mode: &str,
        keys: &str,
        backend: SocketAddr,
    ) -> (crate::config::ServiceConfig, crate::tls::ServiceTls) {
        let keys = if keys.is_empty() {
            String::new()
        } else {
            format!("    {keys}\n")
        };
        let yaml = format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: {mode}\n{keys}    \
             backends: [{{address: \"{backend}\"}}]\n"
        );
        let mut cfg = crate::config::Config::from_yaml(&yaml).unwrap();
        let service = cfg.services.remove(0);
        // The fixtures' key is checked in: a checkout gives it the umask's mode (0644 as a rule).
        let tls = crate::tls::load(0, &service, true).unwrap();
        (service, tls)
    }
}
