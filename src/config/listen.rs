//! Where a service listens and which clients of a shared address are its own: `listen` (one address,
//! a list, port ranges), `sni` (the names a route answers for) and `alpn` (the protocols that narrow
//! it), with the rules that several services on one address must follow.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The most addresses one service may listen on (ranges expanded): each is a socket per worker.
pub const MAX_LISTEN_ADDRESSES: usize = 1024;

/// `listen`: one address (`0.0.0.0:443`), or a list of addresses and port ranges
/// (`["0.0.0.0:443", "[::]:443"]`, `"0.0.0.0:30000-30100"`), expanded in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen(Vec<SocketAddr>);

impl Listen {
    /// One address.
    pub fn one(addr: SocketAddr) -> Listen {
        Listen(vec![addr])
    }

    /// Every address, ranges expanded, in the order written.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.0
    }

    /// The first address: what a single-address service is known by.
    pub fn first(&self) -> SocketAddr {
        self.0[0]
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => write!(f, "{} addresses from {}", many.len(), many[0]),
        }
    }
}

/// Parses one entry of `listen`: `ip:port` or `ip:low-high`.
pub fn parse_listen_entry(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let bad = || format!("{s:?} is not an address: expected ip:port, [ipv6]:port, or ip:low-high");
    let (host, ports) = s.rsplit_once(':').ok_or_else(bad)?;
    let (low, high) = ports.split_once('-').ok_or_else(bad)?;
    let ip: IpAddr = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .map_err(|_| bad())?;
    let (low, high): (u16, u16) = (
        low.parse().map_err(|_| bad())?,
        high.parse().map_err(|_| bad())?,
    );
    if low == 0 || low > high {
        return Err(format!(
            "{s:?}: a port range runs from a port above 0 up to a higher one"
        ));
    }
    let count = (high - low) as usize + 1;
    if count > MAX_LISTEN_ADDRESSES {
        return Err(format!(
            "{s:?}: {count} ports; at most {MAX_LISTEN_ADDRESSES} addresses per service"
        ));
    }
    Ok((low..=high).map(|p| SocketAddr::new(ip, p)).collect())
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `expecting` words the error of a value of neither form; an error raised while reading
        // the value (the parser's repetition limit on an alias bomb) comes through as it is.
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected an address (ip:port or ip:low-high) or a list of them"
        )]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let entries = match Raw::deserialize(d)? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        if entries.is_empty() {
            return Err(de::Error::custom("an empty list: at least one address"));
        }
        let mut addrs = Vec::new();
        for e in &entries {
            addrs.extend(parse_listen_entry(e).map_err(de::Error::custom)?);
        }
        if addrs.len() > MAX_LISTEN_ADDRESSES {
            return Err(de::Error::custom(format!(
                "{} addresses; at most {MAX_LISTEN_ADDRESSES} per service",
                addrs.len()
            )));
        }
        Ok(Listen(addrs))
    }
}

/// A name in `sni`: `a.example.com` (matched exactly, in any case) or `*.b.example` (exactly one more
/// label in front: `x.b.example`, not `b.example`, not `y.x.b.example`). Kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SniName {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

impl SniName {
    /// Whether a client's server name `name` (in any case) is this one.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            SniName::Exact(n) => n.eq_ignore_ascii_case(name),
            SniName::Wildcard(suffix) => {
                // Bytes, not chars: `name` may come from anywhere (a query string), and a suffix of
                // ASCII matches only ASCII.
                let (name, suffix) = (name.as_bytes(), suffix.as_bytes());
                let Some(dot) = name.len().checked_sub(suffix.len() + 1) else {
                    return false;
                };
                dot > 0
                    && name[dot] == b'.'
                    && name[dot + 1..].eq_ignore_ascii_case(suffix)
                    && !name[..dot].contains(&b'.')
            }
        }
    }
}

impl fmt::Display for SniName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniName::Exact(n) => f.write_str(n),
            SniName::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Why `s` can never be a server name a client sends, if it cannot.
fn name_problem(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > 253 {
        return Some("a server name has 1 to 253 characters".into());
    }
    if s.parse::<IpAddr>().is_ok() {
        return Some("an IP address: clients never send one as a server name (RFC 6066), so this route could never match".into());
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Some(format!("label {label:?}: a server name is dot-separated labels of letters, digits, '-' and '_', 1 to 63 each"));
        }
    }
    None
}

impl std::str::FromStr for SniName {
    type Err = String;

    fn from_str(s: &str) -> Result<SniName, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if name.contains('*') {
            return Err(format!(
                "{s:?}: '*' may only be a whole first label (\"*.example.com\")"
            ));
        }
        if let Some(why) = name_problem(name) {
            return Err(format!("{s:?}: {why}"));
        }
        Ok(if wild {
            SniName::Wildcard(name.to_string())
        } else {
            SniName::Exact(name.to_string())
        })
    }
}

impl<'de> Deserialize<'de> for SniName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// An ALPN protocol name in `alpn` (`h2`, `acme-tls/1`): 1 to 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub Vec<u8>);

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s.len() > 255 {
            return Err(de::Error::custom(format!(
                "{s:?}: an ALPN protocol name has 1 to 255 bytes"
            )));
        }
        Ok(Protocol(s.into_bytes()))
    }
}

