//! The pure model of Azure OpenAI: no sockets, no sleeps, no clock.
//!
//! [`Model::handle`] takes the virtual time since the start of the run (`now`) and a
//! [`SimRequest`], and answers with a [`SimResponse`]: what the service would answer and when
//! (the [`Timing`] of the first byte, of each streamed chunk, and of the end), or that the
//! connection is refused or reset. Concurrent load is released at the end time computed at
//! admission, so `handle` calls must come with non-decreasing `now`.
//!
//! What is modelled, in the order a request meets it:
//! 1. outages (refuse, reset mid-stream, 500/503) of a region or resource, on the timeline;
//! 2. auth (`api-key` or bearer, against the resource's key): 401;
//! 3. the deployment (path, or `model` in the body): 404;
//! 4. the 403 abuse block of the whole resource (idle-then-burst detector, then blocked for a time);
//! 5. a deployment's own outage, then provisioned deployments: a leaky bucket on estimated
//!    tokens, 429 with `retry-after-ms` at 100 % utilisation, optional spillover to a standard
//!    deployment (on that 429, or on the deployment's 500/503);
//! 6. standard deployments: requests in 1 s / 10 s windows (call rate), estimated tokens in a
//!    one-minute window (token rate);
//! 7. regional capacity ("high demand"), from the region's concurrent load and burstiness.
//!
//! ```
//! use std::time::Duration;
//! use aoai_sim::{Model, Scenario, SimRequest};
//!
//! let scenario = Scenario::from_toml(r#"
//!     [[regions]]
//!     name = "eastus2"
//!     [[resources]]
//!     name = "east"
//!     region = "eastus2"
//!     api_key = "k"
//!     [[resources.deployments]]
//!     name = "gpt-4o"
//!     tpm = 1000
//!     rpm = 60
//!     rpm_windows_s = [1]
//! "#).unwrap();
//! let mut model = Model::new(&scenario).unwrap();
//! let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
//! let req = SimRequest::chat("east", "gpt-4o", "k", &body[..]);
//! let first = model.handle(Duration::ZERO, &req);
//! assert_eq!(first.status(), Some(200));
//! // 60 RPM checked over 1 s windows: the second request within the same second is throttled.
//! let second = model.handle(Duration::from_millis(10), &req);
//! assert_eq!(second.status(), Some(429));
//! ```

mod render;
mod texts;
mod window;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tower_aoai::policy::TokenEstimator;

use crate::scenario::{
    Abuse, Capacity, DeploymentKind, EventKind, Latency, OutageMode, RequestsHeader, Scenario,
    ScenarioError, SpilloverHeader, ThrottleHeaders,
};
use window::Window;

/// The API version quoted in messages when a request names none.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// `/chat/completions` (deployment path or v1).
    ChatCompletions,
    /// `/completions`.
    Completions,
    /// `/embeddings`.
    Embeddings,
    /// `/openai/responses` (model in the body).
    Responses,
}

/// A request as the model sees it. Its `Debug` output does not show the key.
#[derive(Clone, PartialEq)]
pub struct SimRequest {
    /// The resource addressed (its name in the scenario).
    pub resource: String,
    /// The deployment from the URL path; `None`: the body's `model` names it (v1, responses).
    pub deployment: Option<String>,
    /// The operation.
    pub operation: Operation,
    /// The `api-version` query parameter, if any.
    pub api_version: Option<String>,
    /// The key presented (`api-key` header or `Authorization: Bearer`).
    pub api_key: Option<String>,
    /// The `x-ms-spillover-deployment` request header, if any.
    pub spillover_deployment: Option<String>,
    /// The JSON body.
    pub body: Bytes,
}

impl std::fmt::Debug for SimRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRequest")
            .field("resource", &self.resource)
            .field("deployment", &self.deployment)
            .field("operation", &self.operation)
            .field("api_version", &self.api_version)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("spillover_deployment", &self.spillover_deployment)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl SimRequest {
    /// A chat completion to `resource`/`deployment` with the right key.
    pub fn chat(resource: &str, deployment: &str, api_key: &str, body: impl Into<Bytes>) -> Self {
        Self {
            resource: resource.to_string(),
            deployment: Some(deployment.to_string()),
            operation: Operation::ChatCompletions,
            api_version: None,
            api_key: Some(api_key.to_string()),
            spillover_deployment: None,
            body: body.into(),
        }
    }
}

/// A response body: whole, or the SSE chunks of a stream (the last ends with `data: [DONE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimBody {
    /// The whole body, sent at [`Timing::total`].
    Full(Bytes),
    /// Chunks; the first at [`Timing::first_byte`], then one per [`Timing::per_chunk`].
    Stream(Vec<Bytes>),
}

impl SimBody {
    /// The body as one buffer (chunks concatenated).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            SimBody::Full(b) => b.clone(),
            SimBody::Stream(chunks) => Bytes::from(chunks.concat()),
        }
    }
}

/// When an answer's parts are due, relative to its arrival (virtual time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// Time to the headers and first chunk (time to first token).
    pub first_byte: Duration,
    /// Time between streamed chunks (time per output token).
    pub per_chunk: Duration,
    /// Time to the end of the answer.
    pub total: Duration,
}

