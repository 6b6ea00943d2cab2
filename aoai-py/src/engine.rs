//! The full engine (retry, route, limit and pace, observe) and its per-call and per-attempt state,
//! as Python objects.
//!
//! [`Engine`] wraps `tower_aoai::policy::engine::Engine` behind a mutex; a [`Call`] is one user
//! request, an [`Attempt`] one send, owning the core's `Ticket` (its permit): dropping an attempt
//! without an outcome hands the permit back (`on_cancel`). A success handed up as a stream keeps
//! its permit in a [`Lease`] until its body ends; dropping the lease hands it back. No decision is
//! made here: this file converts Python values to the core's types and back.
//!
//! Locking: a call's state is locked before the engine, never the other way round, and no Python
//! code runs while the engine is locked (a token provider is called outside it), so a thread that
//! waits for the lock while holding the GIL cannot deadlock with one that holds it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use tower_aoai::policy::classify::{self, TransportError};
use tower_aoai::policy::engine::{
    After, BodyEnd, Engine as Core, EngineCall, EngineConfig, Failure, Lease as CoreLease, Next,
    Ticket,
};
use tower_aoai::policy::headers;
use tower_aoai::policy::route::{BackendId, Backends, HedgePolicy, RoutePolicy};
use tower_aoai::policy::{
    Backoff, ConfigError, LimitConfig, Pacer, PacingConfig, RetryBudget, RetryPolicy,
    TokenEstimator,
};

use crate::backend::{Backend, ProviderError};
use crate::report::{Diagnosis, record_dict, stats_dict};

/// Default share of calls that may be retried (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Default retries per second allowed regardless of traffic (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_MIN_PER_SEC: i64 = 10;
/// Default budget window in seconds (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_TTL: f64 = 10.0;
/// Default jitter fraction on top of server hints (the core's `Backoff::default`).
pub(crate) const DEFAULT_HINT_JITTER: f64 = 0.1;
/// Default seconds a call waits for a concurrency permit (the core's `EngineConfig::default`).
pub(crate) const DEFAULT_QUEUE_TIMEOUT: f64 = 30.0;
/// Default latency quantile after which a call is hedged (the core's `HedgePolicy::default`).
pub(crate) const DEFAULT_HEDGE_QUANTILE: f64 = 0.95;
/// Default latency samples a backend needs before its calls are hedged.
pub(crate) const DEFAULT_HEDGE_MIN_SAMPLES: u32 = 20;
/// Default share of extra requests hedging may cost.
pub(crate) const DEFAULT_HEDGE_RATIO: f64 = 0.05;
/// The window over which the hedge budget counts calls (the core's `HedgePolicy::default`).
const HEDGE_BUDGET_TTL: Duration = Duration::from_secs(10);

/// The validated retry settings of an [`Engine`], kept to rebuild the same policy elsewhere (the
/// parity hook) and to show them in `repr()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Settings {
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) max_wait: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) hint_jitter: f64,
    pub(crate) budget_ttl: Duration,
    pub(crate) budget_min_per_sec: u32,
    pub(crate) budget_ratio: f64,
    pub(crate) seed: Option<u64>,
    /// Hedging: the latency quantile to hedge after (`None`: off), the samples a backend needs,
    /// and the share of extra requests hedges may cost.
    pub(crate) hedge: Hedging,
}

/// When a call is hedged, and what hedging may cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hedging {
    pub(crate) quantile: Option<f64>,
    pub(crate) min_samples: u32,
    pub(crate) ratio: f64,
}

impl Default for Hedging {
    fn default() -> Self {
        Self {
            quantile: Some(DEFAULT_HEDGE_QUANTILE),
            min_samples: DEFAULT_HEDGE_MIN_SAMPLES,
            ratio: DEFAULT_HEDGE_RATIO,
        }
    }
}

impl Settings {
    pub(crate) fn policy(&self) -> Result<RetryPolicy, ConfigError> {
        let backoff = Backoff::new(self.backoff_base, self.backoff_cap)?
            .with_hint_jitter(self.hint_jitter)?;
        Ok(RetryPolicy::new()
            .with_max_attempts(self.max_attempts)?
            .with_deadline(self.deadline)?
            .with_max_wait(self.max_wait)?
            .with_backoff(backoff))
    }

    pub(crate) fn budget(&self) -> Result<RetryBudget, ConfigError> {
        RetryBudget::new(self.budget_ttl, self.budget_min_per_sec, self.budget_ratio)
    }

    /// The router's policy: hints jittered like the retry policy's, the same attempts and waits,
    /// and the hedging settings.
    pub(crate) fn route(&self) -> Result<RoutePolicy, ConfigError> {
        let hedge = match self.hedge.quantile {
            None => HedgePolicy::disabled(),
            Some(q) => HedgePolicy::default()
                .with_quantile(q)?
                .with_min_samples(self.hedge.min_samples)
                .with_budget(HEDGE_BUDGET_TTL, self.hedge.ratio)?,
        };
        Ok(RoutePolicy::new()
            .with_cooldown_jitter(self.hint_jitter)?
            .with_max_attempts(self.max_attempts)?
            .with_max_wait(self.max_wait)
            .with_hedge(hedge))
    }
}

/// The limiter, pacing and token-estimate settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    pub(crate) initial_concurrency: Option<u32>,
    pub(crate) min_concurrency: u32,
    pub(crate) max_concurrency: u32,
    pub(crate) rpm: Option<f64>,
    pub(crate) tpm: Option<f64>,
    pub(crate) queue_timeout: Duration,
    pub(crate) tokens: TokenEstimator,
}

impl Load {
    pub(crate) fn limit(&self) -> LimitConfig {
        let d = LimitConfig::default();
        // Without an explicit start, the core's default start clamped into the given bounds.
        let initial = self.initial_concurrency.unwrap_or_else(|| {
            d.initial().clamp(
                self.min_concurrency,
                self.max_concurrency.max(self.min_concurrency),
            )
        });
        d.with_min(self.min_concurrency)
            .with_max(self.max_concurrency)
            .with_initial(initial)
    }

