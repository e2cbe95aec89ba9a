//! `kind: dns`: one real query over UDP (a random id, recursion desired) and the check of its reply:
//! a datagram with another id, or that is not a response, is not the reply and the probe waits on
//! (to its timeout); the reply must carry `expect_rcode` and, with `expect_answer`, a record in its
//! answer section. Messages are built and read with hickory's wire format (the resolver's own,
//! `hickory_resolver::proto`). Building and checking are pure, tested here and fuzzed through
//! [`super::wire::dns_reply`].

use std::net::SocketAddr;
use std::sync::LazyLock;

use hickory_resolver::proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::proto::serialize::binary::{BinDecodable, BinDecoder};

use super::datagram::Datagrams;
use super::ProbeError;
use crate::config::{DnsType, HealthConfig, Rcode};
use crate::util::Rng;

/// The largest reply read: a DNS message over UDP without EDNS is at most 512 bytes, but a server
/// may send more; a cut reply fails to parse rather than passing half read.
const REPLY_CAP: usize = 65_535;

/// Query ids: unpredictable, so that a stray or forged datagram is unlikely to pass for the reply.
static IDS: LazyLock<Rng> = LazyLock::new(Rng::from_entropy);

/// What a probe asks and what its reply must say.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Question {
    pub(super) name: Name,
    pub(super) record_type: DnsType,
    pub(super) rcode: Rcode,
    /// Whether the answer section must hold a record.
    pub(super) answer: bool,
}

impl Question {
    /// The question of a `kind: dns` check; `None` without a `name` (validation requires one).
    pub(super) fn of(h: &HealthConfig) -> Option<Question> {
        Some(Question {
            name: h.name.as_ref()?.name.clone(),
            record_type: h.dns_type(),
            rcode: h.expect_rcode(),
            answer: h.expect_answer(),
        })
    }
}

/// The query for `q` with the id `id`, on the wire.
pub(super) fn query(id: u16, q: &Question) -> Result<Vec<u8>, String> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    // Recursion desired: a resolver backend (unbound, Pi-hole) is checked by resolving; an
    // authoritative one answers its own zone whatever the bit says.
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(q.name.clone(), record_type(q.record_type)));
    m.to_vec().map_err(|e| e.to_string())
}

/// What one datagram says to a probe that sent query `id`: `None` when it is not the reply (too
/// short for a header, another id, not a response), else whether the reply passes, and why not.
pub(super) fn check(datagram: &[u8], id: u16, q: &Question) -> Option<Result<(), String>> {
    let header = Header::read(&mut BinDecoder::new(datagram)).ok()?;
    if header.metadata.id != id || header.metadata.message_type != MessageType::Response {
        return None;
    }
    let reply = match Message::from_vec(datagram) {
        Ok(m) => m,
        Err(e) => return Some(Err(format!("dns: malformed reply: {e}"))),
    };
    let got = reply.metadata.response_code;
    if got != response_code(q.rcode) {
        return Some(Err(format!(
            "dns: rcode {}, expected {}",
            rcode_name(got),
            q.rcode
        )));
    }
    if q.answer && reply.answers.is_empty() {
        return Some(Err(format!(
            "dns: no {} record in the answer for {}",
            q.record_type, q.name
        )));
    }
    Some(Ok(()))
}

/// Asks `addr` the check's question and waits for its reply (the caller bounds the wait).
pub(super) async fn ask(addr: SocketAddr, h: &HealthConfig) -> Result<(), ProbeError> {
    let Some(q) = Question::of(h) else {
        return Err(ProbeError::Expect("dns: no name to ask for".into()));
    };
    let id = IDS.next_u64() as u16;
    let msg = query(id, &q)
        .map_err(|e| ProbeError::Expect(format!("dns: the query cannot be written: {e}")))?;
    let d = Datagrams::connect(addr, "dns").await?;
    d.send(&msg).await?;
    let mut buf = vec![0u8; REPLY_CAP];
    loop {
        let n = d.recv(&mut buf).await?;
        if let Some(verdict) = check(&buf[..n], id, &q) {
            return verdict.map_err(ProbeError::Expect);
        }
    }
}

fn record_type(t: DnsType) -> RecordType {
    match t {
        DnsType::A => RecordType::A,
        DnsType::Aaaa => RecordType::AAAA,
        DnsType::Cname => RecordType::CNAME,
        DnsType::Mx => RecordType::MX,
        DnsType::Ns => RecordType::NS,
        DnsType::Ptr => RecordType::PTR,
        DnsType::Soa => RecordType::SOA,
        DnsType::Srv => RecordType::SRV,
        DnsType::Txt => RecordType::TXT,
    }
}

fn response_code(r: Rcode) -> ResponseCode {
    match r {
        Rcode::NoError => ResponseCode::NoError,
        Rcode::FormErr => ResponseCode::FormErr,
        Rcode::ServFail => ResponseCode::ServFail,
        Rcode::NxDomain => ResponseCode::NXDomain,
        Rcode::NotImp => ResponseCode::NotImp,
        Rcode::Refused => ResponseCode::Refused,
    }
}

