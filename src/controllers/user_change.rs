//! BulkUserChange: plan (Validate) and apply (Execute) field changes and actions on many users.
//!
//! A run plans once, stores the plan as result rows in owned ConfigMaps, then executes batch by
//! batch. Before a batch's side effects its rows are marked InProgress; after, their outcomes are
//! recorded and status moves on. A restarted operator resumes at the first unfinished batch and
//! checks the InProgress rows against the PBX instead of applying them blindly again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use sha2::{Digest, Sha256};

use super::backends::{change_secret_value_versioned, mailer};
use super::conditions::{self, Desired};
use super::csv_source;
use super::results_store::Store;
use super::{Context, Error};
use crate::api::parse_duration;
use crate::api::{
    BulkUserChange, BulkUserChangeSpec, CsvPlan, FailurePolicy, FieldChange, Lock, Mode,
    OperationStatus, Outcome, Phase, Plan, Policy, Progress, SecretField, Summary,
    UserAction as SpecAction, UserFields,
};
use crate::engine::results;
use crate::engine::{self, Batch, Ended, Executor, users::UserExec};
use crate::pbx::kamailio::Kamailio;
use crate::pbx::{NewValue, PbxBackend, Secret, UserField, UserSelection};
use crate::plan::rows as row_plan;
use crate::plan::selection::Selector;
use crate::plan::sheet;
use crate::plan::stored::{self, Row, SourceRow, StoredTake, StoredWrite};
use crate::plan::users::{self as user_plan, ActionKind, FieldIntent, Intent, Wanted};

pub const RETRY_ANNOTATION: &str = "pbx-operator.io/retry";
const KIND: &str = "BulkUserChange";
const DEFAULT_ENFORCE_INTERVAL: Duration = Duration::from_secs(600);

/// The run a resource asks for: its generation, plus the retry annotation when set.
fn lineage(buc: &BulkUserChange) -> String {
    let mut run = format!("g{}", buc.metadata.generation.unwrap_or(0));
    if let Some(retry) = buc.annotations().get(RETRY_ANNOTATION) {
        let clean: String = retry
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        run.push_str(&format!("-retry-{clean}"));
    }
    run
}

fn same_lineage(run: &str, lineage: &str) -> bool {
    run == lineage
        || run
            .strip_prefix(lineage)
            .is_some_and(|rest| rest.starts_with("-check-"))
}

