//! CSV bulk user changes end to end: export, upload as a ConfigMap, validate, execute, the result
//! CSV with `Change OK` and `Notes`, number moves, every row error, whole-file refusals, retry.
//! Real control plane, real operator process, real Kamailio on SQLite.
//!
//! The lab's users (tests/lab): extension 200 + i; a primary number +1555010<ext> unless
//! i % 5 == 4 (204, 209 have none); a private number +1555020<ext> when i % 4 == 3 (203, 207).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pbx_operator::api::{BulkUserChange, Outcome, Phase};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

const HEADER: &str = "extension,enterpriseVoice,primaryNumber,primaryNumberLocation,privateNumber,privateNumberLocation,callerIdPolicy,voiceRoutePolicy";

async fn config_map(env: &Env, name: &str, text: Option<&str>, binary: Option<Vec<u8>>) {
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: text.map(|t| BTreeMap::from([("changes.csv".to_string(), t.to_string())])),
        binary_data: binary.map(|b| BTreeMap::from([("changes.csv".to_string(), ByteString(b))])),
        ..Default::default()
    };
    let _ = api.delete(name, &Default::default()).await;
    api.create(&PostParams::default(), &cm).await.unwrap();
}

fn change(env: &Env, name: &str, config_map: &str, mode: &str, extra: &str) {
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  source: {{ csv: {{ configMapKeyRef: {{ name: {config_map}, key: changes.csv }} }} }}
  mode: {mode}
{extra}"#
    ));
}

