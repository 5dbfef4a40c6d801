//! End-to-end figures, printed (never asserted): the operator process against a real control
//! plane and a real Kamailio.
//!
//! 1. A BulkUserChange of 3 fields on 10,000 users (PostgreSQL): create -> Ready, beside the
//!    floor (one batched SQL UPDATE writing the same 30,000 rows), and the operator's peak RSS.
//! 2. PhoneRestart of 500 registered SIPp phones, no rate limit: NOTIFYs per second and time to
//!    all confirmed, beside a shell loop of JSON-RPC NOTIFYs (what an admin would script).
//!
//! Run: `cargo bench --bench operator` (BENCH_USERS, BENCH_PHONES, BENCH_LOOP_PHONES override sizes).

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
}