    pub(crate) fn pacing(&self, rpm: Option<f64>, tpm: Option<f64>) -> PacingConfig {
        PacingConfig::default()
            .with_requests_per_minute(rpm)
            .with_tokens_per_minute(tpm)
    }
}

/// The Python argument that a core configuration field comes from.
fn argument_name(field: &str) -> &str {
    match field {
        "backoff.base" => "backoff_base",
        "backoff.cap" => "backoff_cap",
        "backoff.hint_jitter" | "cooldown_jitter" => "hint_jitter",
        "budget.ttl" => "budget_ttl",
        "budget.min_per_sec" => "budget_min_per_sec",
        "budget.ratio" => "budget_ratio",
        "limit.initial" => "initial_concurrency",
        "limit.min" => "min_concurrency",
        "limit.max" => "max_concurrency",
        "pacing.requests_per_minute" => "rpm",
        "pacing.tokens_per_minute" => "tpm",
        "tokens.chars_per_token" => "chars_per_token",
        "tokens.prompt_share" => "prompt_share",
        "hedge.quantile" => "hedge_quantile",
        "hedge.ratio" => "hedge_budget",
        other => other,
    }
}

/// A rejected configuration field as a Python `ValueError` naming the argument; a backend's field
/// is named with its position (`backends[1].endpoint`).
pub(crate) fn config_error(err: &ConfigError) -> PyErr {
    let name = match err.index() {
        Some(_) => err.path(),
        None => argument_name(err.field()).to_owned(),
    };
    PyValueError::new_err(format!("invalid `{name}`: {}", err.reason()))
}

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "invalid `{name}`: must be a finite, non-negative number of seconds, got {value}"
        ))
    })
}

fn fraction(name: &str, value: f64) -> PyResult<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(PyValueError::new_err(format!(
            "invalid `{name}`: must be a finite number, got {value}"
        )))
    }
}

