//! Replica URLs: `file:///absolute/dir` and
//! `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&force-path-style=true`.
//!
//! [`ReplicaUrl`] parses with [`str::parse`] and prints back with [`std::fmt::Display`]; the
//! printed form parses to the same value. Malformed URLs fail with
//! [`StorageError::InvalidUrl`], whose reason says how to write the URL instead.
//!
//! Credentials never belong in a URL: `user:secret@` before the bucket, and any `@` in the
//! endpoint, are refused, and an error never echoes them ([`redact_url`] masks them first).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::StorageError;

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// A directory on a local or mounted filesystem: `file:///absolute/dir`.
    File {
        /// The absolute directory.
        path: PathBuf,
    },
    /// An S3 bucket, or a bucket on an S3-compatible store reached through `endpoint`.
    S3 {
        /// The bucket name.
        bucket: String,
        /// The key prefix inside the bucket, without leading or trailing `/`; empty for the
        /// whole bucket.
        prefix: String,
        /// `?endpoint=`: the store's URL, e.g. `http://127.0.0.1:9000`; `None` = AWS S3.
        endpoint: Option<String>,
        /// `?region=`: the signing region.
        region: Option<String>,
        /// `?force-path-style=`: address the bucket in the path instead of the host name.
        force_path_style: Option<bool>,
    },
}

const S3_KEYS: &str = "endpoint, region, force-path-style";

/// What to do instead of writing credentials into a URL.
const NO_CREDENTIALS_IN_URL: &str = "credentials do not belong in the URL: remove `user:secret@` \
     and use access-key-id/secret-access-key in walship.toml, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY \
     in the environment, a profile, or web identity";

/// What to do instead of writing credentials into an endpoint.
const NO_CREDENTIALS_IN_ENDPOINT: &str = "credentials do not belong in the endpoint: remove \
     `user:password@` and use access-key-id/secret-access-key in walship.toml or \
     AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment";

fn invalid(url: &str, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidUrl {
        url: redact_url(url),
        reason: reason.into(),
    }
}

/// `url` as it may be shown in a message: everything between `://` (or the start) and the
/// last `@` before the query is masked, and so is the whole query when it holds an `@`
/// (raw or percent-encoded), since a password may itself hold `/`, `&` or `@`.
pub fn redact_url(url: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let mut out = match main.rfind('@') {
        Some(at) => {
            let start = main.find("://").map_or(0, |i| i + 3);
            let start = if at >= start { start } else { 0 };
            format!("{}***{}", &main[..start], &main[at..])
        }
        None => main.to_string(),
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(if holds_at(q) { "***" } else { q });
    }
    out
}

/// True when `s` holds `@`, raw or percent-encoded (`%40`).
fn holds_at(s: &str) -> bool {
    s.contains('@') || s.to_ascii_lowercase().contains("%40")
}

impl FromStr for ReplicaUrl {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s_trim = s.trim();
        if s_trim.is_empty() {
            return Err(invalid(
                s,
                "empty URL: use file:///absolute/dir or s3://bucket/prefix",
            ));
        }
        if s_trim != s {
            return Err(invalid(s, "leading or trailing whitespace in the URL"));
        }
        let Some((scheme, _)) = s.split_once("://") else {
            let shown = redact_url(s);
            let hint = if shown.starts_with('/') {
                format!("a bare path is not a replica URL: write file://{shown}")
            } else if let Some(rest) = shown.strip_prefix("file:") {
                format!(
                    "file URLs need an absolute path after `file://`, e.g. file:///{}",
                    rest.trim_start_matches('/')
                )
            } else {
                "missing scheme: use file:///absolute/dir or s3://bucket/prefix".to_string()
            };
            return Err(invalid(s, hint));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => parse_file(s),
            "s3" => parse_s3(s),
            other => Err(invalid(
                s,
                format!(
                    "unsupported scheme `{other}`: use file:///absolute/dir or s3://bucket/prefix \
                     (S3-compatible stores take s3:// with ?endpoint=)"
                ),
            )),
        }
    }
}

