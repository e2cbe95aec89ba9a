//! How the kernel finds a dead peer on one side of a connection: TCP keepalive (`keepalive`,
//! `backend_keepalive`) and TCP_USER_TIMEOUT (`user_timeout`), set on the socket as it is accepted
//! or made, by both data planes. A peer found dead fails the socket with ETIMEDOUT, which
//! `direction_ended` turns into `end: keepalive_timeout` on a side that has these set.
//!
//! Options survive being passed between processes (SCM_RIGHTS moves the socket, not a copy), so a
//! connection carried over at an upgrade keeps what the process that accepted it set.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::{Dur, KeepaliveConfig};

/// What one side's socket is given so that a dead peer is found. `Default`: nothing, and no
/// system call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PeerWatch {
    keepalive: Option<KeepaliveConfig>,
    user_timeout: Option<Duration>,
}

impl PeerWatch {
    /// Nothing set (for tests' constant options).
    #[cfg(test)]
    pub(crate) const NONE: PeerWatch = PeerWatch {
        keepalive: None,
        user_timeout: None,
    };

    pub(crate) fn new(keepalive: Option<KeepaliveConfig>, user_timeout: Option<Dur>) -> PeerWatch {
        PeerWatch {
            keepalive,
            user_timeout: user_timeout.map(|d| d.0),
        }
    }

    /// Whether anything is set: an ETIMEDOUT on such a socket is the peer found dead.
    pub(crate) fn is_set(&self) -> bool {
        self.keepalive.is_some() || self.user_timeout.is_some()
    }

    /// Sets it on `socket`: a system call per option configured, none when nothing is.
    pub(crate) fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        if let Some(k) = &self.keepalive {
            let params = TcpKeepalive::new()
                .with_time(k.idle.0)
                .with_interval(k.interval.0)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(t) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }

    /// [`PeerWatch::apply`], best effort: a connection whose options could not be set still works
    /// (a dead peer then holds it until its `idle_timeout`), so the failure is logged, not fatal.
    pub(crate) fn apply_or_log(&self, socket: SockRef<'_>, side: &'static str) {
        if !self.is_set() {
            return;
        }
        if let Err(error) = self.apply(socket) {
            tracing::debug!(side, %error, "cannot set keepalive or user_timeout");
        }
    }
}

/// Which sides of a connection have a [`PeerWatch`] set: where an ETIMEDOUT means
/// `keepalive_timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Watched {
    pub(crate) client: bool,
    pub(crate) backend: bool,
}

/// Whether `e` is the kernel giving a watched peer up: ETIMEDOUT on a side that has keepalive or
/// user_timeout set (`watched`). Without either an ETIMEDOUT is the retransmissions given up
/// (tcp_retries2), which stays a reset.
pub(crate) fn found_dead(e: &io::Error, watched: bool) -> bool {
    watched && e.raw_os_error() == Some(libc::ETIMEDOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_set_on_the_socket_and_nothing_without_them() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        PeerWatch::default().apply(SockRef::from(&s)).unwrap();
        assert!(!s.keepalive().unwrap());
        let k = KeepaliveConfig {
            idle: Dur::secs(7),
            interval: Dur::secs(3),
            count: 4,
        };
        let w = PeerWatch::new(Some(k), Some(Dur::millis(1500)));
        assert!(w.is_set());
        w.apply(SockRef::from(&s)).unwrap();
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn only_a_watched_sides_etimedout_is_found_dead() {
        let timed_out = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert!(found_dead(&timed_out, true));
        assert!(!found_dead(&timed_out, false));
        assert!(!found_dead(&reset, true));
    }
}