fn count(name: &str, value: i64) -> PyResult<u32> {
    u32::try_from(value).map_err(|_| {
        PyValueError::new_err(format!(
            "invalid `{name}`: must be between 0 and {}, got {value}",
            u32::MAX
        ))
    })
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the core in a state worse than its last step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The core engine and the transport's clock floor.
pub(crate) struct CoreState {
    pub(crate) engine: Core,
    /// Time never reads earlier than this: after a driver's sleep returns, the engine sees the
    /// slept time as passed even when the sleep was a test's fake that returns at once.
    floor: Option<Instant>,
}

impl CoreState {
    /// The engine's `now` and the matching wall-clock time.
    pub(crate) fn now(&self) -> (Instant, SystemTime) {
        let real = Instant::now();
        let wall = SystemTime::now();
        match self.floor {
            Some(floor) if floor > real => (floor, wall + (floor - real)),
            _ => (real, wall),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) settings: Settings,
    load: Load,
    pub(crate) core: Mutex<CoreState>,
    /// A copy of the backends for rewriting outside the engine's lock (a token provider runs
    /// Python code).
    backends: Backends,
    passthrough: bool,
    provider_error: ProviderError,
    /// The configured Python backends, for `Engine.backends`.
    py_backends: Vec<Py<Backend>>,
}

/// The whole call policy shared by every call of a transport (or of several transports given the
/// same engine): retry policy and budget, backends and their cooldowns, blocks and breakers, the
/// adaptive concurrency limit and pacing of each backend, and the statistics.
///
/// Built from validated settings; a bad value raises `ValueError` naming the argument.
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (
        *,
        backends = None,
        max_attempts = i64::from(RetryPolicy::default().max_attempts()),
        deadline = RetryPolicy::default().deadline().map(|d| d.as_secs_f64()),
        max_wait = RetryPolicy::default().max_wait().as_secs_f64(),
        backoff_base = Backoff::default().base().as_secs_f64(),
        backoff_cap = Backoff::default().cap().as_secs_f64(),
        hint_jitter = DEFAULT_HINT_JITTER,
        budget_ttl = DEFAULT_BUDGET_TTL,
        budget_min_per_sec = DEFAULT_BUDGET_MIN_PER_SEC,
        budget_ratio = DEFAULT_BUDGET_RATIO,
        seed = None,
        initial_concurrency = None,
        min_concurrency = i64::from(LimitConfig::default().min()),
        max_concurrency = i64::from(LimitConfig::default().max()),
        rpm = None,
        tpm = None,
        queue_timeout = DEFAULT_QUEUE_TIMEOUT,
        chars_per_token = None,
        prompt_share = None,
        default_completion_tokens = None,
        hedge_quantile = Some(DEFAULT_HEDGE_QUANTILE),
        hedge_min_samples = i64::from(DEFAULT_HEDGE_MIN_SAMPLES),
        hedge_budget = DEFAULT_HEDGE_RATIO,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backends: Option<Vec<Bound<'_, Backend>>>,
        max_attempts: i64,
        deadline: Option<f64>,
        max_wait: f64,
        backoff_base: f64,
        backoff_cap: f64,
        hint_jitter: f64,
        budget_ttl: f64,
        budget_min_per_sec: i64,
        budget_ratio: f64,
        seed: Option<u64>,
        initial_concurrency: Option<i64>,
        min_concurrency: i64,
        max_concurrency: i64,
        rpm: Option<f64>,
        tpm: Option<f64>,
        queue_timeout: f64,
        chars_per_token: Option<f64>,
        prompt_share: Option<f64>,
        default_completion_tokens: Option<u64>,
        hedge_quantile: Option<f64>,
        hedge_min_samples: i64,
        hedge_budget: f64,
    ) -> PyResult<Self> {
        let settings = Settings {
            max_attempts: count("max_attempts", max_attempts)?,
            deadline: deadline.map(|d| seconds("deadline", d)).transpose()?,
            max_wait: seconds("max_wait", max_wait)?,
            backoff_base: seconds("backoff_base", backoff_base)?,
            backoff_cap: seconds("backoff_cap", backoff_cap)?,
            hint_jitter: fraction("hint_jitter", hint_jitter)?,
            budget_ttl: seconds("budget_ttl", budget_ttl)?,
            budget_min_per_sec: count("budget_min_per_sec", budget_min_per_sec)?,
            budget_ratio: fraction("budget_ratio", budget_ratio)?,
            seed,
            hedge: Hedging {
                quantile: hedge_quantile
                    .map(|q| fraction("hedge_quantile", q))
                    .transpose()?,
                min_samples: count("hedge_min_samples", hedge_min_samples)?,
                ratio: fraction("hedge_budget", hedge_budget)?,
            },
        };
        let d = TokenEstimator::default();
        let defaults = (4.0, 1.0, d.default_completion_tokens());
        let tokens = TokenEstimator::new(
            chars_per_token.unwrap_or(defaults.0),
            prompt_share.unwrap_or(defaults.1),
            default_completion_tokens.unwrap_or(defaults.2),
        )
        .map_err(|e| config_error(&e))?;
        let load = Load {
            initial_concurrency: initial_concurrency
                .map(|n| count("initial_concurrency", n))
                .transpose()?,
            min_concurrency: count("min_concurrency", min_concurrency)?,
            max_concurrency: count("max_concurrency", max_concurrency)?,
            rpm,
            tpm,
            queue_timeout: seconds("queue_timeout", queue_timeout)?,
            tokens,
        };
        Self::build(py, settings, load, backends)
    }

    /// Opens a call: one user request, however many attempts it takes. `body` is the request
    /// body, for the token estimate that pacing charges; `origin` the `host[:port]` it goes to,
    /// named in a passthrough engine's 403 support record.
    #[pyo3(signature = (body = None, origin = None))]
    fn start(&self, body: Option<&[u8]>, origin: Option<String>) -> Call {
        let mut core = lock(&self.shared.core);
        let (now, _) = core.now();
        let mut call = core.engine.start(now, body.unwrap_or_default(), None);
        drop(core);
        if let Some(origin) = origin {
            call.set_origin(origin);
        }
        Call {
            shared: self.shared.clone(),
            state: Arc::new(Mutex::new(CallState {
                call,
                wait_until: None,
                passes_wake_on: false,
            })),
        }
    }

    /// Whether requests go where they already point (no backends configured).
    #[getter]
    fn passthrough(&self) -> bool {
        self.shared.passthrough
    }

    /// The configured backends (empty for a passthrough engine).
    #[getter]
    fn backends<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.shared.py_backends.iter().map(|b| b.clone_ref(py)))
    }

    /// Total attempts per call, the first included.
    #[getter]
    fn max_attempts(&self) -> u32 {
        self.shared.settings.max_attempts
    }

    /// The longest a call may take, waits included, in seconds (`None`: no deadline).
    #[getter]
    fn deadline(&self) -> Option<f64> {
        self.shared.settings.deadline.map(|d| d.as_secs_f64())
    }

    /// The longest single wait, in seconds.
    #[getter]
    fn max_wait(&self) -> f64 {
        self.shared.settings.max_wait.as_secs_f64()
    }

    /// The first un-hinted backoff's upper bound, in seconds.
    #[getter]
    fn backoff_base(&self) -> f64 {
        self.shared.settings.backoff_base.as_secs_f64()
    }

    /// The largest un-hinted backoff, in seconds.
    #[getter]
    fn backoff_cap(&self) -> f64 {
        self.shared.settings.backoff_cap.as_secs_f64()
    }

    /// The largest fraction added on top of a server hint (retry waits and cooldowns alike).
    #[getter]
    fn hint_jitter(&self) -> f64 {
        self.shared.settings.hint_jitter
    }

    /// The retry budget's window, in seconds.
    #[getter]
    fn budget_ttl(&self) -> f64 {
        self.shared.settings.budget_ttl.as_secs_f64()
    }

    /// Retries per second the budget allows regardless of traffic.
    #[getter]
    fn budget_min_per_sec(&self) -> u32 {
        self.shared.settings.budget_min_per_sec
    }

    /// Retries per call the budget allows on top of the reserve.
    #[getter]
    fn budget_ratio(&self) -> f64 {
        self.shared.settings.budget_ratio
    }

    /// The jitter's seed, if one was given.
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.shared.settings.seed
    }

    /// The concurrency limit each backend starts at.
    #[getter]
    fn initial_concurrency(&self) -> u32 {
        self.shared.load.limit().initial()
    }

    /// The lowest concurrency limit.
    #[getter]
    fn min_concurrency(&self) -> u32 {
        self.shared.load.min_concurrency
    }

    /// The highest concurrency limit.
    #[getter]
    fn max_concurrency(&self) -> u32 {
        self.shared.load.max_concurrency
    }

    /// Known requests-per-minute quota of every backend without its own.
    #[getter]
    fn rpm(&self) -> Option<f64> {
        self.shared.load.rpm
    }

    /// Known tokens-per-minute quota of every backend without its own.
    #[getter]
    fn tpm(&self) -> Option<f64> {
        self.shared.load.tpm
    }

    /// The longest a call waits for a concurrency permit, in seconds.
    #[getter]
    fn queue_timeout(&self) -> f64 {
        self.shared.load.queue_timeout.as_secs_f64()
    }

    /// The latency quantile after which an async call is hedged (`None`: hedging is off).
    #[getter]
    fn hedge_quantile(&self) -> Option<f64> {
        self.shared.settings.hedge.quantile
    }

    /// Latency samples a backend needs before calls to it are hedged.
    #[getter]
    fn hedge_min_samples(&self) -> u32 {
        self.shared.settings.hedge.min_samples
    }

    /// The share of extra requests hedging may cost (over a 10 s window).
    #[getter]
    fn hedge_budget(&self) -> f64 {
        self.shared.settings.hedge.ratio
    }

    /// Retries the budget still allows now.
    fn budget_remaining(&self) -> u32 {
        let core = lock(&self.shared.core);
        let (now, _) = core.now();
        core.engine.budget_remaining(now)
    }

    /// Counters and gauges per backend, and recent 403 support records, as plain dicts.
    /// `in_flight` counts attempts holding a permit (a success until its body ends),
    /// `queue_depth` the calls waiting for one.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let snapshot = {
            let mut core = lock(&self.shared.core);
            let (now, wall) = core.now();
            core.engine.stats(now, wall).clone()
        };
        stats_dict(py, &snapshot)
    }

    /// Why throttling happened, from what was observed: quota, capacity, provisioned, region;
    /// and the support record of each 403 block.
    fn diagnose(&self) -> Diagnosis {
        let diagnosis = {
            let mut core = lock(&self.shared.core);
            let (now, wall) = core.now();
            core.engine.diagnose(now, wall)
        };
        Diagnosis::new(diagnosis)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let s = &self.shared;
        let backends = if s.passthrough {
            "None".to_owned()
        } else {
            let names: Vec<String> = s
                .py_backends
                .iter()
                .map(|b| format!("{:?}", b.bind(py).get().name_str()))
                .collect();
            format!("[{}]", names.join(", "))
        };
        let limit = s.load.limit();
        let num = |v: Option<f64>| v.map_or_else(|| "None".to_owned(), |x| format!("{x:?}"));
        format!(
            "Engine({}, backends={backends}, initial_concurrency={}, min_concurrency={}, \
             max_concurrency={}, rpm={}, tpm={}, queue_timeout={:?}, hedge_quantile={}, \
             hedge_min_samples={}, hedge_budget={:?})",
            settings_repr(&s.settings),
            limit.initial(),
            limit.min(),
            limit.max(),
            num(s.load.rpm),
            num(s.load.tpm),
            s.load.queue_timeout.as_secs_f64(),
            num(s.settings.hedge.quantile),
            s.settings.hedge.min_samples,
            s.settings.hedge.ratio,
        )
    }
}

