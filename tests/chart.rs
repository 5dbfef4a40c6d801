//! The Helm chart (charts/pbx-operator) against a real kube-apiserver: it lints and renders what
//! the issue asks for, applies with a server-side dry run, and, installed for real, its RBAC and
//! ValidatingAdmissionPolicies hold: editors only validate, executors execute, destructive work
//! needs its own role, spec.requestedBy is the requester's own name, a broad `*` role on
//! pbx-operator.io does not execute, and the operator's ServiceAccount has exactly what it uses.
//!
//! Helm is built once from its Go module (tests/support/helm.rs). The chart is installed once
//! per test binary (release `pbx-operator` in `pbx-system`, cluster-wide); every test works in
//! namespaces of its own.

#[path = "support/helm.rs"]
mod helm;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{control_plane, kubectl, kubectl_stdin, try_kubectl};

const RELEASE: &str = "pbx-operator";
const RELEASE_NS: &str = "pbx-system";
/// Where the installed release's scheduled restart lives.
const NIGHTLY_NS: &str = "pbx-nightly";
/// The installed operator as the API server sees it.
const OPERATOR: &str = "system:serviceaccount:pbx-system:pbx-operator";
/// The scheduled restart's ServiceAccount and ConfigMap (`<fullname>-restart-<name>`).
const NIGHTLY: &str = "pbx-operator-restart-nightly";
/// The one Secret the installed operator may read.
const SECRET: &str = "acme-pbx";

/// How long a RoleBinding or an admission policy may take to become effective.
const SETTLE: Duration = Duration::from_secs(30);

fn chart() -> PathBuf {
    support::repo_root().join("charts/pbx-operator")
}

fn chart_arg() -> String {
    chart().to_str().unwrap().to_string()
}

/// The installed release's values.
const INSTALL_VALUES: &str = r#"
secretNames: [acme-pbx]
scheduledRestarts:
  - name: nightly
    namespace: pbx-nightly
    schedule: "0 2 * * *"
    template:
      connectionRef: { name: acme }
      targets: { groups: [sales] }
      reboot: true
      rollout: { maxInFlight: 20, perSecond: 50 }
      confirm: { timeout: 5m }
"#;

/// Everything optional at once: one namespace, named Secrets, a scheduled restart.
const FULL_VALUES: &str = r#"
watchNamespace: acme
secretNames: [acme-pbx, acme-smtp]
logFormat: json
scheduledRestarts:
  - name: sales-nightly
    schedule: "0 2 * * *"
    timeZone: Europe/Madrid
    template:
      connectionRef: { name: acme }
      targets: { groups: [sales], models: ["SIP-T46S"] }
      reboot: true
      rollout: { maxInFlight: 20, perSecond: 50 }
      confirm: { timeout: 5m }
"#;

/// A YAML file (values, a kubeconfig) that lives as long as the returned handle.
fn yaml_file(yaml: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("pbx-chart-")
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    file
}

/// `helm template` of the chart with `args` (values, --set), parsed into its documents.
fn render(args: &[&str]) -> Vec<Value> {
    let chart = chart_arg();
    let mut all = vec![
        "template",
        RELEASE,
        chart.as_str(),
        "--namespace",
        RELEASE_NS,
    ];
    all.extend_from_slice(args);
    documents(&helm::run(&all))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = docs
                .iter()
                .map(|d| {
                    format!(
                        "{}/{}",
                        d["kind"].as_str().unwrap_or("?"),
                        d["metadata"]["name"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            panic!("no {kind} {name} rendered; have {have:?}")
        })
}

fn has(docs: &[Value], kind: &str, name: &str) -> bool {
    docs.iter()
        .any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// An RBAC rule as (apiGroups, resources, resourceNames, verbs), each sorted, for comparisons.
type Rule = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

fn rules(role: &Value) -> Vec<Rule> {
    let list = |v: &Value| {
        let mut l: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        l.sort();
        l
    };
    let mut out: Vec<Rule> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                list(&r["apiGroups"]),
                list(&r["resources"]),
                list(&r["resourceNames"]),
                list(&r["verbs"]),
            )
        })
        .collect();
    out.sort();
    out
}

fn rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> Rule {
    let list = |l: &[&str]| {
        let mut v: Vec<String> = l.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    (list(groups), list(resources), list(names), list(verbs))
}

const KINDS: [&str; 5] = [
    "pbxconnections",
    "bulkuserchanges",
    "bulkphonechanges",
    "phonerestarts",
    "userrecycles",
];

/// The operator's rules, exactly (issue part 1), with the Secrets it may read.
fn operator_rules(secrets: &[&str]) -> Vec<Rule> {
    let status: Vec<String> = KINDS.iter().map(|k| format!("{k}/status")).collect();
    let status: Vec<&str> = status.iter().map(String::as_str).collect();
    let mut expected = vec![
        rule(
            &["pbx-operator.io"],
            &KINDS,
            &[],
            &["get", "list", "watch", "patch", "update"],
        ),
        rule(
            &["pbx-operator.io"],
            &status,
            &[],
            &["get", "patch", "update"],
        ),
        rule(
            &[""],
            &["configmaps"],
            &[],
            &["get", "list", "create", "patch", "update", "delete"],
        ),
        rule(&[""], &["events"], &[], &["create", "patch"]),
        rule(&["events.k8s.io"], &["events"], &[], &["create", "patch"]),
    ];
    if !secrets.is_empty() {
        expected.push(rule(&[""], &["secrets"], secrets, &["get"]));
    }
    expected.sort();
    expected
}

// ---------------------------------------------------------------------------------------------
// Without a cluster: files, lint, rendering.

#[test]
fn chart_crds_equal_the_generated_crds() {
    let root = support::repo_root();
    let read = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    };
    let generated = read(&root.join("crds"));
    let in_chart = read(&chart().join("crds"));
    assert_eq!(generated.len(), 5, "crds/ should hold the five CRDs");
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        in_chart.keys().collect::<Vec<_>>(),
        "charts/pbx-operator/crds/ must hold the same files as crds/"
    );
    for (name, bytes) in &generated {
        assert!(
            in_chart[name] == *bytes,
            "charts/pbx-operator/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/pbx-operator/crds/"
        );
    }
}

