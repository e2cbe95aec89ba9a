//! `log.access.syslog` and `log.access.syslog_facility`: where the routing log's copy for a syslog
//! collector goes, and under which facility. Parsing only; `syslog.rs` sends.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::BackendAddress;

/// A syslog collector: `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:PATH` (a datagram socket such
/// as `/dev/log`). HOST is an IP address (IPv6 in brackets) or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddr {
    Udp { host: String, port: u16 },
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

const EXPECTED: &str = "expected udp://HOST:PORT, tcp://HOST:PORT or unix:PATH";

impl std::str::FromStr for SyslogAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            // `unix:///dev/log` as some tools write it is `unix:/dev/log`.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("{s:?}: {EXPECTED}: the socket's path is missing"));
            }
            return Ok(SyslogAddr::Unix(PathBuf::from(path)));
        }
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?}: {EXPECTED}"))?;
        let (host, port) = match rest.parse::<BackendAddress>() {
            Ok(BackendAddress::Ip(a)) => (a.ip().to_string(), a.port()),
            Ok(BackendAddress::Name { host, port }) => (host, port),
            Ok(_) => return Err(format!("{s:?}: {EXPECTED}")),
            Err(e) => return Err(format!("{e} ({EXPECTED})")),
        };
        match scheme {
            "udp" => Ok(SyslogAddr::Udp { host, port }),
            "tcp" => Ok(SyslogAddr::Tcp { host, port }),
            _ => Err(format!("{s:?}: unknown scheme {scheme:?}: {EXPECTED}")),
        }
    }
}

impl<'de> Deserialize<'de> for SyslogAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for SyslogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bracketed = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            SyslogAddr::Udp { host, port } => write!(f, "udp://{}:{port}", bracketed(host)),
            SyslogAddr::Tcp { host, port } => write!(f, "tcp://{}:{port}", bracketed(host)),
            SyslogAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The syslog facility of the routing lines (RFC 5424's numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    Kern = 0,
    User = 1,
    Mail = 2,
    Daemon = 3,
    Auth = 4,
    Syslog = 5,
    Lpr = 6,
    News = 7,
    Uucp = 8,
    Cron = 9,
    Authpriv = 10,
    Ftp = 11,
    #[default]
    Local0 = 16,
    Local1 = 17,
    Local2 = 18,
    Local3 = 19,
    Local4 = 20,
    Local5 = 21,
    Local6 = 22,
    Local7 = 23,
}

impl Facility {
    /// Its number, as RFC 5424's PRI counts it (facility × 8 + severity).
    pub fn code(self) -> u8 {
        self as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_parse_and_print_back() {
        for (text, want) in [
            (
                "udp://127.0.0.1:514",
                SyslogAddr::Udp {
                    host: "127.0.0.1".into(),
                    port: 514,
                },
            ),
            (
                "tcp://logs.internal:6514",
                SyslogAddr::Tcp {
                    host: "logs.internal".into(),
                    port: 6514,
                },
            ),
            (
                "udp://[::1]:514",
                SyslogAddr::Udp {
                    host: "::1".into(),
                    port: 514,
                },
            ),
            ("unix:/dev/log", SyslogAddr::Unix("/dev/log".into())),
        ] {
            let got: SyslogAddr = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
        assert_eq!(
            "unix:///dev/log".parse::<SyslogAddr>(),
            Ok(SyslogAddr::Unix("/dev/log".into()))
        );
    }

    #[test]
    fn a_bad_collector_says_what_is_wrong() {
        for (bad, says) in [
            ("", "expected udp://HOST:PORT"),
            ("127.0.0.1:514", "expected udp://HOST:PORT"),
            ("http://127.0.0.1:514", "unknown scheme \"http\""),
            ("udp://127.0.0.1", "not host:port"),
            ("tcp://logs:0", "port must be a number from 1 to 65535"),
            ("tcp://logs:99999", "port must be a number from 1 to 65535"),
            ("udp://::1:514", "not a valid socket address"),
            ("udp://bad name:514", "neither an IP address nor a DNS name"),
            ("unix:", "the socket's path is missing"),
        ] {
            let e = bad.parse::<SyslogAddr>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn facilities_are_numbered_as_rfc_5424_does() {
        let f = |s: &str| serde_yaml::from_str::<Facility>(s).map(Facility::code);
        assert_eq!(Facility::default().code(), 16);
        assert_eq!(f("kern").unwrap(), 0);
        assert_eq!(f("daemon").unwrap(), 3);
        assert_eq!(f("local7").unwrap(), 23);
        assert!(f("local8").is_err());
    }
}