/// The settings as `name=value, ...`, Python style.
pub(crate) fn settings_repr(s: &Settings) -> String {
    let deadline = s
        .deadline
        .map_or_else(|| "None".to_owned(), |d| format!("{:?}", d.as_secs_f64()));
    let seed = s.seed.map_or_else(|| "None".to_owned(), |x| x.to_string());
    format!(
        "max_attempts={}, deadline={deadline}, max_wait={:?}, backoff_base={:?}, backoff_cap={:?}, \
         hint_jitter={:?}, budget_ttl={:?}, budget_min_per_sec={}, budget_ratio={:?}, seed={seed}",
        s.max_attempts,
        s.max_wait.as_secs_f64(),
        s.backoff_base.as_secs_f64(),
        s.backoff_cap.as_secs_f64(),
        s.hint_jitter,
        s.budget_ttl.as_secs_f64(),
        s.budget_min_per_sec,
        s.budget_ratio,
    )
}

/// The core configuration from the glue's settings.
pub(crate) fn engine_config(
    settings: &Settings,
    load: &Load,
    per_backend: Vec<(String, PacingConfig)>,
) -> Result<EngineConfig, ConfigError> {
    Ok(EngineConfig {
        retry: settings.policy()?,
        budget: settings.budget()?,
        route: settings.route()?,
        limit: load.limit(),
        pacing: load.pacing(load.rpm, load.tpm),
        pacing_by_backend: per_backend,
        tokens: load.tokens,
        queue_timeout: load.queue_timeout,
        seed: settings.seed,
    })
}

impl Engine {
    fn build(
        py: Python<'_>,
        settings: Settings,
        load: Load,
        backends: Option<Vec<Bound<'_, Backend>>>,
    ) -> PyResult<Self> {
        let provider_error: ProviderError = Arc::new(Mutex::new(None));
        let mut per_backend = Vec::new();
        let core_backends = match &backends {
            None => None,
            Some(list) => {
                let mut core = Vec::with_capacity(list.len());
                for (i, b) in list.iter().enumerate() {
                    let b = b.get();
                    let (rpm, tpm) = b.quotas();
                    if rpm.is_some() || tpm.is_some() {
                        let pacing = load.pacing(rpm.or(load.rpm), tpm.or(load.tpm));
                        // The core checks the quotas; name the backend's own argument.
                        Pacer::new(pacing).map_err(|e| {
                            let arg = if e.field().ends_with("requests_per_minute") {
                                "rpm"
                            } else {
                                "tpm"
                            };
                            PyValueError::new_err(format!(
                                "invalid `backends[{i}].{arg}`: {}",
                                e.reason()
                            ))
                        })?;
                        per_backend.push((b.name_str().to_owned(), pacing));
                    }
                    core.push(b.to_core(py, &provider_error));
                }
                Some(Backends::new(core).map_err(|e| config_error(&e))?)
            }
        };
        let config = engine_config(&settings, &load, per_backend).map_err(|e| config_error(&e))?;
        let engine = Core::new(core_backends, config).map_err(|e| config_error(&e))?;
        let passthrough = engine.is_passthrough();
        let copy = engine.backends().clone();
        Ok(Self {
            shared: Arc::new(Shared {
                settings,
                load,
                core: Mutex::new(CoreState {
                    engine,
                    floor: None,
                }),
                backends: copy,
                passthrough,
                provider_error,
                py_backends: backends
                    .unwrap_or_default()
                    .into_iter()
                    .map(Bound::unbind)
                    .collect(),
            }),
        })
    }
}

pub(crate) struct CallState {
    call: EngineCall,
    /// When the wait the driver was last told to do ends.
    wait_until: Option<Instant>,
    /// The engine's word, with the latest `next()`, on passing a queue wake on.
    passes_wake_on: bool,
}

/// One user request through its attempts: ask `next()` what to do, carry it out.
///
/// `next()` answers `("send", Attempt)`, `("wait", seconds)` (sleep, then ask again),
/// `("queue", seconds)` (wait until an attempt of this engine ends, or that long, then ask
/// again) or `("fail", Failure)` (raise).
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Call {
    shared: Arc<Shared>,
    state: Arc<Mutex<CallState>>,
}

impl Call {
    /// Time left before the call's deadline, on the engine's clock.
    fn remaining_time(&self) -> Option<Duration> {
        let state = lock(&self.state);
        let deadline = state.call.deadline()?;
        let (now, _) = lock(&self.shared.core).now();
        Some(deadline.saturating_duration_since(now))
    }
}

