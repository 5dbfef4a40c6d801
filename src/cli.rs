//! The `pbx-operator` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::telemetry::LogFormat;

pub mod revert;

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
    /// Print the full result CSV of an operation, e.g. `results bulkuserchange/sales-roles`.
    Results(ResultsArgs),
    /// Create resources from templates (what scheduled CronJobs run).
    #[command(subcommand)]
    Create(CreateCommand),
    /// Export from a PBX as CSV, e.g. `export users --connection acme/main > users.csv`.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Print the run ledger kept in the PBX database, e.g. `history --connection acme/main`.
    History(crate::history::HistoryArgs),
    /// Print the resource that undoes a finished change, e.g. `revert bulkuserchange/sales-roles`
    /// (for a GitOps commit); `--apply` creates it.
    Revert(revert::RevertArgs),
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Print every user as a CSV that a BulkUserChange's spec.source.csv takes back unchanged
    /// (extension plus the fields a CSV can set), or with --template the header alone.
    Users(ExportUsersArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("pbx").args(["connection", "database_url"])))]
pub struct ExportUsersArgs {
    /// The PbxConnection to read through, as `<namespace>/<name>` (uses the kubeconfig).
    #[arg(long)]
    pub connection: Option<String>,
    /// Read the database directly instead, without Kubernetes (with --domain).
    #[arg(long, env = "PBX_DATABASE_URL", requires = "domain")]
    pub database_url: Option<String>,
    /// The tenant's SIP domain, with --database-url.
    #[arg(long)]
    pub domain: Option<String>,
    /// Print the header only: an empty template to fill in.
    #[arg(long)]
    pub template: bool,
}

#[derive(Subcommand, Debug)]
pub enum CreateCommand {
    /// Create a PhoneRestart from a template, named after its scheduled time, so running this
    /// twice for the same time creates one PhoneRestart.
    PhoneRestart(PhoneRestartArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("template").required(true).args(["from", "from_configmap"])))]
pub struct PhoneRestartArgs {
    /// A YAML file with a PhoneRestart (its metadata.name is the name's prefix) or just its spec.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// A ConfigMap whose key `template.yaml` holds the template (the ConfigMap's name is the prefix).
    #[arg(long)]
    pub from_configmap: Option<String>,
    /// Namespace to create in (default: the kubeconfig's namespace).
    #[arg(short, long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// The cron schedule this run belongs to (UTC), e.g. "0 2 * * *": the name and notBefore use
    /// its latest time at or before now, so a late or repeated fire maps to the same restart.
    #[arg(long)]
    pub schedule: Option<String>,
    /// How long after the scheduled time phones may still be restarted (sets notAfter when the
    /// template has none), e.g. 1h.
    #[arg(long, value_parser = parse_duration_arg)]
    pub window: Option<std::time::Duration>,
}

#[derive(Args, Debug)]
pub struct ResultsArgs {
    /// `<kind>/<name>`; kind is bulkuserchange (buc), bulkphonechange (bpc), phonerestart (prs)
    /// or userrecycle (urc).
    pub target: String,
    /// Namespace of the resource (default: the kubeconfig's namespace).
    #[arg(short, long)]
    pub namespace: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PBX_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Resources of one kind reconciled at the same time.
    #[arg(long, default_value_t = 4, env = "PBX_OPERATOR_CONCURRENCY")]
    pub concurrency: u16,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(
        long,
        default_value = "0.0.0.0:8080",
        env = "PBX_OPERATOR_METRICS_ADDR"
    )]
    pub metrics_addr: std::net::SocketAddr,
    /// Run controllers only while holding the Lease `pbx-operator` in $POD_NAMESPACE, so that of
    /// several replicas exactly one works at a time.
    #[arg(long, env = "PBX_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,
    /// How often the Secrets a PbxConnection references are re-read; a change re-probes it.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg, env = "PBX_OPERATOR_SECRET_CHECK_INTERVAL")]
    pub secret_check_interval: std::time::Duration,
    /// The largest CSV a BulkUserChange may bring (bytes, after gunzip); larger files are refused.
    #[arg(long, default_value_t = crate::plan::sheet::DEFAULT_MAX_BYTES, env = "PBX_OPERATOR_MAX_CSV_BYTES")]
    pub max_csv_bytes: usize,
    /// Targets per batch of a run (1-4000): each batch is one stored ConfigMap, one read and
    /// one compare-and-set write of the PBX, and the unit a restart resumes from.
    #[arg(long, default_value_t = crate::plan::stored::CHUNK_ROWS as u16, value_parser = clap::value_parser!(u16).range(1..=crate::plan::stored::CHUNK_ROWS as i64), env = "PBX_OPERATOR_BATCH_SIZE")]
    pub batch_size: u16,
    /// Serve only PbxConnections labelled `pbx-operator.io/shard: <NAME>` and the operations
    /// on them, with the leader Lease `pbx-operator-shard-<NAME>` (without it: connections
    /// without the label, Lease `pbx-operator`).
    #[arg(long, env = "PBX_OPERATOR_SHARD", value_parser = parse_shard)]
    pub shard: Option<String>,
}

