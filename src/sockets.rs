//! Listening sockets this process was given instead of binding them: by the process it replaces
//! (an upgrade, `upgrade`) or by systemd (socket activation, `LISTEN_FDS`). Binding a service's or
//! the admin API's address takes a matching one from here first, so the socket (and every connection
//! waiting in its accept queue) outlives the process that bound it.
//!
//! A socket is used only at the address it is bound to, exactly: the config says which addresses
//! accept, and every rule about an address (the admin token's, "a non-loopback address needs a
//! token") was checked against the config. A name finds a socket only for a port-0 address (on the
//! same IP): the name systemd gives it (`FileDescriptorName=`, in `LISTEN_FDNAMES`) may be a
//! service's name or `admin`; an upgrade names a port-0 address `SERVICE#INDEX`, which is the only
//! way to find it again. A socket on the configured port but at another address ([`choose`]) is
//! never used: systemd's, named for the address, is closed and the address bound; an upgrade's
//! makes the new process refuse ([`ListenChanged`]), as only a restart can move it.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

/// Who gave a socket: what a socket at another address than the config's means depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Giver {
    /// The process this one replaces: its sockets are open there too, serving until it hands over.
    Upgrade,
    /// systemd (`LISTEN_FDS`): the socket is this process's to use or close.
    Systemd,
}

/// A listening TCP socket, or a UDP one (a `protocol: udp` service's).
#[derive(Debug)]
pub enum Listening {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listening {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listening::Tcp(l) => l.local_addr(),
            Listening::Udp(u) => u.local_addr(),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listening::Tcp(l) => l.as_fd(),
            Listening::Udp(u) => u.as_fd(),
        }
    }

    fn is_udp(&self) -> bool {
        matches!(self, Listening::Udp(_))
    }

    /// The socket a descriptor handed over is: a datagram socket is a UDP service's, any other
    /// a listening TCP one.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Listening {
        match socket2::SockRef::from(&fd).r#type() {
            Ok(t) if t == socket2::Type::DGRAM => Listening::Udp(UdpSocket::from(fd)),
            _ => Listening::Tcp(TcpListener::from(fd)),
        }
    }
}

/// One socket given to this process and not taken yet.
#[derive(Debug)]
pub struct Given {
    pub giver: Giver,
    pub name: Option<String>,
    pub local: SocketAddr,
    pub socket: Listening,
}

static GIVEN: Mutex<Vec<Given>> = Mutex::new(Vec::new());

fn given() -> std::sync::MutexGuard<'static, Vec<Given>> {
    GIVEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an inherited descriptor cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GivenError {
    #[error("descriptor {index} from {from} is not a listening TCP socket: {error}")]
    NotTcp {
        from: &'static str,
        index: usize,
        error: std::io::Error,
    },
}

/// Offers `socket`, handed over by the process this one replaces, for a later [`take`] (or
/// [`take_udp`]).
pub fn offer(name: Option<String>, socket: Listening) -> std::io::Result<SocketAddr> {
    offer_from(Giver::Upgrade, name, socket)
}

/// Offers `socket` for a later [`take`]. It is made close-on-exec (an upgrade passes it on
/// explicitly, never by inheritance) and non-blocking.
fn offer_from(
    giver: Giver,
    name: Option<String>,
    socket: Listening,
) -> std::io::Result<SocketAddr> {
    let local = socket.local_addr()?;
    rustix::io::fcntl_setfd(socket.as_fd(), rustix::io::FdFlags::CLOEXEC)?;
    match &socket {
        Listening::Tcp(l) => l.set_nonblocking(true)?,
        Listening::Udp(u) => u.set_nonblocking(true)?,
    }
    given().push(Given {
        giver,
        name,
        local,
        socket,
    });
    Ok(local)
}