#[pymethods]
impl Call {
    /// Whether the body of a response with this status must be read (its first
    /// `MAX_ERROR_BODY` bytes) before `on_response`. Success bodies are never read.
    #[staticmethod]
    fn needs_body(status: u16) -> bool {
        StatusCode::from_u16(status).is_ok_and(classify::needs_body)
    }

    /// What the call does next. Call it again only after carrying out a `wait` or `queue`.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let mut state = lock(&self.state);
        let next = {
            let mut core = lock(&self.shared.core);
            if let Some(until) = state.wait_until.take() {
                // The driver slept until `until`: time has passed that far, whatever the clock
                // says (a fake sleep returns at once).
                core.floor = Some(core.floor.map_or(until, |f| f.max(until)));
            }
            let (now, _) = core.now();
            let next = core.engine.next(&mut state.call, now);
            if let Next::Wait(d) = &next {
                state.wait_until = now.checked_add(*d);
            }
            state.passes_wake_on = core.engine.passes_wake_on(&next, now);
            next
        };
        drop(state);
        match next {
            Next::Send(ticket) => {
                let attempt = Attempt::new(&self.shared, &self.state, ticket);
                let attempt = Bound::new(py, attempt)?;
                PyTuple::new(py, [intern_str(py, "send"), attempt.into_any()])
            }
            Next::Wait(d) => PyTuple::new(
                py,
                [
                    intern_str(py, "wait"),
                    d.as_secs_f64().into_pyobject(py)?.into_any(),
                ],
            ),
            Next::Queue(d) => PyTuple::new(
                py,
                [
                    intern_str(py, "queue"),
                    d.as_secs_f64().into_pyobject(py)?.into_any(),
                ],
            ),
            Next::Fail(failure) => {
                let failure = Bound::new(py, FailureInfo::new(failure))?;
                PyTuple::new(py, [intern_str(py, "fail"), failure.into_any()])
            }
            // A decision a later core adds that this glue does not carry out: fail loudly.
            other => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "unsupported engine decision: {other:?}"
            ))),
        }
    }

    /// Whether this call, if a returned permit woke it from the queue before its latest
    /// `next()`, passes the wake on to the next queued call (it took its permit and room is
    /// left, or it fails): the engine's rule, the same for every driver.
    #[getter]
    fn passes_wake_on(&self) -> bool {
        lock(&self.state).passes_wake_on
    }

    /// Attempts sent so far.
    #[getter]
    fn attempts(&self) -> u32 {
        lock(&self.state).call.attempts()
    }

    /// The latest attempt's outcome (`"success"`, `"throttled_quota"`, `"blocked"`, ...), if any.
    #[getter]
    fn last_outcome(&self) -> Option<&'static str> {
        lock(&self.state).call.last_outcome().map(|o| o.as_str())
    }

    /// The estimated tokens of the call's request.
    #[getter]
    fn tokens(&self) -> u64 {
        lock(&self.state).call.tokens()
    }

    /// Names the `host[:port]` the request goes to, for a passthrough engine's 403 support
    /// record (as `Engine.start`'s `origin`). A driver may name it only when an answer needs its
    /// body read (a 403 among them), sparing the work on every success.
    fn set_origin(&self, origin: String) {
        lock(&self.state).call.set_origin(origin);
    }

    /// Ends the call (returned, raised, or abandoned): it leaves the permit queue if it waited
    /// there, so `queue_depth` stays exact. Idempotent; dropping the call does the same.
    fn forget(&self) {
        let mut state = lock(&self.state);
        if state.call.is_queued() {
            lock(&self.shared.core).engine.forget(&mut state.call);
        }
    }

    /// How long to let `primary` run before hedging it, in seconds; `None` when the call is not
    /// hedged (hedging off, too little latency history, already hedged, or past the deadline).
    fn hedge_delay(&self, primary: &Attempt) -> Option<f64> {
        let state = lock(&self.state);
        let core = lock(&self.shared.core);
        let (now, _) = core.now();
        core.engine
            .hedge_delay(&state.call, primary.backend, now)
            .map(|d| d.as_secs_f64())
    }

    /// A hedge of `primary` (still running): an attempt to a different usable backend with
    /// room, if the hedge budget allows one; `None` otherwise. The first successful answer wins;
    /// cancel the other attempt.
    fn hedge(&self, primary: &Attempt) -> Option<Attempt> {
        let mut state = lock(&self.state);
        let ticket = {
            let mut core = lock(&self.shared.core);
            let (now, _) = core.now();
            core.engine.hedge(&mut state.call, primary.backend, now)
        }?;
        drop(state);
        Some(Attempt::new(&self.shared, &self.state, ticket))
    }

    /// Seconds left before the call's deadline (`None`: no deadline).
    fn remaining(&self) -> Option<f64> {
        self.remaining_time().map(|r| r.as_secs_f64())
    }

    /// Seconds to wait, at most, for the start of an error body before classifying on what
    /// arrived (the core's `error_body_wait`: 10 s, never past the deadline).
    fn error_body_wait(&self) -> f64 {
        tower_aoai::policy::classify::error_body_wait(self.remaining_time()).as_secs_f64()
    }

    fn __repr__(&self) -> String {
        let state = lock(&self.state);
        format!(
            "Call(attempts={}, last_outcome={})",
            state.call.attempts(),
            state
                .call
                .last_outcome()
                .map_or_else(|| "None".to_owned(), |o| format!("{:?}", o.as_str()))
        )
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if state.call.is_queued() {
            lock(&self.shared.core).engine.forget(&mut state.call);
        }
    }
}

fn intern_str<'py>(py: Python<'py>, s: &'static str) -> Bound<'py, PyAny> {
    pyo3::types::PyString::intern(py, s).into_any()
}

