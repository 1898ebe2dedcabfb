//! Outputs that appear whole or not at all: everything is written into a
//! temporary directory (or file) beside the target, which replaces the
//! target in one rename when the work is done and is removed if it is not.

use std::path::{Path, PathBuf};

pub struct StagedDir {
    /// Where to write now.
    pub path: PathBuf,
    target: PathBuf,
    done: bool,
}

impl StagedDir {
    /// A fresh temporary directory beside `target` (whose parent is created).
    pub fn beside(target: &Path) -> std::io::Result<StagedDir> {
        let path = temporary_beside(target)?;
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)?;
        Ok(StagedDir {
            path,
            target: target.to_path_buf(),
            done: false,
        })
    }

    /// Moves the finished directory into place, replacing an old one.
    pub fn commit(mut self) -> std::io::Result<()> {
        let target = &self.target;
        if target.exists() {
            let leaf = target.file_name().unwrap_or_default().to_string_lossy();
            let old = parent_of(target).join(format!(".{leaf}.kiln-old-{}", std::process::id()));
            std::fs::rename(target, &old)?;
            std::fs::rename(&self.path, target)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.path, target)?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A file written in a temporary place beside its target, renamed over it
/// when done and removed if not.
pub struct StagedFile {
    /// Where to write now.
    pub path: PathBuf,
    target: PathBuf,
    done: bool,
}

impl StagedFile {
    /// A fresh temporary file beside `target` (whose parent is created),
    /// open for writing.
    pub fn beside(target: &Path) -> std::io::Result<(StagedFile, std::fs::File)> {
        let path = temporary_beside(target)?;
        let file = std::fs::File::create(&path)?;
        let staged = StagedFile {
            path,
            target: target.to_path_buf(),
            done: false,
        };
        Ok((staged, file))
    }

    /// Moves the finished file into place, replacing an old one.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, &self.target)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `.<name>.kiln-tmp-<pid>` beside `target`, its parent created.
fn temporary_beside(target: &Path) -> std::io::Result<PathBuf> {
    let parent = parent_of(target);
    std::fs::create_dir_all(parent)?;
    let leaf = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    Ok(parent.join(format!(".{leaf}.kiln-tmp-{}", std::process::id())))
}

/// Writes `bytes` to a temporary file beside `target` (whose parent is
/// created), then renames it over `target`: readers never see half a file.
pub fn write_file_atomically(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = temporary_beside(target)?;
    let written =
        std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, target));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Refuses to replace a directory that holds something other than an
/// earlier output (`marker` is the file every such output has).
pub fn check_replaceable(target: &Path, marker: &str) -> Result<(), String> {
    if !target.exists() || target.join(marker).is_file() {
        return Ok(());
    }
    let empty = std::fs::read_dir(target)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if empty {
        Ok(())
    } else {
        Err(format!(
            "{} exists and is not a Kiln output directory (it has no {marker}); choose another output",
            target.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_stage_leaves_nothing_and_a_commit_replaces_the_target() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let stage = StagedDir::beside(&target).unwrap();
            std::fs::write(stage.path.join("half"), "x").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);

        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), "x").unwrap();
        let stage = StagedDir::beside(&target).unwrap();
        std::fs::write(stage.path.join("new"), "y").unwrap();
        stage.commit().unwrap();
        assert!(target.join("new").is_file());
        assert!(!target.join("old").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_written_atomically_replaces_the_target_and_leaves_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("sub/report.json");
        write_file_atomically(&target, b"old").unwrap();
        write_file_atomically(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(target.parent().unwrap()).unwrap().count(),
            1
        );
        // A target that cannot be replaced (a directory) fails and leaves no temporary file.
        let dir = root.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("inside"), "x").unwrap();
        assert!(write_file_atomically(&dir, b"x").is_err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }
}
