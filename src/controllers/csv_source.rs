//! Fetches the CSV a BulkUserChange names in `spec.source.csv`: a ConfigMap key (text in `data`,
//! or bytes in `binaryData`, gzip allowed so large files fit the 1 MiB object limit) or a Secret
//! key when the file holds sensitive columns (only a Secret labelled usable by changes, see
//! [`super::backends::change_secret_bytes`]).
//! The bytes are returned as stored: [`crate::plan::sheet::read`] inflates gzip and checks the size.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::Error;
use crate::api::ConfigMapKeyRef;
use crate::api::user_change::CsvSource;

pub async fn fetch(client: &Client, namespace: &str, source: &CsvSource) -> Result<Vec<u8>, Error> {
    match (&source.config_map_key_ref, &source.secret_key_ref) {
        (Some(c), _) => config_map_bytes(client, namespace, c).await,
        (None, Some(s)) => {
            super::backends::change_secret_bytes(
                client,
                namespace,
                s,
                "spec.source.csv.secretKeyRef",
            )
            .await
        }
        (None, None) => Err(Error::CsvSourceMissing {
            namespace: namespace.into(),
            name: String::new(),
            key: String::new(),
            detail: "neither configMapKeyRef nor secretKeyRef is set".into(),
        }),
    }
}

/// A ConfigMap key's text (`data`) or bytes (`binaryData`).
async fn config_map_bytes(
    client: &Client,
    namespace: &str,
    r: &ConfigMapKeyRef,
) -> Result<Vec<u8>, Error> {
    let missing = |detail: &str| Error::CsvSourceMissing {
        namespace: namespace.to_string(),
        name: r.name.clone(),
        key: r.key.clone(),
        detail: detail.to_string(),
    };
    let cm = match Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&r.name)
        .await
    {
        Ok(Some(cm)) => cm,
        Ok(None) => return Err(missing("it does not exist")),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Err(missing("the operator may not read it (RBAC)"));
        }
        Err(e) => return Err(Error::Kube(e)),
    };
    match cm.data.and_then(|mut d| d.remove(&r.key)) {
        Some(text) => Ok(text.into_bytes()),
        None => cm
            .binary_data
            .and_then(|mut d| d.remove(&r.key))
            .map(|b| b.0)
            .ok_or_else(|| missing("it has no such key in data or binaryData")),
    }
}
