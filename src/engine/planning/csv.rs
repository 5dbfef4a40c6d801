//! The plan of a CSV-sourced BulkUserChange: [`CsvPlanner`].

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use super::{EarlierRun, PlanningError, UserRequest};
use crate::api::Plan;
use crate::engine::steps::kept_by_retry;
use crate::pbx::directory::Directory;
use crate::pbx::{PbxBackend, UserField, users_with_fields};
use crate::plan::stored::{CHUNK_ROWS, Row};
use crate::plan::user_change as request;
use crate::plan::users::Intent;
use crate::plan::{rows as row_plan, sheet};

/// A CSV-sourced plan made a chunk of the file at a time: the users numbers move between are
/// found and planned first (see plan::rows), then each chunk's rows are planned against their
/// own users, read for that chunk only, so memory holds the movers and one chunk.
pub struct CsvPlanner<'a> {
    backend: &'a dyn PbxBackend,
    rules: row_plan::Rules<'a>,
    requests: sheet::Requests,
    movers: Arc<HashSet<String>>,
    /// The fields read: those the file's columns or spec.fields set.
    wanted: Vec<UserField>,
    closed: Vec<UserField>,
    sensitive: Vec<bool>,
    /// A retry: the rows of the lines the earlier run finished, kept as they were.
    kept: KeptLines<'a>,
    sha256: String,
    generation: i64,
    spec_hash: &'a str,
    /// This pass: the planner, the rows still to plan, and what status shows of them.
    pass: CsvPass<'a>,
}

struct CsvPass<'a> {
    planner: row_plan::RowsPlanner<'a>,
    pending: Box<dyn Iterator<Item = (sheet::RowRequest, sheet::SheetRow)> + Send>,
    index: usize,
    resolved: Vec<String>,
    refused: bool,
}

/// Lines planned per read of their users: a CSV line's stored row carries its cells, so the
/// lines of a chunk weigh more than a selection's users; a quarter of a batch keeps the rows in
/// the making small beside the batch being stored.
const LINES_PER_READ: usize = CHUNK_ROWS / 4;

/// How a CSV plan ended: planned, or to be planned again (an Atomic change with invalid rows
/// stores every row refused; its rows so far are to be stored again).
pub enum CsvEnd<'a> {
    Done(Plan),
    Again(Box<CsvPlanner<'a>>),
}