#[test]
fn helm_lint_passes() {
    let chart = chart_arg();
    helm::run(&["lint", "--strict", &chart]);
    let full = yaml_file(FULL_VALUES);
    helm::run(&[
        "lint",
        "--strict",
        &chart,
        "-f",
        full.path().to_str().unwrap(),
    ]);
    let installed = yaml_file(INSTALL_VALUES);
    helm::run(&[
        "lint",
        "--strict",
        &chart,
        "-f",
        installed.path().to_str().unwrap(),
    ]);
}

#[test]
fn bad_values_fail_with_a_message() {
    let chart = chart_arg();
    for (set, message) in [
        (
            "scheduledRestarts[0].name=Nightly_1,scheduledRestarts[0].schedule=0 2 * * *,scheduledRestarts[0].template.reboot=true",
            "must be a DNS label",
        ),
        (
            "scheduledRestarts[0].name=nightly,scheduledRestarts[0].template.reboot=true",
            "needs a schedule",
        ),
        (
            "scheduledRestarts[0].name=nightly,scheduledRestarts[0].schedule=0 2 * * *",
            "needs a template",
        ),
        ("logFormat=xml", "logFormat must be text or json"),
        ("secretNames[0]=Not A Name", "must be a Secret name"),
    ] {
        let out = helm::try_run(&["template", RELEASE, &chart, "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} rendered");
        assert!(
            stderr.contains(message),
            "--set {set}: expected {message:?} in:\n{stderr}"
        );
    }
}

#[test]
fn deployment_is_locked_down_and_runs_the_operator() {
    let docs = render(&[]);
    let deploy = find(&docs, "Deployment", RELEASE);
    assert_eq!(deploy["metadata"]["namespace"], RELEASE_NS);
    assert_eq!(deploy["spec"]["replicas"], 1);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], RELEASE);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(
        c["image"], "ghcr.io/pbx-operator/pbx-operator:0.1.0",
        "the tag defaults to appVersion"
    );
    assert_eq!(
        strings(&c["args"]),
        [
            "--log-format",
            "text",
            "run",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--concurrency",
            "4",
            "--secret-check-interval",
            "30s",
            "--max-csv-bytes",
            "33554432",
            "--batch-size",
            "4000",
            "--leader-election"
        ]
    );
    assert!(
        c.get("command").is_none(),
        "the image's ENTRYPOINT is pbx-operator"
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let port = &c["ports"][0];
    assert_eq!(
        (port["name"].as_str(), port["containerPort"].as_i64()),
        (Some("metrics"), Some(8080))
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string(),
        "{}",
        c["resources"]
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let svc = find(&docs, "Service", &format!("{RELEASE}-metrics"));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // Leader election: by value, always with more than one replica; without it, never two pods.
    let two = render(&[
        "--set",
        "replicas=2,leaderElection.enabled=false,logFormat=json,watchNamespace=acme",
    ]);
    let deploy = find(&two, "Deployment", RELEASE);
    let args = strings(&deploy["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(&args[..3], ["--log-format", "json", "run"]);
    assert!(
        args.contains(&"--leader-election"),
        "replicas 2 must elect a leader: {args:?}"
    );
    assert!(
        args.windows(2).any(|w| w == ["--namespace", "acme"]),
        "{args:?}"
    );
    assert!(has(&two, "Role", &format!("{RELEASE}-leader-election")));
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    let one = render(&["--set", "leaderElection.enabled=false"]);
    let deploy = find(&one, "Deployment", RELEASE);
    let args = strings(&deploy["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(!args.contains(&"--leader-election"), "{args:?}");
    assert!(
        !has(&one, "Role", &format!("{RELEASE}-leader-election")),
        "no Lease access without leader election"
    );
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
}

/// Shards: one Deployment per listed shard running `run --shard <name>` (its own Lease, its own
/// pod selector), beside the unsharded one unless `unsharded` is false; without shards, exactly
/// the one Deployment as before.
#[test]
fn shards_render_one_deployment_each() {
    let deployments = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .filter(|d| d["kind"] == "Deployment")
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(deployments(&render(&[])), [RELEASE]);
    let values = yaml_file("shards:\n  - name: eu-1\n  - name: eu-2\n    replicas: 2\n");
    let path = values.path().to_str().unwrap().to_string();
    let docs = render(&["-f", &path]);
    let names = deployments(&docs);
    let one = format!("{RELEASE}-shard-eu-1");
    let two = format!("{RELEASE}-shard-eu-2");
    assert_eq!(names, [RELEASE.to_string(), one.clone(), two.clone()]);
    let mut selectors = Vec::new();
    for (name, shard, replicas) in [(&one, "eu-1", 1), (&two, "eu-2", 2)] {
        let d = find(&docs, "Deployment", name);
        assert_eq!(d["spec"]["replicas"], replicas);
        let args = strings(&d["spec"]["template"]["spec"]["containers"][0]["args"]);
        assert!(args.windows(2).any(|w| w == ["--shard", shard]), "{args:?}");
        assert!(args.contains(&"--leader-election"), "{args:?}");
        let selector = &d["spec"]["selector"]["matchLabels"];
        assert_eq!(selector["pbx-operator.io/shard"], shard);
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["pbx-operator.io/shard"],
            shard
        );
        selectors.push(selector.clone());
    }
    let unsharded = find(&docs, "Deployment", RELEASE);
    let args = strings(&unsharded["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(!args.contains(&"--shard"), "{args:?}");
    selectors.push(unsharded["spec"]["selector"]["matchLabels"].clone());
    assert_ne!(
        selectors[0], selectors[2],
        "no Deployment adopts another's pods"
    );
    assert_ne!(selectors[1], selectors[2]);
    // Each shard's Lease may be taken.
    let role = find(&docs, "Role", &format!("{RELEASE}-leader-election"));
    let names: Vec<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resourceNames"].as_array().into_iter().flatten())
        .filter_map(|n| n.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "pbx-operator",
            "pbx-operator-shard-eu-1",
            "pbx-operator-shard-eu-2"
        ]
    );
    // Only shards.
    let only = render(&["-f", &path, "--set", "unsharded=false"]);
    assert_eq!(deployments(&only), [one, two]);
    let bad = helm::try_run(&[
        "template",
        RELEASE,
        &chart_arg(),
        "--set",
        "shards[0].name=EU_1",
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("is not a shard name"),
        "{stderr}"
    );
}

#[test]
fn operator_rbac_is_exactly_what_it_uses() {
    // Cluster-wide: ClusterRole + ClusterRoleBinding; no Secrets without secretNames.
    let docs = render(&[]);
    let role = find(&docs, "ClusterRole", RELEASE);
    assert_eq!(rules(role), operator_rules(&[]));
    let binding = find(&docs, "ClusterRoleBinding", RELEASE);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": RELEASE_NS}])
    );
    let lease = find(&docs, "Role", &format!("{RELEASE}-leader-election"));
    assert_eq!(lease["metadata"]["namespace"], RELEASE_NS);
    assert_eq!(rules(lease), {
        let mut r = vec![
            rule(&["coordination.k8s.io"], &["leases"], &[], &["create"]),
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["pbx-operator"],
                &["get", "update", "patch"],
            ),
        ];
        r.sort();
        r
    });
    // One namespace: a Role and RoleBinding there, the Secrets by name.
    let values = yaml_file(FULL_VALUES);
    let docs = render(&["-f", values.path().to_str().unwrap()]);
    assert!(!has(&docs, "ClusterRole", RELEASE) && !has(&docs, "ClusterRoleBinding", RELEASE));
    let role = find(&docs, "Role", RELEASE);
    assert_eq!(role["metadata"]["namespace"], "acme");
    assert_eq!(rules(role), operator_rules(&["acme-pbx", "acme-smtp"]));
    let binding = find(&docs, "RoleBinding", RELEASE);
    assert_eq!(binding["metadata"]["namespace"], "acme");
    assert_eq!(binding["subjects"][0]["namespace"], RELEASE_NS);
    // Nothing else in the chart touches Secrets.
    for d in &docs {
        for r in d["rules"].as_array().into_iter().flatten() {
            if strings(&r["resources"])
                .iter()
                .any(|res| res.starts_with("secrets") || *res == "*")
            {
                assert!(
                    r["resourceNames"].is_array(),
                    "a rule grants Secrets without names: {r}"
                );
                assert_eq!(strings(&r["verbs"]), ["get"], "{r}");
            }
        }
    }
}

#[test]
fn user_roles_aggregate_and_keep_execute_apart() {
    let docs = render(&[]);
    let label = |name: &str, to: &str| {
        find(&docs, "ClusterRole", name)["metadata"]["labels"]
            [format!("rbac.authorization.k8s.io/aggregate-to-{to}")]
            == "true"
    };
    assert!(label("pbx-operator-viewer", "view"));
    assert!(label("pbx-operator-editor", "edit"));
    assert!(label("pbx-operator-executor", "admin") && !label("pbx-operator-executor", "edit"));
    assert!(
        label("pbx-operator-destructive", "admin") && !label("pbx-operator-destructive", "edit")
    );
    let executes: Vec<String> = KINDS[1..].iter().map(|k| format!("{k}/execute")).collect();
    let executes: Vec<&str> = executes.iter().map(String::as_str).collect();
    let executor = rules(find(&docs, "ClusterRole", "pbx-operator-executor"));
    assert!(
        executor.contains(&rule(
            &["permissions.pbx-operator.io"],
            &executes,
            &[],
            &["create"]
        )),
        "{executor:?}"
    );
    assert_eq!(
        rules(find(&docs, "ClusterRole", "pbx-operator-destructive")),
        vec![rule(
            &["permissions.pbx-operator.io"],
            &["bulkuserchanges/destructive", "userrecycles/destructive"],
            &[],
            &["create"]
        )]
    );
    for name in ["pbx-operator-viewer", "pbx-operator-editor"] {
        let r = rules(find(&docs, "ClusterRole", name));
        assert!(
            r.iter().all(|(g, ..)| g == &["pbx-operator.io"]),
            "{name} must not grant execute or destructive: {r:?}"
        );
    }
}

#[test]
fn scheduled_restart_renders_configmap_cronjob_and_a_narrow_role() {
    let values = yaml_file(FULL_VALUES);
    let docs = render(&["-f", values.path().to_str().unwrap()]);
    let name = "pbx-operator-restart-sales-nightly";
    let cm = find(&docs, "ConfigMap", name);
    assert_eq!(
        cm["metadata"]["namespace"], "acme",
        "defaults to watchNamespace"
    );
    let template: Value =
        serde_yaml::from_str(cm["data"]["template.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(template["kind"], "PhoneRestart");
    assert_eq!(template["apiVersion"], "pbx-operator.io/v1alpha1");
    assert_eq!(
        template["spec"]["targets"],
        json!({"groups": ["sales"], "models": ["SIP-T46S"]})
    );
    assert_eq!(template["spec"]["confirm"]["timeout"], "5m");

    let cron = find(&docs, "CronJob", name);
    assert_eq!(cron["metadata"]["namespace"], "acme");
    assert_eq!(cron["spec"]["schedule"], "0 2 * * *");
    assert_eq!(cron["spec"]["timeZone"], "Europe/Madrid");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    assert!(
        cron["spec"]["startingDeadlineSeconds"]
            .as_i64()
            .is_some_and(|s| s > 0)
    );
    let pod = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name);
    let c = &pod["containers"][0];
    assert_eq!(
        strings(&c["args"]),
        [
            "create",
            "phone-restart",
            "--from-configmap",
            name,
            "--namespace",
            "acme"
        ]
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);

    assert_eq!(
        find(&docs, "ServiceAccount", name)["metadata"]["namespace"],
        "acme"
    );
    let mut expected = vec![
        rule(
            &["pbx-operator.io"],
            &["phonerestarts"],
            &[],
            &["create", "get"],
        ),
        rule(
            &["permissions.pbx-operator.io"],
            &["phonerestarts/execute"],
            &[],
            &["create"],
        ),
        rule(&[""], &["configmaps"], &[name], &["get"]),
    ];
    expected.sort();
    assert_eq!(rules(find(&docs, "Role", name)), expected);
    let binding = find(&docs, "RoleBinding", name);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": name, "namespace": "acme"}])
    );

    // In UTC (the default) the command also gets the schedule, so a retried or late run maps to
    // the scheduled time and creates the same PhoneRestart; --window when given.
    let values = yaml_file(&format!("{INSTALL_VALUES}    window: 1h\n"));
    let docs = render(&["-f", values.path().to_str().unwrap()]);
    let cron = find(&docs, "CronJob", NIGHTLY);
    assert_eq!(cron["metadata"]["namespace"], NIGHTLY_NS);
    assert_eq!(cron["spec"]["timeZone"], "Etc/UTC");
    assert_eq!(
        strings(&cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]),
        [
            "create",
            "phone-restart",
            "--from-configmap",
            NIGHTLY,
            "--namespace",
            NIGHTLY_NS,
            "--schedule",
            "0 2 * * *",
            "--window",
            "1h"
        ]
    );
}

#[test]
fn admission_policies_match_main_resources_and_skip_the_operator() {
    let docs = render(&[]);
    for name in [
        "pbx-operator-execute",
        "pbx-operator-destructive",
        "pbx-operator-requested-by",
    ] {
        let vap = find(&docs, "ValidatingAdmissionPolicy", name);
        assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
        for r in vap["spec"]["matchConstraints"]["resourceRules"]
            .as_array()
            .unwrap()
        {
            assert!(
                strings(&r["resources"])
                    .iter()
                    .all(|res| !res.contains('/')),
                "{name} must not match subresources: {r}"
            );
            assert_eq!(strings(&r["operations"]), ["CREATE", "UPDATE"]);
        }
        let conditions = vap["spec"]["matchConditions"].to_string();
        assert!(
            conditions.contains(&format!("'{OPERATOR}'")),
            "{name} must exclude the operator: {conditions}"
        );
        let binding = find(&docs, "ValidatingAdmissionPolicyBinding", name);
        assert_eq!(binding["spec"]["policyName"], name);
        assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    }
}

// ---------------------------------------------------------------------------------------------
// Against the control plane.

fn admin_kubeconfig() -> &'static Path {
    &control_plane().admin_kubeconfig
}

fn admin(args: &[&str]) -> String {
    kubectl(admin_kubeconfig(), args)
}

/// Creates a namespace (names are unique within this binary's own control plane).
fn namespace(name: &str) -> String {
    admin(&["create", "namespace", name]);
    name.to_string()
}

fn binding(ns: &str, clusterrole: &str, user: &str) {
    admin(&[
        "create",
        "rolebinding",
        &format!("{user}-{clusterrole}"),
        "-n",
        ns,
        &format!("--clusterrole={clusterrole}"),
        &format!("--user={user}"),
    ]);
}

/// Polls `f` every 200 ms until it returns Ok; panics with `what` and the last failure.
fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The chart installed once with `helm install`: returns helm's output (with the NOTES).
fn installed() -> &'static str {
    static INSTALL: OnceLock<String> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let cp = control_plane();
        namespace(RELEASE_NS);
        namespace(NIGHTLY_NS);
        let values = yaml_file(INSTALL_VALUES);
        let chart = chart_arg();
        let out = helm::run(&[
            "install",
            RELEASE,
            &chart,
            "--namespace",
            RELEASE_NS,
            "--kubeconfig",
            cp.admin_kubeconfig.to_str().unwrap(),
            "-f",
            values.path().to_str().unwrap(),
        ]);
        wait_for_policies();
        out
    })
}

