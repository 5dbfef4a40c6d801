//! `kubectl pbx` against the real control plane, operator and PBX lab: the binary installed as
//! `kubectl-pbx` (a symlink on PATH) and run through the real kubectl's plugin mechanism.

mod support;

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkUserChange, Mode, Phase};
use support::control_plane;
use support::lab::LabSpec;
use support::pbx::Env;

/// A directory holding `kubectl-pbx`, a symlink to the built binary, as a user installs it.
fn plugin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("pbx-plugin-")
            .tempdir()
            .unwrap()
            .keep();
        for name in ["kubectl-pbx", "kubectl_complete-pbx"] {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pbx-operator"), dir.join(name)).unwrap();
        }
        dir
    })
    .clone()
}

fn path_with_plugin() -> String {
    format!(
        "{}:{}",
        plugin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `kubectl pbx ARGS` with the admin kubeconfig in $KUBECONFIG.
fn kubectl_pbx(args: &[&str]) -> Ran {
    let out = Command::new("kubectl")
        .arg("pbx")
        .args(args)
        .env("KUBECONFIG", &control_plane().admin_kubeconfig)
        .env("PATH", path_with_plugin())
        .stdin(Stdio::null())
        .output()
        .expect("kubectl is installed");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> String {
    let r = kubectl_pbx(args);
    assert_eq!(
        r.code,
        0,
        "kubectl pbx {} failed:\n{}\n{}",
        args.join(" "),
        r.stdout,
        r.stderr
    );
    r.stdout
}

async fn buc(env: &Env, name: &str) -> BulkUserChange {
    Api::<BulkUserChange>::namespaced(env.client.clone(), &env.ns)
        .get(name)
        .await
        .unwrap()
}

const CALL_GROUP: &str = r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: call-group }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201", "202"] }
  fields:
    callGroup:   { value: "3", lock: Open }
    pickupGroup: { value: "3" }
  mode: Validate
"#;

#[tokio::test]
async fn plan_then_approve_refuses_a_changed_plan_and_wait_follows_the_run() {
    let env = Env::start(
        "kpbx-approve",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let ns = env.ns.as_str();
    env.apply(CALL_GROUP);
    let validated = env.wait_buc("call-group", &[Phase::Validated]).await;
    let first_hash = validated.status.unwrap().plan.unwrap().hash;

    // The plan as a table: targets, field from -> to, closed fields, common values, warnings.
    let table = ok(&["plan", "buc/call-group", "-n", ns]);
    for want in [
        "bulkuserchange/call-group in ",
        &format!("Plan hash:      {first_hash}"),
        "Targets:        2 (2 would change)",
        "Closed fields:  pickupGroup (reported, never written)",
        "Common values:  callGroup differs between targets",
        "Warnings:       none",
        "TARGET",
    ] {
        assert!(table.contains(want), "missing {want:?} in:\n{table}");
    }
    let line_201 = table.lines().find(|l| l.starts_with("201 ")).unwrap();
    let cells: Vec<&str> = line_201.split_whitespace().collect();
    assert_eq!(
        cells[1..5],
        [
            "Planned",
            "callGroup",
            &env.attribute("201", "pbx.call_group").await.unwrap(),
            "3"
        ],
        "{table}"
    );
    // The same plan as JSON, YAML and CSV, by the full kind name too.
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "plan",
        "bulkuserchange/call-group",
        "-n",
        ns,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["hash"], first_hash.as_str());
    assert_eq!(json["closedFields"], serde_json::json!(["pickupGroup"]));
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&ok(&["plan", "buc/call-group", "-n", ns, "-o", "yaml"])).unwrap();
    assert_eq!(yaml["targets"].as_u64(), Some(2));
    let csv = ok(&["plan", "buc/call-group", "-n", ns, "-o", "csv"]);
    assert!(
        csv.starts_with("target,outcome,field,from,to,actions,notes\n"),
        "{csv}"
    );
    assert!(csv.contains("\n202,Planned,callGroup,"), "{csv}");

    // Approve, asked interactively; the spec changes while the question is open: refused.
    let mut child = Command::new("kubectl")
        .args(["pbx", "approve", "buc/call-group", "-n", ns])
        .env("KUBECONFIG", &control_plane().admin_kubeconfig)
        .env("PATH", path_with_plugin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut asked = String::new();
    let mut buf = [0u8; 256];
    while !asked.contains("[y/N]") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "approve ended without asking: {asked}");
        asked.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        asked.contains("Execute this plan (2 targets, 2 changing"),
        "{asked}"
    );
    Api::<BulkUserChange>::namespaced(env.client.clone(), ns)
        .patch(
            "call-group",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"fields": {"callGroup": {"value": "4", "lock": "Open"}}}})),
        )
        .await
        .unwrap();
    child.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "approve of a changed plan must fail");
    assert!(
        rest.contains("not approved: the plan changed since it was shown: the spec changed"),
        "{rest}"
    );
    let b = buc(&env, "call-group").await;
    assert_eq!(b.spec.mode, Mode::Validate, "nothing approved");
    assert_eq!(b.spec.approved_plan_hash, None, "nothing approved");

    // The new plan differs; approving with the hash reviewed earlier is refused too.
    let revalidated = env.wait_buc("call-group", &[Phase::Validated]).await;
    let second_hash = revalidated.status.unwrap().plan.unwrap().hash;
    assert_ne!(first_hash, second_hash);
    let stale = kubectl_pbx(&[
        "approve",
        "buc/call-group",
        "-n",
        ns,
        "--yes",
        "--hash",
        &first_hash,
    ]);
    assert_ne!(stale.code, 0);
    assert!(
        stale
            .stderr
            .contains("the plan changed since you reviewed it"),
        "{}",
        stale.stderr
    );
    assert_eq!(buc(&env, "call-group").await.spec.mode, Mode::Validate);

    // The reviewed, current plan: one patch sets mode and hash; wait follows it to Succeeded.
    let approved = ok(&[
        "approve",
        "buc/call-group",
        "-n",
        ns,
        "--yes",
        "--hash",
        &second_hash,
    ]);
    assert!(
        approved.contains("bulkuserchange/call-group approved: mode Execute, approvedPlanHash"),
        "{approved}"
    );
    let b = buc(&env, "call-group").await;
    assert_eq!(b.spec.mode, Mode::Execute);
    assert_eq!(
        b.spec.approved_plan_hash.as_deref(),
        Some(second_hash.as_str())
    );
    let waited = kubectl_pbx(&["wait", "buc/call-group", "-n", ns, "--timeout", "90s"]);
    assert_eq!(waited.code, 0, "{}\n{}", waited.stdout, waited.stderr);
    assert!(
        waited
            .stdout
            .contains("bulkuserchange/call-group Succeeded"),
        "{}",
        waited.stdout
    );
    assert!(
        waited.stderr.contains("2/2 100%"),
        "the progress bar: {}",
        waited.stderr
    );
    assert_eq!(
        env.attribute("201", "pbx.call_group").await.as_deref(),
        Some("4")
    );

    // Results: every target as CSV, like `pbx-operator results`.
    let results = ok(&["results", "buc/call-group", "-n", ns]);
    assert!(
        results.starts_with("target,outcome,changes,actions,notes\n"),
        "{results}"
    );
    assert_eq!(results.matches(",Changed,").count(), 2, "{results}");

    // The printer columns show a run's progress.
    let wide = support::kubectl(
        &control_plane().admin_kubeconfig,
        &["get", "buc", "call-group", "-n", ns],
    );
    assert!(
        wide.lines().next().unwrap().contains("BATCHES DONE"),
        "{wide}"
    );
}

