//! Many changes, many tenants: overlapping changes run in creation order, a connection's
//! lifecycle (deleted: pools closed, operations wait; recreated: they resume), and shards.
//! The real control plane, operator processes and Kamailio labs.

mod support;

use std::time::Duration;

use kube::Api;
use pbx_operator::api::{BulkUserChange, Outcome, PbxConnection, Phase};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{control_plane, eventually, kubectl_stdin};

fn exts(range: std::ops::RangeInclusive<u32>) -> String {
    range
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn change(name: &str, targets: std::ops::RangeInclusive<u32>, field: &str, value: &str) -> String {
    format!(
        r#"---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  fields:
    {field}: {{ value: "{value}", lock: Open }}
"#,
        exts(targets)
    )
}

/// Events of one object: (reason, note).
fn events_of(env: &Env, name: &str) -> Vec<(String, String)> {
    let out = support::kubectl(
        &control_plane().admin_kubeconfig,
        &[
            "get",
            "events",
            "-n",
            &env.ns,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}{\"\\t\"}{.message}{\"\\n\"}{end}",
        ],
    );
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(r, n)| (r.to_string(), n.to_string()))
        .collect()
}

fn time(b: &BulkUserChange, start: bool) -> jiff::Timestamp {
    let s = b.status.as_ref().unwrap();
    let t = if start {
        &s.start_time
    } else {
        &s.completion_time
    };
    t.as_ref().unwrap().0
}

/// Three changes with overlapping targets in one `kubectl apply`: they run one after another
/// in creation order (the later ones wait, phase Pending, naming the earlier one), none of
/// their targets conflicts, and the database ends with the last one's values; a fourth on
/// other users runs beside them.
#[tokio::test]
async fn overlapping_changes_run_in_creation_order() {
    let env = Env::start(
        "order",
        LabSpec {
            users: 400,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // Users 200..=599. One apply; names sort in the order of the file (one second of creation).
    let manifest = [
        change("order-1", 200..=499, "callGroup", "61"),
        change("order-2", 400..=559, "callGroup", "62"),
        change("order-3", 450..=579, "callGroup", "63"),
        change("order-4-solo", 590..=599, "pickupGroup", "60"),
    ]
    .concat();
    env.apply(&manifest);
    let done = [Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed];
    let mut finished = Vec::new();
    for name in ["order-1", "order-2", "order-3", "order-4-solo"] {
        finished.push(
            env.wait_buc_for(name, &done, Duration::from_secs(180))
                .await,
        );
    }
    for b in &finished {
        let s = b.status.as_ref().unwrap();
        let summary = s.summary.clone().unwrap();
        assert_eq!(
            s.phase,
            Phase::Succeeded,
            "{}: {summary:?} {:?}",
            b.metadata.name.as_deref().unwrap(),
            s.results
        );
        assert_eq!(summary.conflicts, 0, "{summary:?}");
        assert_eq!(summary.failed, 0, "{summary:?}");
        assert!(
            s.results
                .iter()
                .all(|r| !matches!(r.outcome, Outcome::Conflict | Outcome::Failed)),
            "{:?}",
            s.results
        );
    }
    let [one, two, three, solo] = &finished[..] else {
        unreachable!()
    };
    // Every target changed once by its change: nothing was already at the value.
    assert_eq!(
        one.status
            .as_ref()
            .unwrap()
            .summary
            .as_ref()
            .unwrap()
            .changed,
        300
    );
    assert_eq!(
        two.status
            .as_ref()
            .unwrap()
            .summary
            .as_ref()
            .unwrap()
            .changed,
        160
    );
    assert_eq!(
        three
            .status
            .as_ref()
            .unwrap()
            .summary
            .as_ref()
            .unwrap()
            .changed,
        130
    );
    // One after another, in creation order.
    assert!(
        time(two, true) >= time(one, false),
        "order-2 started before order-1 finished"
    );
    assert!(
        time(three, true) >= time(two, false),
        "order-3 started before order-2 finished"
    );
    // Each later one waited, and said for whom and how many targets they share.
    let waited = |name: &str, earlier: &str| {
        let evs = events_of(&env, name);
        assert!(
            evs.iter()
                .any(|(r, n)| r == "Waiting" && n.contains(earlier)),
            "{name} has no Waiting event naming {earlier}: {evs:?}"
        );
    };
    waited("order-2", "BulkUserChange order-1");
    let evs3 = events_of(&env, "order-3");
    assert!(
        evs3.iter().any(|(r, n)| r == "Waiting"
            && (n.contains("BulkUserChange order-1") || n.contains("BulkUserChange order-2"))),
        "{evs3:?}"
    );
    // A wait on a planned earlier change counts what they share (order-1 and order-2 share
    // 400..=499, order-1 and order-3 450..=499, order-2 and order-3 450..=559).
    for (name, evs) in [("order-2", events_of(&env, "order-2")), ("order-3", evs3)] {
        for (_, note) in evs
            .iter()
            .filter(|(r, n)| r == "Waiting" && n.contains("share"))
        {
            let want = match (name, note.contains("order-1")) {
                ("order-2", true) => "share 100 targets",
                ("order-3", true) => "share 50 targets",
                _ => "share 110 targets",
            };
            assert!(note.contains(want), "{name}: {note}");
        }
    }
    // The fourth shares nothing: it never waited for an overlap (at most until the earlier
    // changes were planned, to know that), and ran while the others waited.
    let solo_events = events_of(&env, "order-4-solo");
    assert!(
        !solo_events
            .iter()
            .any(|(r, n)| r == "Waiting" && (n.contains("share") || n.contains("limit"))),
        "{solo_events:?}"
    );
    assert!(time(solo, true) <= time(three, true));
    // The last one's values where they overlap; each one's own elsewhere.
    for (ext, want) in [
        (200, "61"),
        (499, "63"),
        (420, "62"),
        (450, "63"),
        (559, "63"),
        (579, "63"),
        (595, "60"),
    ] {
        let attr = if ext >= 590 {
            "pbx.pickup_group"
        } else {
            "pbx.call_group"
        };
        assert_eq!(
            env.attribute(&ext.to_string(), attr).await.as_deref(),
            Some(want),
            "user {ext}"
        );
    }
}

/// The PbxConnection `acme` of `env`, as the harness creates it.
fn connection_manifest(env: &Env) -> String {
    format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: acme, namespace: {ns} }}
spec:
  domain: {domain}
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
"#,
        ns = env.ns,
        domain = env.lab.domain()
    )
}

