//! The retry engine and its per-call state, as Python objects.
//!
//! The transports open one [`Call`] per request and feed it each attempt's outcome; the call asks
//! `tower_aoai::policy` what to do and answers with an action tuple. No decision is made here: this
//! file only converts Python values to the core's types and back.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use tower_aoai::policy::classify::{self, TransportError};
use tower_aoai::policy::{Action, Backoff, Classification, ConfigError, RetryBudget, RetryPolicy};

/// Default share of calls that may be retried (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Default retries per second allowed regardless of traffic (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_MIN_PER_SEC: i64 = 10;
/// Default budget window in seconds (the core's `RetryBudget::default`).
pub(crate) const DEFAULT_BUDGET_TTL: f64 = 10.0;
/// Default jitter fraction on top of server hints (the core's `Backoff::default`).
pub(crate) const DEFAULT_HINT_JITTER: f64 = 0.1;

/// The validated settings of an [`Engine`], kept to rebuild the same policy elsewhere (the parity
/// hook) and to show them in `repr()`.
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

    pub(crate) fn rng(&self) -> fastrand::Rng {
        self.seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed)
    }
}

/// The Python argument that a core configuration field comes from.
fn argument_name(field: &str) -> &str {
    match field {
        "backoff.base" => "backoff_base",
        "backoff.cap" => "backoff_cap",
        "backoff.hint_jitter" => "hint_jitter",
        "budget.ttl" => "budget_ttl",
        "budget.min_per_sec" => "budget_min_per_sec",
        "budget.ratio" => "budget_ratio",
        other => other,
    }
}

/// A rejected configuration field as a Python `ValueError` naming the argument.
pub(crate) fn config_error(err: &ConfigError) -> PyErr {
    PyValueError::new_err(format!(
        "invalid `{}`: {}",
        argument_name(err.field()),
        err.reason()
    ))
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

pub(crate) struct Shared {
    pub(crate) settings: Settings,
    policy: RetryPolicy,
    budget: Mutex<RetryBudget>,
    rng: Mutex<fastrand::Rng>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the budget or the RNG invalid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The retry policy, retry budget and random source shared by every call of one transport (or of
/// several transports given the same engine).
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
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
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
        };
        Self::from_settings(settings)
    }

    /// Opens a call: one user request, however many attempts it takes.
    fn start(&self) -> Call {
        let state = {
            let mut budget = lock(&self.shared.budget);
            self.shared.policy.start(Instant::now(), None, &mut budget)
        };
        Call {
            shared: self.shared.clone(),
            state: Mutex::new(state),
        }
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

    /// The largest fraction added on top of a server hint.
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

    /// Retries the budget still allows now.
    fn budget_remaining(&self) -> u32 {
        lock(&self.shared.budget).remaining(Instant::now())
    }

    fn __repr__(&self) -> String {
        let s = &self.shared.settings;
        format!("Engine({})", settings_repr(s))
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

impl Engine {
    pub(crate) fn from_settings(settings: Settings) -> PyResult<Self> {
        let policy = settings.policy().map_err(|e| config_error(&e))?;
        let budget = settings.budget().map_err(|e| config_error(&e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                settings,
                policy,
                budget: Mutex::new(budget),
                rng: Mutex::new(settings.rng()),
            }),
        })
    }
}

/// One user request through its attempts: feed it each attempt's outcome, carry out the action.
///
/// Actions are tuples `(kind, delay_seconds, reason)`:
/// `("return", None, None)`: hand the response (or re-raise the error) to the caller;
/// `("retry", delay, outcome)`: close the response, sleep `delay`, send again;
/// `("give_up", None, reason)`: return the response marked `x-should-retry: false` (or re-raise).
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Call {
    shared: Arc<Shared>,
    state: Mutex<tower_aoai::policy::CallState>,
}

type PyAction = (&'static str, Option<f64>, Option<&'static str>);

#[pymethods]
impl Call {
    /// Whether the body of a response with this status must be read (its first
    /// `MAX_ERROR_BODY` bytes) before `on_response`. Success bodies are never read.
    #[staticmethod]
    fn needs_body(status: u16) -> bool {
        StatusCode::from_u16(status).is_ok_and(classify::needs_body)
    }

    /// Decides what follows a response: `status`, raw `headers` (an iterable of `(bytes, bytes)`,
    /// such as `response.headers.raw`) and, for statuses that need it, the body's first bytes.
    #[pyo3(signature = (status, headers, body_prefix = None))]
    fn on_response(
        &self,
        py: Python<'_>,
        status: u16,
        headers: &Bound<'_, PyAny>,
        body_prefix: Option<&[u8]>,
    ) -> PyResult<PyAction> {
        let status = StatusCode::from_u16(status).map_err(|_| {
            PyValueError::new_err(format!(
                "invalid `status`: must be between 100 and 999, got {status}"
            ))
        })?;
        let headers = header_map(py, headers)?;
        let class = classify::classify_response(status, &headers, body_prefix, SystemTime::now());
        Ok(self.decide(&class))
    }

    /// Decides what follows an attempt that got no response: `kind` is `"timeout"` or
    /// `"connect"` (any other transport failure).
    fn on_error(&self, kind: &str) -> PyResult<PyAction> {
        let error = match kind {
            "timeout" => TransportError::Timeout,
            "connect" => TransportError::Connect,
            other => {
                return Err(PyValueError::new_err(format!(
                    "invalid `kind`: expected \"timeout\" or \"connect\", got {other:?}"
                )));
            }
        };
        Ok(self.decide(&classify::classify_error(error)))
    }

    /// Attempts made so far.
    #[getter]
    fn attempts(&self) -> u32 {
        lock(&self.state).attempts()
    }

    /// The last attempt's outcome (`"success"`, `"throttled_quota"`, `"blocked"`, ...), if any.
    #[getter]
    fn last_outcome(&self) -> Option<&'static str> {
        lock(&self.state).last_outcome().map(|o| o.as_str())
    }

    /// Seconds left before the call's deadline (`None`: no deadline).
    fn remaining(&self) -> Option<f64> {
        lock(&self.state)
            .remaining(Instant::now())
            .map(|d| d.as_secs_f64())
    }

    fn __repr__(&self) -> String {
        let state = lock(&self.state);
        format!(
            "Call(attempts={}, last_outcome={})",
            state.attempts(),
            state
                .last_outcome()
                .map_or_else(|| "None".to_owned(), |o| format!("{:?}", o.as_str()))
        )
    }
}

