//! How a client connection ended: one type for the relay's endings and the refusals before any byte
//! moved. Its names are the routing log's `end` values and the `end` label of
//! `sluicegate_connections_ended_total`, so the log, the counters and the metrics can never disagree.

use std::fmt;

/// How a client connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both directions finished; the client sent its FIN first.
    ClientClosed,
    /// Both directions finished; the backend sent its FIN first.
    BackendClosed,
    /// The client broke the stream (RST, or a write to it failed); passed on to the backend as a reset.
    ClientReset,
    /// The backend broke the stream; passed on to the client as a reset.
    BackendReset,
    /// Silent both ways for `idle_timeout`.
    IdleTimeout,
    /// Half-closed and silent for `half_close_timeout`.
    HalfCloseTimeout,
    /// A destination took no byte for `stall_timeout` while bytes waited for it; both sides reset.
    StallTimeout,
    /// Still open (or still connecting) at `shutdown.drain_timeout`.
    DrainDeadline,
    /// Cut because health checks marked the backend down (`on_down: close`).
    BackendDown,
    /// Cut because the backend left its source (`on_removed: close`, or its drain deadline passed).
    BackendRemoved,
    /// The kernel found a peer dead (its keepalive probes unanswered, or `user_timeout` passed with
    /// bytes unacknowledged: ETIMEDOUT on a side with `keepalive`, `backend_keepalive` or
    /// `user_timeout`); the other side is reset.
    KeepaliveTimeout,
    /// The client sent nothing for `first_byte_timeout` after it was accepted; both sides closed.
    FirstByteTimeout,
    /// Refused: no backend was available.
    NoBackend,
    /// Refused: every connect attempt failed.
    ConnectFailed,
    /// Refused: the service already had `max_connections` open.
    MaxConnections,
    /// Refused: every service together already had the top-level `max_connections` open.
    GlobalMaxConnections,
    /// Refused: every backend was at its `max_connections` (after the queue's wait, if any).
    BackendsFull,
    /// Refused: the client address had `limits.per_source_connections` open, or exceeded
    /// `limits.per_source_rate`.
    SourceLimit,
    /// Refused: the client address is in `limits.deny`, or outside `limits.allow`.
    Denied,
    /// Closed: `accept_proxy` is on and the connection came from outside `from`, or sent a malformed
    /// or truncated header, or none within the timeout.
    ProxyHeader,
    /// Closed: on a shared address, no service takes this client (no name matched, no default).
    NoRoute,
    /// Closed: on a routed address, the first bytes began a TLS ClientHello that was malformed,
    /// larger than 16 KiB, or not whole within `client_hello_timeout`.
    TlsHello,
    /// Closed: the TLS handshake with the client failed (protocol error, no shared version or cipher,
    /// timeout).
    TlsHandshake,
    /// Closed: `tls.client_ca` requires a client certificate and none, or one it did not sign (or one
    /// `tls.client_crl` revokes), came.
    TlsClientCert,
    /// Closed at once: on a shared address, `max_pending` connections were already waiting for
    /// their route.
    PendingFull,
    /// Ended by an operator (`DELETE /connections`): both sides reset, or sent a FIN if asked.
    Killed,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`].
    pub const ALL: [Outcome; 26] = [
        Outcome::ClientClosed,
        Outcome::BackendClosed,
        Outcome::ClientReset,
        Outcome::BackendReset,
        Outcome::IdleTimeout,
        Outcome::HalfCloseTimeout,
        Outcome::StallTimeout,
        Outcome::DrainDeadline,
        Outcome::BackendDown,
        Outcome::BackendRemoved,
        Outcome::KeepaliveTimeout,
        Outcome::FirstByteTimeout,
        Outcome::NoBackend,
        Outcome::ConnectFailed,
        Outcome::MaxConnections,
        Outcome::GlobalMaxConnections,
        Outcome::BackendsFull,
        Outcome::SourceLimit,
        Outcome::Denied,
        Outcome::ProxyHeader,
        Outcome::NoRoute,
        Outcome::TlsHello,
        Outcome::TlsHandshake,
        Outcome::TlsClientCert,
        Outcome::PendingFull,
        Outcome::Killed,
    ];

    /// Position in [`Outcome::ALL`], for per-outcome counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The routing log's `end` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ClientClosed => "client_closed",
            Outcome::BackendClosed => "backend_closed",
            Outcome::ClientReset => "client_reset",
            Outcome::BackendReset => "backend_reset",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::HalfCloseTimeout => "half_close_timeout",
            Outcome::StallTimeout => "stall_timeout",
            Outcome::DrainDeadline => "drain_deadline",
            Outcome::BackendDown => "backend_down",
            Outcome::BackendRemoved => "backend_removed",
            Outcome::KeepaliveTimeout => "keepalive_timeout",
            Outcome::FirstByteTimeout => "first_byte_timeout",
            Outcome::NoBackend => "no_backend",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::MaxConnections => "max_connections",
            Outcome::GlobalMaxConnections => "global_max_connections",
            Outcome::BackendsFull => "backends_full",
            Outcome::SourceLimit => "source_limit",
            Outcome::Denied => "denied",
            Outcome::ProxyHeader => "proxy_header",
            Outcome::NoRoute => "no_route",
            Outcome::TlsHello => "tls_hello",
            Outcome::TlsHandshake => "tls_handshake",
            Outcome::TlsClientCert => "tls_client_cert",
            Outcome::PendingFull => "pending_full",
            Outcome::Killed => "killed",
        }
    }

    /// Whether the connection was refused before a backend connection carried any byte.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Outcome::NoBackend
                | Outcome::ConnectFailed
                | Outcome::MaxConnections
                | Outcome::GlobalMaxConnections
                | Outcome::BackendsFull
                | Outcome::SourceLimit
                | Outcome::Denied
                | Outcome::ProxyHeader
                | Outcome::NoRoute
                | Outcome::TlsHello
                | Outcome::TlsHandshake
                | Outcome::TlsClientCert
                | Outcome::PendingFull
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn indices_follow_all_and_names_are_distinct() {
        for (i, e) in Outcome::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{e:?}");
        }
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Outcome::ALL.len());
    }

    /// docs/configuration.md's table of `end` values names every outcome, and nothing else.
    #[test]
    fn the_docs_table_of_end_values_is_every_outcome() {
        let mut documented: Vec<String> =
            crate::util::doc_table("configuration.md", "| `end` | meaning |")
                .iter()
                .flat_map(|row| {
                    row[0]
                        .split(", ")
                        .map(|n| n.trim_matches('`').to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
        documented.sort();
        let mut names: Vec<String> = Outcome::ALL.iter().map(|o| o.as_str().into()).collect();
        names.sort();
        assert_eq!(documented, names);
    }
}