/// Probes the operator made so far (its metrics).
fn probes(env: &Env) -> u64 {
    let (_, body) = env.operator.http_get("/metrics");
    // Every connection's probes (the series carry a connection label).
    body.lines()
        .filter(|l| {
            l.starts_with("pbx_operator_pbx_call_duration_seconds_count{")
                && l.contains(r#"call="probe""#)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

/// Open file descriptors of process `pid` on files under `dir` (a SQLite database's pool).
fn open_files_under(pid: u32, dir: &std::path::Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(dir))
        .count()
}

/// Deleting a PbxConnection closes its database pool; an operation on it then waits with a
/// condition naming it, and runs once the connection is created again.
#[tokio::test]
async fn a_deleted_connection_closes_its_pool_and_its_operations_wait_for_it() {
    let env = Env::start(
        "tenant-life",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    assert_eq!(env.lab.get("LAB_DB"), "sqlite");
    let pid = env.operator.child.id();
    env.apply(&change("first", 200..=203, "callGroup", "5"));
    env.wait_buc("first", &[Phase::Succeeded]).await;
    assert!(
        open_files_under(pid, &env.lab.dir) > 0,
        "the operator holds the lab's database open while the connection exists"
    );

    // Probes every second while the connection exists ...
    let cp = control_plane();
    support::kubectl(
        &cp.admin_kubeconfig,
        &[
            "patch",
            "pbxconnection",
            "acme",
            "-n",
            &env.ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"probeInterval":"1s"}}"#,
        ],
    );
    let before = probes(&env);
    eventually(Duration::from_secs(30), "probes every second", || async {
        (probes(&env) >= before + 2).then_some(())
    })
    .await;
    support::kubectl(
        &cp.admin_kubeconfig,
        &["delete", "pbxconnection", "acme", "-n", &env.ns, "--wait"],
    );
    eventually(
        Duration::from_secs(30),
        "the operator to close the deleted connection's database pool",
        || async { (open_files_under(pid, &env.lab.dir) == 0).then_some(()) },
    )
    .await;
    assert!(
        env.operator
            .log_text()
            .contains("PbxConnection gone: closed its database pool"),
        "the operator says it closed the pool"
    );
    // ... and none once it is gone.
    let after_delete = probes(&env);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        probes(&env),
        after_delete,
        "a deleted connection is still probed"
    );

    env.apply(&change("second", 204..=206, "callGroup", "6"));
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let waiting = eventually(
        Duration::from_secs(60),
        "second to wait for its missing connection",
        || async {
            let b = api.get("second").await.ok()?;
            let s = b.status?;
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
            (s.phase == Phase::Pending && ready.reason == "ConnectionNotFound").then_some(ready)
        },
    )
    .await;
    assert!(
        waiting.message.contains("PbxConnection") && waiting.message.contains("acme"),
        "{}",
        waiting.message
    );
    // Still nothing written while it waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        env.attribute("204", "pbx.call_group").await.as_deref(),
        Some("6")
    );
    assert_eq!(open_files_under(pid, &env.lab.dir), 0, "no pool reopened");

    kubectl_stdin(
        &cp.admin_kubeconfig,
        &["apply", "-f", "-"],
        connection_manifest(&env).as_bytes(),
    );
    // Woken by the connection coming back, well before its backoff would retry it.
    let b = env.wait_buc("second", &[Phase::Succeeded]).await;
    assert_eq!(b.status.unwrap().summary.unwrap().changed, 3);
    assert_eq!(
        env.attribute("204", "pbx.call_group").await.as_deref(),
        Some("6")
    );
    let conns: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(conns.get("acme").await.is_ok());
}