impl<'a> CsvPlanner<'a> {
    /// Checks the file, finds the movers and plans their rows.
    pub async fn new(
        backend: &'a dyn PbxBackend,
        bytes: Vec<u8>,
        max_bytes: usize,
        req: UserRequest<'a>,
    ) -> Result<CsvPlanner<'a>, PlanningError> {
        let sheet = sheet::read(bytes, max_bytes)?;
        let sha256 = sheet.sha256.clone();
        let closed: Vec<UserField> = req
            .intent
            .fields
            .iter()
            .filter(|f| !f.open)
            .map(|f| f.field)
            .collect();
        // Only the fields the file's columns or spec.fields set are read. A number column
        // brings every number field: a move changes the giver's too.
        let mut wanted: Vec<UserField> = sheet
            .columns
            .iter()
            .filter_map(|c| match c {
                sheet::Column::Field(f) => Some(*f),
                _ => None,
            })
            .chain(req.intent.fields.iter().map(|f| f.field))
            .collect();
        if wanted.iter().any(|f| f.is_number()) {
            wanted.extend([
                UserField::PrimaryNumber,
                UserField::PrimaryNumberLocation,
                UserField::PrivateNumber,
                UserField::PrivateNumberLocation,
            ]);
        }
        wanted.sort();
        wanted.dedup();
        let rules = row_plan::Rules {
            base: req.intent,
            policies: backend.policies().await?,
            supported: backend.capabilities().user_fields,
            atomic: req.atomic,
        };
        let requests = sheet::Requests::new(&sheet, &closed);
        let movers = Arc::new(movers(backend, &requests, req.intent).await?);
        let kept = KeptLines::new(req.earlier);
        let pass = pass(backend, &rules, &requests, &movers, &wanted, None).await?;
        Ok(CsvPlanner {
            backend,
            rules,
            sensitive: request::sensitive_columns(&sheet),
            requests,
            movers,
            wanted,
            closed,
            kept,
            sha256,
            generation: req.generation,
            spec_hash: req.spec_hash,
            pass,
        })
    }

    /// The file's header as the result CSV echoes it.
    pub fn header(&self) -> Vec<String> {
        request::shown_header(&self.requests.sheet().header)
    }

    /// The stored rows of the next chunk of the file, in file order; None when all are planned.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Row>>, PlanningError> {
        let pass = &mut self.pass;
        let chunk: Vec<(sheet::RowRequest, sheet::SheetRow)> =
            pass.pending.by_ref().take(LINES_PER_READ).collect();
        if chunk.is_empty() {
            return Ok(None);
        }
        let extensions: Vec<String> = chunk
            .iter()
            .filter(|(r, _)| r.errors.is_empty() && !pass.planner.is_mover(&r.extension))
            .map(|(r, _)| r.extension.clone())
            .collect();
        let mut dir = Directory::untracked(
            users_with_fields(self.backend, extensions, Some(&self.wanted))
                .await?
                .into_values(),
        );
        let mut rows = Vec::with_capacity(chunk.len());
        for (req, sheet_row) in chunk {
            let (planned, donors) = pass.planner.next(pass.index, req, &mut dir);
            pass.index += 1;
            if pass.resolved.len() < request::RESOLVED_SHOWN && !planned.extension.is_empty() {
                pass.resolved.push(planned.extension.clone());
            }
            match self.kept.of(planned.line).await? {
                Some(kept) => rows.extend(kept),
                None => rows.extend(request::csv_line_rows(
                    planned,
                    sheet_row.cells,
                    &self.sensitive,
                    donors,
                )),
            }
        }
        Ok(Some(rows))
    }

    /// status.plan once every chunk is planned; or, for an Atomic change with invalid rows
    /// planned as if valid, the planner of the pass that refuses them all.
    pub async fn finish(self) -> Result<CsvEnd<'a>, PlanningError> {
        let CsvPass {
            planner,
            resolved,
            refused,
            ..
        } = self.pass;
        let (hash, tally) = planner.finish();
        if let Some(why) = tally
            .atomic_refusal()
            .filter(|_| self.rules.atomic && !refused)
        {
            let pass = pass(
                self.backend,
                &self.rules,
                &self.requests,
                &self.movers,
                &self.wanted,
                Some(why),
            )
            .await?;
            let mut kept = self.kept;
            kept.restart();
            return Ok(CsvEnd::Again(Box::new(CsvPlanner { pass, kept, ..self })));
        }
        let planned = request::CsvPlanned {
            hash,
            tally,
            resolved,
            sha256: self.sha256,
        };
        Ok(CsvEnd::Done(request::csv_status_plan(
            planned,
            &self.requests.sheet().header,
            &self.closed,
            self.generation,
            self.spec_hash,
        )))
    }
}

/// A retry's kept lines: the rows of each line the earlier run finished (the first one as a
/// retry carries it over), read from the earlier run's batches as the pass reaches the line.
/// Both go in file order, so one batch of the earlier run is held at a time.
struct KeptLines<'a> {
    earlier: Option<&'a dyn EarlierRun>,
    next_batch: usize,
    /// Rows read and not yet reached, grouped by line in file order (a giving row, which has
    /// no line, goes with the row before it).
    lines: VecDeque<(u64, Vec<Row>)>,
}

