//! The `sluicegate` binary: command line, config, logging, signals, exit codes. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{CommandFactory, Parser, Subcommand};
use sluicegate::config::{Config, Dur};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Exit code for a config that cannot be used (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a runtime failure (a port that cannot be bound, a log file that cannot be opened).
const EXIT_RUNTIME: u8 = 1;

/// A layer-4 TCP load balancer.
#[derive(Parser, Debug)]
#[command(
    name = "sluicegate",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML config file (required to run).
    #[arg(long, short = 'c', env = "SLUICEGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config, print what is wrong, bind nothing.
    #[arg(long)]
    check: bool,
}

/// Which running sluicegate a client subcommand asks.
#[derive(clap::Args, Debug)]
struct Target {
    /// The config of the running sluicegate: its admin.listen (and admin token) are used.
    #[arg(long, short = 'c', env = "SLUICEGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The admin API's address, instead of reading it from the config.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a running sluicegate whether it is ready (GET /ready on its admin API): exit 0 when it
    /// is, 1 when it is not or does not answer. For container health checks.
    Healthcheck {
        #[command(flatten)]
        target: Target,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_name = "DURATION")]
        timeout: Dur,
    },
    /// List a running sluicegate's live connections (GET /connections on its admin API) as a
    /// table or JSON, or end them with --kill. The token comes from the config's admin section
    /// (token_file, ...) or SLUICEGATE_ADMIN_TOKEN.
    Connections {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// A backend's address (ip:port) or name.
        #[arg(long, value_name = "BACKEND")]
        backend: Option<String>,
        /// A client address (IP or IP:port) or CIDR block.
        #[arg(long, value_name = "CLIENT")]
        client: Option<String>,
        /// Only connections open longer than this (30s, 5m, 1h).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// List at most this many (the total is always given).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// End every match instead of listing (at least one filter is required).
        #[arg(long)]
        kill: bool,
        /// How --kill ends them: reset or fin.
        #[arg(long, default_value = "reset", value_name = "HOW")]
        how: String,
        /// Print the API's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        timeout: Dur,
    },
    /// A refreshing view of a running sluicegate (its admin API's /stats and /connections): every
    /// service with its backends, then the busiest (or oldest, idlest, newest) connections.
    /// Ctrl-C ends it.
    Top {
        #[command(flatten)]
        target: Target,
        /// Only this service and its connections.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Which connections first: busiest (most bytes), oldest, idlest or newest.
        #[arg(long, default_value = "busiest", value_parser = ["busiest", "oldest", "idlest", "newest"])]
        sort: String,
        /// How many connections to show.
        #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Time between frames.
        #[arg(long, default_value = "2s", value_name = "DURATION")]
        interval: Dur,
        /// Stop after this many frames (without it, until interrupted).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        timeout: Dur,
    },
    /// Ask a running sluicegate to replace itself with the binary now at its path (as SIGUSR2 does)
    /// and wait for the outcome: exit 0 once the new process serves (it prints its pid), 1 when the
    /// upgrade failed (the old process goes on serving; the reason is printed).
    Upgrade {
        /// The running sluicegate's pid.
        #[arg(long)]
        pid: u32,
        /// How long to wait for the new process to be ready.
        #[arg(long, default_value = "120s", value_name = "DURATION")]
        timeout: Dur,
    },
}

