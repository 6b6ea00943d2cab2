//! Properties of the router core under random backends, outcomes, headroom and time:
//! - an attempt never goes to a backend that is cooling down, behind an open breaker or a blocked
//!   resource, and the router never waits or gives up while a usable backend exists;
//! - it goes to a backend the call has not tried when there is one, with room when there is one,
//!   of the best tier among those;
//! - a hedge goes to a different usable backend with room;
//! - every call ends exactly once (returned or given up) within a bounded number of steps, every
//!   attempt gets exactly one outcome (answered or cancelled), and no wait passes the deadline.

use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use proptest::prelude::*;
use tower_aoai::policy::classify::{Classification, Outcome, ThrottleCause, TransientKind};
use tower_aoai::policy::hints::{DelayHint, HintSource};
use tower_aoai::policy::route::{
    Availability, Backend, BackendId, Backends, Pick, RoutePolicy, Router, Step, SupportRecord,
};

#[derive(Debug, Clone, Copy)]
enum Event {
    Ok,
    Throttle(Option<u64>),
    ServerError,
    Connect,
    Blocked,
    BadRequest,
    Cancel,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => Just(Event::Ok),
        3 => proptest::option::of(1u64..20_000).prop_map(Event::Throttle),
        2 => Just(Event::ServerError),
        1 => Just(Event::Connect),
        1 => Just(Event::Blocked),
        1 => Just(Event::BadRequest),
        1 => Just(Event::Cancel),
    ]
}

fn class(outcome: Outcome, hint_ms: Option<u64>) -> Classification {
    Classification {
        outcome,
        retryable: true,
        hint: hint_ms.map(|ms| DelayHint {
            delay: Duration::from_millis(ms),
            source: HintSource::RetryAfterMs,
        }),
    }
}

/// One call: events consumed by its attempts, headroom per backend, the time gap before it (ms),
/// its deadline (ms), whether to try a hedge.
type CallPlan = (Vec<Event>, Vec<u8>, u64, u64, bool);

#[derive(Debug, Clone)]
struct Setup {
    /// (tier, resource index, weight) per backend.
    backends: Vec<(u8, usize, u32)>,
    /// Per call: events consumed by its attempts, headroom per backend, a time gap before it,
    /// a deadline, whether to try a hedge.
    calls: Vec<CallPlan>,
    seed: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    (1usize..6).prop_flat_map(|n| {
        (
            proptest::collection::vec((0u8..3, 0usize..3, 1u32..5), n),
            proptest::collection::vec(
                (
                    proptest::collection::vec(event(), 1..8),
                    proptest::collection::vec(0u8..3, n),
                    0u64..30_000,
                    1u64..120_000,
                    any::<bool>(),
                ),
                1..60,
            ),
            any::<u64>(),
        )
            .prop_map(|(backends, calls, seed)| Setup {
                backends,
                calls,
                seed,
            })
    })
}

