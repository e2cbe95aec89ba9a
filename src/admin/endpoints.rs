//! The admin API's endpoints: which path takes which methods, and what each does. Every mutation
//! validates its whole request before it changes anything, and answers with what it changed.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{connections, full, json_response, stats, Admin, ApiError, BoxBody, DASHBOARD};

/// Who the routing log and the events say asked for a kill: the API's token is not named.
const KILLED_BY: &str = "admin";
use crate::config::Weight;
use crate::control::Control;
use crate::pool::{AdminError, Source, State};
use crate::replicas::{ScaleError, ScaleRequest};
use crate::service::Service;

/// The backend a new connection from `ip` would get from `svc` now (moving nothing), and its name.
fn peek(svc: &Service, ip: std::net::IpAddr) -> (Option<SocketAddr>, Option<String>) {
    let backend = svc.pool.snapshot().peek(SocketAddr::new(ip, 0));
    let name = backend
        .and_then(|a| svc.pool.member(a))
        .and_then(|b| b.name())
        .map(|n| n.to_string());
    (backend, name)
}

/// Splits a percent-encoded path segment back into text (`%5B%3A%3A1%5D%3A80` → `[::1]:80`).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The endpoints, by path; each lists the methods it takes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Endpoint {
    Dashboard,
    Live,
    Ready,
    Backends,
    Backend(String, String),
    BackendDrain(String, String),
    /// `POST /backends/{service}/{address}/maint`.
    BackendMaint(String, String),
    /// `POST /services/{name}/failback`.
    Failback(String),
    Stats,
    Metrics,
    Events,
    Reload,
    /// The seed systems' routes: replicas of a service (named, or the only one).
    Rep(Option<String>),
    Add(Option<String>),
    Rm(Option<String>),
    Heartbeat,
    /// Which backend a client would get: `/route?client=IP[&service=NAME]`.
    Route,
    /// `GET /connections` (the live ones, filtered), `DELETE /connections?filters` (every match).
    Connections,
    /// `GET` or `DELETE /connections/{id}`.
    Connection(u64),
    /// The runtime deny list: `GET` and `POST /deny`.
    Deny,
    /// `DELETE /deny/{cidr}` (the `/` as `%2F`; a bare `/deny/ADDR/LEN` is taken too).
    DenyEntry(String),
}

impl Endpoint {
    pub(super) fn parse(path: &str) -> Option<Endpoint> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        Some(match segs.as_slice() {
            [] | [""] => Endpoint::Dashboard,
            ["live"] => Endpoint::Live,
            ["ready"] => Endpoint::Ready,
            ["backends"] => Endpoint::Backends,
            ["backends", s, a] => Endpoint::Backend(percent_decode(s)?, percent_decode(a)?),
            ["backends", s, a, "drain"] => {
                Endpoint::BackendDrain(percent_decode(s)?, percent_decode(a)?)
            }
            ["backends", s, a, "maint"] => {
                Endpoint::BackendMaint(percent_decode(s)?, percent_decode(a)?)
            }
            ["services", s, "failback"] => Endpoint::Failback(percent_decode(s)?),
            ["stats"] => Endpoint::Stats,
            ["metrics"] => Endpoint::Metrics,
            ["events"] => Endpoint::Events,
            ["reload"] => Endpoint::Reload,
            ["rep"] => Endpoint::Rep(None),
            ["add"] => Endpoint::Add(None),
            ["rm"] => Endpoint::Rm(None),
            ["heartbeat"] => Endpoint::Heartbeat,
            ["route"] => Endpoint::Route,
            ["connections"] => Endpoint::Connections,
            ["connections", id] => Endpoint::Connection(id.parse().ok()?),
            ["deny"] => Endpoint::Deny,
            ["deny", c] => Endpoint::DenyEntry(percent_decode(c)?),
            ["deny", a, len] => {
                Endpoint::DenyEntry(format!("{}/{}", percent_decode(a)?, percent_decode(len)?))
            }
            ["services", s, "rep"] => Endpoint::Rep(Some(percent_decode(s)?)),
            ["services", s, "add"] => Endpoint::Add(Some(percent_decode(s)?)),
            ["services", s, "rm"] => Endpoint::Rm(Some(percent_decode(s)?)),
            _ => return None,
        })
    }

    pub(super) fn methods(&self) -> &'static [Method] {
        match self {
            Endpoint::Backends | Endpoint::Deny => &[Method::GET, Method::POST],
            Endpoint::DenyEntry(_) => &[Method::DELETE],
            Endpoint::Backend(..) => &[Method::GET, Method::PUT, Method::DELETE],
            Endpoint::BackendDrain(..)
            | Endpoint::BackendMaint(..)
            | Endpoint::Failback(_)
            | Endpoint::Reload
            | Endpoint::Add(_) => &[Method::POST],
            Endpoint::Rm(_) => &[Method::DELETE],
            Endpoint::Connections | Endpoint::Connection(_) => &[Method::GET, Method::DELETE],
            _ => &[Method::GET],
        }
    }
}

