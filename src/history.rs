//! `pbx-operator history`: the run ledger kept in the PBX database, as CSV or a table. It is the
//! audit trail that stays with the PBX when clusters come and go.

use std::io::Write;

use clap::{Args, ValueEnum};
use jiff::Timestamp;

use crate::cli::CliError;
use crate::pbx::{LedgerEntry, LedgerFilter};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Csv,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("pbx").required(true).args(["connection", "database_url"])))]
pub struct HistoryArgs {
    /// The PbxConnection whose PBX keeps the ledger, as `<namespace>/<name>` (uses the kubeconfig).
    #[arg(long)]
    pub connection: Option<String>,
    /// Read the database directly instead, without Kubernetes (with --domain).
    #[arg(long, env = "PBX_DATABASE_URL", requires = "domain")]
    pub database_url: Option<String>,
    /// The tenant's SIP domain, with --database-url.
    #[arg(long)]
    pub domain: Option<String>,
    /// Only runs of operations with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only runs of operations in this namespace (default: every namespace).
    #[arg(long = "in-namespace")]
    pub in_namespace: Option<String>,
    /// Only runs started at or after this: a time (2026-12-01T00:00:00Z) or an age (24h, 30m).
    #[arg(long, value_parser = parse_when)]
    pub since: Option<Timestamp>,
    /// Only runs started before this: a time or an age, as --since.
    #[arg(long, value_parser = parse_when)]
    pub until: Option<Timestamp>,
    /// Only runs requested by this person (spec.requestedBy).
    #[arg(long)]
    pub requester: Option<String>,
    /// table (for people) or csv.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// A time in RFC 3339, or an age before now (`24h`, `90m`).
pub fn parse_when(s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let age = crate::api::parse_duration(s).ok_or_else(|| {
        format!("{s:?} is neither a time like 2026-12-01T00:00:00Z nor an age like 24h")
    })?;
    let age = jiff::SignedDuration::try_from(age).map_err(|e| e.to_string())?;
    Timestamp::now()
        .checked_sub(age)
        .map_err(|e| format!("{s:?}: {e}"))
}

const HEADER: [&str; 15] = [
    "id",
    "kind",
    "namespace",
    "name",
    "requestedBy",
    "started",
    "finished",
    "phase",
    "targets",
    "changed",
    "failed",
    "uncertain",
    "specHash",
    "planHash",
    "uid",
];

fn time(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// One entry as the columns of [`HEADER`].
pub fn record(e: &LedgerEntry) -> Vec<String> {
    vec![
        e.id.clone(),
        e.kind.clone(),
        e.namespace.clone(),
        e.name.clone(),
        e.requested_by.clone().unwrap_or_default(),
        time(e.started),
        e.finished.map(time).unwrap_or_default(),
        e.phase.clone().unwrap_or_else(|| {
            if e.finished.is_none() {
                "Unfinished".into()
            } else {
                String::new()
            }
        }),
        e.counts.targets.to_string(),
        e.counts.changed.to_string(),
        e.counts.failed.to_string(),
        e.counts.uncertain.to_string(),
        e.spec_hash.clone(),
        e.plan_hash.clone(),
        e.uid.clone(),
    ]
}

/// The entries as a table: the columns people read (the hashes and uid are in the CSV).
pub fn table(entries: &[LedgerEntry]) -> String {
    let keep = 12;
    let rows: Vec<Vec<String>> = std::iter::once(
        HEADER[..keep]
            .iter()
            .map(|h| h.to_uppercase())
            .collect::<Vec<_>>(),
    )
    .chain(entries.iter().map(|e| record(e)[..keep].to_vec()))
    .collect();
    let widths: Vec<usize> = (0..keep)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn csv(entries: &[LedgerEntry]) -> Result<String, CliError> {
    let io = |e: csv::Error| CliError::Usage(format!("cannot write the CSV: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(HEADER).map_err(io)?;
    for e in entries {
        w.write_record(record(e)).map_err(io)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| CliError::Usage(format!("cannot write the CSV: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Prints the ledger of the PBX behind `--connection` (or `--database-url`).
pub async fn print_history(args: &HistoryArgs) -> Result<(), CliError> {
    let (url, domain) = match (&args.connection, &args.database_url, &args.domain) {
        (Some(conn), _, _) => crate::cli::connection_database(conn).await?,
        (None, Some(url), Some(domain)) => (url.clone(), domain.clone()),
        _ => {
            return Err(CliError::Usage(
                "say which PBX: --connection <namespace>/<name>, or --database-url with --domain"
                    .into(),
            ));
        }
    };
    let pbx = |e| CliError::Controller(crate::controllers::Error::Pbx(e));
    let db = crate::pbx::kamailio::db::Db::connect(&url, &domain, 2)
        .await
        .map_err(pbx)?;
    db.migrate().await.map_err(pbx)?;
    let filter = LedgerFilter {
        namespace: args.in_namespace.clone(),
        name: args.name.clone(),
        requested_by: args.requester.clone(),
        since: args.since.map(|t| t.as_millisecond()),
        until: args.until.map(|t| t.as_millisecond()),
    };
    let entries = db.ledger_list(&filter).await.map_err(pbx)?;
    let text = match args.output {
        Output::Table => table(&entries),
        Output::Csv => csv(&entries)?,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| CliError::Usage(format!("cannot write the history: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pbx::LedgerCounts;

    fn entry() -> LedgerEntry {
        LedgerEntry {
            id: "0a1b2c3d4e5f6071".into(),
            kind: "UserRecycle".into(),
            namespace: "acme".into(),
            name: "leavers, q4".into(),
            uid: "u-1".into(),
            spec_hash: "s".repeat(64),
            plan_hash: "p".repeat(64),
            requested_by: Some("alice".into()),
            started: 1_764_777_600_000,
            finished: Some(1_764_777_660_000),
            phase: Some("Succeeded".into()),
            counts: LedgerCounts {
                targets: 3,
                changed: 3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn csv_quotes_and_keeps_every_column() {
        let text = csv(&[entry()]).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap().split(',').count(), HEADER.len());
        let row = lines.next().unwrap();
        assert!(row.contains("\"leavers, q4\""), "{row}");
        assert!(
            row.contains("2025-12-03T16:00:00Z,2025-12-03T16:01:00Z,Succeeded,3,3,0,0"),
            "{row}"
        );
    }

    #[test]
    fn the_table_aligns_and_says_unfinished() {
        let mut open = entry();
        open.finished = None;
        open.phase = None;
        let text = table(&[entry(), open]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  ") && lines[0].contains("REQUESTEDBY"));
        assert!(lines[2].contains("Unfinished"), "{text}");
        let col = lines[0].find("KIND").unwrap();
        assert_eq!(&lines[1][col..col + 11], "UserRecycle");
    }

    #[test]
    fn since_takes_a_time_or_an_age() {
        assert_eq!(
            parse_when("2026-12-01T00:00:00Z").unwrap(),
            "2026-12-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        let day = parse_when("24h").unwrap();
        let ago = Timestamp::now().as_second() - day.as_second();
        assert!((86_399..=86_401).contains(&ago), "{ago}");
        assert!(parse_when("yesterday").is_err());
    }
}