/// A kubeconfig whose current context points nowhere, plus the admin context: only
/// `--kubeconfig FILE --context admin@...` reaches the cluster.
fn kubeconfig_with_a_wrong_current_context(dir: &Path) -> (PathBuf, String) {
    let admin = &control_plane().admin_kubeconfig;
    let file = dir.join("two-contexts.kubeconfig");
    std::fs::copy(admin, &file).unwrap();
    let context = support::kubectl(admin, &["config", "current-context"])
        .trim()
        .to_string();
    let file_s = file.to_str().unwrap();
    for args in [
        vec![
            "config",
            "--kubeconfig",
            file_s,
            "set-cluster",
            "nowhere",
            "--server",
            "https://127.0.0.1:1",
        ],
        vec![
            "config",
            "--kubeconfig",
            file_s,
            "set-context",
            "nowhere",
            "--cluster",
            "nowhere",
            "--user",
            "admin",
        ],
        vec!["config", "--kubeconfig", file_s, "use-context", "nowhere"],
    ] {
        let out = Command::new("kubectl").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (file, context)
}

#[tokio::test]
async fn wait_exits_non_zero_on_failed_and_partially_failed_and_status_lists_every_operation() {
    let env = Env::start(
        "kpbx-wait",
        LabSpec {
            users: 10,
            phones: 2,
            silent: 1,
            ..Default::default()
        },
        false,
    )
    .await;
    let ns = env.ns.as_str();
    // Failed: the change names a Secret that is not labelled usable-by-changes.
    env.apply(
        r#"apiVersion: v1
kind: Secret
metadata: { name: vm-pins }
stringData: { pin: "4321" }
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: pins }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["204"] }
  fields:
    voicemailPin: { valueFrom: { secretKeyRef: { name: vm-pins, key: pin } }, lock: Open }
"#,
    );
    let failed = kubectl_pbx(&["wait", "bulkuserchanges/pins", "-n", ns, "--timeout", "60s"]);
    assert_eq!(failed.code, 1, "{}\n{}", failed.stdout, failed.stderr);
    assert!(
        failed.stdout.contains("bulkuserchange/pins Failed"),
        "{}",
        failed.stdout
    );

    // PartiallyFailed: one phone never answers its NOTIFY (408).
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 4, perSecond: 20 }
  confirm: { timeout: 8s }