impl From<RunArgs> for crate::controllers::Settings {
    fn from(a: RunArgs) -> Self {
        crate::controllers::Settings {
            namespace: a.namespace,
            concurrency: a.concurrency,
            metrics_addr: a.metrics_addr,
            leader_election: a.leader_election,
            secret_check_interval: a.secret_check_interval,
            max_csv_bytes: a.max_csv_bytes,
            batch_size: a.batch_size.into(),
            shard: a.shard,
        }
    }
}

/// A shard name is a label value (and part of a Lease name): lowercase letters, digits, '-'.
fn parse_shard(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a shard name: use 1 to 40 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::api::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 30s, 5m or 1h"))
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
    #[error("{0}")]
    Usage(String),
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

/// Prints users as CSV: a header of `extension` and the CSV fields, then one row per user in
/// extension order, read 1,000 at a time so a large tenant does not sit in memory at once.
pub async fn export_users(args: &ExportUsersArgs) -> Result<(), CliError> {
    use crate::plan::sheet::{EXTENSION, FIELDS};
    use std::io::Write;

    let mut header = vec![EXTENSION];
    header.extend(FIELDS.iter().map(|f| f.name()));
    let io = |e: csv::Error| CliError::Usage(format!("cannot write the CSV: {e}"));
    if args.template {
        let mut out = csv::Writer::from_writer(std::io::stdout().lock());
        out.write_record(&header).map_err(io)?;
        out.flush().map_err(|e| io(e.into()))?;
        return Ok(());
    }
    let (url, domain) = match (&args.connection, &args.database_url, &args.domain) {
        (Some(conn), _, _) => connection_database(conn).await?,
        (None, Some(url), Some(domain)) => (url.clone(), domain.clone()),
        _ => {
            return Err(CliError::Usage(
                "say where the users are: --connection <namespace>/<name>, or --database-url with --domain (or --template for the header only)".into(),
            ));
        }
    };
    let db = crate::pbx::kamailio::db::Db::connect(&url, &domain, 2)
        .await
        .map_err(crate::controllers::Error::Pbx)?;
    db.check_tables()
        .await
        .map_err(crate::controllers::Error::Pbx)?;
    // Connected: only now is anything printed, so a failed export prints no header alone.
    let stdout = std::io::stdout();
    let mut out = csv::Writer::from_writer(stdout.lock());
    out.write_record(&header).map_err(io)?;
    let extensions = db
        .extensions()
        .await
        .map_err(crate::controllers::Error::Pbx)?;
    for chunk in extensions.chunks(1000) {
        let read = db
            .read_users(&crate::pbx::UserSelection {
                groups: vec![],
                extensions: chunk.to_vec(),
            })
            .await
            .map_err(crate::controllers::Error::Pbx)?;
        let mut users = read.users;
        users.sort_by(|a, b| crate::pbx::extension_order(&a.extension, &b.extension));
        for u in users {
            let mut record = vec![u.extension.as_str()];
            record.extend(FIELDS.iter().map(|f| u.get(*f).unwrap_or("")));
            out.write_record(&record).map_err(io)?;
        }
    }
    out.flush().map_err(|e| io(e.into()))?;
    drop(out);
    std::io::stdout().flush().ok();
    Ok(())
}

/// The database URL and domain of the PbxConnection `<namespace>/<name>` (uses the kubeconfig).
pub(crate) async fn connection_database(conn: &str) -> Result<(String, String), CliError> {
    let (ns, name) = conn.split_once('/').ok_or_else(|| {
        CliError::Usage(format!(
            "--connection takes <namespace>/<name>, not {conn:?}"
        ))
    })?;
    let client = crate::kubectl::client()
        .await
        .map_err(crate::controllers::Error::NoCluster)?;
    let pc = kube::Api::<crate::api::PbxConnection>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| crate::controllers::Error::ConnectionMissing {
            namespace: ns.into(),
            name: name.into(),
        })?;
    let config = crate::controllers::backends::config_for(&client, &pc).await?;
    Ok((config.database_url, config.domain))
}

