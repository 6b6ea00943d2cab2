//! Backend choice, failover, cooldowns, breakers and hedging decisions, as pure code.
//!
//! - [`backend`]: the [`Backend`] list ([`Backends`], checked at construction) and the rewrite of a
//!   request for the chosen backend (host, deployment, `model`, auth header; a key only ever goes
//!   to its own backend's host).
//! - [`select`]: the [`Router`]: which usable backend takes the next attempt (one the call has
//!   not tried, with room, of the best tier, then power of two choices by headroom over load and
//!   recent latency), per-backend cooldowns from the server's hints, per-resource 403 blocks,
//!   when to wait and when to give up.
//! - [`breaker`]: the failure-rate breaker with half-open probes.
//! - [`hedge`]: latency distributions, hedge delay and the hedge budget.
//! - [`blocked`]: the diagnostic record of a 403 block ([`SupportRecord`], [`BlockedError`]).
//!
//! A driver (the [`Route`](crate::route::Route) layer, the Python transports, the simulator) runs
//! one call like this:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use tower_aoai::policy::classify::{Classification, Outcome, ThrottleCause};
//! use tower_aoai::policy::route::{Backend, Backends, Pick, RoutePolicy, Router, Step};
//!
//! let backends = Backends::new(vec![
//!     Backend::new("east", "https://east.example.com").with_api_key("k1"),
//!     Backend::new("west", "https://west.example.com").with_api_key("k2"),
//! ])?;
//! let mut router = Router::new(backends, RoutePolicy::default());
//! let mut rng = fastrand::Rng::with_seed(7);
//! let now = Instant::now();
//! let mut call = router.start(now, Some(now + Duration::from_secs(60)));
//! let room = |_| 1.0; // the limiter's headroom per backend (> 0: has room)
//! let Pick::Send(first) = router.pick(&call, now, &room, &mut rng) else { unreachable!() };
//! router.on_send(&mut call, first, now);
//! let throttled = Classification {
//!     outcome: Outcome::Throttled(ThrottleCause::Capacity),
//!     retryable: true,
//!     hint: None,
//! };
//! // A 429: that backend cools down and the call fails over at once, no sleep.
//! let step = router.on_response(first, &throttled, Duration::from_millis(40), now, &mut rng);
//! assert_eq!(step, Step::FailOver);
//! let Pick::Send(second) = router.pick(&call, now, &room, &mut rng) else { unreachable!() };
//! assert_ne!(first, second);
//! # Ok::<(), tower_aoai::policy::ConfigError>(())
//! ```

pub mod backend;
pub mod blocked;
pub mod breaker;
pub mod hedge;
pub mod select;

pub use backend::{
    Backend, BackendId, Backends, ResourceId, RewriteError, RewritePlan, TokenProvider,
};
pub use blocked::{BlockedError, SupportRecord};
pub use breaker::{BreakerPolicy, BreakerState};
pub use hedge::{HedgePolicy, LatencyHistogram};
pub use select::{
    Availability, NoBackend, Pick, RouteCall, RoutePolicy, RouteStats, Router, Step, fails_over,
};