/// ValidatingAdmissionPolicies take effect a moment after they are created: probe each one with
/// a server-side dry run until it refuses what it must.
fn wait_for_policies() {
    let ns = namespace("policy-probe");
    binding(&ns, "pbx-operator-editor", "probe-editor");
    binding(&ns, "pbx-operator-executor", "probe-executor");
    let probes = [
        (
            "probe-editor",
            buc("probe-execute", call_group()),
            "pbx-operator-execute",
        ),
        (
            "probe-executor",
            buc("probe-destructive", json!({"actions": ["Remove"]})),
            "pbx-operator-destructive",
        ),
        (
            "probe-executor",
            buc(
                "probe-requested-by",
                json!({"mode": "Validate", "requestedBy": "nobody", "actions": ["Unlock"]}),
            ),
            "pbx-operator-requested-by",
        ),
    ];
    for (user, manifest, policy) in probes {
        poll(SETTLE, &format!("policy {policy} to take effect"), || {
            let (ok, _, err) = try_kubectl(
                admin_kubeconfig(),
                &[
                    "create",
                    "--dry-run=server",
                    "-n",
                    &ns,
                    "--as",
                    user,
                    "-f",
                    "-",
                ],
                &manifest,
            );
            if !ok && err.contains(&format!("ValidatingAdmissionPolicy '{policy}'")) {
                Ok(())
            } else {
                Err(if ok { "accepted".into() } else { err })
            }
        });
    }
    // The API server type-checks each policy against the CRD schemas; no warnings allowed.
    for policy in [
        "pbx-operator-execute",
        "pbx-operator-destructive",
        "pbx-operator-requested-by",
    ] {
        let status = poll(SETTLE, &format!("{policy} to be type-checked"), || {
            let out = admin(&["get", "validatingadmissionpolicy", policy, "-o", "json"]);
            let v: Value = serde_json::from_str(&out).unwrap();
            if v["status"]["observedGeneration"] == v["metadata"]["generation"] {
                Ok(v["status"].clone())
            } else {
                Err(out)
            }
        });
        assert!(
            status["typeChecking"]["expressionWarnings"]
                .as_array()
                .is_none_or(|w| w.is_empty()),
            "{policy} has type-checking warnings: {status}"
        );
    }
}

