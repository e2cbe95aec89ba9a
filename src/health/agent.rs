//! The agent check: a program on each backend's host, at the service's `agent.port`, that answers a
//! connection with one line of words saying how the backend should be used, as HAProxy's
//! agent-check does (so agents written for HAProxy work unchanged). It adjusts the backend; it does
//! not replace the health check, and an agent that cannot be reached changes nothing (connectivity
//! is the health check's to judge).
//!
//! Words, separated by spaces, tabs or commas, case-insensitive; `#` starts a comment to the line's
//! end:
//! - `up`, `ready`: usable (undoes `down`, `drain` and `maint`);
//! - `down`, `fail`, `failed`, `stopped`: no new connections, as a failed health check;
//! - `drain`: no new connections, sessions go on;
//! - `maint`: no new connections, as the API's maintenance;
//! - `NN%` (0 to 1000): the backend's weight as a share of its configured weight; `0%` drains it;
//! - `maxconn:N` is accepted and not applied (sluicegate's caps are `backends[].max_connections`).
//!
//! Of several state words, the strongest wins (`maint` over `drain` over `down` over `up`). A line
//! with a word outside these, or none of them, is refused whole with an error naming it, and
//! changes nothing. At most [`AGENT_READ`] bytes are read: an agent that sends more without a line
//! end fails.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::exchange::quote;
use super::ProbeError;

/// The most of an agent's answer read.
pub(crate) const AGENT_READ: usize = 512;

/// The largest weight share an agent may ask for, in percent.
pub(crate) const MAX_PCT: u32 = 1000;

crate::util::byte_enum! {
    /// What a backend's agent last said about its state.
    #[derive(PartialOrd, Ord)]
    pub enum AgentSays {
        /// No agent, or it has not answered yet.
        Unknown = 0 => "unknown",
        Up = 1 => "up",
        Down = 2 => "down",
        Drain = 3 => "drain",
        Maint = 4 => "maint",
    }
}

impl AgentSays {
    /// Whether the backend may take new connections as far as its agent is concerned.
    pub(crate) fn allows(self) -> bool {
        matches!(self, AgentSays::Unknown | AgentSays::Up)
    }
}

/// What one answer said: a state, a weight share, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgentReply {
    pub(crate) says: Option<AgentSays>,
    pub(crate) pct: Option<u32>,
}

/// Reads an agent's line (pure).
pub(crate) fn parse(line: &[u8]) -> Result<AgentReply, String> {
    let text = std::str::from_utf8(line).map_err(|_| format!("not text: {}", quote(line)))?;
    let text = text.split('#').next().unwrap_or("");
    let mut reply = AgentReply {
        says: None,
        pct: None,
    };
    for word in text
        .split([' ', '\t', ',', '\r', '\n'])
        .filter(|w| !w.is_empty())
    {
        let w = word.to_ascii_lowercase();
        let says = match w.as_str() {
            "up" | "ready" => AgentSays::Up,
            "down" | "fail" | "failed" | "stopped" => AgentSays::Down,
            "drain" => AgentSays::Drain,
            "maint" => AgentSays::Maint,
            _ if w.starts_with("maxconn:") && w[8..].parse::<u32>().is_ok() => continue,
            _ => {
                let pct = w
                    .strip_suffix('%')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|p| *p <= MAX_PCT)
                    .ok_or_else(|| {
                        format!(
                            "{word:?} is not an agent word (up, down, drain, maint, ready, NN%)"
                        )
                    })?;
                reply.pct = Some(pct);
                continue;
            }
        };
        reply.says = reply.says.max(Some(says));
    }
    if reply.says.is_none() && reply.pct.is_none() {
        return Err(format!("no agent word in {}", quote(line)));
    }
    Ok(reply)
}

/// Asks the agent at `addr` once, bounded by `timeout`: its line (up to a line end or its close),
/// read, and the raw bytes for the history.
pub(crate) async fn ask(
    addr: SocketAddr,
    timeout: Duration,
) -> (Result<AgentReply, ProbeError>, Vec<u8>) {
    let mut got = Vec::new();
    let result = tokio::time::timeout(timeout, read_line(addr, &mut got))
        .await
        .unwrap_or(Err(ProbeError::Timeout))
        .and_then(|()| parse(&got).map_err(ProbeError::Expect));
    (result, got)
}

async fn read_line(addr: SocketAddr, got: &mut Vec<u8>) -> Result<(), ProbeError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::connecting)?;
    let mut buf = [0u8; AGENT_READ];
    loop {
        if let Some(end) = got.iter().position(|b| *b == b'\n') {
            got.truncate(end);
            return Ok(());
        }
        if got.len() >= AGENT_READ {
            return Err(ProbeError::Expect(format!(
                "no line end in the first {AGENT_READ} bytes: {}",
                quote(got)
            )));
        }
        let room = AGENT_READ - got.len();
        match s.read(&mut buf[..room]).await.map_err(ProbeError::Read)? {
            0 if got.is_empty() => return Err(ProbeError::Expect("closed without a word".into())),
            0 => return Ok(()),
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn says(line: &str) -> Result<AgentReply, String> {
        parse(line.as_bytes())
    }

    #[test]
    fn haproxy_agent_lines_are_read() {
        let r = |s, p| Ok(AgentReply { says: s, pct: p });
        assert_eq!(says("up\n"), r(Some(AgentSays::Up), None));
        assert_eq!(says("75%"), r(None, Some(75)));
        assert_eq!(says("ready up 50%\r\n"), r(Some(AgentSays::Up), Some(50)));
        assert_eq!(says("DOWN # disk full"), r(Some(AgentSays::Down), None));
        assert_eq!(says("up,drain"), r(Some(AgentSays::Drain), None));
        assert_eq!(says("drain maint"), r(Some(AgentSays::Maint), None));
        assert_eq!(says("stopped\tmaxconn:30"), r(Some(AgentSays::Down), None));
        assert_eq!(says("0%"), r(None, Some(0)));
    }

    #[test]
    fn garbage_is_refused_whole_with_what_was_wrong() {
        for (line, wanted) in [
            ("up sideways", "\"sideways\" is not an agent word"),
            ("1001%", "\"1001%\" is not an agent word"),
            ("", "no agent word"),
            ("   # only a comment", "no agent word"),
            ("-5%", "is not an agent word"),
        ] {
            let e = says(line).unwrap_err();
            assert!(e.contains(wanted), "{line:?}: {e}");
        }
        assert!(parse(b"\xff\xfe up").unwrap_err().contains("not text"));
    }
}
