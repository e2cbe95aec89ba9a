//! `GET /metrics`: each subsystem's table (declared where its numbers live) written over its views,
//! read now.

use crate::admission::{self, DenyView};
use crate::control::{self, Control, ControlView};
use crate::discovery::{docker::LabelView, WatchView};
use crate::logging::Dropped;
use crate::metrics::{Page, ProcessStats, PROCESS};
use crate::replicas::ReplicaCounts;
#[cfg(target_os = "linux")]
use crate::ring::{self, WorkerView};
use crate::route::UnroutedView;
use crate::service::{self, BackendSubject, ServiceView};
use crate::udp::{self, UdpBackendView, UdpView};
use crate::{discovery, logging, replicas, route};

/// Every subject of the page, by table: what each subsystem's views say now.
#[derive(Default)]
struct Views {
    process: Vec<ProcessStats>,
    logging: Vec<Dropped>,
    control: Vec<ControlView>,
    services: Vec<ServiceView>,
    backends: Vec<BackendSubject>,
    replicas: Vec<ReplicaCounts>,
    dns: Vec<WatchView>,
    docker_labels: Vec<LabelView>,
    unrouted: Vec<UnroutedView>,
    #[cfg(target_os = "linux")]
    ring: Vec<WorkerView>,
    udp: Vec<UdpView>,
    udp_backends: Vec<UdpBackendView>,
    deny: Vec<DenyView>,
}

impl Views {
    /// Reads every view of the running server. Linear in the backends: each is read once.
    fn read(c: &Control) -> Views {
        let running = c.services();
        Views {
            process: vec![ProcessStats::read()],
            logging: vec![logging::Dropped(logging::dropped())],
            control: vec![c.view()],
            services: running.iter().map(|r| r.service.view()).collect(),
            backends: running
                .iter()
                .flat_map(|r| {
                    let name = &r.service.name;
                    let all = r.service.pool.all_backends().into_iter();
                    all.map(|b| BackendSubject::new(name.clone(), b))
                })
                .collect(),
            replicas: running
                .iter()
                .filter_map(|r| c.replicas(&r.service.name))
                .map(|set| set.counts())
                .collect(),
            dns: running
                .iter()
                .flat_map(|r| r.watchers.iter().map(|w| w.view(&r.service.name)))
                .collect(),
            docker_labels: running
                .iter()
                .flat_map(|r| r.label_watchers.iter().map(|w| w.view(&r.service.name)))
                .collect(),
            unrouted: c.unrouted(),
            #[cfg(target_os = "linux")]
            ring: c.ring_views(),
            udp: c.udp.views(),
            udp_backends: c.udp.backend_views(),
            deny: vec![c.gate.deny.view(tokio::time::Instant::now())],
        }
    }

    /// Writes every table over its subjects: the one list of the tables on the page.
    fn write(&self, page: &mut Page) {
        page.write(&PROCESS, &self.process);
        page.write(&logging::METRICS, &self.logging);
        page.write(&control::METRICS, &self.control);
        page.write(&service::METRICS, &self.services);
        page.write(&service::BACKEND_METRICS, &self.backends);
        page.write(&replicas::METRICS, &self.replicas);
        page.write(&discovery::METRICS, &self.dns);
        page.write(&discovery::docker::METRICS, &self.docker_labels);
        page.write(&route::METRICS, &self.unrouted);
        #[cfg(target_os = "linux")]
        page.write(&ring::METRICS, &self.ring);
        page.write(&udp::METRICS, &self.udp);
        page.write(&udp::BACKEND_METRICS, &self.udp_backends);
        page.write(&admission::METRICS, &self.deny);
    }
}

/// The metrics page of the running server, its labels written out once per subject.
pub(super) fn render(c: &Control) -> String {
    let mut page = Page::default();
    Views::read(c).write(&mut page);
    page.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Declared;

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

    /// Every family the page declares is documented with its type and labels, and nothing else is.
    #[test]
    fn every_family_is_documented() {
        let mut page = Page::recording();
        Views::default().write(&mut page);
        assert_eq!(page.declared(), documented());
    }
}