/// `POST /backends`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    service: String,
    address: String,
    #[serde(default)]
    weight: Weight,
}

/// `PUT /backends/{service}/{address}`: at least one of the two.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBackend {
    #[serde(default)]
    weight: Option<Weight>,
    #[serde(default)]
    state: Option<SetState>,
}

/// The states the API may set.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum SetState {
    Active,
    Draining,
    Maint,
}

impl From<SetState> for State {
    fn from(s: SetState) -> State {
        match s {
            SetState::Active => State::Active,
            SetState::Draining => State::Draining,
            SetState::Maint => State::Maint,
        }
    }
}

/// `POST /add` and `DELETE /rm`: `{"n": 2, "hostnames": ["S5"]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    /// How many replicas; checked (positive, within min and max) by `replicas::plan`.
    #[serde(deserialize_with = "integer")]
    n: i64,
    #[serde(default)]
    hostnames: Option<Vec<String>>,
}

/// An integer, or a refusal saying what was given instead ("2", 1.5).
fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    v.as_i64()
        .ok_or_else(|| serde::de::Error::custom(format!("must be an integer, not {v}")))
}

impl From<ScaleBody> for ScaleRequest {
    fn from(b: ScaleBody) -> ScaleRequest {
        ScaleRequest {
            n: b.n,
            hostnames: b.hostnames.unwrap_or_default(),
        }
    }
}

