use std::time::Duration;

use tower_layer::Layer;

use super::AdaptiveConcurrency;
use crate::policy::{AdaptiveLimit, ConfigError, LimitConfig, Pacer, PacingConfig, TokenEstimator};

/// Applies [`AdaptiveConcurrency`] to a service: one backend's adaptive limit, pacing and wait
/// queue. See the [module docs](crate::limit).
///
/// Every service the layer builds has its own limit and pacer (one per backend, as tower's
/// `ConcurrencyLimitLayer` gives each service its own semaphore); clones of a built service share
/// them.
#[derive(Debug, Clone)]
pub struct AdaptiveConcurrencyLayer {
    pub(super) settings: Settings,
}

/// The validated settings a layer hands to each service it builds.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) limit: AdaptiveLimit,
    pub(super) pacer: Pacer,
    pub(super) estimator: TokenEstimator,
    pub(super) queue_capacity: usize,
    pub(super) queue_timeout: Duration,
}

impl Default for AdaptiveConcurrencyLayer {
    /// [`LimitConfig::default`], [`PacingConfig::default`] (rates learned from headers), the
    /// default [`TokenEstimator`], a queue of 512 waiting calls, each waiting at most 60 s.
    fn default() -> Self {
        Self::new(LimitConfig::default(), PacingConfig::default())
            .expect("the default limiter settings are valid")
    }
}

impl AdaptiveConcurrencyLayer {
    /// A layer with these limit and pacing settings; a setting out of range is an error naming it.
    pub fn new(limit: LimitConfig, pacing: PacingConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            settings: Settings {
                limit: AdaptiveLimit::new(limit)?,
                pacer: Pacer::new(pacing)?,
                estimator: TokenEstimator::default(),
                queue_capacity: 512,
                queue_timeout: Duration::from_secs(60),
            },
        })
    }

    /// Bounds the wait queue: at most `capacity` calls wait for a permit (more are refused at
    /// once), and none waits (for a permit and for pacing together) longer than `timeout`.
    pub fn with_queue(mut self, capacity: usize, timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::new(
                "queue_timeout",
                "must be greater than zero",
            ));
        }
        self.settings.queue_capacity = capacity;
        self.settings.queue_timeout = timeout;
        Ok(self)
    }

    /// The token estimator used for pacing on tokens (the one the simulator uses too).
    pub fn with_estimator(mut self, estimator: TokenEstimator) -> Self {
        self.settings.estimator = estimator;
        self
    }

    /// The limit settings.
    pub fn limit_config(&self) -> &LimitConfig {
        self.settings.limit.config()
    }

    /// The pacing settings.
    pub fn pacing_config(&self) -> &PacingConfig {
        self.settings.pacer.config()
    }

    /// The token estimator.
    pub fn estimator(&self) -> &TokenEstimator {
        &self.settings.estimator
    }

    /// The longest a call waits for a permit and for pacing together.
    pub fn queue_timeout(&self) -> Duration {
        self.settings.queue_timeout
    }
}

impl<S> Layer<S> for AdaptiveConcurrencyLayer {
    type Service = AdaptiveConcurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveConcurrency::from_settings(inner, self.settings.clone())
    }
}
