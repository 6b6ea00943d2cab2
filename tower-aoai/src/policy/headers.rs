//! The header names the core reads, as constants.
//!
//! Looking a header up by a `&str` parses and hashes the name on every call (hundreds of
//! instructions); a constant [`HeaderName`] skips the parse. These are read on every response.
//!
//! A response header the core reads must be in [`READ`]: a caller that builds the
//! [`HeaderMap`] itself (the Python binding) passes a response other than a 403 with only those.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `retry-after-ms`: milliseconds to wait (Azure, OpenAI).
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `retry-after`: seconds or an HTTP date.
pub const RETRY_AFTER: HeaderName = http::header::RETRY_AFTER;
/// `x-ratelimit-reset-requests`.
pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-reset-tokens`.
pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
/// `x-rate-limit-reset-tokens`, the hyphenated spelling seen on Azure.
pub const RESET_TOKENS_AZURE: HeaderName = HeaderName::from_static("x-rate-limit-reset-tokens");
/// `x-ratelimit-remaining-requests`.
pub const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-remaining-tokens`.
pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-limit-requests`.
pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-limit-tokens`.
pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-should-retry: true|false`, the server's (or our give-up's) word on retrying.
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `policy-id` (`DeploymentRatelimit-Token` on a quota 429).
pub const POLICY_ID: HeaderName = HeaderName::from_static("policy-id");
/// `azure-openai-deployment-utilization` (provisioned deployments).
pub const DEPLOYMENT_UTILIZATION: HeaderName =
    HeaderName::from_static("azure-openai-deployment-utilization");
/// `x-ms-region`: the region that answered.
pub const MS_REGION: HeaderName = HeaderName::from_static("x-ms-region");
/// `apim-request-id`: the id to quote to support.
pub const APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
/// `x-request-id`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `api-key`: Azure's key header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Every header the core reads from a response: its classification (`x-should-retry`,
/// `policy-id`, `azure-openai-deployment-utilization`), the delay hints, the rate-limit headers,
/// the region and the request ids. A blocked 403's support record keeps every header but
/// secrets, so a caller that builds the [`HeaderMap`] from another representation (the Python
/// binding converts each name and value) needs only these for any status but those of
/// [`needs_all_headers`](super::classify::needs_all_headers), and skips the rest ([`is_read`]):
/// an Azure answer carries a dozen more.
pub const READ: [HeaderName; 15] = [
    RETRY_AFTER_MS,
    RETRY_AFTER,
    RESET_REQUESTS,
    RESET_TOKENS,
    RESET_TOKENS_AZURE,
    REMAINING_REQUESTS,
    REMAINING_TOKENS,
    LIMIT_REQUESTS,
    LIMIT_TOKENS,
    SHOULD_RETRY,
    POLICY_ID,
    DEPLOYMENT_UTILIZATION,
    MS_REGION,
    APIM_REQUEST_ID,
    REQUEST_ID,
];

/// Whether `name`, in any case, is one of [`READ`]. No allocation and no parse: a name longer
/// than the longest of them is rejected by its length.
pub fn is_read(name: &[u8]) -> bool {
    let mut buf = [0u8; 40];
    let Some(lower) = buf.get_mut(..name.len()) else {
        return false;
    };
    for (to, from) in lower.iter_mut().zip(name) {
        *to = from.to_ascii_lowercase();
    }
    // Literal names; a test checks them against `READ`.
    matches!(
        &*lower,
        b"retry-after-ms"
            | b"retry-after"
            | b"x-ratelimit-reset-requests"
            | b"x-ratelimit-reset-tokens"
            | b"x-rate-limit-reset-tokens"
            | b"x-ratelimit-remaining-requests"
            | b"x-ratelimit-remaining-tokens"
            | b"x-ratelimit-limit-requests"
            | b"x-ratelimit-limit-tokens"
            | b"x-should-retry"
            | b"policy-id"
            | b"azure-openai-deployment-utilization"
            | b"x-ms-region"
            | b"apim-request-id"
            | b"x-request-id"
    )
}

/// The rate-limit headers of a response and the region that answered (the first value of each),
/// found in one pass over its headers: cheaper than a hashed lookup per name, and every response
/// is read this way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitHeaders<'a> {
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<&'a HeaderValue>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<&'a HeaderValue>,
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<&'a HeaderValue>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<&'a HeaderValue>,
    /// `x-ratelimit-reset-requests`.
    pub reset_requests: Option<&'a HeaderValue>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<&'a HeaderValue>,
    /// `x-rate-limit-reset-tokens`, Azure's spelling.
    pub reset_tokens_azure: Option<&'a HeaderValue>,
    /// `x-ms-region`.
    pub region: Option<&'a HeaderValue>,
}

impl<'a> RateLimitHeaders<'a> {
    /// Finds the rate-limit and region headers among `headers`.
    pub fn find(headers: &'a HeaderMap) -> Self {
        let mut found = Self::default();
        for (name, value) in headers {
            // Literal names, matched on their length first; a test checks them against the
            // constants above.
            let slot = match name.as_str() {
                "x-ratelimit-remaining-requests" => &mut found.remaining_requests,
                "x-ratelimit-remaining-tokens" => &mut found.remaining_tokens,
                "x-ratelimit-limit-requests" => &mut found.limit_requests,
                "x-ratelimit-limit-tokens" => &mut found.limit_tokens,
                "x-ratelimit-reset-requests" => &mut found.reset_requests,
                "x-ratelimit-reset-tokens" => &mut found.reset_tokens,
                "x-rate-limit-reset-tokens" => &mut found.reset_tokens_azure,
                "x-ms-region" => &mut found.region,
                _ => continue,
            };
            // A name given twice counts once, with its first value (as `HeaderMap::get`).
            slot.get_or_insert(value);
        }
        found
    }
}

/// A `x-ratelimit-*` count above this is garbage (no deployment has a trillion TPM).
pub const MAX_RATE_LIMIT_COUNT: u64 = 1_000_000_000_000;

/// A rate-limit count (a limit, or what remains of it): plain ASCII digits, at most 16 of them,
/// at most [`MAX_RATE_LIMIT_COUNT`]. Anything else (a sign, a space, a fraction, garbage) is no
/// count. The one rule the pacer and the stats read these headers by.
pub fn rate_limit_count(value: Option<&HeaderValue>) -> Option<u64> {
    let value = value?.as_bytes();
    if value.is_empty() || value.len() > 16 {
        return None;
    }
    // Read by hand: every response has a few of these, and `str::parse` checks UTF-8 and signs
    // first. Sixteen digits stay far below `u64::MAX`.
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    (n <= MAX_RATE_LIMIT_COUNT).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_finds_what_a_lookup_per_name_finds() {
        let names = [
            REMAINING_REQUESTS,
            REMAINING_TOKENS,
            LIMIT_REQUESTS,
            LIMIT_TOKENS,
            RESET_REQUESTS,
            RESET_TOKENS,
            RESET_TOKENS_AZURE,
            MS_REGION,
        ];
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-ratelimit-other", HeaderValue::from_static("1"));
        for (i, name) in names.iter().enumerate() {
            h.insert(name, HeaderValue::from(i));
            h.append(name, HeaderValue::from_static("later"));
        }
        let found = RateLimitHeaders::find(&h);
        let got = [
            found.remaining_requests,
            found.remaining_tokens,
            found.limit_requests,
            found.limit_tokens,
            found.reset_requests,
            found.reset_tokens,
            found.reset_tokens_azure,
            found.region,
        ];
        for (name, value) in names.iter().zip(got) {
            // Each name found (its literal is the constant's), with its first value.
            assert_eq!(value, h.get(name), "{name}");
            assert!(value.is_some_and(|v| v != "later"), "{name}");
        }
        assert_eq!(
            RateLimitHeaders::find(&HeaderMap::new()),
            RateLimitHeaders::default()
        );
    }

    #[test]
    fn is_read_knows_every_name_of_read_and_no_other() {
        for name in &READ {
            assert!(is_read(name.as_str().as_bytes()), "{name}");
            assert!(
                is_read(name.as_str().to_ascii_uppercase().as_bytes()),
                "{name}"
            );
            // One byte short or long is another name.
            let s = name.as_str();
            assert!(!is_read(&s.as_bytes()[..s.len() - 1]), "{name}");
            assert!(!is_read(format!("{s}x").as_bytes()), "{name}");
        }
        for other in [
            &b"content-type"[..],
            b"date",
            b"api-key",
            b"x-ratelimit-other",
            b"",
            &[b'x'; 300],
            b"x-ms-region\0",
            b"RETRY-AFTER-MS ",
        ] {
            assert!(!is_read(other), "{other:?}");
        }
    }

    #[test]
    fn a_count_is_plain_digits_within_bounds() {
        let count = |v: &'static str| rate_limit_count(Some(&HeaderValue::from_static(v)));
        assert_eq!(count("0"), Some(0));
        assert_eq!(count("99000"), Some(99_000));
        assert_eq!(count("1000000000000"), Some(MAX_RATE_LIMIT_COUNT));
        assert_eq!(count("0000000000000042"), Some(42));
        for bad in [
            "",
            "-5",
            "+5",
            " 5",
            "5.0",
            "1e6",
            "1000000000001",
            "99999999999999999",
            "12a",
        ] {
            assert_eq!(count(bad), None, "{bad:?}");
        }
        assert_eq!(rate_limit_count(None), None);
    }
}