/// The log writer's guard, reachable from the forced-exit path so buffered lines are flushed even then.
static LOG_GUARD: Mutex<Option<sluicegate::logging::Guards>> = Mutex::new(None);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return subcommand(command);
    }
    let Some(config_path) = cli.config else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config FILE (or SLUICEGATE_CONFIG) is required to run",
            )
            .exit()
    };
    let path = config_path.display().to_string();
    if cli.check {
        return match checked_config(&config_path) {
            Ok(_) => {
                println!("{path}: ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluicegate: invalid config {path}:\n{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    // Started by an upgrade: the old process's listening sockets first, then the config (a config
    // this build rejects is said to the old process, which goes on serving).
    let incoming = match sluicegate::upgrade::Incoming::from_env() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("sluicegate: cannot take over from the old process: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // Started by systemd with sockets (socket activation): offered to the services and admin API.
    if let Err(e) = sluicegate::sockets::adopt_systemd() {
        eprintln!("sluicegate: {e}");
        if let Some(i) = incoming {
            i.fail(&e.to_string());
        }
        return ExitCode::from(EXIT_RUNTIME);
    }
    let (config, admin) = match checked_config(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluicegate: invalid config {path}:\n{e}");
            if let Some(i) = incoming {
                i.fail(&format!("invalid config {path}: {e}"));
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let origin = sluicegate::upgrade::Origin::of_this_process()
        .map_err(|e| {
            eprintln!("sluicegate: upgrades disabled: cannot find this binary's path: {e}")
        })
        .ok();
    match sluicegate::logging::init(&config.log) {
        Ok(g) => *LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(g),
        Err(e) => {
            eprintln!("sluicegate: {e}");
            if let Some(i) = incoming {
                i.fail(&e.to_string());
            }
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    // What exec health checks leave running outside their process group becomes ours to kill.
    if let Err(e) = sluicegate::health::adopt_orphans() {
        tracing::warn!(error = %e, "not a child subreaper: what an exec check leaves outside its process group is left running");
    }
    // The control plane (signals, probes, DNS, reload, drain); connections run on `workers`' threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluicegate: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = runtime.block_on(serve(config, admin, config_path, incoming, origin));
    // Sessions still parked (none after a completed drain) are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Exec checks in flight were killed with their probes; what they left is killed now.
    sluicegate::health::reap_orphans();
    drop(LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
    ExitCode::from(code)
}

/// Runs the server on the control runtime until it stops or hands over (an upgrade); returns the
/// exit code. `incoming` is the process this one takes over from, when it was started by an upgrade.
async fn serve(
    config: Config,
    admin: Option<sluicegate::config::AdminSettings>,
    config_path: PathBuf,
    incoming: Option<sluicegate::upgrade::Incoming>,
    origin: Option<sluicegate::upgrade::Origin>,
) -> u8 {
    let path = config_path.display().to_string();
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluicegate: cannot install signal handlers: {e}");
            if let Some(i) = incoming {
                i.fail(&format!("cannot install signal handlers: {e}"));
            }
            return EXIT_RUNTIME;
        }
    };
    match &incoming {
        Some(i) => {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path, from = i.from_pid(), "starting: taking over from the old process")
        }
        None => tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path, "starting"),
    }
    // Every proxied connection costs two descriptors (four with splice pipes): use all we may.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(nofile = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let server = match sluicegate::Server::bind_with(&config, admin) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("sluicegate: {e}");
            if let Some(i) = incoming {
                i.fail(&e.to_string());
            }
            return EXIT_RUNTIME;
        }
    };
    server.set_config_path(config_path.clone());
    let control = server.control();
    let Signals {
        term,
        int,
        mut hup,
        mut usr2,
    } = signals;
    // SIGUSR2 and `sluicegate upgrade --pid` upgrade in place.
    let (upgrade_tx, requests) = tokio::sync::mpsc::channel(4);
    if let Err(e) = sluicegate::upgrade::listen_for_requests(upgrade_tx.clone()) {
        tracing::warn!(error = %e, "cannot take `sluicegate upgrade` requests (SIGUSR2 still upgrades)");
    }
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            tracing::info!("SIGUSR2: upgrading");
            let _ = upgrade_tx
                .send(sluicegate::upgrade::Request { reply: None })
                .await;
        }
    });
    // SIGHUP reloads; a rejected file is logged and the running config kept.
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let _ = control.reload_from_file();
        }
    });
    let stops = Stops { term, int };
    let upgrades = sluicegate::Upgrades {
        requests,
        origin,
        incoming,
    };
    server.run_upgradable(stops.first_stop(), upgrades).await;
    0
}

/// The config at `path`, checked whole before anything starts: parsed and validated, the admin token
/// read (from the environment or its file), and every certificate, key and CA file read.
fn checked_config(
    path: &std::path::Path,
) -> Result<(Config, Option<sluicegate::config::AdminSettings>), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let admin = config
        .admin_settings(&sluicegate::config::ProcessEnv)
        .map_err(|e| e.to_string())?;
    sluicegate::tls::check_files(&config)?;
    Ok((config, admin))
}

