//! Log output: the application log and the routing log, each to stdout, a daily-rotated file, or (the
//! routing log) nowhere, and the routing log besides to a syslog collector (`log.access.syslog`,
//! [`crate::syslog`]); text or JSON lines; a level or a `RUST_LOG`-style filter.
//!
//! No thread that relays connections ever waits on a log write: each stream (the syslog copy is one)
//! has a bounded queue
//! (`log.buffer_lines`) drained by a writer thread of its own. When the destination cannot keep up
//! (a full pipe, a paused log driver) the queue fills and further lines are dropped; when it cannot
//! be written at all (a full disk) the line is dropped too. Both are counted per stream and reason
//! ([`dropped`], `sluicegate_log_lines_dropped_total`) and said once per streak by a warning, also on
//! stderr. The returned guards flush on drop and must live until exit. Rotated files are named
//! `FILE.YYYY-MM-DD` (UTC) and the oldest beyond `log.keep` are deleted when a new one is opened (at
//! start and at midnight).

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::accesslog;
use crate::config::{AccessLog, LogConfig, LogFormat, LogLevel};
use crate::metrics::{Family, Kind, Subject, Table};
use crate::syslog::{Sender, SyslogError};
use crate::util::lock;

/// The environment variable whose `RUST_LOG`-style filter overrides `log.level` and `log.filter`.
pub const FILTER_ENV: &str = "SLUICEGATE_LOG";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{key} {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("{from}: invalid filter {filter:?}: {reason}")]
    Filter {
        from: &'static str,
        filter: String,
        reason: String,
    },
    #[error(transparent)]
    Syslog(#[from] SyslogError),
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Flushes the log writers when dropped: keep it until exit.
#[must_use]
pub struct Guards(#[allow(dead_code)] Vec<WorkerGuard>);

/// A log stream, for the drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Application,
    Routing,
    /// The routing log's copy for the syslog collector (`log.access.syslog`).
    Syslog,
}

impl Stream {
    pub fn as_str(&self) -> &'static str {
        match self {
            Stream::Application => "application",
            Stream::Routing => "routing",
            Stream::Syslog => "syslog",
        }
    }

    /// Its name in the warnings about its drops.
    fn prose(&self) -> &'static str {
        match self {
            Stream::Application => "application log",
            Stream::Routing => "routing log",
            Stream::Syslog => "routing log to syslog",
        }
    }
}

/// Why a line was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The stream's queue was full: its destination did not keep up.
    QueueFull,
    /// Writing the line failed (a full disk, a closed pipe).
    WriteError,
}

impl DropReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::WriteError => "write_error",
        }
    }
}

/// The drop counters of one stream.
struct Counters {
    stream: Stream,
    queue: ErrorCounter,
    write_errors: Arc<AtomicU64>,
    /// The latest write error, for the warning.
    last_error: Arc<Mutex<Option<String>>>,
}

/// Every stream's counters, set by [`init`].
static STREAMS: OnceLock<Vec<Counters>> = OnceLock::new();

