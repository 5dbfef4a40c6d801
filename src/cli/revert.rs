//! `pbx-operator revert <kind>/<name>`: the resource that undoes a finished change, printed as
//! YAML (for a GitOps commit) or, with `--apply`, created.

use std::io::Write;

use clap::Args;
use kube::api::{Api, ObjectMeta, PostParams};

use super::CliError;
use crate::api::{BulkUserChange, BulkUserChangeSpec, Mode, RevertOf};

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// `<kind>/<name>` of the finished change to undo; kind is bulkuserchange (buc).
    pub target: String,
    /// Namespace of the change (default: the kubeconfig's namespace).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Create the revert instead of printing it.
    #[arg(long)]
    pub apply: bool,
    /// Execute the revert as soon as it is planned (default: mode Validate, to review its plan
    /// first and execute it with spec.approvedPlanHash).
    #[arg(long)]
    pub execute: bool,
}

/// The name of the revert of `name`: `<name>-revert`, cut to the 253 characters a name may have.
pub fn revert_name(name: &str) -> String {
    let mut base: String = name.chars().take(253 - "-revert".len()).collect();
    base = base.trim_end_matches(['-', '.']).to_string();
    format!("{base}-revert")
}

/// The BulkUserChange that reverts `original`.
pub fn user_change_revert(original: &BulkUserChange, execute: bool) -> BulkUserChange {
    let name = original.metadata.name.clone().unwrap_or_default();
    BulkUserChange {
        metadata: ObjectMeta {
            name: Some(revert_name(&name)),
            namespace: original.metadata.namespace.clone(),
            ..Default::default()
        },
        spec: BulkUserChangeSpec {
            connection_ref: original.spec.connection_ref.clone(),
            targets: None,
            fields: None,
            actions: vec![],
            source: None,
            mode: if execute {
                Mode::Execute
            } else {
                Mode::Validate
            },
            approved_plan_hash: None,
            failure_policy: Default::default(),
            policy: Default::default(),
            interval: None,
            revert_of: Some(RevertOf { name }),
            requested_by: None,
        },
        status: None,
    }
}

pub async fn revert(args: &RevertArgs) -> Result<(), CliError> {
    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| CliError::Usage(format!("expected <kind>/<name>, got {:?}", args.target)))?;
    match kind.to_ascii_lowercase().as_str() {
        "bulkuserchange" | "bulkuserchanges" | "buc" => {}
        other => {
            return Err(CliError::Usage(format!(
                "cannot revert kind {other:?} yet: only bulkuserchange can be reverted"
            )));
        }
    }
    let client = kube::Client::try_default().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<BulkUserChange> = Api::namespaced(client, &namespace);
    let original = api.get(name).await?;
    let mut revert = user_change_revert(&original, args.execute);
    revert.metadata.namespace = Some(namespace);
    let mut value = serde_json::to_value(&revert).expect("resources serialize");
    if let Some(o) = value.as_object_mut() {
        o.remove("status");
    }
    if args.apply {
        let created = api.create(&PostParams::default(), &revert).await?;
        eprintln!(
            "bulkuserchange/{} created{}",
            created.metadata.name.unwrap_or_default(),
            if args.execute {
                ""
            } else {
                " (mode Validate: review status.plan, then set mode: Execute and spec.approvedPlanHash)"
            }
        );
        return Ok(());
    }
    let yaml = serde_yaml::to_string(&value)?;
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .map_err(|source| CliError::Write {
            path: "stdout".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revert_is_named_after_its_change_and_stays_a_valid_name() {
        assert_eq!(revert_name("sales-roles"), "sales-roles-revert");
        let long = "a".repeat(253);
        assert_eq!(revert_name(&long).len(), 253);
    }
}
