//! Python bindings of tower-aoai: the module `tower_aoai._core`.
//!
//! A small sans-IO surface over `tower_aoai::policy`: an [`Engine`] (policy, retry budget, random
//! source) opens one [`Call`] per request; the Python transports feed each attempt's outcome to
//! the call and carry out the action it answers (return, sleep and retry, give up). Every decision
//! is the Rust core's; the transports in `python/tower_aoai/` only send, sleep and return.
//!
//! The engine is where later capabilities (a permit per attempt from the adaptive limiter, the
//! choice of backend) plug in: a call may then also answer "wait for a permit" or "send to this
//! backend", without changing the transports' loop.
//!
//! pyo3's `#[pymodule]`/`#[pyclass]` macros generate code that needs `unsafe`, hence no
//! `forbid(unsafe_code)` here.

mod engine;
mod parity;

use pyo3::prelude::*;

pub use engine::{Call, Engine};
pub use parity::_run_retry_layer;

/// The native part of the `tower_aoai` package.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Call>()?;
    m.add_function(wrap_pyfunction!(_run_retry_layer, m)?)?;
    m.add(
        "MAX_ERROR_BODY",
        tower_aoai::policy::classify::MAX_ERROR_BODY,
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
