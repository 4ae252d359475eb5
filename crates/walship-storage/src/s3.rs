//! [`S3Store`]: AWS S3 and S3-compatible stores (Cloudflare R2, MinIO, ...) on aws-sdk-s3.
//!
//! Credentials come from the SDK's default chain — environment, profile, web identity
//! (`AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`, as on fly.io), container and instance
//! metadata — unless [`S3Options::credentials`] gives static ones. Nothing here logs or prints
//! a credential.
//!
//! Puts below [`S3Options::multipart_threshold`] are one `PutObject`; larger ones, and streams
//! that turn out larger, are multipart uploads that buffer one part at a time and are aborted
//! on error. Parts are [`S3Options::part_size`] and double after every [`PARTS_PER_SIZE`], so
//! a small part (a small buffer) still reaches objects of terabytes. `if_none_match` sends
//! `If-None-Match: *` (on `CompleteMultipartUpload` for a multipart upload), and the 412 it
//! earns becomes [`StorageError::AlreadyExists`].
//!
//! Recent SDK releases add CRC checksums with aws-chunked bodies to every upload, which some
//! S3-compatible stores refuse; [`ChecksumMode::WhenRequired`], the default, sends checksums
//! only where the API requires one.

use std::ops::Range;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::error::{StorageError, StorageResult};
use crate::local::{MAX_KEYS, check_key, check_prefix};
use crate::timeout::StoreTimeouts;
use crate::{
    ByteStream, GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions,
    ReplicaUrl,
};

const MIB: usize = 1 << 20;
/// S3's smallest part (all but the last).
const MIN_PART_SIZE: usize = 5 * MIB;
/// Room past the threshold for the chunk that crosses it (a stream's chunks are at most
/// [`crate::STREAM_CHUNK`]; a larger one grows the buffer once).
const STREAM_SLACK: usize = crate::STREAM_CHUNK + 64 * 1024;
/// S3's largest part.
const MAX_PART_SIZE: usize = 5 * 1024 * MIB;
/// Parts of one size before the size doubles: 5 MiB parts reach 4.9 GiB at the thousandth
/// part, and the doubling reaches 4.8 TiB within S3's 10,000 parts.
const PARTS_PER_SIZE: i32 = 1000;
/// S3's most parts in one upload.
const MAX_PARTS: i32 = 10_000;

/// Server-side encryption asked of the store on every put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// SSE-S3 (`AES256`).
    Aes256,
    /// SSE-KMS, with the given key or the bucket's default KMS key.
    Kms {
        /// The KMS key id or ARN; `None` = the account's default `aws/s3` key.
        key_id: Option<String>,
    },
}

/// When the SDK computes request checksums and validates response checksums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChecksumMode {
    /// Only where an API requires one (e.g. `DeleteObjects`). Works with every S3-compatible
    /// store.
    #[default]
    WhenRequired,
    /// On every request that supports one (CRC32, aws-chunked bodies); AWS S3 itself accepts
    /// this, some S3-compatible stores do not.
    WhenSupported,
}

/// Static credentials, for tests or stores outside AWS's credential chain. The secret never
/// appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl StaticCredentials {
    /// Credentials from a key pair.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        StaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Settings of an [`S3Store`]. The replica URL's `endpoint`, `region` and `force-path-style`
/// override the fields of the same names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// The store's URL, e.g. `http://127.0.0.1:9000`; `None` = AWS S3 (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// The signing region; `None` = `AWS_REGION` / the profile, else `us-east-1` when an
    /// endpoint is given.
    pub region: Option<String>,
    /// Address buckets in the path (`http://host/bucket/key`); `None` = true when an endpoint
    /// is given, false for AWS.
    pub force_path_style: Option<bool>,
    /// Puts larger than this use a multipart upload. Default 5 MiB. A streamed put buffers
    /// this much to choose.
    pub multipart_threshold: usize,
    /// Size of a multipart upload's first thousand parts, at least 5 MiB; each
    /// thousand after doubles it (up to S3's 5 GiB). One part is buffered at a time. Default
    /// 5 MiB.
    pub part_size: usize,
    /// Server-side encryption to ask for on every put.
    pub sse: Option<ServerSideEncryption>,
    /// Checksum behaviour; default [`ChecksumMode::WhenRequired`].
    pub checksum: ChecksumMode,
    /// Static credentials instead of the SDK's default chain.
    pub credentials: Option<StaticCredentials>,
    /// Attempts the SDK makes per request, itself included (the SDK retries throttling,
    /// 5xx and connection errors; [`crate::RetryStore`] retries on top). Default 3.
    pub sdk_max_attempts: u32,
    /// Connect, first-byte and per-request timeouts (see [`StoreTimeouts`]); [`crate::open`]
    /// sets them from [`crate::StoreOptions::timeouts`].
    pub timeouts: StoreTimeouts,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            force_path_style: None,
            multipart_threshold: MIN_PART_SIZE,
            part_size: MIN_PART_SIZE,
            sse: None,
            checksum: ChecksumMode::WhenRequired,
            credentials: None,
            sdk_max_attempts: 3,
            timeouts: StoreTimeouts::default(),
        }
    }
}

