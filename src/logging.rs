//! Log output: level filter, text or JSON lines, stdout or a daily-rotated file.
//!
//! Writing goes through `tracing-appender`'s background worker so a slow terminal or disk never blocks a
//! connection, in blocking mode (`lossy(false)`) so that no routing line is ever dropped; the returned
//! guard flushes on drop and must live until exit.

use std::fmt::Write as _;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat, LogLevel};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log.file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Installs the global subscriber described by `cfg`.
pub fn init(cfg: &LogConfig) -> Result<WorkerGuard, LogError> {
    let (writer, guard) = match &cfg.file {
        Some(path) => {
            let (dir, name) = split_path(path)?;
            let appender = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(name)
                .build(dir)
                .map_err(|e| LogError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .finish(appender)
        }
        None => tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .finish(std::io::stdout()),
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level(cfg.level))
        .with_writer(writer)
        .event_format(LineFormat {
            json: cfg.format == LogFormat::Json,
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).map_err(|_| LogError::AlreadySet)?;
    Ok(guard)
}

fn split_path(path: &Path) -> Result<(&Path, &str), LogError> {
    let err = |reason: &str| LogError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| err("not a file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(err("its directory does not exist"));
    }
    Ok((dir, name))
}

pub fn level(l: LogLevel) -> Level {
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
pub struct LineFormat {
    pub json: bool,
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