/// Lines dropped so far, per stream and reason (every stream the process logs to, zeros included).
pub fn dropped() -> Vec<(Stream, DropReason, u64)> {
    STREAMS
        .get()
        .map(|streams| {
            streams
                .iter()
                .flat_map(|c| {
                    [
                        (
                            c.stream,
                            DropReason::QueueFull,
                            c.queue.dropped_lines() as u64,
                        ),
                        (
                            c.stream,
                            DropReason::WriteError,
                            c.write_errors.load(Relaxed),
                        ),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Lines dropped so far, as `/metrics` exports them ([`METRICS`]).
pub(crate) struct Dropped(pub(crate) Vec<(Stream, DropReason, u64)>);

impl Subject for Dropped {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

/// What `/metrics` exports about the log streams.
pub(crate) const METRICS: Table<Dropped> = Table {
    subject: &[],
    families: &[Family::new(
        Kind::Counter,
        "sluicegate_log_lines_dropped_total",
        "Log lines dropped rather than wait: the stream's queue was full (queue_full) or the line could not be written (write_error).",
        &["stream", "reason"],
        |d, o| {
            for (stream, reason, n) in &d.0 {
                o.put(&[stream.as_str(), reason.as_str()], *n);
            }
        },
    )],
};

/// The destination of a stream, counting the lines it fails to write instead of failing the writer
/// thread (which would lose the error silently).
struct Counted<W> {
    inner: W,
    errors: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl<W: io::Write> io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                self.errors.fetch_add(1, Relaxed);
                *lock(&self.last_error) = Some(e.to_string());
                // The line is given up: reporting it written ends this line's write_all.
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // A failed flush lost lines already counted by `write`, or will fail the next write.
        let _ = self.inner.flush();
        Ok(())
    }
}

/// Where a stream's writer thread writes: stdout, or the daily-rotated file `path` (`key` names it
/// in an error).
fn destination(
    key: &'static str,
    path: Option<&Path>,
    keep: u32,
) -> Result<Box<dyn io::Write + Send>, LogError> {
    let Some(path) = path else {
        return Ok(Box::new(io::stdout()));
    };
    let err = |reason: String| LogError::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let (dir, name) = split_path(path).map_err(err)?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix(name)
        .max_log_files(keep.max(1) as usize)
        .build(dir)
        .map_err(|e| err(e.to_string()))?;
    Ok(Box::new(appender))
}

/// A writer to `inner` on its own background thread with a queue of `lines`.
fn writer(
    stream: Stream,
    inner: Box<dyn io::Write + Send>,
    lines: usize,
) -> (NonBlocking, WorkerGuard, Counters) {
    let builder = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines.max(1))
        .thread_name(match stream {
            Stream::Application => "sluicegate-log",
            Stream::Routing => "sluicegate-accesslog",
            Stream::Syslog => "sluicegate-syslog",
        });
    let errors = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(Mutex::new(None));
    let (nb, guard) = builder.finish(Counted {
        inner,
        errors: errors.clone(),
        last_error: last_error.clone(),
    });
    let counters = Counters {
        stream,
        queue: nb.error_counter(),
        write_errors: errors,
        last_error,
    };
    (nb, guard, counters)
}

/// How often the drop counters are looked at for the warning.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// A streak of drops ends after this long without one.
const STREAK_ENDS: u32 = 10;

/// Says once per streak, per stream, that lines are being dropped and why, and once when the streak
/// ends: through the application log and on stderr (the application log may be the stream that
/// drops). Runs on a thread of its own, so a stalled stderr stalls nothing else.
fn watch_drops() {
    let spawned = std::thread::Builder::new()
        .name("sluicegate-logwatch".into())
        .spawn(|| {
            let Some(streams) = STREAMS.get() else { return };
            let mut seen: Vec<(u64, u64, u32, bool)> = vec![(0, 0, 0, false); streams.len()];
            loop {
                std::thread::sleep(WATCH_EVERY);
                for (c, (queue_was, errors_was, quiet, streak)) in streams.iter().zip(&mut seen) {
                    let queue = c.queue.dropped_lines() as u64;
                    let errors = c.write_errors.load(Relaxed);
                    if queue == *queue_was && errors == *errors_was {
                        *quiet += 1;
                        if *streak && *quiet >= STREAK_ENDS {
                            *streak = false;
                            let msg = format!("{}: lines are written again ({queue} dropped for a full queue, {errors} for write errors so far)", c.stream.prose());
                            tracing::info!(stream = c.stream.as_str(), "{msg}");
                            eprintln!("sluicegate: {msg}");
                        }
                        continue;
                    }
                    *quiet = 0;
                    if !*streak {
                        *streak = true;
                        let why = if errors > *errors_was {
                            format!(
                                "cannot be written ({})",
                                lock(&c.last_error).clone().unwrap_or_default()
                            )
                        } else {
                            "cannot keep up (its queue is full)".to_string()
                        };
                        let msg = format!("{} {why}: lines are being dropped and counted in sluicegate_log_lines_dropped_total", c.stream.prose());
                        tracing::warn!(stream = c.stream.as_str(), "{msg}");
                        eprintln!("sluicegate: {msg}");
                    }
                    (*queue_was, *errors_was) = (queue, errors);
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("sluicegate: cannot start the log watcher: {e}");
    }
}

/// The application log's filter: `SLUICEGATE_LOG`, else `log.filter`, else `log.level`.
fn app_filter(cfg: &LogConfig) -> Result<EnvFilter, LogError> {
    let (text, from) = match std::env::var(FILTER_ENV) {
        Ok(v) if !v.trim().is_empty() => (v, FILTER_ENV),
        _ => match &cfg.filter {
            Some(f) => (f.clone(), "log.filter"),
            None => (level(cfg.level).as_str().to_ascii_lowercase(), "log.level"),
        },
    };
    EnvFilter::builder()
        .parse(&text)
        .map_err(|e| LogError::Filter {
            from,
            reason: e.to_string(),
            filter: text.clone(),
        })
}

/// Installs the global subscriber described by `cfg`.
pub fn init(cfg: &LogConfig) -> Result<Guards, LogError> {
    let json = cfg.format == LogFormat::Json;
    let mut guards = Vec::new();
    let mut counters = Vec::new();
    let lines = cfg.buffer_lines as usize;
    let (app_writer, g, c) = writer(
        Stream::Application,
        destination("log.file", cfg.file.as_deref(), cfg.keep)?,
        lines,
    );
    guards.push(g);
    counters.push(c);
    let mut app = app_filter(cfg)?;
    if cfg.access.to != AccessLog::WithApplication {
        // The routing log has a stream of its own (or none): keep it out of the application log.
        let off = format!("{}=off", accesslog::TARGET);
        app = app.add_directive(off.parse().map_err(
            |e: tracing_subscriber::filter::ParseError| LogError::Filter {
                from: "log.access",
                reason: e.to_string(),
                filter: off.clone(),
            },
        )?);
    }
    let app_layer = tracing_subscriber::fmt::layer()
        .with_writer(app_writer)
        .event_format(LineFormat { json })
        .with_filter(app);
    let access_path = match &cfg.access.to {
        AccessLog::Stdout => Some(None),
        AccessLog::File(p) => Some(Some(p.as_path())),
        AccessLog::WithApplication | AccessLog::Off => None,
    };
    let access_layer = match access_path {
        Some(path) => {
            let to = destination("log.access", path, cfg.keep)?;
            let (w, g, c) = writer(Stream::Routing, to, lines);
            guards.push(g);
            counters.push(c);
            Some(routing_layer(w, json))
        }
        None => None,
    };
    // Beside `to`, whatever it is: a queue and a writer thread of its own, so a collector that
    // does not keep up drops only its own copy.
    let syslog_layer = match &cfg.access.syslog {
        Some(to) => {
            let sender = Sender::new(to, cfg.access.syslog_facility.unwrap_or_default())?;
            let (w, g, c) = writer(Stream::Syslog, Box::new(sender), lines);
            guards.push(g);
            counters.push(c);
            Some(routing_layer(w, json))
        }
        None => None,
    };
    let subscriber = tracing_subscriber::registry()
        .with(SpanFields::layer())
        .with(app_layer)
        .with(access_layer)
        .with(syslog_layer);
    tracing::subscriber::set_global_default(subscriber).map_err(|_| LogError::AlreadySet)?;
    if STREAMS.set(counters).is_ok() {
        watch_drops();
    }
    Ok(Guards(guards))
}

/// The routing lines (and only they, at INFO whatever the application log's level), formatted as
/// `json` or text, to `w`.
fn routing_layer<S>(w: NonBlocking, json: bool) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(w)
        .event_format(LineFormat { json })
        .with_filter(Targets::new().with_target(accesslog::TARGET, Level::INFO))
}

fn split_path(path: &Path) -> Result<(&Path, &str), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| "not a file name".to_string())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err("its directory does not exist".into());
    }
    Ok((dir, name))
}

fn level(l: LogLevel) -> Level {
    match l {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    }
}

/// One line per event: `TIME LEVEL target: message key=value ...` or a flat JSON object with `ts`,
/// `level`, `target`, `msg` and every field. Fields declared without a value are written as null.
struct LineFormat {
    json: bool,
}

/// Keeps the fields of sluicegate's own spans (one per connection: `listener.rs`) as values, so every
/// line written inside a span can carry them, structured in JSON. Only sluicegate's spans are kept: a
/// filter that enabled every span would enable the dependencies' debug spans too.
///
/// Packed into one buffer, per field its kind, its name and its value as text: a connection keeps
/// its span all its life, and a list of values took one allocation for the list and one per value
/// (about 350 bytes per idle connection, against about 100).
#[derive(Default, Debug, PartialEq)]
struct SpanFields(Vec<u8>);

impl SpanFields {
    fn layer<S>() -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        SpanFieldsLayer.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("sluicegate")
        }))
    }

    fn packed(fields: &[(&str, Val)]) -> SpanFields {
        SpanFields::of(fields.iter().map(|(n, v)| (v.kind(), *n, v.text())))
    }

    /// Packs `items` (kind, name, value text) into a buffer of their exact size. An item whose
    /// name is over 255 bytes or whose value is 4 GiB or more is not kept.
    fn of<'a>(items: impl Iterator<Item = (u8, &'a str, &'a str)> + Clone) -> SpanFields {
        let fits = |name: &str, text: &str| {
            Some((
                u8::try_from(name.len()).ok()?,
                u32::try_from(text.len()).ok()?,
            ))
        };
        let len = items
            .clone()
            .filter(|(_, n, t)| fits(n, t).is_some())
            .map(|(_, n, t)| 6 + n.len() + t.len())
            .sum();
        let mut out = Vec::with_capacity(len);
        for (kind, name, text) in items {
            let Some((n, t)) = fits(name, text) else {
                continue;
            };
            out.push(kind);
            out.push(n);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        SpanFields(out)
    }

    /// Each field as packed: its kind, name and value text, in the order first given.
    fn raw(&self) -> impl Iterator<Item = (u8, &str, &str)> + Clone + '_ {
        let mut rest = &self.0[..];
        std::iter::from_fn(move || {
            let (&kind, r) = rest.split_first()?;
            let (&n, r) = r.split_first()?;
            let (name, r) = r.split_at_checked(usize::from(n))?;
            let (len, r) = r.split_at_checked(4)?;
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let (text, r) = r.split_at_checked(len)?;
            rest = r;
            // Written from `&str`s by `of`, split only at their ends.
            let name = std::str::from_utf8(name).ok()?;
            let text = std::str::from_utf8(text).ok()?;
            Some((kind, name, text))
        })
    }

    /// The fields in the order they were first given.
    fn iter(&self) -> impl Iterator<Item = (&str, Val)> + '_ {
        self.raw()
            .map(|(kind, name, text)| (name, Val::unpack(kind, text)))
    }

    /// These fields with `new` recorded over them: a field already there keeps its place, a new
    /// one follows, and a name given twice takes its last value. The fields kept are copied as
    /// packed: a record (every connection's backend, at least) decodes no value.
    fn recorded(&self, new: &[(&'static str, Val)]) -> SpanFields {
        let last = |name: &str| {
            new.iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (v.kind(), v.text()))
        };
        let kept = self.raw().map(move |(kind, name, text)| {
            let (kind, text) = last(name).unwrap_or((kind, text));
            (kind, name, text)
        });
        let added = new.iter().enumerate().filter_map(move |(i, (name, _))| {
            let first = !new[..i].iter().any(|(n, _)| n == name);
            let (kind, text) = last(name)?;
            (first && !self.raw().any(|(_, n, _)| n == *name)).then_some((kind, *name, text))
        });
        SpanFields::of(kept.chain(added))
    }
}