/// A request body as `T`, or what is wrong with it: bad JSON, not an object, or the field that does
/// not fit and why (`weight: must be from 1 to 1000, got 0`).
pub(super) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        // serde would take a list for a struct's fields in order.
        return Err(ApiError::bad_request(format!(
            "the body must be a JSON object, not {v}"
        )));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // An unknown field's path is the field itself, which the message names already.
        ApiError::bad_request(if path == "." || inner.starts_with("unknown field") {
            inner
        } else {
            format!("{path}: {inner}")
        })
    })
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let status = match e {
            AdminError::Exists(_) => StatusCode::CONFLICT,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            // Not 409, which says the address is a backend already.
            AdminError::ApiLimit(_) | AdminError::PoolFull(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<ScaleError> for ApiError {
    fn from(e: ScaleError) -> ApiError {
        let status = match &e {
            ScaleError::Refused(_) => StatusCode::BAD_REQUEST,
            ScaleError::Docker { error, .. } => {
                StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        };
        ApiError::new(status, e.to_string()).seed()
    }
}

pub(super) type Answer = Result<Response<BoxBody>, ApiError>;

impl Admin {
    /// Answers a request the server has checked (method, token, body size): one handler per
    /// endpoint.
    pub(super) async fn dispatch(
        &self,
        endpoint: Endpoint,
        method: Method,
        query: &str,
        body: &[u8],
    ) -> Answer {
        let c = &self.control;
        match (endpoint, method) {
            (Endpoint::Dashboard, _) => Ok(text(DASHBOARD, "text/html; charset=utf-8")),
            (Endpoint::Live, _) => Ok(json_response(StatusCode::OK, &json!({"live": true}))),
            (Endpoint::Ready, _) => Ok(self.ready()),
            (Endpoint::Backends, Method::POST) => self.add_backend(body),
            (Endpoint::Backends, _) => Ok(json_response(
                StatusCode::OK,
                &Value::Array(stats::backends(c)),
            )),
            (Endpoint::Backend(s, a), Method::GET) => self.backend(&s, &a),
            (Endpoint::Backend(s, a), Method::PUT) => self.update_backend(&s, &a, body),
            (Endpoint::Backend(s, a), _) => self.remove_backend(&s, &a, query),
            (Endpoint::BackendDrain(s, a), _) => self.set_backend_state(&s, &a, State::Draining),
            (Endpoint::BackendMaint(s, a), _) => self.set_backend_state(&s, &a, State::Maint),
            (Endpoint::Failback(s), _) => self.failback(&s),
            (Endpoint::Heartbeat, _) => Ok(seed_answer(json!("alive"))),
            (Endpoint::Route, _) => self.route_of(query),
            (Endpoint::Rep(name), _) => {
                let service = self.seed_service(name, query)?;
                Ok(seed_list(self.replica_names(&service)))
            }
            (Endpoint::Add(name), _) => self.scale(name, query, body, true).await,
            (Endpoint::Rm(name), _) => self.scale(name, query, body, false).await,
            (Endpoint::Stats, _) => Ok(self.stats(query)),
            (Endpoint::Metrics, _) => Ok(text(
                super::metrics::render(c),
                "text/plain; version=0.0.4; charset=utf-8",
            )),
            (Endpoint::Events, _) => self.events_stream(),
            (Endpoint::Reload, _) => Ok(self.reload()),
            (Endpoint::Connections, Method::GET) => {
                let f = self.connection_filter(query)?;
                let draining = c.readiness().is_draining();
                Ok(json_response(
                    StatusCode::OK,
                    &connections::list(&f, draining),
                ))
            }
            (Endpoint::Connections, _) => {
                let f = self.connection_filter(query)?;
                if !f.selects() {
                    return Err(ApiError::bad_request(
                        "give at least one filter (service, listen, backend, client, older_than, idle_longer_than, state, protocol): DELETE /connections does not end every connection",
                    ));
                }
                let draining = c.readiness().is_draining();
                let killed = connections::kill_matching(&f, draining, KILLED_BY, c.events());
                Ok(json_response(StatusCode::OK, &json!({"killed": killed})))
            }
            (Endpoint::Connection(id), method) => {
                let f = self.connection_filter(query)?;
                let gone = || ApiError::not_found(format!("no open connection has id {id}"));
                if method == Method::GET {
                    let one =
                        connections::list_one(id, c.readiness().is_draining()).ok_or_else(gone)?;
                    return Ok(json_response(StatusCode::OK, &one));
                }
                let (first, one) =
                    connections::kill_one(id, f.how, KILLED_BY, c.events()).ok_or_else(gone)?;
                // 0 when an earlier ask is ending it already.
                let killed = u32::from(first);
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"killed": killed, "connection": one}),
                ))
            }
            (Endpoint::Deny, Method::POST) => self.deny_add(body),
            (Endpoint::Deny, _) => self.deny_list(),
            (Endpoint::DenyEntry(c), _) => self.deny_remove(&c),
        }
    }

    /// The filters of a `/connections` request, or a 400 naming the bad one.
    fn connection_filter(&self, query: &str) -> Result<connections::Filter, ApiError> {
        connections::Filter::parse(query, percent_decode).map_err(ApiError::bad_request)
    }

    /// `GET /ready`: 200 when ready, 503 before and while draining, with the drain's progress.
    fn ready(&self) -> Response<BoxBody> {
        let c = &self.control;
        let ready = c.readiness().is_ready();
        let body = json!({
            "ready": ready,
            "draining": c.readiness().is_draining(),
            "drain": drain_json(c),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &body)
    }

    /// `GET /stats[?history]`: the latest frame, and the chart history when asked.
    fn stats(&self, query: &str) -> Response<BoxBody> {
        let mut frame = self.sampler.latest_value();
        if query_param(query, "history").is_some() {
            frame["history"] = self.sampler.history();
        }
        json_response(StatusCode::OK, &frame)
    }

    /// `POST /reload`: reading and binding are quick and must not race a signal-driven reload.
    fn reload(&self) -> Response<BoxBody> {
        match self.control.reload_from_file() {
            Ok(report) => {
                json_response(StatusCode::OK, &json!({"reloaded": true, "report": report}))
            }
            Err(e) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({"reloaded": false, "error": e.to_string()}),
            ),
        }
    }

    /// `GET /backends/{service}/{address}`.
    fn backend(&self, s: &str, a: &str) -> Answer {
        let (svc, addr) = self.find(s, a)?;
        let b = svc
            .pool
            .all_backends()
            .into_iter()
            .find(|b| b.addr == addr)
            .ok_or_else(|| ApiError::not_found(format!("{addr} is not a backend of {s}")))?;
        let mut v = stats::backend_json(&svc.name, &b);
        if let Some(r) = stats::replica_info(&self.control).get(&(svc.name.clone(), addr)) {
            v["replica"] = r.clone();
        }
        Ok(json_response(StatusCode::OK, &v))
    }

    /// `DELETE /backends/{service}/{address}[?mode=drain|close]`.
    fn remove_backend(&self, s: &str, a: &str, query: &str) -> Answer {
        let close = match query_param(query, "mode") {
            None | Some("drain") => false,
            Some("close") => true,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "mode must be drain or close, not {other:?}"
                )))
            }
        };
        let (svc, addr) = self.find(s, a)?;
        svc.pool.remove_api(addr, close)?;
        let mode = if close { "close" } else { "drain" };
        Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({"service": s, "address": addr, "removed": true, "mode": mode}),
        ))
    }

    /// `POST /backends/{service}/{address}/drain` and `.../maint`.
    fn set_backend_state(&self, s: &str, a: &str, state: State) -> Answer {
        let (svc, addr) = self.find(s, a)?;
        svc.pool.set_state(addr, state)?;
        Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({"service": s, "address": addr, "state": state.as_str()}),
        ))
    }

    /// `POST /services/{name}/failback`: traffic back to the best tier with an eligible backend.
    /// 409 when that tier serves already (nothing to fail back to).
    fn failback(&self, s: &str) -> Answer {
        let svc = self
            .control
            .service(s)
            .ok_or_else(|| ApiError::not_found(format!("no service named {s:?}")))?;
        match svc.pool.failback() {
            Some(change) => Ok(json_response(
                StatusCode::OK,
                &json!({"service": s, "serving_tier": change.to, "was": change.from}),
            )),
            None => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{s}: the best tier with an eligible backend serves already (serving tier: {})",
                    svc.pool
                        .snapshot()
                        .serving_tier
                        .map_or_else(|| "none".to_string(), |t| t.to_string())
                ),
            )),
        }
    }

    /// `GET /route?client=IP[&service=NAME]`: the backend a new connection from `IP` would get now,
    /// changing nothing (`pool::Snapshot::peek`). With `source_hash` it is how balancer replicas are
    /// checked for agreement.
    fn route_of(&self, query: &str) -> Answer {
        let param = |k: &str| query_param(query, k).map(|v| percent_decode(v).unwrap_or_default());
        let client = param("client")
            .map(|c| {
                c.parse::<std::net::IpAddr>()
                    .map_err(|_| ApiError::bad_request(format!("{c:?} is not an IP address")))
            })
            .transpose()?;
        if let Some(listen) = param("listen") {
            let udp = match param("protocol").as_deref() {
                None | Some("tcp") => false,
                Some("udp") => true,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "protocol: {other:?} is not tcp or udp"
                    )))
                }
            };
            let asked = Asked {
                sni: param("sni"),
                alpn: param("alpn"),
                client,
                udp,
            };
            return self.route_on(&listen, asked);
        }
        let ip = client.ok_or_else(|| {
            ApiError::bad_request(
                "give ?client=IP (and &service=NAME with several services), or ?listen=ADDR&sni=NAME&alpn=P",
            )
        })?;
        let named = query_param(query, "service").map(str::to_string);
        let service = self.seed_service(named, "").map_err(|_| {
            ApiError::bad_request(
                "name the service: &service=NAME (there is none by that name, or several)",
            )
        })?;
        let svc = self
            .control
            .service(&service)
            .ok_or_else(|| ApiError::not_found(format!("no service named {service:?}")))?;
        let (backend, name) = peek(&svc, ip);
        Ok(json_response(
            StatusCode::OK,
            &json!({"service": service, "client": ip, "policy": svc.policy.as_str(),
                    "backend": backend, "name": name, "instance": self.control.instance()}),
        ))
    }

    /// `GET /route?listen=ADDR&sni=NAME&alpn=P[,Q][&client=IP][&protocol=udp]`: the service a
    /// client reaching ADDR with that server name and those protocols would get, why, and its
    /// backend now (with `protocol=udp`, a QUIC client of a UDP address).
    fn route_on(&self, listen: &str, asked: Asked) -> Answer {
        let Asked {
            sni,
            alpn,
            client,
            udp,
        } = asked;
        let addr: SocketAddr = listen
            .parse()
            .map_err(|_| ApiError::bad_request(format!("listen: {listen:?} is not ip:port")))?;
        let protocols: Vec<Vec<u8>> = alpn
            .iter()
            .flat_map(|a| a.split(','))
            .filter(|p| !p.is_empty())
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let protocol = if udp { "udp" } else { "tcp" };
        let chosen = if udp {
            self.control.udp.explain(addr, sni.as_deref(), &protocols)
        } else {
            self.control.explain_route(addr, sni.as_deref(), &protocols)
        }
        .ok_or_else(|| ApiError::not_found(format!("nothing listens on {protocol} {addr}")))?;
        let ip = client.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let answer = match chosen {
            Some((svc, why)) => {
                let (mut backend, name) = peek(&svc, ip);
                if svc.backend_port == crate::config::BackendPort::Same {
                    // Connected at the port the client reached, as the session would.
                    backend = backend.map(|b| SocketAddr::new(b.ip(), addr.port()));
                }
                json!({"listen": addr, "protocol": protocol, "sni": sni, "alpn": alpn, "service": &*svc.name,
                       "route": why, "policy": svc.policy.as_str(), "backend": backend,
                       "name": name, "instance": self.control.instance()})
            }
            None => {
                json!({"listen": addr, "protocol": protocol, "sni": sni, "alpn": alpn, "service": null,
                           "route": "no_route", "backend": null,
                           "instance": self.control.instance()})
            }
        };
        Ok(json_response(StatusCode::OK, &answer))
    }

    /// The service a seed route is about: the one it names (in the path or `?service=`), or the only
    /// one there is.
    fn seed_service(&self, named: Option<String>, query: &str) -> Result<String, ApiError> {
        let named = named.or_else(|| query_param(query, "service").map(str::to_string));
        let services = self.control.services();
        match named {
            Some(n) if services.iter().any(|s| *s.service.name == *n) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!("no service named {n:?}")).seed()),
            None if services.len() == 1 => Ok(services[0].service.name.to_string()),
            None => Err(ApiError::bad_request(format!(
                "there are {} services: name one, as /services/NAME/rep or ?service=NAME",
                services.len()
            ))
            .seed()),
        }
    }

    /// The hostnames of a service's replicas: the ones sluicegate runs, then every other backend by
    /// its name (reverse DNS), else its address.
    fn replica_names(&self, service: &str) -> Vec<String> {
        let c = &self.control;
        let mut names = c
            .replicas(service)
            .map(|set| set.hostnames())
            .unwrap_or_default();
        if let Some(svc) = c.service(service) {
            let mut others: Vec<String> = svc
                .pool
                .members()
                .iter()
                .filter(|b| !b.sources().contains(&Source::Docker))
                .map(|b| {
                    b.name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| b.addr.to_string())
                })
                .collect();
            others.sort();
            names.extend(others);
        }
        names
    }

    /// `POST /add` and `DELETE /rm`: validated whole, then done on the control runtime.
    async fn scale(&self, named: Option<String>, query: &str, body: &[u8], add: bool) -> Answer {
        let service = self.seed_service(named, query)?;
        let set = self.control.replicas(&service).ok_or_else(|| {
            ApiError::bad_request(format!(
                "service {service:?} has no replicas section: sluicegate does not run its containers"
            ))
            .seed()
        })?;
        let req: ScaleRequest = parse_body::<ScaleBody>(body)
            .map_err(ApiError::seed)?
            .into();
        let done = self
            .control
            .on_control(async move {
                if add {
                    set.add(req).await
                } else {
                    set.remove(req).await
                }
            })
            .await;
        let stopping =
            || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sluicegate is stopping").seed();
        Ok(seed_list(done.ok_or_else(stopping)??))
    }

    /// The service named `s` and the socket address `a`.
    fn find(&self, s: &str, a: &str) -> Result<(Arc<Service>, SocketAddr), ApiError> {
        let svc = self
            .control
            .service(s)
            .ok_or_else(|| ApiError::not_found(format!("no service named {s:?}")))?;
        let addr: SocketAddr = a
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{a:?} is not an ip:port address")))?;
        Ok((svc, addr))
    }

    /// `POST /backends`.
    fn add_backend(&self, body: &[u8]) -> Answer {
        let req: AddBackend = parse_body(body)?;
        let (svc, addr) = self.find(&req.service, &req.address)?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(ApiError::bad_request(format!(
                "{addr} is not a connectable address"
            )));
        }
        svc.pool.add_api(addr, req.weight)?;
        let view = svc
            .pool
            .member(addr)
            .map(|b| stats::backend_json(&svc.name, &b))
            .unwrap_or(Value::Null);
        Ok(json_response(StatusCode::CREATED, &view))
    }

    /// `PUT /backends/{service}/{address}`.
    fn update_backend(&self, s: &str, a: &str, body: &[u8]) -> Answer {
        let req: UpdateBackend = parse_body(body)?;
        let (svc, addr) = self.find(s, a)?;
        if req.weight.is_none() && req.state.is_none() {
            return Err(ApiError::bad_request(
                "nothing to change: give weight and/or state",
            ));
        }
        if let Some(w) = req.weight {
            svc.pool.set_weight(addr, w)?;
        }
        if let Some(st) = req.state {
            svc.pool.set_state(addr, st.into())?;
        }
        let b = svc
            .pool
            .member(addr)
            .ok_or_else(|| ApiError::not_found(format!("{addr} is not a backend of {s}")))?;
        Ok(json_response(
            StatusCode::OK,
            &stats::backend_json(&svc.name, &b),
        ))
    }
}

