//! `GET /metrics`: each subsystem's table (declared where its numbers live) written over its views,
//! read now.

use crate::control::{self, Control};
use crate::metrics::{Page, ProcessStats, PROCESS};
use crate::service::{self, BackendSubject};
use crate::{discovery, logging, replicas, route};

/// The metrics page of the running server. Linear in the backends: each is read once (its view)
/// and its labels written out once.
pub(super) fn render(c: &Control) -> String {
    let running = c.services();
    let services: Vec<_> = running.iter().map(|r| r.service.view()).collect();
    let backends: Vec<_> = running
        .iter()
        .flat_map(|r| {
            let name = &r.service.name;
            let all = r.service.pool.all_backends().into_iter();
            all.map(|b| BackendSubject::new(name.clone(), b))
        })
        .collect();
    let replicas: Vec<_> = running
        .iter()
        .filter_map(|r| c.replicas(&r.service.name))
        .map(|set| set.counts())
        .collect();
    let dns: Vec<_> = running
        .iter()
        .flat_map(|r| r.watchers.iter().map(|w| w.view(&r.service.name)))
        .collect();
    let docker_labels: Vec<_> = running
        .iter()
        .flat_map(|r| r.label_watchers.iter().map(|w| w.view(&r.service.name)))
        .collect();
    let mut page = Page::default();
    page.write(&PROCESS, &[ProcessStats::read()]);
    page.write(&logging::METRICS, &[logging::Dropped(logging::dropped())]);
    page.write(&control::METRICS, &[c.view()]);
    page.write(&service::METRICS, &services);
    page.write(&service::BACKEND_METRICS, &backends);
    page.write(&replicas::METRICS, &replicas);
    page.write(&discovery::METRICS, &dns);
    page.write(&discovery::docker::METRICS, &docker_labels);
    page.write(&route::METRICS, &c.unrouted());
    page.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::metrics::Table;

    use super::*;

    /// Per family: its type and every label (the subject's, then its own).
    type Declared = BTreeMap<String, (String, Vec<String>)>;

    fn declared<T>(t: &Table<T>, out: &mut Declared) {
        for f in t.families {
            let labels = t.subject.iter().chain(f.labels).map(|l| l.to_string());
            let entry = (f.kind.as_str().to_string(), labels.collect());
            assert!(
                out.insert(f.name.to_string(), entry).is_none(),
                "{}",
                f.name
            );
        }
    }

    /// The metrics table of docs/admin-api.md: per name, its type and labels.
    fn documented() -> Declared {
        let mut rows = Declared::new();
        let table = crate::util::doc_table("admin-api.md", "| name | type | labels | meaning |");
        for cells in table {
            let labels: Vec<String> = cells[2]
                .split(", ")
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            for name in cells[0].split(", ") {
                let name = name.trim_matches('`').to_string();
                rows.insert(name, (cells[1].clone(), labels.clone()));
            }
        }
        rows
    }

    /// Every family a table declares is documented with its type and labels, and nothing else is.
    #[test]
    fn every_family_is_documented() {
        let mut d = Declared::new();
        declared(&PROCESS, &mut d);
        declared(&logging::METRICS, &mut d);
        declared(&control::METRICS, &mut d);
        declared(&service::METRICS, &mut d);
        declared(&service::BACKEND_METRICS, &mut d);
        declared(&replicas::METRICS, &mut d);
        declared(&discovery::METRICS, &mut d);
        declared(&discovery::docker::METRICS, &mut d);
        declared(&route::METRICS, &mut d);
        assert_eq!(d, documented());
    }
}
