//! End-to-end figures, printed (never asserted): the operator process against a real control
//! plane and a real Kamailio.
//!
//! 1. A BulkUserChange of 3 fields on 10,000 users (PostgreSQL): create -> Ready, beside the
//!    floor (one batched SQL UPDATE writing the same 30,000 rows), and the operator's peak RSS.
//! 2. PhoneRestart of 500 registered SIPp phones, no rate limit: NOTIFYs per second and time to
//!    all confirmed, beside a shell loop of JSON-RPC NOTIFYs (what an admin would script).
//!
//! 3. A CSV-sourced BulkUserChange of 20,000 rows (PostgreSQL): export, Validate, then Execute
//!    of the validated rows; times, the result ConfigMaps' sizes and the operator's peak RSS.
//!
//! Run: `cargo bench --bench operator` (BENCH_USERS, BENCH_PHONES, BENCH_LOOP_PHONES,
//! BENCH_CSV_ROWS override sizes; 0 skips a part).

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kube::Api;
use pbx_operator::api::{BulkUserChange, Phase, PhoneRestart};
use support::lab::LabSpec;
use support::pbx::Env;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn bulk_user_change(users: usize) {
    let env = Env::start(
        "bench-buc",
        LabSpec {
            db: "postgres",
            users,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;

    // The floor: one statement writing the same 30,000 values.
    let start = Instant::now();
    let floor_sql = "UPDATE usr_preferences SET value = CASE attribute WHEN 'pbx.call_group' THEN '11' WHEN 'pbx.pickup_group' THEN '12' ELSE 'Restricted' END WHERE attribute IN ('pbx.call_group', 'pbx.pickup_group', 'pbx.voice_route_policy')";
    let floor_rows = sqlx::query(floor_sql)
        .execute(&env.pool)
        .await
        .unwrap()
        .rows_affected();
    let floor = start.elapsed();

    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "21", lock: Open }
    pickupGroup: { value: "22", lock: Open }
    voiceRoutePolicy: { value: International, lock: Open }
"#,
    );
    let b = support::eventually(Duration::from_secs(600), "the change to finish", || async {
        let b = api.get("everyone").await.ok()?;
        matches!(
            b.status.as_ref()?.phase,
            Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
        )
        .then_some(b)
    })
    .await;
    let took = start.elapsed();
    let rss = peak_rss_mib(env.operator.child.id());
    let s = b.status.unwrap();
    let summary = s.summary.unwrap();
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '21'").await;
    println!(
        "\nBulkUserChange, {users} users x 3 fields, PostgreSQL (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  floor: one batched SQL UPDATE of {floor_rows} rows   {:>8.2} s",
        floor.as_secs_f64()
    );
    println!(
        "  operator: create -> {:?}, {} changed          {:>8.2} s",
        s.phase,
        summary.changed,
        took.as_secs_f64()
    );
    println!(
        "  ratio operator / floor                         {:>8.1} x",
        took.as_secs_f64() / floor.as_secs_f64()
    );
    println!("  users with the new value in SQL                {written:>8}");
    println!("  operator peak RSS (VmHWM)                      {rss:>8.1} MiB");
}

async fn phone_restart(phones: usize, loop_phones: usize) {
    let env = Env::start(
        "bench-prs",
        LabSpec {
            db: "postgres",
            users: phones,
            phones,
            ..Default::default()
        },
        false,
    )
    .await;
    let list = env.lab.list("LAB_PHONES_REBOOT");

    // What an admin scripts: per phone, look up its contact and send a NOTIFY via JSON-RPC.
    let script = format!(
        "for e in {}; do bash {} notify --dir {} --ext $e >/dev/null; done",
        list[..loop_phones.min(list.len())].join(" "),
        support::repo_root().join("tests/lab/lab.sh").display(),
        env.lab.dir.display()
    );
    let start = Instant::now();
    let ok = std::process::Command::new("bash")
        .args(["-c", &script])
        .status()
        .unwrap()
        .success();
    let shell = start.elapsed();
    assert!(ok, "the shell loop failed");
    // Let the looped phones finish rebooting before the operator's run.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 10000, perSecond: 10000 }
  confirm: { timeout: 60s }
"#,
    );
    let p = support::eventually(
        Duration::from_secs(600),
        "the restart to finish",
        || async {
            let p = api.get("everyone").await.ok()?;
            matches!(
                p.status.as_ref()?.phase,
                Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
            )
            .then_some(p)
        },
    )
    .await;
    let took = start.elapsed();
    let s = p.status.unwrap();
    let summary = s.summary.unwrap();
    let rss = peak_rss_mib(env.operator.child.id());
    println!(
        "\nPhoneRestart, {phones} registered SIPp phones, no rate limit (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  shell loop of JSON-RPC NOTIFYs ({} phones)      {:>8.1} NOTIFY/s",
        loop_phones.min(list.len()),
        loop_phones.min(list.len()) as f64 / shell.as_secs_f64()
    );
    println!(
        "  operator: create -> {:?}: {} restarted, {} accepted, {} failed",
        s.phase, summary.restarted, summary.accepted, summary.failed
    );
    println!(
        "  operator: create -> all confirmed             {:>8.2} s",
        took.as_secs_f64()
    );
    println!(
        "  operator: phones per second, create -> confirmed {:>6.1} /s",
        phones as f64 / took.as_secs_f64()
    );
    println!(
        "  (each lab phone 'boots' for LAB_BOOT_MS = {} ms before it registers again)",
        env.lab.get("LAB_BOOT_MS")
    );
    println!("  operator peak RSS (VmHWM)                      {rss:>8.1} MiB");
}

