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
        Err(e) => {
            assert!(
                std::env::var("SLUICEGATE_REQUIRE_DOCKER").is_err(),
                "Docker is required here: {e}"
            );
            eprintln!("*** SKIPPED {test}: no Docker engine answers ({e}) ***");
            false
        }
    }
}

/// Builds [`IMAGE`] once per test process from this build's `sluicegate-load`.
pub fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let bin = env!("CARGO_BIN_EXE_sluicegate-load");
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