fn manifest(kind: &str, name: &str, spec: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "pbx-operator.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn with_base(base: Value, extra: Value) -> Value {
    let mut spec = base;
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

fn buc(name: &str, extra: Value) -> Vec<u8> {
    let base =
        json!({"connectionRef": {"name": "acme"}, "targets": {"extensions": ["201", "202"]}});
    manifest("BulkUserChange", name, with_base(base, extra))
}

fn call_group() -> Value {
    json!({"fields": {"callGroup": {"value": "3", "lock": "Open"}}})
}

fn validate_call_group() -> Value {
    with_base(call_group(), json!({"mode": "Validate"}))
}

fn bpc(name: &str, extra: Value) -> Vec<u8> {
    let base = json!({
        "connectionRef": {"name": "acme"},
        "targets": {"groups": ["sales"], "vendors": ["Yealink"]},
        "fields": {"model": {"value": "SIP-T54W", "lock": "Open"}},
    });
    manifest("BulkPhoneChange", name, with_base(base, extra))
}

fn phone_restart(name: &str) -> Vec<u8> {
    manifest(
        "PhoneRestart",
        name,
        json!({"connectionRef": {"name": "acme"}, "targets": {"groups": ["sales"]}, "reboot": true}),
    )
}

fn user_recycle(name: &str) -> Vec<u8> {
    manifest(
        "UserRecycle",
        name,
        json!({"connectionRef": {"name": "acme"}, "targets": {"extensions": ["210"]}, "reset": ["Name", "Email"]}),
    )
}

/// A kubectl command run as alice (token auth, group pbx-users), retried while RBAC has not yet
/// seen a RoleBinding just created for her. Ok(stdout) or Err(stderr).
fn as_alice(args: &[&str], stdin: &[u8]) -> Result<String, String> {
    let cp = control_plane();
    let deadline = Instant::now() + SETTLE;
    loop {
        let (ok, out, err) = try_kubectl(&cp.user_kubeconfig, args, stdin);
        if ok {
            return Ok(out);
        }
        if !err.contains("User \"alice\" cannot") || Instant::now() > deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn alice_creates(ns: &str, manifest: &[u8]) -> Result<String, String> {
    as_alice(&["create", "-n", ns, "-f", "-"], manifest)
}

/// Asserts that alice may create it (polling, for RoleBindings just made).
fn accepted(ns: &str, manifest: &[u8]) {
    poll(SETTLE, "alice's request to be accepted", || {
        alice_creates(ns, manifest)
    });
}

/// Asserts that alice's request is refused by `policy` and returns the message.
fn refused_by(policy: &str, result: Result<String, String>, expected: &[&str]) -> String {
    let err = match result {
        Ok(out) => panic!("expected policy {policy} to refuse, but it was accepted: {out}"),
        Err(err) => err,
    };
    assert!(
        err.contains(&format!("ValidatingAdmissionPolicy '{policy}'")),
        "expected a refusal by {policy}, got: {err}"
    );
    for needle in expected {
        assert!(
            err.contains(needle),
            "the refusal should say {needle:?}: {err}"
        );
    }
    err
}

const NEEDS_EXECUTE: [&str; 2] = ["bulkuserchanges/execute", "pbx-operator-executor"];
const NEEDS_DESTRUCTIVE: [&str; 2] = ["bulkuserchanges/destructive", "pbx-operator-destructive"];

#[test]
fn rendered_chart_applies_with_a_server_side_dry_run() {
    let cp = control_plane();
    let chart = chart_arg();
    namespace("dry-system");
    // Names YAML would read as a boolean and a number: the chart quotes what it interpolates.
    namespace("y");
    namespace("2026");
    let full = yaml_file(FULL_VALUES);
    let full = full.path().to_str().unwrap();
    for (namespace, extra) in [
        ("dry-system", vec![]),
        ("y", vec!["-f", full, "--set", "watchNamespace=2026"]),
    ] {
        let mut args = vec![
            "template",
            RELEASE,
            chart.as_str(),
            "--namespace",
            namespace,
            "--include-crds",
        ];
        args.extend(extra.iter().copied());
        let rendered = helm::run(&args);
        let out = kubectl_stdin(
            &cp.admin_kubeconfig,
            &["apply", "--dry-run=server", "-f", "-"],
            rendered.as_bytes(),
        );
        for object in [
            "customresourcedefinition.apiextensions.k8s.io/bulkuserchanges.pbx-operator.io",
            "deployment.apps/pbx-operator",
            "serviceaccount/pbx-operator",
            "clusterrole.rbac.authorization.k8s.io/pbx-operator-executor",
            "validatingadmissionpolicy.admissionregistration.k8s.io/pbx-operator-execute",
            "validatingadmissionpolicybinding.admissionregistration.k8s.io/pbx-operator-destructive",
        ] {
            assert!(
                out.contains(object),
                "{object} missing from the dry run ({extra:?}):\n{out}"
            );
        }
        if !extra.is_empty() {
            assert!(
                out.contains("cronjob.batch/pbx-operator-restart-sales-nightly"),
                "{out}"
            );
            assert!(
                out.contains("role.rbac.authorization.k8s.io/pbx-operator "),
                "{out}"
            );
        }
    }
}

#[test]
fn notes_say_what_to_apply_next() {
    let out = installed();
    for needle in [
        "What to apply next",
        "kubectl create secret generic acme-pbx",
        "PbxConnection",
        "mode Validate",
        "approvedPlanHash",
        "pbx-operator results bulkuserchange/<name>",
        "The operator may read only these Secrets: acme-pbx",
        "kubectl create rolebinding",
        "pbx-operator-executor",
        "nightly: \"0 2 * * *\" in namespace pbx-nightly",
    ] {
        assert!(out.contains(needle), "NOTES should say {needle:?}:\n{out}");
    }
}

#[test]
fn editor_validates_but_cannot_execute() {
    installed();
    let ns = namespace("editor");
    binding(&ns, "pbx-operator-editor", "alice");

    accepted(&ns, &buc("plan", validate_call_group()));
    // Mode defaults to Execute.
    let msg = refused_by(
        "pbx-operator-execute",
        alice_creates(&ns, &buc("run", call_group())),
        &NEEDS_EXECUTE,
    );
    assert!(msg.contains("set spec.mode: Validate"), "{msg}");
    refused_by(
        "pbx-operator-execute",
        alice_creates(
            &ns,
            &buc("run", with_base(call_group(), json!({"mode": "Execute"}))),
        ),
        &NEEDS_EXECUTE,
    );
    // Switching the validated plan to Execute is executing, too.
    refused_by(
        "pbx-operator-execute",
        as_alice(
            &[
                "patch",
                "buc",
                "plan",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"mode":"Execute"}}"#,
            ],
            b"",
        ),
        &NEEDS_EXECUTE,
    );
    // Metadata is not the spec: labels pass.
    as_alice(&["label", "buc", "plan", "-n", &ns, "team=sales"], b"").unwrap();
    refused_by(
        "pbx-operator-execute",
        alice_creates(&ns, &phone_restart("restart")),
        &["phonerestarts/execute", "pbx-operator-executor"],
    );
    refused_by(
        "pbx-operator-execute",
        alice_creates(&ns, &bpc("model", json!({}))),
        &["bulkphonechanges/execute"],
    );
    alice_creates(&ns, &bpc("model-plan", json!({"mode": "Validate"}))).unwrap();
    // Validate only plans, so an editor may prepare a destructive change for review.
    alice_creates(
        &ns,
        &buc(
            "remove-plan",
            json!({"mode": "Validate", "actions": ["Remove"]}),
        ),
    )
    .unwrap();
}

#[test]
fn executor_executes_and_destructive_work_needs_its_own_role() {
    installed();
    let ns = namespace("executor");
    binding(&ns, "pbx-operator-executor", "alice");

    accepted(&ns, &buc("call-group", call_group()));
    alice_creates(&ns, &phone_restart("restart")).unwrap();
    alice_creates(&ns, &bpc("model", json!({}))).unwrap();
    alice_creates(
        &ns,
        &buc("unlock", json!({"actions": ["Unlock", "SendWelcomeEmail"]})),
    )
    .unwrap();

    let msg = refused_by(
        "pbx-operator-destructive",
        alice_creates(&ns, &buc("remove", json!({"actions": ["Remove"]}))),
        &NEEDS_DESTRUCTIVE,
    );
    assert!(msg.contains("the action Remove needs"), "{msg}");
    refused_by(
        "pbx-operator-destructive",
        alice_creates(
            &ns,
            &buc(
                "reset",
                json!({"actions": ["Unlock", "ResetPassword", "ResetTwoFactor"]}),
            ),
        ),
        &[
            "ResetPassword, ResetTwoFactor",
            "bulkuserchanges/destructive",
        ],
    );
    refused_by(
        "pbx-operator-destructive",
        alice_creates(&ns, &user_recycle("recycle")),
        &["userrecycles/destructive", "pbx-operator-destructive"],
    );
    alice_creates(
        &ns,
        &buc(
            "remove-plan",
            json!({"mode": "Validate", "actions": ["Remove"]}),
        ),
    )
    .unwrap();
    let to_execute = [
        "patch",
        "buc",
        "remove-plan",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"mode":"Execute"}}"#,
    ];
    refused_by(
        "pbx-operator-destructive",
        as_alice(&to_execute, b""),
        &NEEDS_DESTRUCTIVE,
    );

    binding(&ns, "pbx-operator-destructive", "alice");
    accepted(&ns, &buc("remove", json!({"actions": ["Remove"]})));
    alice_creates(&ns, &user_recycle("recycle")).unwrap();
    as_alice(&to_execute, b"").unwrap();
    // Destructive alone does not execute.
    let other = namespace("destructive-only");
    binding(&other, "pbx-operator-destructive", "alice");
    binding(&other, "pbx-operator-editor", "alice");
    accepted(&other, &buc("plan", validate_call_group()));
    refused_by(
        "pbx-operator-execute",
        alice_creates(
            &other,
            &buc("remove", json!({"mode": "Execute", "actions": ["Unlock"]})),
        ),
        &NEEDS_EXECUTE,
    );
}

