//! The pepper: the HMAC key that every stored token hash is made with. It comes from
//! `KEYGATE_PEPPER`, or from `<data-dir>/pepper` (created at first start, mode 0600). It never
//! lives in the database, so a copy of the database alone cannot verify token guesses.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use keygate_core::secret::{OsRandom, Pepper};

const FILE_NAME: &str = "pepper";

/// Checks a `KEYGATE_PEPPER` value, before anything is opened.
pub fn from_env(value: &str) -> anyhow::Result<Pepper> {
    Pepper::new(value.trim().as_bytes()).map_err(|e| anyhow::anyhow!("KEYGATE_PEPPER: {}", e.message))
}

/// Loads the pepper from `env_value` if given, else from the data directory, creating it there
/// on first use. A missing pepper file is created only while the store holds no credentials
/// (`store_has_credentials`): a new pepper would silently invalidate every existing token.
pub fn load(env_value: Option<String>, data_dir: &Path, store_has_credentials: bool) -> anyhow::Result<Pepper> {
    if let Some(v) = env_value {
        return from_env(&v);
    }
    let path = data_dir.join(FILE_NAME);
    if !path.exists() {
        if store_has_credentials {
            bail!(
                "the pepper file {} is missing but the store holds tokens or root keys, which only that pepper can \
                 verify; restore the file from a backup, or set KEYGATE_PEPPER to the pepper the other nodes use",
                path.display()
            );
        }
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        create(&path)?;
    }
    check_mode(&path)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read the pepper file {}", path.display()))?;
    Pepper::new(text.trim().as_bytes())
        .map_err(|e| anyhow::anyhow!("the pepper file {} is not usable: {}", path.display(), e.message))
}

fn create(path: &Path) -> anyhow::Result<()> {
    let bytes = Pepper::generate_bytes(&OsRandom).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("cannot create the pepper file {}", path.display()))?;
    f.write_all(hex.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

fn check_mode(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "the pepper file {} can be read by other users (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(None, dir.path(), false).unwrap();
        let b = load(None, dir.path(), true).unwrap();
        assert_eq!(a.hash("kg_x"), b.hash("kg_x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(dir.path().join(FILE_NAME), std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(load(None, dir.path(), true).unwrap_err().to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn env_wins_and_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(Some("short".into()), dir.path(), false).is_err());
        let p = load(Some("x".repeat(40)), dir.path(), false).unwrap();
        assert_eq!(p.hash("a"), Pepper::new("x".repeat(40).as_bytes()).unwrap().hash("a"));
        assert!(!dir.path().join(FILE_NAME).exists());
    }

    #[test]
    fn a_lost_pepper_is_not_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(None, dir.path(), true).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("backup"), "{e}");
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
