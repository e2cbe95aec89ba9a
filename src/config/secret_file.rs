//! Who else may read or replace a file holding a secret (a TLS private key, the admin token): the
//! rule (pure, [`exposure`]) and its check on a file already open, so the mode checked is the mode
//! of the file read. Other users able to read the key can impersonate the service; able to write
//! it, they can swap it. `allow_readable_keys: true` (top level) turns the refusal into a warning,
//! for setups that cannot give sluicegate a file of its own (a container's read-only mount made for
//! another uid).

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The permission bits that let the file's group or anyone else read or write it.
const OTHERS_RW: u32 = 0o066;

/// What a file's mode lets other users do with it, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Its group or everyone may read it.
    Readable,
    /// Its group or everyone may write it (and perhaps read it).
    Writable,
}

impl Exposure {
    fn as_str(self) -> &'static str {
        match self {
            Exposure::Readable => "group- or world-readable",
            Exposure::Writable => "group- or world-writable",
        }
    }
}

/// What `mode` (a file's `st_mode`) lets users other than its owner do, `None` when nothing.
pub fn exposure(mode: u32) -> Option<Exposure> {
    match mode & OTHERS_RW {
        0 => None,
        m if m & 0o022 != 0 => Some(Exposure::Writable),
        _ => Some(Exposure::Readable),
    }
}

/// Checks the mode of `file`, opened from `path`, which holds a secret (`what`: "private key",
/// "admin token"). Exposed: `Err` naming the file, its mode and the way out, unless `allow` (then a
/// warning is logged and `Ok`). A mode that cannot be read is no reason to refuse: the read that
/// follows says what is wrong with the file.
pub fn check(file: &File, path: &Path, what: &str, allow: bool) -> Result<(), String> {
    let Ok(meta) = file.metadata() else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    let Some(exposed) = exposure(mode) else {
        return Ok(());
    };
    let shown = format!("{mode:04o}");
    if allow {
        tracing::warn!(
            file = %path.display(),
            mode = %shown,
            "this {what} file is {}: other users can read or replace it (allowed by allow_readable_keys)",
            exposed.as_str()
        );
        return Ok(());
    }
    Err(format!(
        "this {what} file has mode {shown}: it is {}; make it the owner's alone (chmod 600 {}), or set allow_readable_keys: true",
        exposed.as_str(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owners_bits_pass() {
        for ok in [0o600, 0o400, 0o700, 0o100600, 0o4600, 0o611, 0o601] {
            assert_eq!(exposure(ok), None, "{ok:o}");
        }
        for readable in [0o640, 0o604, 0o644, 0o444, 0o100644] {
            assert_eq!(exposure(readable), Some(Exposure::Readable), "{readable:o}");
        }
        for writable in [0o620, 0o602, 0o666, 0o662, 0o100660] {
            assert_eq!(exposure(writable), Some(Exposure::Writable), "{writable:o}");
        }
    }

    #[test]
    fn an_exposed_file_is_refused_naming_it_and_its_mode_unless_allowed() {
        let dir = std::env::temp_dir().join(format!("sg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, "k").unwrap();
        let set = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            File::open(&path).unwrap()
        };
        let err = check(&set(0o644), &path, "private key", false).unwrap_err();
        assert!(err.contains("0644") && err.contains("readable"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("allow_readable_keys"), "{err}");
        assert!(check(&set(0o644), &path, "private key", true).is_ok());
        assert!(check(&set(0o600), &path, "private key", false).is_ok());
        let err = check(&set(0o662), &path, "admin token", false).unwrap_err();
        assert!(err.contains("0662") && err.contains("writable"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
