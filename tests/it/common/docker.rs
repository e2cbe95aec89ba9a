//! The real Docker Engine for the replica tests: whether one answers, an image of `sluicegate-load
//! serve` made from this build (the binary and the libraries it links, on scratch: no registry
//! needed), and a scope per test (its own network and balancer label) that removes everything it
//! started when it ends.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::OnceLock;

/// The image the replica tests run.
pub const IMAGE: &str = "sluicegate-test/serve:latest";

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether a Docker Engine answers. Without one the caller skips, saying so loudly, unless
/// `SLUICEGATE_REQUIRE_DOCKER=1` (CI) makes that a failure.
pub fn available(test: &str) -> bool {
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Ok(_) => true,
        Err(e) => super::require_tool(
            "DOCKER",
            Some(format!("{test}: no Docker Engine answers ({e})")),
        ),
    }
}

/// Builds [`IMAGE`] once per test process from this build's `sluicegate-load`.
pub fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let bin = super::load_tool::path();
        let ctx = std::env::temp_dir().join(format!("sluicegate-test-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&ctx);
        let root = ctx.join("rootfs");
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        std::fs::copy(bin, root.join("sluicegate-load")).map_err(|e| e.to_string())?;
        let ldd = Command::new("ldd").arg(bin).output().map_err(|e| e.to_string())?;
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let to = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::copy(lib, &to).map_err(|e| format!("{lib}: {e}"))?;
        }
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY rootfs/ /\nEXPOSE 5000\nENTRYPOINT [\"/sluicegate-load\", \"serve\", \"--listen\", \"0.0.0.0:5000\"]\n",
        )
        .map_err(|e| e.to_string())?;
        docker(&["build", "-q", "-t", IMAGE, ctx.to_str().unwrap()])?;
        let _ = std::fs::remove_dir_all(&ctx);
        Ok(())
    });
    if let Err(e) = built {
        panic!("cannot build the test image: {e}");
    }
    IMAGE
}

/// One test's corner of the Docker host: a network and a balancer label of its own. Dropping it
/// removes every container with the label, and the network.
pub struct Scope {
    pub balancer: String,
    pub network: String,
}

impl Scope {
    pub fn new() -> Scope {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("sgtest-{}-{}", std::process::id(), N.fetch_add(1, Relaxed));
        docker(&["network", "create", &id]).expect("create the test network");
        Scope {
            balancer: id.clone(),
            network: id,
        }
    }

    /// (name, state) of every container with this scope's label.
    pub fn containers(&self) -> Vec<(String, String)> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=io.sluicegate.balancer={}", self.balancer),
            "--format",
            "{{.Names}} {{.State}}",
        ])
        .expect("docker ps");
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        v.sort();
        v
    }

    pub fn running(&self) -> usize {
        self.containers()
            .iter()
            .filter(|(_, s)| s == "running")
            .count()
    }

    pub fn kill(&self, container: &str) {
        docker(&["kill", container]).expect("docker kill");
    }

    /// Starts a container of [`image`] named and host-named `NETWORK-name` on this scope's network,
    /// with this scope's label (so it is removed with the scope), hardened, and `labels`; returns its
    /// name (what `sluicegate-load serve` answers with in `X-Backend`).
    pub fn run(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let name = format!("{}-{name}", self.network);
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--hostname".into(),
            name.clone(),
            "--network".into(),
            self.network.clone(),
            "--cap-drop".into(),
            "ALL".into(),
            "--security-opt".into(),
            "no-new-privileges".into(),
            "--label".into(),
            format!("io.sluicegate.balancer={}", self.balancer),
        ];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push(image().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args).expect("docker run");
        name
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Ok(ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.sluicegate.balancer={}", self.balancer),
        ]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = docker(&args);
            }
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// Serves each connection to `listener` with `serve`, until the task returned is aborted.
pub fn serve_each<F, Fut>(
    listener: tokio::net::UnixListener,
    serve: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        // Dropping the set (when the task is aborted) ends every connection.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((s, _)) = accepted else { continue };
                    conns.spawn(serve(s));
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// The real Engine's socket: `DOCKER_HOST` when it is a Unix socket, else the default.
pub fn engine_socket() -> std::path::PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(std::path::PathBuf::from))
        .unwrap_or_else(|| "/var/run/docker.sock".into())
}

