//! The limiter table: every shipped scenario (plus two limiter-specific ones defined below), run in
//! virtual time with the same retry policy and four ways of limiting what is sent:
//!
//! - `sdk`: the `openai` SDK's own loop (2 retries, no limit), for reference;
//! - `none`: tower-aoai's retry core ([`RetryPolicy`] + [`RetryBudget`]), no limit;
//! - `fixed16`: the same plus a fixed concurrency limit of 16 (tower's `ConcurrencyLimit`);
//! - `ours`: the same plus [`AdaptiveLimit`] and [`Pacer`] with default settings (nothing
//!   configured: rates are learned from the headers), i.e. `RetryLayer` over
//!   `AdaptiveConcurrencyLayer`, with its 512-call queue and 60 s queue timeout.
//!
//! Every client sends to the workload's first target only: the limiter is per backend (routing
//! across targets is the router's job). Columns:
//!
//! - `thru`: successful attempts *sent* during the workload, over what an ideal client could have
//!   had admitted: a fluid queue fed by the arrivals and drained at the target's real capacity
//!   (the smallest of its request windows, its TPM over the request's estimate, the region's
//!   arrivals per second and concurrency over the mean latency, PTU drain; zero during outages),
//!   computed from the scenario file;
//! - `429/100`: throttled attempts per 100 successful calls; `403`: blocked attempts;
//! - `ok`: calls that succeeded; `p50`/`p99`: their latency, arrival to end;
//! - `conv`: after each capacity drop (an event that lowers the capacity by 20 % or more), the
//!   time until a 10 s window of attempts has a throttled share no higher than the event's random
//!   rejection share plus 5 points (`-`: no drop in the scenario, `>T`: not within the event);
//! - `idle burst`: the most attempts sent in the 10 s after any 30 s without a send (the start of
//!   the run counts), and `1s max`: the most sent in any one second.
//!
//! Run: `cargo run -p aoai-sim --example limiter_table --release`

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use aoai_sim::Scenario;
use aoai_sim::SimResponse;
use aoai_sim::driver::{
    self, Attempt, AttemptId, Call, CallId, Client, ClientPoll, Done, NaiveClient, Report,
    RetryClient, workload,
};
use aoai_sim::scenario::{DeploymentKind, EventKind};
use tower_aoai::policy::classify::{Outcome, TransientKind};
use tower_aoai::policy::{
    Action, AdaptiveLimit, CallState, Pacer, Permit, RetryBudget, RetryPolicy, TokenEstimator,
};

/// Builds a fresh client for one run.
type MakeClient = Box<dyn FnMut() -> Box<dyn Client>>;

const FIXED_N: u32 = 16;
const QUEUE_CAPACITY: usize = 512;
const QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
const IDLE_GAP: Duration = Duration::from_secs(30);

/// A steady overload of a 600 RPM deployment whose request quota is checked over 1 s windows.
const SATURATE: &str = r#"
seed = 600
name = "lim-saturate-1s-window"
description = "15 calls/s offered to 600 RPM checked per second"
[response]
output_tokens = 50
[[regions]]
name = "eastus2"
latency = { first_token_ms = 300, per_token_ms = 10, jitter = 0.2 }
[[resources]]
name = "east"
region = "eastus2"
api_key = "k"
[[resources.deployments]]
name = "gpt-4o"
tpm = 10000000
rpm = 600
rpm_windows_s = [1]
[workload]
duration_s = 300
targets = ["east/gpt-4o"]
request = { prompt_chars = 400, max_tokens = 100 }
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 15.0
"#;