/// What follows an attempt: `(action, outcome, reason)` with action `"return"`, `"retry"` or
/// `"give_up"`, the attempt's outcome, and the give-up reason.
type PyAfter = (&'static str, &'static str, Option<&'static str>);

/// One send of a call, owning its concurrency permit. Report exactly one outcome
/// (`on_response`, `on_error` or `cancel`); an attempt dropped without one is cancelled, so a
/// cancelled request (asyncio `CancelledError`, `KeyboardInterrupt`) releases its permit.
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Attempt {
    shared: Arc<Shared>,
    call: Arc<Mutex<CallState>>,
    ticket: Mutex<Option<Ticket>>,
    backend: BackendId,
    hedge: bool,
    support_request: Mutex<Option<String>>,
}

#[pymethods]
impl Attempt {
    /// The backend's name (`"default"` for a passthrough engine).
    #[getter]
    fn backend(&self) -> &str {
        self.shared.backends.get(self.backend).name()
    }

    /// The backend's region label, if configured.
    #[getter]
    fn region(&self) -> Option<&str> {
        self.shared.backends.get(self.backend).region()
    }

    /// Whether the request must be rewritten for the backend (`False` for a passthrough engine).
    #[getter]
    fn rewrites(&self) -> bool {
        !self.shared.passthrough
    }

    /// Whether the attempt is still waiting for its outcome.
    #[getter]
    fn open(&self) -> bool {
        lock(&self.ticket).is_some()
    }

    /// How the request is rewritten for the backend, its headers left to the caller (only the
    /// few it touches cross into Rust): `(url, host, auth, body)`. `url` is where it goes;
    /// `host` is the `host` header's value, set only if the request has one; every header named
    /// in `REWRITE_REMOVES` goes, then `auth`, the backend's `(name, value)` (or `None`), is set;
    /// `body` is the new body (or `None` to keep it), and then `content-length`, if present,
    /// becomes its length.
    #[allow(clippy::type_complexity)]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        url: &str,
        body: Option<&[u8]>,
    ) -> PyResult<(
        String,
        Bound<'py, PyBytes>,
        Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)>,
        Option<Bound<'py, PyBytes>>,
    )> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| PyValueError::new_err(format!("invalid `url`: {e}")))?;
        let planned = self.shared.backends.plan(self.backend, &uri, body);
        if let Some(err) = lock(&self.shared.provider_error).take() {
            return Err(err);
        }
        let plan = planned.map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok((
            plan.uri.to_string(),
            PyBytes::new(py, plan.host.as_bytes()),
            plan.auth.map(|(name, value)| {
                (
                    PyBytes::new(py, name.as_str().as_bytes()),
                    PyBytes::new(py, value.as_bytes()),
                )
            }),
            plan.body.map(|b| PyBytes::new(py, &b)),
        ))
    }

    /// Feeds the attempt's response: `status`, raw `headers` (an iterable of `(bytes, bytes)`,
    /// such as `response.headers.raw`, or of httpx's `(name, lower-case name, value)` triples;
    /// of a response other than a 403, only the headers the engine reads are converted)
    /// and, for statuses that need it, the body's first bytes.
    /// The permit goes back now, whatever the outcome.
    #[pyo3(signature = (status, headers, body_prefix = None))]
    fn on_response(
        &self,
        py: Python<'_>,
        status: u16,
        headers: &Bound<'_, PyAny>,
        body_prefix: Option<&[u8]>,
    ) -> PyResult<PyAfter> {
        Ok(self.respond(py, status, headers, body_prefix, false)?.0)
    }

    /// `on_response` for a response whose body is handed up as a stream: a success keeps its
    /// permit in the returned [`Lease`] until the body ends, is closed or is dropped (end it
    /// with `finish`, `fail` or `cancel`); any other outcome gives it back now (no lease).
    #[pyo3(signature = (status, headers, body_prefix = None))]
    fn on_response_streamed(
        &self,
        py: Python<'_>,
        status: u16,
        headers: &Bound<'_, PyAny>,
        body_prefix: Option<&[u8]>,
    ) -> PyResult<(PyAfter, Option<Lease>)> {
        let (after, lease) = self.respond(py, status, headers, body_prefix, true)?;
        let lease = lease.map(|lease| Lease {
            shared: self.shared.clone(),
            lease: Mutex::new(Some(lease)),
            backend: self.backend,
        });
        Ok((after, lease))
    }

    /// Feeds an attempt that got no response: `kind` is `"timeout"` or `"connect"` (any other
    /// transport failure).
    fn on_error(&self, kind: &str) -> PyResult<PyAfter> {
        let error = match kind {
            "timeout" => TransportError::Timeout,
            "connect" => TransportError::Connect,
            other => {
                return Err(PyValueError::new_err(format!(
                    "invalid `kind`: expected \"timeout\" or \"connect\", got {other:?}"
                )));
            }
        };
        let ticket = self.take_ticket()?;
        let mut state = lock(&self.call);
        let mut core = lock(&self.shared.core);
        let (now, wall) = core.now();
        let after = core
            .engine
            .on_error(&mut state.call, ticket, error, now, wall);
        Ok(py_after(after, state.call.last_outcome()))
    }

    /// Ends the attempt without an outcome (cancelled): its permit goes back. Idempotent.
    fn cancel(&self) {
        self.release();
    }

    /// For a 403 block: the text of a support request (resource, region, apim-request-id, time,
    /// the response without secrets).
    #[getter]
    fn support_request(&self) -> Option<String> {
        lock(&self.support_request).clone()
    }

    /// Whether the attempt is a hedge of another one of its call.
    #[getter]
    fn hedge(&self) -> bool {
        self.hedge
    }

    fn __repr__(&self) -> String {
        format!(
            "Attempt(backend={:?}, open={}, hedge={})",
            self.shared.backends.get(self.backend).name(),
            lock(&self.ticket).is_some(),
            self.hedge
        )
    }
}

impl Attempt {
    fn new(shared: &Arc<Shared>, call: &Arc<Mutex<CallState>>, ticket: Ticket) -> Self {
        Self {
            shared: shared.clone(),
            call: call.clone(),
            backend: ticket.backend(),
            hedge: ticket.is_hedge(),
            ticket: Mutex::new(Some(ticket)),
            support_request: Mutex::new(None),
        }
    }

