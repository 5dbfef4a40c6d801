//! Errors classed at the backend boundary, end to end: a database that refuses one target's data
//! (here a trigger raising an exception) fails that target with the database's message, and an
//! Atomic change then ends Failed and Stalled with nothing written, instead of waiting forever
//! for a PBX that will refuse the same write again. The real control plane, operator and
//! Kamailio lab, on PostgreSQL and on SQLite.

mod support;

use std::time::Duration;

use pbx_operator::api::{BulkUserChange, Outcome, Phase};
use sqlx::AssertSqlSafe;
use support::lab::LabSpec;
use support::pbx::Env;

const FROZEN: &str = "extension 205 is frozen by policy";
const EXTENSIONS: [&str; 10] = [
    "200", "201", "202", "203", "204", "205", "206", "207", "208", "209",
];
/// Bounded: on a build that retries a refusal forever the change never finishes.
const FINISH_WITHIN: Duration = Duration::from_secs(60);

/// A trigger that refuses any call group written for extension 205. On SQLite, `raise` is the
/// RAISE action: ABORT ends the statement, ROLLBACK the whole transaction.
async fn freeze_205(env: &Env, db: &str, raise: &str) {
    let sqlite = format!(
        "CREATE TRIGGER pbx_test_frozen BEFORE INSERT ON usr_preferences WHEN NEW.username = '205' AND NEW.attribute = 'pbx.call_group' BEGIN SELECT RAISE({raise}, 'extension 205 is frozen by policy'); END"
    );
    let statements: &[&str] = match db {
        "postgres" => &[
            "CREATE FUNCTION pbx_test_frozen() RETURNS trigger AS $$ BEGIN IF NEW.username = '205' AND NEW.attribute = 'pbx.call_group' THEN RAISE EXCEPTION 'extension 205 is frozen by policy'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER pbx_test_frozen BEFORE INSERT OR UPDATE ON usr_preferences FOR EACH ROW EXECUTE FUNCTION pbx_test_frozen()",
        ],
        _ => &[sqlite.as_str()],
    };
    for q in statements {
        sqlx::query(AssertSqlSafe(q.to_string()))
            .execute(&env.pool)
            .await
            .unwrap();
    }
}

async fn call_groups(env: &Env) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for ext in EXTENSIONS {
        out.push(env.attribute(ext, "pbx.call_group").await);
    }
    out
}

fn change(name: &str, policy: &str, group: &str) -> String {
    format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: {extensions:?} }}
  failurePolicy: {policy}
  fields:
    callGroup: {{ value: "{group}", lock: Open }}
"#,
        extensions = EXTENSIONS,
    )
}

fn condition(b: &BulkUserChange, type_: &str) -> Option<(String, String)> {
    b.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone()))
}

async fn refused_by_a_trigger(db: &'static str, raise: &str) {
    let env = Env::start(
        &format!("refused-{db}{}", raise.to_lowercase()),
        LabSpec {
            db,
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    freeze_205(&env, db, raise).await;
    let before = call_groups(&env).await;
    assert!(before.iter().all(|g| g.as_deref() != Some("7")));

    // Atomic: the refusal fails the whole change, names 205, writes nothing.
    env.apply(&change("frozen-atomic", "Atomic", "7"));
    let b = env
        .wait_buc_for(
            "frozen-atomic",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
            FINISH_WITHIN,
        )
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Failed, "{:?}", status.results);
    assert_eq!(
        condition(&b, "Stalled").map(|c| c.0).as_deref(),
        Some("True"),
        "{:?}",
        status.conditions
    );
    assert_ne!(
        condition(&b, "Reconciling").map(|c| c.0).as_deref(),
        Some("True"),
        "a refusal is not waited for"
    );
    let r205 = status.results.iter().find(|r| r.target == "205").unwrap();
    assert_eq!(r205.outcome, Outcome::Failed);
    assert!(
        r205.notes.iter().any(|n| n.contains(FROZEN)),
        "the database's message names why: {:?}",
        r205.notes
    );
    for r in status.results.iter().filter(|r| r.target != "205") {
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert!(r.notes.iter().any(|n| n.contains("rolled back")), "{r:?}");
        assert!(!r.notes.iter().any(|n| n.contains(FROZEN)), "{r:?}");
    }
    assert_eq!(status.results.len(), EXTENSIONS.len());
    assert_eq!(call_groups(&env).await, before, "nothing was written");
    let shown = format!("{status:?}{}", env.events());
    assert!(
        !shown.contains(env.lab.db_url()),
        "no database URL (credentials) in status or events"
    );

    // Continue: 205 fails with the message, everyone else changes.
    env.apply(&change("frozen-continue", "Continue", "8"));
    let b = env
        .wait_buc_for(
            "frozen-continue",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
            FINISH_WITHIN,
        )
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::PartiallyFailed, "{:?}", status.results);
    for r in &status.results {
        if r.target == "205" {
            assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
            assert!(r.notes.iter().any(|n| n.contains(FROZEN)), "{r:?}");
        } else {
            assert_eq!(r.outcome, Outcome::Changed, "{r:?}");
        }
    }
    let after = call_groups(&env).await;
    for (ext, (b, a)) in EXTENSIONS.iter().zip(before.iter().zip(&after)) {
        if *ext == "205" {
            assert_eq!(a, b, "205 is left as it was");
        } else {
            assert_eq!(a.as_deref(), Some("8"), "{ext}");
        }
    }
}

#[tokio::test]
async fn atomic_change_refused_by_a_trigger_fails_on_postgres() {
    refused_by_a_trigger("postgres", "").await;
}

#[tokio::test]
async fn atomic_change_refused_by_a_trigger_fails_on_sqlite() {
    refused_by_a_trigger("sqlite", "ABORT").await;
}

/// RAISE(ROLLBACK) ends the transaction itself: the refusal is still named, nothing written.
#[tokio::test]
async fn atomic_change_refused_by_a_rolling_back_trigger_fails_on_sqlite() {
    refused_by_a_trigger("sqlite", "ROLLBACK").await;
}