/// Prints the joined result CSV of `<kind>/<name>`.
pub async fn print_results(args: &ResultsArgs) -> Result<(), CliError> {
    use crate::api::{BulkPhoneChange, BulkUserChange, PhoneRestart, UserRecycle};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, DynamicObject};
    use kube::core::ApiResource;

    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| CliError::Usage(format!("expected <kind>/<name>, got {:?}", args.target)))?;
    let resource = match kind.to_ascii_lowercase().as_str() {
        "bulkuserchange" | "bulkuserchanges" | "buc" => ApiResource::erase::<BulkUserChange>(&()),
        "bulkphonechange" | "bulkphonechanges" | "bpc" => {
            ApiResource::erase::<BulkPhoneChange>(&())
        }
        "phonerestart" | "phonerestarts" | "prs" => ApiResource::erase::<PhoneRestart>(&()),
        "userrecycle" | "userrecycles" | "urc" => ApiResource::erase::<UserRecycle>(&()),
        other => {
            return Err(CliError::Usage(format!(
                "unknown kind {other:?}: use bulkuserchange, bulkphonechange, phonerestart or userrecycle"
            )));
        }
    };
    let client = crate::kubectl::client().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let obj = api.get(name).await?;
    let refs: Vec<String> = obj.data["status"]["resultsRefs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if refs.is_empty() {
        return Err(CliError::Usage(format!(
            "{kind}/{name} has no results yet (status.resultsRefs is empty); wait until it has been planned"
        )));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut parts = Vec::new();
    for r in &refs {
        let cm = cms.get(r).await?;
        parts.push(crate::controllers::results_store::csv_text(&cm).unwrap_or_default());
    }
    let csv = crate::engine::results::join_csv(parts.iter().map(String::as_str));
    let mut out = std::io::stdout().lock();
    out.write_all(csv.as_bytes())
        .map_err(|source| CliError::Write {
            path: "stdout".into(),
            source,
        })?;
    Ok(())
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

/// Creates a PhoneRestart from a template; an existing one of the same scheduled time is success.
pub async fn create_phone_restart(args: &PhoneRestartArgs) -> Result<(), CliError> {
    use crate::api::PhoneRestart;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};

    let client = crate::kubectl::client().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let (text, default_base) = match (&args.from, &args.from_configmap) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CliError::Usage(format!("cannot read template {}: {e}", path.display()))
            })?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("phone-restart")
                .to_string();
            (text, stem)
        }
        (None, Some(name)) => {
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .get(name)
                .await?;
            let text = cm
                .data
                .and_then(|mut d| d.remove("template.yaml"))
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "ConfigMap {namespace}/{name} has no key template.yaml"
                    ))
                })?;
            (text, name.clone())
        }
        (None, None) => {
            return Err(CliError::Usage(
                "give --from FILE or --from-configmap NAME".into(),
            ));
        }
    };
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| CliError::Usage(format!("the template is not YAML: {e}")))?;
    let base = doc["metadata"]["name"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(default_base);
    let mut spec = if doc.get("spec").is_some() {
        doc["spec"].clone()
    } else {
        doc.clone()
    };
    let at = crate::schedule::scheduled_time(args.schedule.as_deref(), jiff::Timestamp::now())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(map) = spec.as_mapping_mut() {
        let key = |k: &str| serde_yaml::Value::String(k.into());
        if !map.contains_key(key("notBefore")) {
            map.insert(key("notBefore"), key(&at.to_string()));
        }
        if let (Some(window), false) = (args.window, map.contains_key(key("notAfter"))) {
            let until = at + jiff::SignedDuration::try_from(window).unwrap_or_default();
            map.insert(key("notAfter"), key(&until.to_string()));
        }
    }
    let name = crate::schedule::restart_name(&base, at);
    let object = serde_json::json!({
        "apiVersion": "pbx-operator.io/v1alpha1",
        "kind": "PhoneRestart",
        "metadata": {
            "name": name,
            "labels": { "app.kubernetes.io/managed-by": "pbx-operator", "pbx-operator.io/template": label_value(&base) },
            "annotations": { "pbx-operator.io/scheduled-time": at.to_string() }
        },
        "spec": serde_json::to_value(&spec).map_err(|e| CliError::Usage(e.to_string()))?,
    });
    let restart: PhoneRestart = serde_json::from_value(object).map_err(|e| {
        CliError::Usage(format!(
            "the template is not a valid PhoneRestart spec: {e}"
        ))
    })?;
    let api: Api<PhoneRestart> = Api::namespaced(client, &namespace);
    match api.create(&PostParams::default(), &restart).await {
        Ok(_) => println!("phonerestart.pbx-operator.io/{name} created"),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            println!(
                "phonerestart.pbx-operator.io/{name} exists already (this scheduled time was handled)"
            )
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// A label value from any name: allowed characters only, at most 63, alphanumeric at both ends.
fn label_value(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}