struct SpanFieldsLayer;

impl<S> Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut v = Fields::default();
        attrs.record(&mut v);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields::packed(&v.fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut v = Fields::default();
        values.record(&mut v);
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<SpanFields>() {
                *fields = fields.recorded(&v.fields);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Val {
    Str(String),
    Num(String),
    Bool(bool),
    Null,
}

impl Val {
    /// Its kind, for [`SpanFields`].
    fn kind(&self) -> u8 {
        match self {
            Val::Str(_) => 0,
            Val::Num(_) => 1,
            Val::Bool(false) => 2,
            Val::Bool(true) => 3,
            Val::Null => 4,
        }
    }

    /// Its text, for [`SpanFields`] (a boolean's and null's are in their kind).
    fn text(&self) -> &str {
        match self {
            Val::Str(s) | Val::Num(s) => s,
            Val::Bool(_) | Val::Null => "",
        }
    }

    fn unpack(kind: u8, text: &str) -> Val {
        match kind {
            0 => Val::Str(text.to_string()),
            1 => Val::Num(text.to_string()),
            2 => Val::Bool(false),
            3 => Val::Bool(true),
            _ => Val::Null,
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, Val)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        let s = format!("{v:?}");
        if f.name() == "message" {
            self.message = s;
        } else {
            self.fields.push((f.name(), Val::Str(s)));
        }
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        if f.name() == "message" {
            self.message = v.to_string();
        } else {
            self.fields.push((f.name(), Val::Str(v.to_string())));
        }
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.fields.push((f.name(), Val::Num(v.to_string())));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.fields.push((f.name(), Val::Num(v.to_string())));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        let n = if v.is_finite() {
            v.to_string()
        } else {
            "null".into()
        };
        self.fields.push((f.name(), Val::Num(n)));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.fields.push((f.name(), Val::Bool(v)));
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.fields.push((f.name(), Val::Str(v.to_string())));
    }
}

fn json_str(out: &mut String, s: &str) {
    // serde_json's escaping of a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut v = Fields::default();
        event.record(&mut v);
        // The fields of the spans it happened in (the connection's), unless the event names them
        // itself. The routing line is complete on its own and keeps its documented fields.
        if event.metadata().target() != accesslog::TARGET {
            if let Some(scope) = ctx.event_scope() {
                for span in scope.from_root() {
                    let declared = span.metadata().fields();
                    if let Some(fields) = span.extensions().get::<SpanFields>() {
                        for (name, val) in fields.iter() {
                            // The span's own name for it, which lives as long as the line needs.
                            let Some(name) = declared.field(name).map(|f| f.name()) else {
                                continue;
                            };
                            let named = event.metadata().fields().field(name).is_some();
                            if !named && !v.fields.iter().any(|(n, _)| *n == name) {
                                v.fields.push((name, val));
                            }
                        }
                    }
                }
            }
        }
        // Declared order, with `null` for a field declared without a value, so lines keep one shape.
        let mut ordered = Vec::with_capacity(v.fields.len() + 2);
        for f in event.metadata().fields() {
            if f.name() == "message" {
                continue;
            }
            match v.fields.iter().position(|(n, _)| *n == f.name()) {
                Some(i) => ordered.push(v.fields.swap_remove(i)),
                None => ordered.push((f.name(), Val::Null)),
            }
        }
        ordered.append(&mut v.fields);
        v.fields = ordered;
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let meta = event.metadata();
        let mut out = String::with_capacity(256);
        if self.json {
            out.push_str("{\"ts\":");
            json_str(&mut out, &ts);
            let _ = write!(
                out,
                ",\"level\":\"{}\",\"target\":",
                meta.level().as_str().to_ascii_lowercase()
            );
            json_str(&mut out, meta.target());
            out.push_str(",\"msg\":");
            json_str(&mut out, &v.message);
            for (name, val) in &v.fields {
                out.push(',');
                json_str(&mut out, name);
                out.push(':');
                match val {
                    Val::Str(s) => json_str(&mut out, s),
                    Val::Num(n) => out.push_str(n),
                    Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    Val::Null => out.push_str("null"),
                }
            }
            out.push('}');
        } else {
            let _ = write!(
                out,
                "{ts} {:>5} {}: {}",
                meta.level().as_str(),
                meta.target(),
                v.message
            );
            for (name, val) in &v.fields {
                let _ = write!(out, " {name}=");
                match val {
                    Val::Str(s) if s.is_empty() || s.contains([' ', '"', '=']) => {
                        let _ = write!(out, "{s:?}");
                    }
                    Val::Str(s) | Val::Num(s) => out.push_str(s),
                    Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    Val::Null => out.push_str("null"),
                }
            }
        }
        writeln!(w, "{out}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Val {
        Val::Str(v.to_string())
    }

    #[test]
    fn span_fields_come_back_as_given_in_their_order() {
        let given = vec![
            ("client", s("127.0.0.1:5000")),
            ("port", Val::Num("443".into())),
            ("service", s("")),
            ("on", Val::Bool(true)),
            ("off", Val::Bool(false)),
            ("none", Val::Null),
            ("name", s("ünïcode \"quoted\" = x")),
        ];
        let packed = SpanFields::packed(&given);
        let back: Vec<(&str, Val)> = packed.iter().collect();
        assert_eq!(back, given);
        // Packed: one buffer of the exact size, no list and no value of its own.
        assert_eq!(packed.0.len(), packed.0.capacity());
    }

    #[test]
    fn a_recorded_span_field_keeps_its_place_and_new_ones_follow() {
        let fields = SpanFields::packed(&[("service", Val::Null), ("client", s("c"))]);
        let fields = fields.recorded(&[
            ("backend", s("b")),
            ("service", s("web")),
            ("backend", s("b2")),
            ("client", Val::Num("7".into())),
        ]);
        let back: Vec<(&str, Val)> = fields.iter().collect();
        assert_eq!(
            back,
            vec![
                ("service", s("web")),
                ("client", Val::Num("7".into())),
                ("backend", s("b2"))
            ]
        );
        assert_eq!(fields.0.len(), fields.0.capacity(), "packed to its size");
    }

    #[test]
    fn a_span_field_whose_name_does_not_fit_is_left_out() {
        let long = "n".repeat(256);
        let fields = SpanFields::packed(&[(long.as_str(), s("x")), ("kept", s("y"))]);
        let back: Vec<(&str, Val)> = fields.iter().collect();
        assert_eq!(back, vec![("kept", s("y"))]);
    }
}
