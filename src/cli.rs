//! The `pbx-operator` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "pbx-operator",
    version,
    about = "Bulk PBX administration as declarative, reviewable Kubernetes resources",
    long_about = "pbx-operator turns bulk PBX work (changing fields on many users, user actions, \
phone restarts, recycling extensions) into Kubernetes custom resources that can be reviewed, \
validated before they run, and audited afterwards.\n\n\
Install the CRDs with `pbx-operator crds | kubectl apply -f -`, then start the controllers with \
`pbx-operator run`."
)]
pub struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "PBX_OPERATOR_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers against the cluster of the current kubeconfig, or in-cluster.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (what crds/ holds).
    Crds(CrdsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PBX_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Resources of one kind reconciled at the same time.
    #[arg(long, default_value_t = 4, env = "PBX_OPERATOR_CONCURRENCY")]
    pub concurrency: u16,
}

#[derive(Args, Debug)]
pub struct CrdsArgs {
    /// Write one file per kind into this directory instead of printing a multi-document stream.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("could not render the CRDs as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Controller(#[from] crate::controllers::Error),
}

/// Prints every CRD as one YAML stream, or writes one file per kind into `out_dir`.
pub fn print_crds(
    crds: &[(&str, CustomResourceDefinition)],
    out_dir: Option<&Path>,
) -> Result<(), CliError> {
    match out_dir {
        Some(dir) => {
            for (file, crd) in crds {
                let path = dir.join(file);
                let yaml = crate::api::crd_yaml(crd)?;
                std::fs::write(&path, yaml).map_err(|source| CliError::Write { path, source })?;
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            for (_, crd) in crds {
                let yaml = crate::api::crd_yaml(crd)?;
                let written = write!(out, "---\n{yaml}");
                written.map_err(|source| CliError::Write {
                    path: "stdout".into(),
                    source,
                })?;
            }
        }
    }
    Ok(())
}