/// The sockets systemd passed (`LISTEN_PID` is this process, `LISTEN_FDS` of them from descriptor 3,
/// named by `LISTEN_FDNAMES`), offered for [`take`]; the variables are removed so that no process
/// started later (an upgrade's) takes them for its own. Returns how many were offered.
pub fn adopt_systemd() -> Result<usize, GivenError> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let n = fds.len();
    for index in 0..n {
        let socket = match fds.take_tcp_listener(index) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(error) => {
                return Err(GivenError::NotTcp {
                    from: "systemd (LISTEN_FDS)",
                    index,
                    error,
                })
            }
        };
        // systemd names an unnamed socket after its unit ("sluicegate.socket"): not a name of ours.
        let name = names
            .get(index)
            .filter(|n| !n.is_empty() && !n.ends_with(".socket"))
            .cloned();
        offer_from(Giver::Systemd, name, Listening::Tcp(socket)).map_err(|error| {
            GivenError::NotTcp {
                from: "systemd (LISTEN_FDS)",
                index,
                error,
            }
        })?;
    }
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    Ok(n)
}

/// An upgrade's new process cannot serve its config: the old process has a socket on a configured
/// port at another address (a narrower or wider one), which stays open until the hand-over, so the
/// configured address can be neither taken (it is not the config's) nor bound (it is in use).
#[derive(Debug, thiserror::Error)]
#[error(
    "listen changed: restart needed: the old process listens on {given}, another address on this \
     port; an upgrade keeps listening sockets as they are (restart to move it, or keep {given})"
)]
pub struct ListenChanged {
    pub given: SocketAddr,
}

/// What [`choose`] sees of a given socket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offered<'a> {
    pub giver: Giver,
    pub name: Option<&'a str>,
    pub local: SocketAddr,
}

/// What to do for one configured address, with the sockets given so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Use the given socket at this index.
    Take(usize),
    /// Bind the address, after closing these given sockets (systemd's, named for the address but
    /// bound to another on its port: not used, and in the bind's way).
    Bind { close: Vec<usize> },
    /// Refuse to start (an upgrade's socket at another address on this port: [`ListenChanged`]).
    Refuse { given: SocketAddr },
}

/// The one decision of [`take`]: a socket bound to exactly `addr`; for a port-0 `addr`, one named
/// any of `names` on the same IP (its port is the one chosen when it was bound). A socket on the
/// port at another address whose listening would overlap `addr`'s is never used ([`overlaps`]).
pub(crate) fn choose(addr: SocketAddr, names: &[&str], given: &[Offered<'_>]) -> Choice {
    let exact = |g: &Offered<'_>| g.local.ip() == addr.ip() && g.local.port() == addr.port();
    let named = |g: &Offered<'_>| g.name.is_some_and(|n| names.contains(&n));
    if addr.port() != 0 {
        if let Some(i) = given.iter().position(exact) {
            return Choice::Take(i);
        }
    } else if let Some(i) = given
        .iter()
        .position(|g| named(g) && g.local.ip() == addr.ip())
    {
        return Choice::Take(i);
    }
    if let Some(g) = given
        .iter()
        .find(|g| g.giver == Giver::Upgrade && overlaps(g.local, addr))
    {
        return Choice::Refuse { given: g.local };
    }
    let close = given
        .iter()
        .enumerate()
        .filter(|(_, g)| g.giver == Giver::Systemd && named(g) && overlaps(g.local, addr))
        .map(|(i, _)| i)
        .collect();
    Choice::Bind { close }
}

/// Whether sockets at `a` and `b` are two different addresses that cannot both listen: one port
/// (not 0), one IP the unspecified address of its family (an IPv6 `[::]` may take IPv4 too).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let wide = |x: SocketAddr, y: SocketAddr| {
        x.ip().is_unspecified() && (x.is_ipv4() == y.is_ipv4() || x.is_ipv6())
    };
    a.port() != 0 && a.port() == b.port() && a.ip() != b.ip() && (wide(a, b) || wide(b, a))
}

/// Takes the given TCP socket for `addr` ([`choose`]): `None` when the address is to be bound,
/// after closing (with a warning naming both addresses) the systemd sockets named for it that are
/// bound elsewhere on its port.
pub(crate) fn take(addr: SocketAddr, names: &[&str]) -> Result<Option<TcpListener>, ListenChanged> {
    match take_of(false, addr, names)? {
        Some(Listening::Tcp(l)) => Ok(Some(l)),
        _ => Ok(None),
    }
}

