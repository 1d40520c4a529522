//! Small file-system rules both binaries share: config paths resolve against the
//! config file's folder, and private folders are created owner-only.

use std::path::{Path, PathBuf};

/// `value` resolved against `base`; `None` when it is blank.
pub fn resolve(base: &Path, value: &str) -> Option<PathBuf> {
    (!value.trim().is_empty()).then(|| base.join(value))
}

/// `value` resolved against `base`, which must name a readable file. The error
/// is a sentence for a config error message.
pub fn existing_file(base: &Path, value: &str) -> Result<PathBuf, String> {
    let path = resolve(base, value).ok_or("must not be empty")?;
    if !path.is_file() {
        return Err(format!("{} is not a readable file", path.display()));
    }
    Ok(path)
}

/// Creates `dir` and its parents; a folder created here is owner-only (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}