/// A Docker Engine endpoint of a test's own (a Unix socket in a temporary directory) whose faults
/// the test switches: it hangs (accepts and never answers), refuses every stop and remove with an
/// error, or passes each request on to the real Engine (one request per connection).
pub struct FaultyEngine {
    /// `unix:///…`, for `replicas.docker`.
    pub endpoint: String,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fail_removals: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Stops and removes refused so far.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    dir: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyEngine {
    /// Starts one that passes everything on to the real Engine.
    pub fn start() -> FaultyEngine {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluicegate-engine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let hang = Arc::new(AtomicBool::new(false));
        let fail_removals = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (h, f, r) = (hang.clone(), fail_removals.clone(), refused.clone());
        let task = serve_each(listener, move |s| serve(s, h.clone(), f.clone(), r.clone()));
        FaultyEngine {
            endpoint: format!("unix://{}", path.display()),
            hang,
            fail_removals,
            refused,
            dir,
            task,
        }
    }

    /// From now on, every request gets no answer at all.
    pub fn hang(&self, on: bool) {
        self.hang.store(on, Relaxed);
    }

    /// From now on, every stop and remove is refused with HTTP 500 (or passed on again).
    pub fn fail_removals(&self, on: bool) {
        self.fail_removals.store(on, Relaxed);
    }
}

impl Drop for FaultyEngine {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One client connection of a [`FaultyEngine`]: one request, answered by the fault or by the real
/// Engine (asked to close after it, so the next request comes on a new connection).
async fn serve(
    mut client: tokio::net::UnixStream,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fail_removals: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    if hang.load(Relaxed) {
        // Holds the connection open and says nothing, until the client gives up.
        let _ = client.read_to_end(&mut Vec::new()).await;
        return;
    }
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut line = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let is_container = path.contains("/containers/");
    let removal = (method == "POST" && is_container && path.ends_with("/stop"))
        || (method == "DELETE" && is_container);
    if removal && fail_removals.load(Relaxed) {
        refused.fetch_add(1, Relaxed);
        let body = r#"{"message":"injected fault: the test's engine refuses removals"}"#;
        let _ = client
            .write_all(
                format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        return;
    }
    let Ok(mut upstream) = tokio::net::UnixStream::connect(engine_socket()).await else {
        return;
    };
    let mut out: String = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect();
    out += "Connection: close\r\n\r\n";
    if upstream.write_all(out.as_bytes()).await.is_err()
        || upstream.write_all(&buf[end..]).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The TLS fixtures (`tests/tls/make.sh`): `engine/` is a `DOCKER_CERT_PATH` trusting the test
/// Engine's CA, `untrusted/` one trusting someone else's.
pub fn tls_dir(which: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(which)
}

/// The real Engine behind TLS on 127.0.0.1 (a random port), as a Docker daemon started with
/// `--tlsverify` serves it: its certificate signed by the fixtures' CA, and only clients presenting
/// a certificate of that CA let through.
pub struct TlsEngine {
    pub addr: std::net::SocketAddr,
    /// Handshakes that completed, and those that failed.
    pub handshakes: std::sync::Arc<AtomicU32>,
    pub refused: std::sync::Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsEngine {
    pub async fn start() -> TlsEngine {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::Arc;
        let dir = tls_dir("engine");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server-cert.pem"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU32::new(0));
        let refused = Arc::new(AtomicU32::new(0));
        let (ok, bad) = (handshakes.clone(), refused.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((s, _)) = accepted else { continue };
                        let (acceptor, ok, bad) = (acceptor.clone(), ok.clone(), bad.clone());
                        conns.spawn(async move {
                            let Ok(mut tls) = acceptor.accept(s).await else {
                                bad.fetch_add(1, Relaxed);
                                return;
                            };
                            ok.fetch_add(1, Relaxed);
                            if let Ok(mut engine) = tokio::net::UnixStream::connect(engine_socket()).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TlsEngine {
            addr,
            handshakes,
            refused,
            task,
        }
    }
}

impl Drop for TlsEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}
