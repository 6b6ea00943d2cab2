//! What an attempt's outcome means.
//!
//! One function reads an attempt (status, headers and, for error statuses, the start of the JSON
//! body; or a transport error) and says what happened: success; a throttle and its cause (quota,
//! capacity, provisioned, unknown); a 403 "temporarily blocked"; a transient failure; or a fatal
//! one. Whether the call may be retried follows, and `x-should-retry: true|false` from the server
//! overrides it, as the `openai` SDK does.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::headers;
use super::hints::{self, DelayHint, HintSource};

/// How much of an error body is read to classify it. Azure's error bodies are a few hundred bytes;
/// the rest of a larger body is left alone (and still handed to the caller).
pub const MAX_ERROR_BODY: usize = 16 * 1024;

/// The longest the start of an error body is waited for before the response is classified on
/// what arrived: a server that sends headers and then trickles (or stalls) cannot hold a call.
pub const MAX_ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// How long to wait for the start of an error body, given the call's remaining time: at most
/// [`MAX_ERROR_BODY_WAIT`], never past the deadline.
pub fn error_body_wait(remaining: Option<Duration>) -> Duration {
    remaining.map_or(MAX_ERROR_BODY_WAIT, |r| r.min(MAX_ERROR_BODY_WAIT))
}

/// Why a 429 (throttle) happened, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ThrottleCause {
    /// The deployment's own token or request rate limit (TPM/RPM), "exceeded token rate limit" or
    /// "call rate limit".
    Quota,
    /// Regional capacity ("high demand", "peak load"): independent of the deployment's quota.
    Capacity,
    /// A provisioned (PTU) deployment at 100 % utilisation.
    Provisioned,
    /// A 429 that says nothing more.
    Unknown,
}

impl ThrottleCause {
    /// A short stable name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleCause::Quota => "quota",
            ThrottleCause::Capacity => "capacity",
            ThrottleCause::Provisioned => "provisioned",
            ThrottleCause::Unknown => "unknown",
        }
    }
}

/// A failure that may go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransientKind {
    /// 408 Request Timeout.
    RequestTimeout,
    /// 409 Conflict.
    Conflict,
    /// 503 Service Unavailable: the service is overloaded (a throttle signal for the limiter).
    Overloaded,
    /// Any other 5xx.
    ServerError,
    /// The connection could not be made, or broke before a response.
    Connect,
    /// The attempt timed out on the client side.
    Timeout,
}

/// A failure that retrying will not fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FatalKind {
    /// The content filter rejected the prompt or the completion.
    ContentFilter,
    /// Any other 4xx (bad request, unauthorized, not found, ...).
    Client,
    /// A status the client does not understand (1xx, 3xx here, or out of range).
    Unexpected,
}

/// What an attempt's outcome means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A 2xx answer.
    Success,
    /// A 429, and its cause.
    Throttled(ThrottleCause),
    /// A 403 "temporarily blocked": an abuse-monitoring block on the whole resource.
    Blocked,
    /// A failure that may go away by itself.
    Transient(TransientKind),
    /// A failure retrying will not fix.
    Fatal(FatalKind),
}

impl Outcome {
    /// Whether the service pushed back on load: a 429 of any cause, or a 503 "overloaded".
    /// This is the signal the adaptive limiter cuts on.
    pub fn is_throttle(self) -> bool {
        matches!(
            self,
            Outcome::Throttled(_) | Outcome::Transient(TransientKind::Overloaded)
        )
    }

    /// A short stable name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Throttled(cause) => match cause {
                ThrottleCause::Quota => "throttled_quota",
                ThrottleCause::Capacity => "throttled_capacity",
                ThrottleCause::Provisioned => "throttled_provisioned",
                ThrottleCause::Unknown => "throttled_unknown",
            },
            Outcome::Blocked => "blocked",
            Outcome::Transient(kind) => match kind {
                TransientKind::RequestTimeout => "transient_408",
                TransientKind::Conflict => "transient_409",
                TransientKind::Overloaded => "transient_overloaded",
                TransientKind::ServerError => "transient_5xx",
                TransientKind::Connect => "transient_connect",
                TransientKind::Timeout => "transient_timeout",
            },
            Outcome::Fatal(kind) => match kind {
                FatalKind::ContentFilter => "fatal_content_filter",
                FatalKind::Client => "fatal_client",
                FatalKind::Unexpected => "fatal_unexpected",
            },
        }
    }
}

/// A failure below HTTP: no response was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection could not be made, or was reset before a response.
    Connect,
    /// The attempt timed out before a response.
    Timeout,
}

/// The meaning of one attempt's outcome, and what it implies for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// What happened.
    pub outcome: Outcome,
    /// Whether another attempt may succeed (after `x-should-retry` was applied).
    pub retryable: bool,
    /// The server's delay hint, if it gave one.
    pub hint: Option<DelayHint>,
}