/// Regional capacity that falls from 20 to 8 concurrent requests for three minutes.
const CAPACITY_DROP: &str = r#"
seed = 8
name = "lim-capacity-drop"
description = "Concurrency capacity 20, then 8 from 120 s to 300 s, 8 calls/s offered"
[response]
output_tokens = 100
[[regions]]
name = "westeurope"
latency = { first_token_ms = 500, per_token_ms = 10, jitter = 0.2 }
capacity = { always = true, max_concurrent = 20, retry_after_s = 2 }
[[resources]]
name = "west"
region = "westeurope"
api_key = "k"
[[resources.deployments]]
name = "gpt-4o"
tpm = 10000000
rpm = 100000
[[events]]
kind = "high_demand"
region = "westeurope"
start_s = 120
end_s = 300
max_concurrent = 8
[workload]
duration_s = 420
targets = ["west/gpt-4o"]
request = { prompt_chars = 800, max_tokens = 200 }
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 8.0
"#;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("aoai-sim/scenarios exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut scenarios: Vec<Scenario> = paths
        .iter()
        .map(|p| Scenario::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    for text in [SATURATE, CAPACITY_DROP] {
        scenarios.push(Scenario::from_toml(text).expect("built-in scenario parses"));
    }

    println!(
        "| scenario | client | thru | 429/100 | 403 | ok | p50 | p99 | conv | idle burst | 1s max |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for scenario in &scenarios {
        let capacity = CapacityModel::new(scenario);
        let rows: [(&str, MakeClient); 4] = [
            ("sdk", Box::new(|| Box::new(NaiveClient::new(1)))),
            ("none", Box::new(|| Box::new(RetryClient::new(1)))),
            (
                "fixed16",
                Box::new(|| Box::new(LimitedClient::fixed(FIXED_N))),
            ),
            ("ours", Box::new(|| Box::new(LimitedClient::adaptive()))),
        ];
        for (name, mut make) in rows {
            let mut measured = Measured::new(make());
            let report = driver::run(scenario, &mut measured).expect("scenario runs");
            let row = Row::new(scenario, &capacity, &measured, &report);
            println!("| {} | {name} | {row} |", scenario.name);
        }
    }
}

/// Wraps a client and records when it sent, when its successful attempts were sent, and when
/// its throttled attempts were sent.
struct Measured {
    inner: Box<dyn Client>,
    sends: Vec<Duration>,
    admitted: Vec<Duration>,
    throttled: Vec<Duration>,
}

impl Measured {
    fn new(inner: Box<dyn Client>) -> Self {
        Self {
            inner,
            sends: Vec::new(),
            admitted: Vec::new(),
            throttled: Vec::new(),
        }
    }
}

impl Client for Measured {
    fn on_arrival(&mut self, now: Duration, call: &Call) {
        self.inner.on_arrival(now, call);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        let outcome = done.classify().outcome;
        if outcome == Outcome::Success && !done.broke_mid_stream() {
            self.admitted.push(done.sent_at);
        }
        if outcome.is_throttle() {
            self.throttled.push(done.sent_at);
        }
        self.inner.on_response(now, done);
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        let poll = self.inner.poll(now);
        self.sends.extend(poll.sends.iter().map(|_| now));
        poll
    }
}

/// One line of the table.
struct Row {
    thru: f64,
    per_100: f64,
    blocked: u64,
    ok: f64,
    p50: Duration,
    p99: Duration,
    conv: String,
    idle_burst: usize,
    max_1s: u64,
}

impl Row {
    fn new(scenario: &Scenario, cap: &CapacityModel, m: &Measured, report: &Report) -> Self {
        let duration = cap.duration;
        let admitted = m.admitted.iter().filter(|t| **t < duration).count() as f64;
        let ideal = cap.ideal_admissions(scenario);
        let mut sends = m.sends.clone();
        sends.sort();
        let mut throttled = m.throttled.clone();
        throttled.sort();
        Self {
            thru: if ideal > 0.0 { admitted / ideal } else { 1.0 },
            per_100: report.throttled() as f64 * 100.0 / report.successes.max(1) as f64,
            blocked: report.blocked,
            ok: report.success_rate(),
            p50: report.latency_p50,
            p99: report.latency_p99,
            conv: cap.convergence(&sends, &throttled),
            idle_burst: idle_burst(&sends),
            max_1s: report.max_sent_per_second,
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} % | {:.1} | {} | {:.1} % | {:.1}s | {:.1}s | {} | {} | {}",
            self.thru * 100.0,
            self.per_100,
            self.blocked,
            self.ok * 100.0,
            self.p50.as_secs_f64(),
            self.p99.as_secs_f64(),
            self.conv,
            self.idle_burst,
            self.max_1s
        )
    }
}

/// The most sends in the 10 s after a gap of at least [`IDLE_GAP`] (the start counts as a gap).
fn idle_burst(sends: &[Duration]) -> usize {
    let mut best = 0;
    for (i, &t) in sends.iter().enumerate() {
        let after_idle = i == 0 || t - sends[i - 1] >= IDLE_GAP;
        if after_idle {
            let n = sends[i..]
                .iter()
                .take_while(|s| **s < t + Duration::from_secs(10))
                .count();
            best = best.max(n);
        }
    }
    best
}

/// The first target's real capacity over time, from the scenario file.
struct CapacityModel {
    duration: Duration,
    /// Requests per second the target admits, per 100 ms step of the run.
    steps: Vec<f64>,
    /// Capacity drops: (start, end, random rejection share).
    drops: Vec<(Duration, Duration, f64)>,
}

