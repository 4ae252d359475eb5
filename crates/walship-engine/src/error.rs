//! The engine's one error type.

use std::io;
use std::path::PathBuf;

use walship_format::FormatError;
use walship_storage::StorageError;

/// Result of an engine call.
pub type EngineResult<T> = Result<T, EngineError>;

/// What replicate and restore can fail with. Messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The database does not exist.
    #[error("database {} does not exist (check the path, or start the app once to create it)", path.display())]
    MissingDatabase {
        /// The path given.
        path: PathBuf,
    },

    /// The database is not in WAL mode.
    #[error(
        "database {} is in `{mode}` journal mode, not WAL (run `PRAGMA journal_mode=WAL` in the app, \
         or pass --enable-wal to let walship switch it)", path.display()
    )]
    NotWalMode {
        /// The path.
        path: PathBuf,
        /// The mode found.
        mode: String,
    },

    /// SQLite failed.
    #[error("sqlite: {context}: {source}")]
    Sqlite {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },

    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// The object store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),

    /// An object in the replica is damaged.
    #[error("corrupt object `{key}`: {source}")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What is wrong.
        #[source]
        source: FormatError,
    },

    /// An object cannot be decrypted with the keys given: no key, or not the right one.
    #[error("cannot decrypt `{key}`: {source}")]
    Encryption {
        /// The object's key.
        key: String,
        /// What is wrong.
        #[source]
        source: FormatError,
    },

    /// The replica's newest generation is encrypted with a key this writer was given neither
    /// to write nor to read with: it writes nothing (docs/format.md, "Encryption").
    #[error(
        "generation {generation} in {replica} is encrypted with key id {key_id}, and {}; give that \
         key (--encryption-key-file, WALSHIP_ENCRYPTION_KEY or `encryption-key`), or to move to a \
         new key give the old one for reading as well (--decryption-key-file or `decryption-keys`)",
        match .writer { Some(w) => format!("the key given has id {w}"), None => "no encryption key was given".to_string() }
    )]
    ForeignKey {
        /// The replica.
        replica: String,
        /// The generation, as `walship generations` shows it.
        generation: String,
        /// The id of the generation's key, hex.
        key_id: String,
        /// The id of the writer's key, hex, if it has one.
        writer: Option<String>,
    },

    /// The replica holds no object at all under `generations/`: there is nothing to
    /// restore (the only case `restore --if-replica-exists` accepts).
    #[error(
        "no restorable backup in {replica}: it holds no objects (check the replica URL; \
         --if-replica-exists treats this as nothing to restore)"
    )]
    NothingToRestore {
        /// The replica.
        replica: String,
        /// The requested point in time, if any.
        target: Option<i64>,
    },

    /// The replica holds objects, but none could be restored: every snapshot damaged, no
    /// snapshot, or none at or before the requested time. Never taken for an empty replica.
    #[error(
        "no restorable backup in {replica}{}, although it holds objects: {} (a damaged replica \
         is not an empty one; see docs/runbook-emergency.md)",
        at_target(.target), tried_list(.tried)
    )]
    Unrestorable {
        /// The replica.
        replica: String,
        /// The requested point in time, if any.
        target: Option<i64>,
        /// Each object (or generation) tried, and why it failed.
        tried: Vec<(String, String)>,
    },

    /// The output of a restore exists.
    #[error("{} already exists (pass --if-db-not-exists to keep it, or remove it first)", path.display())]
    OutputExists {
        /// The path.
        path: PathBuf,
    },

    /// A restored database failed its integrity check.
    #[error("restored database failed PRAGMA integrity_check: {0}")]
    IntegrityCheck(String),

    /// A table asked for (single-table restore) is not in the database.
    #[error("no table `{name}` in the restored database (tables: {})", if .available.is_empty() { "none".to_string() } else { .available.join(", ") })]
    UnknownTable {
        /// The name asked for.
        name: String,
        /// The tables that exist.
        available: Vec<String>,
    },

    /// Something walship does not do (the message says what to do instead).
    #[error("{0}")]
    Unsupported(String),

    /// Another replicator holds the replica's lease (with `--on-conflict fail`).
    #[error(
        "replica {replica} is held by another replicator: {holder} (stop it, wait for its lease \
         to lapse, or use --on-conflict wait|takeover)"
    )]
    LeaseHeld {
        /// The replica.
        replica: String,
        /// Who holds it.
        holder: String,
    },

    /// Another replicator took the lease over; this one stopped writing.
    #[error(
        "lost the lease of replica {replica} to {holder}; stopped replicating to it (two \
         replicators are pointed at the same replica)"
    )]
    LeaseLost {
        /// The replica.
        replica: String,
        /// Who holds it now.
        holder: String,
    },

    /// The work was cancelled (shutdown).
    #[error("cancelled")]
    Cancelled,

    /// A background task panicked or was aborted.
    #[error("internal task failed: {0}")]
    Task(String),

    /// A restore did not reach everything the replica holds (a gap, a damaged newest
    /// snapshot that forced an older point, a newer generation it could not restore) and
    /// partial restores were not accepted: nothing was written.
    #[error(
        "partial restore refused: {}; nothing was written (pass --allow-partial to accept a \
         partial restore)",
        .report.gap.as_ref().map(|g| g.describe()).unwrap_or_default()
    )]
    Partial {
        /// What the restore reached, and its gap.
        report: Box<crate::restore::RestoreReport>,
    },
}