#[test]
fn requested_by_must_be_the_requester() {
    installed();
    let ns = namespace("requested-by");
    binding(&ns, "pbx-operator-executor", "alice");
    accepted(&ns, &buc("warm-up", validate_call_group()));

    let msg = refused_by(
        "pbx-operator-requested-by",
        alice_creates(
            &ns,
            &buc(
                "as-bob",
                with_base(call_group(), json!({"requestedBy": "bob"})),
            ),
        ),
        &["\"bob\"", "\"alice\""],
    );
    assert!(msg.contains("spec.requestedBy"), "{msg}");
    alice_creates(
        &ns,
        &buc(
            "as-alice",
            with_base(call_group(), json!({"requestedBy": "alice"})),
        ),
    )
    .unwrap();
    refused_by(
        "pbx-operator-requested-by",
        as_alice(
            &[
                "patch",
                "buc",
                "as-alice",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"requestedBy":"bob"}}"#,
            ],
            b"",
        ),
        &["\"bob\""],
    );
}

#[test]
fn a_broad_role_on_the_api_group_does_not_execute() {
    installed();
    let ns = namespace("broad");
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "everything-pbx", "namespace": ns},
        "rules": [{"apiGroups": ["pbx-operator.io"], "resources": ["*"], "verbs": ["*"]}],
    });
    kubectl_stdin(
        admin_kubeconfig(),
        &["apply", "-f", "-"],
        role.to_string().as_bytes(),
    );
    admin(&[
        "create",
        "rolebinding",
        "alice-everything",
        "-n",
        &ns,
        "--role=everything-pbx",
        "--user=alice",
    ]);

    accepted(&ns, &buc("plan", validate_call_group()));
    refused_by(
        "pbx-operator-execute",
        alice_creates(&ns, &buc("run", call_group())),
        &NEEDS_EXECUTE,
    );
    refused_by(
        "pbx-operator-execute",
        alice_creates(&ns, &phone_restart("restart")),
        &["phonerestarts/execute"],
    );
    // Why the permissions live in an API group of their own: in pbx-operator.io, resources ["*"]
    // matches every subresource, so a check there would have let this role execute.
    assert!(allowed(
        None,
        &ns,
        "create",
        "pbx-operator.io",
        "bulkuserchanges/execute"
    ));
    assert!(!allowed(
        None,
        &ns,
        "create",
        PERMISSIONS,
        "bulkuserchanges/execute"
    ));
}

