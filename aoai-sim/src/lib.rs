//! An Azure OpenAI simulator.
//!
//! - [`scenario`]: resources, deployments, regions, a timeline of events and a workload, from a
//!   TOML file.
//! - [`model`]: the pure model of the service, in virtual time ([`Model::handle`]).
//! - [`server`]: the model behind a real HTTP server on 127.0.0.1 ([`Server::start`]).
//! - [`driver`]: runs a client policy against the model under a virtual clock ([`driver::run`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod driver;
pub mod model;
pub mod scenario;
pub mod server;

pub use model::{
    Answer, Model, Operation, SimBody, SimRequest, SimResponse, Stats, Timing, Verdict,
};
pub use scenario::{Scenario, ScenarioError};
pub use server::{ServeError, ServeOptions, Server, ServerHandle};