fn parse_file(s: &str) -> Result<ReplicaUrl, StorageError> {
    // The scheme is followed by `://`, checked by the caller.
    let rest = &s[s.find("://").map_or(0, |i| i + 3)..];
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // `user:secret@host`, also when the secret holds a `/`.
    if host.contains('@') || (host.contains(':') && path.contains('@')) {
        return Err(invalid(s, NO_CREDENTIALS_IN_URL));
    }
    if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
        return Err(invalid(
            s,
            format!(
                "file URLs take no host (found `{host}`); for a local directory write \
                 file:///absolute/dir with three slashes"
            ),
        ));
    }
    if path.is_empty() || path == "/" {
        if path.is_empty() {
            return Err(invalid(s, "missing directory: write file:///absolute/dir"));
        }
        return Err(invalid(
            s,
            "the filesystem root cannot be a replica directory: name a directory, e.g. file:///var/backups/app",
        ));
    }
    if path.contains(['?', '#']) {
        return Err(invalid(
            s,
            "file URLs take no query or fragment (percent-encode `?` as %3F and `#` as %23)",
        ));
    }
    let decoded = percent_decode(path).ok_or_else(|| {
        invalid(
            s,
            "bad percent-encoding in the path (use %XX with two hex digits, valid UTF-8)",
        )
    })?;
    if decoded.contains('\0') {
        return Err(invalid(s, "the path contains a NUL byte"));
    }
    let path = PathBuf::from(decoded);
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(invalid(
            s,
            "the path contains `..`: write the directory's absolute path without it",
        ));
    }
    Ok(ReplicaUrl::File {
        path: normalize_path(&path),
    })
}

/// Drops `.` components and trailing slashes.
fn normalize_path(path: &Path) -> PathBuf {
    path.components().collect()
}

fn parse_s3(s: &str) -> Result<ReplicaUrl, StorageError> {
    let rest = &s[s.find("://").map_or(0, |i| i + 3)..];
    if rest.contains('#') {
        return Err(invalid(s, "S3 URLs take no fragment (`#...`)"));
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    // `key:secret@bucket`, also when the secret holds a `/` (AWS secrets do).
    if authority.contains('@') || (authority.contains(':') && path.contains('@')) {
        return Err(invalid(s, NO_CREDENTIALS_IN_URL));
    }
    if authority.is_empty() {
        return Err(invalid(
            s,
            "empty bucket name: write s3://bucket/prefix (the endpoint goes in ?endpoint=)",
        ));
    }
    if authority.contains(':') {
        return Err(invalid(
            s,
            format!(
                "`{authority}` is not a bucket name: put the server in ?endpoint=http://host:port \
                 and the bucket after s3://"
            ),
        ));
    }
    validate_bucket(authority).map_err(|reason| invalid(s, reason))?;

    let decoded = percent_decode(path).ok_or_else(|| {
        invalid(
            s,
            "bad percent-encoding in the prefix (use %XX with two hex digits, valid UTF-8)",
        )
    })?;
    let prefix = decoded.trim_matches('/');
    for segment in prefix.split('/').filter(|_| !prefix.is_empty()) {
        if segment.is_empty() {
            return Err(invalid(
                s,
                "empty segment (`//`) in the prefix: write s3://bucket/a/b",
            ));
        }
        if segment == "." || segment == ".." {
            return Err(invalid(
                s,
                format!("`{segment}` is not allowed as a prefix segment"),
            ));
        }
    }
    if prefix.chars().any(char::is_control) {
        return Err(invalid(s, "the prefix contains a control character"));
    }

    let mut endpoint = None;
    let mut region = None;
    let mut force_path_style = None;
    if let Some(query) = query {
        if holds_at(query) {
            let endpoint = query.split('&').any(|p| {
                query_decode(p.split('=').next().unwrap_or("")).as_deref() == Some("endpoint")
            });
            return Err(invalid(
                s,
                if endpoint {
                    NO_CREDENTIALS_IN_ENDPOINT
                } else {
                    NO_CREDENTIALS_IN_URL
                },
            ));
        }
        for pair in query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = query_decode(raw_key)
                .ok_or_else(|| invalid(s, "bad percent-encoding in the query"))?;
            let value = query_decode(raw_value)
                .ok_or_else(|| invalid(s, "bad percent-encoding in the query"))?;
            let duplicate = || invalid(s, format!("`{key}` is given twice"));
            match key.as_str() {
                "endpoint" => {
                    if endpoint.is_some() {
                        return Err(duplicate());
                    }
                    endpoint = Some(validate_endpoint(&value).map_err(|r| invalid(s, r))?);
                }
                "region" => {
                    if region.is_some() {
                        return Err(duplicate());
                    }
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(invalid(
                            s,
                            format!(
                                "region `{value}` is not a region name: write e.g. region=us-east-1 \
                                 (R2 takes region=auto)"
                            ),
                        ));
                    }
                    region = Some(value);
                }
                "force-path-style" => {
                    if force_path_style.is_some() {
                        return Err(duplicate());
                    }
                    force_path_style = Some(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(invalid(
                                s,
                                format!(
                                    "force-path-style must be `true` or `false`, not `{other}`"
                                ),
                            ));
                        }
                    });
                }
                other => {
                    return Err(invalid(
                        s,
                        format!("unknown query parameter `{other}` (known: {S3_KEYS})"),
                    ));
                }
            }
        }
    }

    Ok(ReplicaUrl::S3 {
        bucket: authority.to_string(),
        prefix: prefix.to_string(),
        endpoint,
        region,
        force_path_style,
    })
}