/// The same for a UDP service's address: only datagram sockets are looked at, so a TCP and a UDP
/// service may listen on one port.
pub(crate) fn take_udp(
    addr: SocketAddr,
    names: &[&str],
) -> Result<Option<UdpSocket>, ListenChanged> {
    match take_of(true, addr, names)? {
        Some(Listening::Udp(u)) => Ok(Some(u)),
        _ => Ok(None),
    }
}

fn take_of(
    udp: bool,
    addr: SocketAddr,
    names: &[&str],
) -> Result<Option<Listening>, ListenChanged> {
    let mut given = given();
    // Indices into `given` of the sockets of this kind, in order.
    let of_kind: Vec<usize> = (0..given.len())
        .filter(|&i| given[i].socket.is_udp() == udp)
        .collect();
    let offered: Vec<Offered<'_>> = of_kind
        .iter()
        .map(|&i| Offered {
            giver: given[i].giver,
            name: given[i].name.as_deref(),
            local: given[i].local,
        })
        .collect();
    match choose(addr, names, &offered) {
        Choice::Take(i) => Ok(Some(given.swap_remove(of_kind[i]).socket)),
        Choice::Refuse { given } => Err(ListenChanged { given }),
        Choice::Bind { close } => {
            let mut close: Vec<usize> = close.into_iter().map(|i| of_kind[i]).collect();
            // From the highest index down, so that each removal leaves the others' indices.
            close.sort_unstable();
            for i in close.into_iter().rev() {
                let g = given.remove(i);
                tracing::warn!(listen = %addr, given = %g.local, name = g.name.as_deref(),
                    "a socket systemd passed for this address is bound to another: not used, closed; binding the configured address");
            }
            Ok(None)
        }
    }
}

