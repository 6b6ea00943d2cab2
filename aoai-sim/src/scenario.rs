//! Scenario files: resources, deployments, regions, a timeline of events and a workload.
//!
//! A scenario is a TOML file (see `aoai-sim/scenarios/README.md` for every field). Parsing is
//! strict: an unknown field, a wrong type or a missing field is an error that names the line and
//! the field; so is a semantically wrong value (an event naming an unknown region, a provisioned
//! deployment spilling to a deployment that does not exist, ...).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use tower_aoai::policy::TokenEstimator;

/// A parsed and validated scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of every random choice the model makes (latency jitter, header variance, ids).
    #[serde(default)]
    pub seed: u64,
    /// A short name, for reports.
    #[serde(default)]
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The token estimate the service applies to each request.
    #[serde(default)]
    pub tokens: TokenSettings,
    /// What a successful answer looks like.
    #[serde(default)]
    pub response: ResponseSettings,
    /// Which delay headers a 429 carries (a deployment may override it).
    #[serde(default)]
    pub throttle_headers: ThrottleHeaders,
    /// Azure regions: latency and regional capacity.
    pub regions: Vec<Region>,
    /// Azure OpenAI resources (an endpoint and key each) and their deployments.
    pub resources: Vec<Resource>,
    /// Things that happen at given times: high demand, outages, slowness.
    #[serde(default)]
    pub events: Vec<Event>,
    /// The traffic to run against the scenario (virtual-time driver and benchmarks).
    #[serde(default)]
    pub workload: Option<Workload>,
}

/// Token estimate settings (passed to [`TokenEstimator::new`]).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// Prompt characters per token.
    #[serde(default = "default_chars_per_token")]
    pub chars_per_token: f64,
    /// Share of the prompt estimate that is charged (Microsoft's simulator found `max_tokens`
    /// dominates; uncertain, hence a setting).
    #[serde(default = "one")]
    pub prompt_share: f64,
    /// Completion budget charged when a request sets no `max_tokens`.
    #[serde(default = "default_completion_tokens")]
    pub default_completion_tokens: u64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            chars_per_token: default_chars_per_token(),
            prompt_share: 1.0,
            default_completion_tokens: default_completion_tokens(),
        }
    }
}

impl TokenSettings {
    /// The estimator these settings describe.
    pub fn estimator(&self) -> Result<TokenEstimator, ScenarioError> {
        TokenEstimator::new(
            self.chars_per_token,
            self.prompt_share,
            self.default_completion_tokens,
        )
        .map_err(|e| ScenarioError::semantic(e.field().to_string(), e.reason().to_string()))
    }
}

/// What a successful answer looks like.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResponseSettings {
    /// Tokens generated per answer (capped by the request's `max_tokens`).
    #[serde(default = "default_output_tokens")]
    pub output_tokens: u64,
}

impl Default for ResponseSettings {
    fn default() -> Self {
        Self {
            output_tokens: default_output_tokens(),
        }
    }
}

/// Which delay headers a 429 carries: one style is drawn per 429 with the seeded RNG, with these
/// weights. All-zero weights mean "none".
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThrottleHeaders {
    /// Weight of `retry-after-ms` plus `retry-after` (Azure's usual pair).
    #[serde(default = "one")]
    pub both: f64,
    /// Weight of `retry-after-ms` alone.
    #[serde(default)]
    pub retry_after_ms: f64,
    /// Weight of `retry-after` (whole seconds) alone.
    #[serde(default)]
    pub retry_after: f64,
    /// Weight of `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (durations like
    /// `6000ms`, in real time: divided by the server's time scale).
    #[serde(default)]
    pub reset: f64,
    /// Weight of no delay header at all.
    #[serde(default)]
    pub none: f64,
    /// Whether 429s also carry `x-ratelimit-limit-*` and `x-ratelimit-remaining-*`.
    #[serde(default = "yes")]
    pub limits: bool,
}

impl Default for ThrottleHeaders {
    fn default() -> Self {
        Self {
            both: 1.0,
            retry_after_ms: 0.0,
            retry_after: 0.0,
            reset: 0.0,
            none: 0.0,
            limits: true,
        }
    }
}

/// An Azure region.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Identifier used by resources and events (e.g. `eastus2`).
    pub name: String,
    /// What `x-ms-region` says (default: `name`).
    #[serde(default)]
    pub display_name: Option<String>,
    /// Latency of answers served in this region.
    #[serde(default)]
    pub latency: Latency,
    /// Regional capacity ("high demand") throttling.
    #[serde(default)]
    pub capacity: Capacity,
}