/// A bucket (and key prefix) on S3 or an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or the URL's prefix followed by `/`.
    key_prefix: String,
    /// `s3://bucket/prefix`.
    describe: String,
    /// The endpoint, or `AWS S3 (region)`, for messages about reaching it.
    target: String,
    multipart_threshold: usize,
    part_size: usize,
    sse: Option<ServerSideEncryption>,
    checksum: ChecksumMode,
    timeouts: StoreTimeouts,
}

impl S3Store {
    /// Builds the store an `s3://` URL names. Makes no request (see [`crate::check_access`]);
    /// may read the environment and profile files for the region and credentials.
    pub async fn from_url(url: &ReplicaUrl, opts: &S3Options) -> StorageResult<Self> {
        let ReplicaUrl::S3 {
            bucket,
            prefix,
            endpoint,
            region,
            force_path_style,
        } = url
        else {
            return Err(StorageError::InvalidUrl {
                url: url.to_string(),
                reason: "not an s3:// URL".to_string(),
            });
        };
        let invalid = |reason: String| StorageError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&opts.part_size) {
            return Err(invalid(format!(
                "part size {} is outside S3's 5 MiB ..= 5 GiB",
                opts.part_size
            )));
        }
        // Checked here too, for stores built without parsing a URL: no credentials.
        let endpoint = match endpoint.clone().or_else(|| opts.endpoint.clone()) {
            Some(e) => Some(crate::url::validate_endpoint(&e).map_err(invalid)?),
            None => None,
        };
        let region = match region.clone().or_else(|| opts.region.clone()) {
            Some(r) => Region::new(r),
            None => resolve_region(endpoint.is_some()).await.ok_or_else(|| {
                invalid(
                    "no region: add ?region=... to the replica URL or set AWS_REGION".to_string(),
                )
            })?,
        };
        let force_path_style = force_path_style
            .or(opts.force_path_style)
            .unwrap_or(endpoint.is_some());