/// A fingerprint of what the spec asks, without how (mode) or who (requestedBy).
pub fn spec_hash(spec: &BulkUserChangeSpec) -> String {
    let mut v = serde_json::to_value(spec).expect("specs serialize");
    if let Some(o) = v.as_object_mut() {
        for k in ["mode", "approvedPlanHash", "requestedBy"] {
            o.remove(k);
        }
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

#[tracing::instrument(skip_all, fields(change = %buc.name_any(), namespace = buc.namespace()))]
pub(crate) async fn reconcile(
    buc: Arc<BulkUserChange>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let status = buc.status.clone().unwrap_or_default();
    let lineage = lineage(&buc);
    let run = Run {
        buc: &buc,
        ctx: &ctx,
        store: Store::new(&ctx.client, &*buc),
    };
    match &status.progress {
        Some(p) if same_lineage(&p.run, &lineage) && p.done < p.batches => {
            run.execute(status).await
        }
        Some(p) if same_lineage(&p.run, &lineage) => run.finished(status).await,
        _ => run.start(status, lineage).await,
    }
}

struct Run<'a> {
    buc: &'a BulkUserChange,
    ctx: &'a Context,
    store: Store<'a, BulkUserChange>,
}

impl Run<'_> {
    fn spec(&self) -> &BulkUserChangeSpec {
        &self.buc.spec
    }

    fn namespace(&self) -> String {
        self.buc.namespace().unwrap_or_default()
    }

    async fn backend(&self) -> Result<(crate::api::PbxConnection, Arc<Kamailio>), Error> {
        self.ctx
            .backends
            .by_name(
                &self.ctx.client,
                &self.namespace(),
                &self.spec().connection_ref.name,
            )
            .await
    }

    /// Server-side applies the whole status: fields this run no longer sets are removed.
    async fn write_status(&self, status: &OperationStatus) -> Result<(), Error> {
        super::apply_status(self.ctx, self.buc, status).await
    }

    /// Records a failure to start or continue in conditions. Transient ones retry with backoff.
    async fn blocked(&self, status: OperationStatus, err: &Error) -> Result<Action, Error> {
        super::block_run(self.ctx, self.buc, self.buc.status.as_ref(), status, err).await
    }

    /// Plans a new run (or reuses the validated plan), stores it, and starts executing.
    async fn start(&self, status: OperationStatus, run_id: String) -> Result<Action, Error> {
        let (conn, backend) = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let spec_hash = match self.request_hash().await {
            Ok(h) => h,
            Err(e) => return self.blocked(status, &e).await,
        };
        let reuse_validated = self.spec().mode == Mode::Execute
            && status.phase == Phase::Validated
            && status
                .plan
                .as_ref()
                .is_some_and(|p| p.spec_hash == spec_hash)
            && !run_id.contains("-retry-");
        // Executing a validation reuses its stored rows as they are: nothing is re-read or
        // rewritten here, batches are read one at a time by execute().
        let (rows, mut plan) = if reuse_validated {
            let plan = status.plan.clone().expect("checked above");
            let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0);
            // The stored rows are what runs: they must be the ones validated.
            for index in 0..batches as usize {
                if let Err(e) = self.verified(index, &plan.batch_digests).await {
                    // The refusal belongs to this run: the next reconcile must not plan afresh
                    // and execute what nobody reviewed.
                    let mut status = status;
                    status.phase = Phase::Failed;
                    if let Some(p) = status.progress.as_mut() {
                        p.run = run_id;
                    }
                    return self.blocked(status, &e).await;
                }
            }
            (None, plan)
        } else {
            // A retry builds on the earlier run of the same spec generation; a spec edited
            // since, or never run, is planned whole.
            let earlier = status
                .progress
                .as_ref()
                .filter(|p| run_id.contains("-retry-") && super::same_generation(&p.run, &run_id));
            let retry_only = if let Some(progress) = earlier {
                // What the earlier run did decides what the retry does: without it (or with it
                // edited), nothing is planned, changed or pruned.
                let digests = status
                    .plan
                    .as_ref()
                    .map(|p| p.batch_digests.clone())
                    .unwrap_or_default();
                let mut rows = Vec::new();
                for index in 0..progress.batches as usize {
                    match self.verified(index, &digests).await {
                        Ok(batch) => rows.extend(batch),
                        Err(e) => return self.blocked(status, &e).await,
                    }
                }
                Some(rows)
            } else {
                None
            };
            match self.plan(backend.as_ref(), retry_only, &spec_hash).await {
                Ok((rows, plan)) => (Some(rows), plan),
                Err(e) => return self.blocked(status, &e).await,
            }
        };
        if self.spec().mode == Mode::Execute {
            if let Some(approved) = &self.spec().approved_plan_hash {
                if *approved != plan.hash {
                    let err = Error::PlanChanged {
                        approved: approved.clone(),
                        current: plan.hash.clone(),
                    };
                    let mut status = status;
                    status.plan = Some(plan);
                    status.phase = Phase::Failed;
                    return self.blocked(status, &err).await;
                }
            }
        }
        let (refs, batches, digest) = match rows {
            Some(rows) => {
                // Rows are made, written a chunk at a time and dropped: status keeps counts and
                // a few rows, so a large run is never in memory as a whole.
                let mut chunker = stored::Chunker::default();
                let mut refs = Vec::new();
                let mut digest = results::Digest::default();
                let mut batch_digests = Vec::new();
                for row in rows.into_rows() {
                    if let Some(chunk) = chunker.push(row) {
                        refs.push(self.write_rows(refs.len(), &chunk, Some(&plan)).await?);
                        batch_digests.push(stored::plan_digest(&chunk));
                        digest.merge(results::Digest::of(&chunk));
                    }
                }
                let last = chunker.finish();
                if !last.is_empty() || refs.is_empty() {
                    refs.push(self.write_rows(refs.len(), &last, Some(&plan)).await?);
                    batch_digests.push(stored::plan_digest(&last));
                    digest.merge(results::Digest::of(&last));
                }
                plan.batch_digests = batch_digests;
                let batches = refs.len();
                self.store.prune(batches).await?;
                (refs, batches, digest)
            }
            None => {
                // Counted again batch by batch as execute() goes.
                let targets = status.summary.as_ref().map(|s| s.targets).unwrap_or(0);
                let digest = results::Digest {
                    rows: targets as usize,
                    summary: Summary {
                        targets,
                        ..Summary::default()
                    },
                    shown: vec![],
                    ..Default::default()
                };
                let batches = status
                    .progress
                    .as_ref()
                    .map(|p| p.batches as usize)
                    .unwrap_or(0);
                (status.results_refs.clone(), batches, digest)
            }
        };
        let now = conditions::now();
        let generation = self.buc.metadata.generation;
        let mut next = OperationStatus {
            observed_generation: generation,
            plan: Some(plan.clone()),
            results_refs: refs,
            start_time: Some(now.clone()),
            corrections: status.corrections,
            last_checked_time: status.last_checked_time.clone(),
            conditions: status.conditions.clone(),
            warnings: warnings(&conn, self.spec()),
            ..Default::default()
        };
        if reuse_validated {
            next.results = status.results.clone();
            next.results_truncated = status.results_truncated;
        } else {
            let (shown, truncated) = results::for_status(digest.shown.iter());
            next.results_truncated = truncated || digest.rows > shown.len();
            next.results = shown;
        }
        let targets = digest.rows as u32;
        if self.spec().mode == Mode::Validate {
            next.phase = Phase::Validated;
            next.summary = Some(Summary {
                targets,
                changed: plan.changes,
                ..digest.summary.clone()
            });
            next.progress = Some(Progress {
                run: run_id,
                batches: batches as u32,
                done: batches as u32,
            });
            next.completion_time = Some(now.clone());
            let message = format!(
                "planned: {} targets, {} would change; plan hash {}",
                targets, plan.changes, plan.hash
            );
            conditions::upsert(
                &mut next.conditions,
                Desired {
                    type_: conditions::VALIDATED,
                    status: true,
                    reason: "Planned",
                    message: message.clone(),
                },
                generation,
                &now,
            );
            conditions::upsert(
                &mut next.conditions,
                Desired {
                    type_: conditions::READY,
                    status: true,
                    reason: "Validated",
                    message,
                },
                generation,
                &now,
            );
            conditions::remove(&mut next.conditions, conditions::RECONCILING);
            conditions::remove(&mut next.conditions, conditions::STALLED);
            self.write_status(&next).await?;
            self.ctx
                .publish(
                    self.buc,
                    EventType::Normal,
                    "Validated",
                    "Validate",
                    Some(format!(
                        "{} targets, {} would change, plan hash {}{}",
                        targets,
                        plan.changes,
                        plan.hash,
                        self.requested_by()
                    )),
                )
                .await;
            return self.after_finish(&next);
        }
        next.phase = Phase::Running;
        next.summary = Some(Summary {
            targets,
            ..digest.summary.clone()
        });
        next.progress = Some(Progress {
            run: run_id,
            batches: batches as u32,
            done: 0,
        });
        let message = format!("executing plan {} on {} targets", plan.hash, targets);
        conditions::upsert(
            &mut next.conditions,
            Desired {
                type_: conditions::RECONCILING,
                status: true,
                reason: "Executing",
                message: message.clone(),
            },
            generation,
            &now,
        );
        conditions::upsert(
            &mut next.conditions,
            Desired {
                type_: conditions::READY,
                status: false,
                reason: "Executing",
                message: message.clone(),
            },
            generation,
            &now,
        );
        conditions::remove(&mut next.conditions, conditions::STALLED);
        self.write_status(&next).await?;
        self.ctx
            .publish(
                self.buc,
                EventType::Normal,
                "Started",
                "Execute",
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        self.execute(next).await
    }

    /// [`spec_hash`] with the references (name, key, resourceVersion) of the Secrets the spec
    /// reads: a Secret changed after validation is a new request, planned (and hashed) anew.
    async fn request_hash(&self) -> Result<String, Error> {
        let intent = intent(&self.ctx.client, &self.namespace(), self.spec()).await?;
        Ok(user_plan::with_secret_references(
            &spec_hash(self.spec()),
            &intent,
        ))
    }

    fn requested_by(&self) -> String {
        super::requested_by_note(self.spec().requested_by.as_deref())
    }

    /// Reads the targets and builds the plan rows. With `retry_only`, targets whose earlier
    /// outcome was final and not a failure keep their row; the rest are planned afresh.
    async fn plan(
        &self,
        backend: &Kamailio,
        retry_only: Option<Vec<Row>>,
        spec_hash: &str,
    ) -> Result<(PlannedRows, Plan), Error> {
        if self.spec().source.is_some() {
            return self.plan_csv(backend, retry_only, spec_hash).await;
        }
        let spec = self.spec();
        let intent = intent(&self.ctx.client, &self.namespace(), spec).await?;
        let targets = spec.targets.clone().unwrap_or_default();
        let (mut kept, selection) = match &retry_only {
            Some(rows) => {
                let mut kept = Vec::new();
                let mut again = Vec::new();
                for r in rows {
                    if let Some(carried) = carried(r) {
                        kept.push(carried);
                    } else if r.is_failure() || !r.is_final() {
                        again.push(r.target.clone());
                    } else {
                        kept.push(r.clone());
                    }
                }
                let selection = UserSelection {
                    groups: vec![],
                    extensions: again,
                };
                (kept, selection)
            }
            None => (
                vec![],
                UserSelection {
                    groups: targets.groups.clone(),
                    extensions: targets.extensions.clone(),
                },
            ),
        };
        let read = self
            .ctx
            .metrics
            .pbx_call("read_users", backend.read_users(&selection))
            .await?;
        let selector = Selector {
            groups: selection.groups.clone(),
            extensions: selection.extensions.clone(),
            exclude: targets.exclude.clone(),
            max_targets: if retry_only.is_some() {
                None
            } else {
                targets.max_targets
            },
        };
        let caps = backend.capabilities();
        let plan = user_plan::plan(&read, &selector, &intent, &caps.user_fields)?;
        let mut rows: Vec<Row> = plan.targets.iter().map(planned_row).collect();
        rows.extend(plan.unknown_extensions.iter().map(|e| Row {
            target: e.clone(),
            outcome: Outcome::Skipped,
            writes: vec![],
            actions: vec![],
            changes: vec![],
            notes: vec![format!("extension {e} does not exist on the PBX")],
            phone: None,
            ..Default::default()
        }));
        let status_plan = Plan {
            hash: plan.hash.clone(),
            generation: self.buc.metadata.generation.unwrap_or(0),
            targets: plan.targets.len() as u32,
            resolved: plan
                .targets
                .iter()
                .take(1000)
                .map(|t| t.extension.clone())
                .collect(),
            common_values: plan.common_values.clone(),
            closed_fields: plan.closed_fields.clone(),
            changes: plan.changing() as u32,
            spec_hash: spec_hash.to_string(),
            csv: None,
            batch_digests: vec![],
        };
        if !plan.empty_groups.is_empty() {
            tracing::info!(groups = ?plan.empty_groups, "groups without members");
        }
        kept.extend(rows);
        kept.sort_by(|a, b| crate::pbx::extension_order(&a.target, &b.target));
        Ok((PlannedRows::All(kept), status_plan))
    }

    /// Plans a CSV-sourced change: reads the file, checks each row, reads the rows' users and
    /// the holders of the numbers they give, and plans the rows in file order. With `previous`
    /// (a retry), rows that succeeded keep their earlier result; the rest are planned afresh
    /// from the CSV as it is now.
    async fn plan_csv(
        &self,
        backend: &Kamailio,
        previous: Option<Vec<Row>>,
        spec_hash: &str,
    ) -> Result<(PlannedRows, Plan), Error> {
        let spec = self.spec();
        let source = &spec.source.as_ref().expect("checked by the caller").csv;
        let bytes = csv_source::fetch(
            &self.ctx.client,
            &self.namespace(),
            source,
            self.ctx.max_csv_bytes,
        )
        .await?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let sheet = sheet::read(&bytes, self.ctx.max_csv_bytes)?;
        drop(bytes);
        let intent = intent(&self.ctx.client, &self.namespace(), spec).await?;
        let wanted_fields: Vec<UserField> = sheet::FIELDS
            .iter()
            .copied()
            .chain(intent.fields.iter().map(|f| f.field))
            .collect();
        let closed: Vec<UserField> = intent
            .fields
            .iter()
            .filter(|f| !f.open)
            .map(|f| f.field)
            .collect();
        // A first pass for who is involved; the rows are checked again as they are planned, so
        // no pass holds every row's request at once.
        let mut numbers: Vec<String> = Vec::new();
        let mut extensions: Vec<String> = Vec::new();
        let mut row_of: HashMap<String, usize> = HashMap::new();
        for (i, r) in sheet::requests(&sheet, &closed).enumerate() {
            row_of.entry(r.extension.clone()).or_insert(i);
            if r.errors.is_empty() {
                extensions.push(r.extension);
            }
            numbers.extend(
                r.values
                    .into_iter()
                    .filter(|(f, _)| f.is_number())
                    .map(|(_, v)| v),
            );
        }
        if !numbers.is_empty() {
            let holders = self
                .ctx
                .metrics
                .pbx_call("number_holders", backend.number_holders(&numbers))
                .await?;
            extensions.extend(holders.into_iter().map(|(_, h)| h));
        }
        extensions.sort();
        extensions.dedup();
        let read = self
            .ctx
            .metrics
            .pbx_call(
                "read_users",
                // Only the fields a CSV or spec.fields can set are planned: the rest need no memory.
                backend.read_user_fields(
                    &UserSelection {
                        groups: vec![],
                        extensions,
                    },
                    &wanted_fields,
                ),
            )
            .await?;
        let users = read.users;
        let policies = backend.policies().await?;
        let caps = backend.capabilities();
        let atomic = spec.failure_policy == FailurePolicy::Atomic;
        let rules = row_plan::Rules {
            base: &intent,
            policies: &policies,
            supported: &caps.user_fields,
            atomic,
        };
        let plan = row_plan::plan_rows(sheet::requests(&sheet, &closed), &row_of, users, &rules)?;
        let mut previous_rows: HashMap<u64, Vec<Row>> = HashMap::new();
        if let Some(rows) = previous {
            let mut last: Option<u64> = None;
            for r in rows {
                match (&r.source, last) {
                    (Some(src), _) => {
                        last = Some(src.line);
                        previous_rows.entry(src.line).or_default().push(r);
                    }
                    (None, Some(line)) => previous_rows.entry(line).or_default().push(r),
                    (None, None) => {}
                }
            }
        }
        let sensitive: Vec<bool> = sheet
            .header
            .iter()
            .map(|h| sheet::is_sensitive(h))
            .collect();
        let invalid = plan.invalid() as u32;
        let changing = plan.changing() as u32;
        let targets = plan.rows.len() as u32;
        let resolved = plan
            .rows
            .iter()
            .filter(|r| !r.extension.is_empty())
            .take(1000)
            .map(|r| r.extension.chars().take(128).collect())
            .collect();
        let columns = sheet
            .header
            .iter()
            .take(64)
            .map(|h| h.chars().take(128).collect())
            .collect();
        let status_plan = Plan {
            hash: plan.hash.clone(),
            generation: self.buc.metadata.generation.unwrap_or(0),
            targets,
            resolved,
            closed_fields: closed.iter().map(|f| f.name().to_string()).collect(),
            changes: changing,
            spec_hash: spec_hash.to_string(),
            csv: Some(CsvPlan {
                sha256,
                columns,
                rows: targets,
                invalid,
            }),
            ..Default::default()
        };
        let rows = CsvRows {
            plan,
            sheet,
            sensitive,
            previous: previous_rows,
        };
        Ok((PlannedRows::Csv(rows), status_plan))
    }

    /// Writes one chunk of results; CSV-sourced plans echo the input columns.
    async fn write_rows(
        &self,
        index: usize,
        rows: &[Row],
        plan: Option<&Plan>,
    ) -> Result<String, Error> {
        let header = plan
            .and_then(|p| p.csv.as_ref())
            .map(|c| c.columns.as_slice());
        self.store.write_with(index, rows, header).await
    }

    /// Reads one stored batch and checks it is the batch the operator stored for this plan: a
    /// results ConfigMap edited since (a target or an action added) is never executed.
    async fn verified(&self, index: usize, digests: &[String]) -> Result<Vec<Row>, Error> {
        let mut rows = self.store.read(index).await?;
        if digests.is_empty() {
            // Stored by an operator from before steps were recorded: it runs as planned then.
            rows.iter_mut().for_each(engine::users::upgrade_legacy);
            return Ok(rows);
        }
        if digests.get(index) != Some(&stored::plan_digest(&rows)) {
            return Err(Error::PlanTampered {
                name: super::results_store::name(&self.buc.name_any(), index),
            });
        }
        Ok(rows)
    }

    /// Executes the unfinished batches of the current run through the engine, which records
    /// each step of each target before its side effect and its outcome after.
    async fn execute(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let (conn, backend) = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let intent = match intent(&self.ctx.client, &self.namespace(), self.spec()).await {
            Ok(i) => i,
            Err(e) => return self.blocked(status, &e).await,
        };
        let secrets: HashMap<UserField, Secret> = intent
            .fields
            .iter()
            .filter_map(|f| match &f.wanted {
                Wanted::Secret(s) => Some((f.field, s.clone())),
                _ => None,
            })
            .collect();
        let mailer = mailer(&self.ctx.client, &self.namespace(), &conn).await;
        let progress = status.progress.clone().expect("execute runs with progress");
        let digests = status
            .plan
            .as_ref()
            .map(|p| p.batch_digests.clone())
            .unwrap_or_default();
        let atomic = self.spec().failure_policy == FailurePolicy::Atomic;
        let batches: Vec<usize> = (progress.done as usize..progress.batches as usize).collect();
        let groups: Vec<Vec<usize>> = if atomic {
            vec![batches]
        } else {
            batches.into_iter().map(|b| vec![b]).collect()
        };
        // Finished batches as digests (counts and the rows status may show), so neither every
        // ConfigMap is re-read after every batch nor every row of a large run kept in memory.
        let mut done_rows: BTreeMap<usize, results::Digest> = BTreeMap::new();
        for i in 0..progress.done as usize {
            done_rows.insert(i, results::Digest::of(&self.store.read(i).await?));
        }
        let _executing = self.ctx.executing();
        let journal = ResultsJournal {
            run: self,
            plan: status.plan.clone(),
        };
        let stopping = || self.ctx.is_stopping();
        let exec = UserExec {
            backend: backend.as_ref(),
            secrets: &secrets,
            mailer: mailer.as_ref().map(|m| m as &dyn engine::users::Outbox),
            domain: &conn.spec.domain,
            atomic,
            journal: &journal,
            stopping: &stopping,
        };
        for group in groups {
            if self.ctx.is_stopping() {
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            let mut loaded = Vec::new();
            for &index in &group {
                match self.verified(index, &digests).await {
                    Ok(rows) => loaded.push(Batch::new(index, rows)),
                    Err(e) => return self.blocked(status, &e).await,
                }
            }
            match exec.run(&mut loaded).await {
                Ok(Ended::Finished) => {}
                // The step in flight is recorded; the next operator goes on from there.
                Ok(Ended::Stopped) => return Ok(Action::requeue(Duration::from_secs(5))),
                // The PBX went away mid-batch: the journal says which steps are done.
                Err(e) => return self.blocked(status, &Error::Engine(e)).await,
            }
            let mut batch_summary = Summary::default();
            let mut failed_in_batch = 0;
            for batch in &loaded {
                let s = results::summarize(batch.rows.iter());
                failed_in_batch += s.failed + s.conflicts + s.uncertain;
                results::add(&mut batch_summary, &s);
                for r in &batch.rows {
                    self.ctx
                        .metrics
                        .targets
                        .get_or_create(&super::metrics::OutcomeLabel {
                            kind: KIND.into(),
                            outcome: format!("{:?}", r.outcome),
                        })
                        .inc();
                }
            }
            let p = status.progress.as_mut().expect("set above");
            p.done += group.len() as u32;
            let done_so_far = p.done;
            let summary = status.summary.get_or_insert_with(Summary::default);
            let targets = summary.targets;
            // Rows counted in the summary at start (final already) are recounted per batch.
            *summary = Summary {
                targets,
                ..Summary::default()
            };
            for batch in loaded {
                done_rows.insert(batch.index, results::Digest::of(&batch.rows));
            }
            let mut total = 0;
            for d in done_rows.values() {
                results::add(
                    summary,
                    &Summary {
                        targets: 0,
                        ..d.summary.clone()
                    },
                );
                total += d.rows;
            }
            let shown_rows = done_rows.values().flat_map(|d| d.shown.iter());
            let (shown, truncated) = results::for_status(shown_rows);
            status.results_truncated = truncated || total > shown.len() || status.results_truncated;
            status.results = shown;
            self.write_status(&status).await?;
            if failed_in_batch > 0 {
                self.ctx
                    .publish(self.buc, EventType::Warning, "BatchFailed", "Execute", Some(format!("batch {} of {}: {failed_in_batch} targets failed, conflicted or are uncertain; see status.results", done_so_far, status.progress.as_ref().map(|p| p.batches).unwrap_or(0))))
                    .await;
            }
        }
        self.finish(status).await
    }

    async fn finish(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let now = conditions::now();
        let generation = self.buc.metadata.generation;
        let summary = status.summary.clone().unwrap_or_default();
        let bad = summary.failed + summary.conflicts + summary.uncertain;
        status.phase = if bad == 0 {
            Phase::Succeeded
        } else if bad < summary.targets {
            Phase::PartiallyFailed
        } else {
            Phase::Failed
        };
        status.completion_time = Some(now.clone());
        let mut message = format!(
            "{} targets: {} changed, {} unchanged, {} failed, {} conflicts, {} skipped",
            summary.targets,
            summary.changed,
            summary.unchanged,
            summary.failed,
            summary.conflicts,
            summary.skipped
        );
        if summary.uncertain > 0 {
            message.push_str(&format!(
                ", {} uncertain (a mail was being sent when the operator stopped: it may not have gone out)",
                summary.uncertain
            ));
        }
        conditions::remove(&mut status.conditions, conditions::RECONCILING);
        if bad == 0 {
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::READY,
                    status: true,
                    reason: "Succeeded",
                    message: message.clone(),
                },
                generation,
                &now,
            );
            conditions::remove(&mut status.conditions, conditions::STALLED);
        } else {
            let hint = format!(
                "{message}; fix the causes in status.results, then set annotation {RETRY_ANNOTATION} to re-run only the failed and uncertain steps"
            );
            let reason = if status.phase == Phase::Failed {
                "Failed"
            } else {
                "PartiallyFailed"
            };
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::READY,
                    status: false,
                    reason,
                    message: hint.clone(),
                },
                generation,
                &now,
            );
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::STALLED,
                    status: true,
                    reason,
                    message: hint,
                },
                generation,
                &now,
            );
        }
        if self.spec().policy == Policy::Enforce {
            status.last_checked_time = Some(now.clone());
        }
        self.write_status(&status).await?;
        let type_ = if bad == 0 {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.ctx
            .publish(
                self.buc,
                type_,
                "Finished",
                "Execute",
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        self.after_finish(&status)
    }

    /// A finished run: nothing to do unless the policy is Enforce and a check is due.
    async fn finished(&self, status: OperationStatus) -> Result<Action, Error> {
        // A refused run (an edited plan, a changed approval) is not a desired state to enforce.
        let executed = matches!(status.phase, Phase::Succeeded | Phase::PartiallyFailed);
        if self.spec().policy != Policy::Enforce || self.spec().mode != Mode::Execute || !executed {
            return Ok(Action::await_change());
        }
        let interval = self
            .spec()
            .interval
            .as_deref()
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_ENFORCE_INTERVAL);
        let last = status
            .last_checked_time
            .as_ref()
            .or(status.completion_time.as_ref())
            .map(|t| t.0);
        let now = jiff::Timestamp::now();
        if let Some(last) = last {
            let due = last + jiff::SignedDuration::try_from(interval).unwrap_or_default();
            if due > now {
                let wait = due.duration_since(now).unsigned_abs();
                return Ok(Action::requeue(wait.max(Duration::from_secs(1))));
            }
        }
        self.enforce(status).await
    }

    /// Enforce: re-reads the targets; when they drifted, executes a correction run.
    async fn enforce(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let (_, backend) = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let planned = match self.request_hash().await {
            Ok(h) => self.plan(backend.as_ref(), None, &h).await,
            Err(e) => Err(e),
        };
        let (rows, plan) = match planned {
            Ok(p) => p,
            Err(e) => return self.blocked(status, &e).await,
        };
        // Secret fields are not enforced: what the PBX stores for them (salted hashes) cannot be
        // compared with the Secret, so every plan writes them; they are set by runs, not drift.
        let drifted: Vec<Row> = rows
            .into_rows()
            .filter_map(|mut r| {
                r.writes.retain(|w| !w.secret);
                // A drift repair writes fields; it never repeats the change's actions or mail.
                r.actions.clear();
                r.steps.retain(|s| s.kind == stored::StepKind::Write);
                r.changes
                    .retain(|c| !UserField::from_name(&c.field).is_some_and(UserField::is_secret));
                (r.outcome == Outcome::Planned && !r.writes.is_empty()).then_some(r)
            })
            .collect();
        if drifted.is_empty() {
            status.last_checked_time = Some(conditions::now());
            self.write_status(&status).await?;
            return self.after_finish(&status);
        }
        let n = drifted.len() as u64;
        let lineage = lineage(self.buc);
        let run_id = format!("{lineage}-check-{}", jiff::Timestamp::now().as_second());
        let chunks = stored::chunk(drifted);
        let mut refs = Vec::new();
        let mut plan = plan;
        for (i, c) in chunks.iter().enumerate() {
            refs.push(self.write_rows(i, c, Some(&plan)).await?);
        }
        plan.batch_digests = chunks.iter().map(|c| stored::plan_digest(c)).collect();
        self.store.prune(chunks.len()).await?;
        status.corrections = Some(status.corrections.unwrap_or(0) + n);
        status.results_refs = refs;
        status.plan = Some(plan);
        status.summary = Some(Summary {
            targets: n as u32,
            ..Summary::default()
        });
        status.progress = Some(Progress {
            run: run_id,
            batches: chunks.len() as u32,
            done: 0,
        });
        status.phase = Phase::Running;
        self.write_status(&status).await?;
        self.ctx
            .publish(
                self.buc,
                EventType::Normal,
                "DriftCorrected",
                "Enforce",
                Some(format!(
                    "{n} targets drifted from the desired state; correcting them"
                )),
            )
            .await;
        self.execute(status).await
    }

    fn after_finish(&self, status: &OperationStatus) -> Result<Action, Error> {
        self.ctx.reset_failures(&self.buc.uid().unwrap_or_default());
        if self.spec().policy == Policy::Enforce
            && self.spec().mode == Mode::Execute
            && status.phase != Phase::Failed
        {
            let interval = self
                .spec()
                .interval
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(DEFAULT_ENFORCE_INTERVAL);
            return Ok(Action::requeue(interval));
        }
        Ok(Action::await_change())
    }
}

