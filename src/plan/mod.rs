//! Planning: which targets a change touches and how, as pure functions over what the PBX holds.
//! Nothing here talks to Kubernetes or to a PBX, so every rule is unit-tested without servers.
//!
//! - [`selection`]: groups ∪ extensions − exclude, and the maxTargets guard;
//! - [`users`]: field locks, common values, the per-user diff and the plan hash.

pub mod ordering;
pub mod phones;
pub mod recycle;
pub mod revert;
pub mod rows;
pub mod selection;
pub mod sheet;
pub mod stored;
pub mod user_change;
pub mod users;

/// Why a plan cannot be made. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the selection resolves to {found} targets, more than maxTargets ({max}); nothing was done. Verify your selection: narrow spec.targets or raise spec.targets.maxTargets"
    )]
    TooManyTargets { found: usize, max: u32 },
    #[error(
        "the PBX backend cannot store field {field}; remove it from spec.fields (supported: {supported})"
    )]
    UnsupportedField { field: String, supported: String },
    #[error("{0}")]
    Invalid(String),
}
