//! tower-aoai's whole stack in virtual time: every decision is
//! [`tower_aoai::policy::engine::Engine`]'s — the same engine the Python transports drive.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use tower_aoai::policy::ConfigError;
use tower_aoai::policy::classify::{Outcome, TransientKind, TransportError, needs_body};
use tower_aoai::policy::diagnose::Diagnosis;
use tower_aoai::policy::engine::{After, Engine, EngineCall, EngineConfig, Failure, Next, Ticket};
use tower_aoai::policy::route::{Backend, Backends};
use tower_aoai::policy::stats::Stats;

use super::{AttemptId, Call, CallId, Client, ClientPoll, Done, Outbox};
use crate::model::SimResponse;
use crate::scenario::{DeploymentKind, Scenario};

/// One backend per workload target (`resource/deployment`): provisioned deployments in tier 0,
/// standard ones in tier 1, each with its resource's region. Sends go to the target of the
/// backend the engine picked.
#[derive(Debug)]
pub struct EngineClient {
    engine: Engine,
    outbox: Outbox,
    epoch: Instant,
    calls: HashMap<CallId, EngineCall>,
    tickets: HashMap<AttemptId, Ticket>,
    /// Calls that ask the engine again at a time (after a wait), earliest first.
    wakes: BinaryHeap<Reverse<(Duration, CallId)>>,
    /// Calls waiting for a permit: asked again when any attempt ends.
    queued: Vec<CallId>,
    /// Calls to ask the engine at the next poll.
    ready: Vec<CallId>,
    /// Calls with an attempt in flight: a stale wake-up must not send a second one.
    sending: HashSet<CallId>,
    last_now: Duration,
}

impl EngineClient {
    /// An engine over the scenario's workload targets, with `config`.
    pub fn new(scenario: &Scenario, config: EngineConfig) -> Result<Self, ConfigError> {
        let targets = scenario
            .workload
            .as_ref()
            .map(|w| w.targets.clone())
            .unwrap_or_default();
        let mut backends = Vec::with_capacity(targets.len());
        for target in &targets {
            let (resource, deployment) = target.split_once('/').unwrap_or((target, ""));
            let res = scenario.resources.iter().find(|r| r.name == resource);
            let tier = res
                .and_then(|r| r.deployments.iter().find(|d| d.name == deployment))
                .map_or(1, |d| u8::from(d.kind != DeploymentKind::Provisioned));
            let mut backend =
                Backend::new(target.replace('/', "."), format!("http://{resource}.sim"))
                    .with_tier(tier)
                    .with_api_key("simulated");
            if !deployment.is_empty() {
                backend = backend.with_deployment(deployment);
            }
            if let Some(r) = res {
                backend = backend.with_region(r.region.clone());
            }
            backends.push(backend);
        }
        Ok(Self {
            engine: Engine::new(Some(Backends::new(backends)?), config)?,
            outbox: Outbox::new(),
            epoch: Instant::now(),
            calls: HashMap::new(),
            tickets: HashMap::new(),
            wakes: BinaryHeap::new(),
            queued: Vec::new(),
            ready: Vec::new(),
            sending: HashSet::new(),
            last_now: Duration::ZERO,
        })
    }

    /// With the default engine settings, seeded.
    pub fn seeded(scenario: &Scenario, seed: u64) -> Result<Self, ConfigError> {
        Self::new(
            scenario,
            EngineConfig {
                seed: Some(seed),
                ..EngineConfig::default()
            },
        )
    }

    /// What the engine observed.
    pub fn stats(&mut self) -> &Stats {
        let (now, wall) = (self.instant(self.last_now), wall(self.last_now));
        self.engine.stats(now, wall)
    }

    /// The engine's diagnosis of what it observed.
    pub fn diagnose(&mut self) -> Diagnosis {
        let (now, wall) = (self.instant(self.last_now), wall(self.last_now));
        self.engine.diagnose(now, wall)
    }