/// A plan's result rows, as they will be stored.
enum PlannedRows {
    All(Vec<Row>),
    /// CSV rows are made from the row plan and the file when they are written, one at a time.
    Csv(CsvRows),
}

impl PlannedRows {
    fn into_rows(self) -> Box<dyn Iterator<Item = Row> + Send> {
        match self {
            PlannedRows::All(rows) => Box::new(rows.into_iter()),
            PlannedRows::Csv(rows) => Box::new(rows.into_rows()),
        }
    }
}

struct CsvRows {
    plan: row_plan::RowsPlan,
    sheet: sheet::Sheet,
    /// Columns whose cells are redacted in results.
    sensitive: Vec<bool>,
    /// A retry: the earlier rows by CSV line, each with the rows that followed it.
    previous: HashMap<u64, Vec<Row>>,
}

impl CsvRows {
    /// The input rows in file order, each followed by the users giving it a number; a retried
    /// row that succeeded before keeps its earlier rows.
    fn into_rows(self) -> impl Iterator<Item = Row> + Send {
        let CsvRows {
            plan,
            sheet,
            sensitive,
            mut previous,
        } = self;
        let mut donors = plan.donors.into_iter().peekable();
        plan.rows
            .into_iter()
            .enumerate()
            .zip(sheet.into_rows())
            .flat_map(move |((i, rp), sheet_row)| {
                let mine: Vec<row_plan::Donor> =
                    std::iter::from_fn(|| donors.next_if(|d| d.row == i)).collect();
                if let Some(mut old) = previous.remove(&rp.line) {
                    if let Some(again) = old.first().and_then(carried) {
                        old[0] = again;
                        return old;
                    }
                    if old.first().is_some_and(|r| r.is_final() && !r.is_failure()) {
                        return old;
                    }
                }
                let line = rp.line;
                let taker = rp.extension.clone();
                let mut cells = sheet_row.cells;
                for (cell, secret) in cells.iter_mut().zip(&sensitive) {
                    if *secret && !cell.is_empty() {
                        *cell = "(redacted)".into();
                    }
                }
                let mut out = vec![csv_row(rp, cells)];
                out.extend(mine.into_iter().map(|d| Row {
                    target: d.extension,
                    outcome: Outcome::Planned,
                    notes: vec![row_plan::holder_note(&d.number, &taker, line)],
                    gives: vec![d.number],
                    ..Default::default()
                }));
                out
            })
    }
}