/// Whether the body of a response with this status should be read (up to [`MAX_ERROR_BODY`]) before
/// classifying it. Success bodies are never read: streams pass through untouched.
pub fn needs_body(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Whether the core may read every header of a response with this status, not only those of
/// [`headers::READ`]: a 403 may be a block, whose support record keeps them all (but secrets).
pub fn needs_all_headers(status: StatusCode) -> bool {
    status == StatusCode::FORBIDDEN
}

/// Classifies a response from its status, headers and (for error statuses) the start of its body.
pub fn classify_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    wall_now: SystemTime,
) -> Classification {
    let body = body.map(|b| &b[..b.len().min(MAX_ERROR_BODY)]);
    let error = body.map(ErrorBody::parse).unwrap_or_default();
    let outcome = match status.as_u16() {
        200..=299 => Outcome::Success,
        429 => Outcome::Throttled(throttle_cause(headers, &error)),
        403 if error.mentions("temporarily blocked") => Outcome::Blocked,
        408 => Outcome::Transient(TransientKind::RequestTimeout),
        409 => Outcome::Transient(TransientKind::Conflict),
        503 => Outcome::Transient(TransientKind::Overloaded),
        500..=599 => Outcome::Transient(TransientKind::ServerError),
        400 if error.is_content_filter() => Outcome::Fatal(FatalKind::ContentFilter),
        400..=499 => Outcome::Fatal(FatalKind::Client),
        _ => Outcome::Fatal(FatalKind::Unexpected),
    };
    let default_retryable = matches!(outcome, Outcome::Throttled(_) | Outcome::Transient(_));
    let retryable = if outcome == Outcome::Success {
        false
    } else {
        should_retry_header(headers).unwrap_or(default_retryable)
    };
    let hint = if outcome == Outcome::Success {
        None
    } else {
        hints::delay_hint(headers, wall_now).or_else(|| {
            error.retry_after_seconds().map(|delay| DelayHint {
                delay,
                source: HintSource::BodyMessage,
            })
        })
    };
    Classification {
        outcome,
        retryable,
        hint,
    }
}

/// Classifies a transport error (no response).
pub fn classify_error(error: TransportError) -> Classification {
    let kind = match error {
        TransportError::Connect => TransientKind::Connect,
        TransportError::Timeout => TransientKind::Timeout,
    };
    Classification {
        outcome: Outcome::Transient(kind),
        retryable: true,
        hint: None,
    }
}

fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(headers::SHOULD_RETRY)?.as_bytes();
    if value.eq_ignore_ascii_case(b"true") {
        Some(true)
    } else if value.eq_ignore_ascii_case(b"false") {
        Some(false)
    } else {
        None
    }
}

fn throttle_cause(headers: &HeaderMap, error: &ErrorBody) -> ThrottleCause {
    // Peak-load messages also say "consider switching to Provisioned Throughput": check capacity
    // before provisioned.
    if error.mentions("high demand") || error.mentions("peak load") {
        ThrottleCause::Capacity
    } else if headers.contains_key(headers::DEPLOYMENT_UTILIZATION)
        || error.mentions("provisioned deployment")
        || error.mentions("provisioned throughput deployment")
        || error.mentions("utilization")
    {
        ThrottleCause::Provisioned
    } else if error.mentions("rate limit")
        || error.mentions("quota")
        || headers
            .get(headers::POLICY_ID)
            .is_some_and(|v| v.as_bytes().starts_with(b"DeploymentRatelimit"))
    {
        ThrottleCause::Quota
    } else {
        ThrottleCause::Unknown
    }
}

/// The parts of an error body that matter: `error.code`, `error.message` (lower-cased), or the raw
/// text when the body is not the JSON Azure usually sends.
#[derive(Debug, Default)]
struct ErrorBody {
    code: String,
    text: String,
}

