//! [`LocalStore`]: objects as files under a directory.
//!
//! A key `a/b/c` is the file `<root>/a/b/c`. A put writes `<root>/.tmp-<random>`, fsyncs it,
//! renames it into place (or hard-links it, for `if_none_match`, since a link fails on an
//! existing name) and fsyncs the directory, so a reader sees the whole object or nothing, and
//! a crash leaves at most a `.tmp-` file, which listings skip. Listings walk the tree and sort
//! keys by byte order, like S3.
//!
//! Limitation: a filesystem cannot hold both a file `a` and a file `a/b`, so keys where one is
//! a prefix of the other followed by `/` cannot coexist here (S3 allows it).

use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::error::{StorageError, StorageResult};
use crate::{GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions};

/// Name prefix of temporary files; never listed, and refused as a key segment.
const TMP_PREFIX: &str = ".tmp-";

/// Size of the chunks a get streams.
const READ_CHUNK: usize = 1 << 20;

/// Page size when a list asks for none, and the cap (as on S3).
pub(crate) const MAX_KEYS: usize = 1000;

/// Refuses keys that cannot name a file under the root: empty, absolute, with an empty, `.`
/// or `..` segment, a NUL, a backslash, or a segment starting with `.tmp-`.
pub(crate) fn check_key(key: &str) -> StorageResult<()> {
    let bad = |reason: &str| {
        Err(StorageError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("the key is empty");
    }
    if key.starts_with('/') {
        return bad("keys are relative: remove the leading `/`");
    }
    if key.contains('\0') || key.contains('\\') {
        return bad("keys may not contain NUL or `\\`");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return bad("empty path segment (`//` or a trailing `/`)");
        }
        if segment == "." || segment == ".." {
            return bad("`.` and `..` segments are not allowed");
        }
        if segment.starts_with(TMP_PREFIX) {
            return bad("segments starting with `.tmp-` are reserved for temporary files");
        }
    }
    Ok(())
}

/// Refuses list prefixes that could escape the root (`..` segments, a leading `/`).
pub(crate) fn check_prefix(prefix: &str) -> StorageResult<()> {
    let bad = |reason: &str| {
        Err(StorageError::InvalidKey {
            key: prefix.to_string(),
            reason: reason.to_string(),
        })
    };
    if prefix.starts_with('/') {
        return bad("prefixes are relative: remove the leading `/`");
    }
    if prefix.contains('\0') || prefix.contains('\\') {
        return bad("prefixes may not contain NUL or `\\`");
    }
    if prefix.split('/').any(|s| s == "..") {
        return bad("`..` segments are not allowed");
    }
    Ok(())
}

/// A directory of objects.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    describe: String,
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating nothing: the directory is created at the
    /// first write (never its parent), so a reader never leaves one behind. A `root` whose
    /// parent directory does not exist is refused ([`StorageError::MissingParent`]): a
    /// mistyped path must not pass for an empty replica.
    pub fn new(root: PathBuf) -> StorageResult<Self> {
        let root = std::path::absolute(&root)
            .map_err(|e| StorageError::io(format!("resolving {}", root.display()), e))?;
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StorageError::io(
                    format!("replica directory {}", root.display()),
                    io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => check_parent(&root)?,
            Err(e) => {
                return Err(StorageError::io(
                    format!("replica directory {}", root.display()),
                    e,
                ));
            }
        }
        let describe = crate::ReplicaUrl::File { path: root.clone() }.to_string();
        Ok(LocalStore { root, describe })
    }

    /// Creates the replica directory if it does not exist yet (writers only), fsyncing the
    /// parent that gained it.
    fn ensure_root(&self) -> StorageResult<()> {
        if self.root.is_dir() {
            return Ok(());
        }
        check_parent(&self.root)?;
        match fs::create_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => {
                return Err(StorageError::io(
                    format!("creating replica directory {}", self.root.display()),
                    e,
                ));
            }
        }
        if let Some(parent) = self.root.parent() {
            fsync_dir(parent).map_err(|e| {
                StorageError::io(format!("syncing directory {}", parent.display()), e)
            })?;
        }
        tracing::info!(store = %self.describe, "created the replica directory");
        Ok(())
    }

    /// The directory this store writes under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> StorageResult<PathBuf> {
        check_key(key)?;
        Ok(key.split('/').fold(self.root.clone(), |p, s| p.join(s)))
    }

    fn not_found(&self, key: &str) -> StorageError {
        StorageError::NotFound {
            store: self.describe.clone(),
            key: key.to_string(),
        }
    }
}

