//! How a subsystem declares what it exports to Prometheus, and the text format (`GET /metrics`).
//!
//! Each subsystem that owns numbers declares its metric families once, in a `const` [`Table`] next
//! to the typed view it reads them from: the name, the kind, the help, the labels and how to read the
//! samples from one view (`service::METRICS` over `ServiceView`, `discovery::METRICS` over
//! `WatchView`, ...). The admin API asks each subsystem for its views and writes each table over them
//! with a [`Page`]; `/stats` serialises the same views. This module knows none of them: it owns the
//! format, and the process's own numbers ([`PROCESS`]).
//!
//! Names start with `sluicegate_` (the process metrics keep the names every client library gives
//! them); counters end in `_total`, durations are in seconds.

use std::fmt::Write;

/// A family's type, as the text format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family, read from a view of type `T`.
pub(crate) struct Family<T> {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) help: &'static str,
    /// The family's own labels, after its table's (`end`, `direction`, ...).
    pub(crate) labels: &'static [&'static str],
    /// Writes the samples of one view (none is fine: the family is still declared).
    pub(crate) read: fn(&T, &mut Samples<'_>),
}

impl<T> Family<T> {
    pub(crate) const fn new(
        kind: Kind,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        read: fn(&T, &mut Samples<'_>),
    ) -> Family<T> {
        Family {
            name,
            kind,
            help,
            labels,
            read,
        }
    }
}

/// The families a subsystem exports about one kind of subject (the process, a service, a backend,
/// a DNS name), every sample labelled first by the subject.
pub(crate) struct Table<T: 'static> {
    /// The labels naming a subject (`service`; `service`, `backend`; none for the process).
    pub(crate) subject: &'static [&'static str],
    pub(crate) families: &'static [Family<T>],
}

/// A view a table reads: it names its subject.
pub(crate) trait Subject {
    /// The values of its table's `subject` labels, in their order.
    fn label_values(&self) -> impl Iterator<Item = &str>;
}

/// A number as the text format writes it (a flag is 1 or 0).
pub(crate) trait Value {
    fn write_to(self, out: &mut String);
}

macro_rules! integer_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn write_to(self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
integer_value!(u64, u32, usize, f64);

impl Value for bool {
    fn write_to(self, out: &mut String) {
        out.push(if self { '1' } else { '0' });
    }
}

/// The samples of one family for one subject, as its `read` writes them.
pub(crate) struct Samples<'a> {
    text: &'a mut String,
    name: &'static str,
    own: &'static [&'static str],
    /// The subject's labels, already written out (`service="web"`), or empty.
    subject: &'a str,
}

impl Samples<'_> {
    /// One sample; `values` are those of the family's own labels, in order.
    pub(crate) fn put(&mut self, values: &[&str], v: impl Value) {
        self.line("", values, None, v);
    }

    /// A histogram: cumulative `counts` per bound (`les`, the last `+Inf`), the sum and the count.
    pub(crate) fn histogram(
        &mut self,
        values: &[&str],
        les: &[String],
        counts: &[u64],
        sum: f64,
        count: u64,
    ) {
        for (le, &c) in les.iter().zip(counts) {
            self.line("_bucket", values, Some(("le", le)), c);
        }
        self.line("_sum", values, None, sum);
        self.line("_count", values, None, count);
    }

    fn line(&mut self, suffix: &str, values: &[&str], extra: Option<(&str, &str)>, v: impl Value) {
        debug_assert_eq!(values.len(), self.own.len(), "{}", self.name);
        let t = &mut *self.text;
        t.push_str(self.name);
        t.push_str(suffix);
        let own = self.own.iter().zip(values).map(|(k, v)| (*k, *v));
        let mut labels = own.chain(extra).peekable();
        if !self.subject.is_empty() || labels.peek().is_some() {
            t.push('{');
            t.push_str(self.subject);
            let mut first = self.subject.is_empty();
            for (k, v) in labels {
                if !first {
                    t.push(',');
                }
                first = false;
                push_label(t, k, v);
            }
            t.push('}');
        }
        t.push(' ');
        v.write_to(t);
        t.push('\n');
    }
}