fn warnings(conn: &crate::api::PbxConnection, spec: &BulkUserChangeSpec) -> Vec<String> {
    let mails = spec
        .actions
        .iter()
        .any(|a| matches!(a, SpecAction::ResetPassword | SpecAction::SendWelcomeEmail));
    if mails && conn.spec.smtp.is_none() {
        vec![format!(
            "PbxConnection {} has no spec.smtp: reset instructions and welcome emails cannot be sent",
            conn.name_any()
        )]
    } else {
        vec![]
    }
}

/// A plan row: the writes of a target, with secrets never stored.
fn planned_row(t: &user_plan::PlannedUser) -> Row {
    let actions: Vec<String> = t.actions.iter().map(|a| a.name().to_string()).collect();
    Row {
        target: t.extension.clone(),
        outcome: if t.changes_anything() {
            Outcome::Planned
        } else {
            Outcome::Unchanged
        },
        writes: t
            .writes
            .iter()
            .map(|w| StoredWrite {
                field: w.field.name().into(),
                from: if w.field.is_secret() {
                    None
                } else {
                    w.from.clone()
                },
                to: match &w.to {
                    NewValue::Set(v) => Some(v.clone()),
                    _ => None,
                },
                secret: w.field.is_secret(),
            })
            .collect(),
        changes: t
            .writes
            .iter()
            .map(|w| FieldChange {
                field: w.field.name().into(),
                from: user_plan::shown(w.field, w.from.as_deref()),
                to: user_plan::shown_new(w.field, &w.to),
            })
            .collect(),
        steps: if t.changes_anything() {
            stored::user_steps(!t.writes.is_empty(), &actions)
        } else {
            vec![]
        },
        actions,
        notes: vec![],
        phone: None,
        ..Default::default()
    }
}

