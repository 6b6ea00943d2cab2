//! The sans-IO core: every decision tower-aoai makes, as pure code.
//!
//! Nothing here touches a socket, a timer or a global clock. Time comes in as an argument
//! (`now: Instant`, and `wall_now: SystemTime` where an HTTP date must be read), randomness as an
//! injected, seedable [`fastrand::Rng`]. The tower layers in this crate and the Python transports
//! in `aoai-py` only carry out what these functions decide, so the same inputs give the same
//! decisions in Rust, in Python and under the simulator's virtual clock.
//!
//! - [`hints`]: the server's delay hints (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`).
//! - [`classify`]: what an attempt's outcome means (success, throttle and its cause, block, ...).
//! - [`backoff`]: how long to wait before the next attempt.
//! - [`budget`]: a retry budget so retries never multiply traffic.
//! - [`retry`]: the per-call retry state machine that ties the above together.
//! - [`tokens`]: the token estimate of a request body, the same rule the service applies.
//! - [`stats`]: counters and gauges per backend; [`diagnose`]: why throttling happened, from them.

pub mod backoff;
pub mod budget;
pub mod classify;
pub mod diagnose;
pub mod engine;
pub mod headers;
pub mod hints;
pub mod limit;
pub mod pacing;
pub mod retry;
pub mod route;
pub mod stats;
pub mod tokens;

mod error;

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use classify::{Classification, Outcome, ThrottleCause, TransientKind, TransportError};
pub use error::ConfigError;
pub use hints::{DelayHint, HintSource};
pub use limit::{AdaptiveLimit, Adjustment, LimitConfig, Permit};
pub use pacing::{Gcra, LimitWindow, Pacer, PacingConfig};
pub use retry::{Action, CallState, GiveUpReason, RetryPolicy};
pub use tokens::TokenEstimator;