        // A request gets `connect` to connect and `read` to its answer's first byte (sending
        // its body included), each attempt and all the SDK's attempts together `operation`.
        let t = &opts.timeouts;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(t.connect)
            .read_timeout(t.read)
            .operation_attempt_timeout(t.operation)
            .operation_timeout(t.operation)
            .build();
        let (request_checksums, response_checksums) = match opts.checksum {
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region.clone())
            .timeout_config(timeouts)
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(opts.sdk_max_attempts.max(1)),
            )
            .request_checksum_calculation(request_checksums)
            .response_checksum_validation(response_checksums);
        if let Some(endpoint) = &endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(c) = &opts.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "walship-static",
            ));
        }
        let sdk_config = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .force_path_style(force_path_style)
            .build();
        let client = Client::from_conf(config);

        let describe = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let target = match &endpoint {
            Some(e) => e.clone(),
            None => format!("AWS S3 (region {region})"),
        };
        tracing::debug!(store = %describe, target = %target, force_path_style, "opened S3 store");
        Ok(S3Store {
            client,
            bucket: bucket.clone(),
            key_prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            describe,
            target,
            multipart_threshold: opts.multipart_threshold,
            part_size: opts.part_size,
            sse: opts.sse.clone(),
            checksum: opts.checksum,
            timeouts: opts.timeouts,
        })
    }

    /// The SDK client, for what the trait does not cover (tests read SSE headers with it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The full S3 key of a store key (the URL's prefix, `/`, the key).
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    fn strip<'a>(&self, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(&self.key_prefix)
    }

    /// Maps an SDK error to a [`StorageError`] whose message says what to do.
    fn map_err<E>(&self, err: SdkError<E>, key: Option<&str>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match &err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or_default();
                if status < 300 {
                    // A success whose answer did not parse: a proxy, a truncated answer, or a
                    // store that words its answers differently (the outcome is unknown).
                    return StorageError::Unavailable {
                        store: self.describe.clone(),
                        detail: format!(
                            "unreadable answer (HTTP {status}) from {}: {}",
                            self.target,
                            chain(&err)
                        ),
                    };
                }
                let detail = format!(
                    "{} (HTTP {status}){}",
                    if code.is_empty() { "error" } else { code },
                    se.err()
                        .message()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                );
                self.classify(code, status, key, detail)
            }
            SdkError::ResponseError(re) => {
                let status = re.raw().status().as_u16();
                let detail = format!(
                    "unreadable response (HTTP {status}) from {}: {}",
                    self.target,
                    chain(&err)
                );
                if status < 300 {
                    // A 2xx that did not parse: a proxy or a truncated answer.
                    StorageError::Unavailable {
                        store: self.describe.clone(),
                        detail,
                    }
                } else {
                    self.classify("", status, key, detail)
                }
            }
            SdkError::TimeoutError(_) => StorageError::Timeout {
                store: self.describe.clone(),
                detail: format!(
                    "request to {} timed out (operation timeout {:?})",
                    self.target, self.timeouts.operation
                ),
            },
            SdkError::DispatchFailure(d) => {
                if let Some(c) = find_credentials_error(&err) {
                    return self.credentials_error(c);
                }
                if d.is_timeout() {
                    return StorageError::Timeout {
                        store: self.describe.clone(),
                        detail: format!(
                            "request to {} timed out (connect timeout {:?}, read timeout {:?}): {}",
                            self.target,
                            self.timeouts.connect,
                            self.timeouts.read,
                            chain(&err)
                        ),
                    };
                }
                if d.is_user() {
                    StorageError::Other {
                        store: self.describe.clone(),
                        detail: format!(
                            "request to {} could not be sent: {}",
                            self.target,
                            chain(&err)
                        ),
                        transient: false,
                    }
                } else {
                    StorageError::Unavailable {
                        store: self.describe.clone(),
                        detail: format!("cannot reach {}: {}", self.target, chain(&err)),
                    }
                }
            }
            _ => {
                if let Some(c) = find_credentials_error(&err) {
                    return self.credentials_error(c);
                }
                StorageError::Other {
                    store: self.describe.clone(),
                    detail: chain(&err),
                    transient: false,
                }
            }
        }
    }

    fn credentials_error(&self, err: &CredentialsError) -> StorageError {
        let detail = format!("could not load AWS credentials: {}", chain(err));
        match err {
            CredentialsError::ProviderTimedOut(_) => StorageError::Unavailable {
                store: self.describe.clone(),
                detail,
            },
            CredentialsError::ProviderError(_) => StorageError::Other {
                store: self.describe.clone(),
                detail,
                transient: true,
            },
            _ => StorageError::AccessDenied {
                store: self.describe.clone(),
                detail,
            },
        }
    }

    fn classify(&self, code: &str, status: u16, key: Option<&str>, detail: String) -> StorageError {
        let store = self.describe.clone();
        let key = || key.unwrap_or_default().to_string();
        match (code, status) {
            ("NoSuchBucket", _) => StorageError::NoSuchBucket {
                bucket: self.bucket.clone(),
            },
            ("PreconditionFailed", _) | (_, 412) => {
                StorageError::AlreadyExists { store, key: key() }
            }
            // A 404 to a call without a key (a listing) can only mean the bucket.
            ("NoSuchKey" | "NotFound" | "", 404) if key().is_empty() => {
                StorageError::NoSuchBucket {
                    bucket: self.bucket.clone(),
                }
            }
            ("NoSuchKey" | "NotFound", _) | (_, 404) => {
                StorageError::NotFound { store, key: key() }
            }
            (
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "InvalidToken"
                | "TokenRefreshRequired"
                | "AllAccessDisabled"
                | "AccountProblem",
                _,
            )
            | (_, 401 | 403) => StorageError::AccessDenied { store, detail },
            (
                "PermanentRedirect"
                | "AuthorizationHeaderMalformed"
                | "IllegalLocationConstraintException",
                _,
            )
            | (_, 301) => StorageError::Other {
                store,
                detail: format!(
                    "{detail} (the bucket is in another region: set ?region= in the replica URL \
                     or AWS_REGION)"
                ),
                transient: false,
            },
            (
                "SlowDown"
                | "Throttling"
                | "ThrottlingException"
                | "RequestTimeout"
                | "InternalError"
                | "ServiceUnavailable"
                | "ConditionalRequestConflict"
                | "OperationAborted",
                _,
            )
            | (_, 408 | 429 | 500..=599) => StorageError::Unavailable { store, detail },
            _ => StorageError::Other {
                store,
                detail,
                transient: false,
            },
        }
    }

    async fn put_single(&self, key: &str, body: Bytes, opts: &PutOptions) -> StorageResult<()> {
        let bytes = body.len();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .content_length(i64::try_from(bytes).unwrap_or(i64::MAX))
            .body(SdkByteStream::from(body));
        if opts.if_none_match {
            req = req.if_none_match("*");
        }
        match &self.sse {
            Some(ServerSideEncryption::Aes256) => {
                req = req.server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::Aes256);
            }
            Some(ServerSideEncryption::Kms { key_id }) => {
                req = req
                    .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id.clone());
            }
            None => {}
        }
        req.send().await.map_err(|e| self.map_err(e, Some(key)))?;
        tracing::trace!(store = %self.describe, key, bytes, "put");
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: &str,
        mut parts: Parts,
        opts: &PutOptions,
    ) -> StorageResult<()> {
        let full = self.object_key(key);
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full);
        match &self.sse {
            Some(ServerSideEncryption::Aes256) => {
                req = req.server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::Aes256);
            }
            Some(ServerSideEncryption::Kms { key_id }) => {
                req = req
                    .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id.clone());
            }
            None => {}
        }
        if self.checksum == ChecksumMode::WhenSupported {
            req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        let created = req.send().await.map_err(|e| self.map_err(e, Some(key)))?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(StorageError::Other {
                store: self.describe.clone(),
                detail: format!("CreateMultipartUpload for `{key}` returned no upload id"),
                transient: true,
            });
        };

        let result = self
            .upload_parts(key, &full, &upload_id, &mut parts, opts)
            .await;
        if let Err(error) = &result {
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(abort_error) = abort {
                tracing::warn!(
                    store = %self.describe,
                    key,
                    %error,
                    abort_error = %self.map_err(abort_error, Some(key)),
                    "could not abort a failed multipart upload (a bucket lifecycle rule for \
                     incomplete uploads cleans it up)"
                );
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        parts: &mut Parts,
        opts: &PutOptions,
    ) -> StorageResult<()> {
        let mut done = Vec::new();
        let mut number: i32 = 0;
        let mut bytes: u64 = 0;
        loop {
            let size = part_size(self.part_size, number + 1);
            let Some(part) = parts.next_part(size).await? else {
                break;
            };
            number += 1;
            if number > MAX_PARTS {
                return Err(StorageError::Other {
                    store: self.describe.clone(),
                    detail: format!(
                        "`{key}` needs more than {MAX_PARTS} parts (the last {size} bytes): \
                         raise part_size"
                    ),
                    transient: false,
                });
            }
            bytes += part.len() as u64;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(i64::try_from(part.len()).unwrap_or(i64::MAX))
                .body(SdkByteStream::from(part))
                .send()
                .await
                .map_err(|e| self.map_err(e, Some(key)))?;
            done.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .build(),
            );
        }
        let etags: Vec<Option<String>> =
            done.iter().map(|p| p.e_tag().map(str::to_string)).collect();
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            );
        if opts.if_none_match {
            req = req.if_none_match("*");
        }
        if let Err(e) = req.send().await {
            // An answer that could not be read, or none, says nothing of the outcome: the
            // object may well be whole. Ask the store before calling the upload failed.
            if !outcome_unknown(&e) || !self.completed_anyway(key, full, bytes, &etags).await {
                return Err(self.map_err(e, Some(key)));
            }
        }
        tracing::trace!(store = %self.describe, key, bytes, parts = number, "multipart put");
        Ok(())
    }

    /// True when the store holds `full` as the multipart upload whose parts had `etags`
    /// made it: its size is `bytes` and, where both sides are MD5-based, its ETag is the
    /// one those parts give.
    async fn completed_anyway(
        &self,
        key: &str,
        full: &str,
        bytes: u64,
        etags: &[Option<String>],
    ) -> bool {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await;
        let found = match head {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(store = %self.describe, key, error = %self.map_err(e, Some(key)), "no object after an unreadable completion");
                return false;
            }
        };
        let size = u64::try_from(found.content_length().unwrap_or(-1)).ok();
        let expected = multipart_etag(etags);
        let etag_agrees = match (found.e_tag().and_then(parse_multipart_etag), &expected) {
            (Some(got), Some(want)) => &got == want,
            // A store whose ETags are not MD5-based (SSE-KMS, some S3-compatible stores):
            // the size has to do.
            _ => true,
        };
        let whole = size == Some(bytes) && etag_agrees;
        if whole {
            tracing::info!(store = %self.describe, key, bytes, "the multipart completion's answer was unreadable, but the store holds the whole object");
        } else {
            tracing::debug!(store = %self.describe, key, bytes, ?size, etag = ?found.e_tag(), ?expected, "the object found after an unreadable completion is not ours");
        }
        whole
    }
}