/// A CSV row as a result row: its input cells, its writes, and its errors and warnings as notes.
fn csv_row(rp: row_plan::RowPlan, cells: Vec<String>) -> Row {
    let planned = user_plan::PlannedUser {
        extension: rp.extension.clone(),
        writes: rp.writes,
        actions: rp.actions,
    };
    let mut row = planned_row(&planned);
    if row.target.is_empty() {
        row.target = format!("(line {})", rp.line);
    }
    if !rp.errors.is_empty() {
        // An invalid row does nothing: no step is stored that an edited outcome could start.
        row.outcome = Outcome::Failed;
        row.steps.clear();
    }
    row.notes = rp.errors;
    row.notes.extend(rp.warnings);
    row.takes = rp
        .takes
        .into_iter()
        .map(|m| StoredTake {
            number: m.number,
            holder: m.holder,
            held_as: m.held_as.name().into(),
        })
        .collect();
    row.source = Some(SourceRow {
        line: rp.line,
        cells,
    });
    row
}

/// What a spec asks for, with secret values read from their Secrets.
pub async fn intent(
    client: &kube::Client,
    namespace: &str,
    spec: &BulkUserChangeSpec,
) -> Result<Intent, Error> {
    let mut fields = Vec::new();
    if let Some(f) = &spec.fields {
        fields = plain_fields(f);
        for (field, secret) in [
            (UserField::VoicemailPin, &f.voicemail_pin),
            (UserField::Password, &f.password),
        ] {
            if let Some(SecretField {
                value_from: Some(from),
                lock,
                ..
            }) = secret
            {
                let named_in = format!("spec.fields.{}.valueFrom.secretKeyRef", field.name());
                let r = &from.secret_key_ref;
                let (value, version) =
                    change_secret_value_versioned(client, namespace, r, &named_in).await?;
                let reference =
                    format!("Secret {} key {} resourceVersion {version}", r.name, r.key);
                fields.push(FieldIntent {
                    field,
                    wanted: Wanted::Secret(Secret::with_reference(value, reference)),
                    open: *lock == Lock::Open,
                });
            }
        }
    }
    let actions = spec
        .actions
        .iter()
        .map(|a| match a {
            SpecAction::ResetPassword => ActionKind::ResetPassword,
            SpecAction::ResetTwoFactor => ActionKind::ResetTwoFactor,
            SpecAction::Unlock => ActionKind::Unlock,
            SpecAction::Lock => ActionKind::Lock,
            SpecAction::SendWelcomeEmail => ActionKind::SendWelcomeEmail,
            SpecAction::Remove => ActionKind::Remove,
        })
        .collect();
    Ok(Intent { fields, actions })
}