#[test]
fn built_in_roles_aggregate_the_pbx_roles() {
    installed();
    // The controller manager aggregates the labelled ClusterRoles into view, edit and admin.
    poll(
        SETTLE,
        "view, edit and admin to aggregate the pbx-operator roles",
        || {
            let text = |role: &str| admin(&["get", "clusterrole", role, "-o", "json"]);
            let (view, edit, admin_role) = (text("view"), text("edit"), text("admin"));
            let ok = view.contains("pbx-operator.io")
                && edit.contains("pbx-operator.io")
                && !edit.contains("permissions.pbx-operator.io")
                && admin_role.contains("bulkuserchanges/execute")
                && admin_role.contains("userrecycles/destructive");
            if ok {
                Ok(())
            } else {
                Err(format!("edit: {edit}\nadmin: {admin_role}"))
            }
        },
    );
    let edit = namespace("builtin-edit");
    binding(&edit, "edit", "alice");
    accepted(&edit, &buc("plan", validate_call_group()));
    refused_by(
        "pbx-operator-execute",
        alice_creates(&edit, &buc("run", call_group())),
        &NEEDS_EXECUTE,
    );
    let adm = namespace("builtin-admin");
    binding(&adm, "admin", "alice");
    accepted(&adm, &buc("remove", json!({"actions": ["Remove"]})));
    alice_creates(&adm, &user_recycle("recycle")).unwrap();
}