/// Latency model: time to first token plus time per output token, each multiplied by a lognormal
/// factor of the given spread.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Median time to first token, in milliseconds.
    #[serde(default = "default_first_token_ms")]
    pub first_token_ms: f64,
    /// Median time per output token, in milliseconds.
    #[serde(default = "default_per_token_ms")]
    pub per_token_ms: f64,
    /// Sigma of the lognormal multiplier (0: no variance).
    #[serde(default)]
    pub jitter: f64,
    /// Time to answer an error (429, 403, 401, ...), in milliseconds.
    #[serde(default = "default_error_ms")]
    pub error_ms: f64,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            first_token_ms: default_first_token_ms(),
            per_token_ms: default_per_token_ms(),
            jitter: 0.0,
            error_ms: default_error_ms(),
        }
    }
}

impl Latency {
    /// No latency at all (for throughput measurements).
    pub const ZERO: Latency = Latency {
        first_token_ms: 0.0,
        per_token_ms: 0.0,
        jitter: 0.0,
        error_ms: 0.0,
    };
}

/// Regional capacity throttling, independent of any deployment's quota: while active, a request
/// is refused with the peak-load 429 when the region's concurrent load or its arrivals in the
/// last second reach the limits, or by chance with `reject_share`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Active for the whole run (otherwise only during `high_demand` events).
    #[serde(default)]
    pub always: bool,
    /// Requests in flight in the region (all resources) at which new ones are refused.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Requests arriving in the region within one second at which new ones are refused.
    #[serde(default = "default_max_per_second")]
    pub max_per_second: u32,
    /// Share of the remaining requests refused at random while active.
    #[serde(default)]
    pub reject_share: f64,
    /// The delay the peak-load 429 asks for, in seconds.
    #[serde(default = "default_capacity_retry_s")]
    pub retry_after_s: f64,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            always: false,
            max_concurrent: default_max_concurrent(),
            max_per_second: default_max_per_second(),
            reject_share: 0.0,
            retry_after_s: default_capacity_retry_s(),
        }
    }
}

/// An Azure OpenAI resource: one endpoint, one key, in one region. Its `Debug` output does not
/// show the key.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Resource name; also its URL prefix on the HTTP server (`/r/<name>`).
    pub name: String,
    /// The region (a `regions[].name`).
    pub region: String,
    /// The key accepted in `api-key` or `Authorization: Bearer`.
    pub api_key: String,
    /// The 403 abuse block (idle-then-burst detector); absent means never.
    #[serde(default)]
    pub abuse: Option<Abuse>,
    /// The resource's deployments.
    pub deployments: Vec<Deployment>,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("api_key", &"<redacted>")
            .field("abuse", &self.abuse)
            .field("deployments", &self.deployments)
            .finish()
    }
}

/// The idle-then-burst detector: after `idle_s` without a request, more than `burst_requests`
/// requests within `burst_window_s` block the whole resource (403) for `block_s`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Abuse {
    /// Seconds without traffic after which the resource counts as idle.
    pub idle_s: f64,
    /// Requests tolerated in the first `burst_window_s` after idle.
    pub burst_requests: u32,
    /// The window after idle in which a burst is counted, in seconds.
    pub burst_window_s: f64,
    /// How long the block lasts, in seconds.
    pub block_s: f64,
    /// Whether the start of the run counts as idle (a client that just started).
    #[serde(default = "yes")]
    pub idle_at_start: bool,
}

/// Standard (pay-as-you-go quota) or provisioned (PTU).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// TPM/RPM quota, regional capacity throttling applies.
    #[default]
    Standard,
    /// Leaky bucket on estimated tokens; fast 429 with `retry-after-ms` above 100 % utilisation.
    Provisioned,
}

