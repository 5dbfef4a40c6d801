//! `pbx-operator revert <kind>/<name>`: the resource that undoes a finished change, printed as
//! YAML (for a GitOps commit) or, with `--apply`, created.

use std::io::Write;

use clap::Args;
use kube::api::{Api, ObjectMeta, PostParams};

use super::CliError;
use crate::api::{
    BulkPhoneChange, BulkPhoneChangeSpec, BulkUserChange, BulkUserChangeSpec, Mode, RevertOf,
    UserRecycle, UserRecycleSpec,
};

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// `<kind>/<name>` of the finished change to undo; kind is bulkuserchange (buc),
    /// bulkphonechange (bpc) or userrecycle (urc).
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
            not_before: None,
            execute_before: None,
            requested_by: None,
        },
        status: None,
    }
}

/// The BulkPhoneChange that reverts `original`.
pub fn phone_change_revert(original: &BulkPhoneChange, execute: bool) -> BulkPhoneChange {
    let name = original.metadata.name.clone().unwrap_or_default();
    BulkPhoneChange {
        metadata: ObjectMeta {
            name: Some(revert_name(&name)),
            namespace: original.metadata.namespace.clone(),
            ..Default::default()
        },
        spec: BulkPhoneChangeSpec {
            connection_ref: original.spec.connection_ref.clone(),
            targets: Default::default(),
            fields: Default::default(),
            mode: if execute {
                Mode::Execute
            } else {
                Mode::Validate
            },
            approved_plan_hash: None,
            revert_of: Some(RevertOf { name }),
            not_before: None,
            execute_before: None,
            requested_by: None,
        },
        status: None,
    }
}

/// The UserRecycle that reverts `original`: it executes when created (a UserRecycle has no
/// Validate mode), so `--apply` asks for `--execute` as well.
pub fn recycle_revert(original: &UserRecycle) -> UserRecycle {
    let name = original.metadata.name.clone().unwrap_or_default();
    UserRecycle {
        metadata: ObjectMeta {
            name: Some(revert_name(&name)),
            namespace: original.metadata.namespace.clone(),
            ..Default::default()
        },
        spec: UserRecycleSpec {
            connection_ref: original.spec.connection_ref.clone(),
            targets: None,
            revert_of: Some(RevertOf { name }),
            reset: crate::api::user_recycle::default_reset(),
            recycle: vec![],
            send_welcome_email: false,
            not_before: None,
            execute_before: None,
            requested_by: None,
        },
        status: None,
    }
}

/// Prints `revert` as YAML, or creates it through `api`.
async fn emit<K>(api: Api<K>, revert: K, args: &RevertArgs, kind: &str) -> Result<(), CliError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if args.apply {
        let created = api.create(&PostParams::default(), &revert).await?;
        eprintln!(
            "{kind}/{} created{}",
            created.meta().name.clone().unwrap_or_default(),
            if args.execute {
                ""
            } else {
                " (mode Validate: review status.plan, then set mode: Execute and spec.approvedPlanHash)"
            }
        );
        return Ok(());
    }
    let mut value = serde_json::to_value(&revert).expect("resources serialize");
    if let Some(o) = value.as_object_mut() {
        o.remove("status");
        // What a revert ignores (a UserRecycle's reset set and mail) is not shown in its YAML.
        if let Some(spec) = o.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.remove("reset");
            spec.remove("sendWelcomeEmail");
        }
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

pub async fn revert(args: &RevertArgs) -> Result<(), CliError> {
    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| CliError::Usage(format!("expected <kind>/<name>, got {:?}", args.target)))?;
    let kind = kind.to_ascii_lowercase();
    let kind = match kind.as_str() {
        "bulkuserchange" | "bulkuserchanges" | "buc" => "bulkuserchange",
        "bulkphonechange" | "bulkphonechanges" | "bpc" => "bulkphonechange",
        "userrecycle" | "userrecycles" | "urc" => "userrecycle",
        other => {
            return Err(CliError::Usage(format!(
                "cannot revert kind {other:?}: bulkuserchange, bulkphonechange and userrecycle can be reverted (a PhoneRestart cannot: a reboot cannot be undone)"
            )));
        }
    };
    if kind == "userrecycle" && args.apply && !args.execute {
        return Err(CliError::Usage(
            "a UserRecycle executes as soon as it is created (it has no Validate mode): review the printed revert first, then pass --apply --execute".into(),
        ));
    }
    let client = crate::kubectl::client().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match kind {
        "bulkuserchange" => {
            let api: Api<BulkUserChange> = Api::namespaced(client, &namespace);
            let mut revert = user_change_revert(&api.get(name).await?, args.execute);
            revert.metadata.namespace = Some(namespace);
            emit(api, revert, args, kind).await
        }
        "bulkphonechange" => {
            let api: Api<BulkPhoneChange> = Api::namespaced(client, &namespace);
            let mut revert = phone_change_revert(&api.get(name).await?, args.execute);
            revert.metadata.namespace = Some(namespace);
            emit(api, revert, args, kind).await
        }
        _ => {
            let api: Api<UserRecycle> = Api::namespaced(client, &namespace);
            let mut revert = recycle_revert(&api.get(name).await?);
            revert.metadata.namespace = Some(namespace);
            emit(api, revert, args, kind).await
        }
    }
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
