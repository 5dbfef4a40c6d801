//! What the plugin prints, as pure functions of what it read: the plan table and its CSV, the
//! status listing, ages, and the progress bar with its rate and ETA. No Kubernetes here.

use serde::Serialize;

use crate::api::{FieldChange, Outcome, Phase};

/// One target of a plan (or of a run): what changes on it.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRow {
    pub target: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A plan as `kubectl pbx plan` shows it (and as `-o json|yaml` prints it).
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanView {
    /// `bulkuserchange/NAME`.
    pub resource: String,
    pub namespace: String,
    pub phase: Phase,
    pub mode: String,
    /// Copy to spec.approvedPlanHash (what `kubectl pbx approve` does).
    pub hash: String,
    /// The generation the plan was computed for, and the object's generation now.
    pub plan_generation: i64,
    pub generation: i64,
    pub targets: u32,
    pub changes: u32,
    /// Field -> the value every target shares, or None where they differ.
    pub common_values: std::collections::BTreeMap<String, Option<String>>,
    pub closed_fields: Vec<String>,
    pub warnings: Vec<String>,
    pub rows: Vec<PlanRow>,
    /// Targets not listed in `rows` (status shows 100; the ConfigMaps could not be read).
    pub rows_missing: u32,
}

impl PlanView {
    /// The plan describes the spec as it is now.
    pub fn current(&self) -> bool {
        self.plan_generation == self.generation
    }
}

fn outcome_name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Left-aligned columns separated by two spaces, like `kubectl get`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

const UNSET: &str = "(unset)";

/// The plan as people read it: a header of facts, then one line per target and field.
pub fn plan_table(p: &PlanView) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} in {}: {}, mode {}\n",
        p.resource,
        p.namespace,
        phase_name(p.phase),
        p.mode
    ));
    let stale = if p.current() {
        String::new()
    } else {
        format!(
            " (for generation {}; the spec is at {}: wait for the new plan)",
            p.plan_generation, p.generation
        )
    };
    out.push_str(&format!("Plan hash:      {}{stale}\n", p.hash));
    out.push_str(&format!(
        "Targets:        {} ({} would change)\n",
        p.targets, p.changes
    ));
    let closed = if p.closed_fields.is_empty() {
        "none".to_string()
    } else {
        format!("{} (reported, never written)", p.closed_fields.join(", "))
    };
    out.push_str(&format!("Closed fields:  {closed}\n"));
    if p.common_values.is_empty() {
        out.push_str("Common values:  none\n");
    } else {
        let mut first = true;
        for (field, value) in &p.common_values {
            let label = if first {
                "Common values:  "
            } else {
                "                "
            };
            first = false;
            let v = match value {
                Some(v) => format!("{field} = {v}"),
                None => format!("{field} differs between targets"),
            };
            out.push_str(&format!("{label}{v}\n"));
        }
    }
    if p.warnings.is_empty() {
        out.push_str("Warnings:       none\n");
    } else {
        for (i, w) in p.warnings.iter().enumerate() {
            let label = if i == 0 {
                "Warnings:       "
            } else {
                "                "
            };
            out.push_str(&format!("{label}{w}\n"));
        }
    }
    out.push('\n');
    let mut rows = Vec::new();
    for r in &p.rows {
        let extra = |r: &PlanRow| {
            let mut e = Vec::new();
            if !r.actions.is_empty() {
                e.push(format!("actions: {}", r.actions.join(" ")));
            }
            e.extend(r.notes.iter().cloned());
            e.join("; ")
        };
        if r.changes.is_empty() {
            rows.push(vec![
                r.target.clone(),
                outcome_name(r.outcome),
                "-".into(),
                String::new(),
                String::new(),
                extra(r),
            ]);
        }
        for (i, c) in r.changes.iter().enumerate() {
            rows.push(vec![
                if i == 0 {
                    r.target.clone()
                } else {
                    String::new()
                },
                if i == 0 {
                    outcome_name(r.outcome)
                } else {
                    String::new()
                },
                c.field.clone(),
                c.from.clone().unwrap_or_else(|| UNSET.into()),
                c.to.clone().unwrap_or_else(|| UNSET.into()),
                if i == 0 { extra(r) } else { String::new() },
            ]);
        }
    }
    out.push_str(&table(
        &["TARGET", "OUTCOME", "FIELD", "FROM", "TO", "NOTES"],
        &rows,
    ));
    if p.rows_missing > 0 {
        out.push_str(&format!(
            "... and {} more targets (see `kubectl pbx results {}`)\n",
            p.rows_missing, p.resource
        ));
    }
    out
}