    fn respond(
        &self,
        py: Python<'_>,
        status: u16,
        headers: &Bound<'_, PyAny>,
        body_prefix: Option<&[u8]>,
        streamed: bool,
    ) -> PyResult<(PyAfter, Option<CoreLease>)> {
        let status = StatusCode::from_u16(status).map_err(|_| {
            PyValueError::new_err(format!(
                "invalid `status`: must be between 100 and 999, got {status}"
            ))
        })?;
        let headers = header_map(py, headers, classify::needs_all_headers(status))?;
        let ticket = self.take_ticket()?;
        let mut state = lock(&self.call);
        let mut core = lock(&self.shared.core);
        let (now, wall) = core.now();
        let (after, lease) = if streamed {
            core.engine.on_response_streamed(
                &mut state.call,
                ticket,
                status,
                &headers,
                body_prefix,
                now,
                wall,
            )
        } else {
            let after = core.engine.on_response(
                &mut state.call,
                ticket,
                status,
                &headers,
                body_prefix,
                now,
                wall,
            );
            (after, None)
        };
        let outcome = state.call.last_outcome();
        if outcome == Some(tower_aoai::policy::Outcome::Blocked) {
            let text = core
                .engine
                .stats(now, wall)
                .blocks()
                .last()
                .map(|r| r.support_request());
            *lock(&self.support_request) = text;
        }
        Ok((py_after(after, outcome), lease))
    }

    fn take_ticket(&self) -> PyResult<Ticket> {
        lock(&self.ticket).take().ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("this attempt already has its outcome")
        })
    }

    fn release(&self) {
        if let Some(ticket) = lock(&self.ticket).take() {
            let mut core = lock(&self.shared.core);
            let (now, _) = core.now();
            core.engine.on_cancel(ticket, now);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.release();
    }
}

/// The concurrency permit of a successful attempt whose body is still being read (from
/// `Attempt.on_response_streamed`): the backend works on the call until the body ends. End it
/// exactly once — `finish` (read to the end), `fail` (broke off) or `cancel` (closed early); the
/// first end counts, later ones are no-ops. Dropped while open, it is cancelled.
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Lease {
    shared: Arc<Shared>,
    lease: Mutex<Option<CoreLease>>,
    backend: BackendId,
}

#[pymethods]
impl Lease {
    /// The backend's name.
    #[getter]
    fn backend(&self) -> &str {
        self.shared.backends.get(self.backend).name()
    }

    /// Whether the lease still holds its permit.
    #[getter]
    fn open(&self) -> bool {
        lock(&self.lease).is_some()
    }

    /// The body was read to its end: the attempt counts as a success, its round trip measured
    /// to now. Returns whether this ended the lease.
    fn finish(&self) -> bool {
        self.end(BodyEnd::Finished)
    }

    /// The body broke off (a transport error): counted as a connection failure. Returns whether
    /// this ended the lease.
    fn fail(&self) -> bool {
        self.end(BodyEnd::Failed)
    }

    /// The body was closed before its end: the permit goes back without an outcome. Returns
    /// whether this ended the lease.
    fn cancel(&self) -> bool {
        self.end(BodyEnd::Dropped)
    }

    fn __repr__(&self) -> String {
        format!(
            "Lease(backend={:?}, open={})",
            self.shared.backends.get(self.backend).name(),
            lock(&self.lease).is_some()
        )
    }
}

impl Lease {
    fn end(&self, how: BodyEnd) -> bool {
        let Some(lease) = lock(&self.lease).take() else {
            return false;
        };
        let mut core = lock(&self.shared.core);
        let (now, _) = core.now();
        core.engine.end_body(lease, how, now);
        true
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.end(BodyEnd::Dropped);
    }
}

fn py_after(after: After, outcome: Option<tower_aoai::policy::Outcome>) -> PyAfter {
    let outcome = outcome.map_or("unknown", |o| o.as_str());
    match after {
        After::Retry => ("retry", outcome, None),
        After::GiveUp(reason) => ("give_up", outcome, Some(reason.as_str())),
        // `Return`, and any decision a later core adds: hand the answer up as it is.
        _ => ("return", outcome, None),
    }
}

/// Why a call cannot be served: `kind` (`"blocked"`, `"overloaded"`, `"no_backend"`,
/// `"deadline_exceeded"`), a message, and for a block the support record.
#[pyclass(frozen, name = "Failure", module = "tower_aoai._core")]
pub struct FailureInfo {
    failure: Failure,
}

impl FailureInfo {
    fn new(failure: Failure) -> Self {
        Self { failure }
    }
}

#[pymethods]
impl FailureInfo {
    /// `"blocked"`, `"overloaded"`, `"no_backend"` or `"deadline_exceeded"`.
    #[getter]
    fn kind(&self) -> &'static str {
        match &self.failure {
            Failure::Blocked(_) => "blocked",
            Failure::Overloaded => "overloaded",
            Failure::NoBackend => "no_backend",
            _ => "deadline_exceeded",
        }
    }

    /// What happened, in a sentence.
    #[getter]
    fn message(&self) -> String {
        self.failure.to_string()
    }

    /// For a block: the support record as a dict.
    #[getter]
    fn record<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match &self.failure {
            Failure::Blocked(record) => record_dict(py, record).map(Some),
            _ => Ok(None),
        }
    }

    /// For a block: the text of a support request.
    #[getter]
    fn support_request(&self) -> Option<String> {
        match &self.failure {
            Failure::Blocked(record) => Some(record.support_request()),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        format!("Failure({:?})", self.kind())
    }
}

/// Builds a header map from `(bytes, bytes)` pairs (or httpx's `(name, lower-case name, value)`
/// triples), skipping (and logging at debug) any name or value that is not valid HTTP: a hostile
/// header must not stop the call. Without `all`, only the headers the core reads
/// ([`headers::READ`]) are converted: an Azure answer carries a dozen more, each a parse, a hash
/// and an insert. Every item is checked for its type either way.
fn header_map(py: Python<'_>, headers: &Bound<'_, PyAny>, all: bool) -> PyResult<HeaderMap> {
    let mut map = HeaderMap::with_capacity(if all { headers.len().unwrap_or(0) } else { 0 });
    let mut add = |item: &Bound<'_, PyAny>| -> PyResult<()> {
        let not_pairs = || PyTypeError::new_err("headers must be (bytes, bytes) pairs");
        // `(name, value)`, or httpx's own `(name, lower-case name, value)`.
        let pair = item
            .cast::<PyTuple>()
            .ok()
            .filter(|t| matches!(t.len(), 2 | 3))
            .ok_or_else(not_pairs)?;
        let (name, value) = (
            pair.get_borrowed_item(0)?,
            pair.get_borrowed_item(pair.len() - 1)?,
        );
        let (Ok(name), Ok(value)) = (name.cast::<PyBytes>(), value.cast::<PyBytes>()) else {
            return Err(not_pairs());
        };
        if !all && !headers::is_read(name.as_bytes()) {
            return Ok(());
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => log_skipped_header(py, name.as_bytes()),
        }
        Ok(())
    };
    // httpx's `headers.raw` is a list: walk it without the iterator protocol.
    if let Ok(list) = headers.cast::<PyList>() {
        for item in list.iter() {
            add(&item)?;
        }
    } else {
        for item in headers.try_iter()? {
            add(&item?)?;
        }
    }
    Ok(map)
}