/// What a route on a shared address answers for: its names (none: any name, or none sent) and the
/// protocols that narrow it (none: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteKeys {
    pub sni: Vec<SniName>,
    pub alpn: Vec<Protocol>,
}

impl RouteKeys {
    /// A route with neither names nor protocols: the default of its address.
    pub fn is_default(&self) -> bool {
        self.sni.is_empty() && self.alpn.is_empty()
    }
}

/// Where two routes of one address would answer the same client: the name (or "any name") and the
/// protocol (or "any protocol") they share.
pub fn overlap(a: &RouteKeys, b: &RouteKeys) -> Option<String> {
    let names = |k: &RouteKeys| -> Vec<Option<SniName>> {
        if k.sni.is_empty() {
            vec![None]
        } else {
            k.sni.iter().cloned().map(Some).collect()
        }
    };
    let shared_name = names(a).into_iter().find(|n| names(b).contains(n))?;
    let protocol = match (a.alpn.is_empty(), b.alpn.is_empty()) {
        (true, true) => "any protocol".to_string(),
        (false, false) => format!("ALPN {}", a.alpn.iter().find(|p| b.alpn.contains(p))?),
        // One narrows by protocol, the other takes the rest of that name: not an overlap.
        _ => return None,
    };
    let name = shared_name.map_or("any name".to_string(), |n| format!("name {n}"));
    Some(format!("{name} and {protocol}"))
}

/// The services of one config that share each listen address (the port-0 addresses of tests and
/// ephemeral listeners are never shared: each is a port of its own).
pub(crate) fn shared_addresses<'a>(
    services: impl Iterator<Item = (usize, &'a Listen)>,
) -> BTreeMap<SocketAddr, Vec<usize>> {
    let mut by_addr: BTreeMap<SocketAddr, Vec<usize>> = BTreeMap::new();
    for (i, listen) in services {
        for a in listen.addrs() {
            if a.port() != 0 {
                let v = by_addr.entry(*a).or_default();
                if !v.contains(&i) {
                    v.push(i);
                }
            }
        }
    }
    by_addr.retain(|_, v| v.len() > 1);
    by_addr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> SniName {
        s.parse().unwrap()
    }

    #[test]
    fn listen_takes_one_address_a_list_and_ranges() {
        let l: Listen = serde_yaml::from_str("127.0.0.1:80").unwrap();
        assert_eq!(l.addrs(), ["127.0.0.1:80".parse().unwrap()]);
        let l: Listen =
            serde_yaml::from_str(r#"["0.0.0.0:443", "[::]:443", "10.0.0.1:30000-30002"]"#).unwrap();
        assert_eq!(l.addrs().len(), 5);
        assert_eq!(l.addrs()[4], "10.0.0.1:30002".parse().unwrap());
        let l: Listen = serde_yaml::from_str(r#""[::1]:7000-7001""#).unwrap();
        assert_eq!(l.addrs()[1], "[::1]:7001".parse().unwrap());
        for bad in [
            "[]",
            "\"a:1\"",
            "\"1.2.3.4:9-8\"",
            "\"1.2.3.4:0-5\"",
            "\"1.2.3.4:1-2000\"",
        ] {
            assert!(serde_yaml::from_str::<Listen>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_match_exactly_or_by_one_more_label() {
        assert!(name("a.example.com").matches("A.Example.COM"));
        assert!(!name("a.example.com").matches("b.a.example.com"));
        let w = name("*.b.example");
        assert!(w.matches("x.b.example") && w.matches("X.B.EXAMPLE"));
        assert!(!w.matches("b.example"), "the suffix alone");
        assert!(!w.matches("y.x.b.example"), "two more labels");
        assert!(!w.matches(".b.example"), "an empty label");
        assert!(!w.matches("xb.example"));
        assert_eq!(name("*.B.Example"), SniName::Wildcard("b.example".into()));
    }

    #[test]
    fn names_that_can_never_match_are_refused() {
        for bad in [
            "",
            "10.0.0.1",
            "a..b",
            "a.*.b",
            "*",
            "*.",
            "x*.b",
            "a b",
            "é.example",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<SniName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overlaps_are_a_shared_name_and_a_shared_protocol() {
        let keys = |sni: &[&str], alpn: &[&str]| RouteKeys {
            sni: sni.iter().map(|s| name(s)).collect(),
            alpn: alpn
                .iter()
                .map(|p| Protocol(p.as_bytes().to_vec()))
                .collect(),
        };
        assert!(overlap(&keys(&["a.x"], &[]), &keys(&["a.x", "b.x"], &[])).is_some());
        assert!(
            overlap(&keys(&["a.x"], &[]), &keys(&["*.x"], &[])).is_none(),
            "exact beats wildcard"
        );
        assert!(
            overlap(&keys(&["a.x"], &["h2"]), &keys(&["a.x"], &[])).is_none(),
            "ALPN narrows"
        );
        assert!(overlap(&keys(&["a.x"], &["h2"]), &keys(&["a.x"], &["h2", "x"])).is_some());
        assert!(overlap(&keys(&["a.x"], &["h2"]), &keys(&["a.x"], &["x"])).is_none());
        assert!(
            overlap(&keys(&[], &[]), &keys(&[], &[])).is_some(),
            "two defaults"
        );
        assert!(overlap(&keys(&[], &["xmpp-client"]), &keys(&[], &[])).is_none());
    }
}
