//! Files only their owner may read: directories 0700, and keys, tokens and certificates written
//! 0600, atomically (temporary file, fsync, rename, fsync of the directory).

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) if needed and makes it 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Replaces `path` with `bytes`, mode 0600, durably: a crash leaves the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(with_path)?;
    file.write_all(bytes).map_err(with_path)?;
    file.sync_all().map_err(with_path)?;
    std::fs::rename(&tmp, path).map_err(with_path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(with_path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_and_directories_are_owner_only() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("a").join("b");
        private_dir(&dir)?;
        let file = dir.join("key.pem");
        write_private(&file, b"one")?;
        write_private(&file, b"two")?;
        assert_eq!(std::fs::read(&file)?, b"two");
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&dir)?, 0o700);
        assert_eq!(mode(&file)?, 0o600);
        assert!(!dir.join("key.tmp").exists());
        Ok(())
    }
}
