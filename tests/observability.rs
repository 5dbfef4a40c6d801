//! The chart's Grafana dashboard and PrometheusRule against the real operator's /metrics: the
//! operator is exercised (a change, a restart with a phone that never answers, Enforce drift
//! repairs, a stalled change, a connection that is not Ready, a replica that does not lead),
//! then every dashboard query's metrics must be in what it serves, every alert rule passes
//! `promtool check rules`, and each alert fires once in `promtool test rules` on series made of
//! the values scraped from it.

#[path = "support/helm.rs"]
mod helm;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::Api;
use pbx_operator::api::{BulkUserChange, Phase};
use serde_json::Value;
use support::lab::LabSpec;
use support::pbx::Env;
use support::{Operator, control_plane, eventually, free_port};

fn dashboard() -> Value {
    let path = support::repo_root().join("charts/pbx-operator/dashboards/pbx-operator.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every panel's (title, PromQL expressions).
fn panel_queries(d: &Value) -> Vec<(String, Vec<String>)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let exprs = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
                .collect();
            (p["title"].as_str().unwrap().to_string(), exprs)
        })
        .collect()
}

/// The metric names a PromQL expression reads: identifiers that are not functions, keywords,
/// label names (inside braces or by/on lists) or label values.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const WORDS: &[&str] = &[
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "by",
        "on",
        "and",
        "or",
        "unless",
        "without",
        "rate",
        "increase",
        "irate",
        "histogram_quantile",
        "absent",
        "group_left",
        "group_right",
        "ignoring",
        "bool",
        "offset",
        "topk",
        "bottomk",
        "clamp_min",
        "clamp_max",
        "time",
    ];
    let mut out = BTreeSet::new();
    let mut depth_brace = 0;
    let mut in_string = false;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut after_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            if c == '"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => {
                // a range like [5m]
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let rest: String = chars[i..].iter().collect();
                let grouping = matches!(
                    word.as_str(),
                    "by" | "on" | "without" | "ignoring" | "group_left" | "group_right"
                );
                if depth_brace == 0 && !after_grouping && !WORDS.contains(&word.as_str()) {
                    out.insert(word.clone());
                }
                if grouping {
                    after_grouping = true;
                } else if after_grouping && rest.trim_start().starts_with(')') {
                    after_grouping = false;
                }
                continue;
            }
            ')' => after_grouping = false,
            _ => {}
        }
        i += 1;
    }
    out
}

#[test]
fn promql_metric_names_are_found() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (connection, call, le) (rate(pbx_operator_pbx_call_duration_seconds_bucket[5m])))"#
        ),
        BTreeSet::from(["pbx_operator_pbx_call_duration_seconds_bucket".to_string()])
    );
    assert_eq!(
        metric_names(r#"process_resident_memory_bytes and on (instance, job) pbx_operator_leader"#),
        BTreeSet::from([
            "process_resident_memory_bytes".to_string(),
            "pbx_operator_leader".to_string()
        ])
    );
    assert_eq!(
        metric_names(
            r#"sum by (kind) (rate(pbx_operator_targets_total{outcome="Changed",kind=~"a|b"}[5m]))"#
        ),
        BTreeSet::from(["pbx_operator_targets_total".to_string()])
    );
}

/// Samples of a Prometheus text exposition: series (`name{labels}`) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample_names(text: &str) -> BTreeSet<String> {
    samples(text)
        .keys()
        .map(|s| s.split('{').next().unwrap().to_string())
        .collect()
}

/// The value of the one series of `name` whose labels include all of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches several series");
    found.first().copied()
}

