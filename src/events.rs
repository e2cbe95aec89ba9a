//! State changes as events: every transition a pool, a service or the control logs is also published
//! here, for the admin API's event stream (`GET /events`) and the dashboard.
//!
//! Publishing never blocks and never fails: a broadcast channel keeps the latest [`CAPACITY`] events, and
//! a subscriber that falls behind skips what it missed (it still gets the next stats frame).

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::util::unix_ms;

/// Events kept for slow subscribers.
const CAPACITY: usize = 1024;

/// A cheap handle to publish events; clones share one channel.
#[derive(Clone, Debug)]
pub(crate) struct EventBus(broadcast::Sender<Arc<str>>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(broadcast::channel(CAPACITY).0)
    }
}

impl EventBus {
    /// Publishes `kind` with `fields` (a JSON object) and the time; serialised once for every
    /// subscriber. Without subscribers this costs one serialisation, and events are rare.
    pub(crate) fn publish(&self, kind: &str, fields: Value) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let mut obj = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        obj.insert("type".into(), Value::from(kind));
        obj.insert("at_ms".into(), Value::from(unix_ms()));
        let _ = self.0.send(Value::Object(obj).to_string().into());
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }
}
