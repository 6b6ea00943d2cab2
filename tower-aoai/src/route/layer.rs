use std::fmt;
use std::sync::{Arc, Mutex};

use tower_layer::Layer;

use crate::observe::StatsHandle;

use super::Route;
use crate::policy::route::{BackendId, Backends, RoutePolicy, RouteStats, Router};

/// The limiter's (and pacing's) say on how much room a backend has: `> 0` has room (larger is
/// more), `<= 0` none. The router prefers backends with room and never hedges into one without.
pub type Headroom = Arc<dyn Fn(BackendId) -> f64 + Send + Sync>;

/// Applies [`Route`] to a service. See the [module docs](crate::route).
///
/// Clones share one router (cooldowns, breakers, blocks, latency, hedge budget), so every service
/// the layer built sees the same state of the backends.
#[derive(Clone)]
pub struct RouteLayer {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) core: Mutex<Core>,
    pub(super) headroom: Headroom,
}

pub(super) struct Core {
    pub(super) router: Router,
    pub(super) rng: fastrand::Rng,
    pub(super) stats: Option<StatsHandle>,
}

impl fmt::Debug for RouteLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.shared.lock();
        f.debug_struct("RouteLayer")
            .field("backends", core.router.backends())
            .field("stats", &core.router.stats())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RouteLayer {
    /// A layer routing over `backends` by `policy`.
    pub fn new(backends: Backends, policy: RoutePolicy) -> Self {
        Self::from_parts(
            Router::new(backends, policy),
            fastrand::Rng::new(),
            Arc::new(|_| 1.0),
        )
    }

    /// Seeds the random choices and jitter, so that runs are reproducible.
    pub fn with_seed(self, seed: u64) -> Self {
        let (router, stats) = {
            let core = self.shared.lock();
            (core.router.clone(), core.stats.clone())
        };
        let layer = Self::from_parts(
            router,
            fastrand::Rng::with_seed(seed),
            self.shared.headroom.clone(),
        );
        layer.shared.lock().stats = stats;
        layer
    }

    /// Where the router learns each backend's room (the limiter's and pacing's headroom).
    /// Default: every backend always has room.
    pub fn with_headroom(
        self,
        headroom: impl Fn(BackendId) -> f64 + Send + Sync + 'static,
    ) -> Self {
        let core = self.shared.lock();
        let (router, rng, stats) = (core.router.clone(), core.rng.clone(), core.stats.clone());
        drop(core);
        let layer = Self::from_parts(router, rng, Arc::new(headroom));
        layer.shared.lock().stats = stats;
        layer
    }

    /// Records every attempt, per backend, into `stats` (and each 403 block's support record).
    pub fn with_stats(self, stats: StatsHandle) -> Self {
        self.shared.lock().stats = Some(stats);
        self
    }

    /// The counters of the shared router.
    pub fn stats(&self) -> RouteStats {
        self.shared.lock().router.stats()
    }

    /// Runs `f` on the shared router (to inspect cooldowns, breakers, latency).
    pub fn inspect<T>(&self, f: impl FnOnce(&Router) -> T) -> T {
        f(&self.shared.lock().router)
    }

    /// A [`Route`] with one inner service per backend (for example a limiter per backend over
    /// one client), in the order of the backends.
    ///
    /// # Panics
    ///
    /// When `services` does not hold exactly one service per backend.
    pub fn layer_each<S>(&self, services: Vec<S>) -> Route<S> {
        let n = self.shared.lock().router.backends().len();
        assert_eq!(services.len(), n, "one service per backend");
        Route::from_shared(services, self.shared.clone())
    }

    fn from_parts(router: Router, rng: fastrand::Rng, headroom: Headroom) -> Self {
        Self {
            shared: Arc::new(Shared {
                core: Mutex::new(Core {
                    router,
                    rng,
                    stats: None,
                }),
                headroom,
            }),
        }
    }
}

impl<S: Clone> Layer<S> for RouteLayer {
    type Service = Route<S>;

    /// Every backend is served through a clone of `inner` (the request is rewritten for the
    /// backend, so one HTTP client serves them all).
    fn layer(&self, inner: S) -> Self::Service {
        let n = self.shared.lock().router.backends().len();
        Route::from_shared(vec![inner; n], self.shared.clone())
    }
}