fn usable(r: &Router, id: BackendId, now: Instant) -> bool {
    r.availability(id, now) == Availability::Usable
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_sent_to_an_unusable_backend_and_every_call_ends_once(s in setup()) {
        let list = s
            .backends
            .iter()
            .enumerate()
            .map(|(i, (tier, res, weight))| {
                Backend::new(format!("b{i}"), format!("https://r{res}.example"))
                    .with_deployment(format!("d{i}"))
                    .with_tier(*tier)
                    .with_weight(*weight)
            })
            .collect();
        let mut r = Router::new(Backends::new(list).unwrap(), RoutePolicy::default());
        let ids: Vec<BackendId> = r.backends().ids().collect();
        let mut rng = fastrand::Rng::with_seed(s.seed);
        let mut now = Instant::now();
        for (events, room, gap, deadline_ms, hedge) in &s.calls {
            now += Duration::from_millis(*gap);
            let deadline = now + Duration::from_millis(*deadline_ms);
            let headroom = |id: BackendId| f64::from(room[id.index()]);
            let mut call = r.start(now, Some(deadline));
            let mut events = events.iter().cycle();
            let mut ended = 0;
            for _step in 0..200 {
                let any_usable = ids.iter().any(|&id| usable(&r, id, now));
                match r.pick(&call, now, &headroom, &mut rng) {
                    Pick::Send(id) => {
                        prop_assert!(usable(&r, id, now), "sent to {:?}", r.availability(id, now));
                        // Untried first, then room, then the best tier.
                        let prefer = |pool: Vec<BackendId>, keep: &dyn Fn(BackendId) -> bool| {
                            let kept: Vec<_> = pool.iter().copied().filter(|&b| keep(b)).collect();
                            if kept.is_empty() { pool } else { kept }
                        };
                        let usable_now: Vec<_> =
                            ids.iter().copied().filter(|&b| usable(&r, b, now)).collect();
                        let pool = prefer(usable_now, &|b| !call.tried(b));
                        let pool = prefer(pool, &|b| headroom(b) > 0.0);
                        let best = pool.iter().map(|&b| r.backends().get(b).tier()).min().unwrap();
                        prop_assert_eq!(r.backends().get(id).tier(), best);
                        prop_assert!(pool.contains(&id));
                        r.on_send(&mut call, id, now);
                        let mut in_flight = vec![id];
                        if *hedge
                            && let Some(h) = r.pick_hedge(&mut call, id, now, &headroom, &mut rng)
                        {
                            prop_assert_ne!(h, id);
                            prop_assert!(usable(&r, h, now));
                            prop_assert!(headroom(h) > 0.0);
                            r.on_send(&mut call, h, now);
                            in_flight.push(h);
                        }
                        now += Duration::from_millis(50);
                        let mut steps = Vec::new();
                        for b in in_flight {
                            let step = match *events.next().unwrap() {
                                Event::Ok => r.on_response(b, &class(Outcome::Success, None), Duration::from_millis(50), now, &mut rng),
                                Event::Throttle(h) => r.on_response(b, &class(Outcome::Throttled(ThrottleCause::Unknown), h), Duration::from_millis(5), now, &mut rng),
                                Event::ServerError => r.on_response(b, &class(Outcome::Transient(TransientKind::ServerError), None), Duration::from_millis(5), now, &mut rng),
                                Event::Connect => r.on_response(b, &class(Outcome::Transient(TransientKind::Connect), None), Duration::from_millis(5), now, &mut rng),
                                Event::BadRequest => r.on_response(b, &class(Outcome::Fatal(tower_aoai::policy::classify::FatalKind::Client), None), Duration::from_millis(5), now, &mut rng),
                                Event::Blocked => {
                                    let rec = SupportRecord::new("b", "r", None, None, StatusCode::FORBIDDEN, &HeaderMap::new(), b"", std::time::SystemTime::UNIX_EPOCH);
                                    r.on_blocked(b, rec, now)
                                }
                                Event::Cancel => {
                                    r.on_cancel(b);
                                    Step::FailOver
                                }
                            };
                            steps.push(step);
                        }
                        if steps.contains(&Step::Return) {
                            ended += 1;
                            break;
                        }
                    }
                    Pick::Wait(at) => {
                        prop_assert!(!any_usable, "waited while a backend was usable");
                        prop_assert!(at > now && at <= deadline);
                        now = at;
                    }
                    Pick::GiveUp(no) => {
                        prop_assert!(!any_usable || no.attempts_exhausted);
                        ended += 1;
                        break;
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(ended, 1, "every call ends exactly once");
            for &id in &ids {
                prop_assert_eq!(r.in_flight(id), 0, "every attempt got exactly one outcome");
            }
        }
        let stats = r.stats();
        prop_assert_eq!(stats.calls, s.calls.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever auth headers a request arrives with and whichever backend it is sent to, the
    /// only secret it carries afterwards is that backend's own, and it goes to that backend's
    /// host.
    #[test]
    fn a_key_only_ever_reaches_its_own_host(
        hosts in proptest::collection::vec(0usize..4, 1..6),
        incoming in proptest::collection::vec(
            (prop_oneof![
                Just("api-key"),
                Just("authorization"),
                Just("ocp-apim-subscription-key"),
                Just("x-api-key"),
                Just("Api-Key"),
            ], "[A-Za-z0-9]{1,12}"),
            0..4,
        ),
        bearer in proptest::collection::vec(any::<bool>(), 6),
        path in prop_oneof![
            Just("/openai/deployments/x/chat/completions?api-version=1"),
            Just("/openai/v1/chat/completions"),
            Just("/base/openai/responses"),
        ],
    ) {
        let list: Vec<Backend> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let b = Backend::new(format!("b{i}"), format!("https://r{h}.example"));
                if bearer[i] {
                    let token = format!("TOKEN{i}");
                    b.with_token_provider(move || token.clone())
                } else {
                    b.with_api_key(format!("KEY{i}"))
                }
            })
            .collect();
        let backends = Backends::new(list).unwrap();
        for id in backends.ids() {
            let mut req = http::Request::builder().uri(format!("https://caller.example{path}"));
            for (name, value) in &incoming {
                req = req.header(*name, format!("CALLER{value}"));
            }
            let (mut parts, ()) = req.body(()).unwrap().into_parts();
            backends.rewrite(id, &mut parts, Some(b"{}")).unwrap();
            let i = id.index();
            let host = format!("r{}.example", hosts[i]);
            prop_assert_eq!(parts.uri.host(), Some(host.as_str()));
            let secrets: Vec<String> = parts
                .headers
                .iter()
                .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .filter(|v| v.contains("KEY") || v.contains("TOKEN") || v.contains("CALLER"))
                .collect();
            let own = if bearer[i] { format!("Bearer TOKEN{i}") } else { format!("KEY{i}") };
            prop_assert_eq!(secrets, vec![own]);
        }
    }
}