/// The non-secret fields of a spec as canonical values.
pub fn plain_fields(f: &UserFields) -> Vec<FieldIntent> {
    let mut out = Vec::new();
    let mut push = |field: UserField, value: Option<String>, lock: Lock| {
        out.push(FieldIntent {
            field,
            wanted: Wanted::Value(value),
            open: lock == Lock::Open,
        })
    };
    if let Some(x) = &f.first_name {
        push(UserField::FirstName, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.last_name {
        push(UserField::LastName, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.email {
        push(UserField::Email, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.role {
        push(UserField::Role, Some(format!("{:?}", x.value)), x.lock);
    }
    if let Some(x) = &f.call_group {
        push(UserField::CallGroup, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.pickup_group {
        push(UserField::PickupGroup, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.groups {
        let canonical = user_plan::canonical_groups(x.value.0.iter().map(String::as_str));
        push(
            UserField::Groups,
            (!canonical.is_empty()).then_some(canonical),
            x.lock,
        );
    }
    if let Some(x) = &f.locked {
        push(UserField::Locked, Some(x.value.to_string()), x.lock);
    }
    if let Some(x) = &f.caller_id_policy {
        push(UserField::CallerIdPolicy, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.voice_route_policy {
        push(UserField::VoiceRoutePolicy, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.enterprise_voice {
        push(
            UserField::EnterpriseVoice,
            Some(x.value.to_string()),
            x.lock,
        );
    }
    for (number, location, spec) in [
        (
            UserField::PrimaryNumber,
            UserField::PrimaryNumberLocation,
            &f.primary_number,
        ),
        (
            UserField::PrivateNumber,
            UserField::PrivateNumberLocation,
            &f.private_number,
        ),
    ] {
        if let Some(x) = spec {
            push(number, Some(x.value.number.clone()), x.lock);
            if let Some(l) = &x.value.location {
                push(location, Some(l.clone()), x.lock);
            }
        }
    }
    out
}

/// The run's journal in its results ConfigMaps: the engine records each batch's steps there.
struct ResultsJournal<'r, 'a> {
    run: &'r Run<'a>,
    plan: Option<Plan>,
}

#[async_trait::async_trait]
impl engine::Journal for ResultsJournal<'_, '_> {
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), engine::Error> {
        self.run
            .write_rows(index, rows, self.plan.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| engine::Error::Journal(e.to_string()))
    }
}

/// A retry's view of a target from the earlier run: the row carried over with exactly its
/// failed, uncertain and unreached steps to do again, or None to plan the target afresh.
fn carried(row: &Row) -> Option<Row> {
    let mut steps = row.steps.clone();
    if !row.is_final() {
        engine::steps::resume(&mut steps);
    }
    let steps = engine::steps::carry_over(&steps)?;
    let mut again = row.clone();
    again.outcome = Outcome::Planned;
    again.steps = steps;
    Some(again)
}
