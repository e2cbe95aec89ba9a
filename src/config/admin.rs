//! The `admin:` section and the credential that guards the admin API's mutations.
//!
//! The token can come from four places, the first present winning: the environment variable
//! [`TOKEN_ENV`], a file named by [`TOKEN_FILE_ENV`] (systemd's `LoadCredential=` gives one), the key
//! `admin.token_file`, or `admin.token` in the YAML. [`AdminConfig::resolve`] reads it (and checks
//! it) once; what it returns, [`AdminSettings`], is bound with the admin listener and stays in force
//! until the process restarts, whatever a reload says.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::Deserializer;
use serde::Deserialize;

use super::Problem;

/// The shortest token accepted: a guessable token is no guard on a network-facing API.
pub const MIN_TOKEN_LEN: usize = 16;
/// A token file larger than this is not a token (and is not read whole).
const MAX_TOKEN_FILE: u64 = 4096;
/// The environment variable that holds the token; it overrides the config.
pub const TOKEN_ENV: &str = "SLUICEGATE_ADMIN_TOKEN";
/// The environment variable that names a file holding the token (`%d/admin-token` under systemd).
pub const TOKEN_FILE_ENV: &str = "SLUICEGATE_ADMIN_TOKEN_FILE";

/// A secret that never shows in `Debug` output or logs, compared without leaking where or whether
/// the lengths differ.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// Whether `given` is this secret. The time taken depends only on `given`'s length (which the
    /// caller already knows), never on the secret's length or on the position of a difference.
    pub fn matches(&self, given: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        if secret.is_empty() {
            return false;
        }
        let mut diff = u8::from(given.len() != secret.len());
        for (i, g) in given.iter().enumerate() {
            diff |= g ^ secret[i % secret.len()];
        }
        diff == 0
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The secret itself, to send (`sluicegate connections` as the admin API's client).
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback unless a token is set (enforced when the token is resolved).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token for mutations, written in the file (prefer `token_file` or the environment).
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file whose content (trailing newline removed) is the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// DNS names the admin API may be reached by (its `Host` header), besides IP addresses and
    /// `localhost`: anything else is refused, so a DNS-rebinding page cannot reach it.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// Where the token in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Env,
    EnvFile,
    File,
    Config,
}

impl TokenSource {
    /// The name a user wrote it under, for messages.
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenSource::Env => TOKEN_ENV,
            TokenSource::EnvFile => TOKEN_FILE_ENV,
            TokenSource::File => "admin.token_file",
            TokenSource::Config => "admin.token",
        }
    }
}

/// The admin API as bound: its address, the token in force and the names it answers to. Fixed for
/// the life of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: Option<(Secret, TokenSource)>,
    /// Lower-case, without a trailing dot.
    pub hosts: Vec<String>,
}

impl AdminSettings {
    /// Whether a request's `Host` value may reach the admin API: an IP address (a DNS-rebinding page
    /// can only send a name), `localhost`, or one of `admin.hosts`. The port is not checked.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.is_empty() {
            return false;
        }
        name.parse::<IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Whether the admin API may serve on `local`, the address its socket is really bound to (the
    /// check of the config was of `listen`): a non-loopback address needs a token.
    pub fn may_serve_on(&self, local: SocketAddr) -> bool {
        self.token.is_some() || !needs_token(local.ip())
    }
}

/// Whether an admin API on `ip` needs a token: whoever reaches anything but loopback could use it.
fn needs_token(ip: IpAddr) -> bool {
    !ip.is_loopback()
}

