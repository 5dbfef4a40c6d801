//! Many tenants at once, printed (never asserted): 200 PbxConnections (one SQLite database, one
//! SIP domain each) with one 100-user BulkUserChange each, created in one `kubectl apply`; time
//! until every change Succeeded and the operator's peak RSS, beside the floor (one SQL UPDATE
//! writing the same values for every tenant).
//!
//! Run: `cargo bench --bench tenants` (BENCH_TENANTS, BENCH_TENANT_USERS override the sizes).

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kube::Api;
use pbx_operator::api::{BulkUserChange, PbxConnection, Phase};
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

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    support::Operator::use_default_batch_size();
    let tenants = env_usize("BENCH_TENANTS", 200);
    let users = env_usize("BENCH_TENANT_USERS", 100);
    let env = Env::start(
        "bench-tenants",
        LabSpec {
            users,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let from = env.lab.domain().to_string();
    let start = Instant::now();
    for i in 0..tenants {
        let domain = format!("t{i}.tenants.test");
        for q in [
            format!(
                "INSERT INTO subscriber (username, domain, password, ha1, ha1b) SELECT username, '{domain}', password, ha1, ha1b FROM subscriber WHERE domain = '{from}'"
            ),
            format!(
                "INSERT INTO usr_preferences (username, domain, attribute, type, value) SELECT username, '{domain}', attribute, type, value FROM usr_preferences WHERE domain = '{from}'"
            ),
            format!(
                "INSERT INTO grp (username, domain, grp) SELECT username, '{domain}', grp FROM grp WHERE domain = '{from}'"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(q))
                .execute(&env.pool)
                .await
                .unwrap();
        }
    }
    eprintln!(
        "seeded {tenants} tenants of {users} users in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // The floor: one statement writing every tenant's call groups.
    let start = Instant::now();
    let floor_rows = sqlx::query("UPDATE usr_preferences SET value = '9' WHERE attribute = 'pbx.call_group' AND domain LIKE '%.tenants.test'")
        .execute(&env.pool)
        .await
        .unwrap()
        .rows_affected();
    let floor = start.elapsed();

    let last = 200 + users - 1;
    let mut manifest = String::new();
    for i in 0..tenants {
        manifest.push_str(&format!(
            r#"---
apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: t{i} }}
spec:
  domain: t{i}.tenants.test
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }}, maxConnections: 2 }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: change-{i} }}
spec:
  connectionRef: {{ name: t{i} }}
  targets: {{ groups: [sales, support, engineering] }}
  fields:
    callGroup: {{ value: "31", lock: Open }}
"#
        ));
    }
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    env.apply(&manifest);
    let applied = start.elapsed();
    let list = support::eventually(Duration::from_secs(1800), "every change to finish", || {
        let api = api.clone();
        async move {
            let list = api.list(&Default::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|b| {
                    b.status.as_ref().is_some_and(|s| {
                        matches!(
                            s.phase,
                            Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
                        )
                    })
                })
                .count();
            (done == tenants).then_some(list)
        }
    })
    .await;
    let took = start.elapsed();
    let rss = peak_rss_mib(env.operator.child.id());
    let succeeded = list
        .items
        .iter()
        .filter(|b| {
            b.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Succeeded)
        })
        .count();
    let changed: u32 = list
        .items
        .iter()
        .filter_map(|b| Some(b.status.as_ref()?.summary.as_ref()?.changed))
        .sum();
    let conns: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    let ready = conns
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count();
    let written = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '31' AND domain LIKE '%.tenants.test'").await;
    println!(
        "\n{tenants} tenants x one {users}-user BulkUserChange (users 200..={last}), SQLite, one operator, --concurrency 4 (debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "  floor: one SQL UPDATE of {floor_rows} rows                 {:>8.2} s",
        floor.as_secs_f64()
    );
    println!(
        "  kubectl apply of {tenants} connections + {tenants} changes  {:>8.2} s",
        applied.as_secs_f64()
    );
    println!(
        "  operator: apply -> all finished ({succeeded} Succeeded)   {:>8.2} s",
        took.as_secs_f64()
    );
    println!(
        "  per change                                      {:>8.3} s",
        took.as_secs_f64() / tenants as f64
    );
    println!("  users changed (status) / with the value in SQL  {changed:>8} / {written}");
    println!("  connections Ready                               {ready:>8}");
    println!("  operator peak RSS (VmHWM)                       {rss:>8.1} MiB");
}
