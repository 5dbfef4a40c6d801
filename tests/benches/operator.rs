//! End-to-end figures, printed (never asserted): the operator process against a real control
//! plane and a real Kamailio.
//!
//! 1. A BulkUserChange of 3 fields on 10,000 and 100,000 users, on PostgreSQL, MariaDB and
//!    SQLite (10,000 only), a fresh lab each: create -> Succeeded and the PBX write phase beside
//!    the floor (one SQL UPDATE writing the same values), peak RSS, API server load, results
//!    ConfigMaps. At the largest size on PostgreSQL, the same change as one Atomic transaction,
//!    once with a SIGKILL mid-run (every target reported once and written), and once with one
//!    user in a hundred conflicting, then retried (the retry's time and peak RSS).
//! 2. PhoneRestart of 200 and of 2,000 registered SIPp phones (+10 silent ones each), no rate
//!    limit: the send phase's NOTIFYs per second at the phones, time to all settled, RPC bytes
//!    read per confirmed phone at both sizes, peak RSS, beside a shell loop of JSON-RPC NOTIFYs
//!    (what an admin would script); then a BulkPhoneChange (model + label of one vendor) of the
//!    2,000, Validate and Execute timed.
//! 3. A CSV-sourced BulkUserChange of 100,000 rows (PostgreSQL, MariaDB): export, Validate, then
//!    Execute of the validated rows; times, the result ConfigMaps and the operator's peak RSS.
//!    On PostgreSQL, another file with one user in a hundred conflicting, then retried.
//!
//! A summary table of parts 1 and 3 ends the run.
//!
//! Run: `cargo bench --bench operator`. BENCH_DBS and BENCH_USER_SIZES (comma lists),
//! BENCH_USER_EXTRAS=0 (no Atomic, SIGKILL and retry runs), BENCH_PHONES, BENCH_PHONES_SMALL,
//! BENCH_SILENT_PHONES, BENCH_LOOP_PHONES, BENCH_SHARED_RATE_PHONES (two restarts of that many
//! phones each under a shared 200/s), BENCH_CSV_ROWS and BENCH_CSV_DBS override; 0 or an empty
//! list skips a part; BENCH_PHONE_CHANGE=0 skips the BulkPhoneChange. Users and CSV only:
//! `BENCH_PHONES=0 BENCH_PHONES_SMALL=0 BENCH_SHARED_RATE_PHONES=0 cargo bench --bench operator`.

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkPhoneChange, BulkUserChange, Phase, PhoneRestart};
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

const FINISHED: &[Phase] = &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed];

/// What one BulkUserChange run of the user part measured.
struct UserRun {
    db: &'static str,
    users: usize,
    /// The one-statement SQL floor: seconds.
    floor: f64,
    /// Create -> finished: seconds.
    took: f64,
    /// Seconds inside the backend's write calls.
    write: f64,
    rss_mib: f64,
    requests: f64,
    request_kib: f64,
    configmaps: usize,
    configmap_kib: f64,
}

/// Seconds the operator spent so far in the calls that write users (an Atomic run's commit
/// included).
fn write_seconds(env: &Env) -> f64 {
    call_time(env, "apply_user_changes").1 + call_time(env, "commit_atomic").1
}

/// Resets the operator's VmHWM to its current RSS, so the next figure is the next run's peak.
fn reset_peak_rss(env: &Env) {
    let pid = env.operator.child.id();
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The number and total size (data and binaryData) of the results ConfigMaps a change names.
async fn results_configmaps(env: &Env, refs: &[String]) -> (usize, f64) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let mut bytes = 0usize;
    for name in refs {
        let cm = cms.get(name).await.unwrap();
        bytes += cm
            .data
            .unwrap_or_default()
            .values()
            .map(String::len)
            .sum::<usize>();
        bytes += cm
            .binary_data
            .unwrap_or_default()
            .values()
            .map(|b| b.0.len())
            .sum::<usize>();
    }
    (refs.len(), bytes as f64 / 1024.0)
}

/// Creates BulkUserChange `name` over every user, setting the three fields to `values`, and
/// waits for it to finish: the run's figures (the floor left 0), its status and the seconds
/// from create to finished.
async fn run_user_change(
    env: &Env,
    name: &str,
    values: (&str, &str, &str),
    failure_policy: &str,
) -> (UserRun, pbx_operator::api::OperationStatus) {
    reset_peak_rss(env);
    let load = api_load(env);
    let write_before = write_seconds(env);
    let start = Instant::now();
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales, support, engineering] }}
  failurePolicy: {failure_policy}
  fields:
    callGroup: {{ value: "{}", lock: Open }}
    pickupGroup: {{ value: "{}", lock: Open }}
    voiceRoutePolicy: {{ value: {}, lock: Open }}
