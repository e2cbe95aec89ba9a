//! An in-process DNS server (hickory-server) whose answers a test changes while it runs, standing in for
//! Docker's embedded DNS. Answers carry TTL 600, as Docker's do, so a resolver that cached would show it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SRV};
use hickory_server::proto::rr::{RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

/// What the server answers for a name.
#[derive(Debug, Clone)]
pub enum Reply {
    /// These addresses (A for IPv4, AAAA for IPv6; an empty NOERROR for the other family).
    Records(Vec<IpAddr>),
    NxDomain,
    ServFail,
    /// No answer for a long time: the resolver times out.
    Silent,
    /// A PTR record naming this host (for reverse lookups).
    Ptr(String),
    /// SRV records: (priority, weight, port, target host).
    Srv(Vec<(u16, u16, u16, String)>),
}

#[derive(Default)]
struct State {
    zone: HashMap<String, Reply>,
    delay: Duration,
    queries: HashMap<String, u64>,
}

pub struct FakeDns {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _server: Server<Handler>,
}

impl FakeDns {
    /// Serves UDP and TCP on one ephemeral port of 127.0.0.1.
    pub async fn start() -> FakeDns {
        let state = Arc::new(Mutex::new(State::default()));
        for _ in 0..50 {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp");
            let addr = udp.local_addr().expect("addr");
            let Ok(tcp) = tokio::net::TcpListener::bind(addr).await else {
                continue; // the TCP port is taken: try another
            };
            let mut server = Server::new(Handler(state.clone()));
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(5), 4096);
            return FakeDns {
                addr,
                state,
                _server: server,
            };
        }
        panic!("no port free for both UDP and TCP");
    }

    /// Sets the answer for `name` (no trailing dot).
    pub fn set(&self, name: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .zone
            .insert(name.to_lowercase(), reply);
    }

    /// Makes a reverse lookup of `ip` answer `name`, as Docker's DNS names a container's address.
    pub fn set_ptr(&self, ip: [u8; 4], name: &str) {
        let arpa = format!("{}.{}.{}.{}.in-addr.arpa", ip[3], ip[2], ip[1], ip[0]);
        self.set(&arpa, Reply::Ptr(name.to_string()));
    }

    /// SRV records for `name`: (priority, weight, port, target).
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let records = records
            .iter()
            .map(|(p, w, port, t)| (*p, *w, *port, t.to_string()))
            .collect();
        self.set(name, Reply::Srv(records));
    }

    pub fn set_ips(&self, name: &str, ips: &[[u8; 4]]) {
        self.set(
            name,
            Reply::Records(ips.iter().map(|ip| IpAddr::from(*ip)).collect()),
        );
    }

    /// Delays every answer by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// Queries received for `name` (A and AAAA each count).
    pub fn queries(&self, name: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.queries.get(&name.to_lowercase()).copied().unwrap_or(0)
    }
}

struct Handler(Arc<Mutex<State>>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let failed: ResponseInfo = Header {
            metadata: Metadata::response_from_request(&request.metadata),
            counts: HeaderCounts::default(),
        }
        .into();
        let Some(q) = request.queries.queries().first() else {
            return failed;
        };
        let name = q.name().to_string().trim_end_matches('.').to_lowercase();
        let qtype = q.query_type();
        let (reply, delay) = {
            let mut s = self.0.lock().unwrap();
            *s.queries.entry(name.clone()).or_default() += 1;
            (
                s.zone.get(&name).cloned().unwrap_or(Reply::NxDomain),
                s.delay,
            )
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let builder = MessageResponseBuilder::new(&request.queries, None);
        let sent = match reply {
            Reply::Silent => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return failed;
            }
            Reply::NxDomain => {
                response
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::NXDomain))
                    .await
            }
            Reply::ServFail => {
                response
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::ServFail))
                    .await
            }
            Reply::Ptr(target) => {
                let owner = q.original().name().clone();
                let records: Vec<Record> = match (
                    qtype,
                    hickory_server::proto::rr::Name::from_ascii(format!("{target}.")),
                ) {
                    (RecordType::PTR, Ok(t)) => {
                        vec![Record::from_rdata(owner, 600, RData::PTR(PTR(t)))]
                    }
                    _ => Vec::new(),
                };
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.recursion_available = true;
                response
                    .send_response(builder.build(metadata, records.iter(), [], [], []))
                    .await
            }
            Reply::Srv(list) => {
                let owner = q.original().name().clone();
                let records: Vec<Record> = list
                    .iter()
                    .filter(|_| qtype == RecordType::SRV)
                    .filter_map(|(p, w, port, target)| {
                        let t = hickory_server::proto::rr::Name::from_ascii(format!("{target}."))
                            .ok()?;
                        Some(Record::from_rdata(
                            owner.clone(),
                            600,
                            RData::SRV(SRV::new(*p, *w, *port, t)),
                        ))
                    })
                    .collect();
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.recursion_available = true;
                response
                    .send_response(builder.build(metadata, records.iter(), [], [], []))
                    .await
            }
            Reply::Records(ips) => {
                let owner = q.original().name().clone();
                let records: Vec<Record> = ips
                    .iter()
                    .filter_map(|ip| match (ip, qtype) {
                        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                        _ => None,
                    })
                    .map(|rdata| Record::from_rdata(owner.clone(), 600, rdata))
                    .collect();
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.recursion_available = true;
                response
                    .send_response(builder.build(metadata, records.iter(), [], [], []))
                    .await
            }
        };
        sent.unwrap_or(failed)
    }
}

/// A query for `name`'s A record with this `id`, recursion desired, as a datagram.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