/// One line per target and field: target,outcome,field,from,to,actions,notes.
pub fn plan_csv(p: &PlanView) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let ok = "writing to memory";
    w.write_record([
        "target", "outcome", "field", "from", "to", "actions", "notes",
    ])
    .expect(ok);
    for r in &p.rows {
        let (actions, notes) = (r.actions.join(" "), r.notes.join("; "));
        let outcome = outcome_name(r.outcome);
        if r.changes.is_empty() {
            w.write_record([r.target.as_str(), &outcome, "", "", "", &actions, &notes])
                .expect(ok);
        }
        for c in &r.changes {
            w.write_record([
                r.target.as_str(),
                &outcome,
                &c.field,
                c.from.as_deref().unwrap_or(""),
                c.to.as_deref().unwrap_or(""),
                &actions,
                &notes,
            ])
            .expect(ok);
        }
    }
    String::from_utf8(w.into_inner().expect(ok)).expect("UTF-8 in, UTF-8 out")
}

/// An age like kubectl's: 45s, 3m12s, 5h3m, 2d4h.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A duration for ETAs: 7s, 2m05s, 1h02m.
pub fn short_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Whether an operation in this phase has finished its run.
pub fn finished(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed | Phase::Expired
    )
}

/// Targets done of a summary (any kind's): every counted outcome except `targets` and
/// `inFlight`, capped at the total.
pub fn targets_done(summary: &serde_json::Value) -> (u64, u64) {
    let total = summary["targets"].as_u64().unwrap_or(0);
    let done: u64 = summary
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "targets" | "inFlight"))
                .filter_map(|(_, v)| v.as_u64())
                .sum()
        })
        .unwrap_or(0);
    (done.min(total), total)
}

/// Targets done and total of an operation in `phase`: nothing is done before it runs (a
/// Validated summary counts what would change); the plan's count until a summary has one.
pub fn progress(
    phase: Phase,
    summary: Option<&serde_json::Value>,
    plan_targets: u64,
) -> (u64, u64) {
    let (done, total) = summary.map(targets_done).unwrap_or((0, 0));
    let total = if total == 0 { plan_targets } else { total };
    match phase {
        Phase::Pending | Phase::Validated | Phase::Scheduled => (0, total),
        _ => (done.min(total), total),
    }
}

/// Percent done of an operation: 100 when finished, done/total while running, 0 before.
pub fn percent(phase: Phase, done: u64, total: u64) -> u64 {
    if finished(phase) {
        return 100;
    }
    if total == 0 {
        return 0;
    }
    (done * 100 / total).min(100)
}

/// One operation in `kubectl pbx status`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusLine {
    /// `buc/NAME`.
    pub resource: String,
    pub phase: Phase,
    pub done: u64,
    pub targets: u64,
    pub percent: u64,
    pub age_seconds: i64,
    /// The Stalled condition's reason, if it is stalled.
    pub stalled: Option<String>,
}

pub fn status_table(lines: &[StatusLine]) -> String {
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|l| {
            vec![
                l.resource.clone(),
                phase_name(l.phase),
                format!("{}%", l.percent),
                format!("{}/{}", l.done, l.targets),
                age(l.age_seconds),
                l.stalled
                    .as_deref()
                    .map(|r| format!("Stalled: {r}"))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["OPERATION", "PHASE", "PROGRESS", "TARGETS", "AGE", "NOTE"],
        &rows,
    )
}

/// The status listing as CSV: operation,phase,percent,done,targets,ageSeconds,stalled.
pub fn status_csv(lines: &[StatusLine]) -> String {
    let ok = "writing to memory";
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "operation",
        "phase",
        "percent",
        "done",
        "targets",
        "ageSeconds",
        "stalled",
    ])
    .expect(ok);
    for l in lines {
        w.write_record([
            l.resource.clone(),
            phase_name(l.phase),
            l.percent.to_string(),
            l.done.to_string(),
            l.targets.to_string(),
            l.age_seconds.to_string(),
            l.stalled.clone().unwrap_or_default(),
        ])
        .expect(ok);
    }
    String::from_utf8(w.into_inner().expect(ok)).expect("UTF-8 in, UTF-8 out")
}

/// Rate and ETA from how many targets are done after how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Targets per second (None before anything is done or time has passed).
    pub per_second: Option<f64>,
    /// Seconds left at that rate (None without a rate; 0 when done).
    pub eta_seconds: Option<f64>,
}