/// A model deployment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Deployment name (the URL segment, or `model` in the body for v1 and responses).
    pub name: String,
    /// The model it serves (default: `name`).
    #[serde(default)]
    pub model: Option<String>,
    /// Standard or provisioned.
    #[serde(default)]
    pub kind: DeploymentKind,
    /// Tokens per minute: the quota (standard) or the leaky bucket's drain rate (provisioned).
    pub tpm: u64,
    /// Requests per minute (standard). Exclusive with `rpm_per_1000_tpm`.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Requests per minute per 1,000 TPM (6 for older chat models, o1: 1/6, o3-mini: 0.1).
    #[serde(default)]
    pub rpm_per_1000_tpm: Option<f64>,
    /// The windows, in seconds, over which the request rate is checked; each admits
    /// `rpm * window / 60` requests (at least 1).
    #[serde(default = "default_rpm_windows")]
    pub rpm_windows_s: Vec<u32>,
    /// Provisioned: the standard deployment (same resource) a PTU 429 spills over to.
    #[serde(default)]
    pub spillover_to: Option<String>,
    /// Provisioned: the 429 message (the real text is uncertain).
    #[serde(default = "default_ptu_message")]
    pub ptu_message: String,
    /// Provisioned: whether answers carry `azure-openai-deployment-utilization`.
    #[serde(default = "yes")]
    pub utilization_header: bool,
    /// Override of the scenario's `throttle_headers` for this deployment.
    #[serde(default)]
    pub throttle_headers: Option<ThrottleHeaders>,
    /// What `x-ratelimit-limit-requests` / `-remaining-requests` count (uncertain on Azure).
    #[serde(default)]
    pub requests_header: RequestsHeader,
    /// This model's completion budget when a request sets no `max_tokens` (default: the
    /// scenario's `tokens.default_completion_tokens`).
    #[serde(default)]
    pub default_completion_tokens: Option<u64>,
    /// Provisioned with spillover: how the answer names the deployment it spilled from.
    #[serde(default)]
    pub spillover_header: SpilloverHeader,
    /// A request whose estimate exceeds this is refused with 400 `context_length_exceeded`.
    #[serde(default = "default_max_request_tokens")]
    pub max_request_tokens: u64,
}

/// How a spilled-over answer names the provisioned deployment it came from (spellings vary).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SpilloverHeader {
    /// `x-ms-spillover-from-deployment: <ptu>`.
    Generic,
    /// `x-ms-spillover-from-<ptu>: true`.
    Named,
    /// Both.
    #[default]
    Both,
}

/// What the request rate-limit headers count.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RequestsHeader {
    /// The tightest short window (e.g. 10 per 10 s for 60 RPM).
    #[default]
    Window,
    /// The per-minute quota, and what is left of it over the last minute.
    Minute,
}

impl Deployment {
    /// The model name (defaults to the deployment name).
    pub fn model_name(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }

    /// Requests per minute, from `rpm` or `rpm_per_1000_tpm` (`None`: unlimited).
    pub fn requests_per_minute(&self) -> Option<f64> {
        match (self.rpm, self.rpm_per_1000_tpm) {
            (Some(rpm), _) => Some(rpm as f64),
            (None, Some(ratio)) => Some(ratio * self.tpm as f64 / 1000.0),
            (None, None) => None,
        }
    }
}

/// What an event does.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Regional capacity throttling is active (region events only).
    HighDemand,
    /// The region or resource fails; see `mode`.
    Outage,
    /// Latency is multiplied by `factor`.
    Slow,
}

/// How an outage fails.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutageMode {
    /// Connections are refused (closed at once, no response).
    #[default]
    Refuse,
    /// Answers start, then the connection is reset mid-stream.
    Reset,
    /// Answers are an HTTP error (`status`, 500 or 503).
    Status,
}

/// Something that happens from `start_s` to `end_s` (virtual seconds since the start).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// What happens.
    pub kind: EventKind,
    /// Start, in seconds.
    pub start_s: f64,
    /// End, in seconds (exclusive).
    pub end_s: f64,
    /// The region affected (exclusive with `resource`).
    #[serde(default)]
    pub region: Option<String>,
    /// The resource affected (exclusive with `region`; not for `high_demand`).
    #[serde(default)]
    pub resource: Option<String>,
    /// Only this deployment of `resource` (outage and slow events). A provisioned deployment
    /// with spillover spills over while it answers 500 or 503.
    #[serde(default)]
    pub deployment: Option<String>,
    /// Outage: how it fails.
    #[serde(default)]
    pub mode: OutageMode,
    /// Outage with `mode = "status"`: the status answered.
    #[serde(default = "default_outage_status")]
    pub status: u16,
    /// Slow: the latency multiplier.
    #[serde(default = "one")]
    pub factor: f64,
    /// High demand: override of the region's `capacity.max_concurrent`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// High demand: override of the region's `capacity.max_per_second`.
    #[serde(default)]
    pub max_per_second: Option<u32>,
    /// High demand: override of the region's `capacity.reject_share`.
    #[serde(default)]
    pub reject_share: Option<f64>,
}