/// A reply's code as the config names it, else its number and meaning.
fn rcode_name(got: ResponseCode) -> String {
    Rcode::ALL
        .iter()
        .find(|r| response_code(**r) == got)
        .map(|r| r.to_string())
        .unwrap_or_else(|| format!("{} ({})", u16::from(got), got.to_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::A;
    use hickory_resolver::proto::rr::{RData, Record};

    fn question(yaml: &str) -> Question {
        let h: HealthConfig = serde_yaml::from_str(yaml).unwrap();
        Question::of(&h).unwrap()
    }

    /// The reply a server would send to `query`: its id and question, `rcode`, and `answers` A
    /// records.
    fn reply(query: &[u8], rcode: ResponseCode, answers: usize) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.response_code = rcode;
        r.add_queries(q.queries.clone());
        for k in 0..answers {
            let owner = q.queries[0].name().clone();
            r.add_answer(Record::from_rdata(
                owner,
                60,
                RData::A(A::new(10, 0, 0, k as u8)),
            ));
        }
        r.to_vec().unwrap()
    }

    #[test]
    fn the_query_asks_the_name_and_type_with_recursion_desired() {
        let q = question("{kind: dns, name: db.example, type: srv}");
        let wire = query(0xbeef, &q).unwrap();
        let m = Message::from_vec(&wire).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), RecordType::SRV);
        // Absolute: a probe never asks a name completed by a search list.
        assert_eq!(m.queries[0].name().to_string(), "db.example.");
        assert!(m.answers.is_empty());
    }

    #[test]
    fn defaults_are_a_noerror_and_no_answer_needed() {
        let q = question("{kind: dns, name: example.org}");
        assert_eq!(
            (q.record_type, q.rcode, q.answer),
            (DnsType::A, Rcode::NoError, false)
        );
    }

    #[test]
    fn replies_are_checked_for_rcode_and_answers() {
        let q = question("{kind: dns, name: example.org}");
        let sent = query(7, &q).unwrap();
        assert_eq!(
            check(&reply(&sent, ResponseCode::NoError, 0), 7, &q),
            Some(Ok(()))
        );
        assert_eq!(
            check(&reply(&sent, ResponseCode::NXDomain, 0), 7, &q),
            Some(Err("dns: rcode NXDOMAIN, expected NOERROR".into()))
        );
        assert_eq!(
            check(&reply(&sent, ResponseCode::NotAuth, 0), 7, &q),
            Some(Err("dns: rcode 9 (Not authorized), expected NOERROR".into()))
        );
        let wants = question("{kind: dns, name: example.org, expect_answer: true}");
        assert_eq!(
            check(&reply(&sent, ResponseCode::NoError, 2), 7, &wants),
            Some(Ok(()))
        );
        assert_eq!(
            check(&reply(&sent, ResponseCode::NoError, 0), 7, &wants),
            Some(Err("dns: no A record in the answer for example.org.".into()))
        );
        let nx = question("{kind: dns, name: gone.example.org, expect_rcode: nxdomain}");
        assert_eq!(
            check(&reply(&sent, ResponseCode::NXDomain, 0), 7, &nx),
            Some(Ok(()))
        );
    }

    #[test]
    fn other_datagrams_are_not_the_reply() {
        let q = question("{kind: dns, name: example.org}");
        let sent = query(7, &q).unwrap();
        // another id
        assert_eq!(check(&reply(&sent, ResponseCode::NoError, 1), 8, &q), None);
        // the query itself (QR clear), as a server reflecting it would send it
        assert_eq!(check(&sent, 7, &q), None);
        // shorter than a header
        assert_eq!(check(&[0, 7, 0x80], 7, &q), None);
        assert_eq!(check(&[], 7, &q), None);
        // a header of ours with a body cut short: the reply, and malformed
        let whole = reply(&sent, ResponseCode::NoError, 1);
        let cut = check(&whole[..whole.len() - 3], 7, &q);
        assert!(
            matches!(&cut, Some(Err(e)) if e.starts_with("dns: malformed reply")),
            "{cut:?}"
        );
    }

    #[test]
    fn truncated_and_random_datagrams_never_panic() {
        let q = question("{kind: dns, name: example.org, expect_answer: true}");
        let whole = reply(&query(7, &q).unwrap(), ResponseCode::NoError, 3);
        for n in 0..=whole.len() {
            let _ = check(&whole[..n], 7, &q);
        }
        let rng = Rng::seeded(67);
        for _ in 0..20_000 {
            let len = rng.below(96) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            // Mostly ours, so the checks past the header run too.
            if bytes.len() >= 3 && rng.below(4) > 0 {
                bytes[0] = 0;
                bytes[1] = 7;
                bytes[2] |= 0x80;
            }
            let _ = check(&bytes, 7, &q);
        }
    }
}