const STEP: Duration = Duration::from_millis(100);

impl CapacityModel {
    fn new(scenario: &Scenario) -> Self {
        let workload = scenario.workload.as_ref().expect("scenario has a workload");
        let duration = Duration::from_secs_f64(workload.duration_s);
        let (ri, di) = scenario
            .find_target(&workload.targets[0])
            .expect("first target exists");
        let resource = &scenario.resources[ri];
        let deployment = &resource.deployments[di];
        let region_index = scenario
            .regions
            .iter()
            .position(|r| r.name == resource.region)
            .expect("resource region exists");
        let region = &scenario.regions[region_index];
        let estimator = scenario
            .tokens
            .estimator()
            .expect("token settings are valid");
        let body = workload::request_body(&workload.request, false);
        let estimate = estimator.estimate(&body) as f64;
        let output = scenario
            .response
            .output_tokens
            .min(if workload.request.max_tokens > 0 {
                workload.request.max_tokens
            } else {
                estimator.default_completion_tokens()
            }) as f64;

        let at = |t: Duration| -> (f64, f64) {
            let active = |kind: EventKind| {
                scenario.events.iter().find(|e| {
                    e.kind == kind
                        && Duration::from_secs_f64(e.start_s) <= t
                        && t < Duration::from_secs_f64(e.end_s)
                        && (e.region.as_deref() == Some(&resource.region)
                            || e.resource.as_deref() == Some(&resource.name))
                })
            };
            if active(EventKind::Outage).is_some() {
                return (0.0, 0.0);
            }
            let slow = active(EventKind::Slow).map_or(1.0, |e| e.factor);
            let latency = (region.latency.first_token_ms + region.latency.per_token_ms * output)
                * slow
                * (region.latency.jitter.powi(2) / 2.0).exp()
                / 1000.0;
            let mut rps = f64::INFINITY;
            match deployment.kind {
                DeploymentKind::Provisioned => {
                    // What the PTU admits, plus what spills over to its standard deployment.
                    let spill = deployment
                        .spillover_to
                        .as_ref()
                        .and_then(|to| resource.deployments.iter().find(|d| &d.name == to))
                        .map_or(0.0, |d| {
                            let mut s = d.tpm as f64 / 60.0 / estimate;
                            if let Some(rpm) = d.requests_per_minute() {
                                for w in &d.rpm_windows_s {
                                    let per_window = (rpm * f64::from(*w) / 60.0).floor().max(1.0);
                                    s = s.min(per_window / f64::from(*w));
                                }
                            }
                            s
                        });
                    rps = rps.min(deployment.tpm as f64 / 60.0 / estimate + spill);
                }
                DeploymentKind::Standard => {
                    if let Some(rpm) = deployment.requests_per_minute() {
                        for w in &deployment.rpm_windows_s {
                            let per_window = (rpm * f64::from(*w) / 60.0).floor().max(1.0);
                            rps = rps.min(per_window / f64::from(*w));
                        }
                    }
                    rps = rps.min(deployment.tpm as f64 / 60.0 / estimate);
                }
            }
            let mut reject = 0.0;
            let event = active(EventKind::HighDemand);
            if region.capacity.always || event.is_some() {
                let max_concurrent = event
                    .and_then(|e| e.max_concurrent)
                    .unwrap_or(region.capacity.max_concurrent);
                let max_per_second = event
                    .and_then(|e| e.max_per_second)
                    .unwrap_or(region.capacity.max_per_second);
                reject = event
                    .and_then(|e| e.reject_share)
                    .unwrap_or(region.capacity.reject_share);
                rps = rps.min(f64::from(max_per_second));
                rps = rps.min(f64::from(max_concurrent) / latency.max(1e-3));
                rps *= 1.0 - reject;
            }
            (rps, reject)
        };

        let horizon = duration + Duration::from_secs(600);
        let n = (horizon.as_nanos() / STEP.as_nanos()) as usize;
        let mut steps = Vec::with_capacity(n);
        let mut drops = Vec::new();
        let mut previous = f64::INFINITY;
        let mut drop_start: Option<(Duration, f64)> = None;
        for i in 0..n {
            let t = STEP * i as u32;
            let (rps, reject) = at(t);
            // An outage (no capacity at all) is not a drop a limiter can converge to.
            if rps < previous * 0.8 && rps > 0.0 && i > 0 && drop_start.is_none() {
                drop_start = Some((t, reject));
            }
            if let Some((start, share)) = drop_start
                && rps > previous * 1.2
            {
                drops.push((start, t, share));
                drop_start = None;
            }
            previous = rps;
            steps.push(rps);
        }
        if let Some((start, share)) = drop_start {
            drops.push((start, horizon, share));
        }
        Self {
            duration,
            steps,
            drops,
        }
    }

