//! The answers the middleware writes itself: RFC 9457 problems, the key header's parsing,
//! and replays.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::{IDEMPOTENCY_KEY, IDEMPOTENCY_REPLAYED};
use crate::store::{StoredResponse, validate_key};

/// A refusal before the handler runs.
pub(super) struct Problem {
    pub(super) status: StatusCode,
    title: &'static str,
    detail: String,
    pub(super) retry_after: Option<u64>,
}

impl Problem {
    pub(super) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(super) fn body(&self) -> Bytes {
        let json = serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        Bytes::from(json.to_string())
    }

    pub(super) fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The key in the header: one header, an RFC 8941 string (`"..."`) or a bare token.
pub(super) fn read_key(headers: &http::HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad =
        |detail: String| Problem::new(StatusCode::BAD_REQUEST, "Invalid Idempotency-Key", detail);
    if values.next().is_some() {
        return Err(bad("send one Idempotency-Key header, not several".into()));
    }
    let raw = value
        .to_str()
        .map_err(|_| bad("the Idempotency-Key holds bytes outside printable ascii".into()))?;
    let key =
        parse_sf_string(raw).map_err(|reason| bad(format!("the Idempotency-Key {reason}")))?;
    validate_key(&key).map_err(|e| bad(e.to_string()))?;
    Ok(Some(key))
}

/// An RFC 8941 sf-string (`"..."` with `\"` and `\\` escapes), or the value as is when
/// it is not quoted (what most clients send).
fn parse_sf_string(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim_matches(' ');
    let Some(inner) = raw.strip_prefix('"') else {
        return Ok(raw.to_owned());
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.next().is_none() {
                    Ok(out)
                } else {
                    Err("has characters after its closing quote")
                };
            }
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return Err("holds an escape other than \\\" or \\\\"),
            },
            c => out.push(c),
        }
    }
    Err("lacks its closing quote")
}

/// The stored response with `Idempotency-Replayed: true`.
pub(super) fn replay<B: From<Bytes>>(stored: StoredResponse) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::from(stored.body)));
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value))
        {
            headers.append(name, value);
        }
    }
    headers.insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sf_strings() {
        assert_eq!(parse_sf_string("\"abc\"").ok(), Some("abc".to_owned()));
        assert_eq!(parse_sf_string("\"a\\\"b\"").ok(), Some("a\"b".to_owned()));
        assert_eq!(
            parse_sf_string("plain-uuid").ok(),
            Some("plain-uuid".to_owned())
        );
        assert!(parse_sf_string("\"open").is_err());
        assert!(parse_sf_string("\"a\"b").is_err());
        assert!(parse_sf_string("\"a\\nb\"").is_err());
    }
}
