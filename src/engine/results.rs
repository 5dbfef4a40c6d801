//! Results for people, made from a run's journal the same way for every kind: the result CSV,
//! the counts in status.summary, and the few rows status shows.

use crate::api::{FieldChange, Outcome, Phase, RestartSummary, Summary, TargetResult};
use crate::plan::stored::Row;

/// How many result rows status shows; the rest are in the ConfigMaps.
pub const STATUS_RESULTS: usize = 100;

fn outcome_name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `field: from -> to` pairs, `(unset)` for absent values.
pub fn describe_changes(changes: &[FieldChange]) -> String {
    changes
        .iter()
        .map(|c| {
            format!(
                "{}: {} -> {}",
                c.field,
                c.from.as_deref().unwrap_or("(unset)"),
                c.to.as_deref().unwrap_or("(unset)")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub const CSV_HEADER: [&str; 5] = ["target", "outcome", "changes", "actions", "notes"];

/// The human CSV of some rows, with a header.
pub fn to_csv(rows: &[Row]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADER).expect("writing to memory");
    for r in rows {
        w.write_record([
            r.target.as_str(),
            &outcome_name(r.outcome),
            &describe_changes(&r.changes),
            &r.actions.join(" "),
            &r.notes.join("; "),
        ])
        .expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("flushing to memory"))
        .expect("CSV of UTF-8 strings is UTF-8")
}

/// The result CSV of a CSV-sourced change: the input columns and rows as read, plus
/// `Change OK` and `Notes`. Rows that are not input rows (users giving a number) are left out;
/// their notes are on the taking row and in status.
pub fn to_source_csv(header: &[String], rows: &[Row]) -> String {
    use crate::plan::sheet::{CHANGE_OK, NOTES};
    let mut w = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    // A result CSV uploaded again has these columns already: they are replaced, not repeated.
    let keep: Vec<usize> = (0..header.len())
        .filter(|i| {
            !matches!(
                crate::plan::sheet::column(&header[*i]),
                crate::plan::sheet::Column::Ignored
            )
        })
        .collect();
    let mut head: Vec<&str> = keep.iter().map(|i| header[*i].as_str()).collect();
    head.extend([CHANGE_OK, NOTES]);
    w.write_record(&head).expect("writing to memory");
    for r in rows {
        let Some(source) = &r.source else { continue };
        let mut record: Vec<&str> = keep
            .iter()
            .map(|i| source.cells.get(*i).map(String::as_str).unwrap_or(""))
            .collect();
        let ok = change_ok(r.outcome);
        let notes = source_notes(r);
        record.push(ok);
        record.push(&notes);
        w.write_record(&record).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("flushing to memory"))
        .expect("CSV of UTF-8 strings is UTF-8")
}

/// `Change OK`: did the row succeed (Validate: would it). Empty while it is being applied.
pub fn change_ok(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Changed | Outcome::Unchanged | Outcome::Planned => "true",
        Outcome::InProgress => "",
        _ => "false",
    }
}

/// `Notes`: errors and warnings; on success, the fields that were (or would be) updated.
pub fn source_notes(r: &Row) -> String {
    let mut parts: Vec<String> = r.notes.clone();
    let fields = || {
        r.changes
            .iter()
            .map(|c| {
                format!(
                    "{} ({} -> {})",
                    c.field,
                    c.from.as_deref().unwrap_or("unset"),
                    c.to.as_deref().unwrap_or("unset")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match r.outcome {
        Outcome::Changed if !r.changes.is_empty() => parts.push(format!("updated: {}", fields())),
        Outcome::Planned if !r.changes.is_empty() => {
            parts.push(format!("would update: {}", fields()))
        }
        Outcome::Unchanged if parts.is_empty() => {
            parts.push("no change: the user already has these values".into())
        }
        _ => {}
    }
    if !r.actions.is_empty() && matches!(r.outcome, Outcome::Planned) {
        parts.push(format!("would run: {}", r.actions.join(", ")));
    }
    parts.join("; ")
}

/// Joins the CSVs of several ConfigMaps into one, keeping the first header only.
pub fn join_csv<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        let body = if i == 0 {
            part
        } else {
            part.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
        };
        out.push_str(body);
    }
    out
}

/// Counts of a run's rows.
pub fn summarize<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Summary {
    let mut s = Summary::default();
    for r in rows {
        s.targets += 1;
        match r.outcome {
            Outcome::Changed => s.changed += 1,
            Outcome::Unchanged => s.unchanged += 1,
            Outcome::Failed => s.failed += 1,
            Outcome::Skipped | Outcome::NotRegistered | Outcome::Expired => s.skipped += 1,
            Outcome::Conflict => s.conflicts += 1,
            Outcome::Uncertain => s.uncertain += 1,
            Outcome::Planned | Outcome::InProgress | Outcome::Restarted | Outcome::Accepted => {}
        }
    }
    s
}

/// Counts of a restart's rows.
pub fn restart_summary<'a>(rows: impl IntoIterator<Item = &'a Row>) -> RestartSummary {
    let mut s = RestartSummary::default();
    for r in rows {
        s.targets += 1;
        match r.outcome {
            Outcome::Restarted => s.restarted += 1,
            Outcome::Accepted => s.accepted += 1,
            Outcome::NotRegistered => s.not_registered += 1,
            Outcome::Expired => s.expired += 1,
            Outcome::Failed | Outcome::Conflict => s.failed += 1,
            Outcome::Uncertain => s.uncertain += 1,
            Outcome::InProgress => s.in_flight += 1,
            _ => {}
        }
    }
    s
}

/// Adds the counts of `b` to `a`.
pub fn add(a: &mut Summary, b: &Summary) {
    a.targets += b.targets;
    a.changed += b.changed;
    a.unchanged += b.unchanged;
    a.failed += b.failed;
    a.skipped += b.skipped;
    a.conflicts += b.conflicts;
    a.uncertain += b.uncertain;
}

fn add_restart(a: &mut RestartSummary, b: &RestartSummary) {
    a.targets += b.targets;
    a.restarted += b.restarted;
    a.accepted += b.accepted;
    a.not_registered += b.not_registered;
    a.expired += b.expired;
    a.failed += b.failed;
    a.uncertain += b.uncertain;
    a.in_flight += b.in_flight;
}

/// A finished batch as status needs it: its counts, and the rows status may show (the first
/// failures and the first others, each at most [`STATUS_RESULTS`]).
#[derive(Clone, Debug, Default)]
pub struct Digest {
    pub summary: Summary,
    /// The same rows counted as a phone restart counts them.
    pub restart: RestartSummary,
    pub shown: Vec<Row>,
    pub rows: usize,
}

impl Digest {
    /// Adds another batch, keeping at most [`STATUS_RESULTS`] failures and as many others.
    pub fn merge(&mut self, other: Digest) {
        add(&mut self.summary, &other.summary);
        add_restart(&mut self.restart, &other.restart);
        self.rows += other.rows;
        let merged: Vec<Row> = std::mem::take(&mut self.shown)
            .into_iter()
            .chain(other.shown)
            .collect();
        *self = Digest {
            shown: Digest::of(&merged).shown,
            ..std::mem::take(self)
        };
    }

    pub fn of(rows: &[Row]) -> Digest {
        let (mut failures, mut others) = (0, 0);
        let shown = rows
            .iter()
            .filter(|r| {
                let n = if r.is_failure() {
                    &mut failures
                } else {
                    &mut others
                };
                *n += 1;
                *n <= STATUS_RESULTS
            })
            .cloned()
            .collect();
        Digest {
            summary: summarize(rows),
            restart: restart_summary(rows),
            shown,
            rows: rows.len(),
        }
    }
}

/// The results status shows: failures first, then the rest, capped; and whether it was cut.
pub fn for_status<'a>(rows: impl IntoIterator<Item = &'a Row>) -> (Vec<TargetResult>, bool) {
    let mut failures = Vec::new();
    let mut others = Vec::new();
    let mut total = 0;
    for r in rows {
        total += 1;
        let bucket = if r.is_failure() {
            &mut failures
        } else {
            &mut others
        };
        if bucket.len() < STATUS_RESULTS {
            bucket.push(TargetResult {
                target: r.target.clone(),
                outcome: r.outcome,
                changes: r.changes.iter().take(64).cloned().collect(),
                notes: r.notes.iter().take(16).map(|n| truncate(n, 1024)).collect(),
            });
        }
    }
    let mut shown = failures;
    shown.extend(others);
    shown.truncate(STATUS_RESULTS);
    let truncated = total > shown.len();
    (shown, truncated)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        format!("{}...", &s[..s.floor_char_boundary(max - 3)])
    }
}

/// A user-kind finished run: Succeeded, PartiallyFailed or Failed from the counts.
pub fn user_verdict(s: &Summary) -> (Phase, String) {
    let bad = s.failed + s.conflicts + s.uncertain;
    let phase = if bad == 0 {
        Phase::Succeeded
    } else if bad < s.targets {
        Phase::PartiallyFailed
    } else {
        Phase::Failed
    };
    let mut message = format!(
        "{} targets: {} changed, {} unchanged, {} failed, {} conflicts, {} skipped",
        s.targets, s.changed, s.unchanged, s.failed, s.conflicts, s.skipped
    );
    if s.uncertain > 0 {
        message.push_str(&format!(
            ", {} uncertain (a mail was being sent when the operator stopped: it may not have gone out)",
            s.uncertain
        ));
    }
    (phase, message)
}

/// A user-kind summary: the run's targets and the counts of its finished batches.
pub fn user_summary(done: &Digest, before: Option<&Summary>) -> Summary {
    let targets = before.map(|s| s.targets).unwrap_or(0);
    Summary {
        targets: targets.max(done.rows as u32),
        ..done.summary.clone()
    }
}

/// A restart's summary: the run's phones and the counts of its finished batches.
pub fn restart_totals(done: &Digest, before: Option<&RestartSummary>) -> RestartSummary {
    let targets = before.map(|s| s.targets).unwrap_or(0);
    RestartSummary {
        targets: targets.max(done.rows as u32),
        ..done.restart.clone()
    }
}

/// A finished restart: Expired when the window closed before any phone was reached, otherwise
/// Succeeded, PartiallyFailed or Failed from the counts.
pub fn restart_verdict(s: &RestartSummary) -> (Phase, String) {
    let attempted = s.targets - s.not_registered;
    let bad = s.failed + s.uncertain;
    let phase = if s.expired > 0 && s.restarted + s.accepted == 0 {
        Phase::Expired
    } else if bad == 0 && s.expired == 0 {
        Phase::Succeeded
    } else if bad < attempted {
        Phase::PartiallyFailed
    } else {
        Phase::Failed
    };
    let mut message = format!(
        "{} phones: {} restarted, {} accepted without re-registering, {} not registered, {} failed, {} expired",
        s.targets, s.restarted, s.accepted, s.not_registered, s.failed, s.expired
    );
    if s.uncertain > 0 {
        message.push_str(&format!(
            ", {} uncertain (a NOTIFY was under way when the operator stopped and the phone did not register again: it may not have been sent)",
            s.uncertain
        ));
    }
    (phase, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::stored::{
        CHUNK_BYTES, CHUNK_ROWS, SourceRow, StoredWrite, chunk, from_jsonl, to_jsonl,
    };

    fn row(target: &str, outcome: Outcome) -> Row {
        Row {
            target: target.into(),
            outcome,
            writes: vec![],
            actions: vec![],
            changes: vec![],
            notes: vec![],
            phone: None,
            ..Default::default()
        }
    }

    #[test]
    fn failures_come_first_and_status_is_capped() {
        let mut rows: Vec<Row> = (0..150)
            .map(|i| row(&format!("{}", 200 + i), Outcome::Changed))
            .collect();
        rows.push(row("999", Outcome::Failed));
        let (shown, truncated) = for_status(&rows);
        assert_eq!(shown.len(), STATUS_RESULTS);
        assert!(truncated);
        assert_eq!(shown[0].target, "999");
        let (few, cut) = for_status(&rows[..3]);
        assert_eq!(few.len(), 3);
        assert!(!cut);
    }

    #[test]
    fn chunks_stay_under_the_limits() {
        // Rows of about 1 KiB: the byte limit cuts before the row limit.
        let rows: Vec<Row> = (0..9000)
            .map(|i| Row {
                notes: vec!["x".repeat(400)],
                ..row(&format!("{i}"), Outcome::Planned)
            })
            .collect();
        let chunks = chunk(rows);
        assert!(chunks.len() >= 3);
        for c in &chunks {
            assert!(c.len() <= CHUNK_ROWS);
            assert!(to_jsonl(c).len() + to_csv(c).len() <= CHUNK_BYTES);
        }
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 9000);
        let small: Vec<Row> = (0..9000)
            .map(|i| row(&format!("{i}"), Outcome::Planned))
            .collect();
        let sizes: Vec<usize> = chunk(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [CHUNK_ROWS, CHUNK_ROWS, 9000 - 2 * CHUNK_ROWS]);
        assert_eq!(
            chunk(vec![]).len(),
            1,
            "an empty run still has one (empty) results ConfigMap"
        );
    }

    #[test]
    fn a_giving_row_stays_with_the_row_that_takes_its_number() {
        let mut rows: Vec<Row> = (0..CHUNK_ROWS)
            .map(|i| row(&format!("{i}"), Outcome::Planned))
            .collect();
        rows.push(Row {
            gives: vec!["+15550100201".into()],
            ..row("giver", Outcome::Planned)
        });
        rows.push(row("next", Outcome::Planned));
        let chunks = chunk(rows);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].last().unwrap().target, "giver");
        assert_eq!(chunks[1][0].target, "next");
    }

    #[test]
    fn digests_keep_counts_and_a_capped_few_rows() {
        let batch = |n: usize, outcome| -> Vec<Row> {
            (0..n).map(|i| row(&format!("{i}"), outcome)).collect()
        };
        let mut d = Digest::default();
        d.merge(Digest::of(&batch(150, Outcome::Changed)));
        d.merge(Digest::of(&batch(120, Outcome::Failed)));
        assert_eq!(d.rows, 270);
        assert_eq!((d.summary.changed, d.summary.failed), (150, 120));
        assert_eq!(d.shown.len(), 2 * STATUS_RESULTS);
        let (shown, _) = for_status(&d.shown);
        assert_eq!(shown[0].outcome, Outcome::Failed, "failures first");
    }

    #[test]
    fn source_csv_is_the_input_plus_change_ok_and_notes() {
        let header: Vec<String> = ["extension", "callerIdPolicy", "Change OK", "Notes"]
            .map(String::from)
            .to_vec();
        let mut ok = row("201", Outcome::Changed);
        ok.source = Some(SourceRow {
            line: 2,
            cells: ["201", "Anonymous", "old", "old"]
                .map(String::from)
                .to_vec(),
        });
        ok.changes = vec![FieldChange {
            field: "callerIdPolicy".into(),
            from: Some("Default".into()),
            to: Some("Anonymous".into()),
        }];
        let mut bad = row("999", Outcome::Failed);
        bad.source = Some(SourceRow {
            line: 3,
            cells: ["999", "Default", "", ""].map(String::from).to_vec(),
        });
        bad.notes = vec!["extension 999 does not exist on the PBX".into()];
        let giver = Row {
            gives: vec!["+15550100201".into()],
            ..row("205", Outcome::Changed)
        };
        let csv = to_source_csv(&header, &[ok, giver, bad]);
        assert_eq!(
            csv,
            "extension,callerIdPolicy,Change OK,Notes\n\
             201,Anonymous,true,updated: callerIdPolicy (Default -> Anonymous)\n\
             999,Default,false,extension 999 does not exist on the PBX\n",
            "an uploaded result's own columns are replaced, and rows not in the input are left out"
        );
    }

    #[test]
    fn csv_quotes_and_joins() {
        let mut r = row("201", Outcome::Changed);
        r.changes = vec![FieldChange {
            field: "lastName".into(),
            from: Some("O'Brien, Jr.".into()),
            to: None,
        }];
        r.notes = vec!["line one\nline two".into()];
        let a = to_csv(&[r.clone()]);
        let b = to_csv(&[row("202", Outcome::Failed)]);
        let joined = join_csv([a.as_str(), b.as_str()]);
        let mut rd = csv::Reader::from_reader(joined.as_bytes());
        let recs: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(&recs[0][2], "lastName: O'Brien, Jr. -> (unset)");
        assert_eq!(&recs[0][4], "line one\nline two");
        assert_eq!(&recs[1][1], "Failed");
    }

    #[test]
    fn jsonl_round_trip() {
        let mut r = row("201", Outcome::Planned);
        r.writes = vec![StoredWrite {
            field: "voicemailPin".into(),
            from: None,
            to: None,
            secret: true,
        }];
        let back = from_jsonl(&to_jsonl(&[r.clone()])).unwrap();
        assert_eq!(back, [r]);
    }

    #[test]
    fn summaries_count_outcomes() {
        let rows = [
            row("1", Outcome::Changed),
            row("2", Outcome::Conflict),
            row("3", Outcome::Unchanged),
            row("4", Outcome::Failed),
        ];
        let s = summarize(&rows);
        assert_eq!(
            (s.targets, s.changed, s.conflicts, s.unchanged, s.failed),
            (4, 1, 1, 1, 1)
        );
    }
}
