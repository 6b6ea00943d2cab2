//! The virtual-time driver: runs a client policy against the [`Model`] with no sockets and no
//! sleeps, so an hour of traffic runs in well under a second and the same seed gives the same
//! [`Report`].
//!
//! A client policy implements [`Client`]. The driver is a discrete-event loop:
//! 1. it advances virtual time to the next event: a call arriving (from the scenario's
//!    workload), an attempt finishing (at the time the model said), or a wake-up the client asked
//!    for;
//! 2. it tells the client ([`Client::on_arrival`], [`Client::on_response`]);
//! 3. it polls the client ([`Client::poll`]) and carries out what it returns: sends attempts to
//!    the model (each to one of the workload's `targets`, by index), records finished calls, and
//!    remembers the wake-up time. It polls again until the client has nothing more to do at that
//!    instant.
//!
//! [`Outbox`] holds the bookkeeping most clients need (attempts to send now, attempts delayed to
//! a later time, finished calls), and [`classify`] reads a [`SimResponse`] with tower-aoai's own
//! classifier. Two baseline clients ship: [`NaiveClient`] (the `openai` SDK's retry loop) and
//! [`RetryClient`] (tower-aoai's [`RetryPolicy`](tower_aoai::policy::RetryPolicy) and
//! [`RetryBudget`](tower_aoai::policy::RetryBudget)).
//!
//! ```
//! use aoai_sim::Scenario;
//! use aoai_sim::driver::{self, NaiveClient};
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
//!     tpm = 100000
//!     rpm = 600
//!     rpm_windows_s = [1]
//!     [workload]
//!     duration_s = 60
//!     targets = ["east/gpt-4o"]
//!     [[workload.arrivals]]
//!     kind = "bursts"
//!     size = 30
//!     every_s = 10
//! "#).unwrap();
//! let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
//! assert_eq!(report.calls, 180);
//! // 600 RPM over 1 s windows admits 10 per second: bursts of 30 get throttled.
//! assert!(report.throttles.get("quota").copied().unwrap_or(0) > 0);
//! ```

mod clients;
mod engine_client;
mod report;
pub mod workload;

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tower_aoai::policy::classify::{
    Classification, Outcome, TransportError, classify_error, classify_response, needs_body,
};

use crate::model::{Model, Operation, SimRequest, SimResponse};
use crate::scenario::{Scenario, ScenarioError};

pub use clients::{NaiveClient, Outbox, RetryClient};
pub use engine_client::EngineClient;
pub use report::Report;

/// Identifies a call (one user request, however many attempts it takes).
pub type CallId = u64;
/// Identifies one attempt; chosen by the client, unique per run.
pub type AttemptId = u64;

/// A call arriving at the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Its id.
    pub id: CallId,
    /// When it arrived.
    pub arrival: Duration,
    /// The JSON request body.
    pub body: Bytes,
    /// Whether it asks for a stream.
    pub stream: bool,
}

/// An attempt the client wants sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The call it belongs to.
    pub call: CallId,
    /// Its id (unique per run).
    pub attempt: AttemptId,
    /// Where to: an index into the workload's `targets`.
    pub target: usize,
}

/// A finished attempt, as the client sees it.
#[derive(Debug, Clone, Copy)]
pub struct Done<'a> {
    /// The attempt.
    pub attempt: Attempt,
    /// When it was sent.
    pub sent_at: Duration,
    /// What came back (an answer, a refused connection or a reset).
    pub response: &'a SimResponse,
}

impl Done<'_> {
    /// The attempt's outcome read with tower-aoai's classifier (see [`classify`]).
    pub fn classify(&self) -> Classification {
        classify(self.response)
    }

    /// Whether the answer broke after part of a stream was handed up (never retryable).
    pub fn broke_mid_stream(&self) -> bool {
        matches!(self.response, SimResponse::Reset { after_chunks, .. } if *after_chunks > 0)
    }
}