    /// Admissions an ideal client gets during the workload: a fluid queue of the arrivals drained
    /// at the capacity.
    fn ideal_admissions(&self, scenario: &Scenario) -> f64 {
        let workload = scenario.workload.as_ref().expect("scenario has a workload");
        let arrivals = workload::arrivals(workload, scenario.seed);
        let mut next = 0;
        let mut backlog = 0.0f64;
        let mut admitted = 0.0;
        let dt = STEP.as_secs_f64();
        for (i, rps) in self.steps.iter().enumerate() {
            let end = STEP * (i as u32 + 1);
            if end > self.duration {
                break;
            }
            while next < arrivals.len() && arrivals[next].at < end {
                backlog += 1.0;
                next += 1;
            }
            let served = backlog.min(rps * dt);
            backlog -= served;
            admitted += served;
        }
        admitted
    }

    /// Time from each capacity drop until a 10 s window of attempts is throttled no more than the
    /// drop's random rejection share plus 5 points; the worst over the drops.
    fn convergence(&self, sends: &[Duration], throttled: &[Duration]) -> String {
        if self.drops.is_empty() {
            return "-".to_string();
        }
        let window = Duration::from_secs(10);
        let count = |v: &[Duration], a: Duration, b: Duration| {
            v.partition_point(|t| *t < b) - v.partition_point(|t| *t < a)
        };
        let mut worst = Duration::ZERO;
        for &(start, end, share) in &self.drops {
            let mut t = start;
            let mut found = None;
            while t + window <= end.max(start + window) {
                let n = count(sends, t, t + window);
                let k = count(throttled, t, t + window);
                if n > 0 && (k as f64) <= (share + 0.05) * n as f64 {
                    found = Some(t - start);
                    break;
                }
                t += Duration::from_millis(500);
            }
            match found {
                Some(d) => worst = worst.max(d),
                None => return format!(">{:.0}s", (end - start).as_secs_f64()),
            }
        }
        format!("{:.1}s", worst.as_secs_f64())
    }
}

/// tower-aoai's retry core in front of a limit: fixed (tower's `ConcurrencyLimit`) or ours
/// ([`AdaptiveLimit`] + [`Pacer`]), with a bounded FIFO queue and a queue timeout, as
/// `RetryLayer` over `AdaptiveConcurrencyLayer` does.
struct LimitedClient {
    epoch: Instant,
    policy: RetryPolicy,
    budget: RetryBudget,
    rng: fastrand::Rng,
    estimator: TokenEstimator,
    limiter: Limiter,
    queue: VecDeque<(CallId, Duration)>,
    delayed: BinaryHeap<Reverse<(Duration, CallId)>>,
    calls: HashMap<CallId, (CallState, u64)>,
    permits: HashMap<AttemptId, Option<Permit>>,
    next_attempt: AttemptId,
    sends: Vec<Attempt>,
    finished: Vec<(CallId, Outcome)>,
}

enum Limiter {
    Fixed {
        limit: u32,
        in_flight: u32,
    },
    Adaptive {
        limit: Box<AdaptiveLimit>,
        pacer: Box<Pacer>,
    },
}

impl LimitedClient {
    fn new(limiter: Limiter) -> Self {
        Self {
            epoch: Instant::now(),
            policy: RetryPolicy::default(),
            budget: RetryBudget::default(),
            rng: fastrand::Rng::with_seed(1),
            estimator: TokenEstimator::default(),
            limiter,
            queue: VecDeque::new(),
            delayed: BinaryHeap::new(),
            calls: HashMap::new(),
            permits: HashMap::new(),
            next_attempt: 0,
            sends: Vec::new(),
            finished: Vec::new(),
        }
    }

    fn fixed(limit: u32) -> Self {
        Self::new(Limiter::Fixed {
            limit,
            in_flight: 0,
        })
    }

    fn adaptive() -> Self {
        Self::new(Limiter::Adaptive {
            limit: Box::default(),
            pacer: Box::default(),
        })
    }

    fn instant(&self, now: Duration) -> Instant {
        self.epoch + now
    }

    fn enqueue(&mut self, call: CallId, now: Duration) {
        if self.queue.len() >= QUEUE_CAPACITY {
            self.calls.remove(&call);
            self.finished
                .push((call, Outcome::Transient(TransientKind::Timeout)));
        } else {
            self.queue.push_back((call, now));
        }
    }

