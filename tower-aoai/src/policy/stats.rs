//! Counters and gauges per backend: what happened, and how close to the limit each backend is.
//!
//! The drivers (tower layers, Python transports) feed every attempt's [`Classification`] and
//! headers in; [`Stats`] keeps plain counters, the latest rate-limit headroom, a bounded latency
//! histogram, the gauges the limiter and router report, and the last few 403 support records.
//! Nothing here holds a secret: backends are named by their configured name, headers are reduced
//! to the numbers of `x-ratelimit-*`, and [`SupportRecord`] drops credentials and cookies.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

use super::classify::{Classification, Outcome, ThrottleCause, TransientKind};
use super::headers::{RateLimitHeaders, rate_limit_count};
use super::route::blocked::SupportRecord;
use super::route::hedge::LatencyHistogram;
use super::route::{Availability, BackendId, BreakerState, Router};

/// How many 403 support records are kept (the most recent).
pub const MAX_BLOCK_RECORDS: usize = 16;
/// How many backends are tracked; observations for further names are counted under `"(other)"`,
/// so a caller that names backends from untrusted input cannot grow memory without bound.
pub const MAX_BACKENDS: usize = 256;

/// 429s by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleCounts {
    /// Token or call rate limit of the deployment (TPM/RPM).
    pub quota: u64,
    /// Regional capacity ("high demand", "peak load").
    pub capacity: u64,
    /// Provisioned deployment at 100 % utilisation.
    pub provisioned: u64,
    /// A 429 that said nothing more.
    pub unknown: u64,
}

impl ThrottleCounts {
    /// All 429s.
    pub fn total(&self) -> u64 {
        self.quota + self.capacity + self.provisioned + self.unknown
    }

    /// The count for one cause.
    pub fn get(&self, cause: ThrottleCause) -> u64 {
        match cause {
            ThrottleCause::Quota => self.quota,
            ThrottleCause::Capacity => self.capacity,
            ThrottleCause::Provisioned => self.provisioned,
            _ => self.unknown,
        }
    }

    fn add(&mut self, cause: ThrottleCause) {
        let slot = match cause {
            ThrottleCause::Quota => &mut self.quota,
            ThrottleCause::Capacity => &mut self.capacity,
            ThrottleCause::Provisioned => &mut self.provisioned,
            _ => &mut self.unknown,
        };
        *slot += 1;
    }
}

/// The rate-limit headroom a backend last reported (`x-ratelimit-remaining-*` / `-limit-*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// When these values were seen (wall clock).
    pub seen_at: Option<SystemTime>,
}

impl Headroom {
    /// Reads the rate-limit headers; `None` when the response carries none of them. Values that
    /// are not counts by [`rate_limit_count`] are ignored.
    pub fn from_headers(headers: &HeaderMap, wall_now: SystemTime) -> Option<Self> {
        Seen::scan(headers, wall_now).headroom
    }

    /// Remaining tokens as a fraction of the limit, when both are known.
    pub fn tokens_fraction(&self) -> Option<f64> {
        fraction(self.remaining_tokens?, self.limit_tokens?)
    }

    /// Remaining requests as a fraction of the limit, when both are known.
    pub fn requests_fraction(&self) -> Option<f64> {
        fraction(self.remaining_requests?, self.limit_requests?)
    }

    /// Keeps every value of `newer` that is present, and the older value otherwise.
    fn merge(&mut self, newer: Headroom) {
        self.remaining_requests = newer.remaining_requests.or(self.remaining_requests);
        self.remaining_tokens = newer.remaining_tokens.or(self.remaining_tokens);
        self.limit_requests = newer.limit_requests.or(self.limit_requests);
        self.limit_tokens = newer.limit_tokens.or(self.limit_tokens);
        self.seen_at = newer.seen_at.or(self.seen_at);
    }
}

fn fraction(remaining: u64, limit: u64) -> Option<f64> {
    (limit > 0).then(|| (remaining as f64 / limit as f64).min(1.0))
}

/// What [`Stats::record`] reads from a response's headers, found in one pass over them
/// ([`RateLimitHeaders::find`], the pacer's reading too, and its count rule,
/// [`rate_limit_count`]): a lookup by name would hash each of the five names on every response.
/// Like `HeaderMap::get`, only the first value of a name counts.
struct Seen<'h> {
    headroom: Option<Headroom>,
    region: Option<&'h str>,
}

impl<'h> Seen<'h> {
    fn scan(headers: &'h HeaderMap, wall_now: SystemTime) -> Self {
        Self::of(&RateLimitHeaders::find(headers), wall_now)
    }

