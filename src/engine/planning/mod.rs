//! Plans that need what the PBX holds: the targets are read through the backend, then planned
//! by the pure planners of plan/. Nothing of Kubernetes here: the controller reads the spec's
//! Secrets and the CSV's bytes and hands them in.

use super::steps::kept_by_retry;
use crate::api::Plan;
use crate::pbx::{PbxBackend, PbxError, UserField, UserSelection, users_with_fields};
use crate::plan::selection::{self, Selector};
use crate::plan::stored::{CHUNK_ROWS, Row};
use crate::plan::user_change as request;
use crate::plan::users::{Intent, Planner};
use crate::plan::{PlanError, sheet};

mod csv;
pub use csv::{CsvEnd, CsvPlanner};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    #[error(transparent)]
    Pbx(#[from] PbxError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Csv(#[from] sheet::SheetError),
    /// The run a retry builds on could not be read (the reader's own error, handed back).
    #[error(transparent)]
    Earlier(Box<dyn std::error::Error + Send + Sync>),
}

/// The run a retry builds on, read a stored batch at a time, so that a retry of a large run
/// holds one of its batches, not all its rows. Its batches are in the order it planned them
/// (a selection's by extension, a CSV's by line), which is the order a retry plans in.
#[async_trait::async_trait]
pub trait EarlierRun: Send + Sync {
    fn batches(&self) -> usize;
    /// Batch `index`, checked to be the batch the earlier run stored.
    async fn batch(&self, index: usize) -> Result<Vec<Row>, PlanningError>;
}

/// What a BulkUserChange asks, as the planners need it.
pub struct UserRequest<'a> {
    pub intent: &'a Intent,
    /// The spec's fingerprint with the Secrets it reads (status.plan.specHash).
    pub spec_hash: &'a str,
    pub generation: i64,
    /// A retry: the earlier run. Targets whose steps went through keep their row (with the
    /// steps to redo), the rest are planned afresh.
    pub earlier: Option<&'a dyn EarlierRun>,
    pub atomic: bool,
}

/// A plan in the making: rows made whole (a revert's), or a plan made a chunk at a time as its
/// rows are stored (a selection's users, a CSV's lines).
pub enum Planned<'a> {
    Rows(Vec<Row>, Plan),
    Users(UserPlanner<'a>),
    Csv(Box<CsvPlanner<'a>>),
}

/// A user plan made a chunk of targets at a time: the selection is resolved to extensions
/// first, then each chunk's users are read (only the fields the change names) and planned in
/// extension order, so memory holds one chunk however many users are selected.
pub struct UserPlanner<'a> {
    backend: &'a dyn PbxBackend,
    planner: Planner<'a>,
    fields: Vec<UserField>,
    /// What is left to plan or carry over, in extension order.
    items: std::vec::IntoIter<Item>,
    /// A retry: the earlier run, whose batches bring the targets a chunk at a time, and the
    /// next batch to read.
    earlier: Option<(&'a dyn EarlierRun, usize)>,
    /// Listed extensions the PBX does not have, as listed, then any that went away since
    /// the selection was resolved.
    unknown: Vec<String>,
    generation: i64,
    spec_hash: &'a str,
}

enum Item {
    Plan(String),
    Unknown(String),
    /// A retry carries the earlier run's row over (boxed: an item per target stays small).
    Kept(Box<Row>),
}

impl Item {
    fn target(&self) -> &str {
        match self {
            Item::Plan(e) | Item::Unknown(e) => e,
            Item::Kept(r) => &r.target,
        }
    }
}

impl<'a> UserPlanner<'a> {
    /// Resolves the selection; a retry plans the targets of the earlier run instead, a batch
    /// of it at a time, carrying over the rows that went through.
    pub async fn new(
        backend: &'a dyn PbxBackend,
        selector: Selector,
        req: UserRequest<'a>,
    ) -> Result<UserPlanner<'a>, PlanningError> {
        let planner = Planner::new(req.intent, &backend.capabilities().user_fields)?;
        let fields = req.intent.fields.iter().map(|f| f.field).collect();
        if let Some(earlier) = req.earlier {
            return Ok(UserPlanner {
                backend,
                planner,
                fields,
                items: Vec::new().into_iter(),
                earlier: Some((earlier, 0)),
                unknown: Vec::new(),
                generation: req.generation,
                spec_hash: req.spec_hash,
            });
        }
        let mut items = Vec::new();
        let selected = backend
            .select_users(&UserSelection {
                groups: selector.groups.clone(),
                extensions: selector.extensions.clone(),
            })
            .await?;
        if !selected.empty_groups.is_empty() {
            tracing::info!(groups = ?selected.empty_groups, "groups without members");
        }
        let targets = selection::resolve_owned(&selector, selected.extensions)?;
        items.extend(targets.into_iter().map(Item::Plan));
        items.extend(
            selected
                .unknown_extensions
                .iter()
                .cloned()
                .map(Item::Unknown),
        );
        items.sort_by(|a, b| crate::pbx::extension_order(a.target(), b.target()));
        Ok(UserPlanner {
            backend,
            planner,
            fields,
            items: items.into_iter(),
            earlier: None,
            unknown: selected.unknown_extensions,
            generation: req.generation,
            spec_hash: req.spec_hash,
        })
    }

    /// The rows of the next chunk of targets, in extension order; None when all are planned.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Row>>, PlanningError> {
        let chunk: Vec<Item> = match &mut self.earlier {
            None => self.items.by_ref().take(CHUNK_ROWS).collect(),
            // The earlier run's next batch (at most CHUNK_ROWS rows), empty ones skipped.
            Some((earlier, next)) => {
                let mut chunk = Vec::new();
                while chunk.is_empty() && *next < earlier.batches() {
                    chunk = earlier.batch(*next).await?;
                    *next += 1;
                }
                chunk
                    .into_iter()
                    .map(|r| match kept_by_retry(&r) {
                        Some(row) => Item::Kept(Box::new(row)),
                        None => Item::Plan(r.target),
                    })
                    .collect()
            }
        };
        if chunk.is_empty() {
            return Ok(None);
        }
        let extensions: Vec<String> = chunk
            .iter()
            .filter_map(|i| match i {
                Item::Plan(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let users = users_with_fields(self.backend, extensions, Some(&self.fields)).await?;
        let mut rows = Vec::with_capacity(chunk.len());
        for item in chunk {
            rows.push(match item {
                Item::Kept(row) => *row,
                Item::Unknown(e) => request::unknown_row(e),
                Item::Plan(e) => match users.get(&e) {
                    Some(user) => request::planned_row(&self.planner.user(user)),
                    // Removed since the selection was resolved.
                    None => {
                        self.unknown.push(e.clone());
                        request::unknown_row(e)
                    }
                },
            });
        }
        Ok(Some(rows))
    }

    /// status.plan, once every chunk is planned.
    pub fn finish(self) -> Plan {
        let summary = self.planner.finish(&self.unknown);
        request::status_plan(&summary, self.generation, self.spec_hash)
    }
}