/// The continuation [`S3Store::list_page`] makes up when a store says a listing is
/// truncated but gives no continuation token: the next page asks for `StartAfter` the
/// marker instead. S3's tokens are opaque base64, without a `:`.
const START_AFTER_TOKEN: &str = "walship:start-after:";

/// A page after `marker` (entries up to it dropped), at most `max` entries in key order,
/// whose `next` goes on from its last entry when the store said it was `truncated` or
/// entries were cut. `None` when the store said it was truncated yet gave nothing past the
/// marker: no way to go on.
fn page_after(
    mut page: ListPage,
    marker: Option<&str>,
    max: usize,
    truncated: bool,
) -> Option<ListPage> {
    if let Some(m) = marker {
        page.objects.retain(|o| o.key.as_str() > m);
        page.common_prefixes.retain(|p| p.as_str() > m);
    }
    let total = page.objects.len() + page.common_prefixes.len();
    if total == 0 {
        return (!truncated).then_some(page);
    }
    // Keep the first `max` entries of both lists merged in key order.
    let (mut o, mut p) = (0, 0);
    let mut last = String::new();
    while o + p < max.min(total) {
        let take_object = match (page.objects.get(o), page.common_prefixes.get(p)) {
            (Some(obj), Some(pre)) => obj.key < *pre,
            (Some(_), None) => true,
            _ => false,
        };
        if take_object {
            last.clone_from(&page.objects[o].key);
            o += 1;
        } else {
            last.clone_from(&page.common_prefixes[p]);
            p += 1;
        }
    }
    page.objects.truncate(o);
    page.common_prefixes.truncate(p);
    page.next = (truncated || total > max).then(|| format!("{START_AFTER_TOKEN}{last}"));
    Some(page)
}

