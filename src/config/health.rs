//! Active health settings of a service (`health`) and its backends' agent (`agent`): what a probe
//! does (a TCP connect, a send/expect exchange over TCP or UDP, a DNS query, HTTP with expected
//! statuses and body, a TLS handshake, a command run), how often, and what it takes to rise and fall.

use std::fmt;

use hickory_resolver::proto::rr::Name;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::Dur;

/// The most bytes a probe may read for an expectation or a body.
pub const MAX_READ_CAP: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    None,
    /// A TCP connect, and the `steps` exchange when there are steps.
    Tcp,
    Http,
    /// A TLS handshake with the backend (`backend_tls`).
    Tls,
    /// HTTP over TLS (`backend_tls`).
    Https,
    /// A command run by sluicegate (`command`): exit status 0 is up.
    Exec,
    /// The `steps` as datagrams: each send one datagram, each expect the next reply datagram.
    Udp,
    /// A DNS query over UDP (`name`, `type`) whose reply must carry `expect_rcode`.
    Dns,
}

impl HealthKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthKind::None => "none",
            HealthKind::Tcp => "tcp",
            HealthKind::Http => "http",
            HealthKind::Tls => "tls",
            HealthKind::Https => "https",
            HealthKind::Exec => "exec",
            HealthKind::Udp => "udp",
            HealthKind::Dns => "dns",
        }
    }
}

/// Defines a config enum read from its upper-case name (any case accepted: `aaaa` is `AAAA`), whose
/// error lists the names it takes, so a typo is a config error naming the key and the choices.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub fn as_str(&self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::ALL
                    .iter()
                    .find(|v| v.as_str().eq_ignore_ascii_case(&s))
                    .copied()
                    .ok_or_else(|| {
                        let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        de::Error::custom(format!(
                            concat!("{:?} is not a ", $what, ": one of {}"),
                            s,
                            names.join(", ")
                        ))
                    })
            }
        }
    };
}

/// A name a `kind: dns` probe asks for, checked when the config is read (labels of at most 63
/// bytes, 255 in all; international names in their ASCII form) and made absolute: a probe asks
/// exactly this name, never one completed by a search list.
#[derive(Debug, Clone)]
pub struct DnsName {
    /// As written, for messages.
    pub text: String,
    pub name: Name,
}

impl PartialEq for DnsName {
    fn eq(&self, o: &DnsName) -> bool {
        self.text == o.text
    }
}

impl<'de> Deserialize<'de> for DnsName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = |why: String| de::Error::custom(format!("{text:?} is not a DNS name: {why}"));
        if text.is_empty() || text == "." {
            return Err(bad("empty".into()));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("spaces or control characters".into()));
        }
        let mut name = Name::from_utf8(&text).map_err(|e| bad(e.to_string()))?;
        name.set_fqdn(true);
        Ok(DnsName { text, name })
    }
}

named_enum! {
    /// The record type a `kind: dns` probe asks for.
    DnsType, "record type", {
        A = "A", Aaaa = "AAAA", Cname = "CNAME", Mx = "MX", Ns = "NS", Ptr = "PTR", Soa = "SOA",
        Srv = "SRV", Txt = "TXT",
    }
}

named_enum! {
    /// The response code a `kind: dns` probe's reply must carry (RFC 1035's names).
    Rcode, "DNS response code", {
        NoError = "NOERROR", FormErr = "FORMERR", ServFail = "SERVFAIL", NxDomain = "NXDOMAIN",
        NotImp = "NOTIMP", Refused = "REFUSED",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    #[default]
    Keep,
    Close,
}

impl OnDown {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnDown::Keep => "keep",
            OnDown::Close => "close",
        }
    }
}

/// Bytes written in hex (`"0000000804d2162f"`, spaces allowed between bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hex(pub Vec<u8>);

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if digits.is_empty() || !digits.len().is_multiple_of(2) {
            return Err(de::Error::custom(format!(
                "{s:?}: hex bytes are an even number of hex digits"
            )));
        }
        let nibble = |c: u8| (c as char).to_digit(16);
        digits
            .chunks(2)
            .map(|p| match (nibble(p[0]), nibble(p[1])) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(de::Error::custom(format!("{s:?}: not hex"))),
            })
            .collect::<Result<Vec<u8>, _>>()
            .map(Hex)
    }
}

/// A regular expression (Rust's `regex` syntax), compiled when the config is read: one that does
/// not compile is a config error naming what is wrong. Matched against bytes.
#[derive(Clone)]
pub struct Pattern(pub regex::bytes::Regex);

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, o: &Pattern) -> bool {
        self.0.as_str() == o.0.as_str()
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        regex::bytes::RegexBuilder::new(&s)
            // A pattern's compiled size is bounded: a config cannot make the balancer build a huge one.
            .size_limit(1 << 20)
            .build()
            .map(Pattern)
            .map_err(|e| de::Error::custom(format!("{s:?} is not a regular expression: {e}")))
    }
}

