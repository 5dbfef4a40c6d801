//! The driver every kind's run goes through: its stored batches are read back one group at a
//! time, checked against the digests recorded when the plan was stored, handed to the kind's
//! [`Executor`], and counted, so that status, events and metrics come from the journal the same
//! way for every kind. Memory holds one group of batches (an executor whose window spans batches,
//! a restart's, takes them one by one as it reaches them and hands each back once settled) and the
//! few rows status shows.

use super::results::Digest;
use super::{Batch, Ended, Error, Executor, Feed, Store};
use crate::api::Outcome;
use crate::plan::stored::{Row, plan_digest};

/// A run's stored batches from `done` to `batches`, executed in order.
pub struct Runner<'a> {
    store: &'a dyn Store,
    /// One per batch, recorded when the plan was stored; empty for plans stored by an operator
    /// from before digests (they run as stored).
    digests: &'a [String],
    /// All remaining batches in one call (an Atomic change: one transaction for all).
    together: bool,
    next: usize,
    end: usize,
    /// What the finished batches hold, for status.
    done: Digest,
}

/// What one call to [`Runner::next`] did.
#[derive(Debug)]
pub enum Next {
    /// The next batch (or, together, all the rest) finished: its rows counted in `batch` (and
    /// in [`Runner::done`]), and each row's outcome.
    Finished {
        batches: usize,
        batch: Digest,
        outcomes: Vec<Outcome>,
    },
    /// A stop was asked for: what is under way is recorded, the rest left for the next operator.
    Stopped,
    /// Every batch has finished.
    Complete,
}

impl<'a> Runner<'a> {
    /// Counts the batches before `done` (finished by earlier calls or operators).
    pub async fn new(
        store: &'a dyn Store,
        digests: &'a [String],
        done: usize,
        batches: usize,
        together: bool,
    ) -> Result<Runner<'a>, Error> {
        let mut digest = Digest::default();
        for index in 0..done.min(batches) {
            digest.merge(Digest::of(&store.load(index).await?));
        }
        Ok(Runner {
            store,
            digests,
            together,
            next: done,
            end: batches,
            done: digest,
        })
    }

    /// The finished batches so far: counts and the rows status shows.
    pub fn done(&self) -> &Digest {
        &self.done
    }

    /// How many batches have finished.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Reads one stored batch and checks it is the batch stored for this plan: a results
    /// ConfigMap edited since (a target or an action added) is never executed.
    pub async fn verified(&self, index: usize) -> Result<Vec<Row>, Error> {
        verified(self.store, self.digests, index).await
    }

    /// Executes the next batch (or, together, all the rest) to its outcomes.
    pub async fn next(&mut self, exec: &dyn Executor) -> Result<Next, Error> {
        if self.next >= self.end {
            return Ok(Next::Complete);
        }
        if exec.spans_batches() && !self.together {
            return self.fed(exec).await;
        }
        if self.together {
            return self.together(exec).await;
        }
        let mut group = [Batch::new(self.next, self.verified(self.next).await?)];
        if exec.run(&mut group).await? == Ended::Stopped {
            return Ok(Next::Stopped);
        }
        let [b] = group;
        let batch = Digest::of(&b.rows);
        self.done.merge(batch.clone());
        self.next += 1;
        Ok(Next::Finished {
            batches: 1,
            batch,
            outcomes: b.rows.iter().map(|r| r.outcome).collect(),
        })
    }
}