/// The traffic a client generates.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// How long calls keep arriving, in seconds.
    pub duration_s: f64,
    /// Where clients may send, as `"resource/deployment"`, most preferred first.
    pub targets: Vec<String>,
    /// The shape of each request.
    #[serde(default)]
    pub request: RequestShape,
    /// Arrival patterns (superimposed).
    pub arrivals: Vec<Arrival>,
}

/// The shape of the requests of a workload.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestShape {
    /// Characters of prompt.
    #[serde(default = "default_prompt_chars")]
    pub prompt_chars: u64,
    /// `max_tokens` of each request (0: none set).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Share of requests made with `stream: true`.
    #[serde(default)]
    pub stream_share: f64,
}

impl Default for RequestShape {
    fn default() -> Self {
        Self {
            prompt_chars: default_prompt_chars(),
            max_tokens: default_max_tokens(),
            stream_share: 0.0,
        }
    }
}

/// How calls arrive.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArrivalKind {
    /// Evenly spaced at `rate_per_s`.
    Steady,
    /// Poisson at `rate_per_s` (seeded).
    Poisson,
    /// `size` calls every `every_s`, spread evenly over `spread_ms`; the first at `start_s`.
    Bursts,
}

/// One arrival pattern, active from `start_s` to `end_s`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    /// The pattern.
    pub kind: ArrivalKind,
    /// Start, in seconds.
    #[serde(default)]
    pub start_s: f64,
    /// End, in seconds (default: the workload's `duration_s`).
    #[serde(default)]
    pub end_s: Option<f64>,
    /// Steady / Poisson: calls per second.
    #[serde(default)]
    pub rate_per_s: Option<f64>,
    /// Bursts: period, in seconds (default: a single burst).
    #[serde(default)]
    pub every_s: Option<f64>,
    /// Bursts: calls per burst.
    #[serde(default)]
    pub size: Option<u32>,
    /// Bursts: over how long the calls of a burst are spread, in milliseconds.
    #[serde(default)]
    pub spread_ms: f64,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_chars_per_token() -> f64 {
    4.0
}
fn default_completion_tokens() -> u64 {
    1024
}
fn default_output_tokens() -> u64 {
    50
}
fn default_first_token_ms() -> f64 {
    300.0
}
fn default_per_token_ms() -> f64 {
    10.0
}
fn default_error_ms() -> f64 {
    20.0
}
fn default_max_concurrent() -> u32 {
    u32::MAX
}
fn default_max_per_second() -> u32 {
    u32::MAX
}
fn default_capacity_retry_s() -> f64 {
    20.0
}
fn default_rpm_windows() -> Vec<u32> {
    vec![10]
}
fn default_ptu_message() -> String {
    "Requests to this provisioned deployment have exceeded its provisioned throughput: utilization is above 100%. Please retry after the time in the retry-after-ms header.".to_string()
}
fn default_max_request_tokens() -> u64 {
    1_000_000
}
fn default_outage_status() -> u16 {
    503
}
fn default_prompt_chars() -> u64 {
    2000
}
fn default_max_tokens() -> u64 {
    200
}

/// A scenario that could not be read: the field at fault, the line when known, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// 1-based line of the fault in the file, when known.
    pub line: Option<usize>,
    /// The field at fault, as a dotted path (`resources[0].deployments[1].tpm`, or for parse
    /// errors the table and key: `resources.deployments.tpm`).
    pub field: String,
    /// Why it was rejected.
    pub message: String,
}