/// One step of a `kind: tcp` exchange: exactly one of its keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeStep {
    /// Text to send (YAML escapes: `"PING\r\n"`).
    #[serde(default)]
    pub send: Option<String>,
    #[serde(default)]
    pub send_hex: Option<Hex>,
    /// Text the answer must contain (what was read since the last send).
    #[serde(default)]
    pub expect: Option<String>,
    #[serde(default)]
    pub expect_regex: Option<Pattern>,
    #[serde(default)]
    pub expect_hex: Option<Hex>,
}

impl ProbeStep {
    /// How many of its keys are set (exactly one must be).
    pub fn keys(&self) -> usize {
        [
            self.send.is_some(),
            self.send_hex.is_some(),
            self.expect.is_some(),
            self.expect_regex.is_some(),
            self.expect_hex.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count()
    }
}

/// HTTP statuses that pass: one (`200`) or a range (`"200-299"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl StatusRange {
    pub fn contains(&self, code: u16) -> bool {
        (self.0..=self.1).contains(&code)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u16),
            Range(String),
        }
        let bad = |s: String| {
            de::Error::custom(format!("{s}: a status (100 to 599) or a range \"200-299\""))
        };
        let (lo, hi) = match Raw::deserialize(d)? {
            Raw::One(c) => (c, c),
            Raw::Range(s) => {
                let parsed = s.trim().parse::<u16>().ok().map(|c| (c, c)).or_else(|| {
                    let (a, b) = s.split_once('-')?;
                    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                });
                parsed.ok_or_else(|| bad(format!("{s:?}")))?
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad(format!("{lo}-{hi}")));
        }
        Ok(StatusRange(lo, hi))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default)]
    pub kind: HealthKind,
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default)]
    pub on_down: OnDown,
    /// `kind: tcp`: the exchange after the connect, in order; `kind: udp`: the datagrams sent and
    /// the replies expected, in order.
    #[serde(default)]
    pub steps: Vec<ProbeStep>,
    /// `kind: dns`: the name asked for.
    #[serde(default)]
    pub name: Option<DnsName>,
    /// `kind: dns`: the record type asked for; `A` when unset ([`HealthConfig::dns_type`]). An
    /// `Option` so that the key set on another kind is an error.
    #[serde(default, rename = "type")]
    pub dns_type: Option<DnsType>,
    /// `kind: dns`: the response code that passes; `NOERROR` when unset.
    #[serde(default)]
    pub expect_rcode: Option<Rcode>,
    /// `kind: dns`: whether the answer section must hold a record; `false` when unset (a name
    /// that exists with no record of the type passes).
    #[serde(default)]
    pub expect_answer: Option<bool>,
    /// `kind: http`/`https`: the statuses that pass; none: any 2xx.
    #[serde(default)]
    pub expect_status: Vec<StatusRange>,
    /// `kind: http`/`https`: text the body must contain.
    #[serde(default)]
    pub expect_body: Option<String>,
    /// `kind: http`/`https`: a pattern the body must match.
    #[serde(default)]
    pub expect_body_regex: Option<Pattern>,
    /// `kind: exec`: the program and its arguments, run without a shell.
    #[serde(default)]
    pub command: Vec<String>,
    /// The most bytes read for an expectation or a body (a longer answer fails).
    #[serde(default = "default_read_cap")]
    pub read_cap: usize,
    /// `kind: tls`/`https`: the probe's own TLS to the backends, so that a service that passes TLS
    /// through (no `backend_tls`) can be probed over it; absent, the probes speak `backend_tls`.
    #[serde(default)]
    pub tls: Option<super::BackendTlsConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: HealthKind::None,
            path: default_health_path(),
            port: None,
            interval: default_interval(),
            timeout: default_probe_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            on_down: OnDown::Keep,
            steps: Vec::new(),
            name: None,
            dns_type: None,
            expect_rcode: None,
            expect_answer: None,
            expect_status: Vec::new(),
            expect_body: None,
            expect_body_regex: None,
            command: Vec::new(),
            read_cap: default_read_cap(),
            tls: None,
        }
    }
}

impl HealthConfig {
    /// `kind: dns`: the record type asked for.
    pub fn dns_type(&self) -> DnsType {
        self.dns_type.unwrap_or(DnsType::A)
    }

    /// `kind: dns`: the response code that passes.
    pub fn expect_rcode(&self) -> Rcode {
        self.expect_rcode.unwrap_or(Rcode::NoError)
    }

    /// `kind: dns`: whether the answer section must hold a record.
    pub fn expect_answer(&self) -> bool {
        self.expect_answer.unwrap_or(false)
    }
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_interval() -> Dur {
    Dur::secs(2)
}
fn default_probe_timeout() -> Dur {
    Dur::secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_read_cap() -> usize {
    4096
}

/// `agent`: each backend runs an agent on its host at `port` that answers a connection with one line
/// of words (HAProxy's agent protocol): `up`, `down`, `drain`, `maint`, `NN%` (its weight as a share
/// of the configured one).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub port: u16,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
}