/// True when a `CompleteMultipartUpload` that failed so may have completed all the same: an
/// answer that could not be read (a success the SDK could not parse, a dropped connection,
/// a timeout), a server error, or `NoSuchUpload` (an earlier attempt completed it).
fn outcome_unknown<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            !(300..500).contains(&status) || se.err().code() == Some("NoSuchUpload")
        }
        SdkError::ResponseError(_) | SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            true
        }
        _ => false,
    }
}

/// The ETag S3 gives a multipart upload: the MD5 of its parts' MD5s, `-`, the part count;
/// `None` unless every part's ETag is an MD5 in hex.
fn multipart_etag(parts: &[Option<String>]) -> Option<String> {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for p in parts {
        let hex = p.as_deref()?.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            h.update([u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?]);
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{hex}-{}", parts.len()))
}

/// A multipart ETag (`"<32 hex>-<parts>"`) without its quotes, lower-cased; `None` for
/// any other form.
fn parse_multipart_etag(etag: &str) -> Option<String> {
    let e = etag.trim_matches('"').to_ascii_lowercase();
    let (hex, n) = e.split_once('-')?;
    (hex.len() == 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit()))
    .then_some(e)
}

/// Resolves a region from the environment and the profile; then `us-east-1` for a custom
/// endpoint, or instance metadata for AWS.
async fn resolve_region(custom_endpoint: bool) -> Option<Region> {
    let chain = RegionProviderChain::first_try(
        aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
    )
    .or_else(aws_config::profile::ProfileFileRegionProvider::new());
    let chain = if custom_endpoint {
        chain.or_else(Region::new("us-east-1"))
    } else {
        chain.or_else(aws_config::imds::region::ImdsRegionProvider::builder().build())
    };
    chain.region().await
}

/// An error and its sources, `: `-joined, skipping a source whose text its parent already
/// shows.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

fn find_credentials_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CredentialsError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// The size of part `number` (from 1): `base`, doubled after every [`PARTS_PER_SIZE`] parts,
/// at most S3's largest part.
fn part_size(base: usize, number: i32) -> usize {
    let doublings = u32::try_from((number.max(1) - 1) / PARTS_PER_SIZE).unwrap_or(0);
    base.saturating_mul(1 << doublings.min(16))
        .min(MAX_PART_SIZE)
}

/// The parts of a multipart upload: slices of a body in memory, or a stream buffered one part
/// at a time.
enum Parts {
    Bytes(Bytes),
    Stream {
        buf: BytesMut,
        stream: ByteStream,
        ended: bool,
    },
}