/// Why the model answered as it did (for stats and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Verdict {
    /// Served.
    Ok,
    /// Served by the spillover deployment after a PTU 429.
    Spilled,
    /// 429, token rate (TPM).
    TokenRate,
    /// 429, call rate (RPM in a short window).
    CallRate,
    /// 429, regional capacity (peak load).
    Capacity,
    /// 429, provisioned deployment at 100 %.
    Provisioned,
    /// 403, resource temporarily blocked.
    Blocked,
    /// 401.
    Unauthorized,
    /// 404.
    NotFound,
    /// 400.
    BadRequest,
    /// Outage: an error status, a refused connection or a reset.
    Outage,
}

impl Verdict {
    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Spilled => "spilled",
            Verdict::TokenRate => "token_rate",
            Verdict::CallRate => "call_rate",
            Verdict::Capacity => "capacity",
            Verdict::Provisioned => "provisioned",
            Verdict::Blocked => "blocked",
            Verdict::Unauthorized => "unauthorized",
            Verdict::NotFound => "not_found",
            Verdict::BadRequest => "bad_request",
            Verdict::Outage => "outage",
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers (ids, region, deployment, rate-limit and delay headers).
    pub headers: HeaderMap,
    /// The body.
    pub body: SimBody,
    /// When its parts are due.
    pub timing: Timing,
    /// Why.
    pub verdict: Verdict,
}

/// What the service does with a request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SimResponse {
    /// An HTTP answer.
    Answer(Answer),
    /// The connection is refused: no response at all, at once.
    Refused,
    /// The answer starts, and the connection is reset after `after_chunks` chunks (0: before the
    /// headers), at `at` after arrival.
    Reset {
        /// The answer that was being sent.
        answer: Answer,
        /// Chunks sent before the reset.
        after_chunks: usize,
        /// When the reset happens, after arrival.
        at: Duration,
    },
}

impl SimResponse {
    /// The HTTP status, when there is an answer (a reset after the headers has one too).
    pub fn status(&self) -> Option<u16> {
        match self {
            SimResponse::Answer(a) => Some(a.status.as_u16()),
            SimResponse::Reset {
                answer,
                after_chunks,
                ..
            } if *after_chunks > 0 => Some(answer.status.as_u16()),
            _ => None,
        }
    }

    /// The answer, if there is one that completes.
    pub fn answer(&self) -> Option<&Answer> {
        match self {
            SimResponse::Answer(a) => Some(a),
            _ => None,
        }
    }

    /// When the outcome is known to the client, after arrival: the end of the answer, or the
    /// reset; zero for a refused connection.
    pub fn done_after(&self) -> Duration {
        match self {
            SimResponse::Answer(a) => a.timing.total,
            SimResponse::Refused => Duration::ZERO,
            SimResponse::Reset { at, .. } => *at,
        }
    }
}

/// Server-side counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests handled.
    pub requests: u64,
    /// Answers by `"resource/deployment"` and status (0: refused or reset before the headers).
    pub by_deployment: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Answers by [`Verdict`] name.
    pub by_verdict: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Answers with `status` over all deployments.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_deployment
            .values()
            .filter_map(|m| m.get(&status))
            .sum()
    }

    /// Answers with this verdict.
    pub fn verdict_count(&self, verdict: Verdict) -> u64 {
        self.by_verdict.get(verdict.as_str()).copied().unwrap_or(0)
    }
}

#[derive(Debug)]
struct RegionState {
    name: String,
    display: HeaderValue,
    latency: Latency,
    capacity: Capacity,
    in_flight: BinaryHeap<Reverse<Duration>>,
    arrivals: Window,
}

#[derive(Debug, Default)]
struct AbuseState {
    last_arrival: Option<Duration>,
    burst_start: Option<Duration>,
    burst_count: u32,
    blocked_until: Option<Duration>,
}

struct ResourceState {
    name: String,
    region: usize,
    api_key: String,
    abuse: Option<Abuse>,
    abuse_state: AbuseState,
    deployments: Vec<DeploymentState>,
}

impl std::fmt::Debug for ResourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceState")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("abuse_state", &self.abuse_state)
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct DeploymentState {
    name: String,
    name_header: HeaderValue,
    model: String,
    kind: DeploymentKind,
    tpm: u64,
    request_windows: Vec<(Window, u64)>,
    /// The request counts `x-ratelimit-*-requests` report: the minute (with the RPM), or each
    /// admission window; counted over windows of real time (see [`Model::set_time_scale`]).
    reported: Vec<Reported>,
    tokens: Window,
    headers: ThrottleHeaders,
    spillover_to: Option<usize>,
    ptu_message: String,
    utilization_header: bool,
    ptu_level: f64,
    ptu_updated: Duration,
    /// Set when the deployment has its own default completion budget.
    estimator: Option<TokenEstimator>,
    spillover_header: SpilloverHeader,
    max_request_tokens: u64,
}

#[derive(Debug)]
struct EventState {
    kind: EventKind,
    start: Duration,
    end: Duration,
    region: Option<usize>,
    resource: Option<usize>,
    deployment: Option<usize>,
    mode: OutageMode,
    status: u16,
    factor: f64,
    max_concurrent: Option<u32>,
    max_per_second: Option<u32>,
    reject_share: Option<f64>,
}

/// The parts of a request body the model reads.
#[derive(Debug, Clone, Default)]
struct BodyInfo {
    object: bool,
    model: Option<String>,
    stream: bool,
    max_out: Option<u64>,
    choices: u64,
    inputs: usize,
    estimate: u64,
}