/// Logs a skipped header on the `tower_aoai` logger (rare path: only for invalid headers).
fn log_skipped_header(py: Python<'_>, name: &[u8]) {
    let shown = String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned();
    let logged = py.import("logging").and_then(|logging| {
        logging
            .call_method1("getLogger", ("tower_aoai",))?
            .call_method1("debug", ("skipping an invalid header %r", shown))
    });
    // Logging must never fail a call.
    drop(logged);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings {
            max_attempts: 5,
            deadline: Some(Duration::from_secs(120)),
            max_wait: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            hint_jitter: DEFAULT_HINT_JITTER,
            budget_ttl: Duration::from_secs_f64(DEFAULT_BUDGET_TTL),
            budget_min_per_sec: u32::try_from(DEFAULT_BUDGET_MIN_PER_SEC).unwrap(),
            budget_ratio: DEFAULT_BUDGET_RATIO,
            seed: Some(1),
            hedge: Hedging::default(),
        }
    }

    fn load() -> Load {
        Load {
            initial_concurrency: None,
            min_concurrency: 1,
            max_concurrency: 256,
            rpm: None,
            tpm: None,
            queue_timeout: Duration::from_secs(30),
            tokens: TokenEstimator::default(),
        }
    }

    /// Every field the core can reject maps to an argument `Engine` really takes.
    #[test]
    fn every_rejected_field_names_a_python_argument() {
        let arguments = [
            "max_attempts",
            "deadline",
            "max_wait",
            "backoff_base",
            "backoff_cap",
            "hint_jitter",
            "budget_ttl",
            "budget_min_per_sec",
            "budget_ratio",
        ];
        let broken: [fn(&mut Settings); 8] = [
            |s| s.max_attempts = 0,
            |s| s.deadline = Some(Duration::ZERO),
            |s| s.max_wait = Duration::ZERO,
            |s| s.backoff_base = Duration::ZERO,
            |s| s.backoff_cap = Duration::from_millis(1),
            |s| s.hint_jitter = 2.0,
            |s| s.budget_ttl = Duration::ZERO,
            |s| s.budget_ratio = -1.0,
        ];
        let mut seen = Vec::new();
        for breaks in broken {
            let mut settings = defaults();
            breaks(&mut settings);
            let err = engine_config(&settings, &load(), Vec::new())
                .expect_err("broken settings must be rejected");
            let name = argument_name(err.field());
            assert!(arguments.contains(&name), "{} -> {name}", err.field());
            seen.push(name);
        }
        assert_eq!(
            seen,
            [
                "max_attempts",
                "deadline",
                "max_wait",
                "backoff_base",
                "backoff_cap",
                "hint_jitter",
                "budget_ttl",
                "budget_ratio"
            ]
        );
    }

    /// The limiter's and pacing's fields name the Python arguments too.
    #[test]
    fn load_fields_name_python_arguments() {
        let mut l = load();
        l.min_concurrency = 0;
        let err = Core::new(None, engine_config(&defaults(), &l, Vec::new()).unwrap())
            .expect_err("min 0 is rejected");
        assert_eq!(argument_name(err.field()), "min_concurrency");
        let mut l = load();
        l.initial_concurrency = Some(300);
        let err = Core::new(None, engine_config(&defaults(), &l, Vec::new()).unwrap())
            .expect_err("initial above max is rejected");
        assert_eq!(argument_name(err.field()), "initial_concurrency");
        let mut l = load();
        l.rpm = Some(-1.0);
        let err = Core::new(None, engine_config(&defaults(), &l, Vec::new()).unwrap())
            .expect_err("a negative rpm is rejected");
        assert_eq!(argument_name(err.field()), "rpm");
        // Only a max: the start is clamped under it rather than rejected.
        let mut l = load();
        l.max_concurrency = 2;
        assert_eq!(l.limit().initial(), 2);
    }

    /// The glue's defaults build the core's own defaults.
    #[test]
    fn defaults_are_the_cores() {
        let settings = defaults();
        let policy = settings.policy().unwrap();
        let core = RetryPolicy::default();
        assert_eq!(policy.max_attempts(), core.max_attempts());
        assert_eq!(policy.deadline(), core.deadline());
        assert_eq!(policy.max_wait(), core.max_wait());
        assert_eq!(policy.backoff(), core.backoff());
        let t0 = Instant::now();
        let (mut ours, mut theirs) = (settings.budget().unwrap(), RetryBudget::default());
        assert_eq!(ours.ttl(), theirs.ttl());
        for _ in 0..200 {
            ours.deposit(t0);
            theirs.deposit(t0);
        }
        while theirs.try_withdraw(t0) {
            assert!(ours.try_withdraw(t0));
        }
        assert!(!ours.try_withdraw(t0));
        assert_eq!(load().limit(), LimitConfig::default());
        assert_eq!(load().queue_timeout, EngineConfig::default().queue_timeout);
    }

    #[test]
    fn repr_shows_every_setting() {
        let shown = settings_repr(&defaults());
        assert_eq!(
            shown,
            "max_attempts=5, deadline=120.0, max_wait=60.0, backoff_base=0.5, backoff_cap=8.0, \
             hint_jitter=0.1, budget_ttl=10.0, budget_min_per_sec=10, budget_ratio=0.2, seed=1"
        );
    }
}