/// Appends `k="v"`, `v` escaped as the text format requires, without allocating (a page has a few
/// labels for every backend).
fn push_label(out: &mut String, k: &str, v: &str) {
    out.push_str(k);
    out.push_str("=\"");
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A metrics page being written.
pub(crate) struct Page {
    text: String,
    /// Per family written: its type and every label (the subject's, then its own). Kept only by a
    /// test's page ([`Page::recording`]), which checks the page against the documentation.
    #[cfg(test)]
    declared: Option<Declared>,
}

/// Per family name: its type and its labels, as a page declares them.
#[cfg(test)]
pub(crate) type Declared = std::collections::BTreeMap<String, (String, Vec<String>)>;

impl Default for Page {
    fn default() -> Self {
        Page {
            text: String::with_capacity(16 * 1024),
            #[cfg(test)]
            declared: None,
        }
    }
}

#[cfg(test)]
impl Page {
    /// A page that also records what it declares.
    pub(crate) fn recording() -> Page {
        Page {
            declared: Some(Declared::new()),
            ..Page::default()
        }
    }

    /// Every family written so far (a recording page's).
    pub(crate) fn declared(&self) -> Declared {
        self.declared.clone().unwrap_or_default()
    }

    fn record<T>(&mut self, table: &Table<T>) {
        let Some(d) = &mut self.declared else {
            return;
        };
        for f in table.families {
            let labels = table.subject.iter().chain(f.labels).map(|l| l.to_string());
            let entry = (f.kind.as_str().to_string(), labels.collect());
            assert!(
                d.insert(f.name.to_string(), entry).is_none(),
                "{} declared twice",
                f.name
            );
        }
    }
}

impl Page {
    /// Writes every family of `table` with the samples of every subject: family by family, as the
    /// format requires, each subject's labels written out once. Linear in subjects × families.
    pub(crate) fn write<T: Subject>(&mut self, table: &Table<T>, subjects: &[T]) {
        #[cfg(test)]
        self.record(table);
        let prefixes: Vec<String> = subjects
            .iter()
            .map(|s| {
                let mut p = String::new();
                for (i, (k, v)) in table.subject.iter().zip(s.label_values()).enumerate() {
                    if i > 0 {
                        p.push(',');
                    }
                    push_label(&mut p, k, v);
                }
                p
            })
            .collect();
        for f in table.families {
            let _ = writeln!(
                self.text,
                "# HELP {name} {help}\n# TYPE {name} {kind}",
                name = f.name,
                help = f.help,
                kind = f.kind.as_str()
            );
            for (s, prefix) in subjects.iter().zip(&prefixes) {
                let mut samples = Samples {
                    text: &mut self.text,
                    name: f.name,
                    own: f.labels,
                    subject: prefix,
                };
                (f.read)(s, &mut samples);
            }
        }
    }

    pub(crate) fn finish(self) -> String {
        self.text
    }
}

/// What `/proc` says about this process. Linux reports CPU times in USER_HZ, which is 100 on every
/// architecture Linux supports for user space.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    threads: Option<u64>,
}

const USER_HZ: f64 = 100.0;

/// The fields after the command name of `/proc/PID/stat` (the name may contain spaces and parentheses).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A `Name:   N kB` line of `/proc/PID/status`, in bytes (or the bare number for counts).
fn status_value(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let mut parts = line[name.len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    Some(if parts.next() == Some("kB") {
        n * 1024
    } else {
        n
    })
}

impl ProcessStats {
    /// Reads them now.
    pub(crate) fn read() -> ProcessStats {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let (stat, status, proc_stat) = (
            read("/proc/self/stat"),
            read("/proc/self/status"),
            read("/proc/stat"),
        );
        let f = stat_fields(&stat);
        // After the name: state is field 3 of the man page, so utime (14) is index 11 here, stime 12,
        // starttime (22) 19.
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        let boot = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        ProcessStats {
            cpu_seconds: ticks(11).zip(ticks(12)).map(|(u, s)| (u + s) / USER_HZ),
            start_time_seconds: boot.zip(ticks(19)).map(|(b, t)| b + t / USER_HZ),
            resident_bytes: status_value(&status, "VmRSS:"),
            virtual_bytes: status_value(&status, "VmSize:"),
            threads: status_value(&status, "Threads:"),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft),
        }
    }
}

