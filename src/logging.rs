//! Log output: the application log and the routing log, each to stdout, a daily-rotated file, or (the
//! routing log) nowhere; text or JSON lines; a level or a `RUST_LOG`-style filter.
//!
//! Writing goes through `tracing-appender`'s background worker so a slow terminal or disk never blocks a
//! connection, in blocking mode (`lossy(false)`) so that no routing line is ever dropped; the returned
//! guards flush on drop and must live until exit. Rotated files are named `FILE.YYYY-MM-DD` (UTC) and
//! the oldest beyond `log.keep` are deleted when a new one is opened (at start and at midnight).

use std::fmt::Write as _;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::{AccessLog, LogConfig, LogFormat, LogLevel};
use crate::routelog;

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
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Flushes the log writers when dropped: keep it until exit.
#[must_use]
pub struct Guards(#[allow(dead_code)] Vec<WorkerGuard>);

/// A writer on its own background thread: stdout, or the daily-rotated file `path`.
fn writer(
    key: &'static str,
    path: Option<&Path>,
    keep: u32,
) -> Result<(NonBlocking, WorkerGuard), LogError> {
    let builder = tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false);
    Ok(match path {
        None => builder.finish(std::io::stdout()),
        Some(path) => {
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
            builder.finish(appender)
        }
    })
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
    let (app_writer, g) = writer("log.file", cfg.file.as_deref(), cfg.keep)?;
    guards.push(g);
    let mut app = app_filter(cfg)?;
    if cfg.access != AccessLog::WithApplication {
        // The routing log has a stream of its own (or none): keep it out of the application log.
        let off = format!("{}=off", routelog::TARGET);
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
    let access_path = match &cfg.access {
        AccessLog::Stdout => Some(None),
        AccessLog::File(p) => Some(Some(p.as_path())),
        AccessLog::WithApplication | AccessLog::Off => None,
    };
    let access_layer = match access_path {
        Some(path) => {
            let (w, g) = writer("log.access", path, cfg.keep)?;
            guards.push(g);
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(w)
                    .event_format(LineFormat { json })
                    .with_filter(Targets::new().with_target(routelog::TARGET, Level::INFO)),
            )
        }
        None => None,
    };
    let subscriber = tracing_subscriber::registry()
        .with(app_layer)
        .with(access_layer);
    tracing::subscriber::set_global_default(subscriber).map_err(|_| LogError::AlreadySet)?;
    Ok(Guards(guards))
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

enum Val {
    Str(String),
    Num(String),
    Bool(bool),
    Null,
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
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut v = Fields::default();
        event.record(&mut v);
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