impl<'a> KeptLines<'a> {
    fn new(earlier: Option<&'a dyn EarlierRun>) -> KeptLines<'a> {
        KeptLines {
            earlier,
            next_batch: 0,
            lines: VecDeque::new(),
        }
    }

    /// Back to the first line, for another pass over the file.
    fn restart(&mut self) {
        self.next_batch = 0;
        self.lines.clear();
    }

    /// The rows of `line` if the earlier run finished it; lines before it are let go.
    async fn of(&mut self, line: u64) -> Result<Option<Vec<Row>>, PlanningError> {
        let Some(earlier) = self.earlier else {
            return Ok(None);
        };
        loop {
            let all_read = self.next_batch >= earlier.batches();
            // A line is whole once a later one was read (or every batch was).
            let whole = self.lines.len() > 1 || all_read;
            match self.lines.front() {
                Some((l, _)) if *l < line && whole => {
                    self.lines.pop_front();
                    continue;
                }
                Some((l, _)) if *l > line => return Ok(None),
                Some((l, _)) if *l == line && whole => {
                    let (_, mut rows) = self.lines.pop_front().expect("a front line");
                    return Ok(match rows.first().and_then(kept_by_retry) {
                        Some(first) => {
                            rows[0] = first;
                            Some(rows)
                        }
                        None => None,
                    });
                }
                None if all_read => return Ok(None),
                _ => {}
            }
            let batch = earlier.batch(self.next_batch).await?;
            self.next_batch += 1;
            for row in batch {
                match (row.source.as_ref().map(|s| s.line), self.lines.back_mut()) {
                    (Some(l), Some((last, rows))) if l == *last => rows.push(row),
                    (Some(l), Some((last, _))) if l < *last => {
                        return Err(PlanningError::Plan(crate::plan::PlanError::Invalid(
                            format!(
                                "the run being retried stored line {l} after line {last}, not in file order (planned by an older operator?): delete and re-create the change to plan it afresh"
                            ),
                        )));
                    }
                    (Some(l), _) => self.lines.push_back((l, vec![row])),
                    (None, Some((_, rows))) => rows.push(row),
                    // A giving row whose line was let go already.
                    (None, None) => {}
                }
            }
        }
    }
}

/// A pass over the file: the movers read (a chunk at a time) and their rows rehearsed, every
/// row to come.
async fn pass<'a>(
    backend: &dyn PbxBackend,
    rules: &row_plan::Rules<'a>,
    requests: &sheet::Requests,
    movers: &Arc<HashSet<String>>,
    wanted: &[UserField],
    refusal: Option<String>,
) -> Result<CsvPass<'a>, PlanningError> {
    let mut users = Vec::new();
    let extensions: Vec<&String> = movers.iter().collect();
    for chunk in extensions.chunks(CHUNK_ROWS) {
        let chunk = chunk.iter().map(|e| e.to_string()).collect();
        users.extend(
            users_with_fields(backend, chunk, Some(wanted))
                .await?
                .into_values(),
        );
    }
    let refused = refusal.is_some();
    let planner = row_plan::RowsPlanner::new(
        rules.clone(),
        requests.rows().map(|(r, _)| r),
        movers.clone(),
        users,
        refusal,
    )?;
    Ok(CsvPass {
        planner,
        pending: Box::new(requests.rows()),
        index: 0,
        resolved: Vec::new(),
        refused,
    })
}