/// What a client wants done after [`Client::poll`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientPoll {
    /// Attempts to send now.
    pub sends: Vec<Attempt>,
    /// Calls that are over, with their final outcome.
    pub finished: Vec<(CallId, Outcome)>,
    /// When to poll again even if nothing happens (a time not after `now` is ignored: the driver
    /// polls after every event anyway).
    pub wake_at: Option<Duration>,
}

/// A client policy run by the driver. Every method gets the virtual time `now`.
pub trait Client {
    /// A call arrives.
    fn on_arrival(&mut self, now: Duration, call: &Call);
    /// An attempt finished.
    fn on_response(&mut self, now: Duration, done: &Done<'_>);
    /// What to do now; called after every batch of events, and again until it returns no sends
    /// and no finished calls.
    fn poll(&mut self, now: Duration) -> ClientPoll;
}

/// Reads a simulated response with tower-aoai's classifier: an answer by status, headers and
/// error body; a refused or reset connection as a transport error.
pub fn classify(response: &SimResponse) -> Classification {
    match response {
        SimResponse::Answer(a) => {
            let body = needs_body(a.status).then(|| a.body.to_bytes());
            classify_response(
                a.status,
                &a.headers,
                body.as_deref(),
                SystemTime::UNIX_EPOCH,
            )
        }
        _ => classify_error(TransportError::Connect),
    }
}

/// Limits of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// How long after the last arrival unfinished calls may still finish.
    pub grace: Duration,
    /// Whether success bodies are rendered (see [`Model::set_render_bodies`]); error bodies
    /// always are.
    pub success_bodies: bool,
}

impl Default for RunOptions {
    /// Ten minutes of grace; success bodies are not rendered (clients classify on status,
    /// headers and error bodies).
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(600),
            success_bodies: false,
        }
    }
}

/// Runs the scenario's workload through `client` against a fresh model of the scenario.
pub fn run(scenario: &Scenario, client: &mut dyn Client) -> Result<Report, ScenarioError> {
    run_with(scenario, client, RunOptions::default())
}

/// [`run`] with explicit limits.
pub fn run_with(
    scenario: &Scenario,
    client: &mut dyn Client,
    options: RunOptions,
) -> Result<Report, ScenarioError> {
    let Some(workload) = &scenario.workload else {
        return Err(ScenarioError {
            line: None,
            field: "workload".to_string(),
            message: "the scenario has no workload to run".to_string(),
        });
    };
    let mut model = Model::new(scenario)?;
    model.set_render_bodies(options.success_bodies);
    let targets: Vec<Target> = workload
        .targets
        .iter()
        .filter_map(|t| scenario.find_target(t))
        .map(|(r, d)| Target {
            resource: scenario.resources[r].name.clone(),
            deployment: scenario.resources[r].deployments[d].name.clone(),
            api_key: scenario.resources[r].api_key.clone(),
        })
        .collect();
    let arrivals = workload::arrivals(workload, scenario.seed);
    let bodies = [
        workload::request_body(&workload.request, false),
        workload::request_body(&workload.request, true),
    ];
    let horizon = Duration::from_secs_f64(workload.duration_s) + options.grace;
    let mut sim = Sim {
        model: &mut model,
        targets: &targets,
        calls: HashMap::new(),
        queue: BinaryHeap::new(),
        wakes: BTreeSet::new(),
        seq: 0,
        report: Report::new(targets.len()),
        recent_sends: VecDeque::new(),
        latencies: Vec::new(),
    };
    let mut next_arrival = 0usize;
    loop {
        let candidates = [
            arrivals.get(next_arrival).map(|a| a.at),
            sim.queue.peek().map(|e| e.at),
            sim.wakes.first().copied(),
        ];
        let Some(now) = candidates.into_iter().flatten().min() else {
            break;
        };
        if now > horizon {
            break;
        }
        while let Some(a) = arrivals.get(next_arrival).filter(|a| a.at == now) {
            let id = next_arrival as CallId;
            let call = Call {
                id,
                arrival: now,
                body: bodies[usize::from(a.stream)].clone(),
                stream: a.stream,
            };
            client.on_arrival(now, &call);
            sim.report.calls += 1;
            sim.report.first_arrival.get_or_insert(now);
            sim.calls.insert(id, call);
            next_arrival += 1;
        }
        while sim.queue.peek().is_some_and(|e| e.at == now) {
            let Some(event) = sim.queue.pop() else { break };
            client.on_response(
                now,
                &Done {
                    attempt: event.attempt,
                    sent_at: event.sent_at,
                    response: &event.response,
                },
            );
        }
        while sim.wakes.first().is_some_and(|w| *w <= now) {
            sim.wakes.pop_first();
        }
        for _ in 0..10_000 {
            let poll = client.poll(now);
            if poll.sends.is_empty() && poll.finished.is_empty() {
                sim.wake(now, poll.wake_at);
                break;
            }
            sim.apply(now, poll);
        }
    }
    let mut report = sim.finish();
    report.unfinished = report
        .calls
        .saturating_sub(report.successes + report.failures.values().sum::<u64>());
    Ok(report)
}