impl ScenarioError {
    fn semantic(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            line: None,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: field `{}`: {}", self.field, self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ScenarioError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            line: None,
            field: "<file>".to_string(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates a scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks what the types cannot: references, ranges, exclusive fields.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        fn err(field: impl Into<String>, message: impl Into<String>) -> ScenarioError {
            ScenarioError::semantic(field, message)
        }
        self.tokens.estimator()?;
        if self.response.output_tokens > 100_000 {
            return Err(err(
                "response.output_tokens",
                format!(
                    "must be at most 100000, got {}",
                    self.response.output_tokens
                ),
            ));
        }
        check_weights(&self.throttle_headers, "throttle_headers")?;
        if self.regions.is_empty() {
            return Err(err("regions", "at least one region is required"));
        }
        if self.resources.is_empty() {
            return Err(err("resources", "at least one resource is required"));
        }
        let mut regions = HashSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            if !regions.insert(r.name.as_str()) {
                return Err(err(
                    format!("regions[{i}].name"),
                    format!("duplicate region `{}`", r.name),
                ));
            }
            let l = &r.latency;
            if !(0.0..=3.0).contains(&l.jitter) {
                return Err(err(
                    format!("regions[{i}].latency.jitter"),
                    format!("must be between 0 and 3, got {}", l.jitter),
                ));
            }
            for (name, v) in [
                ("first_token_ms", l.first_token_ms),
                ("per_token_ms", l.per_token_ms),
                ("error_ms", l.error_ms),
            ] {
                if !(v.is_finite() && (0.0..=3_600_000.0).contains(&v)) {
                    return Err(err(
                        format!("regions[{i}].latency.{name}"),
                        format!("must be a number between 0 and 3600000, got {v}"),
                    ));
                }
            }
            check_share(
                r.capacity.reject_share,
                &format!("regions[{i}].capacity.reject_share"),
            )?;
            check_seconds(
                r.capacity.retry_after_s,
                &format!("regions[{i}].capacity.retry_after_s"),
            )?;
        }
        let mut resources = HashSet::new();
        for (i, res) in self.resources.iter().enumerate() {
            if res.name.is_empty()
                || !res
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(
                    format!("resources[{i}].name"),
                    "must be non-empty and use only letters, digits, `-` and `_`",
                ));
            }
            if !resources.insert(res.name.as_str()) {
                return Err(err(
                    format!("resources[{i}].name"),
                    format!("duplicate resource `{}`", res.name),
                ));
            }
            if !regions.contains(res.region.as_str()) {
                return Err(err(
                    format!("resources[{i}].region"),
                    format!("unknown region `{}`", res.region),
                ));
            }
            if res.api_key.is_empty() {
                return Err(err(format!("resources[{i}].api_key"), "must not be empty"));
            }
            if let Some(a) = &res.abuse {
                check_seconds(a.idle_s, &format!("resources[{i}].abuse.idle_s"))?;
                check_seconds(
                    a.burst_window_s,
                    &format!("resources[{i}].abuse.burst_window_s"),
                )?;
                check_seconds(a.block_s, &format!("resources[{i}].abuse.block_s"))?;
            }
            if res.deployments.is_empty() {
                return Err(err(
                    format!("resources[{i}].deployments"),
                    "at least one deployment is required",
                ));
            }
            let names: Vec<&str> = res.deployments.iter().map(|d| d.name.as_str()).collect();
            for (j, d) in res.deployments.iter().enumerate() {
                let at = format!("resources[{i}].deployments[{j}]");
                if d.name.is_empty() || d.name.contains('/') {
                    return Err(err(format!("{at}.name"), "must be non-empty without `/`"));
                }
                if names[..j].contains(&d.name.as_str()) {
                    return Err(err(
                        format!("{at}.name"),
                        format!("duplicate deployment `{}`", d.name),
                    ));
                }
                if d.tpm == 0 {
                    return Err(err(format!("{at}.tpm"), "must be greater than zero"));
                }
                if d.rpm.is_some() && d.rpm_per_1000_tpm.is_some() {
                    return Err(err(
                        format!("{at}.rpm_per_1000_tpm"),
                        "set either `rpm` or `rpm_per_1000_tpm`, not both",
                    ));
                }
                if let Some(r) = d.rpm_per_1000_tpm
                    && !(r.is_finite() && r > 0.0)
                {
                    return Err(err(
                        format!("{at}.rpm_per_1000_tpm"),
                        format!("must be a positive number, got {r}"),
                    ));
                }
                if d.rpm == Some(0) {
                    return Err(err(format!("{at}.rpm"), "must be greater than zero"));
                }
                if d.rpm_windows_s.iter().any(|w| *w == 0 || *w > 60) {
                    return Err(err(
                        format!("{at}.rpm_windows_s"),
                        "each window must be between 1 and 60 seconds",
                    ));
                }
                if let Some(h) = &d.throttle_headers {
                    check_weights(h, &format!("{at}.throttle_headers"))?;
                }
                if let Some(target) = &d.spillover_to {
                    if d.kind != DeploymentKind::Provisioned {
                        return Err(err(
                            format!("{at}.spillover_to"),
                            "only a provisioned deployment spills over",
                        ));
                    }
                    match res.deployments.iter().find(|o| &o.name == target) {
                        Some(o) if o.kind == DeploymentKind::Standard => {}
                        Some(_) => {
                            return Err(err(
                                format!("{at}.spillover_to"),
                                format!("`{target}` is not a standard deployment"),
                            ));
                        }
                        None => {
                            return Err(err(
                                format!("{at}.spillover_to"),
                                format!("unknown deployment `{target}` in resource `{}`", res.name),
                            ));
                        }
                    }
                }
            }
        }
        for (i, e) in self.events.iter().enumerate() {
            let at = format!("events[{i}]");
            check_seconds(e.start_s, &format!("{at}.start_s"))?;
            check_seconds(e.end_s, &format!("{at}.end_s"))?;
            if e.end_s <= e.start_s {
                return Err(err(format!("{at}.end_s"), "must be after start_s"));
            }
            match (&e.region, &e.resource) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        format!("{at}.resource"),
                        "set either `region` or `resource`, not both",
                    ));
                }
                (None, None) => {
                    return Err(err(
                        format!("{at}.region"),
                        "an event needs a `region` or a `resource`",
                    ));
                }
                (Some(r), None) if !regions.contains(r.as_str()) => {
                    return Err(err(format!("{at}.region"), format!("unknown region `{r}`")));
                }
                (None, Some(r)) if !resources.contains(r.as_str()) => {
                    return Err(err(
                        format!("{at}.resource"),
                        format!("unknown resource `{r}`"),
                    ));
                }
                _ => {}
            }
            if let Some(d) = &e.deployment {
                let Some(res) = e
                    .resource
                    .as_ref()
                    .and_then(|n| self.resources.iter().find(|r| &r.name == n))
                else {
                    return Err(err(
                        format!("{at}.deployment"),
                        "a deployment event also needs its `resource`",
                    ));
                };
                if !res.deployments.iter().any(|x| &x.name == d) {
                    return Err(err(
                        format!("{at}.deployment"),
                        format!("unknown deployment `{d}` in resource `{}`", res.name),
                    ));
                }
            }
            if e.kind == EventKind::HighDemand && e.resource.is_some() {
                return Err(err(
                    format!("{at}.resource"),
                    "high demand is regional: use `region`",
                ));
            }
            if e.kind == EventKind::Outage
                && e.mode == OutageMode::Status
                && !(400..=599).contains(&e.status)
            {
                return Err(err(
                    format!("{at}.status"),
                    format!("must be an error status (400-599), got {}", e.status),
                ));
            }
            if !(e.factor.is_finite() && e.factor > 0.0 && e.factor <= 1000.0) {
                return Err(err(
                    format!("{at}.factor"),
                    format!("must be between 0 and 1000, got {}", e.factor),
                ));
            }
            if let Some(s) = e.reject_share {
                check_share(s, &format!("{at}.reject_share"))?;
            }
        }
        if let Some(w) = &self.workload {
            check_seconds(w.duration_s, "workload.duration_s")?;
            if w.targets.is_empty() {
                return Err(err("workload.targets", "at least one target is required"));
            }
            for (i, t) in w.targets.iter().enumerate() {
                if self.find_target(t).is_none() {
                    return Err(err(
                        format!("workload.targets[{i}]"),
                        format!("`{t}` is not a known \"resource/deployment\""),
                    ));
                }
            }
            check_share(w.request.stream_share, "workload.request.stream_share")?;
            if w.arrivals.is_empty() {
                return Err(err(
                    "workload.arrivals",
                    "at least one arrival pattern is required",
                ));
            }
            for (i, a) in w.arrivals.iter().enumerate() {
                let at = format!("workload.arrivals[{i}]");
                check_seconds(a.start_s, &format!("{at}.start_s"))?;
                if let Some(end) = a.end_s {
                    check_seconds(end, &format!("{at}.end_s"))?;
                }
                match a.kind {
                    ArrivalKind::Steady | ArrivalKind::Poisson => match a.rate_per_s {
                        Some(r) if r.is_finite() && r > 0.0 && r <= 1_000_000.0 => {}
                        _ => {
                            return Err(err(
                                format!("{at}.rate_per_s"),
                                "steady and poisson arrivals need a rate_per_s in (0, 1e6]",
                            ));
                        }
                    },
                    ArrivalKind::Bursts => {
                        if a.size.is_none_or(|s| s == 0) {
                            return Err(err(
                                format!("{at}.size"),
                                "bursts need a size of at least 1",
                            ));
                        }
                        if let Some(every) = a.every_s
                            && !(every.is_finite() && every > 0.0)
                        {
                            return Err(err(
                                format!("{at}.every_s"),
                                "must be a positive number of seconds",
                            ));
                        }
                    }
                }
                check_seconds(a.spread_ms, &format!("{at}.spread_ms"))?;
            }
        }
        Ok(())
    }

    /// Finds a `"resource/deployment"` target: (resource index, deployment index).
    pub fn find_target(&self, target: &str) -> Option<(usize, usize)> {
        let (res, dep) = target.split_once('/')?;
        let r = self.resources.iter().position(|r| r.name == res)?;
        let d = self.resources[r]
            .deployments
            .iter()
            .position(|d| d.name == dep)?;
        Some((r, d))
    }

    /// The region a resource lives in.
    pub fn region_of(&self, resource: &Resource) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == resource.region)
    }

    /// Every resource's key by name (for clients of the simulator; never logged).
    pub fn api_keys(&self) -> BTreeMap<String, String> {
        self.resources
            .iter()
            .map(|r| (r.name.clone(), r.api_key.clone()))
            .collect()
    }
}