"#,
        values.0, values.1, values.2
    ));
    let b = env
        .wait_buc_for(name, FINISHED, Duration::from_secs(900))
        .await;
    let took = start.elapsed().as_secs_f64();
    let rss_mib = peak_rss_mib(env.operator.child.id());
    let after = api_load(env);
    let s = b.status.unwrap();
    let (configmaps, configmap_kib) = results_configmaps(env, &s.results_refs).await;
    let run = UserRun {
        db: "",
        users: 0,
        floor: 0.0,
        took,
        write: write_seconds(env) - write_before,
        rss_mib,
        requests: after.0 - load.0,
        request_kib: (after.1 - load.1) / 1024.0,
        configmaps,
        configmap_kib,
    };
    (run, s)
}

/// A BulkUserChange of 3 fields on `users` users on database `db`, beside the floor; with
/// `extras`, then an Atomic run of the same size and a run with one SIGKILL mid-run.
async fn bulk_user_change(db: &'static str, users: usize, extras: bool) -> UserRun {
    let mut env = Env::start(
        &format!("bench-buc-{db}"),
        LabSpec {
            db,
            users,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;

    // The floor: one statement writing the same values (three per user), on every database.
    let start = Instant::now();
    let floor_sql = "UPDATE usr_preferences SET value = CASE attribute WHEN 'pbx.call_group' THEN '11' WHEN 'pbx.pickup_group' THEN '12' ELSE 'Restricted' END WHERE attribute IN ('pbx.call_group', 'pbx.pickup_group', 'pbx.voice_route_policy')";
    let floor_rows = sqlx::query(floor_sql)
        .execute(&env.pool)
        .await
        .unwrap()
        .rows_affected();
    let floor = start.elapsed().as_secs_f64();

    let (mut run, s) =
        run_user_change(&env, "everyone", ("21", "22", "International"), "Continue").await;
    run.db = db;
    run.users = users;
    run.floor = floor;
    let summary = s.summary.unwrap_or_default();
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '21'").await;
    println!(
        "\nBulkUserChange, {users} users x 3 fields, {db} (debug={})",
        cfg!(debug_assertions)
    );
    println!("  floor: one SQL UPDATE of {floor_rows} rows        {floor:>8.2} s");
    println!(
        "  operator: create -> {:?}, {} changed        {:>8.2} s   ({:.1} x the floor)",
        s.phase,
        summary.changed,
        run.took,
        run.took / floor
    );
    println!(
        "  PBX write phase (apply_user_changes)          {:>8.2} s   ({:.2} x the floor)",
        run.write,
        run.write / floor
    );
    println!("  users with the new value in SQL               {written:>8}");
    println!(
        "  operator peak RSS (VmHWM)                     {:>8.1} MiB",
        run.rss_mib
    );
    println!(
        "  API server load: {} requests, {:.1} KiB of request bodies",
        run.requests, run.request_kib
    );
    println!(
        "  results: {} ConfigMaps, {:.1} KiB in all",
        run.configmaps, run.configmap_kib
    );
    if extras {
        atomic_and_crash(&mut env, users).await;
    }
    run
}

/// On a lab of `users` users: the same change as one Atomic transaction, then again with one
/// SIGKILL mid-run, checking that every target is reported once and written.
async fn atomic_and_crash(env: &mut Env, users: usize) {
    let (atomic, s) =
        run_user_change(env, "everyone-atomic", ("31", "32", "Domestic"), "Atomic").await;
    let summary = s.summary.unwrap_or_default();
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '31'").await;
    println!(
        "  Atomic (one transaction): -> {:?}, {} changed {:>8.2} s",
        s.phase, summary.changed, atomic.took
    );
    println!(
        "    write phase (apply_user_changes + commit) {:>8.2} s",
        atomic.write
    );
    println!(
        "    operator peak RSS during it (VmHWM)        {:>8.1} MiB",
        atomic.rss_mib
    );
    println!("    users with the new value in SQL            {written:>8}");

    let start = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone-crash }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "41", lock: Open }
    pickupGroup: { value: "42", lock: Open }
    voiceRoutePolicy: { value: Restricted, lock: Open }
"#,
    );
    let progress =
        "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '41'";
    let kills = env
        .kill_mid_run_every_time("everyone-crash", 1, Duration::from_secs(2), progress)
        .await;
    let b = env
        .wait_buc_for("everyone-crash", FINISHED, Duration::from_secs(900))
        .await;
    let took = start.elapsed().as_secs_f64();
    let s = b.status.unwrap();
    let (ok, csv, err) = env.cli(&["results", "bulkuserchange/everyone-crash", "-n", &env.ns]);
    assert!(ok, "{err}");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let targets: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|l| l.split(',').next()).collect();
    let all_changed = rows.iter().all(|l| l.contains(",Changed,"));
    let written = env.sql_one(progress).await;
    let once = rows.len() == users && targets.len() == users;
    println!(
        "  one SIGKILL mid-run ({} -> {}, {} users written at the kill): -> {:?} {took:>6.2} s",
        kills[0].before, kills[0].after, kills[0].rows_written, s.phase
    );
    println!(
        "    result rows {} for {} distinct targets of {users}: every target once: {once}, all Changed: {all_changed}; written in SQL {written}",
        rows.len(),
        targets.len()
    );
    assert!(
        once && all_changed && written == users.to_string(),
        "the crashed run lost or repeated targets"
    );
    retry_after_conflicts(env, users).await;
}

