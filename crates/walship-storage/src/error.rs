//! The storage crate's one error type.

use std::io;

/// Result of a storage call.
pub type StorageResult<T> = Result<T, StorageError>;

/// Everything a store can fail with. Each variant's message says what to do; none holds a
/// secret. [`StorageError::is_transient`] tells a retry loop whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The object does not exist.
    #[error("object `{key}` not found in {store}")]
    NotFound { store: String, key: String },

    /// A put with `if_none_match` found the key taken (S3 412 PreconditionFailed).
    #[error("object `{key}` already exists in {store} (another writer holds this replica?)")]
    AlreadyExists { store: String, key: String },

    /// The bucket does not exist.
    #[error("bucket `{bucket}` does not exist (create it, or fix the bucket in the replica URL)")]
    NoSuchBucket { bucket: String },

    /// The store refused the credentials or the request.
    #[error(
        "access denied by {store}: {detail} (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE, or the bucket policy)"
    )]
    AccessDenied { store: String, detail: String },

    /// The replica URL or a store option is malformed.
    #[error("invalid replica URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The endpoint could not be reached, an answer could not be read, or the store answered
    /// 5xx or "slow down": trying again later can help.
    #[error("{store} unavailable: {detail} (retrying can help; check the endpoint and network)")]
    Unavailable { store: String, detail: String },

    /// A call got no answer in time (connect, first byte, or the whole operation): the store
    /// is slow or unreachable, and trying again later can help.
    #[error(
        "{store} did not answer in time: {detail} (retrying; check the network and the store, \
         or raise the timeouts if it is only slow)"
    )]
    Timeout { store: String, detail: String },

    /// A key (or list prefix) the store refuses: empty, absolute, with an empty, `.` or `..`
    /// segment, or otherwise unusable as a path.
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey { key: String, reason: String },

    /// The parent directory of a `file://` replica does not exist (walship creates the
    /// replica directory itself, never its parents, so a typo is not taken for an empty
    /// replica).
    #[error("parent directory {} does not exist: check the path (walship creates only the replica directory itself)", path.display())]
    MissingParent { path: std::path::PathBuf },

    /// A local filesystem error.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// Anything else the store answered; `transient` says whether a retry can help.
    #[error("{store}: {detail}")]
    Other {
        store: String,
        detail: String,
        transient: bool,
    },

    /// An injected fault (tests only, from [`crate::FaultStore`]).
    #[error("injected fault: {0}")]
    Injected(String),
}

impl StorageError {
    /// True when the same call may succeed if tried again later.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Unavailable { .. }
            | StorageError::Timeout { .. }
            | StorageError::Injected(_) => true,
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            StorageError::Other { transient, .. } => *transient,
            StorageError::NotFound { .. }
            | StorageError::AlreadyExists { .. }
            | StorageError::NoSuchBucket { .. }
            | StorageError::AccessDenied { .. }
            | StorageError::InvalidUrl { .. }
            | StorageError::InvalidKey { .. }
            | StorageError::MissingParent { .. } => false,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_transient_and_not_found_is_not() {
        let u = StorageError::Unavailable {
            store: "s3://b".into(),
            detail: "503".into(),
        };
        assert!(u.is_transient());
        let n = StorageError::NotFound {
            store: "s3://b".into(),
            key: "k".into(),
        };
        assert!(!n.is_transient());
        let t = StorageError::Timeout {
            store: "s3://b".into(),
            detail: "put `k`: no answer within 30s".into(),
        };
        assert!(t.is_transient());
    }

    #[test]
    fn missing_bucket_message_says_what_to_do() {
        let e = StorageError::NoSuchBucket { bucket: "x".into() };
        let msg = e.to_string();
        assert!(msg.contains("`x`") && msg.contains("create it"), "{msg}");
    }
}