/// A text response of `content_type`.
fn text(body: impl Into<Bytes>, content_type: &'static str) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The seed systems' answer shape: `{"message": …, "status": "successful"}` (refusals are
/// [`ApiError::seed`]).
fn seed_answer(message: Value) -> Response<BoxBody> {
    json_response(
        StatusCode::OK,
        &json!({"message": message, "status": "successful"}),
    )
}

fn seed_list(replicas: Vec<String>) -> Response<BoxBody> {
    seed_answer(json!({"N": replicas.len(), "replicas": replicas}))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn drain_json(c: &Control) -> Value {
    let d = c.drain_progress();
    let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
    if d.draining {
        let per_backend: Vec<Value> = c
            .backends()
            .into_iter()
            .filter(|(_, b)| b.active() > 0)
            .map(|(svc, b)| json!({"service": &*svc, "backend": b.addr, "remaining": b.active()}))
            .collect();
        v["backends"] = Value::Array(per_backend);
        v["oldest_connection_s"] = c
            .services()
            .iter()
            .filter_map(|s| s.service.occupancy.sessions.oldest_age())
            .max()
            .map(|d| Value::from(d.as_secs_f64()))
            .unwrap_or(Value::Null);
    }
    v
}

/// What `GET /route?listen=ADDR` asks about, besides the address.
struct Asked {
    sni: Option<String>,
    alpn: Option<String>,
    client: Option<std::net::IpAddr>,
    /// A QUIC client of a UDP address (`protocol=udp`), not a TCP one.
    udp: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(Endpoint::parse("/"), Some(Endpoint::Dashboard));
        assert_eq!(Endpoint::parse("/metrics"), Some(Endpoint::Metrics));
        assert_eq!(
            Endpoint::parse("/backends/web/127.0.0.1:9001"),
            Some(Endpoint::Backend("web".into(), "127.0.0.1:9001".into()))
        );
        assert_eq!(
            Endpoint::parse("/backends/web/%5B%3A%3A1%5D%3A80/drain"),
            Some(Endpoint::BackendDrain("web".into(), "[::1]:80".into()))
        );
        assert_eq!(Endpoint::parse("/nope"), None);
        for path in [
            "/deny/203.0.113.0%2F24",
            "/deny/203.0.113.0%2f24",
            "/deny/203.0.113.0/24",
        ] {
            assert_eq!(
                Endpoint::parse(path),
                Some(Endpoint::DenyEntry("203.0.113.0/24".into())),
                "{path}"
            );
        }
        assert_eq!(
            Endpoint::DenyEntry(String::new()).methods(),
            &[Method::DELETE]
        );
        assert!(!Endpoint::Reload.methods().contains(&Method::GET));
        assert!(Endpoint::Backends.methods().contains(&Method::POST));
    }

    /// Each body is refused naming what is wrong with it, the field first where there is one.
    #[test]
    fn bodies_are_refused_naming_the_field() {
        let scale = |b: &str| {
            parse_body::<ScaleBody>(b.as_bytes())
                .err()
                .map(|e| e.message)
        };
        assert_eq!(
            scale(r#"{"n": "2"}"#).unwrap(),
            "n: must be an integer, not \"2\""
        );
        assert_eq!(
            scale(r#"{"n": 1.5}"#).unwrap(),
            "n: must be an integer, not 1.5"
        );
        assert_eq!(scale(r#"{"hostnames": []}"#).unwrap(), "missing field `n`");
        assert!(scale(r#"{"n": 1, "hostnames": [5]}"#)
            .unwrap()
            .starts_with("hostnames[0]: invalid type"));
        assert_eq!(
            scale(r#"{"n": 1, "names": []}"#).unwrap(),
            "unknown field `names`, expected `n` or `hostnames`"
        );
        // serde alone would read a list as the fields in order.
        assert_eq!(
            scale("[1]").unwrap(),
            "the body must be a JSON object, not [1]"
        );
        assert!(scale(r#"{"n": 1"#).unwrap().starts_with("invalid JSON: "));
        assert!(scale(r#"{"n": 1} x"#)
            .unwrap()
            .starts_with("invalid JSON: "));
        let ok = parse_body::<ScaleBody>(br#"{"n": 2, "hostnames": null}"#).unwrap();
        assert_eq!((ok.n, ok.hostnames), (2, None));

        let add = |b: &str| parse_body::<AddBackend>(b.as_bytes()).map_err(|e| e.message);
        let a = add(r#"{"service": "web", "address": "127.0.0.1:1"}"#).unwrap();
        assert_eq!(a.weight, Weight::ONE);
        assert_eq!(
            add(r#"{"service": "web", "address": "127.0.0.1:1", "weight": 0}"#).err(),
            Some("weight: must be from 1 to 1000, got 0".into())
        );
        let update = |b: &str| {
            parse_body::<UpdateBackend>(b.as_bytes())
                .err()
                .map(|e| e.message)
        };
        assert_eq!(
            update(r#"{"weight": 1001}"#).unwrap(),
            "weight: must be from 1 to 1000, got 1001"
        );
        assert!(update(r#"{"state": "gone"}"#)
            .unwrap()
            .starts_with("state: unknown variant `gone`"));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("mode=close", "mode"), Some("close"));
        assert_eq!(query_param("a=1&history", "history"), Some(""));
        assert_eq!(query_param("", "mode"), None);
    }
}