struct Target {
    resource: String,
    deployment: String,
    api_key: String,
}

struct Pending {
    at: Duration,
    seq: u64,
    attempt: Attempt,
    sent_at: Duration,
    response: SimResponse,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed: the earliest event is the greatest (top of the max-heap).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Sim<'a> {
    model: &'a mut Model,
    targets: &'a [Target],
    calls: HashMap<CallId, Call>,
    queue: BinaryHeap<Pending>,
    wakes: BTreeSet<Duration>,
    seq: u64,
    report: Report,
    recent_sends: VecDeque<Duration>,
    latencies: Vec<Duration>,
}

impl Sim<'_> {
    fn wake(&mut self, now: Duration, at: Option<Duration>) {
        if let Some(at) = at.filter(|at| *at > now) {
            self.wakes.insert(at);
        }
    }

    fn apply(&mut self, now: Duration, poll: ClientPoll) {
        for attempt in poll.sends {
            let Some(call) = self.calls.get(&attempt.call) else {
                continue;
            };
            let Some(target) = self.targets.get(attempt.target) else {
                continue;
            };
            let req = SimRequest {
                resource: target.resource.clone(),
                deployment: Some(target.deployment.clone()),
                operation: Operation::ChatCompletions,
                api_version: None,
                api_key: Some(target.api_key.clone()),
                spillover_deployment: None,
                body: call.body.clone(),
            };
            let response = self.model.handle(now, &req);
            self.report
                .record_attempt(attempt.target, &classify(&response));
            self.recent_sends.push_back(now);
            while self
                .recent_sends
                .front()
                .is_some_and(|t| *t + Duration::from_secs(1) <= now)
            {
                self.recent_sends.pop_front();
            }
            self.report.max_sent_per_second = self
                .report
                .max_sent_per_second
                .max(self.recent_sends.len() as u64);
            self.seq += 1;
            self.queue.push(Pending {
                at: now.saturating_add(response.done_after()),
                seq: self.seq,
                attempt,
                sent_at: now,
                response,
            });
        }
        for (id, outcome) in poll.finished {
            let Some(call) = self.calls.remove(&id) else {
                continue;
            };
            self.report.last_finish = Some(now);
            if outcome == Outcome::Success {
                self.report.successes += 1;
                self.latencies.push(now.saturating_sub(call.arrival));
            } else {
                *self.report.failures.entry(outcome.as_str()).or_default() += 1;
            }
        }
        self.wake(now, poll.wake_at);
    }

    fn finish(mut self) -> Report {
        self.report.set_latencies(&mut self.latencies);
        self.report
    }
}