/// Validated change `name`: one user in a hundred has `attribute` set to `value` in the console
/// (Conflict), then it executes and is retried. Prints the retry's time and peak RSS; returns
/// the retry's status.
async fn conflict_then_retry(
    env: &Env,
    name: &str,
    attribute: &str,
    value: &str,
) -> pbx_operator::api::OperationStatus {
    let edited = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE usr_preferences SET value = '{value}' WHERE attribute = '{attribute}' AND CAST(username AS INTEGER) % 100 = 0")))
        .execute(&env.pool)
        .await
        .unwrap()
        .rows_affected();
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let execute = serde_json::json!({ "spec": { "mode": "Execute" } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&execute))
        .await
        .unwrap();
    let first = env
        .wait_buc_for(name, FINISHED, Duration::from_secs(900))
        .await;
    let conflicts = first
        .status
        .and_then(|s| s.summary)
        .unwrap_or_default()
        .conflicts;
    reset_peak_rss(env);
    let start = Instant::now();
    let retry =
        serde_json::json!({ "metadata": { "annotations": { "pbx-operator.io/retry": "1" } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&retry))
        .await
        .unwrap();
    let s = support::eventually(Duration::from_secs(900), "the retry to finish", || async {
        let s = api.get(name).await.ok()?.status?;
        let retried = s.progress.as_ref()?.retry.as_deref() == Some("1");
        (retried && FINISHED.contains(&s.phase)).then_some(s)
    })
    .await;
    let took = start.elapsed().as_secs_f64();
    let rss = peak_rss_mib(env.operator.child.id());
    let changed = s.summary.as_ref().map(|s| s.changed).unwrap_or(0);
    println!(
        "  retry of {conflicts} conflicts ({edited} users edited before Execute): -> {:?}, {changed} changed {took:>6.2} s",
        s.phase
    );
    println!("    operator peak RSS during the retry (VmHWM)  {rss:>8.1} MiB");
    s
}

/// On a lab of `users` users: a change validated, one user in a hundred edited in the console
/// before it executes (Conflict), then the retry annotation: the retry's time and peak RSS
/// (it builds on the earlier run's rows).
async fn retry_after_conflicts(env: &Env, users: usize) {
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone-retry }
spec:
  connectionRef: { name: acme }
  mode: Validate
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "51", lock: Open }
    pickupGroup: { value: "52", lock: Open }
    voiceRoutePolicy: { value: International, lock: Open }
"#,
    );
    env.wait_buc_for(
        "everyone-retry",
        &[Phase::Validated],
        Duration::from_secs(900),
    )
    .await;
    conflict_then_retry(env, "everyone-retry", "pbx.call_group", "50").await;
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '51'").await;
    println!("    users with the new value in SQL            {written:>8} of {users}");
}

/// The operator's requests to the API server so far (all verbs) and the bytes of their bodies,
/// from its /metrics.
fn api_load(env: &Env) -> (f64, f64) {
    let (_, body) = env.operator.http_get("/metrics");
    let sum = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("pbx_operator_api_requests_total"),
        sum("pbx_operator_api_request_bytes_total"),
    )
}

fn print_api_load(before: (f64, f64), after: (f64, f64)) {
    println!(
        "  API server load: {} requests, {:.1} KiB of request bodies (status patches, results ConfigMaps)",
        after.0 - before.0,
        (after.1 - before.1) / 1024.0
    );
}

/// The operator's `pbx_operator_rpc_bytes_read` by RPC method, from its /metrics.
fn rpc_bytes(env: &Env) -> std::collections::BTreeMap<String, f64> {
    let (_, body) = env.operator.http_get("/metrics");
    body.lines()
        .filter_map(|l| l.strip_prefix("pbx_operator_rpc_bytes_read_total{method=\""))
        .filter_map(|l| {
            let (method, rest) = l.split_once('"')?;
            let value = rest.rsplit(' ').next()?.parse().ok()?;
            Some((method.to_string(), value))
        })
        .collect()
}

/// How often the operator made backend call `call`, and the seconds it took in all.
fn call_time(env: &Env, call: &str) -> (f64, f64) {
    let (_, body) = env.operator.http_get("/metrics");
    let sum = |suffix: &str| -> f64 {
        body.lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "pbx_operator_pbx_call_duration_seconds_{suffix}{{"
                )) && l.contains(&format!("call=\"{call}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (sum("count"), sum("sum"))
}

/// CPU seconds (user + system) used so far by the processes `keep` selects from
/// `/proc/<pid>/stat` fields (pid, ppid, process group), living ones only.
fn cpu_seconds(keep: impl Fn(u32, u32, u32) -> bool) -> f64 {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state ppid pgrp ... utime(14) stime(15).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if keep(pid, num(1) as u32, num(2) as u32) {
            ticks += num(11) + num(12);
        }
    }
    ticks as f64 / 100.0
}