/// The sockets no service or admin API took, closed: called once every address is bound.
pub fn leftover() -> Vec<(Option<String>, SocketAddr)> {
    given()
        .drain(..)
        .map(|g| (g.name, g.local))
        .collect::<Vec<_>>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Giver::{Systemd, Upgrade};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every rule of [`choose`], one row each: the configured address and the names it answers
    /// to, the sockets given, and what is done.
    #[test]
    fn a_given_socket_is_used_only_at_its_exact_address() {
        let web = &["web", "web#0"][..];
        type Row<'a> = (
            &'a str,
            &'a [&'a str],
            &'a [(Giver, Option<&'a str>, &'a str)],
            Choice,
        );
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // Exactly the address, named or not, from either giver.
            ("127.0.0.1:80", web, &[(Systemd, None, "127.0.0.1:80")], Choice::Take(0)),
            ("127.0.0.1:80", web, &[(Upgrade, None, "127.0.0.1:80")], Choice::Take(0)),
            ("127.0.0.1:80", web, &[(Systemd, Some("other"), "127.0.0.1:80")], Choice::Take(0)),
            ("[::1]:80", web, &[(Upgrade, None, "127.0.0.1:80"), (Upgrade, None, "[::1]:80")], Choice::Take(1)),
            // The exact one wins over one of the same name bound wider.
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "0.0.0.0:81"), (Systemd, None, "127.0.0.1:80")], Choice::Take(1)),
            // The issue: systemd's socket named for the address, on its port, wider: closed, bound.
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "0.0.0.0:80")], Choice::Bind { close: vec![0] }),
            ("127.0.0.1:80", &["admin"], &[(Systemd, Some("admin"), "0.0.0.0:80")], Choice::Bind { close: vec![0] }),
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "[::]:80")], Choice::Bind { close: vec![0] }),
            // Narrower than the config: not used either (the config is what accepts).
            ("0.0.0.0:80", web, &[(Systemd, Some("web"), "127.0.0.1:80")], Choice::Bind { close: vec![0] }),
            // Another specific address on the port, or another port: not in the way, left alone
            // (another address of the config may be its own; else it is closed as left over).
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "127.0.0.2:80")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "127.0.0.1:81")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:80", web, &[(Systemd, Some("web"), "[::1]:80")], Choice::Bind { close: vec![] }),
            ("[::1]:80", web, &[(Systemd, Some("web"), "0.0.0.0:80")], Choice::Bind { close: vec![] }),
            // Not named for it: not systemd's socket for this address (the bind says if it is in the way).
            ("127.0.0.1:80", web, &[(Systemd, None, "0.0.0.0:80")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:80", web, &[(Systemd, Some("api"), "0.0.0.0:80")], Choice::Bind { close: vec![] }),
            // An upgrade's socket in the way, named or not: refused, the old process serves on.
            ("127.0.0.1:80", &["admin"], &[(Upgrade, Some("admin"), "0.0.0.0:80")], Choice::Refuse { given: a("0.0.0.0:80") }),
            ("127.0.0.1:80", web, &[(Upgrade, None, "0.0.0.0:80")], Choice::Refuse { given: a("0.0.0.0:80") }),
            ("0.0.0.0:80", web, &[(Upgrade, None, "127.0.0.1:80")], Choice::Refuse { given: a("127.0.0.1:80") }),
            ("127.0.0.1:80", web, &[(Upgrade, None, "[::]:80")], Choice::Refuse { given: a("[::]:80") }),
            // An upgrade's socket elsewhere: the new address is bound beside it.
            ("127.0.0.2:80", web, &[(Upgrade, None, "127.0.0.1:80")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:8080", &["admin"], &[(Upgrade, Some("admin"), "0.0.0.0:80")], Choice::Bind { close: vec![] }),
            // Port 0: the name finds it, on the same IP only, whatever its port.
            ("127.0.0.1:0", web, &[(Upgrade, Some("web#0"), "127.0.0.1:41000")], Choice::Take(0)),
            ("127.0.0.1:0", web, &[(Systemd, Some("web"), "127.0.0.1:41000")], Choice::Take(0)),
            ("127.0.0.1:0", web, &[(Upgrade, Some("web#0"), "0.0.0.0:41000")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:0", web, &[(Systemd, Some("web"), "0.0.0.0:41000")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:0", web, &[(Upgrade, Some("api#0"), "127.0.0.1:41000")], Choice::Bind { close: vec![] }),
            ("127.0.0.1:0", web, &[], Choice::Bind { close: vec![] }),
        ];
        for (addr, names, given, want) in rows {
            let offered: Vec<Offered<'_>> = given
                .iter()
                .map(|&(giver, name, local)| Offered {
                    giver,
                    name,
                    local: a(local),
                })
                .collect();
            assert_eq!(
                &choose(a(addr), names, &offered),
                want,
                "{addr} {names:?} given {given:?}"
            );
        }
    }

    #[test]
    fn a_socket_is_taken_by_address_or_by_name_and_only_once() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (la, lb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        offer(None, Listening::Tcp(a)).unwrap();
        offer(Some("sockets-test#0".into()), Listening::Tcp(b)).unwrap();
        // By address.
        let got = take(la, &[]).unwrap().unwrap();
        assert_eq!(got.local_addr().unwrap(), la);
        assert!(take(la, &[]).unwrap().is_none(), "taken once");
        // A name on another configured port is not this socket.
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], lb.port().wrapping_add(1).max(1)));
        assert!(take(elsewhere, &["sockets-test#0"]).unwrap().is_none());
        // By name, for a port-0 address.
        let got = take(
            "127.0.0.1:0".parse().unwrap(),
            &["sockets-test", "sockets-test#0"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.local_addr().unwrap(), lb);
        // A UDP socket on the port of a TCP one: each kind is taken only for its own. (In this
        // test, as the given sockets are the process's: tests run at once.)
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let lt = t.local_addr().unwrap();
        let u = UdpSocket::bind(lt).unwrap();
        let tcp = Listening::from_fd(std::os::fd::OwnedFd::from(t));
        let udp = Listening::from_fd(std::os::fd::OwnedFd::from(u));
        assert!(!tcp.is_udp() && udp.is_udp(), "told apart by SO_TYPE");
        offer(None, udp).unwrap();
        assert!(
            take(lt, &[]).unwrap().is_none(),
            "no TCP socket given there"
        );
        offer(None, tcp).unwrap();
        assert_eq!(take(lt, &[]).unwrap().unwrap().local_addr().unwrap(), lt);
        assert_eq!(
            take_udp(lt, &[]).unwrap().unwrap().local_addr().unwrap(),
            lt
        );
        assert!(leftover().is_empty());
    }
}
