//! The admin API's endpoints: which path takes which methods, and what each does. Every mutation
//! validates its whole request before it changes anything, and answers with what it changed.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, full, json_response, stats, Admin, BoxBody, DASHBOARD};
use crate::config::MAX_WEIGHT;
use crate::control::Control;
use crate::pool::{AdminError, Source, State};
use crate::replicas::{ScaleError, ScaleRequest};
use crate::service::Service;

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
pub(super) enum Route {
    Dashboard,
    Live,
    Ready,
    Backends,
    Backend(String, String),
    BackendDrain(String, String),
    Stats,
    Metrics,
    Events,
    Reload,
    /// The seed systems' routes: replicas of a service (named, or the only one).
    Rep(Option<String>),
    Add(Option<String>),
    Rm(Option<String>),
    Heartbeat,
    /// Which backend a client would get: `?client=IP[&service=NAME]`.
    Where,
}

impl Route {
    pub(super) fn parse(path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        Some(match segs.as_slice() {
            [] | [""] => Route::Dashboard,
            ["live"] => Route::Live,
            ["ready"] => Route::Ready,
            ["backends"] => Route::Backends,
            ["backends", s, a] => Route::Backend(percent_decode(s)?, percent_decode(a)?),
            ["backends", s, a, "drain"] => {
                Route::BackendDrain(percent_decode(s)?, percent_decode(a)?)
            }
            ["stats"] => Route::Stats,
            ["metrics"] => Route::Metrics,
            ["events"] => Route::Events,
            ["reload"] => Route::Reload,
            ["rep"] => Route::Rep(None),
            ["add"] => Route::Add(None),
            ["rm"] => Route::Rm(None),
            ["heartbeat"] => Route::Heartbeat,
            ["route"] => Route::Where,
            ["services", s, "rep"] => Route::Rep(Some(percent_decode(s)?)),
            ["services", s, "add"] => Route::Add(Some(percent_decode(s)?)),
            ["services", s, "rm"] => Route::Rm(Some(percent_decode(s)?)),
            _ => return None,
        })
    }