impl Subject for ProcessStats {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

/// Writes `v` when `/proc` had it.
fn some(o: &mut Samples<'_>, v: Option<impl Value>) {
    if let Some(v) = v {
        o.put(&[], v);
    }
}

/// The build, and the process metrics every Prometheus client library exports, under their usual
/// names.
pub(crate) const PROCESS: Table<ProcessStats> = Table {
    subject: &[],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_build_info",
            "The running build: always 1, with the version and target as labels.",
            &["version", "target"],
            |_, o| {
                let target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
                o.put(&[env!("CARGO_PKG_VERSION"), &target], 1u64);
            },
        ),
        Family::new(
            Kind::Counter,
            "process_cpu_seconds_total",
            "User and system CPU time spent, in seconds.",
            &[],
            |p, o| some(o, p.cpu_seconds),
        ),
        Family::new(
            Kind::Gauge,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            &[],
            |p, o| some(o, p.start_time_seconds),
        ),
        Family::new(
            Kind::Gauge,
            "process_resident_memory_bytes",
            "Resident memory size, in bytes.",
            &[],
            |p, o| some(o, p.resident_bytes),
        ),
        Family::new(
            Kind::Gauge,
            "process_virtual_memory_bytes",
            "Virtual memory size, in bytes.",
            &[],
            |p, o| some(o, p.virtual_bytes),
        ),
        Family::new(
            Kind::Gauge,
            "process_open_fds",
            "Open file descriptors.",
            &[],
            |p, o| some(o, p.open_fds),
        ),
        Family::new(
            Kind::Gauge,
            "process_max_fds",
            "The soft limit on open file descriptors.",
            &[],
            |p, o| some(o, p.max_fds),
        ),
        Family::new(
            Kind::Gauge,
            "process_threads",
            "Threads of the process.",
            &[],
            |p, o| some(o, p.threads),
        ),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_past_the_command_name() {
        let stat = "1234 (sluice gate (w)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 5 0 1000 123 456";
        let f = stat_fields(stat);
        assert_eq!((f[11], f[12], f[19]), ("250", "50", "1000"));
        let status = "Name:\tsluicegate\nVmSize:\t  2048 kB\nVmRSS:\t    12 kB\nThreads:\t5\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(12 * 1024));
        assert_eq!(status_value(status, "Threads:"), Some(5));
        assert_eq!(status_value(status, "VmSwap:"), None);
        let me = ProcessStats::read();
        assert!(me.cpu_seconds.is_some() && me.start_time_seconds.is_some());
        assert!(me.open_fds.unwrap() > 2 && me.resident_bytes.unwrap() > 0);
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        push_label(&mut out, "k", "a\"b\\c\n");
        assert_eq!(out, "k=\"a\\\"b\\\\c\\n\"");
    }

    struct Thing {
        service: &'static str,
        name: &'static str,
        n: u64,
    }

    impl Subject for Thing {
        fn label_values(&self) -> impl Iterator<Item = &str> {
            [self.service, self.name].into_iter()
        }
    }

    const THINGS: Table<Thing> = Table {
        subject: &["service", "name"],
        families: &[
            Family::new(Kind::Counter, "t_total", "Things.", &[], |t, o| {
                o.put(&[], t.n)
            }),
            Family::new(Kind::Gauge, "t_by", "Things by kind.", &["kind"], |t, o| {
                o.put(&["a"], t.n);
                o.put(&["b"], t.n > 1);
            }),
            Family::new(Kind::Histogram, "t_seconds", "Time.", &[], |t, o| {
                o.histogram(&[], &["0.5".into(), "+Inf".into()], &[1, t.n], 0.25, t.n)
            }),
        ],
    };

    /// Families come out whole and in order, each sample with the subject's labels first, then
    /// the family's own; a family without subjects is still declared.
    #[test]
    fn a_table_is_written_family_by_family() {
        let mut page = Page::default();
        let things = [
            Thing {
                service: "web",
                name: "a\"b",
                n: 2,
            },
            Thing {
                service: "db",
                name: "c",
                n: 1,
            },
        ];
        page.write(&THINGS, &things);
        page.write(&THINGS, &[]);
        let text = page.finish();
        let first = "\
# HELP t_total Things.
# TYPE t_total counter
t_total{service=\"web\",name=\"a\\\"b\"} 2
t_total{service=\"db\",name=\"c\"} 1
# HELP t_by Things by kind.
# TYPE t_by gauge
t_by{service=\"web\",name=\"a\\\"b\",kind=\"a\"} 2
t_by{service=\"web\",name=\"a\\\"b\",kind=\"b\"} 1
t_by{service=\"db\",name=\"c\",kind=\"a\"} 1
t_by{service=\"db\",name=\"c\",kind=\"b\"} 0
# HELP t_seconds Time.
# TYPE t_seconds histogram
t_seconds_bucket{service=\"web\",name=\"a\\\"b\",le=\"0.5\"} 1
t_seconds_bucket{service=\"web\",name=\"a\\\"b\",le=\"+Inf\"} 2
t_seconds_sum{service=\"web\",name=\"a\\\"b\"} 0.25
t_seconds_count{service=\"web\",name=\"a\\\"b\"} 2
t_seconds_bucket{service=\"db\",name=\"c\",le=\"0.5\"} 1
t_seconds_bucket{service=\"db\",name=\"c\",le=\"+Inf\"} 1
t_seconds_sum{service=\"db\",name=\"c\"} 0.25
t_seconds_count{service=\"db\",name=\"c\"} 1
";
        let empty = "\
# HELP t_total Things.
# TYPE t_total counter
# HELP t_by Things by kind.
# TYPE t_by gauge
# HELP t_seconds Time.
# TYPE t_seconds histogram
";
        assert_eq!(text, format!("{first}{empty}"));
    }

    #[test]
    fn process_samples_have_no_labels_but_the_builds() {
        let mut page = Page::default();
        page.write(&PROCESS, &[ProcessStats::read()]);
        let text = page.finish();
        assert!(text.contains("\nprocess_threads "), "{text}");
        assert!(text.contains(&format!(
            "sluicegate_build_info{{version=\"{}\",target=",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