    /// Sends what the limiter allows now; returns when to look again for pacing.
    fn send_ready(&mut self, now: Duration) -> Option<Duration> {
        let at = self.instant(now);
        // Calls that waited too long (queue timeout or their deadline) are over.
        let calls = &self.calls;
        let mut expired = Vec::new();
        self.queue.retain(|&(call, since)| {
            let deadline = calls.get(&call).and_then(|(s, _)| s.deadline());
            let late = now >= since + QUEUE_TIMEOUT || deadline.is_some_and(|d| at >= d);
            if late {
                expired.push(call);
            }
            !late
        });
        for call in expired {
            self.calls.remove(&call);
            self.finished
                .push((call, Outcome::Transient(TransientKind::Timeout)));
        }
        while let Some(&(call, _)) = self.queue.front() {
            let tokens = self.calls.get(&call).map_or(0, |(_, t)| *t);
            let permit = match &mut self.limiter {
                Limiter::Fixed { limit, in_flight } => {
                    if *in_flight >= *limit {
                        return None;
                    }
                    *in_flight += 1;
                    None
                }
                Limiter::Adaptive { limit, pacer } => {
                    let wait = pacer.wait(at, tokens);
                    if !wait.is_zero() {
                        return Some(now + wait);
                    }
                    let permit = limit.try_acquire(at, tokens)?;
                    pacer
                        .check(at, tokens)
                        .expect("a zero wait admits the send");
                    Some(permit)
                }
            };
            self.queue.pop_front();
            self.next_attempt += 1;
            let attempt = self.next_attempt;
            self.permits.insert(attempt, permit);
            self.sends.push(Attempt {
                call,
                attempt,
                target: 0,
            });
        }
        None
    }
}

impl Client for LimitedClient {
    fn on_arrival(&mut self, now: Duration, call: &Call) {
        let state = self.policy.start(self.instant(now), None, &mut self.budget);
        let tokens = self.estimator.estimate(&call.body);
        self.calls.insert(call.id, (state, tokens));
        self.enqueue(call.id, now);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        let at = self.instant(now);
        let class = done.classify();
        let outcome = if done.broke_mid_stream() {
            Outcome::Transient(TransientKind::Connect)
        } else {
            class.outcome
        };
        let permit = self.permits.remove(&done.attempt.attempt).flatten();
        match &mut self.limiter {
            Limiter::Fixed { in_flight, .. } => *in_flight = in_flight.saturating_sub(1),
            Limiter::Adaptive { limit, pacer } => {
                if let Some(permit) = permit {
                    let _ = limit.on_outcome(permit, outcome, at);
                }
                if let SimResponse::Answer(answer) = done.response {
                    pacer.on_response_to(at, self.epoch + done.sent_at, &answer.headers);
                }
                if outcome.is_throttle()
                    && let Some(until) = pacer.on_throttle(at, outcome, class.hint.map(|h| h.delay))
                {
                    limit.on_server_hold(until);
                }
            }
        }
        let call = done.attempt.call;
        let Some((mut state, tokens)) = self.calls.remove(&call) else {
            return;
        };
        if done.broke_mid_stream() {
            self.finished.push((call, outcome));
            return;
        }
        match self
            .policy
            .on_attempt(&mut state, &class, at, &mut self.budget, &mut self.rng)
        {
            Action::Retry { after, .. } => {
                self.calls.insert(call, (state, tokens));
                self.delayed.push(Reverse((now + after, call)));
            }
            _ => self.finished.push((call, class.outcome)),
        }
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        while let Some(&Reverse((at, call))) = self.delayed.peek() {
            if at > now {
                break;
            }
            self.delayed.pop();
            self.enqueue(call, now);
        }
        let paced = self.send_ready(now);
        let epoch = self.epoch;
        let calls = &self.calls;
        let expiry = self
            .queue
            .iter()
            .map(|(call, since)| {
                let deadline = calls
                    .get(call)
                    .and_then(|(s, _)| s.deadline())
                    .map(|d| d.saturating_duration_since(epoch));
                deadline.map_or(*since + QUEUE_TIMEOUT, |d| d.min(*since + QUEUE_TIMEOUT))
            })
            .min();
        let wake_at = [
            paced,
            self.delayed.peek().map(|Reverse((at, _))| *at),
            expiry,
        ]
        .into_iter()
        .flatten()
        .min();
        ClientPoll {
            sends: std::mem::take(&mut self.sends),
            finished: std::mem::take(&mut self.finished),
            wake_at,
        }
    }
}
