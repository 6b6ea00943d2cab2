//! Python bindings of tower-aoai: the module `tower_aoai._core`.
//!
//! A sans-IO surface over `tower_aoai::policy::engine::Engine` (retry, route, limit and pace,
//! observe): an [`Engine`] opens one [`Call`] per request; the call says what to do next (send an
//! [`Attempt`] to a backend, wait, queue for a permit, fail); the Python transports carry it out
//! and feed each attempt's outcome back. Every decision is the Rust core's; the transports in
//! `python/tower_aoai/` only rewrite (through Rust), send, sleep and return.
//!
//! pyo3's `#[pymodule]`/`#[pyclass]` macros generate code that needs `unsafe`, hence no
//! `forbid(unsafe_code)` here.

mod backend;
mod engine;
mod parity;
mod report;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

pub use backend::Backend;
pub use engine::{Attempt, Call, Engine, FailureInfo, Lease};
pub use parity::_run_retry_layer;
pub use report::Diagnosis;

/// The native part of the `tower_aoai` package.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Call>()?;
    m.add_class::<Attempt>()?;
    m.add_class::<Lease>()?;
    m.add_class::<Backend>()?;
    m.add_class::<FailureInfo>()?;
    m.add_class::<Diagnosis>()?;
    m.add_function(wrap_pyfunction!(_run_retry_layer, m)?)?;
    m.add(
        "MAX_ERROR_BODY",
        tower_aoai::policy::classify::MAX_ERROR_BODY,
    )?;
    m.add(
        "REWRITE_REMOVES",
        PyTuple::new(
            m.py(),
            tower_aoai::policy::route::RewritePlan::REMOVED
                .iter()
                .map(|name| PyBytes::new(m.py(), name.as_str().as_bytes())),
        )?,
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