    fn of(found: &RateLimitHeaders<'h>, wall_now: SystemTime) -> Self {
        let h = Headroom {
            remaining_requests: rate_limit_count(found.remaining_requests),
            remaining_tokens: rate_limit_count(found.remaining_tokens),
            limit_requests: rate_limit_count(found.limit_requests),
            limit_tokens: rate_limit_count(found.limit_tokens),
            seen_at: Some(wall_now),
        };
        let any = h.remaining_requests.is_some()
            || h.remaining_tokens.is_some()
            || h.limit_requests.is_some()
            || h.limit_tokens.is_some();
        Self {
            headroom: any.then_some(h),
            region: found.region.and_then(|v| v.to_str().ok()),
        }
    }
}

/// State the limiter and router report for a backend (instantaneous values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// The adaptive concurrency limit.
    pub limit: Option<u32>,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Calls waiting for a permit.
    pub queue_depth: u32,
    /// The backend is cooling down until then (wall clock).
    pub cooldown_until: Option<SystemTime>,
    /// The breaker's state: "closed", "open", "half-open".
    pub breaker: Option<&'static str>,
    /// The breaker stays open until then (wall clock).
    pub breaker_until: Option<SystemTime>,
}

/// The router's part of a backend's gauges as of `now` (cooldown, breaker, block), with instants
/// turned into wall-clock times; the limiter's part (`limit`, `in_flight`, `queue_depth`) is left
/// for the caller to fill.
pub fn router_gauges(router: &Router, id: BackendId, now: Instant, wall_now: SystemTime) -> Gauges {
    let to_wall = |at: Instant| wall_now + at.saturating_duration_since(now);
    let (cooldown_until, breaker_until, state) = match router.availability(id, now) {
        Availability::CoolingDown(at) => (Some(to_wall(at)), None, None),
        Availability::BreakerOpen(at) => (None, Some(to_wall(at)), Some("open")),
        Availability::Blocked(at) => (None, Some(to_wall(at)), Some("blocked")),
        Availability::Probing => (None, None, Some("half-open")),
        Availability::Usable => (None, None, None),
    };
    let breaker = state.unwrap_or(match router.breaker(id) {
        BreakerState::Closed => "closed",
        BreakerState::Open { .. } => "open",
        BreakerState::HalfOpen { .. } => "half-open",
    });
    Gauges {
        cooldown_until,
        breaker: Some(breaker),
        breaker_until,
        ..Gauges::default()
    }
}

/// Everything observed about one backend.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    /// The region: configured, or the last `x-ms-region` seen.
    pub region: Option<String>,
    /// Attempts sent (first tries, retries and hedges).
    pub requests: u64,
    /// 2xx answers.
    pub successes: u64,
    /// Attempts that were retries of an earlier attempt.
    pub retries: u64,
    /// Hedged attempts sent to this backend.
    pub hedges: u64,
    /// Hedged attempts to this backend that won the race.
    pub hedge_wins: u64,
    /// 429s by cause.
    pub throttled: ThrottleCounts,
    /// 403 "temporarily blocked".
    pub blocked: u64,
    /// 5xx answers (503 included).
    pub server_errors: u64,
    /// Connection errors (refused, reset before a response).
    pub connect_errors: u64,
    /// Client-side timeouts.
    pub timeouts: u64,
    /// Other 4xx (bad request, content filter, auth).
    pub client_errors: u64,
    /// The latest rate-limit headroom.
    pub headroom: Headroom,
    /// The headroom last seen before the most recent 429 (evidence for "below quota").
    pub headroom_before_throttle: Option<Headroom>,
    /// When the most recent 429 arrived.
    pub last_throttle_at: Option<SystemTime>,
    /// Time to response headers (time to first byte for streams).
    pub latency: LatencyHistogram,
    /// What the limiter and router report.
    pub gauges: Gauges,
}

impl BackendStats {
    /// 429s per 100 successful calls (`None` before any success).
    pub fn throttles_per_100(&self) -> Option<f64> {
        (self.successes > 0).then(|| self.throttled.total() as f64 * 100.0 / self.successes as f64)
    }
}

/// One attempt's observation, as the drivers report it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The backend's configured name (`"default"` for a single-endpoint client).
    pub backend: &'a str,
    /// Its configured region, if any.
    pub region: Option<&'a str>,
    /// The classified outcome.
    pub class: &'a Classification,
    /// The response headers, when there was a response.
    pub headers: Option<&'a HeaderMap>,
    /// Time to response headers.
    pub latency: Option<Duration>,
    /// Whether this attempt retried an earlier one.
    pub retry: bool,
    /// Whether this attempt was a hedge.
    pub hedge: bool,
    /// The wall-clock time of the observation.
    pub wall_now: SystemTime,
}

/// Counters and gauges for every backend, plus recent 403 support records.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    backends: BTreeMap<String, BackendStats>,
    blocks: VecDeque<SupportRecord>,
}