/// Refuses a replica directory whose parent does not exist.
fn check_parent(root: &Path) -> StorageResult<()> {
    match root.parent() {
        Some(parent) if !parent.is_dir() => Err(StorageError::MissingParent {
            path: parent.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Removes the temporary file on drop unless disarmed.
struct TempGuard {
    path: Option<PathBuf>,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(error) = fs::remove_file(&path)
            && !matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            )
        {
            tracing::warn!(path = %path.display(), %error, "could not remove temporary file");
        }
    }
}

fn random_tmp_name() -> String {
    format!("{TMP_PREFIX}{:016x}", rand::random::<u64>())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Creates the parents of `dest` up to `root`, fsyncing the directories that gained an entry.
fn create_parents(root: &Path, dest: &Path) -> io::Result<()> {
    let Some(parent) = dest.parent() else {
        return Ok(());
    };
    let mut missing = Vec::new();
    let mut dir = parent;
    while dir != root && !dir.is_dir() {
        missing.push(dir.to_path_buf());
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(parent)?;
    // Each created directory's own parent gained an entry.
    for created in missing.iter().rev() {
        if let Some(p) = created.parent() {
            fsync_dir(p)?;
        }
    }
    Ok(())
}

/// Moves the finished temporary file to `dest`. With `exclusive`, fails with `AlreadyExists`
/// if `dest` exists (a hard link never replaces a name). The guard removes the temporary name
/// unless a rename consumed it.
fn install(root: &Path, mut guard: TempGuard, dest: &Path, exclusive: bool) -> io::Result<()> {
    let Some(tmp) = guard.path.clone() else {
        return Err(io::Error::other("no temporary file to install"));
    };
    let tmp = tmp.as_path();
    // A concurrent delete may prune an empty parent between creating it and renaming into it:
    // try again a few times.
    let mut attempt = 0;
    loop {
        attempt += 1;
        create_parents(root, dest)?;
        let result = if exclusive {
            fs::hard_link(tmp, dest)
        } else {
            fs::rename(tmp, dest)
        };
        match result {
            Ok(()) => {
                if !exclusive {
                    // The rename consumed the temporary name.
                    guard.path = None;
                }
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => continue,
            Err(e) => return Err(e),
        }
    }
    if let Some(parent) = dest.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

fn modified_ms(meta: &fs::Metadata) -> Option<i64> {
    let t = meta.modified().ok()?;
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// Walks `dir` (whose key prefix is `dir_key`, empty or ending in `/`), collecting files
/// whose keys start with `prefix`, pruning directories that cannot hold such keys.
fn walk(dir: &Path, dir_key: &str, prefix: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::warn!(path = %entry.path().display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let key = format!("{dir_key}{name}");
        let mut file_type = entry.file_type()?;
        if file_type.is_symlink() {
            match fs::metadata(entry.path()) {
                Ok(m) => file_type = m.file_type(),
                Err(_) => continue, // dangling link
            }
        }
        if file_type.is_dir() {
            let sub = format!("{key}/");
            if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                walk(&entry.path(), &sub, prefix, out)?;
            }
        } else if file_type.is_file() && key.starts_with(prefix) {
            let meta = match fs::metadata(entry.path()) {
                Ok(m) => m,
                // Deleted while we walked.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified_ms: modified_ms(&meta),
            });
        }
    }
    Ok(())
}

/// One listed entry: an object, or a common prefix standing for the objects under it.
enum Entry {
    Object(ObjectMeta),
    Prefix(String),
}

/// Cuts one page out of `objects` (every object under `req.prefix`, in any order), with S3's
/// semantics for `start_after`, `delimiter`, `max_keys` and continuation. The continuation
/// token is `k:<last key>` or `p:<last common prefix>`.
pub(crate) fn paginate(mut objects: Vec<ObjectMeta>, req: &ListRequest) -> ListPage {
    objects.sort_unstable_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    let after_start = |k: &str| req.start_after.as_deref().is_none_or(|s| k > s);
    let after_token = |k: &str| match req.continuation.as_deref() {
        None => true,
        Some(token) => match token.split_at_checked(2) {
            Some(("k:", last)) => k > last,
            Some(("p:", last)) => k > last && !k.starts_with(last),
            // An unknown token: start over rather than loop.
            _ => true,
        },
    };
    let delimiter = req.delimiter.as_deref().filter(|d| !d.is_empty());
    let max = req.max_keys.unwrap_or(MAX_KEYS).clamp(1, MAX_KEYS);

    let mut entries: Vec<Entry> = Vec::new();
    let mut more = false;
    for obj in objects {
        if !obj.key.starts_with(&req.prefix) || !after_start(&obj.key) || !after_token(&obj.key) {
            continue;
        }
        let common = delimiter.and_then(|d| {
            let rest = &obj.key[req.prefix.len()..];
            rest.find(d)
                .map(|i| obj.key[..req.prefix.len() + i + d.len()].to_string())
        });
        let entry = match common {
            Some(p) => {
                if matches!(entries.last(), Some(Entry::Prefix(last)) if *last == p) {
                    continue;
                }
                Entry::Prefix(p)
            }
            None => Entry::Object(obj),
        };
        if entries.len() == max {
            more = true;
            break;
        }
        entries.push(entry);
    }

    let next = if more {
        entries.last().map(|e| match e {
            Entry::Object(o) => format!("k:{}", o.key),
            Entry::Prefix(p) => format!("p:{p}"),
        })
    } else {
        None
    };
    let mut page = ListPage {
        next,
        ..Default::default()
    };
    for e in entries {
        match e {
            Entry::Object(o) => page.objects.push(o),
            Entry::Prefix(p) => page.common_prefixes.push(p),
        }
    }
    page
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        let dest = self.path_of(key)?;
        self.ensure_root()?;
        let tmp = self.root.join(random_tmp_name());
        let context = || format!("writing `{key}` to {}", dest.display());
        let exclusive = opts.if_none_match;
        let root = self.root.clone();
        let (installed, bytes) = match body {
            PutBody::Bytes(b) => {
                // Write and install in one blocking task, which owns the temporary file: if
                // this future is dropped, the task still finishes or cleans up.
                let bytes = b.len() as u64;
                let dest = dest.clone();
                let installed = tokio::task::spawn_blocking(move || {
                    let guard = TempGuard {
                        path: Some(tmp.clone()),
                    };
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&tmp)?;
                    f.write_all(&b)?;
                    f.sync_all()?;
                    drop(f);
                    install(&root, guard, &dest, exclusive)
                })
                .await
                .map_err(|e| StorageError::io(context(), io::Error::other(e)))?;
                (installed, bytes)
            }
            PutBody::Stream(mut stream) => {
                let guard = TempGuard {
                    path: Some(tmp.clone()),
                };
                let mut f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .await
                    .map_err(|e| StorageError::io(context(), e))?;
                let mut bytes = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    bytes += chunk.len() as u64;
                    f.write_all(&chunk)
                        .await
                        .map_err(|e| StorageError::io(context(), e))?;
                }
                f.flush()
                    .await
                    .map_err(|e| StorageError::io(context(), e))?;
                f.sync_all()
                    .await
                    .map_err(|e| StorageError::io(context(), e))?;
                drop(f);
                let dest = dest.clone();
                let installed =
                    tokio::task::spawn_blocking(move || install(&root, guard, &dest, exclusive))
                        .await
                        .map_err(|e| StorageError::io(context(), io::Error::other(e)))?;
                (installed, bytes)
            }
        };
        match installed {
            Ok(()) => {
                tracing::trace!(store = %self.describe, key, bytes, "put");
                Ok(())
            }
            Err(e) if exclusive && e.kind() == io::ErrorKind::AlreadyExists => {
                Err(StorageError::AlreadyExists {
                    store: self.describe.clone(),
                    key: key.to_string(),
                })
            }
            Err(e) => Err(StorageError::io(context(), e)),
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        let path = self.path_of(key)?;
        let context = format!("reading `{key}` from {}", path.display());
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(key)),
            Err(e) => return Err(StorageError::io(context, e)),
        };
        let meta = file
            .metadata()
            .await
            .map_err(|e| StorageError::io(context.clone(), e))?;
        if !meta.is_file() {
            return Err(self.not_found(key));
        }
        let size = meta.len();
        let (start, end) = match range {
            Some(r) => (r.start.min(size), r.end.min(size).max(r.start.min(size))),
            None => (0, size),
        };
        if start > 0 {
            file.seek(io::SeekFrom::Start(start))
                .await
                .map_err(|e| StorageError::io(context.clone(), e))?;
        }
        let state = (file, end - start, context);
        let body =
            futures::stream::try_unfold(state, |(mut file, remaining, context)| async move {
                if remaining == 0 {
                    return Ok(None);
                }
                let want = usize::try_from(remaining).map_or(READ_CHUNK, |r| r.min(READ_CHUNK));
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| StorageError::io(context.clone(), e))?;
                    if n == 0 {
                        return Err(StorageError::io(
                            context,
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file shrank while read",
                            ),
                        ));
                    }
                    filled += n;
                }
                let left = remaining - want as u64;
                Ok(Some((Bytes::from(buf), (file, left, context))))
            });
        Ok(GetObject {
            size,
            body: Box::pin(body),
        })
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified_ms: modified_ms(&m),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // A file where a directory was expected (`a` exists, asked for `a/b`).
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(StorageError::io(
                format!("reading metadata of `{key}` in {}", self.describe),
                e,
            )),
        }
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        check_prefix(&req.prefix)?;
        let root = self.root.clone();
        let prefix = req.prefix.clone();
        let objects = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, "", &prefix, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| StorageError::io(format!("listing {}", self.describe), io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("listing {}", self.describe), e))?;
        Ok(paginate(objects, req))
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        let paths = keys
            .iter()
            .map(|k| self.path_of(k))
            .collect::<StorageResult<Vec<_>>>()?;
        let root = self.root.clone();
        let describe = self.describe.clone();
        tokio::task::spawn_blocking(move || -> StorageResult<()> {
            for path in paths {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) => {}
                    Err(e) => {
                        return Err(StorageError::io(
                            format!("deleting {} in {describe}", path.display()),
                            e,
                        ));
                    }
                }
                // Prune parents left empty; stops at the first non-empty one.
                let mut dir = path.parent();
                while let Some(d) = dir {
                    if d == root || !d.starts_with(&root) || fs::remove_dir(d).is_err() {
                        break;
                    }
                    dir = d.parent();
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| {
            StorageError::io(
                format!("deleting in {}", self.describe),
                io::Error::other(e),
            )
        })?
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: 0,
            modified_ms: None,
        }
    }

    fn keys(page: &ListPage) -> Vec<&str> {
        page.objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[tokio::test]
    async fn readers_create_nothing_and_the_first_write_creates_the_directory() {
        let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = base.path().join("replica");
        let store = LocalStore::new(root.clone()).unwrap_or_else(|e| panic!("{e}"));
        let page = store
            .list_page(&ListRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(page.objects.is_empty());
        assert!(
            store
                .head("a/b")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
        assert!(!root.exists(), "a reader created the replica directory");
        store
            .put("a/b", Bytes::from_static(b"x").into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(root.join("a/b").is_file());
    }

    #[test]
    fn a_root_whose_parent_is_missing_is_refused() {
        let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let parent = base.path().join("typo");
        let err = LocalStore::new(parent.join("replica")).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "parent directory {} does not exist",
                parent.display()
            )),
            "{msg}"
        );
        assert!(!parent.exists());
    }

    #[test]
    fn keys_that_escape_the_root_are_refused() {
        for key in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            ".",
            "a//b",
            "a/",
            "a\\b",
            "x/.tmp-1",
            "a\0b",
        ] {
            assert!(
                matches!(check_key(key), Err(StorageError::InvalidKey { .. })),
                "{key:?}"
            );
        }
        for key in ["a", "a/b/c", "gen-0001/snap.lz4", ".hidden", "a..b"] {
            assert!(check_key(key).is_ok(), "{key:?}");
        }
        assert!(check_prefix("a/../").is_err());
        assert!(check_prefix("/a").is_err());
        assert!(check_prefix("").is_ok() && check_prefix("a/b").is_ok());
    }

    #[test]
    fn paginate_with_a_delimiter_continues_after_a_common_prefix() {
        let objects = ["a/1", "a/2", "b", "c/1", "c/2", "d"]
            .into_iter()
            .map(meta)
            .collect::<Vec<_>>();
        let mut req = ListRequest {
            delimiter: Some("/".into()),
            max_keys: Some(2),
            ..Default::default()
        };
        let p1 = paginate(objects.clone(), &req);
        assert_eq!(p1.common_prefixes, ["a/"]);
        assert_eq!(keys(&p1), ["b"]);
        req.continuation = p1.next.clone();
        let p2 = paginate(objects.clone(), &req);
        assert_eq!(p2.common_prefixes, ["c/"]);
        assert_eq!(keys(&p2), ["d"]);
        assert_eq!(p2.next, None);
    }

    #[test]
    fn paginate_sorts_by_bytes_and_honours_start_after() {
        let objects = ["b", "a", "B", "a/x", "ab"]
            .into_iter()
            .map(meta)
            .collect::<Vec<_>>();
        let req = ListRequest {
            start_after: Some("a".into()),
            ..Default::default()
        };
        let page = paginate(objects, &req);
        assert_eq!(keys(&page), ["a/x", "ab", "b"]);
    }

    #[tokio::test]
    async fn temporary_files_are_not_listed_and_failed_puts_leave_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf()).expect("store");
        fs::write(dir.path().join(".tmp-leftover"), b"x").expect("write");
        store
            .put("k", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        let body: crate::ByteStream = Box::pin(futures::stream::iter(vec![
            Ok(Bytes::from_static(b"half")),
            Err(StorageError::Injected("body failed".into())),
        ]));
        assert!(store.put("k2", PutBody::Stream(body)).await.is_err());
        let all = crate::list_all(&store, "", None).await.expect("list");
        assert_eq!(
            all.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["k"]
        );
        let tmp_files = fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .count();
        assert_eq!(tmp_files, 1, "only the pre-existing leftover remains");
    }

    #[tokio::test]
    async fn delete_prunes_empty_directories_but_not_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("replica")).expect("store");
        store
            .put("a/b/c", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        store
            .put("a/d", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        store.delete_many(&["a/b/c".into()]).await.expect("delete");
        assert!(!dir.path().join("replica/a/b").exists());
        assert!(dir.path().join("replica/a/d").exists());
        store
            .delete_many(&["a/d".into(), "nope".into()])
            .await
            .expect("delete");
        assert!(!dir.path().join("replica/a").exists());
        assert!(dir.path().join("replica").is_dir());
    }

    #[tokio::test]
    async fn get_streams_in_bounded_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf()).expect("store");
        let data: Vec<u8> = (0..(READ_CHUNK * 2 + 10)).map(|i| i as u8).collect();
        store.put("big", data.clone().into()).await.expect("put");
        let mut got = store.get("big", None).await.expect("get");
        let mut total = Vec::new();
        while let Some(chunk) = got.body.next().await {
            let chunk = chunk.expect("chunk");
            assert!(chunk.len() <= READ_CHUNK);
            total.extend_from_slice(&chunk);
        }
        assert_eq!(total, data);
    }
}