/// Copies the lab's users (subscriber, preferences, groups) into another SIP domain of the same
/// database: one more tenant.
async fn clone_tenant(env: &Env, domain: &str) {
    let from = env.lab.domain();
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

fn tenant(ns: &str, i: usize, shard: &str) -> String {
    format!(
        r#"---
apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata:
  name: t{i}
  namespace: {ns}
  labels: {{ pbx-operator.io/shard: {shard} }}
spec:
  domain: t{i}.tenants.test
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
"#
    )
}

fn tenant_change(name: &str, conn: &str, value: &str) -> String {
    change(name, 200..=204, "callGroup", value).replace("name: acme", &format!("name: {conn}"))
}

/// A log without its terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Which operator instances published the Events of an object.
fn reporters(env: &Env, name: &str) -> std::collections::BTreeSet<String> {
    support::kubectl(
        &control_plane().admin_kubeconfig,
        &[
            "get",
            "events",
            "-n",
            &env.ns,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reportingInstance}{\"\\n\"}{end}",
        ],
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(str::to_string)
    .collect()
}

/// Two shards over 10 tenants: every operation is handled by exactly the process of its
/// connection's shard; SIGKILLing one shard's process leaves the other shard working, and the
/// standby of the killed shard takes over through that shard's Lease.
#[tokio::test]
async fn shards_split_tenants_between_processes_with_a_lease_each() {
    let env = Env::start(
        "shards",
        LabSpec {
            users: 6,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let cp = control_plane();
    let ns = env.ns.clone();
    let start = |shard: &str, id: &str| {
        support::Operator::start_with_env(
            &cp.admin_kubeconfig,
            &["--namespace", &ns, "--shard", shard, "--leader-election"],
            &[("POD_NAME", id), ("POD_NAMESPACE", &ns)],
        )
    };
    let mut a = start("a", "op-a");
    let b = start("b", "op-b");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &ns);
    let holder = |name: &'static str| {
        let leases = leases.clone();
        async move { leases.get(name).await.ok()?.spec?.holder_identity }
    };
    eventually(Duration::from_secs(60), "op-a to lead shard a", || async {
        (holder("pbx-operator-shard-a").await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    eventually(Duration::from_secs(60), "op-b to lead shard b", || async {
        (holder("pbx-operator-shard-b").await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    let standby = start("a", "op-a2");

    let shard_of = |i: usize| if i < 5 { "a" } else { "b" };
    let mut manifest = String::new();
    for i in 0..10 {
        clone_tenant(&env, &format!("t{i}.tenants.test")).await;
        manifest.push_str(&tenant(&ns, i, shard_of(i)));
    }
    for i in 0..10 {
        manifest.push_str(&tenant_change(
            &format!("first-{i}"),
            &format!("t{i}"),
            "21",
        ));
    }
    env.apply(&manifest);
    let mut finished = Vec::new();
    for i in 0..10 {
        let b = env
            .wait_buc_for(
                &format!("first-{i}"),
                &[Phase::Succeeded],
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(
            b.status.as_ref().unwrap().summary.as_ref().unwrap().changed,
            5
        );
        finished.push(b);
    }
    for i in 0..10 {
        let want = if i < 5 { "op-a" } else { "op-b" };
        assert_eq!(
            reporters(&env, &format!("first-{i}")),
            [want.to_string()].into(),
            "first-{i} on shard {}",
            shard_of(i)
        );
        // The other shard's process never reconciled it (it only noted whose it is), nor did
        // the unsharded one.
        let (other, other_name) = if i < 5 { (&b, "op-b") } else { (&a, "op-a") };
        let span = format!("reconcile{{change=first-{i} ");
        assert!(
            !plain(&other.log_text()).contains(&span),
            "{other_name} worked on first-{i}"
        );
        assert!(
            !plain(&env.operator.log_text()).contains(&span),
            "the unsharded operator worked on first-{i}"
        );
    }
    // Each tenant's own domain was changed; the lab's own (unlabelled acme) was not.
    let q = "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '21' AND domain LIKE '%.tenants.test'";
    assert_eq!(env.sql_one(q).await, "50");

    // Shard a's leader dies: shard b goes on at once; a's standby takes a's Lease and its work.
    a.stop_with("KILL", Duration::from_secs(10));
    env.apply(&(tenant_change("second-0", "t0", "22") + &tenant_change("second-5", "t5", "22")));
    let five = env.wait_buc("second-5", &[Phase::Succeeded]).await;
    assert_eq!(reporters(&env, "second-5"), ["op-b".to_string()].into());
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &ns);
    let zero = api.get("second-0").await.unwrap();
    let zero_ran_first = zero
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Succeeded);
    let b_done = five
        .status
        .as_ref()
        .unwrap()
        .completion_time
        .clone()
        .unwrap()
        .0;
    eventually(
        Duration::from_secs(60),
        "op-a2 to take shard a's Lease",
        || async {
            (holder("pbx-operator-shard-a").await.as_deref() == Some("op-a2")).then_some(())
        },
    )
    .await;
    let zero = env.wait_buc("second-0", &[Phase::Succeeded]).await;
    assert_eq!(reporters(&env, "second-0"), ["op-a2".to_string()].into());
    assert!(
        !zero_ran_first && zero.status.unwrap().start_time.unwrap().0 >= b_done,
        "shard b finished its change while shard a had no leader"
    );
    // Shard b's finished work was left alone: nothing ran again.
    for (i, before) in finished.iter().enumerate().skip(5) {
        let now = api.get(&format!("first-{i}")).await.unwrap();
        assert_eq!(now.status, before.status, "first-{i} moved");
    }
    assert_eq!(
        holder("pbx-operator-shard-b").await.as_deref(),
        Some("op-b")
    );
    drop(standby);
}

/// Counts every write to usr_preferences (where call groups live) from now on.
async fn count_writes(env: &Env) {
    for q in [
        "CREATE TABLE pref_writes (username TEXT)",
        "CREATE TRIGGER pref_writes_u AFTER UPDATE ON usr_preferences BEGIN INSERT INTO pref_writes VALUES (NEW.username); END",
        "CREATE TRIGGER pref_writes_i AFTER INSERT ON usr_preferences BEGIN INSERT INTO pref_writes VALUES (NEW.username); END",
        "CREATE TRIGGER pref_writes_d AFTER DELETE ON usr_preferences BEGIN INSERT INTO pref_writes VALUES (OLD.username); END",
    ] {
        sqlx::query(q).execute(&env.pool).await.unwrap();
    }
}

/// Two Enforce changes setting the same field of the same users to different values: the later
/// one is refused (Stalled, naming both and the contested users) and writes nothing; the earlier
/// one keeps its state without a single write over a minute of 3-second drift checks.
#[tokio::test]
async fn contradicting_enforce_changes_refuse_the_later_and_never_flap() {
    let env = Env::start(
        "contradiction",
        LabSpec {
            users: 12,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    assert_eq!(env.lab.get("LAB_DB"), "sqlite");
    count_writes(&env).await;
    let enforce = |name: &str, targets, value| {
        change(name, targets, "callGroup", value) + "  policy: Enforce\n  interval: 3s\n"
    };
    env.apply(&(enforce("keep-a", 200..=205, "41") + &enforce("keep-b", 203..=208, "42")));
    let a = env.wait_buc("keep-a", &[Phase::Succeeded]).await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let refused = eventually(Duration::from_secs(60), "keep-b to be refused", || async {
        let b = api.get("keep-b").await.ok()?;
        let s = b.status?;
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled" && c.status == "True")?
            .clone();
        (c.reason == "ContradictsEarlierChange").then_some((s.phase, c.message))
    })
    .await;
    assert_eq!(refused.0, Phase::Failed);
    let message = refused.1;
    assert!(
        message.contains("BulkUserChange keep-a")
            && message.contains("BulkUserChange keep-b")
            && message.contains("callGroup")
            && message.contains("3 targets (203, 204, 205)"),
        "{message}"
    );
    assert_eq!(
        a.status.as_ref().unwrap().summary.as_ref().unwrap().changed,
        6
    );
    let writes_after_a = env.sql_one("SELECT COUNT(*) FROM pref_writes").await;
    assert_ne!(writes_after_a, "0");
    assert_eq!(
        env.sql_one("SELECT COUNT(DISTINCT username) FROM pref_writes")
            .await,
        "6",
        "keep-a wrote its 6 users"
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pref_writes WHERE username IN ('206', '207', '208')")
            .await,
        "0",
        "keep-b wrote nothing"
    );
    let checked_before = a.status.as_ref().unwrap().last_checked_time.clone();

    // A minute of drift checks every 3 s: nothing is written, nobody flips.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pref_writes").await,
        writes_after_a,
        "a write after the first run: the changes flap"
    );
    let a = api.get("keep-a").await.unwrap();
    let s = a.status.as_ref().unwrap();
    assert_eq!(s.phase, Phase::Succeeded);
    assert_eq!(
        s.corrections.unwrap_or(0),
        0,
        "keep-a found no drift to correct"
    );
    assert!(
        s.last_checked_time > checked_before,
        "keep-a's drift checks ran: {:?} then {:?}",
        checked_before,
        s.last_checked_time
    );
    let b = api.get("keep-b").await.unwrap();
    assert_eq!(b.status.as_ref().unwrap().phase, Phase::Failed);
    for ext in 200..=205 {
        assert_eq!(
            env.attribute(&ext.to_string(), "pbx.call_group")
                .await
                .as_deref(),
            Some("41")
        );
    }
    for ext in 206..=208 {
        assert_ne!(
            env.attribute(&ext.to_string(), "pbx.call_group")
                .await
                .as_deref(),
            Some("42"),
            "keep-b changed nothing"
        );
    }
}

/// A 20,000-user change of three fields runs to the end with the operator held to
/// `MEMORY_LIMIT_MIB` (default 64 MiB, the memory the chart requests) by a memory cgroup, as a
/// container limit holds it: the same process finishes, never OOM-killed. At the operator's own
/// batch size (4,000), not the tests' smaller one.
#[tokio::test]
async fn a_large_change_finishes_within_a_memory_limit() {
    const USERS: usize = 20_000;
    let limit_mib: u64 = std::env::var("MEMORY_LIMIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut env = Env::start(
        "memory-limit",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let limit = support::memory::MemoryLimit::new(limit_mib);
    env.kill_operator();
    env.operator = support::Operator::start_limited(
        &control_plane().admin_kubeconfig,
        &["--namespace", &env.ns, "--batch-size", "4000"],
        &limit,
    );
    let pid = env.operator.child.id();
    eventually(
        Duration::from_secs(10),
        "the operator in its cgroup",
        || async { limit.members().contains(&pid).then_some(()) },
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "7", lock: Open }
    pickupGroup: { value: "7", lock: Open }
    voiceRoutePolicy: { value: Restricted, lock: Open }
"#,
    );
    // An OOM kill ends the wait at once: a restarted operator would finish the change anyway.
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let b = eventually(Duration::from_secs(600), "the change to finish", || async {
        assert_eq!(
            limit.oom_kills(),
            0,
            "the operator was OOM-killed under {limit_mib} MiB; log:\n{}",
            env.operator.log_text()
        );
        let b = api.get("everyone").await.ok()?;
        matches!(
            b.status.as_ref()?.phase,
            Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
        )
        .then_some(b)
    })
    .await;
    eprintln!(
        "{USERS} users under {limit_mib} MiB: peak {:.1} MiB charged to the cgroup, {} OOM kills",
        limit.peak_mib(),
        limit.oom_kills()
    );
    assert_eq!(limit.oom_kills(), 0, "the operator was OOM-killed");
    assert!(
        env.operator.child.try_wait().unwrap().is_none() && limit.members().contains(&pid),
        "the limited operator must still be running; log:\n{}",
        env.operator.log_text()
    );
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results.first());
    let summary = s.summary.unwrap();
    assert_eq!(
        (summary.targets as usize, summary.changed as usize),
        (USERS, USERS)
    );
    let written = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '7'")
        .await;
    assert_eq!(written, USERS.to_string());
}