impl Stats {
    /// Empty statistics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one attempt.
    pub fn record(&mut self, attempt: Attempt<'_>) {
        let seen = attempt.headers.map(|h| Seen::scan(h, attempt.wall_now));
        self.record_seen(attempt, seen);
    }

    /// [`record`](Self::record) with the response's rate-limit headers already found (`found`
    /// stands for `attempt.headers`), for a driver that reads them once for the pacer and the
    /// stats.
    pub fn record_found(&mut self, attempt: Attempt<'_>, found: Option<&RateLimitHeaders<'_>>) {
        let seen = found.map(|f| Seen::of(f, attempt.wall_now));
        self.record_seen(attempt, seen);
    }

    fn record_seen(&mut self, attempt: Attempt<'_>, seen: Option<Seen<'_>>) {
        let b = self.backend_mut(attempt.backend);
        if b.region.is_none() {
            b.region = attempt.region.map(str::to_owned);
        }
        if let Some(region) = seen
            .as_ref()
            .and_then(|s| s.region)
            .filter(|r| !r.is_empty() && r.len() <= 64)
            && attempt.region.is_none()
            && b.region.as_deref() != Some(region)
        {
            b.region = Some(region.to_owned());
        }
        b.requests += 1;
        b.retries += u64::from(attempt.retry);
        b.hedges += u64::from(attempt.hedge);
        if let Some(latency) = attempt.latency {
            b.latency.record(latency);
        }
        let headroom_before = b.headroom;
        if let Some(h) = seen.and_then(|s| s.headroom) {
            b.headroom.merge(h);
        }
        match attempt.class.outcome {
            Outcome::Success => b.successes += 1,
            Outcome::Throttled(cause) => {
                b.throttled.add(cause);
                b.last_throttle_at = Some(attempt.wall_now);
                if headroom_before.seen_at.is_some() {
                    b.headroom_before_throttle = Some(headroom_before);
                }
            }
            Outcome::Blocked => b.blocked += 1,
            Outcome::Transient(TransientKind::Connect) => b.connect_errors += 1,
            Outcome::Transient(TransientKind::Timeout) => b.timeouts += 1,
            Outcome::Transient(TransientKind::Overloaded | TransientKind::ServerError) => {
                b.server_errors += 1
            }
            // 408, 409 and every fatal answer.
            Outcome::Transient(_) | Outcome::Fatal(_) => b.client_errors += 1,
        }
    }

    /// Records that a hedge sent to `backend` won its race.
    pub fn record_hedge_win(&mut self, backend: &str) {
        self.backend_mut(backend).hedge_wins += 1;
    }

    /// Keeps the support record of a 403 block (the most recent [`MAX_BLOCK_RECORDS`]).
    pub fn record_block(&mut self, record: SupportRecord) {
        if self.blocks.len() == MAX_BLOCK_RECORDS {
            self.blocks.pop_front();
        }
        self.blocks.push_back(record);
    }

    /// Replaces the gauges the limiter and router report for `backend`.
    pub fn set_gauges(&mut self, backend: &str, gauges: Gauges) {
        self.backend_mut(backend).gauges = gauges;
    }

    /// The statistics of one backend.
    pub fn backend(&self, name: &str) -> Option<&BackendStats> {
        self.backends.get(name)
    }