/// `sluicegate upgrade --pid PID`: 0 once the new process serves, 1 when the upgrade failed.
fn upgrade(pid: u32, timeout: Dur) -> ExitCode {
    match sluicegate::upgrade::request(pid, timeout.0) {
        Ok(new) => {
            println!("upgraded: pid {pid} handed over to pid {new}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("sluicegate upgrade: failed: {why}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `sluicegate healthcheck`: 0 when the admin API says ready, 1 when not, 64 for a bad config.
fn healthcheck(
    config: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    timeout: Dur,
) -> ExitCode {
    use sluicegate::selfcheck;
    let addr = match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => match Config::load(&path) {
            Ok(c) => match selfcheck::admin_address(&c) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("sluicegate healthcheck: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            },
            Err(e) => {
                eprintln!(
                    "sluicegate healthcheck: invalid config {}:\n{e}",
                    path.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        (None, None) => Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "healthcheck needs --config FILE (or SLUICEGATE_CONFIG) or --admin ADDR",
            )
            .exit(),
    };
    match selfcheck::check(addr, timeout.0) {
        Ok(body) => {
            println!("ready: {body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluicegate healthcheck: not ready: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// A subcommand: a client of a running sluicegate (healthcheck, connections, top, upgrade).
fn subcommand(command: Command) -> ExitCode {
    match command {
        Command::Healthcheck { target, timeout } => {
            healthcheck(target.config, target.admin, timeout)
        }
        Command::Upgrade { pid, timeout } => upgrade(pid, timeout),
        Command::Connections {
            target,
            service,
            backend,
            client,
            older_than,
            limit,
            kill,
            how,
            json,
            timeout,
        } => {
            let asked = sluicegate::selfcheck::Connections {
                service,
                backend,
                client,
                older_than,
                limit,
                kill: kill.then_some(how),
            };
            connections(target, &asked, json, timeout)
        }
        Command::Top {
            target,
            service,
            sort,
            limit,
            interval,
            count,
            timeout,
        } => {
            let shown = sluicegate::selfcheck::Top {
                sort,
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
                service,
            };
            top(target, &shown, interval, count, timeout)
        }
    }
}

/// `sluicegate top`: frames until interrupted or `count` are shown; 1 when the admin API does not
/// answer the first, 64 for a bad config. A later failure is shown in place of a frame.
fn top(
    target: Target,
    shown: &sluicegate::selfcheck::Top,
    interval: Dur,
    count: Option<u64>,
    timeout: Dur,
) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let (addr, _) = match admin_target("top", target) {
        Ok(t) => t,
        Err(code) => return code,
    };
    // On a terminal each frame replaces the last; piped, frames follow one another.
    let tty = std::io::stdout().is_terminal();
    for n in 1u64.. {
        let frame = match shown.frame(addr, timeout.0) {
            Ok(f) => f,
            Err(e) if n == 1 => {
                eprintln!("sluicegate top: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            Err(e) => format!("sluicegate top: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        let clear = if tty { "\x1b[H\x1b[2J" } else { "" };
        if writeln!(out, "{clear}{frame}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::SUCCESS; // the reader went away (a pipe closed)
        }
        if count.is_some_and(|c| n >= c) {
            break;
        }
        std::thread::sleep(interval.0);
    }
    ExitCode::SUCCESS
}

/// The admin API a client subcommand asks: `--admin`, else the config's `admin.listen`; and the
/// token, from the config's admin section or `SLUICEGATE_ADMIN_TOKEN`. Err: the exit code, the
/// reason printed.
fn admin_target(
    command: &str,
    Target { config, admin }: Target,
) -> Result<(std::net::SocketAddr, Option<String>), ExitCode> {
    use sluicegate::selfcheck;
    let mut token = std::env::var(sluicegate::config::TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    let mut addr = admin;
    if let Some(path) = config {
        let settings = Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let a = selfcheck::admin_address(&c).map_err(|e| e.to_string())?;
                let s = c
                    .admin_settings(&sluicegate::config::ProcessEnv)
                    .map_err(|e| e.to_string())?;
                Ok((a, s))
            });
        match settings {
            Ok((a, s)) => {
                addr = addr.or(Some(a));
                if let Some((t, _)) = s.and_then(|s| s.token) {
                    token = Some(t.reveal().to_string());
                }
            }
            Err(e) => {
                eprintln!("sluicegate {command}: config {}:\n{e}", path.display());
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        }
    }
    let Some(addr) = addr else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!("{command} needs --config FILE (or SLUICEGATE_CONFIG) or --admin ADDR"),
            )
            .exit()
    };
    Ok((addr, token))
}

/// `sluicegate connections`: 0 with the listing (or the count killed), 1 when the admin API
/// refused or did not answer, 64 for a bad config.
fn connections(
    target: Target,
    asked: &sluicegate::selfcheck::Connections,
    json: bool,
    timeout: Dur,
) -> ExitCode {
    let (addr, token) = match admin_target("connections", target) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let body = match asked.ask(addr, token.as_deref(), timeout.0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sluicegate connections: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if json {
        println!("{body}");
    } else if asked.kill.is_some() {
        println!("killed {}", answer["killed"]);
    } else {
        print!("{}", sluicegate::selfcheck::connections_table(&answer));
    }
    ExitCode::SUCCESS
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr2: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// A stop signal this soon after the first is the same request: a process-group kill, or a supervisor
/// and a terminal both passing one on, must not skip the drain.
const SAME_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM and SIGINT: the first drains, a later one forces exit.
struct Stops {
    term: Signal,
    int: Signal,
}

impl Stops {
    /// Completes on the first SIGTERM or SIGINT. From then on another one forces exit at once, unless
    /// it comes within [`SAME_STOP`] of the first.
    async fn first_stop(mut self) {
        let name = self.next_stop().await;
        let first = tokio::time::Instant::now();
        tracing::info!(
            signal = name,
            "stop requested; another SIGTERM or SIGINT (a second or more later) forces exit"
        );
        tokio::spawn(async move {
            loop {
                let name = self.next_stop().await;
                if first.elapsed() < SAME_STOP {
                    tracing::info!(
                        signal = name,
                        "stop signal within a second of the first: the same request, still draining"
                    );
                    continue;
                }
                tracing::warn!(signal = name, "second stop signal: forcing exit");
                sluicegate::health::reap_orphans();
                drop(LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
                let code = if name == "SIGINT" { 130 } else { 143 };
                std::process::exit(code);
            }
        });
    }

    async fn next_stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