fn scrape(op: &Operator) -> String {
    let (code, body) = op.http_get("/metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body
}

/// The chart's PrometheusRule, rendered with its defaults, as a Prometheus rules file.
fn rules_file(dir: &std::path::Path) -> std::path::PathBuf {
    let chart = support::repo_root().join("charts/pbx-operator");
    let out = helm::run(&[
        "template",
        "pbx-operator",
        chart.to_str().unwrap(),
        "--set",
        "prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheus-rule.yaml",
    ]);
    let rule: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    let path = dir.join("rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    path
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (Debian package prometheus; tests/install-deps.sh)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A promtool series line: `name{labels}` and its values, one a minute.
fn series(name: &str, labels: &[(&str, &str)], values: &[f64]) -> serde_json::Value {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    serde_json::json!({
        "series": format!("{name}{{{}}}", labels.join(",")),
        "values": values.join(" "),
    })
}

async fn phase(env: &Env, name: &str) -> Option<Phase> {
    Api::<BulkUserChange>::namespaced(env.client.clone(), &env.ns)
        .get(name)
        .await
        .ok()
        .and_then(|b| Some(b.status?.phase))
}

async fn corrections(env: &Env, name: &str) -> u64 {
    Api::<BulkUserChange>::namespaced(env.client.clone(), &env.ns)
        .get(name)
        .await
        .ok()
        .and_then(|b| b.status?.corrections)
        .unwrap_or(0)
}

#[tokio::test]
async fn dashboard_queries_and_alerts_work_on_the_operators_real_metrics() {
    let env = Env::start(
        "obs",
        LabSpec {
            users: 10,
            phones: 2,
            silent: 1,
            ..Default::default()
        },
        false,
    )
    .await;
    let ns = env.ns.clone();
    let before = scrape(&env.operator);

    // A connection whose RPC is unreachable: never Ready, its probe errors counted.
    let closed = free_port();
    env.apply(&format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{ name: broken-pbx }}
stringData:
  database-url: "{db}"
  rpc-url: "http://127.0.0.1:{closed}/RPC"
---
apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: broken }}
spec:
  domain: {domain}
  database: {{ urlSecretRef: {{ name: broken-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: broken-pbx, key: rpc-url }} }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: vm-pins }}
stringData: {{ pin: "4321" }}
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: pins }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: ["204"] }}
  fields:
    voicemailPin: {{ valueFrom: {{ secretKeyRef: {{ name: vm-pins, key: pin }} }}, lock: Open }}
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: enforced }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: ["205", "206"] }}
  fields:
    callGroup: {{ value: "7", lock: Open }}
  policy: Enforce
  interval: 2s
---
apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: everyone }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales, support, engineering] }}
  rollout: {{ maxInFlight: 4, perSecond: 20 }}
  confirm: {{ timeout: 8s }}
