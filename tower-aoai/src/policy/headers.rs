//! The header names the core reads, as constants.
//!
//! Looking a header up by a `&str` parses and hashes the name on every call (hundreds of
//! instructions); a constant [`HeaderName`] skips the parse. These are read on every response.

use http::HeaderName;

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
