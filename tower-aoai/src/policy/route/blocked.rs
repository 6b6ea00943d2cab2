//! The diagnostic record of a 403 "temporarily blocked" answer, and the error a caller gets when
//! every resource that could serve is blocked.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, StatusCode};

use crate::policy::headers;

/// Response headers that are never copied into a record (secrets, cookies).
const SECRET_HEADERS: [&str; 7] = [
    "api-key",
    "authorization",
    "proxy-authorization",
    "ocp-apim-subscription-key",
    "x-api-key",
    "cookie",
    "set-cookie",
];
const MAX_HEADERS: usize = 64;
const MAX_VALUE: usize = 256;
/// How much of the response body a record keeps.
pub const MAX_BODY_PREFIX: usize = 2048;

/// What support needs to lift a block: who was blocked, where, when, and the response as received
/// (without secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SupportRecord {
    /// The backend's configured name.
    pub backend: String,
    /// The resource (endpoint host) that is blocked.
    pub resource: String,
    /// The deployment the request was for, if the backend names one.
    pub deployment: Option<String>,
    /// The configured region label.
    pub region: Option<String>,
    /// `x-ms-region` from the response.
    pub ms_region: Option<String>,
    /// `apim-request-id` from the response.
    pub apim_request_id: Option<String>,
    /// `x-request-id` from the response.
    pub request_id: Option<String>,
    /// When the answer arrived (wall clock).
    pub time: SystemTime,
    /// The HTTP status.
    pub status: u16,
    /// The response headers, secrets removed, values truncated.
    pub headers: Vec<(String, String)>,
    /// The start of the response body (lossy UTF-8, at most [`MAX_BODY_PREFIX`] bytes).
    pub body: String,
}

impl SupportRecord {
    /// Builds a record from a blocked answer. `body` is the start of the response body.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &str,
        resource: &str,
        deployment: Option<&str>,
        region: Option<&str>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        time: SystemTime,
    ) -> Self {
        let header = |name: HeaderName| {
            headers
                .get(name)
                .map(|v| clip(&String::from_utf8_lossy(v.as_bytes())))
        };
        let kept = headers
            .iter()
            .filter(|(k, _)| !SECRET_HEADERS.contains(&k.as_str()))
            .take(MAX_HEADERS)
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    clip(&String::from_utf8_lossy(v.as_bytes())),
                )
            })
            .collect();
        Self {
            backend: backend.to_owned(),
            resource: resource.to_owned(),
            deployment: deployment.map(str::to_owned),
            region: region.map(str::to_owned),
            ms_region: header(headers::MS_REGION),
            apim_request_id: header(headers::APIM_REQUEST_ID),
            request_id: header(headers::REQUEST_ID),
            time,
            status: status.as_u16(),
            headers: kept,
            body: String::from_utf8_lossy(&body[..body.len().min(MAX_BODY_PREFIX)]).into_owned(),
        }
    }

    /// The record as the text of a support request.
    pub fn support_request(&self) -> String {
        self.to_string()
    }
}

fn clip(value: &str) -> String {
    match value.char_indices().nth(MAX_VALUE) {
        Some((at, _)) => format!("{}...", &value[..at]),
        None => value.to_owned(),
    }
}

impl fmt::Display for SupportRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not given)".into());
        writeln!(
            f,
            "Azure OpenAI resource {} answered HTTP {} \"temporarily blocked\"; please lift the block.",
            self.resource, self.status
        )?;
        writeln!(
            f,
            "  time:            {}",
            httpdate::fmt_http_date(self.time)
        )?;
        writeln!(f, "  resource:        {}", self.resource)?;
        writeln!(
            f,
            "  region:          {} (configured: {})",
            or(&self.ms_region),
            or(&self.region)
        )?;
        writeln!(f, "  deployment:      {}", or(&self.deployment))?;
        writeln!(f, "  apim-request-id: {}", or(&self.apim_request_id))?;
        writeln!(f, "  x-request-id:    {}", or(&self.request_id))?;
        writeln!(f, "  backend:         {}", self.backend)?;
        writeln!(f, "  response headers:")?;
        for (k, v) in &self.headers {
            writeln!(f, "    {k}: {v}")?;
        }
        write!(f, "  response body:   {}", self.body)
    }
}

/// Every resource that could serve the call is blocked (403 "temporarily blocked"); carries the
/// latest block's [`SupportRecord`].
#[derive(Debug, Clone)]
pub struct BlockedError {
    record: Arc<SupportRecord>,
}

impl BlockedError {
    /// The error for a block described by `record`.
    pub fn new(record: Arc<SupportRecord>) -> Self {
        Self { record }
    }

    /// The diagnostic record of the block.
    pub fn record(&self) -> &SupportRecord {
        &self.record
    }

    /// The text of a support request for the block.
    pub fn support_record(&self) -> String {
        self.record.to_string()
    }
}

impl fmt::Display for BlockedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no backend can serve: {}", self.record)
    }
}

impl std::error::Error for BlockedError {}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    #[test]
    fn record_reads_like_a_support_request_without_secrets() {
        let mut h = HeaderMap::new();
        h.insert("apim-request-id", HeaderValue::from_static("abc-123"));
        h.insert("x-ms-region", HeaderValue::from_static("East US 2"));
        h.insert("set-cookie", HeaderValue::from_static("SECRET-COOKIE"));
        h.insert("api-key", HeaderValue::from_static("SECRET-KEY"));
        h.insert("x-long", HeaderValue::from_str(&"v".repeat(1000)).unwrap());
        let body = br#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let r = SupportRecord::new(
            "east",
            "east.example.com",
            Some("gpt4o"),
            Some("eastus2"),
            StatusCode::FORBIDDEN,
            &h,
            body,
            time,
        );
        let text = BlockedError::new(Arc::new(r)).support_record();
        for needle in [
            "abc-123",
            "East US 2",
            "east.example.com",
            "gpt4o",
            "HTTP 403",
            "Tue, 14 Nov 2023 22:13:20 GMT",
            "temporarily blocked because",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.len() < 3000 + MAX_BODY_PREFIX, "{}", text.len());
    }
}