    pub(super) fn methods(&self) -> &'static [Method] {
        match self {
            Route::Backends => &[Method::GET, Method::POST],
            Route::Backend(..) => &[Method::GET, Method::PUT, Method::DELETE],
            Route::BackendDrain(..) | Route::Reload | Route::Add(_) => &[Method::POST],
            Route::Rm(_) => &[Method::DELETE],
            _ => &[Method::GET],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    service: String,
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBackend {
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    state: Option<String>,
}

impl Admin {
    pub(super) async fn route(
        &self,
        route: Route,
        method: Method,
        query: &str,
        body: &[u8],
    ) -> Response<BoxBody> {
        let c = &self.control;
        match (route, method) {
            (Route::Dashboard, _) => {
                let mut r = Response::new(full(DASHBOARD));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            (Route::Live, _) => json_response(StatusCode::OK, &json!({"live": true})),
            (Route::Ready, _) => {
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
            (Route::Backends, Method::POST) => self.add_backend(body),
            (Route::Backends, _) => {
                json_response(StatusCode::OK, &Value::Array(stats::backends(c)))
            }
            (Route::Backend(s, a), Method::GET) => match self.find(&s, &a) {
                Ok((svc, addr)) => {
                    match svc.pool.all_backends().into_iter().find(|b| b.addr == addr) {
                        Some(b) => {
                            let mut v = stats::backend_json(&svc.name, &b);
                            if let Some(r) = stats::replica_info(c).get(&(svc.name.clone(), addr)) {
                                v["replica"] = r.clone();
                            }
                            json_response(StatusCode::OK, &v)
                        }
                        None => error(
                            StatusCode::NOT_FOUND,
                            format!("{addr} is not a backend of {s}"),
                        ),
                    }
                }
                Err(r) => r,
            },
            (Route::Backend(s, a), Method::PUT) => self.update_backend(&s, &a, body),
            (Route::Backend(s, a), _) => {
                let close = match query_param(query, "mode") {
                    None | Some("drain") => false,
                    Some("close") => true,
                    Some(other) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("mode must be drain or close, not {other:?}"),
                        )
                    }
                };
                match self.find(&s, &a) {
                    Ok((svc, addr)) => match svc.pool.remove_api(addr, close) {
                        Ok(_) => json_response(
                            StatusCode::ACCEPTED,
                            &json!({"service": s, "address": addr, "removed": true,
                                    "mode": if close { "close" } else { "drain" }}),
                        ),
                        Err(e) => admin_error(e),
                    },
                    Err(r) => r,
                }
            }
            (Route::BackendDrain(s, a), _) => match self.find(&s, &a) {
                Ok((svc, addr)) => match svc.pool.set_state(addr, State::Draining) {
                    Ok(_) => json_response(
                        StatusCode::ACCEPTED,
                        &json!({"service": s, "address": addr, "state": "draining"}),
                    ),
                    Err(e) => admin_error(e),
                },
                Err(r) => r,
            },
            (Route::Heartbeat, _) => seed_answer(StatusCode::OK, json!("alive"), true),
            (Route::Where, _) => self.route_of(query),
            (Route::Rep(name), _) => match self.seed_service(name, query) {
                Ok(svc) => seed_list(self.replica_names(&svc)),
                Err(r) => r,
            },
            (Route::Add(name), _) => self.scale(name, query, body, true).await,
            (Route::Rm(name), _) => self.scale(name, query, body, false).await,
            (Route::Stats, _) => {
                let mut frame = self.sampler.latest_value();
                if query_param(query, "history").is_some() {
                    frame["history"] = self.sampler.history();
                }
                json_response(StatusCode::OK, &frame)
            }
            (Route::Metrics, _) => {
                let mut r = Response::new(full(crate::metrics::render(c)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (Route::Events, _) => self.events_stream(),
            (Route::Reload, _) => {
                // Reading and binding are quick and must not race a signal-driven reload.
                match c.reload_from_file() {
                    Ok(report) => {
                        json_response(StatusCode::OK, &json!({"reloaded": true, "report": report}))
                    }
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"reloaded": false, "error": e.to_string()}),
                    ),
                }
            }
        }
    }

    /// `GET /route?client=IP[&service=NAME]`: the backend a new connection from `IP` would get now.
    /// With `source_hash` it is exact and changes nothing, which is how balancer replicas are checked
    /// for agreement; with the other policies it is the next pick, and counts as one.
    fn route_of(&self, query: &str) -> Response<BoxBody> {
        let Some(client) = query_param(query, "client") else {
            return error(
                StatusCode::BAD_REQUEST,
                "give ?client=IP (and &service=NAME with several services)",
            );
        };
        let Ok(ip) = percent_decode(client)
            .unwrap_or_default()
            .parse::<std::net::IpAddr>()
        else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{client:?} is not an IP address"),
            );
        };
        let service = match self.seed_service(query_param(query, "service").map(str::to_string), "")
        {
            Ok(s) => s,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "name the service: &service=NAME (there is none by that name, or several)",
                )
            }
        };
        let Some(svc) = self.control.service(&service) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("no service named {service:?}"),
            );
        };
        let backend = svc.pool.snapshot().route(SocketAddr::new(ip, 0));
        let name = backend
            .and_then(|a| svc.pool.member(a))
            .and_then(|b| b.name())
            .map(|n| n.to_string());
        json_response(
            StatusCode::OK,
            &json!({"service": service, "client": ip, "policy": svc.policy.as_str(),
                    "backend": backend, "name": name, "instance": self.control.instance()}),
        )
    }

    /// The service a seed route is about: the one it names (in the path or `?service=`), or the only
    /// one there is.
    #[allow(clippy::result_large_err)]
    fn seed_service(
        &self,
        named: Option<String>,
        query: &str,
    ) -> Result<String, Response<BoxBody>> {
        let named = named.or_else(|| query_param(query, "service").map(str::to_string));
        let services = self.control.services();
        match named {
            Some(n) if services.iter().any(|s| *s.service.name == *n) => Ok(n),
            Some(n) => Err(seed_fail(
                StatusCode::BAD_REQUEST,
                format!("no service named {n:?}"),
            )),
            None if services.len() == 1 => Ok(services[0].service.name.to_string()),
            None => Err(seed_fail(
                StatusCode::BAD_REQUEST,
                format!(
                    "there are {} services: name one, as /services/NAME/rep or ?service=NAME",
                    services.len()
                ),
            )),
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
    async fn scale(
        &self,
        named: Option<String>,
        query: &str,
        body: &[u8],
        add: bool,
    ) -> Response<BoxBody> {
        let service = match self.seed_service(named, query) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let Some(set) = self.control.replicas(&service) else {
            return seed_fail(
                StatusCode::BAD_REQUEST,
                format!("service {service:?} has no replicas section: sluicegate does not run its containers"),
            );
        };
        let req = match parse_scale(body) {
            Ok(r) => r,
            Err(e) => return seed_fail(StatusCode::BAD_REQUEST, e),
        };
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
        match done {
            None => seed_fail(StatusCode::SERVICE_UNAVAILABLE, "sluicegate is stopping"),
            Some(Ok(list)) => seed_list(list),
            Some(Err(ScaleError::Refused(r))) => seed_fail(StatusCode::BAD_REQUEST, r.to_string()),
            Some(Err(e @ ScaleError::Docker { .. })) => {
                let status = match &e {
                    ScaleError::Docker { error, .. } => error.http_status(),
                    ScaleError::Refused(_) => 400,
                };
                seed_fail(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    e.to_string(),
                )
            }
        }
    }

    /// The service named `s` and the socket address `a`, or the error response.
    #[allow(clippy::result_large_err)]
    fn find(&self, s: &str, a: &str) -> Result<(Arc<Service>, SocketAddr), Response<BoxBody>> {
        let svc = self
            .control
            .service(s)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no service named {s:?}")))?;
        let addr: SocketAddr = a.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{a:?} is not an ip:port address"),
            )
        })?;
        Ok((svc, addr))
    }

    fn add_backend(&self, body: &[u8]) -> Response<BoxBody> {
        let req: AddBackend = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        if req.weight == 0 || req.weight > MAX_WEIGHT {
            return error(
                StatusCode::BAD_REQUEST,
                format!("weight must be from 1 to {MAX_WEIGHT}, got {}", req.weight),
            );
        }
        let (svc, addr) = match self.find(&req.service, &req.address) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{addr} is not a connectable address"),
            );
        }
        match svc.pool.add_api(addr, req.weight) {
            Ok(_) => {
                let view = svc
                    .pool
                    .member(addr)
                    .map(|b| stats::backend_json(&svc.name, &b))
                    .unwrap_or(Value::Null);
                json_response(StatusCode::CREATED, &view)
            }
            Err(e) => admin_error(e),
        }
    }

    fn update_backend(&self, s: &str, a: &str, body: &[u8]) -> Response<BoxBody> {
        let req: UpdateBackend = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        let (svc, addr) = match self.find(s, a) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let state = match req.state.as_deref() {
            None => None,
            Some("active") => Some(State::Active),
            Some("draining") => Some(State::Draining),
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("state must be active or draining, not {other:?}"),
                )
            }
        };
        if let Some(w) = req.weight {
            if w == 0 || w > MAX_WEIGHT {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("weight must be from 1 to {MAX_WEIGHT}, got {w}"),
                );
            }
        }
        if req.weight.is_none() && state.is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "nothing to change: give weight and/or state",
            );
        }
        if let Some(w) = req.weight {
            if let Err(e) = svc.pool.set_weight(addr, w) {
                return admin_error(e);
            }
        }
        if let Some(st) = state {
            if let Err(e) = svc.pool.set_state(addr, st) {
                return admin_error(e);
            }
        }
        match svc.pool.member(addr) {
            Some(b) => json_response(StatusCode::OK, &stats::backend_json(&svc.name, &b)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("{addr} is not a backend of {s}"),
            ),
        }
    }
}