impl Call {
    fn decide(&self, class: &Classification) -> PyAction {
        let mut state = lock(&self.state);
        let action = {
            let mut budget = lock(&self.shared.budget);
            let mut rng = lock(&self.shared.rng);
            self.shared
                .policy
                .on_attempt(&mut state, class, Instant::now(), &mut budget, &mut rng)
        };
        match action {
            Action::Retry { after, .. } => (
                "retry",
                Some(after.as_secs_f64()),
                Some(class.outcome.as_str()),
            ),
            Action::GiveUp(reason) => ("give_up", None, Some(reason.as_str())),
            // `Return`, and any action a later core adds that this glue does not carry out yet.
            _ => ("return", None, None),
        }
    }
}

/// Builds a header map from `(bytes, bytes)` pairs, skipping (and logging at debug) any name or
/// value that is not valid HTTP: a hostile header must not stop the call.
fn header_map(py: Python<'_>, headers: &Bound<'_, PyAny>) -> PyResult<HeaderMap> {
    let mut map = HeaderMap::new();
    for item in headers.try_iter()? {
        let item = item?;
        let pair = item
            .cast::<PyTuple>()
            .ok()
            .filter(|t| t.len() == 2)
            .ok_or_else(|| PyTypeError::new_err("headers must be (bytes, bytes) pairs"))?;
        let name = pair.get_item(0)?;
        let value = pair.get_item(1)?;
        let (Ok(name), Ok(value)) = (name.cast::<PyBytes>(), value.cast::<PyBytes>()) else {
            return Err(PyTypeError::new_err("headers must be (bytes, bytes) pairs"));
        };
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => log_skipped_header(py, name.as_bytes()),
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
            .call_method1("debug", ("skipping an invalid response header %r", shown))
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
            let err = settings
                .policy()
                .and_then(|_| settings.budget())
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