fn validate_bucket(bucket: &str) -> Result<(), String> {
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "`{bucket}` is not a bucket name: use letters, digits, `.`, `-` and `_` only"
        ));
    }
    if bucket.len() > 255 {
        return Err("the bucket name is longer than 255 characters".to_string());
    }
    Ok(())
}

/// Checks an S3 endpoint (`http://host:port` or `https://host`) and returns it without a
/// trailing `/`. Credentials are refused before anything else, and the error then does not
/// echo the value; any `@` counts as credentials.
pub fn validate_endpoint(value: &str) -> Result<String, String> {
    if holds_at(value) {
        return Err(NO_CREDENTIALS_IN_ENDPOINT.to_string());
    }
    let parsed = url::Url::parse(value).map_err(|e| {
        format!("endpoint `{value}` is not a URL ({e}): write e.g. endpoint=http://127.0.0.1:9000")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "endpoint `{value}` must start with http:// or https://"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("endpoint `{value}` has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(NO_CREDENTIALS_IN_ENDPOINT.to_string());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "endpoint `{value}` takes no query or fragment (percent-encode `&` in the replica URL as %26)"
        ));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes a query component: `+` is a space, then `%XX` escapes.
fn query_decode(s: &str) -> Option<String> {
    percent_decode(&s.replace('+', " "))
}

/// Percent-encodes everything but unreserved characters and those in `keep`.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaUrl::File { path } => {
                write!(
                    f,
                    "file://{}",
                    percent_encode(&path.to_string_lossy(), b"/:@!$&'()*+,;=")
                )
            }
            ReplicaUrl::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                force_path_style,
            } => {
                write!(f, "s3://{bucket}")?;
                if !prefix.is_empty() {
                    write!(f, "/{}", percent_encode(prefix, b"/:@!$'()*,;="))?;
                }
                let mut sep = '?';
                if let Some(endpoint) = endpoint {
                    // An endpoint built by hand with credentials in it is never printed.
                    let shown = if holds_at(endpoint) { "***" } else { endpoint };
                    write!(f, "{sep}endpoint={}", percent_encode(shown, b":/*"))?;
                    sep = '&';
                }
                if let Some(region) = region {
                    write!(f, "{sep}region={}", percent_encode(region, b""))?;
                    sep = '&';
                }
                if let Some(fps) = force_path_style {
                    write!(f, "{sep}force-path-style={fps}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<ReplicaUrl, StorageError> {
        s.parse()
    }

    fn reason(s: &str) -> String {
        match parse(s) {
            Err(StorageError::InvalidUrl { url, reason }) => {
                assert_eq!(url, redact_url(s));
                reason
            }
            other => panic!("`{s}` should be refused, got {other:?}"),
        }
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            parse("file:///var/backups/app").ok(),
            Some(ReplicaUrl::File {
                path: PathBuf::from("/var/backups/app")
            })
        );
        assert_eq!(
            parse("file:///var/backups/app/").ok(),
            Some(ReplicaUrl::File {
                path: PathBuf::from("/var/backups/app")
            })
        );
        assert_eq!(
            parse("file://localhost/srv/x").ok(),
            Some(ReplicaUrl::File {
                path: PathBuf::from("/srv/x")
            })
        );
        assert_eq!(
            parse("file:///my%20dir/a").ok(),
            Some(ReplicaUrl::File {
                path: PathBuf::from("/my dir/a")
            })
        );
    }

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse("s3://bucket").ok(),
            Some(ReplicaUrl::S3 {
                bucket: "bucket".into(),
                prefix: String::new(),
                endpoint: None,
                region: None,
                force_path_style: None,
            })
        );
        assert_eq!(
            parse("s3://bucket/a/b/").ok(),
            Some(ReplicaUrl::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into(),
                endpoint: None,
                region: None,
                force_path_style: None,
            })
        );
        assert_eq!(
            parse(
                "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&force-path-style=true"
            )
            .ok(),
            Some(ReplicaUrl::S3 {
                bucket: "bucket".into(),
                prefix: "prefix".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("us-east-1".into()),
                force_path_style: Some(true),
            })
        );
        assert_eq!(
            parse("s3://b?endpoint=https%3A%2F%2Fx.r2.cloudflarestorage.com%2F&region=auto").ok(),
            Some(ReplicaUrl::S3 {
                bucket: "b".into(),
                prefix: String::new(),
                endpoint: Some("https://x.r2.cloudflarestorage.com".into()),
                region: Some("auto".into()),
                force_path_style: None,
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "file:///var/backups/app",
            "file:///my%20dir/a%25b",
            "s3://bucket",
            "s3://bucket/a/b",
            "s3://bucket/a%20b/c?region=eu-west-1",
            "s3://bucket/p?endpoint=http://127.0.0.1:9000&region=us-east-1&force-path-style=true",
            "s3://bucket?force-path-style=false",
        ] {
            let parsed = parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(parsed.to_string(), s);
            assert_eq!(parse(&parsed.to_string()).ok(), Some(parsed));
        }
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        // (url, a word the reason must contain)
        let table = [
            ("", "empty"),
            ("/var/backups", "file:///var/backups"),
            ("file:relative/dir", "absolute"),
            ("file://relative/dir", "three slashes"),
            ("file://host.example/dir", "no host"),
            ("file://", "missing directory"),
            ("file:///", "root"),
            ("file:///a/../b", ".."),
            ("file:///a?x=1", "query"),
            ("file:///a%zz", "percent"),
            ("http://example.com/x", "unsupported scheme"),
            ("gs://bucket/x", "unsupported scheme"),
            ("bucket/prefix", "missing scheme"),
            ("s3://", "empty bucket"),
            ("s3:///prefix", "empty bucket"),
            ("s3://bucket/a//b", "empty segment"),
            ("s3://bucket/a/../b", "`..`"),
            ("s3://bucket?foo=bar", "`foo`"),
            ("s3://bucket?endpoint=http://x&endpoint=http://y", "twice"),
            ("s3://bucket?endpoint=127.0.0.1:9000", "http://"),
            ("s3://bucket?endpoint=ftp://x", "http://"),
            ("s3://bucket?endpoint=", "not a URL"),
            ("s3://bucket?region=", "region"),
            ("s3://bucket?region=us%20east", "region"),
            ("s3://bucket?force-path-style=yes", "true"),
            ("s3://key:secret@bucket/x", "credentials"),
            ("s3://127.0.0.1:9000/bucket", "?endpoint="),
            ("s3://bu cket/x", "bucket name"),
            ("s3://bucket/x#frag", "fragment"),
            (" s3://bucket", "whitespace"),
        ];
        for (url, needle) in table {
            let r = reason(url);
            assert!(r.contains(needle), "`{url}`: reason `{r}` lacks `{needle}`");
        }
    }

    #[test]
    fn credentials_are_refused_and_never_echoed() {
        // (url, what the reason must say)
        let table = [
            ("s3://AKQ7ID:Zs9Qx@bucket/x", "access-key-id"),
            ("s3://AKQ7ID:Zs9/Qx@bucket/x", "access-key-id"),
            ("s3://AKQ7ID:Zs9/Q@x@bucket/x", "access-key-id"),
            ("s3://AKQ7ID@bucket", "access-key-id"),
            ("AKQ7ID:Zs9Qx@bucket/x", "missing scheme"),
            ("/AKQ7ID:Zs9Qx@bucket/x", "file://"),
            ("file://AKQ7ID:Zs9Qx@host/dir", "access-key-id"),
            ("file://AKQ7ID:Zs9/Qx@host/dir", "access-key-id"),
            ("gs://AKQ7ID:Zs9Qx@bucket/x", "unsupported scheme"),
            (
                "s3://b/p?endpoint=http://AKQ7ID:Zs9Qx@127.0.0.1:9000",
                "endpoint",
            ),
            (
                "s3://b/p?endpoint=http://AKQ7ID:Zs9/Qx@127.0.0.1:9000",
                "endpoint",
            ),
            (
                "s3://b/p?endpoint=http://AKQ7ID:Zs9&Qx@127.0.0.1:9000",
                "credentials",
            ),
            (
                "s3://b?region=us-east-1&endpoint=http%3A%2F%2FAKQ7ID%3AZs9Qx%40127.0.0.1%3A9000",
                "endpoint",
            ),
            ("s3://b?endpoint=AKQ7ID:Zs9Qx@127.0.0.1:9000", "endpoint"),
            ("s3://b?region=AKQ7ID:Zs9Qx@x", "credentials"),
        ];
        for (url, needle) in table {
            let msg = parse(url).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(needle), "`{url}`: `{msg}` lacks `{needle}`");
            for secret in ["AKQ7", "Zs9", "Qx"] {
                assert!(!msg.contains(secret), "`{url}`: `{msg}` echoes `{secret}`");
            }
        }
    }

    #[test]
    fn an_endpoint_with_credentials_is_refused_without_echo() {
        for e in [
            "http://usrQ7:Zs9Qx@127.0.0.1:9000",
            "https://usrQ7@host",
            "usrQ7:Zs9Qx@host:9000",
            "http://usrQ7:Zs9%40Qx@host",
        ] {
            let msg = validate_endpoint(e).err().unwrap_or_default();
            assert!(
                msg.contains("access-key-id") && msg.contains("AWS_SECRET_ACCESS_KEY"),
                "{e}: {msg}"
            );
            assert!(!msg.contains("Zs9") && !msg.contains("usrQ7"), "{e}: {msg}");
        }
        assert_eq!(
            validate_endpoint("http://127.0.0.1:9000/").ok().as_deref(),
            Some("http://127.0.0.1:9000")
        );
    }

    #[test]
    fn redact_masks_userinfo_and_a_query_holding_an_at() {
        for (url, shown) in [
            ("s3://bucket/a", "s3://bucket/a"),
            ("s3://k:s@bucket/a", "s3://***@bucket/a"),
            ("s3://k:s/t@bucket/a?region=x", "s3://***@bucket/a?region=x"),
            ("s3://b?endpoint=http://u:p@h", "s3://b?***"),
            ("s3://b?endpoint=http%3A%2F%2Fu%3Ap%40h", "s3://b?***"),
            ("k:s@bucket", "***@bucket"),
            ("a@b://c", "***@b://c"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn display_never_prints_an_endpoint_with_credentials() {
        let url = ReplicaUrl::S3 {
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: Some("http://u:SECRETXX@h".into()),
            region: None,
            force_path_style: None,
        };
        let shown = url.to_string();
        assert!(!shown.contains("SECRETXX"), "{shown}");
    }

    #[test]
    fn invalid_url_message_names_the_url() {
        let err = parse("s3://bucket?foo=1").err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(
            msg.contains("s3://bucket?foo=1") && msg.contains("`foo`"),
            "{msg}"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            scheme in prop::sample::select(vec!["s3://", "file://", "file:", "S3://", ""]),
            rest in "[a-z0-9/?&=%:.#@ +-]{0,40}",
        ) {
            let _ = parse(&format!("{scheme}{rest}"));
        }

        #[test]
        fn s3_round_trip(
            bucket in "[a-z0-9][a-z0-9.-]{1,20}",
            prefix in prop::collection::vec("[a-zA-Z0-9 %+&?#=_.~-]{1,8}", 0..4),
            endpoint in prop::option::of(prop::sample::select(vec![
                "http://127.0.0.1:9000", "https://acct.r2.cloudflarestorage.com", "http://[::1]:9000",
            ])),
            region in prop::option::of("[a-z]{2}-[a-z]{4}-[0-9]"),
            force_path_style in prop::option::of(any::<bool>()),
        ) {
            let prefix: Vec<String> = prefix
                .into_iter()
                .filter(|s| s != "." && s != "..")
                .collect();
            let url = ReplicaUrl::S3 {
                bucket,
                prefix: prefix.join("/"),
                endpoint: endpoint.map(str::to_string),
                region,
                force_path_style,
            };
            let printed = url.to_string();
            prop_assert_eq!(parse(&printed).ok(), Some(url), "{}", printed);
        }

        #[test]
        fn file_round_trip(segments in prop::collection::vec("[a-zA-Z0-9 %+&?#=_~-]{1,8}", 1..4)) {
            let path: PathBuf = std::iter::once("/".to_string()).chain(segments).collect();
            let url = ReplicaUrl::File { path };
            let printed = url.to_string();
            prop_assert_eq!(parse(&printed).ok(), Some(url), "{}", printed);
        }
    }
}