"#,
        db = env.lab.db_url(),
        domain = env.lab.domain(),
    ));
    env.wait_buc("enforced", &[Phase::Succeeded]).await;
    // Drift, three times: someone sets the call group back in the PBX; Enforce repairs it.
    let mut drift = vec![scrape(&env.operator)];
    for round in 1..=3u64 {
        env.set_attribute("205", "pbx.call_group", "1").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Corrected: counted, run finished and the value back (only then drift again, or the
        // correction under way would absorb the next drift).
        while corrections(&env, "enforced").await < round
            || env.attribute("205", "pbx.call_group").await.as_deref() != Some("7")
            || phase(&env, "enforced").await != Some(Phase::Succeeded)
        {
            if std::time::Instant::now() > deadline {
                let b = Api::<BulkUserChange>::namespaced(env.client.clone(), &ns)
                    .get("enforced")
                    .await
                    .unwrap();
                panic!(
                    "no drift correction {round} within 30s: 205 has call group {:?}\n{}\n{}",
                    env.attribute("205", "pbx.call_group").await,
                    serde_yaml::to_string(&b.status).unwrap(),
                    env.events()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drift.push(scrape(&env.operator));
    }
    // The load on the API server is counted at the client: status patches and results
    // ConfigMaps written by these runs show as PATCH requests and their bytes.
    let patches = |text: &str, name: &str| value(text, name, &[("verb", "PATCH")]).unwrap_or(0.0);
    let last = drift.last().unwrap();
    for name in [
        "pbx_operator_api_requests_total",
        "pbx_operator_api_request_bytes_total",
    ] {
        assert!(
            patches(last, name) > patches(&drift[0], name),
            "{name} grows with the drift repairs: {} -> {}",
            patches(&drift[0], name),
            patches(last, name)
        );
    }
    assert!(
        value(last, "pbx_operator_api_requests_total", &[("verb", "GET")]).unwrap_or(0.0) > 0.0,
        "reads are counted too"
    );
    let restart = eventually(Duration::from_secs(90), "the restart to finish", || async {
        let p = Api::<pbx_operator::api::PhoneRestart>::namespaced(env.client.clone(), &ns)
            .get("everyone")
            .await
            .ok()?;
        let phase = p.status?.phase;
        (phase == Phase::PartiallyFailed || phase == Phase::Succeeded).then_some(phase)
    })
    .await;
    assert_eq!(restart, Phase::PartiallyFailed, "the silent phone fails");
    // A second replica that never leads: the Lease is held by someone else.
    let renew = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        .to_string();
    env.apply(&format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{ name: pbx-operator }}\nspec: {{ holderIdentity: someone-else, leaseDurationSeconds: 3600, acquireTime: \"{renew}\", renewTime: \"{renew}\" }}\n"
    ));
    let standby = Operator::start_with_env(
        &control_plane().admin_kubeconfig,
        &["--namespace", &ns, "--leader-election"],
        &[("POD_NAMESPACE", &ns), ("POD_NAME", "standby")],
    );
    let mut after = String::new();
    eventually(Duration::from_secs(30), "every series to be there", || {
        after = scrape(&env.operator);
        let ready = value(
            &after,
            "pbx_operator_connection_ready",
            &[("name", "broken")],
        ) == Some(0.0);
        let stalled = value(
            &after,
            "pbx_operator_operation_stalled",
            &[("name", "pins")],
        ) == Some(1.0);
        let errors = after.contains("pbx_operator_pbx_call_errors_total{");
        async move { (ready && stalled && errors).then_some(()) }
    })
    .await;
    let standby_metrics = eventually(Duration::from_secs(30), "the standby's metrics", || async {
        let (code, body) = standby.http_get("/metrics");
        (code == 200).then_some(body)
    })
    .await;
    let not_leading = value(&standby_metrics, "pbx_operator_leader", &[]).unwrap();
    assert_eq!(not_leading, 0.0, "the standby does not lead");
    assert_eq!(value(&after, "pbx_operator_leader", &[]), Some(1.0));

    // 1. Every dashboard query reads metrics the operator serves, with samples.
    let served = sample_names(&after);
    let d = dashboard();
    let mut checked = 0;
    for (title, exprs) in panel_queries(&d) {
        for e in exprs {
            let names = metric_names(&e);
            assert!(!names.is_empty(), "{title}: no metric in {e}");
            for n in names {
                assert!(
                    served.contains(&n),
                    "panel {title:?} reads {n}, which /metrics does not serve:\n{after}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked}");
    let by_phase = value(
        &after,
        "pbx_operator_operations",
        &[("kind", "BulkUserChange"), ("phase", "Succeeded")],
    );
    assert_eq!(by_phase, Some(1.0), "enforced is Succeeded");
    let conn = format!("{ns}/broken");
    assert!(
        after.contains(&format!("pbx_operator_pbx_call_errors_total{{backend=\"kamailio\",call=\"probe\",reason=\"RpcUnreachable\",connection=\"{conn}\"}}")),
        "errors by connection:\n{after}"
    );

    // 2. promtool check rules on the chart's PrometheusRule.
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(dir.path());
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(ok && out.contains("SUCCESS: 5 rules found"), "{out}");

    // 3. Each alert fires once on series made of the scraped values (one sample a minute).
    let v =
        |text: &str, name: &str, labels: &[(&str, &str)]| value(text, name, labels).unwrap_or(0.0);
    let ready = v(
        &after,
        "pbx_operator_connection_ready",
        &[("name", "broken")],
    );
    let stalled = v(
        &after,
        "pbx_operator_operation_stalled",
        &[("name", "pins")],
    );
    let mut input = vec![
        series(
            "pbx_operator_connection_ready",
            &[("namespace", &ns), ("name", "broken")],
            &[ready; 12],
        ),
        series(
            "pbx_operator_connection_ready",
            &[("namespace", &ns), ("name", "acme")],
            &[v(&after, "pbx_operator_connection_ready", &[("name", "acme")]); 12],
        ),
        series(
            "pbx_operator_operation_stalled",
            &[
                ("kind", "BulkUserChange"),
                ("namespace", &ns),
                ("name", "pins"),
                ("reason", "SecretNotUsable"),
            ],
            &[stalled; 12],
        ),
        series(
            "pbx_operator_leader",
            &[("instance", "standby")],
            &[not_leading; 12],
        ),
    ];
    // NOTIFY answers: the counts before the restart for 3 minutes, then after it.
    let codes: BTreeSet<String> = samples(&after)
        .keys()
        .filter(|s| s.starts_with("pbx_operator_notify_answers_total{"))
        .map(|s| {
            s.split("code=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(codes.contains("200") && codes.contains("408"), "{codes:?}");
    for code in &codes {
        let b = v(
            &before,
            "pbx_operator_notify_answers_total",
            &[("code", code)],
        );
        let a = v(
            &after,
            "pbx_operator_notify_answers_total",
            &[("code", code)],
        );
        let values: Vec<f64> = (0..14).map(|m| if m < 3 { b } else { a }).collect();
        input.push(series(
            "pbx_operator_notify_answers_total",
            &[("code", code)],
            &values,
        ));
    }
    // Drift corrections of `enforced` after each of its repairs, a minute apart.
    let labels = [
        ("kind", "BulkUserChange"),
        ("namespace", ns.as_str()),
        ("name", "enforced"),
    ];
    let mut counts: Vec<f64> = drift
        .iter()
        .map(|t| {
            v(
                t,
                "pbx_operator_drift_corrections_total",
                &[("name", "enforced")],
            )
        })
        .collect();
    assert_eq!(counts, [0.0, 1.0, 2.0, 3.0], "one correction per drift");
    counts.extend([3.0; 3]);
    input.push(series(
        "pbx_operator_drift_corrections_total",
        &labels,
        &counts,
    ));

    let failed: f64 = codes
        .iter()
        .filter(|c| !c.starts_with('2'))
        .map(|c| {
            v(&after, "pbx_operator_notify_answers_total", &[("code", c)])
                - v(&before, "pbx_operator_notify_answers_total", &[("code", c)])
        })
        .sum();
    let all: f64 = codes
        .iter()
        .map(|c| {
            v(&after, "pbx_operator_notify_answers_total", &[("code", c)])
                - v(&before, "pbx_operator_notify_answers_total", &[("code", c)])
        })
        .sum();
    let ratio = failed / all;
    assert!(ratio > 0.1, "{failed}/{all} NOTIFYs failed");
    let w = "warning";
    let test = serde_json::json!({
        "rule_files": [rules.to_str().unwrap()],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input,
            "alert_rule_test": [
                // Not yet: every `for` still running.
                {"eval_time": "2m", "alertname": "PbxConnectionNotReady", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "PbxOperationStalled", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "PbxOperatorNotLeading", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "PbxNotifyFailureRatioHigh", "exp_alerts": []},
                {"eval_time": "1m", "alertname": "PbxDriftCorrectionLoop", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "PbxConnectionNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": w, "namespace": ns, "name": "broken"},
                    "exp_annotations": {
                        "summary": format!("PbxConnection {ns}/broken is not Ready"),
                        "description": format!("The operator cannot reach this PBX (database or RPC) for 5m; changes and restarts on it wait. `kubectl describe pbxc broken -n {ns}` says why."),
                    }}]},
                {"eval_time": "6m", "alertname": "PbxOperationStalled", "exp_alerts": [{
                    "exp_labels": {"severity": w, "namespace": ns, "name": "pins", "kind": "BulkUserChange", "reason": "SecretNotUsable"},
                    "exp_annotations": {
                        "summary": format!("BulkUserChange {ns}/pins is Stalled (SecretNotUsable)"),
                        "description": format!("A person must act; its Stalled condition's message says what to do (`kubectl pbx status -n {ns}`)."),
                    }}]},
                {"eval_time": "6m", "alertname": "PbxOperatorNotLeading", "exp_alerts": [{
                    "exp_labels": {"severity": w},
                    "exp_annotations": {
                        "summary": "No pbx-operator replica is leading",
                        "description": "No replica holds the leader Lease (or none is scraped) for 5m, so no change, restart or drift repair runs.",
                    }}]},
                {"eval_time": "9m", "alertname": "PbxNotifyFailureRatioHigh", "exp_alerts": [{
                    "exp_labels": {"severity": w},
                    "exp_annotations": {
                        "summary": "More than 10% of phone restart NOTIFYs are refused or unanswered",
                        "description": format!("Failed NOTIFY ratio {}% over 10m: phones offline, a wrong NOTIFY event for the vendor, or a rate limit too high.", humanize_percentage(ratio)),
                    }}]},
                {"eval_time": "3m", "alertname": "PbxDriftCorrectionLoop", "exp_alerts": [{
                    "exp_labels": {"severity": w, "kind": "BulkUserChange", "namespace": ns, "name": "enforced"},
                    "exp_annotations": {
                        "summary": format!("BulkUserChange {ns}/enforced corrected drift 3 times in an hour"),
                        "description": "Something keeps changing what this Enforce change sets (another tool, a person in the PBX console, a second change on the same fields); the two fight.",
                    }}]},
            ],
        }],
    });
    let test_file = dir.path().join("alerts_test.yaml");
    std::fs::write(&test_file, serde_yaml::to_string(&test).unwrap()).unwrap();
    let (ok, out) = promtool(&["test", "rules", test_file.to_str().unwrap()]);
    assert!(
        ok,
        "promtool test rules failed:\n{out}\n{}",
        std::fs::read_to_string(&test_file).unwrap()
    );
    assert!(out.contains("SUCCESS"), "{out}");
    if let Ok(keep) = std::env::var("PBX_KEEP_SCRAPE") {
        // For the chart README's dashboard picture: the scraped series, kept on request.
        std::fs::write(format!("{keep}/before.prom"), &before).unwrap();
        std::fs::write(format!("{keep}/after.prom"), &after).unwrap();
        for (i, t) in drift.iter().enumerate() {
            std::fs::write(format!("{keep}/drift-{i}.prom"), t).unwrap();
        }
    }
}

/// Prometheus's humanizePercentage: the ratio * 100 with 4 significant digits, trailing zeros cut.
fn humanize_percentage(ratio: f64) -> String {
    let p = ratio * 100.0;
    let digits = 4 - (p.abs().log10().floor() as i32 + 1);
    let s = format!("{:.*}", digits.max(0) as usize, p);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// By hand, for the docs (`cargo test --test observability dashboard_picture -- --ignored`):
/// a real run scraped by a real Prometheus, every panel's query evaluated by it and drawn with
/// gnuplot into charts/pbx-operator/dashboard.png, and the `kubectl pbx` outputs the README
/// shows written to $PBX_DOCS_OUT (default /tmp/pbx-docs.txt).
#[tokio::test]
#[ignore = "renders the chart README's dashboard.png and the README's plugin outputs; run by hand"]
async fn dashboard_picture_from_a_real_run() {
    use std::process::{Command, Stdio};
    let env = Env::start(
        "acme",
        LabSpec {
            users: 60,
            phones: 4,
            silent: 1,
            ..Default::default()
        },
        false,
    )
    .await;
    let ns = env.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{ scrape_interval: 2s }}\nscrape_configs:\n  - job_name: pbx-operator\n    static_configs: [{{ targets: ['127.0.0.1:{}'] }}]\n",
            env.operator.metrics_port
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    let start = jiff::Timestamp::now().as_second();
    let plugin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_pbx-operator"),
        plugin.path().join("kubectl-pbx"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        plugin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let mut docs = String::new();
    let mut pbx = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("pbx")
            .args(args)
            .env("KUBECONFIG", &control_plane().admin_kubeconfig)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        docs.push_str(&format!(
            "$ kubectl pbx {}\n{}{}(exit {})\n\n",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            out.status.code().unwrap_or(-1)
        ));
    };
    let closed = free_port();
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: branch-pbx }}\nstringData: {{ database-url: \"{}\", rpc-url: \"http://127.0.0.1:{closed}/RPC\" }}\n---\napiVersion: pbx-operator.io/v1alpha1\nkind: PbxConnection\nmetadata: {{ name: branch }}\nspec:\n  domain: {}\n  database: {{ urlSecretRef: {{ name: branch-pbx, key: database-url }} }}\n  rpc: {{ urlSecretRef: {{ name: branch-pbx, key: rpc-url }} }}\n",
        env.lab.db_url(),
        env.lab.domain()
    ));
    tokio::time::sleep(Duration::from_secs(20)).await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: sales-call-group }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  fields:
    callGroup:   { value: "3", lock: Open }
    pickupGroup: { value: "3" }
  mode: Validate
"#,
    );
    env.wait_buc("sales-call-group", &[Phase::Validated]).await;
    pbx(&["plan", "buc/sales-call-group", "-n", &ns]);
    pbx(&["plan", "buc/sales-call-group", "-n", &ns, "-o", "csv"]);
    pbx(&["approve", "buc/sales-call-group", "-n", &ns, "--yes"]);
    pbx(&["wait", "buc/sales-call-group", "-n", &ns]);
    pbx(&["results", "buc/sales-call-group", "-n", &ns]);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: everyone-now }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 2, perSecond: 1 }
  confirm: { timeout: 8s }