impl Parts {
    async fn next_part(&mut self, size: usize) -> StorageResult<Option<Bytes>> {
        match self {
            Parts::Bytes(b) => {
                if b.is_empty() {
                    return Ok(None);
                }
                let n = b.len().min(size);
                Ok(Some(b.split_to(n)))
            }
            Parts::Stream { buf, stream, ended } => {
                if buf.capacity() < size {
                    buf.reserve(size + STREAM_SLACK - buf.len());
                }
                while buf.len() < size && !*ended {
                    match stream.next().await {
                        Some(chunk) => buf.extend_from_slice(&chunk?),
                        None => *ended = true,
                    }
                }
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf.len().min(size);
                Ok(Some(buf.split_to(n).freeze()))
            }
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        check_key(key)?;
        match body {
            PutBody::Bytes(b) if b.len() <= self.multipart_threshold => {
                self.put_single(key, b, opts).await
            }
            PutBody::Bytes(b) => self.put_multipart(key, Parts::Bytes(b), opts).await,
            PutBody::Stream(mut stream) => {
                // Buffer up to the threshold to choose between one PutObject and a multipart
                // upload, in one allocation (a doubling buffer would peak at twice the size).
                let mut buf = BytesMut::with_capacity(self.multipart_threshold + STREAM_SLACK);
                while buf.len() <= self.multipart_threshold {
                    match stream.next().await {
                        Some(chunk) => buf.extend_from_slice(&chunk?),
                        None => return self.put_single(key, buf.freeze(), opts).await,
                    }
                }
                let parts = Parts::Stream {
                    buf,
                    stream,
                    ended: false,
                };
                self.put_multipart(key, parts, opts).await
            }
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        check_key(key)?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key));
        if let Some(r) = &range {
            if r.start >= r.end {
                return self.empty_body(key).await;
            }
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = match req.send().await {
            Ok(out) => out,
            // A range starting past the end.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                return self.empty_body(key).await;
            }
            Err(e) => return Err(self.map_err(e, Some(key))),
        };
        let length = u64::try_from(out.content_length().unwrap_or_default()).unwrap_or_default();
        let size = out
            .content_range()
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok())
            .unwrap_or(length);
        let store = self.describe.clone();
        let target = self.target.clone();
        let key_owned = key.to_string();
        let body = futures::stream::try_unfold(out.body, move |mut body| {
            let (store, target, key) = (store.clone(), target.clone(), key_owned.clone());
            async move {
                match body.try_next().await {
                    Ok(Some(chunk)) => Ok(Some((chunk, body))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(StorageError::Unavailable {
                        store,
                        detail: format!(
                            "reading `{key}` from {target} failed midway: {}",
                            chain(&e)
                        ),
                    }),
                }
            }
        });
        Ok(GetObject {
            size,
            body: Box::pin(body),
        })
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: u64::try_from(out.content_length().unwrap_or_default()).unwrap_or_default(),
                modified_ms: out.last_modified().and_then(|t| t.to_millis().ok()),
            })),
            Err(e) => match self.map_err(e, Some(key)) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        check_prefix(&req.prefix)?;
        let max = req.max_keys.unwrap_or(MAX_KEYS).clamp(1, MAX_KEYS);
        // After a page that was truncated without a continuation token, go on from its
        // last entry (asking for a full page, since such a store may not apply `StartAfter`
        // to common prefixes: the entries up to the marker are dropped here).
        let marker = req
            .continuation
            .as_deref()
            .and_then(|t| t.strip_prefix(START_AFTER_TOKEN));
        let (token, start_after, ask) = match marker {
            Some(m) => (None, Some(m), MAX_KEYS),
            None => (req.continuation.clone(), req.start_after.as_deref(), max),
        };
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.object_key(&req.prefix))
            .max_keys(i32::try_from(ask).unwrap_or(1000))
            .set_delimiter(req.delimiter.clone().filter(|d| !d.is_empty()))
            .set_start_after(start_after.map(|s| self.object_key(s)))
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.map_err(e, None))?;
        let mut page = ListPage::default();
        for obj in out.contents() {
            let Some(key) = obj.key().and_then(|k| self.strip(k)) else {
                continue;
            };
            page.objects.push(ObjectMeta {
                key: key.to_string(),
                size: u64::try_from(obj.size().unwrap_or_default()).unwrap_or_default(),
                modified_ms: obj.last_modified().and_then(|t| t.to_millis().ok()),
            });
        }
        for p in out.common_prefixes() {
            if let Some(p) = p.prefix().and_then(|p| self.strip(p)) {
                page.common_prefixes.push(p.to_string());
            }
        }
        let truncated = out.is_truncated().unwrap_or(false);
        match (marker, truncated, out.next_continuation_token()) {
            (None, false, _) => {}
            (None, true, Some(t)) => page.next = Some(t.to_string()),
            // Truncated, and no token to go on with: a listing that stopped here would hide
            // objects (s3s-fs answers so). Go on from the last entry, or say it cannot.
            (marker, truncated, _) => {
                page = page_after(page, marker, max, truncated).ok_or_else(|| {
                    StorageError::Other {
                        store: self.describe.clone(),
                        detail: format!(
                            "listing `{}`: {} says the listing goes on but gives no \
                             continuation token and ignores StartAfter (a store bug: the \
                             objects past this point cannot be listed)",
                            req.prefix, self.target
                        ),
                        transient: false,
                    }
                })?;
            }
        }
        Ok(page)
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        for key in keys {
            check_key(key)?;
        }
        for batch in keys.chunks(MAX_KEYS) {
            let ids = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.object_key(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StorageError::Other {
                    store: self.describe.clone(),
                    detail: format!("building a delete request: {e}"),
                    transient: false,
                })?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::Other {
                    store: self.describe.clone(),
                    detail: format!("building a delete request: {e}"),
                    transient: false,
                })?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.map_err(e, None))?;
            if let Some(err) = out.errors().first() {
                let key = err
                    .key()
                    .and_then(|k| self.strip(k))
                    .unwrap_or_default()
                    .to_string();
                let code = err.code().unwrap_or_default();
                let detail = format!(
                    "deleting `{key}`: {code}: {}",
                    err.message().unwrap_or_default()
                );
                // Per-key errors carry no HTTP status; `AccessDenied` and `InternalError` are
                // the documented ones.
                return Err(self.classify(code, 0, Some(&key), detail));
            }
            tracing::trace!(store = %self.describe, keys = batch.len(), "deleted");
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

