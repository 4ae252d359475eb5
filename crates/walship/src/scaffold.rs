//! Directories a start-up may create, removed again when the start is refused: a typo in a
//! path, a database not in WAL mode or a lease held elsewhere leaves nothing behind.

use std::path::{Path, PathBuf};

/// The directories that did not exist when [`Scaffold::note`] was called. Unless
/// [`Scaffold::keep`] is called, dropping it removes those that are still empty, deepest
/// first; a directory anything was written into stays.
#[derive(Debug, Default)]
pub struct Scaffold {
    dirs: Vec<PathBuf>,
    keep: bool,
}

impl Scaffold {
    /// Notes `dir` and those of its ancestors that do not exist yet.
    pub fn note(&mut self, dir: &Path) {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut d = Some(dir.as_path());
        while let Some(p) = d {
            if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
                break;
            }
            if !self.dirs.iter().any(|x| x == p) {
                self.dirs.push(p.to_path_buf());
            }
            d = p.parent();
        }
    }

    /// The start succeeded: the directories stay.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Removes the noted directories that exist and are empty, deepest first.
    fn undo(&mut self) {
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in self.dirs.drain(..) {
            // `remove_dir` refuses a directory that is not empty: what was written stays.
            if std::fs::remove_dir(&d).is_ok() {
                tracing::debug!(dir = %d.display(), "removed a directory the refused start created");
            }
        }
    }
}

impl Drop for Scaffold {
    fn drop(&mut self) {
        if !self.keep {
            self.undo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_start_removes_the_directories_it_created() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        {
            let mut s = Scaffold::default();
            s.note(&deep);
            std::fs::create_dir_all(&deep).unwrap();
        }
        assert!(!t.path().join("a").exists());
        assert!(t.path().exists());
    }

    #[test]
    fn directories_that_existed_or_hold_files_stay() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("old")).unwrap();
        let new = t.path().join("old/new/inner");
        {
            let mut s = Scaffold::default();
            s.note(&new);
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(t.path().join("old/new/file"), b"x").unwrap();
        }
        assert!(!new.exists());
        assert!(t.path().join("old/new/file").exists());
        assert!(t.path().join("old").exists());
    }

    #[test]
    fn a_start_that_succeeded_keeps_them() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("replica");
        {
            let mut s = Scaffold::default();
            s.note(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            s.keep();
        }
        assert!(dir.exists());
    }
}