fn check_weights(h: &ThrottleHeaders, at: &str) -> Result<(), ScenarioError> {
    for (name, v) in [
        ("both", h.both),
        ("retry_after_ms", h.retry_after_ms),
        ("retry_after", h.retry_after),
        ("reset", h.reset),
        ("none", h.none),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ScenarioError::semantic(
                format!("{at}.{name}"),
                format!("a weight must be a non-negative number, got {v}"),
            ));
        }
    }
    Ok(())
}

fn check_share(v: f64, at: &str) -> Result<(), ScenarioError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(ScenarioError::semantic(
            at,
            format!("must be between 0 and 1, got {v}"),
        ))
    }
}

fn check_seconds(v: f64, at: &str) -> Result<(), ScenarioError> {
    if v.is_finite() && (0.0..=1.0e7).contains(&v) {
        Ok(())
    } else {
        Err(ScenarioError::semantic(
            at,
            format!("must be a number between 0 and 1e7, got {v}"),
        ))
    }
}

/// Turns a TOML error into a [`ScenarioError`] with the line and the field (table + key).
fn parse_error(text: &str, e: &toml::de::Error) -> ScenarioError {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return ScenarioError {
            line: None,
            field: quoted_field(&message).unwrap_or_else(|| "<scenario>".to_string()),
            message,
        };
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_text = text[line_start..].lines().next().unwrap_or_default();
    let table = text[..line_start + line_text.len()]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let column = start - line_start;
    let mut path = key_path(line_text.get(..column).unwrap_or(line_text));
    if let Some(named) = quoted_field(&message)
        && path.last() != Some(&named)
    {
        path.push(named);
    }
    let field = table
        .into_iter()
        .chain(path)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    let field = if field.is_empty() {
        "<scenario>".to_string()
    } else {
        field
    };
    ScenarioError {
        line: Some(line),
        field,
        message,
    }
}

/// The keys leading to the position at the end of `prefix` (a line cut at the error), through
/// inline tables: `latency = { first_token_ms = ` gives `["latency", "first_token_ms"]`.
fn key_path(prefix: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut last: Option<String> = None;
    let mut word = String::new();
    let mut chars = prefix.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                // Skip a string value.
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                word.clear();
            }
            '=' => {
                last = Some(word.trim().trim_matches('"').to_string());
                word.clear();
            }
            '{' => {
                stack.push(last.take().unwrap_or_default());
                word.clear();
            }
            '}' => {
                stack.pop();
                last = None;
                word.clear();
            }
            ',' | '[' | ']' => {
                last = None;
                word.clear();
            }
            c => word.push(c),
        }
    }
    stack.extend(last);
    stack
}

/// The field named in serde's "unknown field `x`" / "missing field `x`" messages.
fn quoted_field(message: &str) -> Option<String> {
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(at) = message.find(prefix) {
            let rest = &message[at + prefix.len()..];
            return rest.find('`').map(|end| rest[..end].to_string());
        }
    }
    None
}