fn at_target(target: &Option<i64>) -> String {
    target
        .map(|t| format!(" at or before {}", walship_format::key::format_rfc3339(t)))
        .unwrap_or_default()
}

/// `key: why; key: why`, at most [`TRIED_SHOWN`] of them, then how many more.
fn tried_list(tried: &[(String, String)]) -> String {
    let mut out: Vec<String> = tried
        .iter()
        .take(TRIED_SHOWN)
        .map(|(k, why)| format!("{k}: {why}"))
        .collect();
    if tried.len() > TRIED_SHOWN {
        out.push(format!("and {} more", tried.len() - TRIED_SHOWN));
    }
    format!("tried {}: {}", tried.len(), out.join("; ")).replace('\n', " ")
}

/// Objects an [`EngineError::Unrestorable`] message names one by one.
const TRIED_SHOWN: usize = 8;

impl EngineError {
    /// The error for a decoding failure of object `key`: a key problem stays a key problem
    /// (restore must not skip past it as if the object were damaged).
    pub fn decoding(key: &str, source: FormatError) -> Self {
        match source {
            FormatError::Encrypted | FormatError::UnknownKey { .. } => EngineError::Encryption {
                key: key.to_string(),
                source,
            },
            source => EngineError::Corrupt {
                key: key.to_string(),
                source,
            },
        }
    }

    /// Wraps a SQLite error with context.
    pub fn sqlite(context: impl Into<String>, source: rusqlite::Error) -> Self {
        EngineError::Sqlite {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when a frame walship was reading was overwritten by a WAL restart.
    pub fn is_wal_changed(&self) -> bool {
        matches!(self, EngineError::Io { source, .. }
            if source.get_ref().is_some_and(|e| e.is::<crate::walfile::WalChanged>()))
    }

    /// True when trying again later can help (storage unavailable, SQLite busy).
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Storage(e) => e.is_transient(),
            EngineError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}

/// The [`StorageError`] an `io::Error` carries, taken out, if it carries one: a store's error
/// crossing a blocking `Read` travels as `io::Error::other(StorageError)`, possibly wrapped
/// once more by a decoder as `io::Error::other(FormatError::Io(..))`. Otherwise the error
/// as it was.
pub(crate) fn storage_error(e: io::Error) -> Result<StorageError, io::Error> {
    let inner = e.get_ref();
    let holds_storage = inner.is_some_and(|i| i.is::<StorageError>());
    let holds_format_io =
        inner.is_some_and(|i| matches!(i.downcast_ref::<FormatError>(), Some(FormatError::Io(_))));
    if !holds_storage && !holds_format_io {
        return Err(e);
    }
    let kind = e.kind();
    let Some(inner) = e.into_inner() else {
        return Err(io::Error::from(kind));
    };
    let inner = match inner.downcast::<StorageError>() {
        Ok(se) => return Ok(*se),
        Err(other) => other,
    };
    match inner.downcast::<FormatError>() {
        Ok(fe) => match *fe {
            FormatError::Io(e) => {
                storage_error(e).map_err(|e| io::Error::new(kind, FormatError::Io(e)))
            }
            other => Err(io::Error::new(kind, other)),
        },
        Err(other) => Err(io::Error::new(kind, other)),
    }
}

impl From<tokio::task::JoinError> for EngineError {
    fn from(e: tokio::task::JoinError) -> Self {
        EngineError::Task(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn unavailable() -> StorageError {
        StorageError::Unavailable {
            store: "s3://b".into(),
            detail: "503".into(),
        }
    }

    #[test]
    fn a_storage_error_inside_an_io_error_is_taken_out_typed_even_under_a_decoder() {
        let direct = io::Error::other(unavailable());
        assert!(storage_error(direct).unwrap().is_transient());
        let wrapped = io::Error::other(FormatError::Io(io::Error::other(unavailable())));
        assert!(storage_error(wrapped).unwrap().is_transient());
    }

    #[test]
    fn an_io_error_without_a_storage_error_comes_back_as_it_was() {
        let plain = io::Error::new(io::ErrorKind::UnexpectedEof, "short read");
        let back = storage_error(plain).unwrap_err();
        assert_eq!(back.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(back.to_string(), "short read");
        let corrupt = FormatError::corrupt("bad CRC").into_io();
        let back = storage_error(corrupt).unwrap_err();
        assert!(FormatError::from_io(back).is_corrupt());
        let local = io::Error::other(FormatError::Io(io::Error::other("disk")));
        let back = storage_error(local).unwrap_err();
        assert!(!FormatError::from_io(back).is_corrupt());
    }
}