/// Which delay header style a 429 gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderStyle {
    Both,
    RetryAfterMs,
    RetryAfter,
    Reset,
    None,
}

/// The simulated service: every resource, deployment and region of a scenario, in virtual time.
#[derive(Debug)]
pub struct Model {
    estimator: TokenEstimator,
    output_tokens: u64,
    rng: fastrand::Rng,
    regions: Vec<RegionState>,
    resources: Vec<ResourceState>,
    events: Vec<EventState>,
    time_scale: f64,
    next_id: u64,
    stats: Stats,
    body_cache: Vec<(Bytes, BodyInfo)>,
    render_bodies: bool,
}

/// A request count that `x-ratelimit-*-requests` report, over a window of real time.
#[derive(Debug)]
struct Reported {
    /// The window's length in real time (as the client reads it).
    width: Duration,
    /// The scenario's count per `width` of virtual time.
    limit: u64,
    /// Requests admitted over `width * time_scale` of virtual time.
    window: Window,
}

impl Reported {
    fn new(width: Duration, limit: u64) -> Self {
        Self {
            width,
            limit,
            window: Window::new(width),
        }
    }
}

/// `amount` per some length of virtual time as the amount per the same length of real time, which
/// holds `time_scale` times as much virtual time.
fn per_real_time(amount: u64, time_scale: f64) -> u64 {
    if time_scale == 1.0 {
        return amount;
    }
    // `as` saturates: a huge quota stays `u64::MAX`.
    (amount as f64 * time_scale).round() as u64
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("invalid"))
}

impl Model {
    /// The model of a (validated) scenario.
    pub fn new(scenario: &Scenario) -> Result<Self, ScenarioError> {
        scenario.validate()?;
        let regions = scenario
            .regions
            .iter()
            .map(|r| RegionState {
                name: r.name.clone(),
                display: header(r.display_name.as_deref().unwrap_or(&r.name)),
                latency: r.latency,
                capacity: r.capacity,
                in_flight: BinaryHeap::new(),
                arrivals: Window::new(Duration::from_secs(1)),
            })
            .collect();
        let resources = scenario
            .resources
            .iter()
            .map(|res| ResourceState {
                name: res.name.clone(),
                region: scenario
                    .regions
                    .iter()
                    .position(|r| r.name == res.region)
                    .unwrap_or(0),
                api_key: res.api_key.clone(),
                abuse: res.abuse,
                abuse_state: AbuseState::default(),
                deployments: res
                    .deployments
                    .iter()
                    .map(|d| {
                        // Standard deployments: `rpm * window / 60` requests (at least 1) per
                        // window.
                        let rpm = d
                            .requests_per_minute()
                            .filter(|_| d.kind == DeploymentKind::Standard);
                        let counts: Vec<(Duration, u64)> = rpm.map_or_else(Vec::new, |rpm| {
                            d.rpm_windows_s
                                .iter()
                                .map(|w| {
                                    let limit = (rpm * f64::from(*w) / 60.0).floor().max(1.0);
                                    (Duration::from_secs(u64::from(*w)), limit as u64)
                                })
                                .collect()
                        });
                        DeploymentState {
                            name: d.name.clone(),
                            name_header: header(&d.name),
                            model: d.model_name().to_string(),
                            kind: d.kind,
                            tpm: d.tpm,
                            request_windows: counts
                                .iter()
                                .map(|&(width, limit)| (Window::new(width), limit))
                                .collect(),
                            reported: match (rpm, d.requests_header) {
                                (Some(rpm), RequestsHeader::Minute) => {
                                    vec![Reported::new(Duration::from_secs(60), rpm as u64)]
                                }
                                _ => counts
                                    .iter()
                                    .map(|&(width, limit)| Reported::new(width, limit))
                                    .collect(),
                            },
                            tokens: Window::new(Duration::from_secs(60)),
                            headers: d.throttle_headers.unwrap_or(scenario.throttle_headers),
                            spillover_to: d
                                .spillover_to
                                .as_ref()
                                .and_then(|t| res.deployments.iter().position(|o| &o.name == t)),
                            ptu_message: d.ptu_message.clone(),
                            utilization_header: d.utilization_header,
                            ptu_level: 0.0,
                            ptu_updated: Duration::ZERO,
                            estimator: d.default_completion_tokens.and_then(|n| {
                                TokenEstimator::new(
                                    scenario.tokens.chars_per_token,
                                    scenario.tokens.prompt_share,
                                    n,
                                )
                                .ok()
                            }),
                            spillover_header: d.spillover_header,
                            max_request_tokens: d.max_request_tokens,
                        }
                    })
                    .collect(),
            })
            .collect();
        let events = scenario
            .events
            .iter()
            .map(|e| EventState {
                kind: e.kind,
                start: secs(e.start_s),
                end: secs(e.end_s),
                region: e
                    .region
                    .as_ref()
                    .and_then(|n| scenario.regions.iter().position(|r| &r.name == n)),
                resource: e
                    .resource
                    .as_ref()
                    .and_then(|n| scenario.resources.iter().position(|r| &r.name == n)),
                deployment: e.deployment.as_ref().and_then(|d| {
                    let r = e
                        .resource
                        .as_ref()
                        .and_then(|n| scenario.resources.iter().find(|r| &r.name == n))?;
                    r.deployments.iter().position(|x| &x.name == d)
                }),
                mode: e.mode,
                status: e.status,
                factor: e.factor,
                max_concurrent: e.max_concurrent,
                max_per_second: e.max_per_second,
                reject_share: e.reject_share,
            })
            .collect();
        Ok(Self {
            estimator: scenario.tokens.estimator()?,
            output_tokens: scenario.response.output_tokens,
            rng: fastrand::Rng::with_seed(scenario.seed),
            regions,
            resources,
            events,
            time_scale: 1.0,
            next_id: 0,
            stats: Stats::default(),
            body_cache: Vec::new(),
            render_bodies: true,
        })
    }

