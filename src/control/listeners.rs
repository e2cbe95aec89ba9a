//! The bound listen addresses and the routes on each. Services name addresses; an address is bound
//! once however many services share it, and its accept loops read one [`Routes`] (which service each
//! client belongs to), swapped as a whole when a reload changes who shares it. An address is bound
//! before anything else changes (a reload that cannot bind changes nothing) and closed once no
//! service names it; the connections it accepted keep going.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::Running;
use crate::config::{Config, ServiceConfig};
use crate::listener::{self, BindError};
use crate::route::{Routes, Table, Unrouted};

/// Which listen address: a configured one, or a service's own ephemeral one (a port 0 is never
/// shared: each such entry is a port of its own, kept across reloads while the entry stays).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum ListenKey {
    Addr(SocketAddr),
    Ephemeral {
        service: String,
        index: usize,
        addr: SocketAddr,
    },
}

impl ListenKey {
    pub(super) fn addr(&self) -> SocketAddr {
        match self {
            ListenKey::Addr(a) | ListenKey::Ephemeral { addr: a, .. } => *a,
        }
    }

    /// The name an upgrade gives its socket: a port-0 address is found again only by it.
    pub(super) fn handover_name(&self) -> Option<String> {
        match self {
            ListenKey::Addr(_) => None,
            ListenKey::Ephemeral { service, index, .. } => Some(format!("{service}#{index}")),
        }
    }

    /// The names a given socket may carry to be this address's (`sockets::take`): its hand-over
    /// name, and the names of the services on it (systemd's `FileDescriptorName=`).
    fn names(&self, config: &Config) -> Vec<String> {
        let mut names: Vec<String> = self.handover_name().into_iter().collect();
        names.extend(
            config
                .services
                .iter()
                .filter(|s| keys_of(s).contains(self))
                .map(|s| s.name.clone()),
        );
        names
    }
}

/// The TCP listen keys of a service, in its order (a UDP service's addresses are `udp`'s).
pub(super) fn keys_of(s: &ServiceConfig) -> Vec<ListenKey> {
    if s.protocol == crate::config::Transport::Udp {
        return Vec::new();
    }
    s.listen
        .addrs()
        .iter()
        .enumerate()
        .map(|(index, a)| {
            if a.port() == 0 {
                ListenKey::Ephemeral {
                    service: s.name.clone(),
                    index,
                    addr: *a,
                }
            } else {
                ListenKey::Addr(*a)
            }
        })
        .collect()
}

/// Every listen key of a config.
pub(super) fn keys(config: &Config) -> BTreeSet<ListenKey> {
    config.services.iter().flat_map(keys_of).collect()
}

/// Which workers accept on a bound address: the tokio workers' accept loops, or the ring workers
/// (its one service is `relay: ring`, [`Routes::on_ring`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acceptors {
    Tokio,
    Ring,
}

impl Acceptors {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Acceptors::Tokio => "tokio",
            Acceptors::Ring => "ring",
        }
    }
}

/// One bound address.
pub(super) struct Bound {
    pub(super) key: ListenKey,
    pub(super) local: SocketAddr,
    /// Bound, its accept loops not started yet.
    pub(super) pending: Option<TcpListener>,
    /// A descriptor of the socket kept for handing it to an upgrade's new process; dropped when
    /// the accept loops stop for good (a drain), or the socket would go on completing handshakes
    /// nobody accepts.
    pub(super) kept: Option<TcpListener>,
    /// Stops its accept loops, which closes it.
    pub(super) stop: CancellationToken,
    /// Which workers accept on it, once they have started.
    pub(super) acceptors: Option<Acceptors>,
    pub(super) routes: Arc<ArcSwap<Routes>>,
    /// Its unrouted connections' counts, kept across the route tables a reload swaps in.
    unrouted: Arc<Unrouted>,
}

/// Binds `key`, for the first service of `config` that names it (for the error).
pub(super) fn bind(key: &ListenKey, config: &Config) -> Result<Bound, BindError> {
    let service = config
        .services
        .iter()
        .find(|s| keys_of(s).contains(key))
        .map_or(String::new(), |s| s.name.clone());
    let err = |error| BindError {
        service: service.clone(),
        addr: key.addr(),
        error,
    };
    let names = key.names(config);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let l = listener::open(key.addr(), &names).map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    let kept = l.try_clone().map_err(err)?;
    let unrouted = Arc::new(Unrouted::default());
    Ok(Bound {
        key: key.clone(),
        local,
        pending: Some(l),
        kept: Some(kept),
        stop: CancellationToken::new(),
        acceptors: None,
        routes: Arc::new(ArcSwap::from_pointee(Routes {
            table: Table::new(Vec::new()),
            accept_proxy: None,
            hello_timeout: Duration::from_secs(5),
            max_pending: crate::config::DEFAULT_MAX_PENDING,
            unrouted: unrouted.clone(),
        })),
        unrouted,
    })
}

/// Binds every key of `keys` not in `bound` yet; on an error nothing new stays bound.
pub(super) fn bind_missing(
    keys: &BTreeSet<ListenKey>,
    bound: &[Bound],
    config: &Config,
) -> Result<Vec<Bound>, BindError> {
    keys.iter()
        .filter(|k| !bound.iter().any(|b| &b.key == *k))
        .map(|k| bind(k, config))
        .collect()
}

impl Bound {
    /// The routes of this address now: the running services that name it, in config order.
    pub(super) fn set_routes(&self, running: &[Running]) {
        let mut routes = Vec::new();
        let mut first: Option<&ServiceConfig> = None;
        for r in running {
            if keys_of(&r.config).contains(&self.key) {
                first.get_or_insert(&r.config);
                routes.push((r.config.route_keys(), r.current.clone()));
            }
        }
        self.routes.store(Arc::new(Routes {
            table: Table::new(routes),
            accept_proxy: first.and_then(|s| s.accept_proxy.clone()),
            hello_timeout: first.map_or(Duration::from_secs(5), |s| s.client_hello_timeout.0),
            max_pending: first.map_or(crate::config::DEFAULT_MAX_PENDING, |s| s.max_pending),
            unrouted: self.unrouted.clone(),
        }));
    }

    /// The names of the services routed here.
    pub(super) fn service_names(&self) -> Vec<Arc<str>> {
        self.routes
            .load()
            .table
            .targets()
            .map(|s| s.load().name.clone())
            .collect()
    }
}

/// The local address of each key, for finding a service's addresses.
pub(super) fn locals(bound: &[Bound]) -> BTreeMap<ListenKey, SocketAddr> {
    bound.iter().map(|b| (b.key.clone(), b.local)).collect()
}