impl ErrorBody {
    fn parse(body: &[u8]) -> Self {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
            let error = value.get("error").unwrap_or(&value);
            let code = error
                .get("code")
                .map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            let inner = error
                .get("innererror")
                .and_then(|e| e.get("code"))
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            let message = error
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or_default();
            return Self {
                code: format!("{code} {inner}").to_ascii_lowercase(),
                text: message.to_ascii_lowercase(),
            };
        }
        Self {
            code: String::new(),
            text: String::from_utf8_lossy(body).to_ascii_lowercase(),
        }
    }

    fn mentions(&self, needle: &str) -> bool {
        self.text.contains(needle)
    }

    fn is_content_filter(&self) -> bool {
        self.code.contains("content_filter")
            || self.code.contains("responsibleaipolicyviolation")
            || self.text.contains("content management policy")
    }

    /// "Please retry after 6 seconds." in the message.
    fn retry_after_seconds(&self) -> Option<std::time::Duration> {
        let at = self.text.find("retry after ")? + "retry after ".len();
        let rest = &self.text[at..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 || !rest[digits..].trim_start().starts_with("second") {
            return None;
        }
        hints::parse_reset(&rest.as_bytes()[..digits])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const QUOTA: &str = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#;
    const CALL_RATE: &str = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second."}}"#;
    const PEAK: &str = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load. Please retry after 20 seconds. For improved latency reliability, consider switching to Provisioned Throughput."}}"#;
    const BLOCKED: &str = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

    fn classify(status: u16, headers: &[(&'static str, &str)], body: &str) -> Classification {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        classify_response(
            StatusCode::from_u16(status).unwrap(),
            &map,
            Some(body.as_bytes()),
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn success_is_not_retried_and_has_no_hint() {
        let c = classify(200, &[("retry-after", "5"), ("x-should-retry", "true")], "");
        assert_eq!(c.outcome, Outcome::Success);
        assert!(!c.retryable);
        assert_eq!(c.hint, None);
    }

    #[test]
    fn throttle_causes_from_bodies() {
        assert_eq!(
            classify(429, &[], QUOTA).outcome,
            Outcome::Throttled(ThrottleCause::Quota)
        );
        assert_eq!(
            classify(429, &[], CALL_RATE).outcome,
            Outcome::Throttled(ThrottleCause::Quota)
        );
        assert_eq!(
            classify(429, &[], PEAK).outcome,
            Outcome::Throttled(ThrottleCause::Capacity)
        );
        assert_eq!(
            classify(
                429,
                &[("azure-openai-deployment-utilization", "101%")],
                "{}"
            )
            .outcome,
            Outcome::Throttled(ThrottleCause::Provisioned)
        );
        assert_eq!(
            classify(429, &[("policy-id", "DeploymentRatelimit-Token")], "").outcome,
            Outcome::Throttled(ThrottleCause::Quota)
        );
        assert_eq!(
            classify(429, &[], "not json").outcome,
            Outcome::Throttled(ThrottleCause::Unknown)
        );
    }

    #[test]
    fn body_retry_after_is_the_last_resort_hint() {
        let c = classify(429, &[], PEAK);
        assert_eq!(c.hint.unwrap().delay, Duration::from_secs(20));
        assert_eq!(c.hint.unwrap().source, HintSource::BodyMessage);
        let c = classify(429, &[("retry-after-ms", "250")], PEAK);
        assert_eq!(c.hint.unwrap().delay, Duration::from_millis(250));
    }

    #[test]
    fn blocked_is_not_retried_other_403_is_fatal() {
        let c = classify(403, &[], BLOCKED);
        assert_eq!(c.outcome, Outcome::Blocked);
        assert!(!c.retryable);
        let c = classify(
            403,
            &[],
            r#"{"error":{"code":"403","message":"Access denied"}}"#,
        );
        assert_eq!(c.outcome, Outcome::Fatal(FatalKind::Client));
    }

    #[test]
    fn transient_statuses() {
        for (status, kind) in [
            (408, TransientKind::RequestTimeout),
            (409, TransientKind::Conflict),
            (500, TransientKind::ServerError),
            (502, TransientKind::ServerError),
            (503, TransientKind::Overloaded),
        ] {
            let c = classify(status, &[], "");
            assert_eq!(c.outcome, Outcome::Transient(kind));
            assert!(c.retryable);
        }
        assert!(Outcome::Transient(TransientKind::Overloaded).is_throttle());
        assert!(!Outcome::Transient(TransientKind::ServerError).is_throttle());
    }

    #[test]
    fn content_filter_is_fatal() {
        let body = r#"{"error":{"code":"content_filter","message":"The response was filtered"}}"#;
        let c = classify(400, &[], body);
        assert_eq!(c.outcome, Outcome::Fatal(FatalKind::ContentFilter));
        assert!(!c.retryable);
    }

    #[test]
    fn x_should_retry_overrides() {
        assert!(!classify(429, &[("x-should-retry", "false")], QUOTA).retryable);
        assert!(classify(400, &[("x-should-retry", "true")], "").retryable);
        assert!(classify(500, &[("x-should-retry", "maybe")], "").retryable);
    }

    #[test]
    fn an_error_body_is_waited_for_at_most_ten_seconds_and_never_past_the_deadline() {
        assert_eq!(error_body_wait(None), MAX_ERROR_BODY_WAIT);
        assert_eq!(
            error_body_wait(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            error_body_wait(Some(Duration::from_secs(60))),
            MAX_ERROR_BODY_WAIT
        );
        assert_eq!(error_body_wait(Some(Duration::ZERO)), Duration::ZERO);
    }

    #[test]
    fn transport_errors_are_transient() {
        assert_eq!(
            classify_error(TransportError::Connect).outcome,
            Outcome::Transient(TransientKind::Connect)
        );
        assert!(classify_error(TransportError::Timeout).retryable);
    }
}