/// The users numbers move between: each valid row giving a number someone else holds, and that
/// holder, asked of the PBX a batch's worth of numbers at a time. A number spec.fields gives
/// every row moves along all of them: every valid row is a mover then, and all their users are
/// held while the file is planned.
async fn movers(
    backend: &dyn PbxBackend,
    requests: &sheet::Requests,
    base: &Intent,
) -> Result<HashSet<String>, PlanningError> {
    let everyone = base.fields.iter().any(|f| f.open && f.field.is_number());
    let mut movers = HashSet::new();
    let mut rows = requests.rows();
    loop {
        let mut given: Vec<(String, String)> = Vec::new();
        let mut more = false;
        for (r, _) in rows.by_ref() {
            if everyone && r.errors.is_empty() {
                movers.insert(r.extension.clone());
            }
            given.extend(
                row_plan::numbers_given(&r, base)
                    .into_iter()
                    .map(|n| (n, r.extension.clone())),
            );
            if given.len() >= CHUNK_ROWS {
                more = true;
                break;
            }
        }
        if !given.is_empty() {
            let numbers: Vec<String> = given.iter().map(|(n, _)| n.clone()).collect();
            let holders = backend.number_holders(&numbers).await?;
            row_plan::add_movers(&given, &holders, &mut movers);
        }
        if !more {
            return Ok(movers);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::api::Outcome;
    use crate::plan::stored::SourceRow;

    /// An earlier run in memory that notes which batches were read.
    struct Batches {
        batches: Vec<Vec<Row>>,
        reads: Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl EarlierRun for Batches {
        fn batches(&self) -> usize {
            self.batches.len()
        }
        async fn batch(&self, index: usize) -> Result<Vec<Row>, PlanningError> {
            self.reads.lock().unwrap().push(index);
            Ok(self.batches[index].clone())
        }
    }

    fn row(target: &str, line: Option<u64>, outcome: Outcome) -> Row {
        Row {
            target: target.into(),
            outcome,
            source: line.map(|line| SourceRow {
                line,
                cells: vec![target.into()],
            }),
            ..Default::default()
        }
    }

    fn targets(rows: Option<Vec<Row>>) -> Option<Vec<String>> {
        rows.map(|rows| rows.into_iter().map(|r| r.target).collect())
    }

    fn earlier() -> Batches {
        Batches {
            batches: vec![
                vec![
                    row("201", Some(1), Outcome::Changed),
                    row("202", Some(2), Outcome::Changed),
                    row("901", None, Outcome::Changed),
                ],
                // A giving row of line 2 opens the next batch.
                vec![
                    row("902", None, Outcome::Changed),
                    row("203", Some(3), Outcome::Conflict),
                    row("205", Some(5), Outcome::Unchanged),
                ],
            ],
            reads: Mutex::new(Vec::new()),
        }
    }

    #[tokio::test]
    async fn kept_lines_come_a_batch_at_a_time_with_their_giving_rows() {
        let earlier = earlier();
        let mut kept = KeptLines::new(Some(&earlier));
        assert_eq!(targets(kept.of(1).await.unwrap()), Some(vec!["201".into()]));
        assert_eq!(
            *earlier.reads.lock().unwrap(),
            [0],
            "line 1 is whole once line 2 was read: the next batch waits"
        );
        assert_eq!(
            targets(kept.of(2).await.unwrap()),
            Some(vec!["202".into(), "901".into(), "902".into()])
        );
        assert_eq!(
            targets(kept.of(3).await.unwrap()),
            None,
            "a conflict is planned afresh"
        );
        assert_eq!(
            targets(kept.of(4).await.unwrap()),
            None,
            "not in the earlier run"
        );
        assert_eq!(targets(kept.of(5).await.unwrap()), Some(vec!["205".into()]));
        assert_eq!(targets(kept.of(6).await.unwrap()), None);
        assert_eq!(
            *earlier.reads.lock().unwrap(),
            [0, 1],
            "each batch read once"
        );

        kept.restart();
        assert_eq!(targets(kept.of(2).await.unwrap()).map(|t| t.len()), Some(3));
    }

    #[tokio::test]
    async fn lines_skipped_by_the_file_are_let_go() {
        let earlier = earlier();
        let mut kept = KeptLines::new(Some(&earlier));
        assert_eq!(targets(kept.of(5).await.unwrap()), Some(vec!["205".into()]));
        assert_eq!(targets(kept.of(7).await.unwrap()), None);
        assert!(kept.lines.is_empty());
    }

    #[tokio::test]
    async fn an_earlier_run_out_of_file_order_is_refused() {
        let earlier = Batches {
            batches: vec![vec![
                row("202", Some(2), Outcome::Changed),
                row("201", Some(1), Outcome::Changed),
            ]],
            reads: Mutex::new(Vec::new()),
        };
        let mut kept = KeptLines::new(Some(&earlier));
        let err = kept.of(1).await.unwrap_err().to_string();
        assert!(err.contains("not in file order"), "{err}");
    }

    #[tokio::test]
    async fn without_an_earlier_run_nothing_is_kept() {
        let mut kept = KeptLines::new(None);
        assert!(kept.of(1).await.unwrap().is_none());
    }
}