/// The host part of a `Host` value (`name:port`, `[v6]:port`, `name`), without a trailing dot.
fn host_name(host: &str) -> &str {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => h,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

/// What the process environment says, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl AdminConfig {
    /// Reads the token from wherever it is (see the module docs) and checks everything that cannot
    /// be checked without it. Every problem names the key or variable it concerns. A token file
    /// other users may read is refused unless `allow_readable` (`allow_readable_keys`).
    pub fn resolve(
        &self,
        env: &dyn Env,
        allow_readable: bool,
    ) -> Result<AdminSettings, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut fail = |path: &str, reason: String| {
            problems.push(Problem {
                path: path.to_string(),
                reason,
            })
        };
        let token = if let Some(t) = env.var(TOKEN_ENV) {
            Some((Secret(t.trim().to_string()), TokenSource::Env))
        } else if let Some(path) = env.var(TOKEN_FILE_ENV) {
            match read_token_file(Path::new(&path), allow_readable) {
                Ok(t) => Some((t, TokenSource::EnvFile)),
                Err(e) => {
                    fail(TOKEN_FILE_ENV, format!("{path}: {e}"));
                    None
                }
            }
        } else if let Some(path) = &self.token_file {
            match read_token_file(path, allow_readable) {
                Ok(t) => Some((t, TokenSource::File)),
                Err(e) => {
                    fail("admin.token_file", format!("{}: {e}", path.display()));
                    None
                }
            }
        } else {
            self.token.clone().map(|t| (t, TokenSource::Config))
        };
        if let Some((t, from)) = &token {
            if let Err(why) = token_problem(t) {
                fail(from.as_str(), why);
            }
        }
        let unread = token.is_none() && needs_token(self.listen.ip());
        if unread && self.token_file.is_none() && env.var(TOKEN_FILE_ENV).is_none() {
            fail(
                "admin.token",
                format!(
                    "required when admin.listen ({}) is not a loopback address: set admin.token_file, admin.token or {TOKEN_ENV}",
                    self.listen
                ),
            );
        }
        if problems.is_empty() {
            Ok(AdminSettings {
                listen: self.listen,
                token,
                hosts: self
                    .hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            })
        } else {
            Err(problems)
        }
    }
}

/// Why `t` cannot be a token, if it cannot.
pub(super) fn token_problem(t: &Secret) -> Result<(), String> {
    if t.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "must be at least {MIN_TOKEN_LEN} characters (this one is shorter)"
        ));
    }
    if !t.0.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces (it is sent in a header)".into());
    }
    Ok(())
}

/// The token in `path`: its content without the trailing line break.
fn read_token_file(path: &Path, allow_readable: bool) -> Result<Secret, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    super::secret_file::check(&f, path, "admin token", allow_readable)?;
    let mut text = String::new();
    f.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("larger than {MAX_TOKEN_FILE} bytes: not a token"));
    }
    Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// Whether `s` may be a DNS name in `admin.hosts`.
