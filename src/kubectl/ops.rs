//! What the plugin's commands do against the API server: read an operation, build what
//! [`super::format`] prints, patch an approval, poll a run.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};

use super::format::{self, PlanRow, PlanView, StatusLine};
use super::{Kind, Output, client};
use crate::api::{OperationStatus, Phase};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Usage(String),
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cli(#[from] crate::cli::CliError),
    #[error("cannot write the output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot print the plan: {0}")]
    Encode(String),
}

type Status = OperationStatus<serde_json::Value>;

/// The namespace to use: -n, else the kubeconfig context's.
pub async fn namespace_or_default(ns: Option<String>) -> Result<String, PluginError> {
    match ns {
        Some(ns) => Ok(ns),
        None => Ok(client().await?.default_namespace().to_string()),
    }
}

struct Found {
    api: Api<DynamicObject>,
    obj: DynamicObject,
    status: Status,
    namespace: String,
}

async fn get(ns: Option<String>, kind: Kind, name: &str) -> Result<Found, PluginError> {
    let client = client().await?;
    let namespace = ns.unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &kind.resource());
    let obj = api.get_opt(name).await?.ok_or_else(|| {
        PluginError::Usage(format!(
            "{}/{name} not found in namespace {namespace}",
            kind.singular()
        ))
    })?;
    let status = status_of(&obj);
    Ok(Found {
        api,
        obj,
        status,
        namespace,
    })
}

fn status_of(obj: &DynamicObject) -> Status {
    serde_json::from_value(obj.data["status"].clone()).unwrap_or_default()
}

/// The plan of `obj` with every target the results ConfigMaps hold (status's 100 otherwise).
async fn plan_view(found: &Found, kind: Kind, name: &str) -> Result<PlanView, PluginError> {
    let Found {
        obj,
        status,
        namespace,
        ..
    } = found;
    let plan = status.plan.clone().ok_or_else(|| {
        PluginError::Usage(format!(
            "{}/{name} has no plan yet (status.plan is empty): wait until the operator has planned it",
            kind.singular()
        ))
    })?;
    let mut rows = Vec::new();
    let mut from_configmaps = !status.results_refs.is_empty();
    if from_configmaps {
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client().await?, namespace);
        for r in &status.results_refs {
            let text = match cms.get_opt(r).await? {
                Some(cm) => crate::controllers::results_store::rows_text(&cm).unwrap_or_default(),
                None => {
                    from_configmaps = false;
                    break;
                }
            };
            match crate::plan::stored::from_jsonl(&text) {
                Ok(stored) => rows.extend(stored.into_iter().map(|r| PlanRow {
                    target: r.target,
                    outcome: r.outcome,
                    changes: r.changes,
                    actions: r.actions,
                    notes: r.notes,
                })),
                Err(_) => {
                    from_configmaps = false;
                    break;
                }
            }
        }
    }
    if !from_configmaps {
        rows = status
            .results
            .iter()
            .map(|r| PlanRow {
                target: r.target.clone(),
                outcome: r.outcome,
                changes: r.changes.clone(),
                actions: vec![],
                notes: r.notes.clone(),
            })
            .collect();
    }
    let rows_missing = (plan.targets as usize).saturating_sub(rows.len()) as u32;
    let mode = obj.data["spec"]["mode"]
        .as_str()
        .unwrap_or("Execute")
        .to_string();
    let mut warnings = status.warnings.clone();
    if let Some(c) = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::controllers::conditions::STALLED && c.status == "True")
    {
        warnings.push(format!("Stalled ({}): {}", c.reason, c.message));
    }
    Ok(PlanView {
        resource: format!("{}/{name}", kind.singular()),
        namespace: namespace.clone(),
        phase: status.phase,
        mode,
        hash: plan.hash,
        plan_generation: plan.generation,
        generation: obj.metadata.generation.unwrap_or(0),
        targets: plan.targets,
        changes: plan.changes,
        common_values: plan.common_values,
        closed_fields: plan.closed_fields,
        warnings,
        rows,
        rows_missing,
    })
}