    /// Sets how much faster than real time the HTTP server runs (`k`), so that every header is
    /// true in the client's real time (call it before the first request: the request counts the
    /// headers report restart):
    /// - durations are divided by `k`: `retry-after-ms`, `retry-after`, `x-ratelimit-reset-*` and
    ///   the "retry after N seconds" of messages, so a client honouring them waits the
    ///   compressed time;
    /// - rates are multiplied by `k` (rounded): `x-ratelimit-limit-tokens` is tokens per real
    ///   minute, which holds `k` virtual minutes, and `x-ratelimit-limit-requests` counts the
    ///   requests of a real window as long as the virtual one it reports (60 s, or the admission
    ///   window, e.g. 10 s);
    /// - `x-ratelimit-remaining-tokens` is the count the token window admits now, unchanged: a
    ///   client that refills it at the reported rate sees it refill as fast as it does;
    /// - `x-ratelimit-remaining-requests` is the reported limit minus the requests admitted over
    ///   that real window (the last `k` virtual windows), so that `limit - remaining` counts the
    ///   client's own recent sends as it does at `k = 1` (how clients infer which window the
    ///   limit counts). Admission itself is unchanged: the virtual windows decide.
    ///
    /// With `k = 1` every header is as the scenario says.
    pub fn set_time_scale(&mut self, time_scale: f64) {
        if time_scale.is_finite() && time_scale > 0.0 {
            self.time_scale = time_scale;
            for res in &mut self.resources {
                for d in &mut res.deployments {
                    for r in &mut d.reported {
                        // `secs` saturates: a huge K's window is the longest there is.
                        r.window = Window::new(secs(r.width.as_secs_f64() * time_scale));
                    }
                }
            }
        }
    }

    /// Whether success bodies are rendered (default). When off, a success body is empty (a stream
    /// has the right number of empty chunks, so timing is unchanged): for virtual-time runs whose
    /// clients never read success bodies. Error bodies are always rendered.
    pub fn set_render_bodies(&mut self, render: bool) {
        self.render_bodies = render;
    }

    /// The token estimator the model charges with.
    pub fn estimator(&self) -> &TokenEstimator {
        &self.estimator
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Requests in flight in a region at `now` (for tests and reports).
    pub fn in_flight(&mut self, region: &str, now: Duration) -> usize {
        let Some(r) = self.regions.iter_mut().find(|r| r.name == region) else {
            return 0;
        };
        expire(&mut r.in_flight, now);
        r.in_flight.len()
    }

    /// Handles one request arriving at `now` (virtual time since the start of the run).
    pub fn handle(&mut self, now: Duration, req: &SimRequest) -> SimResponse {
        self.next_id += 1;
        self.stats.requests += 1;
        let response = self.decide(now, req);
        let (key, status, verdict) = match &response {
            SimResponse::Answer(a) => (
                self.stats_key(req, &a.headers),
                a.status.as_u16(),
                a.verdict,
            ),
            SimResponse::Refused => (self.stats_key(req, &HeaderMap::new()), 0, Verdict::Outage),
            SimResponse::Reset {
                answer,
                after_chunks,
                ..
            } => (
                self.stats_key(req, &answer.headers),
                if *after_chunks > 0 {
                    answer.status.as_u16()
                } else {
                    0
                },
                Verdict::Outage,
            ),
        };
        *self
            .stats
            .by_deployment
            .entry(key)
            .or_default()
            .entry(status)
            .or_default() += 1;
        *self.stats.by_verdict.entry(verdict.as_str()).or_default() += 1;
        response
    }

    /// `"resource/deployment"`, with `?` for names the scenario does not know (so hostile
    /// requests cannot grow the counters without bound).
    fn stats_key(&self, req: &SimRequest, headers: &HeaderMap) -> String {
        let Some(res) = self.resources.iter().find(|r| r.name == req.resource) else {
            return "?/?".to_string();
        };
        let dep = headers
            .get("x-ms-deployment-name")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .or(req.deployment.as_deref())
            .filter(|d| res.deployments.iter().any(|x| x.name == *d))
            .unwrap_or("?");
        format!("{}/{dep}", res.name)
    }

    fn decide(&mut self, now: Duration, req: &SimRequest) -> SimResponse {
        let id = self.next_id;
        let mut headers = self.base_headers();
        let Some(ri) = self.resources.iter().position(|r| r.name == req.resource) else {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::NOT_FOUND,
                texts::not_found(),
                Verdict::NotFound,
                Duration::ZERO,
            ));
        };
        let region = self.resources[ri].region;
        headers.insert("x-ms-region", self.regions[region].display.clone());
        let error_latency = secs(self.regions[region].latency.error_ms / 1000.0);