impl S3Store {
    async fn empty_body(&self, key: &str) -> StorageResult<GetObject> {
        match self.head(key).await? {
            Some(meta) => Ok(GetObject {
                size: meta.size,
                body: Box::pin(futures::stream::empty()),
            }),
            None => Err(StorageError::NotFound {
                store: self.describe.clone(),
                key: key.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(url: &str, opts: &S3Options) -> S3Store {
        let url: ReplicaUrl = url.parse().expect("url");
        S3Store::from_url(&url, opts).await.expect("store")
    }

    #[tokio::test]
    async fn prefix_and_description() {
        let s = store(
            "s3://b/a/b?endpoint=http://127.0.0.1:1",
            &S3Options::default(),
        )
        .await;
        assert_eq!(s.describe(), "s3://b/a/b");
        assert_eq!(s.object_key("k"), "a/b/k");
        assert_eq!(s.strip("a/b/k"), Some("k"));
        assert_eq!(s.strip("a/bk"), None);
        let s = store("s3://b?endpoint=http://127.0.0.1:1", &S3Options::default()).await;
        assert_eq!(s.object_key("k"), "k");
        assert_eq!(s.describe(), "s3://b");
        assert_eq!(s.target, "http://127.0.0.1:1");
    }

    #[tokio::test]
    async fn part_size_below_the_s3_minimum_is_refused() {
        let url: ReplicaUrl = "s3://b?endpoint=http://127.0.0.1:1".parse().expect("url");
        let opts = S3Options {
            part_size: MIB,
            ..Default::default()
        };
        let err = S3Store::from_url(&url, &opts).await.err();
        assert!(
            matches!(err, Some(StorageError::InvalidUrl { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn parts_double_after_every_thousand_and_reach_terabytes() {
        let base = 5 * MIB;
        assert_eq!(part_size(base, 1), base);
        assert_eq!(part_size(base, PARTS_PER_SIZE), base);
        assert_eq!(part_size(base, PARTS_PER_SIZE + 1), 2 * base);
        assert_eq!(part_size(base, 3 * PARTS_PER_SIZE + 1), 8 * base);
        assert_eq!(part_size(base, MAX_PARTS), MAX_PART_SIZE.min(base << 9));
        assert_eq!(part_size(MAX_PART_SIZE, MAX_PARTS), MAX_PART_SIZE);
        let total: u128 = (1..=MAX_PARTS).map(|n| part_size(base, n) as u128).sum();
        assert!(
            total >= 48 * (1u128 << 40) / 10,
            "{total} bytes is short of 4.8 TiB"
        );
        // The default 5 MiB parts keep a 1 GiB snapshot to one size.
        assert_eq!(part_size(base, 1024 / 5 + 1), base);
    }

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 1,
            modified_ms: None,
        }
    }

    #[test]
    fn a_truncated_page_without_a_token_goes_on_from_its_last_entry() {
        let page = ListPage {
            objects: vec![meta("d/a"), meta("d/c")],
            common_prefixes: vec!["d/b/".into(), "d/d/".into()],
            next: None,
        };
        // The store said "truncated" and gave no token: go on after the last entry.
        let p = page_after(page.clone(), None, 1000, true).expect("page");
        assert_eq!(p.next.as_deref(), Some("walship:start-after:d/d/"));
        assert_eq!(p.objects.len() + p.common_prefixes.len(), 4);
        // Continuing after `d/b/`, one entry a page, in key order.
        let p = page_after(page.clone(), Some("d/b/"), 1, false).expect("page");
        assert_eq!(p.objects, [meta("d/c")]);
        assert!(p.common_prefixes.is_empty());
        assert_eq!(p.next.as_deref(), Some("walship:start-after:d/c"));
        let p = page_after(page.clone(), Some("d/c"), 1, false).expect("page");
        assert_eq!(p.common_prefixes, ["d/d/"]);
        assert_eq!(p.next, None);
        // Nothing past the marker, and still "truncated": no way on, never a silent end.
        assert!(page_after(page.clone(), Some("d/d/"), 1000, true).is_none());
        let end = page_after(page, Some("d/d/"), 1000, false).expect("the end");
        assert_eq!((end.objects.len(), end.next), (0, None));
    }

    #[test]
    fn multipart_etags_are_computed_as_s3_does() {
        // Two parts: MD5s of "a" and "b"; S3's ETag is the MD5 of their concatenated
        // digests, then the part count.
        let parts = [
            Some("\"0cc175b9c0f1b6a831c399e269772661\"".to_string()),
            Some("92eb5ffee6ae2fec3ad71c777531578f".to_string()),
        ];
        let want = multipart_etag(&parts).expect("md5 parts");
        assert_eq!(want, "96e024ba2074fe77e8e965ba43a704be-2");
        assert_eq!(
            parse_multipart_etag(&format!("\"{}\"", want.to_uppercase())),
            Some(want)
        );
        assert_eq!(multipart_etag(&[Some("not-an-md5".into())]), None);
        assert_eq!(multipart_etag(&[None]), None);
        assert_eq!(
            parse_multipart_etag("\"0cc175b9c0f1b6a831c399e269772661\""),
            None
        );
    }

    #[test]
    fn error_chains_read_as_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("dispatch failure")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(chain(&e), "dispatch failure: Connection refused");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = StaticCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI".into(),
            session_token: Some("FwoGZXIvYXdzE".into()),
        };
        let shown = format!(
            "{:?}",
            S3Options {
                credentials: Some(c),
                ..Default::default()
            }
        );
        assert!(shown.contains("AKIDEXAMPLE"));
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("FwoGZXIvYXdzE"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn error_codes_map_to_what_to_do() {
        let s = store(
            "s3://bkt/p?endpoint=http://127.0.0.1:1",
            &S3Options::default(),
        )
        .await;
        let c = |code: &str, status: u16, key: Option<&str>| {
            s.classify(code, status, key, "detail".into())
        };
        assert!(
            matches!(c("NoSuchBucket", 404, Some("k")), StorageError::NoSuchBucket { bucket } if bucket == "bkt")
        );
        assert!(
            matches!(c("NoSuchKey", 404, Some("k")), StorageError::NotFound { key, .. } if key == "k")
        );
        assert!(matches!(
            c("", 404, None),
            StorageError::NoSuchBucket { .. }
        ));
        assert!(matches!(
            c("PreconditionFailed", 412, Some("k")),
            StorageError::AlreadyExists { .. }
        ));
        for code in [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
        ] {
            assert!(
                matches!(c(code, 403, None), StorageError::AccessDenied { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            c("", 403, Some("k")),
            StorageError::AccessDenied { .. }
        ));
        for (code, status) in [
            ("SlowDown", 503),
            ("InternalError", 500),
            ("", 502),
            ("ThrottlingException", 400),
        ] {
            let e = c(code, status, Some("k"));
            assert!(
                matches!(e, StorageError::Unavailable { .. }) && e.is_transient(),
                "{code}"
            );
        }
        let e = c("PermanentRedirect", 301, None);
        assert!(
            !e.is_transient() && e.to_string().contains("?region="),
            "{e}"
        );
        assert!(!c("InvalidArgument", 400, None).is_transient());
    }
}