pub fn rate(done: u64, total: u64, elapsed_seconds: f64) -> Rate {
    if done >= total && total > 0 {
        let per_second = (elapsed_seconds > 0.0).then(|| done as f64 / elapsed_seconds);
        return Rate {
            per_second,
            eta_seconds: Some(0.0),
        };
    }
    if done == 0 || elapsed_seconds <= 0.0 {
        return Rate {
            per_second: None,
            eta_seconds: None,
        };
    }
    let per_second = done as f64 / elapsed_seconds;
    Rate {
        per_second: Some(per_second),
        eta_seconds: Some((total - done) as f64 / per_second),
    }
}

/// `[##########----------]  12/40  30%  2.5/s  ETA 11s  Running`.
pub fn progress_bar(
    phase: Phase,
    done: u64,
    total: u64,
    elapsed_seconds: f64,
    width: usize,
) -> String {
    let pct = percent(phase, done, total);
    let filled = if total == 0 {
        if finished(phase) { width } else { 0 }
    } else {
        ((done as usize * width) / total as usize).min(width)
    };
    let r = rate(done, total, elapsed_seconds);
    let rate = r
        .per_second
        .map(|v| format!("{v:.1}/s"))
        .unwrap_or_else(|| "-/s".into());
    let eta = if finished(phase) {
        format!("took {}", short_duration(elapsed_seconds))
    } else {
        r.eta_seconds
            .map(|s| format!("ETA {}", short_duration(s)))
            .unwrap_or_else(|| "ETA -".into())
    };
    format!(
        "[{}{}] {done}/{total} {pct}% {rate} {eta} {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        phase_name(phase)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(field: &str, from: Option<&str>, to: Option<&str>) -> FieldChange {
        FieldChange {
            field: field.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
        }
    }

    fn view() -> PlanView {
        PlanView {
            resource: "bulkuserchange/call-group".into(),
            namespace: "acme".into(),
            phase: Phase::Validated,
            mode: "Validate".into(),
            hash: "ab".repeat(32),
            plan_generation: 1,
            generation: 1,
            targets: 2,
            changes: 2,
            common_values: [
                ("callGroup".to_string(), None),
                ("role".to_string(), Some("agent".to_string())),
            ]
            .into(),
            closed_fields: vec!["pickupGroup".into()],
            warnings: vec![],
            rows: vec![
                PlanRow {
                    target: "201".into(),
                    outcome: Outcome::Planned,
                    changes: vec![
                        change("callGroup", Some("1"), Some("3")),
                        change("email", None, Some("a@acme.test")),
                    ],
                    actions: vec!["Unlock".into()],
                    notes: vec![],
                },
                PlanRow {
                    target: "202".into(),
                    outcome: Outcome::Unchanged,
                    changes: vec![],
                    actions: vec![],
                    notes: vec!["already as asked".into()],
                },
            ],
            rows_missing: 0,
        }
    }

    #[test]
    fn plan_table_shows_targets_fields_closed_common_and_warnings() {
        let t = plan_table(&view());
        let expected = format!(
            "bulkuserchange/call-group in acme: Validated, mode Validate
Plan hash:      {}
Targets:        2 (2 would change)
Closed fields:  pickupGroup (reported, never written)
Common values:  callGroup differs between targets
                role = agent
Warnings:       none

TARGET  OUTCOME    FIELD      FROM     TO           NOTES
201     Planned    callGroup  1        3            actions: Unlock
                   email      (unset)  a@acme.test
202     Unchanged  -                                already as asked
",
            "ab".repeat(32)
        );
        assert_eq!(t, expected);
    }

    #[test]
    fn plan_table_says_when_the_plan_is_for_an_older_spec() {
        let mut v = view();
        v.generation = 2;
        v.warnings = vec!["201 has no email".into(), "second".into()];
        v.rows_missing = 5;
        let t = plan_table(&v);
        assert!(
            t.contains("(for generation 1; the spec is at 2: wait for the new plan)"),
            "{t}"
        );
        assert!(
            t.contains("Warnings:       201 has no email\n                second\n"),
            "{t}"
        );
        assert!(
            t.ends_with(
                "... and 5 more targets (see `kubectl pbx results bulkuserchange/call-group`)\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn plan_csv_has_one_line_per_target_and_field() {
        assert_eq!(
            plan_csv(&view()),
            "target,outcome,field,from,to,actions,notes\n\
             201,Planned,callGroup,1,3,Unlock,\n\
             201,Planned,email,,a@acme.test,Unlock,\n\
             202,Unchanged,,,,,already as asked\n"
        );
    }

    #[test]
    fn plan_json_names_fields_in_camel_case() {
        let v = serde_json::to_value(view()).unwrap();
        assert_eq!(v["closedFields"][0], "pickupGroup");
        assert_eq!(v["commonValues"]["callGroup"], serde_json::Value::Null);
        assert_eq!(v["rows"][0]["changes"][1]["to"], "a@acme.test");
    }

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(age(-3), "0s");
        assert_eq!(age(45), "45s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(5 * 3600 + 180), "5h3m");
        assert_eq!(age(2 * 86400 + 4 * 3600 + 59), "2d4h");
    }

    #[test]
    fn done_counts_every_outcome_but_targets_and_in_flight() {
        let users = serde_json::json!({"targets": 10, "changed": 3, "unchanged": 1, "failed": 1, "conflicts": 1});
        assert_eq!(targets_done(&users), (6, 10));
        let phones = serde_json::json!({"targets": 4, "restarted": 1, "accepted": 1, "notRegistered": 1, "inFlight": 1});
        assert_eq!(targets_done(&phones), (3, 4));
        assert_eq!(targets_done(&serde_json::Value::Null), (0, 0));
        let over = serde_json::json!({"targets": 2, "changed": 5});
        assert_eq!(targets_done(&over), (2, 2));
    }

    #[test]
    fn nothing_is_done_before_a_run() {
        let s = serde_json::json!({"targets": 2, "changed": 2});
        assert_eq!(progress(Phase::Validated, Some(&s), 2), (0, 2));
        assert_eq!(progress(Phase::Running, Some(&s), 2), (2, 2));
        assert_eq!(progress(Phase::Pending, None, 7), (0, 7));
        assert_eq!(progress(Phase::Running, None, 7), (0, 7));
    }

    #[test]
    fn percent_is_whole_when_finished_and_zero_before() {
        assert_eq!(percent(Phase::Running, 1, 3), 33);
        assert_eq!(percent(Phase::Running, 0, 0), 0);
        assert_eq!(percent(Phase::Validated, 0, 5), 0);
        assert_eq!(percent(Phase::Failed, 1, 5), 100);
        assert_eq!(percent(Phase::Succeeded, 0, 0), 100);
    }

    #[test]
    fn rate_and_eta() {
        let r = rate(10, 40, 4.0);
        assert_eq!(r.per_second, Some(2.5));
        assert_eq!(r.eta_seconds, Some(12.0));
        assert_eq!(
            rate(0, 40, 4.0),
            Rate {
                per_second: None,
                eta_seconds: None
            }
        );
        assert_eq!(rate(5, 40, 0.0).eta_seconds, None);
        assert_eq!(
            rate(40, 40, 8.0),
            Rate {
                per_second: Some(5.0),
                eta_seconds: Some(0.0)
            }
        );
        assert_eq!(short_duration(12.0), "12s");
        assert_eq!(short_duration(125.4), "2m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
    }

    #[test]
    fn progress_bar_shows_done_total_rate_and_eta() {
        assert_eq!(
            progress_bar(Phase::Running, 10, 40, 4.0, 20),
            "[#####---------------] 10/40 25% 2.5/s ETA 12s Running"
        );
        assert_eq!(
            progress_bar(Phase::Running, 0, 40, 1.0, 10),
            "[----------] 0/40 0% -/s ETA - Running"
        );
        assert_eq!(
            progress_bar(Phase::PartiallyFailed, 40, 40, 20.0, 10),
            "[##########] 40/40 100% 2.0/s took 20s PartiallyFailed"
        );
        assert_eq!(
            progress_bar(Phase::Succeeded, 0, 0, 2.0, 4),
            "[####] 0/0 100% -/s took 2s Succeeded"
        );
    }

    #[test]
    fn status_table_lists_phase_progress_and_age() {
        let lines = vec![
            StatusLine {
                resource: "buc/a".into(),
                phase: Phase::Running,
                done: 5,
                targets: 20,
                percent: 25,
                age_seconds: 70,
                stalled: None,
            },
            StatusLine {
                resource: "prs/nightly-20261203-0200".into(),
                phase: Phase::Failed,
                done: 0,
                targets: 0,
                percent: 100,
                age_seconds: 4000,
                stalled: Some("SecretNotUsable".into()),
            },
        ];
        assert_eq!(
            status_csv(&lines[1..]),
            "operation,phase,percent,done,targets,ageSeconds,stalled\nprs/nightly-20261203-0200,Failed,100,0,0,4000,SecretNotUsable\n"
        );
        assert_eq!(
            status_table(&lines),
            "OPERATION                  PHASE    PROGRESS  TARGETS  AGE   NOTE
buc/a                      Running  25%       5/20     70s
prs/nightly-20261203-0200  Failed   100%      0/0      1h6m  Stalled: SecretNotUsable
"
        );
    }
}