impl Runner<'_> {
    /// Every remaining batch in one call (Atomic), then counted a batch at a time as recorded.
    async fn together(&mut self, exec: &dyn Executor) -> Result<Next, Error> {
        if exec
            .run_together(self.store, self.digests, self.next, self.end)
            .await?
            == Ended::Stopped
        {
            return Ok(Next::Stopped);
        }
        let mut batch = Digest::default();
        let mut outcomes = Vec::new();
        for index in self.next..self.end {
            let rows = self.verified(index).await?;
            batch.merge(Digest::of(&rows));
            outcomes.extend(rows.iter().map(|r| r.outcome));
        }
        let batches = self.end - self.next;
        self.done.merge(batch.clone());
        self.next = self.end;
        Ok(Next::Finished {
            batches,
            batch,
            outcomes,
        })
    }

    /// Every remaining batch through an executor that takes them as it reaches them (one call).
    async fn fed(&mut self, exec: &dyn Executor) -> Result<Next, Error> {
        let mut feed = RunFeed {
            store: self.store,
            digests: self.digests,
            next: self.next,
            end: self.end,
            batch: Digest::default(),
            outcomes: Vec::new(),
        };
        if exec.run_fed(&mut feed).await? == Ended::Stopped {
            return Ok(Next::Stopped);
        }
        let batches = self.end - self.next;
        self.done.merge(feed.batch.clone());
        self.next = self.end;
        Ok(Next::Finished {
            batches,
            batch: feed.batch,
            outcomes: feed.outcomes,
        })
    }
}

/// The Runner's batches for [`Executor::run_fed`]: read (and checked) when taken, counted when
/// handed back.
struct RunFeed<'a> {
    store: &'a dyn Store,
    digests: &'a [String],
    next: usize,
    end: usize,
    batch: Digest,
    outcomes: Vec<Outcome>,
}

#[async_trait::async_trait]
impl Feed for RunFeed<'_> {
    async fn next(&mut self) -> Result<Option<Batch>, Error> {
        if self.next >= self.end {
            return Ok(None);
        }
        let rows = verified(self.store, self.digests, self.next).await?;
        let batch = Batch::new(self.next, rows);
        self.next += 1;
        Ok(Some(batch))
    }

    fn finished(&mut self, batch: Batch) {
        self.batch.merge(Digest::of(&batch.rows));
        self.outcomes.extend(batch.rows.iter().map(|r| r.outcome));
    }
}

/// [`Runner::verified`] for callers that read a stored plan without running it (a retry that
/// builds on the earlier run, a validated plan about to execute).
pub async fn verified(
    store: &dyn Store,
    digests: &[String],
    index: usize,
) -> Result<Vec<Row>, Error> {
    checked(digests, index, store.load(index).await?)
}