pub(super) fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, String>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }
    fn env(pairs: &[(&'static str, &str)]) -> FakeEnv {
        FakeEnv(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }
    fn admin(listen: &str, token: Option<&str>, file: Option<&Path>) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().unwrap(),
            token: token.map(Secret::new),
            token_file: file.map(Path::to_path_buf),
            hosts: vec!["Sluicegate.".into()],
        }
    }
    const GOOD: &str = "0123456789abcdef";

    /// Writes a token file only its owner may read.
    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn a_token_file_others_may_read_is_refused_unless_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sg-token-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        std::fs::write(&file, GOOD).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let a = admin("0.0.0.0:1", None, Some(&file));
        let p = a.resolve(&env(&[]), false).unwrap_err();
        assert_eq!(p[0].path, "admin.token_file");
        assert!(p[0].reason.contains("0644"), "{p:?}");
        let e = env(&[(TOKEN_FILE_ENV, file.to_str().unwrap())]);
        let p = admin("127.0.0.1:1", None, None)
            .resolve(&e, false)
            .unwrap_err();
        assert_eq!(p[0].path, TOKEN_FILE_ENV);
        let (t, from) = a.resolve(&env(&[]), true).unwrap().token.unwrap();
        assert!(t.matches(GOOD.as_bytes()));
        assert_eq!(from, TokenSource::File);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The token rule on the socket's real address: a config that passed for a loopback `listen`
    /// does not serve a socket bound wider without a token.
    #[test]
    fn a_token_is_needed_wherever_the_socket_really_is() {
        let open = admin("127.0.0.1:9901", None, None)
            .resolve(&env(&[]), false)
            .unwrap();
        let guarded = admin("0.0.0.0:9901", Some(GOOD), None)
            .resolve(&env(&[]), false)
            .unwrap();
        for (local, tokenless) in [
            ("127.0.0.1:9901", true),
            ("127.0.0.2:9901", true),
            ("[::1]:9901", true),
            ("0.0.0.0:9901", false),
            ("[::]:9901", false),
            ("192.0.2.1:9901", false),
            ("[::ffff:127.0.0.1]:9901", false),
        ] {
            let local: SocketAddr = local.parse().unwrap();
            assert_eq!(
                open.may_serve_on(local),
                tokenless,
                "{local} without a token"
            );
            assert!(guarded.may_serve_on(local), "{local} with a token");
        }
    }

    #[test]
    fn comparison_needs_the_exact_token() {
        let s = Secret::new(GOOD);
        assert!(s.matches(GOOD.as_bytes()));
        assert!(!s.matches(b"0123456789abcdeF"));
        assert!(!s.matches(b"0123456789abcde"));
        assert!(
            !s.matches(b"0123456789abcdef0123456789abcdef"),
            "a repeat is not the token"
        );
        assert!(!s.matches(b""));
        assert!(
            !Secret::new("").matches(b""),
            "an empty secret matches nothing"
        );
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let a = admin("127.0.0.1:1", Some(GOOD), None);
        assert!(!format!("{a:?}").contains(GOOD));
        let s = a.resolve(&env(&[]), false).unwrap();
        assert!(!format!("{s:?}").contains(GOOD));
    }

    #[test]
    fn environment_then_files_then_the_config() {
        let dir = std::env::temp_dir().join(format!("sg-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        write_private(&file, "fromfile-fromfile\n");
        let a = admin("0.0.0.0:1", Some(GOOD), Some(&file));
        let got = |e: &FakeEnv| a.resolve(e, false).unwrap().token.unwrap();
        assert_eq!(got(&env(&[])).1, TokenSource::File);
        assert!(
            got(&env(&[])).0.matches(b"fromfile-fromfile"),
            "newline removed"
        );
        let other = dir.join("u");
        write_private(&other, "envfile-envfile-1");
        let e = env(&[(TOKEN_FILE_ENV, other.to_str().unwrap())]);
        assert_eq!(got(&e).1, TokenSource::EnvFile);
        let e = env(&[(TOKEN_ENV, "fromenv-fromenv-1"), (TOKEN_FILE_ENV, "/nope")]);
        assert_eq!(got(&e).1, TokenSource::Env);
        let inline = admin("0.0.0.0:1", Some(GOOD), None);
        assert_eq!(
            inline.resolve(&env(&[]), false).unwrap().token.unwrap().1,
            TokenSource::Config
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_tokens_are_refused_naming_their_source() {
        let short = admin("127.0.0.1:1", Some("s3cret"), None).resolve(&env(&[]), false);
        let p = short.unwrap_err();
        assert_eq!(p[0].path, "admin.token");
        assert!(p[0].reason.contains("at least 16"), "{p:?}");
        let e = env(&[(TOKEN_ENV, "has space in the middle")]);
        let p = admin("127.0.0.1:1", None, None)
            .resolve(&e, false)
            .unwrap_err();
        assert_eq!(p[0].path, TOKEN_ENV);
        let p = admin("127.0.0.1:1", None, Some(Path::new("/nonexistent/t")))
            .resolve(&env(&[]), false)
            .unwrap_err();
        assert_eq!(p[0].path, "admin.token_file");
        assert!(p[0].reason.contains("cannot read"), "{p:?}");
    }

    #[test]
    fn an_open_bind_needs_a_token_from_somewhere() {
        let p = admin("0.0.0.0:9901", None, None)
            .resolve(&env(&[]), false)
            .unwrap_err();
        assert_eq!(p[0].path, "admin.token");
        assert!(p[0].reason.contains("required"), "{p:?}");
        let e = env(&[(TOKEN_ENV, GOOD)]);
        assert!(admin("0.0.0.0:9901", None, None).resolve(&e, false).is_ok());
        assert!(admin("[::1]:9901", None, None)
            .resolve(&env(&[]), false)
            .is_ok());
    }

    #[test]
    fn hosts_ip_literals_localhost_and_configured_names() {
        let s = admin("127.0.0.1:1", None, None)
            .resolve(&env(&[]), false)
            .unwrap();
        for ok in [
            "127.0.0.1:9901",
            "10.1.2.3",
            "[::1]:9901",
            "[fe80::1]",
            "localhost:9901",
            "LOCALHOST",
            "sluicegate:9901",
            "SLUICEGATE.:9901",
        ] {
            assert!(s.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:9901",
            "127.0.0.1.evil.example",
            "",
            ":9901",
            "sluicegate.evil",
        ] {
            assert!(!s.host_allowed(bad), "{bad}");
        }
    }
}
