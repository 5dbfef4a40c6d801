//! Result rows kept in ConfigMaps `<name>-results-<n>` owned by the resource: the plan of a run
//! before it executes, and each row's outcome after. Written per batch, read to resume.
//!
//! Both files are gzipped in `binaryData` (`rows.jsonl.gz`, `results.csv.gz`): a 4,000-row
//! batch rewritten at each record is a few hundred KiB of JSON, a tenth of that compressed, and
//! the API server and etcd carry every rewrite. Plain `data` from older operators is still read.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};

use super::Error;
use crate::engine::results;
use crate::plan::stored::{self, Row};

pub const MANAGER: &str = "pbx-operator";
const OWNER_LABEL: &str = "pbx-operator.io/owner";
const ROWS_KEY: &str = "rows.jsonl.gz";
const CSV_KEY: &str = "results.csv.gz";
/// Keys an operator before compression wrote (still read, so its runs resume).
const PLAIN_ROWS_KEY: &str = "rows.jsonl";
const PLAIN_CSV_KEY: &str = "results.csv";

fn gzip(text: &str) -> ByteString {
    // Fast compression: the batch is written at every record and the ratio differs little.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(text.as_bytes()).expect("writing to memory");
    ByteString(e.finish().expect("writing to memory"))
}

/// The text of a file of a results ConfigMap, gzipped (`key`) or plain (`plain`); None when
/// it has neither or the gzip is damaged.
fn file(cm: &ConfigMap, key: &str, plain: &str) -> Option<String> {
    if let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(key)) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes.0.as_slice())
            .read_to_string(&mut text)
            .ok()?;
        return Some(text);
    }
    cm.data.as_ref().and_then(|d| d.get(plain)).cloned()
}

/// The stored rows of a results ConfigMap, as JSON lines.
pub fn rows_text(cm: &ConfigMap) -> Option<String> {
    file(cm, ROWS_KEY, PLAIN_ROWS_KEY)
}

/// The result CSV of a results ConfigMap (its part of the run's CSV).
pub fn csv_text(cm: &ConfigMap) -> Option<String> {
    file(cm, CSV_KEY, PLAIN_CSV_KEY)
}

pub fn name(owner: &str, index: usize) -> String {
    format!("{owner}-results-{}", index + 1)
}

pub struct Store<'a, K: Resource<DynamicType = ()>> {
    api: Api<ConfigMap>,
    owner: &'a K,
}

impl<'a, K: Resource<DynamicType = ()>> Store<'a, K> {
    pub fn new(client: &Client, owner: &'a K) -> Self {
        Store {
            api: Api::namespaced(client.clone(), &owner.namespace().unwrap_or_default()),
            owner,
        }
    }

    /// Writes one chunk; `csv_header`: the input header of a CSV-sourced change, whose result
    /// CSV is the input plus `Change OK` and `Notes`.
    pub async fn write_with(
        &self,
        index: usize,
        rows: &[Row],
        csv_header: Option<&[String]>,
    ) -> Result<String, Error> {
        let owner_name = self.owner.name_any();
        let cm_name = name(&owner_name, index);
        let csv = match csv_header {
            Some(header) => results::to_source_csv(header, rows),
            None => results::to_csv(rows),
        };
        let data = BTreeMap::from([
            (CSV_KEY.to_string(), gzip(&csv)),
            (ROWS_KEY.to_string(), gzip(&stored::to_jsonl(rows))),
        ]);
        let owner_ref = self
            .owner
            .controller_owner_ref(&())
            .expect("resources from the API server have a uid");
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(cm_name.clone()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        MANAGER.to_string(),
                    ),
                    (OWNER_LABEL.to_string(), label_value(&owner_name)),
                ])),
                owner_references: Some(vec![owner_ref]),
                ..Default::default()
            },
            binary_data: Some(data),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&cm).expect("ConfigMaps serialize");
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        self.api
            .patch(
                &cm_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        Ok(cm_name)
    }

    pub async fn read(&self, index: usize) -> Result<Vec<Row>, Error> {
        let cm_name = name(&self.owner.name_any(), index);
        let cm = self
            .api
            .get_opt(&cm_name)
            .await?
            .ok_or_else(|| Error::ResultsLost {
                name: cm_name.clone(),
            })?;
        let text = rows_text(&cm).ok_or_else(|| Error::ResultsLost {
            name: cm_name.clone(),
        })?;
        stored::from_jsonl(&text).map_err(|_| Error::ResultsLost { name: cm_name })
    }

    /// Deletes result ConfigMaps of this owner beyond the first `keep`.
    pub async fn prune(&self, keep: usize) -> Result<(), Error> {
        let owner_name = self.owner.name_any();
        let lp =
            ListParams::default().labels(&format!("{OWNER_LABEL}={}", label_value(&owner_name)));
        for cm in self.api.list_metadata(&lp).await? {
            let n = cm.name_any();
            let index = n
                .strip_prefix(&format!("{owner_name}-results-"))
                .and_then(|i| i.parse::<usize>().ok());
            if index.is_some_and(|i| i > keep) {
                self.api.delete(&n, &DeleteParams::default()).await?;
            }
        }
        Ok(())
    }
}

/// Label values are at most 63 characters; long names are cut and made unique with a hash.
fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    use sha2::{Digest, Sha256};
    let h = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    format!("{}-{h}", &name[..54])
}