async fn csv_change(rows: usize) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};

    let env = Env::start(
        "bench-csv",
        LabSpec {
            db: "postgres",
            users: rows,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let rss_at_rest = peak_rss_mib(env.operator.child.id());
    let start = Instant::now();
    let (ok, export, err) = env.cli(&[
        "export",
        "users",
        "--connection",
        &format!("{}/acme", env.ns),
    ]);
    assert!(ok, "{err}");
    let export_took = start.elapsed();
    // Every row: new policies; every 10th row: a new primary number.
    let mut edited = String::with_capacity(export.len() + rows * 8);
    for (i, line) in export.lines().enumerate() {
        let mut cells: Vec<String> = line.split(',').map(String::from).collect();
        if i > 0 {
            cells[6] = "Anonymous".into();
            cells[7] = "International".into();
            if i % 10 == 0 {
                cells[2] = format!("+1555099{i:04}");
            }
        }
        edited.push_str(&cells.join(","));
        edited.push('\n');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, edited.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("sheet".into()),
            ..Default::default()
        },
        binary_data: Some(
            [(
                "changes.csv".to_string(),
                k8s_openapi::ByteString(gz.clone()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: sheet }
spec:
  connectionRef: { name: acme }
  source: { csv: { configMapKeyRef: { name: sheet, key: changes.csv } } }
  mode: Validate
"#,
    );
    let wait =
        |phases: &'static [Phase]| env.wait_buc_for("sheet", phases, Duration::from_secs(900));
    let validated = wait(&[Phase::Validated, Phase::Failed]).await;
    let validate_took = start.elapsed();
    let rss_validate = peak_rss_mib(env.operator.child.id());
    let plan = validated.status.as_ref().unwrap().plan.clone().unwrap();
    let start = Instant::now();
    api.patch(
        "sheet",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": { "mode": "Execute" } })),
    )
    .await
    .unwrap();
    let done = wait(&[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed]).await;
    let execute_took = start.elapsed();
    let rss = peak_rss_mib(env.operator.child.id());
    let s = done.status.unwrap();
    let summary = s.summary.unwrap();
    let mut largest = 0;
    for cm in cms.list(&ListParams::default()).await.unwrap() {
        if cm
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("sheet-results-"))
        {
            let size: usize = cm.data.unwrap_or_default().values().map(String::len).sum();
            largest = largest.max(size);
        }
    }
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'").await;
    println!(
        "\nCSV BulkUserChange, {rows} rows, PostgreSQL (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  export users (CLI, {} bytes)                 {:>8.2} s",
        export.len(),
        export_took.as_secs_f64()
    );
    println!(
        "  upload: gzip in binaryData                    {:>8} bytes (from {})",
        gz.len(),
        edited.len()
    );
    println!(
        "  Validate: create -> Validated, {} would change  {:>8.2} s   (invalid rows: {})",
        plan.changes,
        validate_took.as_secs_f64(),
        plan.csv.map(|c| c.invalid).unwrap_or(0)
    );
    println!(
        "  Execute: -> {:?}, {} changed               {:>8.2} s",
        s.phase,
        summary.changed,
        execute_took.as_secs_f64()
    );
    println!(
        "  result ConfigMaps: {}, largest {} bytes (limit 1 MiB)",
        s.results_refs.len(),
        largest
    );
    println!("  users with the new policy in SQL               {written:>8}");
    println!("  operator peak RSS before the change (VmHWM)    {rss_at_rest:>8.1} MiB");
    println!("  operator peak RSS after Validate (VmHWM)       {rss_validate:>8.1} MiB");
    println!("  operator peak RSS after Execute (VmHWM)        {rss:>8.1} MiB");
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // A size of 0 skips that part.
    let users = env_usize("BENCH_USERS", 10_000);
    if users > 0 {
        bulk_user_change(users).await;
    }
    let phones = env_usize("BENCH_PHONES", 500);
    if phones > 0 {
        phone_restart(phones, env_usize("BENCH_LOOP_PHONES", 100)).await;
    }
    let csv_rows = env_usize("BENCH_CSV_ROWS", 20_000);
    if csv_rows > 0 {
        csv_change(csv_rows).await;
    }
}
