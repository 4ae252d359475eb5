//! Bearer tokens of the mutating and download endpoints, compared in constant time.

use axum::http::{HeaderMap, StatusCode, header};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Checks the request's `Authorization: Bearer ...` against `expected`.
pub fn check(headers: &HeaderMap, expected: Option<&str>) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "disabled",
            "this endpoint is disabled: start walship with --api-token-file or WALSHIP_API_TOKEN",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        Some(t) if tokens_equal(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <token>`",
        )),
    }
}

/// Constant time in the content of both; the time depends only on the expected length.
fn tokens_equal(given: &[u8], expected: &[u8]) -> bool {
    let mut padded = vec![0u8; expected.len()];
    let n = given.len().min(expected.len());
    padded[..n].copy_from_slice(&given[..n]);
    let same_len = (given.len() as u64).ct_eq(&(expected.len() as u64));
    bool::from(padded.as_slice().ct_eq(expected) & same_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{e}")),
        );
        h
    }

    #[test]
    fn only_the_exact_token_passes() {
        let t = Some("0123456789abcdef");
        assert!(check(&with("Bearer 0123456789abcdef"), t).is_ok());
        assert!(check(&with("bearer 0123456789abcdef"), t).is_ok());
        for bad in [
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Bearer x",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
        ] {
            let e = check(&with(bad), t).err().map(|e| e.status);
            assert_eq!(e, Some(StatusCode::UNAUTHORIZED), "{bad}");
        }
        assert_eq!(
            check(&HeaderMap::new(), t).err().map(|e| e.status),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(&with("Bearer x"), None).err().map(|e| e.status),
            Some(StatusCode::FORBIDDEN)
        );
    }
}
