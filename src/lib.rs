//! pbx-operator: bulk PBX administration as declarative, reviewable Kubernetes resources.
//!
//! - [`api`]: the custom resources (what users write, what the operator reports).
//! - [`controllers`]: one controller per kind; thin Kubernetes glue.
//! - [`cli`]: the `pbx-operator` command line; [`history`]: its `history` command.

pub mod api;
pub mod cli;
pub mod controllers;
pub mod engine;
pub mod history;
pub mod kubectl;
pub mod mail;
pub mod pbx;
pub mod plan;
pub mod schedule;
pub mod telemetry;
pub mod tls;