    fn instant(&self, now: Duration) -> Instant {
        self.epoch + now
    }

    fn finish(&mut self, call: CallId, outcome: Outcome) {
        self.calls.remove(&call);
        self.outbox.finish(call, outcome);
    }
}

/// The wall clock of virtual time (the model's own dates count from the Unix epoch).
fn wall(now: Duration) -> SystemTime {
    SystemTime::UNIX_EPOCH + now
}

impl Client for EngineClient {
    fn on_arrival(&mut self, now: Duration, call: &Call) {
        self.last_now = now;
        let state = self.engine.start(self.instant(now), &call.body, None);
        self.calls.insert(call.id, state);
        self.ready.push(call.id);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        self.last_now = now;
        let call = done.attempt.call;
        self.sending.remove(&call);
        // Any attempt ending frees a permit: queued calls ask again.
        self.ready.append(&mut self.queued);
        let Some(ticket) = self.tickets.remove(&done.attempt.attempt) else {
            return;
        };
        let Some(mut state) = self.calls.remove(&call) else {
            self.engine.on_cancel(ticket, self.instant(now));
            return;
        };
        let (at, wall_now) = (self.instant(now), wall(now));
        let after = match done.response {
            SimResponse::Answer(a) => {
                let body = needs_body(a.status).then(|| a.body.to_bytes());
                self.engine.on_response(
                    &mut state,
                    ticket,
                    a.status,
                    &a.headers,
                    body.as_deref(),
                    at,
                    wall_now,
                )
            }
            _ if done.broke_mid_stream() => {
                // Headers were handed up: the call is committed, and the stream broke.
                self.engine.on_cancel(ticket, at);
                self.outbox
                    .finish(call, Outcome::Transient(TransientKind::Connect));
                return;
            }
            _ => self
                .engine
                .on_error(&mut state, ticket, TransportError::Connect, at, wall_now),
        };
        match after {
            After::Retry => {
                self.calls.insert(call, state);
                self.ready.push(call);
            }
            _ => {
                let outcome = done.classify().outcome;
                let outcome = if done.broke_mid_stream() {
                    Outcome::Transient(TransientKind::Connect)
                } else {
                    outcome
                };
                self.outbox.finish(call, outcome);
            }
        }
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        self.last_now = now;
        while let Some(&Reverse((at, call))) = self.wakes.peek() {
            if at > now {
                break;
            }
            self.wakes.pop();
            self.ready.push(call);
        }
        let at = self.instant(now);
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_unstable();
        ready.dedup();
        for call in ready {
            if self.sending.contains(&call) {
                continue;
            }
            let Some(state) = self.calls.get_mut(&call) else {
                continue;
            };
            match self.engine.next(state, at) {
                Next::Send(ticket) => {
                    let attempt = self.outbox.send(call, ticket.backend().index());
                    self.tickets.insert(attempt, ticket);
                    self.sending.insert(call);
                }
                Next::Wait(d) => self
                    .wakes
                    .push(Reverse((now + d.max(Duration::from_micros(1)), call))),
                Next::Queue(d) => {
                    self.queued.push(call);
                    self.wakes
                        .push(Reverse((now + d.max(Duration::from_micros(1)), call)));
                }
                Next::Fail(failure) => {
                    let outcome = match failure {
                        Failure::Blocked(_) => Outcome::Blocked,
                        Failure::Overloaded => Outcome::Transient(TransientKind::Overloaded),
                        _ => Outcome::Transient(TransientKind::Timeout),
                    };
                    self.finish(call, outcome);
                }
                _ => self.finish(call, Outcome::Transient(TransientKind::Timeout)),
            }
        }
        let mut poll = self.outbox.poll(now);
        let wake = self.wakes.peek().map(|Reverse((at, _))| *at);
        poll.wake_at = match (poll.wake_at, wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        poll
    }
}