"#,
    );
    let partial = kubectl_pbx(&["wait", "prs/everyone", "-n", ns, "--timeout", "90s"]);
    assert_eq!(partial.code, 1, "{}\n{}", partial.stdout, partial.stderr);
    assert!(
        partial
            .stdout
            .contains("phonerestart/everyone PartiallyFailed"),
        "{}",
        partial.stdout
    );
    assert!(partial.stderr.contains("3/3 100%"), "{}", partial.stderr);

    // A Validated change, so status shows one that has not run.
    env.apply(&CALL_GROUP.replace("call-group }", "later }"));
    env.wait_buc("later", &[Phase::Validated]).await;
    let waited = kubectl_pbx(&["wait", "buc/later", "-n", ns]);
    assert_eq!(waited.code, 0, "{}", waited.stderr);
    assert!(
        waited.stdout.contains("nothing runs until it is approved"),
        "{}",
        waited.stdout
    );

    // status: every operation with phase, progress and age; through --kubeconfig and --context.
    let dir = tempfile::tempdir().unwrap();
    let (file, context) = kubeconfig_with_a_wrong_current_context(dir.path());
    let direct = |args: &[&str]| {
        Command::new(plugin_dir().join("kubectl-pbx"))
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let wrong = direct(&["status", "-n", ns, "--kubeconfig", file.to_str().unwrap()]);
    assert!(
        !wrong.status.success(),
        "the current context points nowhere"
    );
    let out = direct(&[
        "status",
        "-n",
        ns,
        "--kubeconfig",
        file.to_str().unwrap(),
        "--context",
        &context,
    ]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..5],
        ["OPERATION", "PHASE", "PROGRESS", "TARGETS", "AGE"],
        "{table}"
    );
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("{name} not in:\n{table}"))
    };
    assert_eq!(
        row("buc/later")[1..4],
        ["Validated", "0%", "0/2"],
        "{table}"
    );
    assert_eq!(row("buc/pins")[1..3], ["Failed", "100%"], "{table}");
    assert_eq!(
        row("buc/pins")[5..],
        ["Stalled:", "SecretNotUsable"],
        "{table}"
    );
    assert_eq!(
        row("prs/everyone")[1..4],
        ["PartiallyFailed", "100%", "3/3"],
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["status", "-n", ns, "-o", "json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3, "{json}");

    // create phone-restart and export users, through the plugin.
    let template = dir.path().join("night.yaml");
    std::fs::write(
        &template,
        "connectionRef: { name: acme }\ntargets: { groups: [sales] }\n",
    )
    .unwrap();
    let created = ok(&[
        "create",
        "phone-restart",
        "--from",
        template.to_str().unwrap(),
        "-n",
        ns,
    ]);
    assert!(
        created.contains("phonerestart.pbx-operator.io/night-"),
        "{created}"
    );
    let users = ok(&["export", "users", "--connection", "acme", "-n", ns]);
    assert!(users.starts_with("extension,"), "{users}");
    assert_eq!(users.lines().count(), 11, "header and 10 users: {users}");

    // `kubectl pbx <TAB>` through kubectl's own plugin completion (kubectl_complete-pbx).
    let complete = |words: &[&str]| {
        let out = Command::new("kubectl")
            .args(["__complete", "pbx"])
            .args(words)
            .env("KUBECONFIG", &control_plane().admin_kubeconfig)
            .env("PATH", path_with_plugin())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let subcommands = complete(&["st"]);
    assert!(subcommands.starts_with("status\t"), "{subcommands}");
    let names = complete(&["-n", ns, "wait", "prs/ev"]);
    assert_eq!(names.lines().next(), Some("prs/everyone"), "{names}");
    let kinds = complete(&["approve", ""]);
    assert!(
        kinds.contains("buc/\tbulkuserchange") && !kinds.contains("prs/"),
        "{kinds}"
    );

    // Shell completion scripts for bash and zsh.
    let bash = ok(&["completion", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("kubectl-pbx"),
        "{bash}"
    );
    let zsh = ok(&["completion", "zsh"]);
    assert!(zsh.starts_with("#compdef kubectl-pbx"), "{zsh}");
}

/// The krew manifest installs the crate's binary under the name kubectl finds as `pbx`.
#[test]
fn krew_manifest_installs_the_binary_as_kubectl_pbx() {
    let text = std::fs::read_to_string(support::repo_root().join("krew/pbx.yaml")).unwrap();
    let m: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        m["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(m["kind"].as_str(), Some("Plugin"));
    assert_eq!(m["metadata"]["name"].as_str(), Some("pbx"));
    assert_eq!(
        m["spec"]["version"].as_str(),
        Some(format!("v{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the manifest's version is the crate's"
    );
    let short = m["spec"]["shortDescription"].as_str().unwrap();
    assert!(short.len() <= 50, "krew wants a short description: {short}");
    let platforms = m["spec"]["platforms"].as_sequence().unwrap();
    assert!(!platforms.is_empty());
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pbx-operator"));
    let binary_name = exe.file_name().unwrap().to_str().unwrap();
    for p in platforms {
        assert_eq!(p["selector"]["matchLabels"]["os"].as_str(), Some("linux"));
        let sha = p["sha256"].as_str().unwrap();
        assert!(
            sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
            "{sha}"
        );
        let version = m["spec"]["version"].as_str().unwrap();
        assert!(p["uri"].as_str().unwrap().contains(version), "{p:?}");
        assert_eq!(p["bin"].as_str(), Some("kubectl-pbx"));
        let files = p["files"].as_sequence().unwrap();
        // Install as krew does: copy each `from` of the archive (the built binary) to `to`.
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            assert_eq!(f["from"].as_str(), Some(binary_name), "{f:?}");
            let to = dir.path().join(f["to"].as_str().unwrap());
            std::fs::copy(&exe, &to).unwrap();
        }
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap()
        );
        let listed = Command::new("kubectl")
            .args(["plugin", "list", "--name-only"])
            .env("PATH", &path)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.lines().any(|l| l.trim() == "kubectl-pbx"),
            "{listed}"
        );
        let help = Command::new("kubectl")
            .args(["pbx", "--help"])
            .env("PATH", &path)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("Usage: kubectl pbx"), "{help}");
        for command in [
            "plan",
            "approve",
            "wait",
            "status",
            "results",
            "export",
            "create",
            "completion",
        ] {
            assert!(
                help.contains(&format!("  {command} ")),
                "{command} missing in:\n{help}"
            );
        }
    }
}