/// CPU seconds so far of the operator, the lab's Kamailio (its process group), its SIPp phones,
/// its PostgreSQL (postmaster and backends).
fn cpu_split(env: &Env) -> [f64; 4] {
    let pid_in = |f: &str| -> u32 {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok())
            .unwrap_or(0)
    };
    let run = env.lab.dir.join("run");
    let operator = env.operator.child.id();
    let kamailio = pid_in(&run.join("kamailio.pid").to_string_lossy());
    let sipp: Vec<u32> = std::fs::read_dir(&run)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sipp-"))
        .map(|e| pid_in(&e.path().to_string_lossy()))
        .collect();
    let pg_data = std::fs::read_to_string(run.join("pg.datadir")).unwrap_or_default();
    let postmaster = pid_in(&format!("{}/postmaster.pid", pg_data.trim()));
    [
        cpu_seconds(|pid, _, _| pid == operator),
        cpu_seconds(|_, _, pgrp| pgrp == kamailio),
        cpu_seconds(|pid, _, _| sipp.contains(&pid)),
        cpu_seconds(|pid, ppid, _| pid == postmaster || ppid == postmaster),
    ]
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// PhoneRestart of `phones` registered SIPp phones (all five vendors, the Grandstreams behind
/// emulated NAT, `silent` of them silent and spread among the others), no rate limit; then, with
/// `change`, a BulkPhoneChange of the Yealinks' model and label, Validate then Execute.
async fn phone_restart(phones: usize, silent: usize, loop_phones: usize, change: bool) {
    let env = Env::start_full(
        "bench-prs",
        LabSpec {
            db: "postgres",
            users: phones + silent,
            phones,
            silent,
            ..Default::default()
        },
        &["--silent-spread"],
        false,
        &[],
    )
    .await;
    let list = env.lab.list("LAB_PHONES_REBOOT");
    let boot_ms: f64 = env.lab.get("LAB_BOOT_MS").parse().unwrap();

    // What an admin scripts: per phone, look up its contact and send a NOTIFY via JSON-RPC.
    let looped = loop_phones.min(list.len());
    let script = format!(
        "for e in {}; do bash {} notify --dir {} --ext $e >/dev/null; done",
        list[..looped].join(" "),
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
    let looped_events = env.lab.phone_events().len();

    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    let bytes_before = rpc_bytes(&env);
    let rss_before = peak_rss_mib(env.operator.child.id());
    let cpu_before = cpu_split(&env);
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
    let finished_at = unix_now();
    let bytes_after = rpc_bytes(&env);
    let cpu_after = cpu_split(&env);
    let s = p.status.unwrap();
    let summary = s.summary.unwrap();
    let rss = peak_rss_mib(env.operator.child.id());
    let events = env.lab.phone_events();
    let events = &events[looped_events.min(events.len())..];
    let notifies: Vec<f64> = events
        .iter()
        .filter(|e| e.what == "NOTIFY")
        .map(|e| e.at)
        .collect();
    let reboots: Vec<f64> = events
        .iter()
        .filter(|e| e.what == "REBOOTED")
        .map(|e| e.at)
        .collect();
    let send_phase = notifies.last().unwrap_or(&0.0) - notifies.first().unwrap_or(&0.0);
    let last_reboot = reboots.iter().cloned().fold(0.0, f64::max);
    let delta = |m: &str| {
        bytes_after.get(m).copied().unwrap_or(0.0) - bytes_before.get(m).copied().unwrap_or(0.0)
    };
    let confirmed = f64::from(summary.restarted.max(1));
    println!(
        "\nPhoneRestart, {phones} registered SIPp phones + {silent} silent (5 vendors, Grandstreams behind NAT), no rate limit (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  shell loop of JSON-RPC NOTIFYs ({looped} phones)      {:>8.1} NOTIFY/s",
        looped as f64 / shell.as_secs_f64()
    );
    println!(
        "  operator: create -> {:?}: {} restarted, {} accepted, {} failed",
        s.phase, summary.restarted, summary.accepted, summary.failed
    );
    println!(
        "  send phase at the phones (first -> last NOTIFY, {} NOTIFYs) {:>8.3} s = {:.1} NOTIFY/s (target >= 1000)",
        notifies.len(),
        send_phase,
        (notifies.len().max(2) - 1) as f64 / send_phase.max(1e-9)
    );
    println!(
        "  operator: create -> all settled                {:>8.2} s (the {silent} silent phones end at tm's fr_timer = {} ms)",
        took.as_secs_f64(),
        env.lab.get("LAB_FR_TIMER_MS")
    );
    println!(
        "  last fresh REGISTER at the phones -> settled seen by the bench {:>6.2} s (includes the silent phones' wait and the bench's 200 ms poll)",
        finished_at - last_reboot
    );
    println!("  (each lab phone 'boots' for LAB_BOOT_MS = {boot_ms} ms before it registers again)");
    println!(
        "  RPC bytes read: ul.lookup {:.0} (= {:.0} per confirmed phone), tm.t_uac_wait {:.0} ({:.0} per phone), ul.dump (planning, once) {:.0}",
        delta("ul.lookup"),
        delta("ul.lookup") / confirmed,
        delta("tm.t_uac_wait"),
        delta("tm.t_uac_wait") / confirmed,
        delta("ul.dump")
    );
    println!(
        "  operator peak RSS (VmHWM)                      {rss:>8.1} MiB (target < 64; {rss_before:.1} MiB before the restart)"
    );
    let (n, secs) = call_time(&env, "lookup_many");
    println!(
        "  registrations of the phones in flight looked up: {n} times, {:.1} ms each on average",
        secs * 1000.0 / n.max(1.0)
    );
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let per = |c: f64| c * 1000.0 / notifies.len().max(1) as f64;
    println!(
        "  CPU create -> settled: operator {:.2} s ({:.2} ms per NOTIFY), Kamailio {:.2} s ({:.2} ms), SIPp phones {:.2} s ({:.2} ms), PostgreSQL {:.2} s ({:.2} ms)",
        cpu[0],
        per(cpu[0]),
        cpu[1],
        per(cpu[1]),
        cpu[2],
        per(cpu[2]),
        cpu[3],
        per(cpu[3])
    );
    // How the send phase went: NOTIFYs arriving at the phones in each second from the first.
    let mut per_second = vec![0usize; send_phase.max(0.0) as usize + 1];
    for t in &notifies {
        per_second[((t - notifies[0]).max(0.0)) as usize] += 1;
    }
    println!("  NOTIFYs at the phones per second of the send phase: {per_second:?}");

    // Per phone: its NOTIFY's answer (SIPp answers as it logs the NOTIFY) -> the operator seeing
    // the fresh REGISTER (the row's confirmedAt), and the fresh REGISTER's 200 at the phone
    // (REBOOTED) -> seen.
    let (confirmed, others) = confirmed_at(&env, "everyone").await;
    for (what, n) in &others {
        println!("  not restarted: {n} x {what}");
    }
    let mut answered: std::collections::HashMap<&str, f64> = Default::default();
    let mut rebooted: std::collections::HashMap<&str, f64> = Default::default();
    for e in events {
        match e.what.as_str() {
            "NOTIFY" => {
                answered.entry(&e.extension).or_insert(e.at);
            }
            "REBOOTED" => {
                rebooted.entry(&e.extension).or_insert(e.at);
            }
            _ => {}
        }
    }
    let mut latency = Vec::new();
    let mut detection = Vec::new();
    for (ext, seen) in &confirmed {
        if let Some(a) = answered.get(ext.as_str()) {
            latency.push(seen - a);
        }
        if let Some(r) = rebooted.get(ext.as_str()) {
            detection.push(seen - r);
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let p99 = v
            .get(((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN);
        (p99, v.last().copied().unwrap_or(f64::NAN))
    };
    // Phones that registered afresh after their NOTIFY but were not seen to (none expected).
    let seen: std::collections::HashSet<&str> = confirmed.iter().map(|(e, _)| e.as_str()).collect();
    let unseen: Vec<&&str> = rebooted.keys().filter(|e| !seen.contains(**e)).collect();
    if !unseen.is_empty() {
        println!(
            "  {} phones logged their fresh REGISTER but are not Restarted: {unseen:?}",
            unseen.len()
        );
    }
    let (p99, max) = stats(&mut latency);
    let (dp99, dmax) = stats(&mut detection);
    println!(
        "  confirm latency, NOTIFY answered -> Restarted seen ({} phones): p99 {p99:.3} s, max {max:.3} s (target <= boot + 1 s = {:.3} s)",
        latency.len(),
        boot_ms / 1000.0 + 1.0
    );
    println!(
        "    of which fresh REGISTER at the phone -> seen by the operator: p99 {dp99:.3} s, max {dmax:.3} s"
    );

    if !change {
        return;
    }
    let changes: Api<BulkPhoneChange> = Api::namespaced(env.client.clone(), &env.ns);
    let settled = |want: Phase| {
        let changes = changes.clone();
        async move {
            support::eventually(
                Duration::from_secs(600),
                "the BulkPhoneChange to settle",
                || async {
                    let b = changes.get("yealinks").await.ok()?;
                    let s = b.status.as_ref()?;
                    (s.observed_generation == b.metadata.generation && s.phase == want).then_some(b)
                },
            )
            .await
        }
    };
    let start = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkPhoneChange
metadata: { name: yealinks }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering], vendors: [Yealink] }
  fields:
    model: { value: SIP-T54W, lock: Open }
    label: { value: "3rd floor", lock: Open }
  mode: Validate
"#,
    );
    let v = settled(Phase::Validated).await;
    let validate = start.elapsed();
    let plan = v.status.unwrap().plan.unwrap();
    let patch = serde_json::json!({ "spec": { "mode": "Execute", "approvedPlanHash": plan.hash } });
    let start = Instant::now();
    changes
        .patch("yealinks", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let done = settled(Phase::Succeeded).await;
    let execute = start.elapsed();
    let changed = done.status.unwrap().summary.unwrap().changed;
    let written = env
        .sql_one("SELECT COUNT(*) FROM pbx_phone WHERE model = 'SIP-T54W' AND label = '3rd floor'")
        .await;
    println!(
        "\nBulkPhoneChange of the Yealinks among {} phones: model + label",
        phones + silent
    );
    println!(
        "  Validate: create -> Validated ({} targets)     {:>8.2} s",
        plan.targets,
        validate.as_secs_f64()
    );
    println!(
        "  Execute: approve -> Succeeded ({changed} changed) {:>8.2} s",
        execute.as_secs_f64()
    );
    println!("  phones with the new model and label in SQL     {written:>8}");
    println!(
        "  operator peak RSS (VmHWM)                      {:>8.1} MiB",
        peak_rss_mib(env.operator.child.id())
    );
}

/// When the operator saw each phone of restart `name` restarted (Unix seconds), from its
/// results ConfigMaps' rows.
/// Also the rows not restarted, counted by outcome and last note.
async fn confirmed_at(
    env: &Env,
    name: &str,
) -> (
    Vec<(String, f64)>,
    std::collections::BTreeMap<String, usize>,
) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let mut out = Vec::new();
    let mut others = std::collections::BTreeMap::new();
    for cm in cms.list(&Default::default()).await.unwrap() {
        if !cm
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("{name}-")))
        {
            continue;
        }
        let rows = support::results_rows(&cm);
        for line in rows.lines() {
            let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let phone = &row["phone"];
            if let (Some(ext), Some(at)) =
                (phone["extension"].as_str(), phone["confirmedAt"].as_i64())
            {
                out.push((ext.to_string(), at as f64 / 1000.0));
            } else {
                let note = row["notes"]
                    .as_array()
                    .and_then(|n| n.last())
                    .and_then(|n| n.as_str())
                    .unwrap_or("");
                *others
                    .entry(format!("{}: {note}", row["outcome"]))
                    .or_default() += 1;
            }
        }
    }
    (out, others)
}

