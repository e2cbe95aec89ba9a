//! `GET /deny`, `POST /deny` and `DELETE /deny/{cidr}`: the runtime deny list, which the
//! admission gate owns (`admission::DenyList`); here only the requests are read and answered.

use std::time::Duration;

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::endpoints::{parse_body, Answer};
use super::{json_response, Admin, ApiError};
use crate::admission::{Denied, DenyError};
use crate::config::{Cidr, Dur};
use crate::events::Event;

/// A reason is at most this many bytes, with no control characters (it is shown, logged and
/// carried by an upgrade, whose messages have room for so many entries of this size).
const MAX_REASON: usize = 256;

/// `POST /deny`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDeny {
    cidr: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// What `POST /deny` asks, checked: the net, the time it stays (none: until removed), why.
fn read_add(body: &[u8]) -> Result<(Cidr, Option<Duration>, String), ApiError> {
    let req: AddDeny = parse_body(body)?;
    let cidr = cidr(&req.cidr)?;
    let ttl = match req.ttl.as_deref() {
        None => None,
        Some(t) => {
            let d: Dur = t
                .parse()
                .map_err(|e: String| ApiError::bad_request(format!("ttl: {e}")))?;
            if d.is_zero() {
                return Err(ApiError::bad_request(
                    "ttl: must be more than 0 (leave it out for no expiry)",
                ));
            }
            Some(d.0)
        }
    };
    let reason = req.reason.unwrap_or_default();
    if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "reason: at most {MAX_REASON} bytes of text, no control characters"
        )));
    }
    Ok((cidr, ttl, reason))
}

/// An address block (`203.0.113.0/24`) or one address (a /32 or /128), or a 400 naming it.
fn cidr(s: &str) -> Result<Cidr, ApiError> {
    s.parse::<Cidr>()
        .map_err(|e| ApiError::bad_request(format!("cidr: {e}")))
}

impl From<DenyError> for ApiError {
    fn from(e: DenyError) -> ApiError {
        let status = match e {
            DenyError::Full(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DenyError::FromConfig(_) => StatusCode::CONFLICT,
            DenyError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        ApiError::new(status, e.to_string())
    }
}

impl Admin {
    /// `GET /deny`: every entry in force.
    pub(super) fn deny_list(&self) -> Answer {
        let now = tokio::time::Instant::now();
        let list = self.control.gate.deny.list(now);
        let deny: Vec<_> = list.iter().map(Denied::to_json).collect();
        Ok(json_response(StatusCode::OK, &json!({ "deny": deny })))
    }

    /// `POST /deny`: the entry made (replacing one of the API's or a ban for the same net).
    pub(super) fn deny_add(&self, body: &[u8]) -> Answer {
        let (cidr, ttl, reason) = read_add(body)?;
        let now = tokio::time::Instant::now();
        let made = self.control.gate.deny.add(cidr.0, ttl, reason, now)?;
        let shown = made.to_json();
        tracing::info!(cidr = %made.cidr, expires = %shown["expires"], "deny list: added through the API");
        self.control.events().publish(Event::DenyChanged {
            cidr: made.cidr.clone(),
            action: "added",
            expires: shown["expires"].as_str().map(str::to_string),
        });
        Ok(json_response(StatusCode::CREATED, &shown))
    }

    /// `DELETE /deny/{cidr}`: an API entry or a ban (a config entry stays: 409).
    pub(super) fn deny_remove(&self, raw: &str) -> Answer {
        let cidr = cidr(raw)?;
        let now = tokio::time::Instant::now();
        self.control.gate.deny.remove(cidr.0, now)?;
        let shown = cidr.0.trunc().to_string();
        tracing::info!(cidr = %shown, "deny list: removed through the API");
        self.control.events().publish(Event::DenyChanged {
            cidr: shown.clone(),
            action: "removed",
            expires: None,
        });
        Ok(json_response(StatusCode::OK, &json!({ "removed": shown })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> String {
        match read_add(body.as_bytes()) {
            Ok(_) => panic!("{body} was taken"),
            Err(e) => e.message,
        }
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        assert!(refusal(r#"{"cidr": "203.0.113.0/33"}"#).starts_with("cidr: "));
        assert!(refusal(r#"{"cidr": "203.0.113.5/24"}"#).contains("host bits"));
        assert!(refusal(r#"{"cidr": "example.com"}"#).starts_with("cidr: "));
        assert!(refusal(r#"{"cidr": "192.0.2.1", "ttl": "1d"}"#).starts_with("ttl: "));
        assert!(refusal(r#"{"cidr": "192.0.2.1", "ttl": "0s"}"#).starts_with("ttl: "));
        assert!(refusal(r#"{"cidr": "192.0.2.1", "until": "x"}"#).contains("unknown field"));
        assert!(refusal(r#"{"ttl": "1h"}"#).contains("cidr"));
        assert!(refusal(r#"{"cidr": "192.0.2.1", "reason": "a\u0000b"}"#).starts_with("reason: "));
        let long = "x".repeat(MAX_REASON + 1);
        assert!(
            refusal(&format!(r#"{{"cidr": "192.0.2.1", "reason": "{long}"}}"#))
                .starts_with("reason: ")
        );
        let (c, ttl, reason) =
            read_add(br#"{"cidr": "2001:db8::1", "ttl": "1h", "reason": "scan"}"#).unwrap();
        assert_eq!(c.0.to_string(), "2001:db8::1/128", "one address is a /128");
        assert_eq!(ttl, Some(Duration::from_secs(3600)));
        assert_eq!(reason, "scan");
    }
}