/// `rows` if they are batch `index` as stored for the plan of `digests` (no digests: a plan
/// stored before batches had them).
pub fn checked(digests: &[String], index: usize, rows: Vec<Row>) -> Result<Vec<Row>, Error> {
    if digests.is_empty() {
        return Ok(rows);
    }
    if digests.get(index) != Some(&plan_digest(&rows)) {
        return Err(Error::Tampered { index });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::api::Outcome;
    use crate::engine::fake::DyingJournal;
    use crate::engine::{Journal, save};
    use crate::plan::stored::{Step, StepKind};

    fn batch(first: usize, n: usize) -> Vec<Row> {
        (first..first + n)
            .map(|i| Row {
                target: format!("{}", 200 + i),
                actions: vec!["Unlock".into()],
                steps: vec![Step::pending(StepKind::Unlock)],
                ..Default::default()
            })
            .collect()
    }

    /// Batches of 2, 3 and 1 rows, and their digests.
    fn stored() -> (DyingJournal, Vec<String>) {
        let batches = vec![batch(0, 2), batch(2, 3), batch(5, 1)];
        let digests = batches.iter().map(|b| plan_digest(b)).collect();
        (DyingJournal::new(batches), digests)
    }

    /// Marks every row of the batches it is given Changed and records them; or stops, or fails.
    struct Marker<'a> {
        journal: &'a dyn Journal,
        calls: Mutex<Vec<Vec<usize>>>,
        ends: Result<Ended, ()>,
    }

    impl<'a> Marker<'a> {
        fn new(journal: &'a dyn Journal, ends: Result<Ended, ()>) -> Marker<'a> {
            Marker {
                journal,
                calls: Mutex::new(vec![]),
                ends,
            }
        }

        fn calls(&self) -> Vec<Vec<usize>> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Executor for Marker<'_> {
        async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
            self.calls
                .lock()
                .unwrap()
                .push(batches.iter().map(|b| b.index).collect());
            match self.ends {
                Err(()) => return Err(Error::Journal("the API server is away".into())),
                Ok(Ended::Stopped) => return Ok(Ended::Stopped),
                Ok(Ended::Finished) => {}
            }
            for b in batches.iter_mut() {
                for r in b.rows.iter_mut() {
                    r.outcome = Outcome::Changed;
                }
                b.dirty = true;
            }
            save(self.journal, batches).await?;
            Ok(Ended::Finished)
        }
    }

    #[tokio::test]
    async fn batches_run_in_order_one_per_call_and_each_is_counted() {
        let (journal, digests) = stored();
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &digests, 0, 3, false).await.unwrap();
        assert_eq!(runner.position(), 0);
        for (i, rows) in [2, 3, 1].into_iter().enumerate() {
            match runner.next(&exec).await.unwrap() {
                Next::Finished { batches, batch, .. } => {
                    assert_eq!(
                        (batches, batch.rows, batch.summary.changed),
                        (1, rows, rows as u32)
                    );
                }
                other => panic!("batch {i}: {other:?}"),
            }
            assert_eq!(runner.position(), i + 1);
        }
        assert!(matches!(runner.next(&exec).await.unwrap(), Next::Complete));
        assert_eq!(
            exec.calls(),
            [vec![0], vec![1], vec![2]],
            "in order, once each"
        );
        assert_eq!((runner.done().rows, runner.done().summary.changed), (6, 6));
        assert!(journal.rows().iter().all(|r| r.outcome == Outcome::Changed));
    }

    #[tokio::test]
    async fn a_tampered_batch_is_refused_and_nothing_of_it_runs() {
        let (journal, digests) = stored();
        // Someone adds an action to a target of batch 1 after the plan was stored.
        let mut edited = journal.batch(1);
        edited[0].actions.push("Remove".into());
        edited[0].steps.push(Step::pending(StepKind::Remove));
        journal.put(1, edited.clone());
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &digests, 0, 3, false).await.unwrap();
        assert!(matches!(
            runner.next(&exec).await.unwrap(),
            Next::Finished { batches: 1, .. }
        ));
        let e = runner.next(&exec).await.unwrap_err();
        assert!(matches!(e, Error::Tampered { index: 1 }), "{e:?}");
        assert!(!e.is_transient(), "waiting does not fix an edited plan");
        assert_eq!(runner.position(), 1);
        assert_eq!(exec.calls(), [vec![0]], "the executor never saw batch 1");
        assert_eq!(journal.batch(1), edited, "nothing of it ran");

        // Together, an edited batch stops every batch of the group before any runs.
        let (journal, digests) = stored();
        let mut edited = journal.batch(2);
        edited[0].target = "999".into();
        journal.put(2, edited);
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &digests, 0, 3, true).await.unwrap();
        assert!(matches!(
            runner.next(&exec).await.unwrap_err(),
            Error::Tampered { index: 2 }
        ));
        assert!(exec.calls().is_empty(), "nothing of the group ran");
        assert_eq!(journal.records(), 0);
    }

    #[tokio::test]
    async fn progress_recorded_in_a_batch_is_not_tampering() {
        // A batch as an earlier operator left it (rows begun, steps recorded) is the same plan.
        let (journal, digests) = stored();
        let mut begun = journal.batch(0);
        begun[0].outcome = Outcome::InProgress;
        begun[0].steps[0].state = crate::plan::stored::StepState::Done;
        begun[0].notes.push("Unlock: done".into());
        journal.put(0, begun);
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &digests, 0, 3, false).await.unwrap();
        assert!(matches!(
            runner.next(&exec).await.unwrap(),
            Next::Finished { batches: 1, .. }
        ));
    }

    #[tokio::test]
    async fn plans_stored_before_digests_run_as_stored() {
        let (journal, _) = stored();
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &[], 0, 3, false).await.unwrap();
        while !matches!(runner.next(&exec).await.unwrap(), Next::Complete) {}
        assert_eq!(exec.calls().len(), 3);
    }

    #[tokio::test]
    async fn together_runs_every_remaining_batch_in_one_call() {
        let (journal, digests) = stored();
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        let mut runner = Runner::new(&journal, &digests, 1, 3, true).await.unwrap();
        match runner.next(&exec).await.unwrap() {
            Next::Finished { batches, batch, .. } => assert_eq!((batches, batch.rows), (2, 4)),
            other => panic!("{other:?}"),
        }
        assert_eq!(runner.position(), 3);
        assert!(matches!(runner.next(&exec).await.unwrap(), Next::Complete));
        assert_eq!(exec.calls(), [vec![1, 2]], "one call for the rest");
        assert!(
            journal
                .batch(0)
                .iter()
                .all(|r| r.outcome == Outcome::Planned),
            "batches before the position are not run again"
        );
    }

    #[tokio::test]
    async fn a_stopped_executor_leaves_the_position_unchanged() {
        let (journal, digests) = stored();
        let mut runner = Runner::new(&journal, &digests, 0, 3, false).await.unwrap();
        let finishes = Marker::new(&journal, Ok(Ended::Finished));
        runner.next(&finishes).await.unwrap();
        let stops = Marker::new(&journal, Ok(Ended::Stopped));
        assert!(matches!(runner.next(&stops).await.unwrap(), Next::Stopped));
        assert_eq!(runner.position(), 1);
        assert_eq!(runner.done().rows, 2, "the stopped batch is not counted");
        // The next call (or operator) hands the same batch over again.
        assert!(matches!(
            runner.next(&finishes).await.unwrap(),
            Next::Finished { batches: 1, .. }
        ));
        assert_eq!(finishes.calls(), [vec![0], vec![1]]);
        assert_eq!(stops.calls(), [vec![1]]);
    }

    #[tokio::test]
    async fn an_executor_error_leaves_the_position_unchanged() {
        let (journal, digests) = stored();
        let mut runner = Runner::new(&journal, &digests, 0, 3, false).await.unwrap();
        let fails = Marker::new(&journal, Err(()));
        let e = runner.next(&fails).await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert_eq!((runner.position(), runner.done().rows), (0, 0));
    }

    #[tokio::test]
    async fn new_counts_the_batches_already_finished() {
        let (journal, digests) = stored();
        let mut first = journal.batch(0);
        first[0].outcome = Outcome::Changed;
        first[1].outcome = Outcome::Failed;
        journal.put(0, first);
        let mut second = journal.batch(1);
        second
            .iter_mut()
            .for_each(|r| r.outcome = Outcome::Uncertain);
        journal.put(1, second);
        let runner = Runner::new(&journal, &digests, 2, 3, false).await.unwrap();
        let done = runner.done();
        assert_eq!(runner.position(), 2);
        assert_eq!(done.rows, 5);
        assert_eq!(
            (
                done.summary.changed,
                done.summary.failed,
                done.summary.uncertain
            ),
            (1, 1, 3)
        );
        // A position past the end (a plan re-chunked smaller) counts what exists, runs nothing.
        let mut runner = Runner::new(&journal, &digests, 7, 3, false).await.unwrap();
        assert_eq!(runner.done().rows, 6);
        let exec = Marker::new(&journal, Ok(Ended::Finished));
        assert!(matches!(runner.next(&exec).await.unwrap(), Next::Complete));
        assert!(exec.calls().is_empty());
    }
}