/// Two PhoneRestarts of `each` phones at once on a connection limited to `limit` NOTIFYs/s,
/// each restart allowed `own`/s by its rollout (together more than the limit): the rate across
/// both measured at the phones (SIPp's log of each NOTIFY's arrival) while both ran, and each
/// restart's most NOTIFYs within one second.
async fn shared_rate(each: usize, limit: u32, own: usize) {
    let env = Env::start_full(
        "bench-rate",
        LabSpec {
            db: "postgres",
            users: 2 * each,
            phones: 2 * each,
            ..Default::default()
        },
        &["--boot-ms", "300"],
        false,
        &[],
    )
    .await;
    let conns: Api<pbx_operator::api::PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    conns
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": { "rateLimits": { "notifiesPerSecond": limit } }
            })),
        )
        .await
        .unwrap();
    let phones = env.lab.list("LAB_PHONES_REBOOT");
    let restart = |name: &str, exts: &[String]| {
        format!(
            "apiVersion: pbx-operator.io/v1alpha1\nkind: PhoneRestart\nmetadata: {{ name: {name} }}\nspec:\n  connectionRef: {{ name: acme }}\n  targets: {{ extensions: [{}] }}\n  rollout: {{ maxInFlight: 500, perSecond: {own} }}\n  confirm: {{ timeout: 30s }}\n",
            exts.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    env.apply(&format!(
        "{}---\n{}",
        restart("first", &phones[..each]),
        restart("second", &phones[each..])
    ));
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    for name in ["first", "second"] {
        support::eventually(
            Duration::from_secs(600),
            "the restarts to finish",
            || async {
                let p = api.get(name).await.ok()?;
                matches!(
                    p.status.as_ref()?.phase,
                    Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
                )
                .then_some(())
            },
        )
        .await;
    }
    let times = env.lab.notify_times();
    let of = |first: bool| -> Vec<f64> {
        times
            .iter()
            .filter(|(_, e)| phones[..each].contains(e) == first)
            .map(|(t, _)| *t)
            .collect()
    };
    let (a, b) = (of(true), of(false));
    let (from, to) = (a[0].max(b[0]), a[a.len() - 1].min(b[b.len() - 1]));
    let together = times.iter().filter(|(t, _)| *t >= from && *t <= to).count();
    let rate = together.saturating_sub(1) as f64 / (to - from);
    let most_in_a_second = |ts: &[f64]| {
        ts.iter()
            .map(|start| {
                ts.iter()
                    .filter(|t| **t >= *start && **t < start + 1.0)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    println!(
        "\nTwo PhoneRestarts of {each} phones at once, rateLimits.notifiesPerSecond {limit}, each perSecond {own}, PostgreSQL (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  NOTIFYs at the phones while both ran ({together} in {:.1} s) {:>8.1} /s (target {limit} +- 5%: {:.0}..{:.0})",
        to - from,
        rate,
        limit as f64 * 0.95,
        limit as f64 * 1.05
    );
    println!(
        "  most NOTIFYs of one restart within a second    first {}, second {} (perSecond {own})",
        most_in_a_second(&a),
        most_in_a_second(&b)
    );
    println!(
        "  NOTIFYs in all                                 {:>8}",
        times.len()
    );
}

/// Creates ConfigMap `name` holding `csv` gzipped in binaryData under `changes.csv` (plain,
/// 100,000 rows are past the API server's request limit); returns the gzipped size.
async fn upload_csv(env: &Env, name: &str, csv: &str) -> usize {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::PostParams;

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, csv.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let size = gz.len();
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        binary_data: Some([("changes.csv".to_string(), k8s_openapi::ByteString(gz))].into()),
        ..Default::default()
    };
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    size
}

/// What the CSV part measured: Validate and Execute seconds, peak RSS in MiB.
struct CsvRun {
    db: &'static str,
    rows: usize,
    validate: f64,
    execute: f64,
    rss_mib: f64,
    configmaps: usize,
}

async fn csv_change(db: &'static str, rows: usize) -> CsvRun {
    use kube::api::{Patch, PatchParams};

    let env = Env::start(
        &format!("bench-csv-{db}"),
        LabSpec {
            db,
            users: rows,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let rss_at_rest = peak_rss_mib(env.operator.child.id());
    let load = api_load(&env);
    let start = Instant::now();
    let (ok, export, err) = env.cli(&[
        "export",
        "users",
        "--connection",
        &format!("{}/acme", env.ns),
    ]);
    assert!(ok, "{err}");
    let export_took = start.elapsed();
    // Every row: new policies; every 10th row also takes the primary number of the user on
    // the next row, whose own cell is left empty (unchanged): the number moves between them.
    let mut table: Vec<Vec<String>> = export
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    let mut moves = 0;
    for i in 1..table.len() {
        table[i][6] = "Anonymous".into();
        table[i][7] = "International".into();
        if i % 10 == 0 && i + 1 < table.len() && !table[i + 1][2].is_empty() {
            table[i][2] = std::mem::take(&mut table[i + 1][2]);
            moves += 1;
        }
    }
    let mut edited = String::with_capacity(export.len() + rows * 8);
    for cells in &table {
        edited.push_str(&cells.join(","));
        edited.push('\n');
    }
    drop(table);
    let gz_bytes = upload_csv(&env, "sheet", &edited).await;
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
    let (configmaps, configmap_kib) = results_configmaps(&env, &s.results_refs).await;
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'").await;
    println!(
        "\nCSV BulkUserChange, {rows} rows, {db} (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  export users (CLI, {} bytes)                 {:>8.2} s",
        export.len(),
        export_took.as_secs_f64()
    );
    println!(
        "  upload: gzip in binaryData                    {:>8} bytes (from {}); {moves} rows take a number",
        gz_bytes,
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
    println!("  results: {configmaps} ConfigMaps, {configmap_kib:.1} KiB in all");
    println!("  users with the new policy in SQL               {written:>8}");
    println!("  operator peak RSS before the change (VmHWM)    {rss_at_rest:>8.1} MiB");
    println!("  operator peak RSS after Validate (VmHWM)       {rss_validate:>8.1} MiB");
    println!("  operator peak RSS after Execute (VmHWM)        {rss:>8.1} MiB");
    print_api_load(load, api_load(&env));
    if db == "postgres" && env_usize("BENCH_USER_EXTRAS", 1) > 0 {
        csv_retry(&env, rows).await;
    }
    CsvRun {
        db,
        rows,
        validate: validate_took.as_secs_f64(),
        execute: execute_took.as_secs_f64(),
        rss_mib: rss,
        configmaps,
    }
}

/// On the CSV lab: another file (every row's voice route policy), validated, one user in a
/// hundred edited before it executes (Conflict), then retried: the retry's time and peak RSS
/// (it takes the lines the earlier run finished from its batches).
async fn csv_retry(env: &Env, rows: usize) {
    let (ok, export, err) = env.cli(&[
        "export",
        "users",
        "--connection",
        &format!("{}/acme", env.ns),
    ]);
    assert!(ok, "{err}");
    let mut lines = export.lines();
    let header = lines.next().unwrap().to_string();
    let column = header
        .split(',')
        .position(|c| c == "voiceRoutePolicy")
        .expect("the export has voiceRoutePolicy");
    let mut file = format!("{header}\n");
    for line in lines {
        let mut cells: Vec<&str> = line.split(',').collect();
        cells[column] = "Domestic";
        file.push_str(&cells.join(","));
        file.push('\n');
    }
    upload_csv(env, "sheet-again", &file).await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: sheet-again }
spec:
  connectionRef: { name: acme }
  source: { csv: { configMapKeyRef: { name: sheet-again, key: changes.csv } } }
  mode: Validate
"#,
    );
    env.wait_buc_for("sheet-again", &[Phase::Validated], Duration::from_secs(900))
        .await;
    conflict_then_retry(env, "sheet-again", "pbx.voice_route_policy", "Restricted").await;
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.voice_route_policy' AND value = 'Domestic'").await;
    println!("    users with the new policy in SQL           {written:>8} of {rows}");
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The lab's name of database `name` (`mysql` runs MariaDB).
fn database(name: &str) -> &'static str {
    match name {
        "postgres" => "postgres",
        "mysql" => "mysql",
        "sqlite" => "sqlite",
        other => panic!("unknown database {other}: postgres, mysql or sqlite"),
    }
}

/// The user and CSV figures of the whole run, one line each, beside the issue's targets.
fn print_summary(users: &[UserRun], csvs: &[CsvRun]) {
    if users.is_empty() && csvs.is_empty() {
        return;
    }
    println!(
        "\nSummary (targets: 100,000 users <= 30 s, write <= 2 x floor, RSS <= 64 MiB; 10,000 users <= 3 s; RSS at 100,000 within 10% of 10,000; <= 30 results ConfigMaps)"
    );
    if !users.is_empty() {
        println!(
            "  {:<9} {:>7} {:>8} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>5}",
            "database",
            "users",
            "floor s",
            "write s",
            "w/floor",
            "total s",
            "RSS MiB",
            "API req",
            "API KiB",
            "CMs"
        );
    }
    for r in users {
        println!(
            "  {:<9} {:>7} {:>8.2} {:>8.2} {:>7.2} {:>8.2} {:>8.1} {:>9} {:>9.1} {:>5}",
            r.db,
            r.users,
            r.floor,
            r.write,
            r.write / r.floor,
            r.took,
            r.rss_mib,
            r.requests,
            r.request_kib,
            r.configmaps
        );
    }
    for small in users {
        for large in users
            .iter()
            .filter(|l| l.db == small.db && l.users > small.users)
        {
            println!(
                "  {}: peak RSS at {} / at {}: {:.2} (target <= 1.10)",
                small.db,
                large.users,
                small.users,
                large.rss_mib / small.rss_mib
            );
        }
    }
    if !csvs.is_empty() {
        println!(
            "  CSV (targets at 100,000 rows: Validate <= 10 s, Execute <= 30 s, RSS <= 64 MiB)"
        );
        for c in csvs {
            println!(
                "  {:<9} {:>7} rows: Validate {:>6.2} s, Execute {:>6.2} s, peak RSS {:>5.1} MiB, {} results ConfigMaps",
                c.db, c.rows, c.validate, c.execute, c.rss_mib, c.configmaps
            );
        }
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // The operator as shipped, not the tests' small batches.
    support::Operator::use_default_batch_size();
    // Every database at every size (SQLite only up to 10,000: a file database a tenant of this
    // size would not run on); an empty list or a size of 0 skips a part.
    let mut user_runs = Vec::new();
    let sizes: Vec<usize> = env_list("BENCH_USER_SIZES", "10000,100000")
        .iter()
        .filter_map(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let extras = env_usize("BENCH_USER_EXTRAS", 1) > 0;
    for db in env_list("BENCH_DBS", "postgres,mysql,sqlite") {
        let db = database(&db);
        for &users in &sizes {
            if db == "sqlite" && users > 10_000 {
                continue;
            }
            // The Atomic and SIGKILL runs once, at the largest size on PostgreSQL.
            let with_extras = extras && db == "postgres" && users == largest;
            user_runs.push(bulk_user_change(db, users, with_extras).await);
        }
    }
    // The restart at two registrar sizes (its RPC bytes per confirmed phone must not grow with
    // the registrar), the larger one followed by a BulkPhoneChange of its phones.
    let silent = env_usize("BENCH_SILENT_PHONES", 10);
    let small = env_usize("BENCH_PHONES_SMALL", 200);
    if small > 0 {
        phone_restart(small, silent, 0, false).await;
    }
    let phones = env_usize("BENCH_PHONES", 2000);
    if phones > 0 {
        let change = env_usize("BENCH_PHONE_CHANGE", 1) > 0;
        phone_restart(phones, silent, env_usize("BENCH_LOOP_PHONES", 100), change).await;
    }
    let shared = env_usize("BENCH_SHARED_RATE_PHONES", 1000);
    if shared > 0 {
        shared_rate(shared, 200, 150).await;
    }
    let mut csv_runs = Vec::new();
    let csv_rows = env_usize("BENCH_CSV_ROWS", 100_000);
    if csv_rows > 0 {
        for db in env_list("BENCH_CSV_DBS", "postgres,mysql") {
            csv_runs.push(csv_change(database(&db), csv_rows).await);
        }
    }
    print_summary(&user_runs, &csv_runs);
}