    /// Every backend, by name.
    pub fn backends(&self) -> impl Iterator<Item = (&str, &BackendStats)> {
        self.backends.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The recent 403 support records, oldest first.
    pub fn blocks(&self) -> impl Iterator<Item = &SupportRecord> {
        self.blocks.iter()
    }

    fn backend_mut(&mut self, name: &str) -> &mut BackendStats {
        // Two lookups for a backend seen before (every attempt but its first); the key is
        // allocated once, when a backend is first seen.
        if !self.backends.contains_key(name) {
            let name = if self.backends.len() < MAX_BACKENDS {
                name
            } else {
                "(other)"
            };
            return self.backends.entry(name.to_owned()).or_default();
        }
        self.backends.get_mut(name).expect("checked above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::{TransportError, classify_error, classify_response};
    use http::{HeaderValue, StatusCode};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
    }

    fn observe(stats: &mut Stats, backend: &str, status: u16, h: &HeaderMap, body: &str) {
        let class = classify_response(
            StatusCode::from_u16(status).unwrap(),
            h,
            Some(body.as_bytes()),
            wall(),
        );
        stats.record(Attempt {
            backend,
            region: None,
            class: &class,
            headers: Some(h),
            latency: Some(Duration::from_millis(120)),
            retry: false,
            hedge: false,
            wall_now: wall(),
        });
    }

    #[test]
    fn counters_match_a_scripted_sequence_exactly() {
        let mut stats = Stats::new();
        let ok = headers(&[
            ("x-ms-region", "East US 2"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-requests", "170"),
        ]);
        let peak = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load."}}"#;
        let quota = r#"{"error":{"code":"429","message":"Requests ... have exceeded token rate limit of your current OpenAI S0 pricing tier."}}"#;
        let blocked = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;
        observe(&mut stats, "eastus2", 200, &ok, "");
        observe(&mut stats, "eastus2", 429, &HeaderMap::new(), peak);
        observe(&mut stats, "eastus2", 429, &HeaderMap::new(), peak);
        observe(&mut stats, "eastus2", 429, &HeaderMap::new(), quota);
        observe(&mut stats, "eastus2", 200, &ok, "");
        observe(&mut stats, "eastus2", 503, &HeaderMap::new(), "");
        observe(&mut stats, "eastus2", 403, &HeaderMap::new(), blocked);
        observe(&mut stats, "eastus2", 400, &HeaderMap::new(), "{}");
        let class = classify_error(TransportError::Connect);
        stats.record(Attempt {
            backend: "eastus2",
            region: None,
            class: &class,
            headers: None,
            latency: None,
            retry: true,
            hedge: false,
            wall_now: wall(),
        });
        stats.record_hedge_win("eastus2");

        let b = stats.backend("eastus2").unwrap();
        assert_eq!(b.requests, 9);
        assert_eq!(b.successes, 2);
        assert_eq!(b.retries, 1);
        assert_eq!(b.hedge_wins, 1);
        assert_eq!(
            b.throttled,
            ThrottleCounts {
                quota: 1,
                capacity: 2,
                provisioned: 0,
                unknown: 0
            }
        );
        assert_eq!(b.blocked, 1);
        assert_eq!(b.server_errors, 1);
        assert_eq!(b.connect_errors, 1);
        assert_eq!(b.client_errors, 1);
        assert_eq!(b.region.as_deref(), Some("East US 2"));
        assert_eq!(b.headroom.remaining_tokens, Some(29_000));
        assert_eq!(b.headroom.tokens_fraction(), Some(29_000.0 / 30_000.0));
        assert_eq!(
            b.headroom_before_throttle.unwrap().remaining_requests,
            Some(170)
        );
        assert_eq!(b.latency.count(), 8);
        assert_eq!(b.throttles_per_100(), Some(150.0));
    }

    #[test]
    fn hostile_headroom_values_are_ignored() {
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "-5"),
            ("x-ratelimit-limit-tokens", "99999999999999999999999999"),
        ]);
        assert_eq!(Headroom::from_headers(&h, wall()), None);
    }

    #[test]
    fn only_the_first_value_of_a_header_counts_as_a_lookup_by_name_would() {
        let mut map = HeaderMap::new();
        let mut add = |k: &'static str, v: &'static str| {
            map.append(k, HeaderValue::from_static(v));
        };
        add("x-ratelimit-remaining-tokens", "junk");
        add("x-ms-region", "West US");
        add("x-ratelimit-remaining-tokens", "5");
        add("x-ratelimit-limit-tokens", "10");
        add("x-ratelimit-limit-tokens", "20");
        add("x-ms-region", "East US");
        let h = Headroom::from_headers(&map, wall()).unwrap();
        assert_eq!((h.remaining_tokens, h.limit_tokens), (None, Some(10)));
        assert_eq!((h.remaining_requests, h.limit_requests), (None, None));
        let mut stats = Stats::new();
        let class = classify_response(StatusCode::OK, &map, None, wall());
        stats.record(Attempt {
            backend: "b",
            region: None,
            class: &class,
            headers: Some(&map),
            latency: None,
            retry: false,
            hedge: false,
            wall_now: wall(),
        });
        let b = stats.backend("b").unwrap();
        assert_eq!(b.region.as_deref(), Some("West US"));
        assert_eq!(b.headroom.limit_tokens, Some(10));
        // No rate-limit header at all: no headroom.
        assert_eq!(
            Headroom::from_headers(&headers(&[("x-ms-region", "x")]), wall()),
            None
        );
    }

    #[test]
    fn the_number_of_backends_is_bounded() {
        let mut stats = Stats::new();
        let class = classify_error(TransportError::Timeout);
        for i in 0..(MAX_BACKENDS + 10) {
            let name = format!("b{i}");
            stats.record(Attempt {
                backend: &name,
                region: None,
                class: &class,
                headers: None,
                latency: None,
                retry: false,
                hedge: false,
                wall_now: wall(),
            });
        }
        assert_eq!(stats.backends().count(), MAX_BACKENDS + 1);
        assert_eq!(stats.backend("(other)").unwrap().timeouts, 10);
    }
}
