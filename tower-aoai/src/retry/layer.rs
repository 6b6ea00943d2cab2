use std::sync::{Arc, Mutex};

use tower_layer::Layer;

use super::Retry;
use crate::observe::StatsHandle;
use crate::policy::{RetryBudget, RetryPolicy};

/// Applies [`Retry`] to a service. See the [module docs](crate::retry).
///
/// Clones share one retry budget and one random source, so the budget bounds retries across every
/// service the layer built.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) policy: RetryPolicy,
    pub(super) budget: Mutex<RetryBudget>,
    pub(super) rng: Mutex<fastrand::Rng>,
    pub(super) stats: Option<StatsHandle>,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl RetryLayer {
    /// A layer that retries by `policy`, with the default [`RetryBudget`].
    pub fn new(policy: RetryPolicy) -> Self {
        Self::from_parts(policy, RetryBudget::default(), fastrand::Rng::new())
    }

    /// Replaces the retry budget.
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        let stats = self.shared.stats.clone();
        Self::from_parts(self.shared.policy, budget, self.rng()).stats_into(stats)
    }

    /// Seeds the jitter, so that runs are reproducible.
    pub fn with_seed(self, seed: u64) -> Self {
        let stats = self.shared.stats.clone();
        Self::from_parts(
            self.shared.policy,
            self.budget(),
            fastrand::Rng::with_seed(seed),
        )
        .stats_into(stats)
    }

    /// Records every attempt (as backend `"default"`) into `stats`. Use it when this layer talks
    /// to one endpoint; over a [`RouteLayer`](crate::RouteLayer) the route layer records per
    /// backend instead (and the [`Stack`](crate::stack::Stack) keeps its own stats).
    pub fn with_stats(self, stats: StatsHandle) -> Self {
        Self::from_parts(self.shared.policy, self.budget(), self.rng()).stats_into(Some(stats))
    }

    fn stats_into(mut self, stats: Option<StatsHandle>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.stats = stats;
        }
        self
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }

    fn budget(&self) -> RetryBudget {
        self.shared
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn rng(&self) -> fastrand::Rng {
        self.shared
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn from_parts(policy: RetryPolicy, budget: RetryBudget, rng: fastrand::Rng) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy,
                budget: Mutex::new(budget),
                rng: Mutex::new(rng),
                stats: None,
            }),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, self.shared.clone())
    }
}