"#,
    );
    pbx(&["wait", "prs/everyone-now", "-n", &ns]);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: keep-call-groups }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["205", "206"] }
  fields: { callGroup: { value: "7", lock: Open } }
  policy: Enforce
  interval: 5s
---
apiVersion: v1
kind: Secret
metadata: { name: vm-pins }
stringData: { pin: "4321" }
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: new-pins }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["204"] }
  fields:
    voicemailPin: { valueFrom: { secretKeyRef: { name: vm-pins, key: pin } }, lock: Open }
"#,
    );
    env.wait_buc("keep-call-groups", &[Phase::Succeeded]).await;
    for round in 1..=4u64 {
        tokio::time::sleep(Duration::from_secs(12)).await;
        env.set_attribute("205", "pbx.call_group", "1").await;
        eventually(Duration::from_secs(30), "a correction", || async {
            (corrections(&env, "keep-call-groups").await >= round
                && phase(&env, "keep-call-groups").await == Some(Phase::Succeeded)
                && env.attribute("205", "pbx.call_group").await.as_deref() == Some("7"))
            .then_some(())
        })
        .await;
    }
    pbx(&["status", "-n", &ns]);
    pbx(&["export", "users", "--connection", "acme", "-n", &ns]);
    let template = dir.path().join("nightly.yaml");
    std::fs::write(&template, "metadata: { name: nightly }\nspec:\n  connectionRef: { name: acme }\n  targets: { groups: [sales] }\n").unwrap();
    pbx(&[
        "create",
        "phone-restart",
        "--from",
        template.to_str().unwrap(),
        "--schedule",
        "0 2 * * *",
        "-n",
        &ns,
    ]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let end = jiff::Timestamp::now().as_second();
    let out = support::repo_root().join("charts/pbx-operator/dashboard.png");
    let rendered = Command::new("python3")
        .arg(support::repo_root().join("charts/pbx-operator/dashboards/render.py"))
        .arg(format!("http://127.0.0.1:{prom_port}"))
        .arg(start.to_string())
        .arg(end.to_string())
        .arg(&out)
        .output()
        .unwrap();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let docs_out = std::env::var("PBX_DOCS_OUT").unwrap_or_else(|_| "/tmp/pbx-docs.txt".into());
    std::fs::write(&docs_out, docs.replace(&ns, "acme")).unwrap();
}
