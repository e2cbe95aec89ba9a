//! Listening sockets this process was given instead of binding them: by the process it replaces
//! (an upgrade, `upgrade`) or by systemd (socket activation, `LISTEN_FDS`). Binding a service's or
//! the admin API's address takes a matching one from here first, so the socket (and every connection
//! waiting in its accept queue) outlives the process that bound it.
//!
//! A socket matches by the address it is bound to, or by its name: the name systemd gives it
//! (`FileDescriptorName=`, in `LISTEN_FDNAMES`) may be a service's name or `admin`; an upgrade names
//! a port-0 address `SERVICE#INDEX`, which is the only way to find it again.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::Mutex;

/// One socket given to this process and not taken yet.
#[derive(Debug)]
pub struct Given {
    pub name: Option<String>,
    pub local: SocketAddr,
    pub socket: TcpListener,
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

/// Offers `socket` for a later [`take`]. It is made close-on-exec (an upgrade passes it on
/// explicitly, never by inheritance) and non-blocking.
pub fn offer(name: Option<String>, socket: TcpListener) -> std::io::Result<SocketAddr> {
    let local = socket.local_addr()?;
    rustix::io::fcntl_setfd(socket.as_fd(), rustix::io::FdFlags::CLOEXEC)?;
    socket.set_nonblocking(true)?;
    given().push(Given {
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
        offer(name, socket).map_err(|error| GivenError::NotTcp {
            from: "systemd (LISTEN_FDS)",
            index,
            error,
        })?;
    }
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    Ok(n)
}

/// Takes the given socket for `addr`: one bound to exactly `addr`, else one named any of `names`
/// (whose bound address must then be `addr`, or `addr` must have port 0: a name never moves a
/// service to another port than its config says).
pub(crate) fn take(addr: SocketAddr, names: &[&str]) -> Option<TcpListener> {
    let mut given = given();
    let at = given.iter().position(|g| g.local == addr).or_else(|| {
        given.iter().position(|g| {
            g.name.as_deref().is_some_and(|n| names.contains(&n))
                && (addr.port() == 0 || g.local.port() == addr.port())
        })
    })?;
    Some(given.swap_remove(at).socket)
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

    #[test]
    fn a_socket_is_taken_by_address_or_by_name_and_only_once() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (la, lb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        offer(None, a).unwrap();
        offer(Some("sockets-test#0".into()), b).unwrap();
        // By address.
        let got = take(la, &[]).unwrap();
        assert_eq!(got.local_addr().unwrap(), la);
        assert!(take(la, &[]).is_none(), "taken once");
        // A name on another configured port is not this socket.
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], lb.port().wrapping_add(1).max(1)));
        assert!(take(elsewhere, &["sockets-test#0"]).is_none());
        // By name, for a port-0 address.
        let got = take(
            "127.0.0.1:0".parse().unwrap(),
            &["sockets-test", "sockets-test#0"],
        )
        .unwrap();
        assert_eq!(got.local_addr().unwrap(), lb);
        assert!(leftover().is_empty());
    }
}