/// The result CSV through `pbx-operator results`, parsed: header and records.
fn result_csv(env: &Env, name: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let (ok, out, err) = env.cli(&["results", &format!("bulkuserchange/{name}"), "-n", &env.ns]);
    assert!(ok, "{err}");
    let mut r = csv::Reader::from_reader(out.as_bytes());
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|x| x.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

async fn primary_number(env: &Env, ext: &str) -> Option<String> {
    let q = format!(
        "SELECT alias_username FROM dbaliases WHERE username = '{ext}' ORDER BY id LIMIT 1"
    );
    let n = env
        .sql_one(&format!(
            "SELECT COUNT(*) FROM dbaliases WHERE username = '{ext}'"
        ))
        .await;
    if n == "0" {
        None
    } else {
        Some(env.sql_one(&q).await)
    }
}

fn lab() -> LabSpec {
    LabSpec {
        users: 12,
        phones: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn export_round_trip_validate_execute_and_retry() {
    let env = Env::start("csv-flow", lab(), false).await;

    // An empty template: the header alone.
    let (ok, template, err) = env.cli(&["export", "users", "--template"]);
    assert!(ok, "{err}");
    assert_eq!(template, format!("{HEADER}\n"));

    // Every user, through the PbxConnection.
    let (ok, export, err) = env.cli(&[
        "export",
        "users",
        "--connection",
        &format!("{}/acme", env.ns),
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines[0], HEADER);
    assert_eq!(lines.len(), 13, "{export}");
    assert_eq!(
        lines[2], "201,true,+15550100201,London,,,Default,Domestic",
        "{export}"
    );
    assert_eq!(
        lines[4],
        "203,true,+15550100203,Berlin,+15550200203,London,Default,International"
    );
    assert_eq!(lines[5], "204,false,,,,,Default,Domestic");

    // The same without Kubernetes, from the database URL.
    let (ok, direct, err) = env.cli(&[
        "export",
        "users",
        "--database-url",
        env.lab.db_url(),
        "--domain",
        env.lab.domain(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(direct, export);

    // Round trip: importing the export unchanged plans zero changes and no errors.
    config_map(&env, "roundtrip", Some(&export), None).await;
    change(&env, "roundtrip", "roundtrip", "Validate", "");
    let b = env
        .wait_buc("roundtrip", &[Phase::Validated, Phase::Failed])
        .await;
    let plan = b.status.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(b.status.as_ref().unwrap().phase, Phase::Validated);
    assert_eq!(plan.changes, 0, "{:?}", b.status.as_ref().unwrap().results);
    let csv = plan.csv.unwrap();
    assert_eq!((csv.rows, csv.invalid), (12, 0));
    let (header, rows) = result_csv(&env, "roundtrip");
    let mut expected: Vec<String> = HEADER.split(',').map(String::from).collect();
    expected.extend(["Change OK".to_string(), "Notes".to_string()]);
    assert_eq!(header, expected);
    assert_eq!(rows.len(), 12);
    for (row, line) in rows.iter().zip(&lines[1..]) {
        assert_eq!(row[..8].join(","), *line, "the input row, unchanged");
        assert_eq!(row[8], "true");
        assert_eq!(row[9], "no change: the user already has these values");
    }

    // The seed's flow: edit, upload, validate (nothing changes), then execute the validation.
    let edited = format!(
        "{HEADER}\n\
         201,,,,,,Anonymous,International\n\
         204,true,+15550100994,\"Berlin, Building 2\",,,,\n\
         202,,,,,,Reception,\n"
    );
    config_map(&env, "seed", Some(&edited), None).await;
    change(&env, "seed", "seed", "Validate", "");
    let b = env.wait_buc("seed", &[Phase::Validated]).await;
    assert_eq!(b.status.as_ref().unwrap().plan.as_ref().unwrap().changes, 3);
    assert_eq!(
        env.attribute("201", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Default"),
        "Validate touches nothing"
    );
    let (_, rows) = result_csv(&env, "seed");
    assert_eq!(rows[0][8], "true");
    assert_eq!(
        rows[0][9],
        "would update: callerIdPolicy (Default -> Anonymous), voiceRoutePolicy (Domestic -> International)"
    );
    // The CSV is edited after validation: Execute still runs the validated rows.
    config_map(
        &env,
        "seed",
        Some(&format!("{HEADER}\n201,,,,,,Default,Domestic\n")),
        None,
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "seed",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": { "mode": "Execute" } })),
    )
    .await
    .unwrap();
    let b = env
        .wait_buc(
            "seed",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    assert_eq!(
        b.status.as_ref().unwrap().phase,
        Phase::Succeeded,
        "{:?}",
        b.status
    );
    for (ext, attribute, value) in [
        ("201", "pbx.caller_id_policy", "Anonymous"),
        ("201", "pbx.voice_route_policy", "International"),
        ("204", "pbx.enterprise_voice", "true"),
        ("204", "pbx.primary_number_location", "Berlin, Building 2"),
        ("202", "pbx.caller_id_policy", "Reception"),
    ] {
        assert_eq!(
            env.attribute(ext, attribute).await.as_deref(),
            Some(value),
            "{ext} {attribute}"
        );
    }
    assert_eq!(
        primary_number(&env, "204").await.as_deref(),
        Some("+15550100994")
    );
    let (_, rows) = result_csv(&env, "seed");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][0], "201", "the validated rows, in the input order");
    assert_eq!(rows[1][0], "204");
    assert!(rows.iter().all(|r| r[8] == "true"), "{rows:?}");
    assert!(
        rows[1][9].starts_with(
            "updated: enterpriseVoice (false -> true), primaryNumber (unset -> +15550100994)"
        ),
        "{}",
        rows[1][9]
    );

    // Retry: a row fails on a policy the PBX does not know yet; once it exists, the retry
    // annotation re-runs that row only.
    config_map(
        &env,
        "retry",
        Some(&format!(
            "{HEADER}\n205,,,,,,Anonymous,\n206,,,,,,Operators,\n"
        )),
        None,
    )
    .await;
    change(&env, "retry", "retry", "Execute", "");
    let b = env
        .wait_buc(
            "retry",
            &[Phase::PartiallyFailed, Phase::Failed, Phase::Succeeded],
        )
        .await;
    assert_eq!(b.status.as_ref().unwrap().phase, Phase::PartiallyFailed);
    let (_, rows) = result_csv(&env, "retry");
    assert_eq!(
        (rows[0][8].as_str(), rows[1][8].as_str()),
        ("true", "false")
    );
    assert!(
        rows[1][9]
            .starts_with("unknown callerIdPolicy; the PBX knows: Anonymous, Default, Reception"),
        "{}",
        rows[1][9]
    );
    env.sql_one(&format!(
        "INSERT INTO pbx_policy (kind, name, domain) VALUES ('callerId', 'Operators', '{}') RETURNING name",
        env.lab.domain()
    ))
    .await;
    api.patch(
        "retry",
        &PatchParams::default(),
        &Patch::Merge(
            &serde_json::json!({ "metadata": { "annotations": { "pbx-operator.io/retry": "1" } } }),
        ),
    )
    .await
    .unwrap();
    let b = eventually(Duration::from_secs(60), "the retry to succeed", || async {
        let b = api.get("retry").await.ok()?;
        (b.status.as_ref()?.phase == Phase::Succeeded).then_some(b)
    })
    .await;
    let s = b.status.unwrap().summary.unwrap();
    assert_eq!((s.targets, s.changed, s.failed), (2, 2, 0));
    assert_eq!(
        env.attribute("206", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Operators")
    );
    let (_, rows) = result_csv(&env, "retry");
    assert_eq!(
        rows[0][9], "updated: callerIdPolicy (Default -> Anonymous)",
        "kept from the first run"
    );
    assert_eq!(rows[1][9], "updated: callerIdPolicy (Default -> Operators)");
    let list = support::kubectl(
        &support::control_plane().admin_kubeconfig,
        &["get", "buc", "-n", &env.ns],
    );
    assert!(
        list.contains("retry") && list.contains("Succeeded") && list.contains("Validated"),
        "the jobs: {list}"
    );
}

#[tokio::test]
async fn numbers_move_with_warnings_on_both_sides() {
    let env = Env::start("csv-move", lab(), false).await;
    // BOM, CRLF, a quoted field with a comma: as a spreadsheet saves it.
    let text = "\u{feff}extension,primaryNumber,primaryNumberLocation,callerIdPolicy\r\n\
                204,+15550100201,\"Berlin, 3rd floor\",\r\n\
                205,+15550100206,,\r\n\
                206,,,Reception\r\n\
                207,+15550200203,,\r\n";
    config_map(&env, "moves", Some(text), None).await;
    change(&env, "moves", "moves", "Execute", "");
    let b = env
        .wait_buc(
            "moves",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);

    // 201's number is now 204's, and 201 holds nothing; 206's is 205's; 203's private one is 207's.
    assert_eq!(
        primary_number(&env, "204").await.as_deref(),
        Some("+15550100201")
    );
    assert_eq!(primary_number(&env, "201").await, None);
    assert_eq!(
        primary_number(&env, "205").await.as_deref(),
        Some("+15550100206")
    );
    assert_eq!(primary_number(&env, "206").await, None);
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM dbaliases WHERE alias_username = '+15550100201'")
            .await,
        "1",
        "a number belongs to one user"
    );
    assert_eq!(
        primary_number(&env, "207").await.as_deref(),
        Some("+15550200203")
    );
    assert_eq!(env.attribute("203", "pbx.private_number").await, None);
    assert_eq!(
        env.attribute("203", "pbx.private_number_location").await,
        None
    );

    let (header, rows) = result_csv(&env, "moves");
    assert_eq!(
        header,
        [
            "extension",
            "primaryNumber",
            "primaryNumberLocation",
            "callerIdPolicy",
            "Change OK",
            "Notes"
        ]
    );
    assert_eq!(rows.len(), 4, "only the input rows: {rows:?}");
    assert_eq!(rows[0][2], "Berlin, 3rd floor");
    assert!(
        rows[0][5].contains(
            "primaryNumber +15550100201 was held by 201 (its primaryNumber); it moves to this user"
        ),
        "{}",
        rows[0][5]
    );
    assert!(rows[1][5].contains("was held by 206"), "{}", rows[1][5]);
    assert!(
        rows[2][5].contains("number +15550100206 moves from this user to 205 (CSV line 3)"),
        "both rows warn: {}",
        rows[2][5]
    );
    assert!(
        rows[3][5].contains("was held by 203 (its privateNumber)"),
        "{}",
        rows[3][5]
    );
    // 201 and 203 have no row: their own results say what they lost.
    for (ext, number, taker) in [
        ("201", "+15550100201", "204"),
        ("203", "+15550200203", "207"),
    ] {
        let r = status
            .results
            .iter()
            .find(|r| r.target == ext)
            .unwrap_or_else(|| panic!("no result for {ext}"));
        assert_eq!(r.outcome, Outcome::Changed);
        assert!(
            r.notes[0].contains(&format!("number {number} moves from this user to {taker}")),
            "{:?}",
            r.notes
        );
    }
}

#[tokio::test]
async fn every_row_error_is_a_note_and_bad_files_are_refused() {
    let env = Env::start_with("csv-errors", lab(), false, &["--max-csv-bytes", "2048"]).await;
    let text = "extension,primaryNumber,callerIdPolicy,department,password\n\
                205,+15550100995,Default,,\n\
                999,,Default,,\n\
                206,12345,,,\n\
                207,,Secret,,\n\
                208,,,Sales,\n\
                202,+15550100777,,,\n\
                203,+15550100777,,,\n\
                201,,Anonymous,,\n\
                201,,Default,,hunter2\n";
    config_map(&env, "errors", Some(text), None).await;
    change(&env, "errors", "errors", "Validate", "");
    let b = env
        .wait_buc("errors", &[Phase::Validated, Phase::Failed])
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Validated);
    assert_eq!(
        status.plan.as_ref().unwrap().csv.as_ref().unwrap().invalid,
        8
    );
    let (header, rows) = result_csv(&env, "errors");
    assert_eq!(
        header,
        [
            "extension",
            "primaryNumber",
            "callerIdPolicy",
            "department",
            "password",
            "Change OK",
            "Notes"
        ]
    );
    assert_eq!(
        rows[8][4], "(redacted)",
        "a secret cell is never echoed into results"
    );
    let (_, raw, _) = env.cli(&["results", "bulkuserchange/errors", "-n", &env.ns]);
    assert!(!raw.contains("hunter2"));
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|mut r| {
            r.remove(4);
            r
        })
        .collect();
    let ok: Vec<&str> = rows.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(
        ok,
        [
            "true", "false", "false", "false", "false", "false", "false", "false", "false"
        ]
    );
    let notes: Vec<&str> = rows.iter().map(|r| r[5].as_str()).collect();
    let expected = [
        "would update: primaryNumber (+15550100205 -> +15550100995)",
        "this row's extension does not exist on the PBX",
        "primaryNumber is not an E.164 number",
        "unknown callerIdPolicy; the PBX knows: Anonymous, Default, Reception",
        "unknown column 4",
        "a number of this row is also given on line 8",
        "a number of this row is also given on line 7",
        "this row's extension also has a row on line 10",
        "this row's extension also has a row on line 9",
    ];
    for (i, (note, want)) in notes.iter().zip(expected).enumerate() {
        assert!(note.contains(want), "row {i}: {note:?} lacks {want:?}");
    }
    assert!(
        notes[8].contains("column 5 (password) cannot be set from a CSV"),
        "{}",
        notes[8]
    );
    assert_eq!(
        primary_number(&env, "205").await.as_deref(),
        Some("+15550100205"),
        "Validate touches nothing"
    );

    // Whole files refused with one message each, nothing changed.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend([0u8; 64]);
    let big = format!("{HEADER}\n{}", "201,,,,,,Default,Domestic\n".repeat(100));
    for (name, text, binary, expected) in [
        (
            "not-csv",
            None,
            Some(png),
            "not a CSV file: it holds binary data",
        ),
        (
            "no-header",
            Some("201,+15550100201\n202,+15550100202\n".to_string()),
            None,
            "no header row naming an `extension` column",
        ),
        ("too-big", Some(big), None, "the limit is 2048 bytes"),
    ] {
        config_map(&env, name, text.as_deref(), binary).await;
        change(&env, name, name, "Execute", "");
        let b = env.wait_buc(name, &[Phase::Failed]).await;
        let stalled = b
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .cloned()
            .unwrap();
        assert_eq!(stalled.reason, "CsvRefused", "{name}");
        assert!(
            stalled.message.contains(expected),
            "{name}: {}",
            stalled.message
        );
    }
    assert_eq!(
        env.attribute("201", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Default")
    );

    // A CSV with sensitive columns comes from a Secret instead of a ConfigMap; its owner lets
    // changes use it with the label.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), &env.ns);
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("sheet".into()),
            labels: Some(BTreeMap::from([(
                "pbx-operator.io/usable-by-changes".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "changes.csv".to_string(),
            "extension,callerIdPolicy\n205,Anonymous\n".to_string(),
        )])),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: from-secret }
spec:
  connectionRef: { name: acme }
  source: { csv: { secretKeyRef: { name: sheet, key: changes.csv } } }
  mode: Validate
"#,
    );
    let b = env
        .wait_buc("from-secret", &[Phase::Validated, Phase::Failed])
        .await;
    assert_eq!(b.status.as_ref().unwrap().phase, Phase::Validated);
    let (_, rows) = result_csv(&env, "from-secret");
    assert_eq!(
        rows,
        [[
            "205",
            "Anonymous",
            "true",
            "would update: callerIdPolicy (Default -> Anonymous)"
        ]]
    );

    // The API server refuses a CSV change that also names targets.
    let (ok, _, err) = support::try_kubectl(
        &support::control_plane().admin_kubeconfig,
        &["apply", "-n", &env.ns, "-f", "-"],
        br#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: both }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  source: { csv: { configMapKeyRef: { name: errors, key: changes.csv } } }
"#,
    );
    assert!(!ok);
    assert!(
        err.contains("spec.source.csv names its users in its rows: remove spec.targets"),
        "{err}"
    );
}

#[tokio::test]
async fn a_gzipped_csv_in_several_batches_atomic_and_one_invalid_row_refuses_every_batch() {
    let env = Env::start(
        "csv-batches",
        LabSpec {
            users: 2500,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let (ok, export, err) = env.cli(&[
        "export",
        "users",
        "--connection",
        &format!("{}/acme", env.ns),
    ]);
    assert!(ok, "{err}");
    // Everyone gets caller ID policy Anonymous: the exported sheet with one column edited.
    let mut edited = String::new();
    for (i, line) in export.lines().enumerate() {
        let mut cells: Vec<&str> = line.split(',').collect();
        if i > 0 {
            cells[6] = "Anonymous";
        }
        edited.push_str(&cells.join(","));
        edited.push('\n');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, edited.as_bytes()).unwrap();
    config_map(&env, "all", None, Some(gz.finish().unwrap())).await;
    change(&env, "all", "all", "Execute", "  failurePolicy: Atomic\n");
    let b = env
        .wait_buc(
            "all",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    assert!(status.results_refs.len() >= 3, "{:?}", status.results_refs);
    let anonymous = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'")
        .await;
    assert_eq!(anonymous, "2500");
    let (_, rows) = result_csv(&env, "all");
    assert_eq!(rows.len(), 2500, "every row once");
    let mut seen: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(seen[0], "200");
    assert_eq!(seen[2499], "2699", "input order");
    seen.dedup();
    assert_eq!(seen.len(), 2500);

    // The same file made to undo it, with a number move to a user without a row (a donor row
    // in the first batch) and an extension the PBX lacks in the last row: the invalid row is
    // found only when the last batch is planned, after the first batches were stored. Atomic:
    // every row is stored again refused, the donor row gone, and nothing is written.
    let mut undo = String::new();
    for (i, line) in export.lines().enumerate() {
        let mut cells: Vec<&str> = line.split(',').collect();
        if cells[0] == "2650" {
            continue;
        }
        if i > 0 {
            cells[6] = "Default";
        }
        if cells[0] == "200" {
            cells[2] = "+15550102650";
        }
        undo.push_str(&cells.join(","));
        undo.push('\n');
    }
    undo.push_str("99999,,,,,,Default,\n");
    config_map(&env, "undo", Some(&undo), None).await;
    change(&env, "undo", "undo", "Execute", "  failurePolicy: Atomic\n");
    let b = env
        .wait_buc(
            "undo",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.unwrap();
    assert_eq!(status.phase, Phase::Failed, "{:?}", status.conditions);
    let plan = status.plan.unwrap();
    assert_eq!(plan.changes, 0);
    assert_eq!(plan.csv.unwrap().invalid, 2500);
    let (header, rows) = result_csv(&env, "undo");
    let notes = header.iter().position(|h| h == "Notes").unwrap();
    assert_eq!(rows.len(), 2500, "one row per line, no donor row");
    assert!(rows.iter().all(|r| r[0] != "2650"), "the donor row is gone");
    for r in &rows[..2499] {
        assert!(
            r[notes]
                .contains("failurePolicy is Atomic and 1 rows are invalid (first on line 2501)"),
            "{r:?}"
        );
    }
    assert_eq!(rows[2499][0], "99999", "the invalid row in its place");
    assert!(
        rows[2499][notes].contains("does not exist on the PBX"),
        "{:?}",
        rows[2499]
    );
    let anonymous = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'")
        .await;
    assert_eq!(anonymous, "2500", "nothing written");
    assert_eq!(
        primary_number(&env, "2650").await.as_deref(),
        Some("+15550102650")
    );
    assert_eq!(
        primary_number(&env, "200").await.as_deref(),
        Some("+15550100200")
    );
}

#[tokio::test]
async fn sigkill_mid_csv_change_moves_each_number_once() {
    // 8 batches of 1000 rows: two kills, after 0 and 1 more recorded batches at the earliest,
    // with batches to spare when a kill lands late.
    const USERS: usize = 8000;
    const KILLS: usize = 2;
    let mut env = Env::start(
        "csv-crash",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // Every row: caller ID Anonymous; every 10th row also takes the number of the user after it
    // (who has no row of its own that gives a number): USERS / 10 moves.
    let mut text = String::from("extension,primaryNumber,callerIdPolicy\n");
    for i in 0..USERS {
        let ext = 200 + i;
        let take = if i % 10 == 0 {
            format!("+1555010{:04}", ext + 1)
        } else {
            String::new()
        };
        text.push_str(&format!("{ext},{take},Anonymous\n"));
    }
    config_map(&env, "all", Some(&text), None).await;
    change(&env, "all", "all", "Execute", "");
    env
        .kill_mid_run_every_time("all", KILLS, Duration::from_millis(500), "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'")
        .await;
    let b = env
        .wait_buc_for(
            "all",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
            Duration::from_secs(300),
        )
        .await;
    let status = b.status.unwrap();
    assert_eq!(
        status.phase,
        Phase::Succeeded,
        "{:?}",
        status.results.first()
    );
    let s = status.summary.unwrap();
    assert_eq!(
        (s.targets, s.changed + s.unchanged, s.failed, s.conflicts),
        (USERS as u32, USERS as u32, 0, 0),
        "every row once (users already Anonymous without a move are unchanged)"
    );
    let (_, rows) = result_csv(&env, "all");
    assert_eq!(rows.len(), USERS, "every input row once");
    let unique: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(unique.len(), USERS);
    assert!(
        rows.iter().all(|r| r[3] == "true"),
        "{:?}",
        rows.iter().find(|r| r[3] != "true")
    );
    assert!(rows[0][4].contains("was held by 201"), "{}", rows[0][4]);
    assert!(
        rows[1][4].contains("number +15550100201 moves from this user to 200 (CSV line 2)"),
        "{}",
        rows[1][4]
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'").await,
        USERS.to_string()
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM (SELECT alias_username FROM dbaliases GROUP BY alias_username HAVING COUNT(*) > 1) d").await,
        "0",
        "no number has two holders"
    );
    // A fifth of the users never had a number (i % 5 == 4); a tenth gave theirs away.
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber s WHERE NOT EXISTS (SELECT 1 FROM dbaliases d WHERE d.username = s.username)").await,
        (USERS / 5 + USERS / 10).to_string()
    );
}