/// The API group of the virtual `<plural>/execute` and `<plural>/destructive` permissions.
const PERMISSIONS: &str = "permissions.pbx-operator.io";

/// Whether `user` (impersonated; None: alice herself) may `verb` `resource` (`plural[/sub]`) of
/// `group` in `ns`, by a SelfSubjectAccessReview: `kubectl auth can-i` cannot ask about a group
/// the API server does not serve (it drops the group), and permissions.pbx-operator.io is one.
fn allowed(user: Option<&str>, ns: &str, verb: &str, group: &str, resource: &str) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {
            "namespace": ns, "verb": verb, "group": group, "resource": resource, "subresource": subresource,
        }},
    });
    let cp = control_plane();
    let (kubeconfig, mut args) = match user {
        Some(user) => (&cp.admin_kubeconfig, vec!["--as", user]),
        None => (&cp.user_kubeconfig, vec![]),
    };
    // --validate=false: kubectl would look up the schema, which needs listing CRDs.
    args.extend([
        "create",
        "--validate=false",
        "-f",
        "-",
        "-o",
        "jsonpath={.status.allowed}",
    ]);
    kubectl_stdin(kubeconfig, &args, review.to_string().as_bytes()).trim() == "true"
}

/// `kubectl auth can-i --as <user> <args>` with the admin kubeconfig.
fn can_i(user: &str, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i", "--as", user];
    all.extend_from_slice(args);
    let (ok, out, err) = try_kubectl(admin_kubeconfig(), &all, b"");
    let answer = out.trim();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {} answered {out:?}: {err}",
        all.join(" ")
    );
    ok && answer == "yes"
}

/// Waits until RBAC has seen the bindings of a release just installed: `user` may `args`.
fn settled(user: &str, args: &[&str]) {
    poll(SETTLE, &format!("{user} to be allowed {args:?}"), || {
        if can_i(user, args) {
            Ok(())
        } else {
            Err("no".into())
        }
    });
}

#[test]
fn operator_service_account_has_exactly_what_it_uses() {
    installed();
    let ns = namespace("operator-sa");
    let secret = format!("secret/{SECRET}");
    settled(OPERATOR, &["list", "bulkuserchanges.pbx-operator.io", "-A"]);
    for (args, expected) in [
        (&["list", "bulkuserchanges.pbx-operator.io", "-A"][..], true),
        (&["watch", "userrecycles.pbx-operator.io", "-A"], true),
        (
            &[
                "patch",
                "bulkuserchanges.pbx-operator.io",
                "--subresource=status",
                "-n",
                &ns,
            ],
            true,
        ),
        (
            &[
                "update",
                "phonerestarts.pbx-operator.io",
                "--subresource=status",
                "-n",
                &ns,
            ],
            true,
        ),
        (&["create", "configmaps", "-n", &ns], true),
        (&["delete", "configmaps", "-n", &ns], true),
        (&["create", "events", "-n", &ns], true),
        (&["create", "events.events.k8s.io", "-n", &ns], true),
        (&["get", &secret, "-n", &ns], true),
        (
            &["create", "leases.coordination.k8s.io", "-n", RELEASE_NS],
            true,
        ),
        (
            &[
                "update",
                "leases.coordination.k8s.io/pbx-operator",
                "-n",
                RELEASE_NS,
            ],
            true,
        ),
        // and nothing else
        (&["get", "secret/other", "-n", &ns], false),
        (&["list", "secrets", "-n", &ns], false),
        (&["watch", "secrets", "-A"], false),
        (
            &["create", "bulkuserchanges.pbx-operator.io", "-n", &ns],
            false,
        ),
        (
            &["delete", "bulkuserchanges.pbx-operator.io", "-n", &ns],
            false,
        ),
        (&["create", "leases.coordination.k8s.io", "-n", &ns], false),
        (
            &[
                "get",
                "leases.coordination.k8s.io/someone-else",
                "-n",
                RELEASE_NS,
            ],
            false,
        ),
        (&["create", "pods", "-n", &ns], false),
        (&["list", "namespaces"], false),
    ] {
        assert_eq!(
            can_i(OPERATOR, args),
            expected,
            "kubectl auth can-i --as {OPERATOR} {}",
            args.join(" ")
        );
    }
    for virtual_resource in ["bulkuserchanges/execute", "userrecycles/destructive"] {
        assert!(
            !allowed(Some(OPERATOR), &ns, "create", PERMISSIONS, virtual_resource),
            "{virtual_resource}"
        );
    }

    // The policies never stand in the operator's way: status and metadata of a UserRecycle (which
    // needs execute and destructive, neither of which the operator has) can be written.
    kubectl_stdin(
        admin_kubeconfig(),
        &["create", "-n", &ns, "-f", "-"],
        &user_recycle("leaver"),
    );
    let as_operator = |args: &[&str]| {
        let mut all = vec!["--as", OPERATOR, "-n", ns.as_str()];
        all.extend_from_slice(args);
        let (ok, _, err) = try_kubectl(admin_kubeconfig(), &all, b"");
        assert!(ok, "the operator could not {}: {err}", args.join(" "));
    };
    as_operator(&[
        "patch",
        "urc",
        "leaver",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"observedGeneration":1}}"#,
    ]);
    as_operator(&["label", "urc", "leaver", "pbx-operator.io/seen=yes"]);
    as_operator(&[
        "patch",
        "urc",
        "leaver",
        "--type=merge",
        "-p",
        r#"{"spec":{"reset":["Name"]}}"#,
    ]);
}