/// The seed systems' answer shape: `{"message": …, "status": "successful" | "failure"}`.
fn seed_answer(status: StatusCode, message: Value, ok: bool) -> Response<BoxBody> {
    json_response(
        status,
        &json!({"message": message, "status": if ok { "successful" } else { "failure" }}),
    )
}

fn seed_list(replicas: Vec<String>) -> Response<BoxBody> {
    seed_answer(
        StatusCode::OK,
        json!({"N": replicas.len(), "replicas": replicas}),
        true,
    )
}

fn seed_fail(status: StatusCode, message: impl Into<String>) -> Response<BoxBody> {
    seed_answer(status, Value::from(message.into()), false)
}

/// `{"n": 2, "hostnames": ["S5"]}`: `n` an integer, `hostnames` an optional list of strings, nothing
/// else.
fn parse_scale(body: &[u8]) -> Result<ScaleRequest, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("the body must be a JSON object like {\"n\": 1, \"hostnames\": []}")?;
    if let Some(k) = obj.keys().find(|k| *k != "n" && *k != "hostnames") {
        return Err(format!(
            "unknown field {k:?}: the fields are n and hostnames"
        ));
    }
    let n = match obj.get("n") {
        None => return Err("n is required: the number of replicas".into()),
        Some(n) => n
            .as_i64()
            .ok_or_else(|| format!("n must be an integer, not {n}"))?,
    };
    let hostnames = match obj.get("hostnames") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|h| {
                h.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("hostnames must be strings, not {h}"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("hostnames must be a list of strings, not {other}")),
    };
    Ok(ScaleRequest { n, hostnames })
}

fn admin_error(e: AdminError) -> Response<BoxBody> {
    let status = match e {
        AdminError::Exists(_) => StatusCode::CONFLICT,
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
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
            .filter_map(|s| s.service.stats.sessions.oldest_age())
            .max()
            .map(|d| Value::from(d.as_secs_f64()))
            .unwrap_or(Value::Null);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(Route::parse("/"), Some(Route::Dashboard));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(
            Route::parse("/backends/web/127.0.0.1:9001"),
            Some(Route::Backend("web".into(), "127.0.0.1:9001".into()))
        );
        assert_eq!(
            Route::parse("/backends/web/%5B%3A%3A1%5D%3A80/drain"),
            Some(Route::BackendDrain("web".into(), "[::1]:80".into()))
        );
        assert_eq!(Route::parse("/nope"), None);
        assert!(!Route::Reload.methods().contains(&Method::GET));
        assert!(Route::Backends.methods().contains(&Method::POST));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("mode=close", "mode"), Some("close"));
        assert_eq!(query_param("a=1&history", "history"), Some(""));
        assert_eq!(query_param("", "mode"), None);
    }
}