fn print_plan(view: &PlanView, output: Output) -> Result<(), PluginError> {
    let text = match output {
        Output::Table => format::plan_table(view),
        Output::Csv => format::plan_csv(view),
        Output::Json => {
            serde_json::to_string_pretty(view).map_err(|e| PluginError::Encode(e.to_string()))?
                + "\n"
        }
        Output::Yaml => {
            serde_yaml::to_string(view).map_err(|e| PluginError::Encode(e.to_string()))?
        }
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

pub async fn plan(
    ns: Option<String>,
    kind: Kind,
    name: &str,
    output: Output,
) -> Result<ExitCode, PluginError> {
    let found = get(ns, kind, name).await?;
    let view = plan_view(&found, kind, name).await?;
    print_plan(&view, output)?;
    Ok(ExitCode::SUCCESS)
}

/// Why a plan cannot be approved as it stands, if it cannot.
fn not_approvable(view: &PlanView, observed: Option<i64>) -> Option<String> {
    if !view.current() || observed != Some(view.generation) {
        return Some(format!(
            "the plan is for generation {} but the spec is at {}: wait until the operator has planned the current spec (kubectl pbx plan {})",
            view.plan_generation, view.generation, view.resource
        ));
    }
    if view.phase != Phase::Validated {
        return Some(format!(
            "{} is {:?}, not Validated: only a validated plan (mode: Validate) can be approved",
            view.resource, view.phase
        ));
    }
    None
}

pub async fn approve(
    ns: Option<String>,
    kind: Kind,
    name: &str,
    yes: bool,
    reviewed: Option<String>,
) -> Result<ExitCode, PluginError> {
    if !kind.approvable() {
        return Err(PluginError::Usage(format!(
            "{} has no plan to approve (only bulkuserchange and bulkphonechange do)",
            kind.singular()
        )));
    }
    let found = get(ns, kind, name).await?;
    let view = plan_view(&found, kind, name).await?;
    if let Some(why) = not_approvable(&view, found.status.observed_generation) {
        return Err(PluginError::Usage(format!("not approved: {why}")));
    }
    if let Some(h) = &reviewed
        && h != &view.hash
    {
        return Err(PluginError::Usage(format!(
            "not approved: the plan changed since you reviewed it (you reviewed {h}, it is now {}); review it again with kubectl pbx plan {}",
            view.hash, view.resource
        )));
    }
    print_plan(&view, Output::Table)?;
    let shown = view.hash.clone();
    if !yes {
        eprint!(
            "\nExecute this plan ({} targets, {} changing, hash {})? [y/N] ",
            view.targets,
            view.changes,
            &shown[..12.min(shown.len())]
        );
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            eprintln!("not approved; nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    // One patch, preconditioned on the resourceVersion the shown plan was read at: anything
    // written since (a spec edit, a new plan) makes the API server answer 409.
    let mut version = found.obj.metadata.resource_version.clone();
    let mut generation = view.generation;
    for _ in 0..5 {
        let body = serde_json::json!({
            "metadata": { "resourceVersion": version },
            "spec": { "mode": "Execute", "approvedPlanHash": shown },
        });
        match found
            .api
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                println!(
                    "{} approved: mode Execute, approvedPlanHash {shown}",
                    view.resource
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Something was written since: approve only if it left the shown plan as it was
                // (e.g. the operator refreshed a condition), otherwise refuse.
                let now = get(Some(found.namespace.clone()), kind, name).await?;
                let current = plan_view(&now, kind, name).await.ok();
                let same = current.as_ref().is_some_and(|c| {
                    c.hash == shown
                        && c.generation == generation
                        && not_approvable(c, now.status.observed_generation).is_none()
                });
                if !same {
                    let what = match &current {
                        Some(c) if c.generation != generation => format!(
                            "the spec changed (generation {generation} -> {})",
                            c.generation
                        ),
                        Some(c) if c.hash != shown => {
                            format!("the plan hash changed ({shown} -> {})", c.hash)
                        }
                        Some(c) => format!("it is {:?} now", c.phase),
                        None => "it has no plan now".to_string(),
                    };
                    return Err(PluginError::Usage(format!(
                        "not approved: the plan changed since it was shown: {what}; nothing was changed. Review it again with kubectl pbx plan {}",
                        view.resource
                    )));
                }
                version = now.obj.metadata.resource_version.clone();
                generation = now.obj.metadata.generation.unwrap_or(generation);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(PluginError::Usage(
        "not approved: the resource kept changing while approving; try again".into(),
    ))
}

fn stalled_reason(status: &Status) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::controllers::conditions::STALLED && c.status == "True")
        .map(|c| c.reason.clone())
}

fn progress_of(status: &Status) -> (u64, u64) {
    format::progress(
        status.phase,
        status.summary.as_ref(),
        status.plan.as_ref().map(|p| p.targets as u64).unwrap_or(0),
    )
}

fn seconds_since(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    let now = jiff::Timestamp::now();
    (now.as_millisecond() - t.0.as_millisecond()) as f64 / 1000.0
}

pub async fn status(
    ns: Option<String>,
    all_namespaces: bool,
    output: Output,
) -> Result<ExitCode, PluginError> {
    let client = client().await?;
    let namespace = ns.unwrap_or_else(|| client.default_namespace().to_string());
    let mut lines = Vec::new();
    for kind in Kind::ALL {
        let api: Api<DynamicObject> = if all_namespaces {
            Api::all_with(client.clone(), &kind.resource())
        } else {
            Api::namespaced_with(client.clone(), &namespace, &kind.resource())
        };
        let mut objs = api.list(&ListParams::default()).await?.items;
        objs.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        for obj in objs {
            let status = status_of(&obj);
            let (done, targets) = progress_of(&status);
            let name = obj.metadata.name.clone().unwrap_or_default();
            let resource = if all_namespaces {
                format!(
                    "{}/{}/{name}",
                    obj.metadata.namespace.clone().unwrap_or_default(),
                    kind.short()
                )
            } else {
                format!("{}/{name}", kind.short())
            };
            lines.push(StatusLine {
                resource,
                phase: status.phase,
                done,
                targets,
                percent: format::percent(status.phase, done, targets),
                age_seconds: obj
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| seconds_since(t) as i64)
                    .unwrap_or(0),
                stalled: stalled_reason(&status),
            });
        }
    }
    let text = match output {
        Output::Csv => format::status_csv(&lines),
        Output::Table => {
            if lines.is_empty() {
                format!("No pbx operations in namespace {namespace}.\n")
            } else {
                format::status_table(&lines)
            }
        }
        Output::Json => {
            serde_json::to_string_pretty(&lines).map_err(|e| PluginError::Encode(e.to_string()))?
                + "\n"
        }
        Output::Yaml => {
            serde_yaml::to_string(&lines).map_err(|e| PluginError::Encode(e.to_string()))?
        }
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

pub async fn wait(
    ns: Option<String>,
    kind: Kind,
    name: &str,
    timeout: Option<Duration>,
) -> Result<ExitCode, PluginError> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut namespace = ns;
    loop {
        let found = get(namespace.clone(), kind, name).await?;
        namespace = Some(found.namespace.clone());
        let status = &found.status;
        let current = status.observed_generation.is_some()
            && status.observed_generation == found.obj.metadata.generation;
        let (done, total) = progress_of(status);
        let elapsed = status
            .start_time
            .as_ref()
            .map(|t| {
                let end = status
                    .completion_time
                    .as_ref()
                    .filter(|_| format::finished(status.phase))
                    .map(seconds_since)
                    .unwrap_or(0.0);
                seconds_since(t) - end
            })
            .unwrap_or_else(|| started.elapsed().as_secs_f64());
        let bar = format::progress_bar(status.phase, done, total, elapsed, 30);
        let resource = format!("{}/{name}", kind.singular());
        if tty {
            eprint!("\r\x1b[2K{resource} {bar}");
        } else {
            let key = format!("{done}/{total} {:?}", status.phase);
            if key != last_line {
                eprintln!("{resource} {bar}");
                last_line = key;
            }
        }
        std::io::stderr().flush().ok();
        let mode = found.obj.data["spec"]["mode"].as_str().unwrap_or("Execute");
        if current && format::finished(status.phase) {
            if tty {
                eprintln!();
            }
            let ready = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            println!("{resource} {:?}: {ready}", status.phase);
            return Ok(if status.phase == Phase::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if current && status.phase == Phase::Validated && mode == "Validate" {
            if tty {
                eprintln!();
            }
            println!(
                "{resource} is Validated and mode is Validate: nothing runs until it is approved (kubectl pbx approve {resource})"
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(t) = timeout
            && started.elapsed() >= t
        {
            if tty {
                eprintln!();
            }
            eprintln!("{resource}: still {:?} after {t:?}", status.phase);
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