        // 1. Outages.
        if let Some(e) = self.active_event(now, EventKind::Outage, ri, None) {
            let (mode, status) = (e.mode, e.status);
            match mode {
                OutageMode::Refuse => return SimResponse::Refused,
                OutageMode::Status => {
                    return SimResponse::Answer(self.outage(headers, status, error_latency));
                }
                OutageMode::Reset => {}
            }
        }
        let mut reset = self
            .active_event(now, EventKind::Outage, ri, None)
            .is_some();

        // 2. Auth.
        if req.api_key.as_deref() != Some(self.resources[ri].api_key.as_str()) {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::UNAUTHORIZED,
                texts::unauthorized(),
                Verdict::Unauthorized,
                error_latency,
            ));
        }

        // 3. The deployment.
        let info = self.body_info(&req.body);
        if !info.object {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::BAD_REQUEST,
                texts::bad_request("The request body must be a JSON object."),
                Verdict::BadRequest,
                error_latency,
            ));
        }
        let name = match &req.deployment {
            Some(d) => Some(d.as_str()),
            None => info.model.as_deref(),
        };
        let Some(name) = name else {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::BAD_REQUEST,
                texts::bad_request("you must provide a model parameter"),
                Verdict::BadRequest,
                error_latency,
            ));
        };
        headers.insert("x-ms-deployment-name", header(name));
        let Some(di) = self.resources[ri]
            .deployments
            .iter()
            .position(|d| d.name == name)
        else {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::NOT_FOUND,
                texts::deployment_not_found(),
                Verdict::NotFound,
                error_latency,
            ));
        };

        // 4. The abuse block.
        if self.abuse_check(now, ri) {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::FORBIDDEN,
                texts::blocked(),
                Verdict::Blocked,
                error_latency,
            ));
        }
        self.regions[region].arrivals.add(now, 1);

        let estimate = match &self.resources[ri].deployments[di].estimator {
            Some(e) => e.estimate(&req.body),
            None => info.estimate,
        };
        let default_completion = self.resources[ri].deployments[di]
            .estimator
            .map_or(self.estimator.default_completion_tokens(), |e| {
                e.default_completion_tokens()
            });
        let api_version = req.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
        let mut served = di;
        let mut spilled = false;

        let limit = self.resources[ri].deployments[di].max_request_tokens;
        // A provisioned deployment spills a request too long for it to a standard deployment
        // that can take it (the "400 for long context" spillover case).
        if estimate > limit
            && self.resources[ri].deployments[di].kind == DeploymentKind::Provisioned
            && let Some(to) = self.spill_target(req, ri, di)
            && estimate <= self.resources[ri].deployments[to].max_request_tokens
        {
            self.mark_spill(&mut headers, ri, di, to, 400);
            served = to;
            spilled = true;
        } else if estimate > limit {
            return SimResponse::Answer(self.error(
                headers,
                StatusCode::BAD_REQUEST,
                texts::context_length(limit, estimate),
                Verdict::BadRequest,
                error_latency,
            ));
        }

        // A deployment's own outage: a provisioned deployment spills over on 500/503.
        if let Some(e) = self.active_event(now, EventKind::Outage, ri, Some(di)) {
            let (mode, status) = (e.mode, e.status);
            match mode {
                OutageMode::Refuse => return SimResponse::Refused,
                OutageMode::Reset => reset = true,
                OutageMode::Status => match self.spill_target(req, ri, di) {
                    Some(to) if status == 500 || status == 503 => {
                        self.mark_spill(&mut headers, ri, di, to, status);
                        served = to;
                        spilled = true;
                    }
                    _ => {
                        return SimResponse::Answer(self.outage(headers, status, error_latency));
                    }
                },
            }
        }

        // 5. Provisioned.
        if !spilled && self.resources[ri].deployments[di].kind == DeploymentKind::Provisioned {
            match self.ptu_admit(now, ri, di, estimate, &mut headers) {
                Ok(()) => {}
                Err(retry) => match self.spill_target(req, ri, di) {
                    Some(to) => {
                        self.mark_spill(&mut headers, ri, di, to, 429);
                        served = to;
                        spilled = true;
                    }
                    None => {
                        let message = self.resources[ri].deployments[di].ptu_message.clone();
                        self.delay_headers(&mut headers, HeaderStyle::Both, retry);
                        return SimResponse::Answer(self.error(
                            headers,
                            StatusCode::TOO_MANY_REQUESTS,
                            texts::provisioned(&message),
                            Verdict::Provisioned,
                            error_latency,
                        ));
                    }
                },
            }
        }

        // 6. Standard quota, 7. regional capacity.
        if self.resources[ri].deployments[served].kind == DeploymentKind::Standard {
            if let Some(answer) = self.quota_admit(
                now,
                ri,
                served,
                estimate,
                req.operation,
                api_version,
                &mut headers,
                error_latency,
            ) {
                return SimResponse::Answer(answer);
            }
            if let Some(retry) = self.capacity_refuses(now, ri) {
                let style = self.pick_style(ri, served);
                self.delay_headers(&mut headers, style, retry);
                let seconds = self.message_seconds(retry);
                return SimResponse::Answer(self.error(
                    headers,
                    StatusCode::TOO_MANY_REQUESTS,
                    texts::peak_load(seconds),
                    Verdict::Capacity,
                    error_latency,
                ));
            }
            self.charge(now, ri, served, estimate);
            self.remaining_headers(now, ri, served, &mut headers);
        }

        // Served.
        let dep = &self.resources[ri].deployments[served];
        let stream = info.stream;
        let max_out = info.max_out.unwrap_or(default_completion);
        let output_tokens = if req.operation == Operation::Embeddings {
            0
        } else {
            self.output_tokens.min(max_out)
        };
        let inputs = info.inputs;
        let prompt_tokens = estimate.saturating_sub(max_out.saturating_mul(info.choices));
        let success = render::Success {
            op: req.operation,
            model: &dep.model,
            id,
            created: 1_700_000_000 + now.as_secs(),
            prompt_tokens,
            output_tokens,
            stream,
            inputs,
        };
        let body = if self.render_bodies {
            render::success(&success)
        } else {
            render::placeholder(&success)
        };
        let timing = self.timing(now, ri, served, output_tokens, &body);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(if matches!(body, SimBody::Stream(_)) {
                "text/event-stream; charset=utf-8"
            } else {
                "application/json"
            }),
        );
        let answer = Answer {
            status: StatusCode::OK,
            headers,
            body,
            timing,
            verdict: if spilled {
                Verdict::Spilled
            } else {
                Verdict::Ok
            },
        };
        let chunks = match &answer.body {
            SimBody::Stream(c) => c.len(),
            SimBody::Full(_) => 0,
        };
        let (response, end) = if reset {
            let after = chunks / 2;
            let at = if after == 0 {
                timing.first_byte
            } else {
                timing.first_byte.saturating_add(
                    timing
                        .per_chunk
                        .saturating_mul(u32::try_from(after).unwrap_or(u32::MAX).saturating_sub(1)),
                )
            };
            (
                SimResponse::Reset {
                    answer,
                    after_chunks: after,
                    at,
                },
                at,
            )
        } else {
            (SimResponse::Answer(answer), timing.total)
        };
        self.regions[region]
            .in_flight
            .push(Reverse(now.saturating_add(end)));
        response
    }

    /// What the model needs from a body, parsed once per distinct body (the driver sends the
    /// same body many times).
    fn body_info(&mut self, body: &Bytes) -> BodyInfo {
        if let Some((_, info)) = self.body_cache.iter().find(|(b, _)| b == body) {
            return info.clone();
        }
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let info = match json.as_ref().filter(|j| j.is_object()) {
            None => BodyInfo::default(),
            Some(json) => BodyInfo {
                object: true,
                model: json
                    .get("model")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                stream: json.get("stream").and_then(Value::as_bool) == Some(true),
                max_out: ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                    .iter()
                    .find_map(|k| json.get(*k).and_then(Value::as_u64)),
                choices: ["n", "best_of"]
                    .iter()
                    .filter_map(|k| json.get(*k).and_then(Value::as_u64))
                    .max()
                    .unwrap_or(1)
                    .clamp(1, 128),
                inputs: json
                    .get("input")
                    .and_then(Value::as_array)
                    .map_or(1, Vec::len),
                estimate: self.estimator.estimate(body),
            },
        };
        if self.body_cache.len() >= 4 {
            self.body_cache.remove(0);
        }
        self.body_cache.push((body.clone(), info.clone()));
        info
    }

    fn base_headers(&mut self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(16);
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            self.rng.u32(..),
            self.rng.u16(..),
            self.rng.u16(..0x1000),
            0x8000 | self.rng.u16(..0x4000),
            self.rng.u64(..1 << 48)
        );
        let id = header(&id);
        h.insert("apim-request-id", id.clone());
        h.insert("x-request-id", id);
        h
    }

    /// An outage's answer: its configured status (503 if that is not a status) and the text
    /// Azure sends with it.
    fn outage(&mut self, headers: HeaderMap, status: u16, latency: Duration) -> Answer {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        self.error(
            headers,
            status,
            texts::server_error(status.as_u16()),
            Verdict::Outage,
            latency,
        )
    }

    fn error(
        &mut self,
        mut headers: HeaderMap,
        status: StatusCode,
        body: String,
        verdict: Verdict,
        latency: Duration,
    ) -> Answer {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !headers.contains_key("x-ms-deployment-name") {
            headers.insert("x-ms-deployment-name", HeaderValue::from_static(""));
        }
        if !headers.contains_key("x-ms-region") {
            headers.insert("x-ms-region", HeaderValue::from_static(""));
        }
        Answer {
            status,
            headers,
            body: SimBody::Full(Bytes::from(body)),
            timing: Timing {
                first_byte: latency,
                per_chunk: Duration::ZERO,
                total: latency,
            },
            verdict,
        }
    }

    /// The first event of `kind` active at `now` for the region or resource `ri` (`di: None`), or
    /// for its deployment `di` only (`di: Some`).
    fn active_event(
        &self,
        now: Duration,
        kind: EventKind,
        ri: usize,
        di: Option<usize>,
    ) -> Option<&EventState> {
        let region = self.resources[ri].region;
        self.events.iter().find(|e| {
            e.kind == kind
                && e.start <= now
                && now < e.end
                && match (di, e.deployment) {
                    (None, None) => e.region == Some(region) || e.resource == Some(ri),
                    (Some(d), Some(ed)) => e.resource == Some(ri) && d == ed,
                    _ => false,
                }
        })
    }

    /// Where a provisioned deployment's request spills over to, if anywhere: the request's
    /// `x-ms-spillover-deployment`, else the deployment's `spillover_to`.
    fn spill_target(&self, req: &SimRequest, ri: usize, di: usize) -> Option<usize> {
        if self.resources[ri].deployments[di].kind != DeploymentKind::Provisioned {
            return None;
        }
        req.spillover_deployment
            .as_deref()
            .and_then(|s| {
                self.resources[ri]
                    .deployments
                    .iter()
                    .position(|d| d.name == s && d.kind == DeploymentKind::Standard)
            })
            .or(self.resources[ri].deployments[di].spillover_to)
    }

    /// The spillover response headers: served by `to` instead of `from` because of `error`.
    fn mark_spill(&self, headers: &mut HeaderMap, ri: usize, from: usize, to: usize, error: u16) {
        let from = &self.resources[ri].deployments[from];
        if from.spillover_header != SpilloverHeader::Named {
            headers.insert("x-ms-spillover-from-deployment", from.name_header.clone());
        }
        if from.spillover_header != SpilloverHeader::Generic
            && let Ok(name) =
                HeaderName::from_bytes(format!("x-ms-spillover-from-{}", from.name).as_bytes())
        {
            headers.insert(name, HeaderValue::from_static("true"));
        }
        headers.insert("x-ms-spillover-error", HeaderValue::from(error));
        headers.insert(
            "x-ms-deployment-name",
            self.resources[ri].deployments[to].name_header.clone(),
        );
    }

    /// Records an arrival at the resource; `true` if the resource is (now) blocked.
    fn abuse_check(&mut self, now: Duration, ri: usize) -> bool {
        let res = &mut self.resources[ri];
        let Some(cfg) = res.abuse else {
            return false;
        };
        let st = &mut res.abuse_state;
        if st.blocked_until.is_some_and(|until| now < until) {
            return true;
        }
        let idle = match st.last_arrival {
            None => cfg.idle_at_start,
            Some(last) => now.saturating_sub(last) >= secs(cfg.idle_s),
        };
        if idle {
            st.burst_start = Some(now);
            st.burst_count = 0;
        }
        st.last_arrival = Some(now);
        if let Some(start) = st.burst_start {
            if now.saturating_sub(start) <= secs(cfg.burst_window_s) {
                st.burst_count += 1;
                if st.burst_count > cfg.burst_requests {
                    st.blocked_until = Some(now.saturating_add(secs(cfg.block_s)));
                    st.burst_start = None;
                    return true;
                }
            } else {
                st.burst_start = None;
            }
        }
        false
    }

    /// Leaky-bucket admission; `Err(time until utilisation drops under 100 %)`.
    fn ptu_admit(
        &mut self,
        now: Duration,
        ri: usize,
        di: usize,
        estimate: u64,
        headers: &mut HeaderMap,
    ) -> Result<(), Duration> {
        let d = &mut self.resources[ri].deployments[di];
        let capacity = d.tpm as f64;
        let rate = capacity / 60.0;
        let elapsed = now.saturating_sub(d.ptu_updated).as_secs_f64();
        d.ptu_level = (d.ptu_level - elapsed * rate).max(0.0);
        d.ptu_updated = now;
        let result = if d.ptu_level >= capacity {
            Err(secs((d.ptu_level - capacity) / rate).max(Duration::from_millis(1)))
        } else {
            d.ptu_level += estimate as f64;
            Ok(())
        };
        if d.utilization_header {
            headers.insert(
                "azure-openai-deployment-utilization",
                header(&format!("{:.1}%", d.ptu_level / capacity * 100.0)),
            );
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn quota_admit(
        &mut self,
        now: Duration,
        ri: usize,
        di: usize,
        estimate: u64,
        op: Operation,
        api_version: &str,
        headers: &mut HeaderMap,
        latency: Duration,
    ) -> Option<Answer> {
        let d = &mut self.resources[ri].deployments[di];
        let mut call_rate = None;
        for (window, limit) in &mut d.request_windows {
            let wait = window.time_until_fits(now, 1, *limit);
            if !wait.is_zero() {
                call_rate = Some(call_rate.map_or(wait, |w: Duration| w.max(wait)));
            }
        }
        let (retry, body, verdict) = if let Some(wait) = call_rate {
            let s = self.message_seconds(wait);
            (
                wait,
                texts::call_rate(op, api_version, s),
                Verdict::CallRate,
            )
        } else {
            let wait = d.tokens.time_until_fits(now, estimate, d.tpm);
            if wait.is_zero() {
                return None;
            }
            let s = self.message_seconds(wait);
            (
                wait,
                texts::token_rate(op, api_version, s),
                Verdict::TokenRate,
            )
        };
        let style = self.pick_style(ri, di);
        self.delay_headers(headers, style, retry);
        if self.resources[ri].deployments[di].headers.limits {
            self.remaining_headers(now, ri, di, headers);
        }
        Some(self.error(
            headers.clone(),
            StatusCode::TOO_MANY_REQUESTS,
            body,
            verdict,
            latency,
        ))
    }

    fn charge(&mut self, now: Duration, ri: usize, di: usize, estimate: u64) {
        let d = &mut self.resources[ri].deployments[di];
        for (window, _) in &mut d.request_windows {
            window.add(now, 1);
        }
        for r in &mut d.reported {
            r.window.add(now, 1);
        }
        d.tokens.add(now, estimate);
    }

    fn remaining_headers(&mut self, now: Duration, ri: usize, di: usize, headers: &mut HeaderMap) {
        let k = self.time_scale;
        let d = &mut self.resources[ri].deployments[di];
        let tokens_used = d.tokens.total(now);
        headers.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from(d.tpm.saturating_sub(tokens_used)),
        );
        headers.insert(
            "x-ratelimit-limit-tokens",
            HeaderValue::from(per_real_time(d.tpm, k)),
        );
        // The per-minute quota, or the tightest request window, as the setting says.
        let counted = d
            .reported
            .iter_mut()
            .map(|r| {
                let limit = per_real_time(r.limit, k).max(1);
                (limit.saturating_sub(r.window.total(now)), limit)
            })
            .min();
        if let Some((remaining, limit)) = counted {
            headers.insert(
                "x-ratelimit-remaining-requests",
                HeaderValue::from(remaining),
            );
            headers.insert("x-ratelimit-limit-requests", HeaderValue::from(limit));
        }
    }

    /// The peak-load delay if regional capacity refuses this request.
    fn capacity_refuses(&mut self, now: Duration, ri: usize) -> Option<Duration> {
        let region = self.resources[ri].region;
        let base = self.regions[region].capacity;
        let event = self.active_event(now, EventKind::HighDemand, ri, None);
        if !base.always && event.is_none() {
            return None;
        }
        let max_concurrent = event
            .and_then(|e| e.max_concurrent)
            .unwrap_or(base.max_concurrent);
        let max_per_second = event
            .and_then(|e| e.max_per_second)
            .unwrap_or(base.max_per_second);
        let reject_share = event
            .and_then(|e| e.reject_share)
            .unwrap_or(base.reject_share);
        let r = &mut self.regions[region];
        expire(&mut r.in_flight, now);
        let concurrent = r.in_flight.len() as u64;
        let recent = r.arrivals.total(now);
        let refuse = concurrent >= u64::from(max_concurrent)
            || recent > u64::from(max_per_second)
            || (reject_share > 0.0 && self.rng.f64() < reject_share);
        refuse.then(|| secs(base.retry_after_s))
    }

    fn pick_style(&mut self, ri: usize, di: usize) -> HeaderStyle {
        let h = self.resources[ri].deployments[di].headers;
        let weights = [
            (HeaderStyle::Both, h.both),
            (HeaderStyle::RetryAfterMs, h.retry_after_ms),
            (HeaderStyle::RetryAfter, h.retry_after),
            (HeaderStyle::Reset, h.reset),
            (HeaderStyle::None, h.none),
        ];
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return HeaderStyle::None;
        }
        let mut pick = self.rng.f64() * total;
        for (style, w) in weights {
            if pick < w {
                return style;
            }
            pick -= w;
        }
        HeaderStyle::None
    }

    /// The delay as the client must see it: divided by the time scale.
    fn scaled(&self, delay: Duration) -> Duration {
        // `secs` saturates: a tiny K's delay is the longest there is, not a panic.
        secs(delay.as_secs_f64() / self.time_scale)
    }

    fn message_seconds(&self, delay: Duration) -> u64 {
        self.scaled(delay).as_secs_f64().ceil().max(1.0) as u64
    }

    fn delay_headers(&self, headers: &mut HeaderMap, style: HeaderStyle, delay: Duration) {
        let d = self.scaled(delay);
        let ms = (d.as_secs_f64() * 1000.0).ceil().max(1.0) as u64;
        let s = d.as_secs_f64().ceil().max(1.0) as u64;
        if matches!(style, HeaderStyle::Both | HeaderStyle::RetryAfterMs) {
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if matches!(style, HeaderStyle::Both | HeaderStyle::RetryAfter) {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        if style == HeaderStyle::Reset {
            let v = header(&format!("{ms}ms"));
            headers.insert(
                HeaderName::from_static("x-ratelimit-reset-requests"),
                v.clone(),
            );
            headers.insert(HeaderName::from_static("x-ratelimit-reset-tokens"), v);
        }
    }

    fn timing(
        &mut self,
        now: Duration,
        ri: usize,
        di: usize,
        output_tokens: u64,
        body: &SimBody,
    ) -> Timing {
        let region = self.resources[ri].region;
        let lat = self.regions[region].latency;
        let factor = self
            .active_event(now, EventKind::Slow, ri, None)
            .map_or(1.0, |e| e.factor)
            * self
                .active_event(now, EventKind::Slow, ri, Some(di))
                .map_or(1.0, |e| e.factor);
        let first = lat.first_token_ms * factor * lognormal(&mut self.rng, lat.jitter);
        let per = lat.per_token_ms * factor * lognormal(&mut self.rng, lat.jitter);
        let first_byte = secs(first / 1000.0);
        let per_chunk = secs(per / 1000.0);
        let steps = match body {
            SimBody::Stream(chunks) => chunks.len().saturating_sub(1) as u64,
            SimBody::Full(_) => output_tokens,
        };
        Timing {
            first_byte,
            per_chunk,
            total: first_byte
                .saturating_add(per_chunk.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX))),
        }
    }
}

fn expire(in_flight: &mut BinaryHeap<Reverse<Duration>>, now: Duration) {
    while in_flight.peek().is_some_and(|Reverse(end)| *end <= now) {
        in_flight.pop();
    }
}

/// A lognormal multiplier with median 1 and the given sigma (1 when sigma is 0).
fn lognormal(rng: &mut fastrand::Rng, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return 1.0;
    }
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (sigma * z).exp()
}
