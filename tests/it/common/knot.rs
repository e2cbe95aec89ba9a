//! A real authoritative DNS server, Debian's `knotd` (package `knot`), and a real client, `dig`
//! (package `bind9-dnsutils`), for the UDP tests. Each server is started by the test on an
//! ephemeral port of 127.0.0.1 with a one-record zone written into a directory of its own, and
//! stopped (by its own process id) when dropped. Without the tools installed the caller skips,
//! saying so loudly, unless `SLUICEGATE_REQUIRE_KNOT=1` / `SLUICEGATE_REQUIRE_DIG=1` (CI) makes
//! that a failure.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::databases::{runs, scratch, stop_child};

/// The zone every server of these tests serves, and the one name in it that differs between them.
pub const ZONE: &str = "sluicegate.test";
pub const NAME: &str = "who.sluicegate.test";

/// `knotd` on PATH, else where Debian installs it (`/usr/sbin` is not on every user's PATH).
fn knotd() -> Option<PathBuf> {
    [PathBuf::from("knotd"), PathBuf::from("/usr/sbin/knotd")]
        .into_iter()
        .find(|p| runs(p, "--version"))
}

/// A `knotd` of this test answering `NAME A` with its own address.
pub struct Knot {
    pub addr: SocketAddr,
    /// The address of `NAME`'s A record in this server's zone: it tells which server answered.
    pub answer: Ipv4Addr,
    child: Option<Child>,
    dir: PathBuf,
}

impl Knot {
    /// Whether `knotd` and `dig` are installed (else the caller skips, or fails in CI).
    pub fn available(test: &str) -> bool {
        let dig = runs("dig", "-v");
        super::require_tool(
            "KNOT",
            knotd()
                .is_none()
                .then(|| format!("{test}: knotd is not installed (apt install knot)")),
        ) && super::require_tool(
            "DIG",
            (!dig).then(|| format!("{test}: dig is not installed (apt install bind9-dnsutils)")),
        )
    }

    /// A server on a free port whose zone answers `NAME` with `answer`; returns once it answers.
    pub async fn start(answer: Ipv4Addr) -> Knot {
        let dir = scratch("knot");
        let port = free_udp_port().await;
        let mut knot = Knot {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            answer,
            child: None,
            dir,
        };
        knot.run().await;
        knot
    }

    /// Writes the config and zone, starts `knotd` and waits (bounded) until it answers a query.
    async fn run(&mut self) {
        let zone = self.dir.join(format!("{ZONE}.zone"));
        std::fs::write(
            &zone,
            format!(
                "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns admin 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\nwho A {}\n",
                self.answer
            ),
        )
        .expect("write the zone");
        let dir = self.dir.display();
        let config = self.dir.join("knot.conf");
        std::fs::write(
            &config,
            format!(
                "server:\n  rundir: \"{dir}\"\n  listen: {}@{}\n\
                 log:\n  - target: stderr\n    any: warning\n\
                 database:\n  storage: \"{dir}\"\n\
                 template:\n  - id: default\n    storage: \"{dir}\"\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n\
                 zone:\n  - domain: {ZONE}\n    file: \"{}\"\n",
                self.addr.ip(),
                self.addr.port(),
                zone.display()
            ),
        )
        .expect("write knot.conf");
        let mut child = Command::new(knotd().expect("knotd installed"))
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start knotd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers(self.addr).await {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("knotd exited before answering on {}: {status}", self.addr);
            }
            assert!(
                Instant::now() < deadline,
                "knotd did not answer on {}",
                self.addr
            );
        }
        self.child = Some(child);
    }

    /// Stops the server (SIGTERM, as `knotc stop` does) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, rustix::process::Signal::TERM);
        }
    }

    /// Starts the stopped server again on the same port; returns once it answers.
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port of 127.0.0.1 free a moment ago for both UDP and TCP (knotd listens on both).
async fn free_udp_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port of 127.0.0.1 free for both UDP and TCP");
}

/// Whether the server at `addr` answers a query for `NAME` within 200 ms.
async fn answers(addr: SocketAddr) -> bool {
    let Ok(c) = UdpSocket::bind("127.0.0.1:0").await else {
        return false;
    };
    if c.send_to(&super::dns::a_query(0x5a5a, NAME), addr)
        .await
        .is_err()
    {
        // A closed port answers with ICMP: the next try must not come at once.
        tokio::time::sleep(Duration::from_millis(20)).await;
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(Duration::from_millis(200), c.recv_from(&mut buf)).await,
        Ok(Ok((n, _))) if n >= 2 && buf[..2] == [0x5a, 0x5a]
    )
}

/// `dig @ADDR NAME A +short +tries=1 +time=2`: the addresses it printed, one per line (empty when
/// no answer came).
pub async fn dig(to: SocketAddr) -> Vec<String> {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", to.ip()))
        .args(["-p", &to.port().to_string(), NAME, "A"])
        .args(["+short", "+tries=1", "+time=2"])
        .kill_on_drop(true)
        .output();
    let out = super::within(Duration::from_secs(10), "dig", out)
        .await
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}