#[test]
fn scheduled_restart_service_account_creates_phone_restarts() {
    installed();
    let sa = format!("system:serviceaccount:{NIGHTLY_NS}:{NIGHTLY}");
    let cm = format!("configmap/{NIGHTLY}");
    settled(
        &sa,
        &["create", "phonerestarts.pbx-operator.io", "-n", NIGHTLY_NS],
    );
    for (args, expected) in [
        (&["create", "phonerestarts.pbx-operator.io"][..], true),
        (
            &["get", "phonerestarts.pbx-operator.io/nightly-29000000"],
            true,
        ),
        (&["get", cm.as_str()], true),
        (&["get", "configmap/other"], false),
        (&["list", "phonerestarts.pbx-operator.io"], false),
        (
            &["delete", "phonerestarts.pbx-operator.io/nightly-29000000"],
            false,
        ),
        (&["create", "bulkuserchanges.pbx-operator.io"], false),
        (&["get", "secrets"], false),
    ] {
        let mut all = args.to_vec();
        all.extend(["-n", NIGHTLY_NS]);
        assert_eq!(
            can_i(&sa, &all),
            expected,
            "kubectl auth can-i --as {sa} {}",
            all.join(" ")
        );
    }
    assert!(allowed(
        Some(&sa),
        NIGHTLY_NS,
        "create",
        PERMISSIONS,
        "phonerestarts/execute"
    ));
    assert!(!allowed(
        Some(&sa),
        NIGHTLY_NS,
        "create",
        PERMISSIONS,
        "bulkuserchanges/execute"
    ));
    let cron = admin(&["get", "cronjob", NIGHTLY, "-n", NIGHTLY_NS, "-o", "json"]);
    let cron: Value = serde_json::from_str(&cron).unwrap();
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");

    // Run exactly what the CronJob runs, authenticated as its ServiceAccount with a real token:
    // it reads the template, creates the PhoneRestart named after the scheduled time, and the
    // policies let it through. A second run for the same time creates nothing new.
    let args =
        strings(&cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
    let kubeconfig = service_account_kubeconfig(NIGHTLY_NS, NIGHTLY);
    for run in 1..=2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pbx-operator"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig.path())
            .output()
            .expect("running pbx-operator");
        assert!(
            out.status.success(),
            "run {run} of pbx-operator {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let names = admin(&[
        "get",
        "phonerestarts",
        "-n",
        NIGHTLY_NS,
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    let names: Vec<&str> = names.split_whitespace().collect();
    assert_eq!(names.len(), 1, "two runs for one scheduled time: {names:?}");
    assert!(names[0].starts_with("nightly-"), "{names:?}");
}

/// A kubeconfig that authenticates as a ServiceAccount with a short-lived token (TokenRequest).
fn service_account_kubeconfig(ns: &str, name: &str) -> tempfile::NamedTempFile {
    let admin_config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin_kubeconfig()).unwrap()).unwrap();
    let token = admin(&["create", "token", name, "-n", ns, "--duration=10m"]);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin_config["clusters"],
        "users": [{"name": name, "user": {"token": token.trim()}}],
        "contexts": [{"name": name, "context": {
            "cluster": admin_config["clusters"][0]["name"], "user": name, "namespace": ns,
        }}],
        "current-context": name,
    });
    yaml_file(&config.to_string())
}

#[test]
fn single_namespace_install_is_confined_to_its_namespace() {
    installed();
    let cp = control_plane();
    let system = namespace("acme-system");
    let watched = namespace("acme");
    let other = namespace("not-acme");
    let chart = chart_arg();
    // A second release next to the cluster-wide one: the cluster-wide roles and policies come
    // from the first.
    helm::run(&[
        "install",
        "acme",
        &chart,
        "--namespace",
        &system,
        "--kubeconfig",
        cp.admin_kubeconfig.to_str().unwrap(),
        "--set",
        "watchNamespace=acme,secretNames={acme-pbx},userRoles.create=false,admissionPolicies.enabled=false",
    ]);
    let sa = format!("system:serviceaccount:{system}:acme-pbx-operator");
    let deploy = admin(&[
        "get",
        "deployment",
        "acme-pbx-operator",
        "-n",
        &system,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    assert!(deploy.contains(r#""--namespace","acme""#), "{deploy}");
    settled(
        &sa,
        &["list", "bulkuserchanges.pbx-operator.io", "-n", &watched],
    );
    for (args, expected) in [
        (
            &[
                "list",
                "bulkuserchanges.pbx-operator.io",
                "-n",
                watched.as_str(),
            ][..],
            true,
        ),
        (
            &[
                "patch",
                "bulkuserchanges.pbx-operator.io",
                "--subresource=status",
                "-n",
                &watched,
            ],
            true,
        ),
        (&["create", "configmaps", "-n", &watched], true),
        (&["create", "events.events.k8s.io", "-n", &watched], true),
        (&["get", "secret/acme-pbx", "-n", &watched], true),
        (
            &["create", "leases.coordination.k8s.io", "-n", &system],
            true,
        ),
        (&["list", "bulkuserchanges.pbx-operator.io", "-A"], false),
        (
            &["list", "bulkuserchanges.pbx-operator.io", "-n", &other],
            false,
        ),
        (&["create", "configmaps", "-n", &other], false),
        (&["get", "secret/acme-pbx", "-n", &other], false),
        (&["get", "secret/other", "-n", &watched], false),
    ] {
        assert_eq!(
            can_i(&sa, args),
            expected,
            "kubectl auth can-i --as {sa} {}",
            args.join(" ")
        );
    }
}

/// The Grafana dashboard ConfigMap and the PrometheusRule are off by default and render, with
/// their values, when enabled.
#[test]
fn dashboard_and_alerts_render_only_when_enabled() {
    let docs = render(&[]);
    assert!(!docs.iter().any(|d| d["kind"] == "PrometheusRule"));
    assert!(!has(&docs, "ConfigMap", "pbx-operator-dashboard"));
    let docs = render(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.namespace=monitoring",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.notifyFailureRatio=0.25",
        "--set",
        "prometheusRule.labels.release=kube-prometheus-stack",
    ]);
    let cm = find(&docs, "ConfigMap", "pbx-operator-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/pbx-operator.json")).unwrap(),
    )
    .unwrap();
    let rendered: Value =
        serde_json::from_str(cm["data"]["pbx-operator.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        rendered, shipped,
        "the ConfigMap carries the dashboard as shipped"
    );
    let rule = find(&docs, "PrometheusRule", "pbx-operator");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "PbxConnectionNotReady",
            "PbxOperationStalled",
            "PbxNotifyFailureRatioHigh",
            "PbxDriftCorrectionLoop",
            "PbxOperatorNotLeading"
        ]
    );
    let notify = rule["spec"]["groups"][0]["rules"][2]["expr"]
        .as_str()
        .unwrap();
    assert!(notify.trim_end().ends_with("> 0.25"), "{notify}");
    let chart = chart_arg();
    helm::run(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ]);
}
